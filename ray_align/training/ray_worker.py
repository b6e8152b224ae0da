"""The Ray Train worker loop: DeepSpeed ZeRO on each worker, data from Ray Data shards.

Progress (epoch, micro-batches done in it, optimizer step) is saved inside every checkpoint,
so a restarted or rerun job continues from the exact data position, not from an epoch boundary.
Checkpoints are taken only where an optimizer step ends (``CheckpointSchedule``). Every optimizer
step reports its loss, learning rate, gradient norm and tokens/s to Ray Train (with the
checkpoint when one is due) and, from rank 0, to the run's trackers (``ray_align.tracking``).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs
import torch

from ray_align.config import ModelConfig, TrainConfig
from ray_align.storage import RunDir, local_model_path
from ray_align.tokenization import load_tokenizer, pad_token_id
from ray_align.tracking import training_scalars
from ray_align.training.core import (
    StepMeter,
    adapter_state_dict,
    attention_implementation,
    deepspeed_engine,
    eval_loss,
    export_dtype,
    export_full_model,
    export_merged_model,
    full_state_dict,
    load_model,
    mean_over_ranks,
    micro_batches,
    partitioned_loading,
    real_tokens,
    save_adapter,
    train_step,
    training_dtype,
    uses_varlen_attention,
    while_every_rank_has_one,
)
from ray_align.training.deepspeed_config import deepspeed_config
from ray_align.training.preference import objective_from

PROGRESS_FILE = "progress.json"
LENGTH_GROUP_WINDOW = 16  # micro-batches sorted together by length (less padding)


def restore(engine, checkpoint, *, rank: int = 0, scratch: str | None = None,
            frozen_excluded: bool = False) -> dict[str, int]:
    """Load the DeepSpeed state and data position of a Ray Train checkpoint (None: a fresh
    start). A checkpoint with any part unreadable is an error naming it, never half-used.
    ``frozen_excluded`` (LoRA): the checkpoint holds only the trainable weights, the frozen base
    comes from the model as loaded."""
    if checkpoint is None:
        return {"epoch": 0, "batches_done": 0, "global_step": 0, "tokens": 0}
    with checkpoint_files(checkpoint, rank, scratch) as folder:
        try:
            if not os.path.isdir(os.path.join(folder, "state")):  # DeepSpeed asserts with no text
                raise FileNotFoundError("no DeepSpeed state folder in it")
            engine.load_checkpoint(folder, tag="state", load_module_strict=not frozen_excluded)
            with open(os.path.join(folder, PROGRESS_FILE)) as src:
                progress = json.load(src)
        except Exception as exc:  # noqa: BLE001 - any unreadable part makes the whole unusable
            raise CheckpointError(
                f"checkpoint {checkpoint.path} is unreadable ({type(exc).__name__}: {exc}); "
                "delete that checkpoint folder to restart from the one before it (or from "
                "scratch)") from exc
    print(f"[train] resumed at epoch {progress['epoch']}, batch {progress['batches_done']}, "
          f"step {progress['global_step']}", flush=True)
    return progress


# DeepSpeed names the files only one rank reads by its data-parallel rank: its ZeRO optimizer
# shard (``[bf16_]zero_pp_rank_R_mp_rank_00_optim_states.pt``) and, under ZeRO-3, its model
# states (``zero_pp_rank_R_mp_rank_00_model_states.pt``). Every rank reads the others
# (``mp_rank_00_model_states.pt`` below ZeRO-3, ``latest``, the progress file).
_RANK_FILE = re.compile(r"(?:^|/)(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_\d+_(?:optim|model)_states\.pt$")


def needed_by_rank(rank: int) -> Callable[[str], bool]:
    """Whether a checkpoint file (its path inside the checkpoint) is one ``rank`` reads."""

    def needed(name: str) -> bool:
        match = _RANK_FILE.search(name)
        return match is None or int(match.group(1)) == rank

    return needed


@contextlib.contextmanager
def checkpoint_files(checkpoint, rank: int, scratch: str | None = None) -> Iterator[str]:
    """A local folder holding what ``rank``'s restore reads. A checkpoint on local disk is read
    where it is; one on object storage is downloaded into ``scratch`` (removed afterwards), only
    this rank's ZeRO shards and the files every rank reads: Ray's ``as_directory`` would fetch
    every rank's shards on every node (~112 GB at 8B under ZeRO-3, ~14 GB of it this rank's)."""
    if isinstance(checkpoint.filesystem, pafs.LocalFileSystem):
        yield checkpoint.path
        return
    remote = RunDir.on(checkpoint.filesystem, checkpoint.path)
    with tempfile.TemporaryDirectory(dir=scratch, prefix="restore-") as folder:
        remote.download_dir(to=folder, only=needed_by_rank(rank))
        yield folder


class CheckpointError(RuntimeError):
    """A training checkpoint is truncated or corrupt: never resume from it silently."""


def scratch_folder(train: TrainConfig) -> str:
    """Where this worker stages checkpoints and the export and restores a checkpoint:
    ``train.scratch_dir`` (made when missing), else the system temp dir."""
    folder = train.scratch_dir or tempfile.gettempdir()
    os.makedirs(folder, exist_ok=True)
    return folder


def write_checkpoint(engine, folder: str, progress: dict[str, int], rank: int,
                     frozen_excluded: bool = False) -> None:
    """This rank's part of a checkpoint in ``folder``: its DeepSpeed shard (with
    ``frozen_excluded``, LoRA's, the trainable weights only: the frozen base is the model's own
    and would make every checkpoint as big as the model), and on rank 0 the data position."""
    with _tied_frozen_left_out(engine) if frozen_excluded else contextlib.nullcontext():
        engine.save_checkpoint(folder, tag="state", exclude_frozen_parameters=frozen_excluded)
    if rank == 0:
        with open(os.path.join(folder, PROGRESS_FILE), "w") as out:
            json.dump(progress, out)


@contextlib.contextmanager
def _tied_frozen_left_out(engine) -> Iterator[None]:
    """DeepSpeed leaves a frozen parameter out by its first name only: one tied to it (the LM
    head of a model whose embeddings are tied, vocab x hidden) would stay in the checkpoint under
    its second name. For the save, the engine's state dict leaves out every name of every
    frozen parameter."""
    frozen = {name for name, param in engine.module.named_parameters(remove_duplicate=False)
              if not param.requires_grad}
    state_dict = engine.module_state_dict

    def trainable_only(*args, **kwargs) -> dict[str, Any]:
        return {k: v for k, v in state_dict(*args, **kwargs).items() if k not in frozen}

    engine.module_state_dict = trainable_only
    try:
        yield
    finally:
        del engine.module_state_dict  # the engine's own method again


def _save(engine, progress: dict[str, int], metrics: dict[str, Any], *, scratch: str | None = None,
          frozen_excluded: bool = False) -> None:
    """Every rank writes its DeepSpeed shard into ``scratch``; Ray Train gathers them into one
    checkpoint."""
    import ray.train

    with tempfile.TemporaryDirectory(dir=scratch, prefix="checkpoint-") as folder:
        write_checkpoint(engine, folder, progress, ray.train.get_context().get_world_rank(),
                         frozen_excluded)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


@dataclass
class CheckpointSchedule:
    """When the worker saves a checkpoint: only where an optimizer step ends.

    DeepSpeed steps the optimizer on every ``grad_accum``-th micro-batch counted over the whole
    run (``engine.is_gradient_accumulation_boundary``: its count never restarts at an epoch), and
    a checkpoint holds neither the gradients accumulated since the last step nor that count (it
    is 0 again after a load). One saved mid-step would resume with those micro-batches' gradients
    lost and every later step boundary shifted. So an epoch that ends mid-step reports its
    metrics then and saves at the next step boundary, in the next epoch.
    """

    grad_accum: int
    every_steps: int | None = None  # periodic checkpoints, in optimizer steps (None: none)
    owed: bool = False  # an epoch ended mid-step: save at the next step boundary

    def after_micro_batch(self, micro_done: int) -> bool:
        """Save now that the run's ``micro_done``-th micro-batch is trained?"""
        if micro_done % self.grad_accum:
            return False
        steps = micro_done // self.grad_accum
        periodic = bool(self.every_steps) and steps % self.every_steps == 0
        save, self.owed = self.owed or periodic, False
        return save

    def at_epoch_end(self, micro_done: int, finished: bool) -> bool:
        """Save at an epoch's end? At a step boundary, or when training is over (its last,
        partial step is never taken, so nothing is lost); otherwise at the next boundary."""
        self.owed = not finished and micro_done % self.grad_accum != 0
        return not self.owed


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Entry point Ray Train runs on every worker."""
    import ray.train

    train = TrainConfig.model_validate(loop_config["train"])
    model_cfg = ModelConfig.model_validate(loop_config["model"])
    # a base model on object storage is read from this node's copy (downloaded once)
    model_cfg = model_cfg.model_copy(update={"path": local_model_path(model_cfg.path)})
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.manual_seed(train.seed)

    tokenizer = load_tokenizer(model_cfg.path, model_cfg.trust_remote_code)
    pad_id = pad_token_id(tokenizer)
    dtype = training_dtype(train)
    with partitioned_loading(deepspeed_config(train, world)):  # ZeRO-3: no whole copy per rank
        model = load_model(model_cfg.path, dtype=dtype, trust_remote_code=model_cfg.trust_remote_code,
                           lora=train.lora, gradient_checkpointing=train.gradient_checkpointing,
                           attn_implementation=attention_implementation(train.attn_implementation,
                                                                        train.use_gpu))
    engine = deepspeed_engine(model, train, world)
    objective = objective_from(loop_config.get("objective"))  # None: the language-model loss
    # packing: sequences of up to the build's max_seq_len, laid out flat for flash-attention
    pack_len = loop_config["max_seq_len"] if train.packing else None
    flat = uses_varlen_attention(model)
    scratch = scratch_folder(train)  # checkpoints and the export are staged here
    lora = train.lora is not None  # checkpoints without the frozen base
    progress = restore(engine, ray.train.get_checkpoint(), rank=rank, scratch=scratch,
                       frozen_excluded=lora)
    resumed_from = progress["global_step"]  # 0 unless this attempt continues a checkpoint
    rows_per_rank = loop_config["train_rows"] // world
    batches_per_epoch = math.ceil(rows_per_rank / train.micro_batch_size)
    max_micro = None if train.max_steps is None else train.max_steps * train.grad_accum
    schedule = CheckpointSchedule(train.grad_accum, train.checkpoint_every_steps)
    folder = loop_config.get("folder", "train")
    # the last step's model is the export at the end; a resumed attempt keeps earlier points
    curve_points = {s for s in train.export_at_steps or () if s != train.max_steps and s > resumed_from}
    bar = loop_config.get("progress")  # the driver's progress bar, fed by rank 0
    shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("validation")

    started, tokens, train_s = time.perf_counter(), 0, 0.0  # train_s: training loops only
    # micro-batches trained in the run so far; packed epochs differ in length, so checkpoints
    # record it (older ones, never packed, have epochs of ``batches_per_epoch``)
    micro_done = progress.get("micro_done",
                              progress["epoch"] * batches_per_epoch + progress["batches_done"])
    loss = float("nan")  # the last optimizer step's
    # the step under way, which may span an epoch's end, as DeepSpeed's accumulation does
    meter = StepMeter(engine.device)
    spec = loop_config.get("tracking")  # rank 0 logs every step (TensorBoard, MLflow, W&B)
    with (spec.open(resume_step=resumed_from + 1) if spec is not None and rank == 0
          else contextlib.nullcontext()) as tracker:
        for epoch in range(progress["epoch"], train.epochs):
            skip = progress["batches_done"] if epoch == progress["epoch"] else 0
            window = shard.iter_batches(batch_size=train.micro_batch_size * LENGTH_GROUP_WINDOW,
                                        batch_format="numpy", drop_last=False)
            batches = micro_batches(window, pad_id, train.micro_batch_size,
                                    seed=train.seed + epoch, pack_len=pack_len, flat=flat)
            if pack_len is not None:  # ranks pack their own rows: epochs of unequal length
                batches = while_every_rank_has_one(batches, engine.device)
            epoch_started = time.perf_counter()
            meter.restart()
            for index, batch in enumerate(batches):
                if index < skip:
                    meter.restart()
                    continue  # consumed before the restart; its gradient is already in the weights
                if max_micro is not None and micro_done >= max_micro:
                    break
                real = real_tokens(batch)
                meter.add(train_step(engine, batch, objective), real)
                tokens += real
                micro_done += 1
                if micro_done % train.grad_accum:
                    continue
                # an optimizer step ended: its metrics to the trackers and to Ray Train, with a
                # checkpoint when one is due
                step = {**meter.finish(engine), "global_step": engine.global_steps, "epoch": epoch}
                loss = step["loss"]
                if engine.global_steps in curve_points:  # a learning curve's point, kept as is
                    _export(engine, model_cfg, train, tokenizer, loop_config["run_dir"],
                            step_folder(folder, engine.global_steps), rank, dtype)
                if tracker is not None:
                    tracker.log(training_scalars(step), engine.global_steps)
                if schedule.after_micro_batch(micro_done):
                    state = {"epoch": epoch, "batches_done": index + 1, "micro_done": micro_done,
                             "global_step": engine.global_steps,
                             "tokens": progress["tokens"] + tokens}
                    _save(engine, state, step, scratch=scratch, frozen_excluded=lora)
                    if tracker is not None:
                        tracker.upload()
                else:
                    ray.train.report(step)
                if bar is not None and rank == 0:
                    seconds = time.perf_counter() - started
                    bar.update.remote({
                        "global_step": engine.global_steps, "loss": loss,
                        "tok_s": tokens * world / seconds if seconds else 0.0})
            train_s += time.perf_counter() - epoch_started
            val_batches = micro_batches(
                val_shard.iter_batches(batch_size=train.micro_batch_size, batch_format="numpy"),
                pad_id)
            # each rank evaluates its own shard of the validation set
            val_loss, _ = mean_over_ranks(*eval_loss(engine, val_batches, engine.device, objective),
                                          engine.device)
            finished = epoch + 1 == train.epochs or (max_micro is not None and micro_done >= max_micro)
            everyone = _sum_over_ranks(tokens, engine.device)
            metrics = {
                "loss": loss, "val_loss": val_loss, "epoch": epoch + 1,
                "global_step": engine.global_steps,
                "tokens_per_s": everyone / train_s if train_s else 0.0, "train_seconds": train_s,
                "tokens": everyone, "resumed_from_step": resumed_from,
            }
            if tracker is not None:
                tracker.log(training_scalars({"val_loss": val_loss}), engine.global_steps)
            if schedule.at_epoch_end(micro_done, finished):
                state = {"epoch": epoch + 1, "batches_done": 0, "micro_done": micro_done,
                         "global_step": engine.global_steps, "tokens": progress["tokens"] + tokens}
                _save(engine, state, metrics, scratch=scratch, frozen_excluded=lora)
            else:
                ray.train.report(metrics)  # the checkpoint waits for the step to end
            if tracker is not None:
                tracker.upload()
            if finished:
                break
    _export(engine, model_cfg, train, tokenizer, loop_config["run_dir"], folder, rank, dtype)


def step_folder(train_folder: str, step: int) -> str:
    """Where a learning curve's point (``train.export_at_steps``) is exported: the model as it
    was after ``step`` optimizer steps, laid out as the train stage's own export."""
    return f"{train_folder}/steps/{step}"


def _sum_over_ranks(value: int, device: torch.device | str | None = None) -> int:
    """Sum over all workers (each one counts only the tokens it trained on). On the engine's
    device: NCCL, Ray Train's backend on GPUs, reduces no host tensors."""
    total = torch.tensor([value], dtype=torch.long, device=device)
    torch.distributed.all_reduce(total)
    return int(total)


def _stamp(model_dir: str) -> None:
    """A ``hash`` file naming this export: ``ray.data.llm`` downloads an ``s3://`` / ``gs://``
    model or LoRA adapter into a cache folder named by it, so an engine never serves an older
    export kept in its cache under the same URI."""
    with open(os.path.join(model_dir, "hash"), "w") as out:
        out.write(uuid.uuid4().hex + uuid.uuid4().hex[:8])


def _export(engine, model_cfg: ModelConfig, train: TrainConfig, tokenizer, run_dir: str,
            folder: str, rank: int, training_dtype: torch.dtype) -> None:
    """Gather the trained weights (all ranks take part under ZeRO-3), write them on rank 0 into
    local folders, and upload ``<folder>/model`` (and for LoRA ``<folder>/adapter``).

    Full fine-tuning gathers the whole module; LoRA gathers only the adapter and merges it into
    the base on rank 0. Each upload replaces its target file by file with the config last (no
    folder rename: object stores have none). The old model is deleted first and uploaded last,
    and an old adapter never outlives a full fine-tune, so a ``model/config.json`` means this
    export is complete and any ``adapter/`` beside it is its own.
    """
    state = (full_state_dict(engine, train.zero_stage, rank) if train.lora is None
             else adapter_state_dict(engine.module, train.zero_stage, rank))
    if rank != 0:
        return
    dtype = export_dtype(model_cfg.dtype, model_cfg.path, training_dtype,
                         trust_remote_code=model_cfg.trust_remote_code)
    run = RunDir(run_dir)
    run.delete(folder, "model")
    run.delete(folder, "adapter")
    with tempfile.TemporaryDirectory(dir=scratch_folder(train), prefix="export-") as staging:
        model_dir = os.path.join(staging, "model")
        if train.lora is None:
            export_full_model(state, model_cfg.path, model_dir, dtype=dtype, tokenizer=tokenizer,
                              trust_remote_code=model_cfg.trust_remote_code)
        else:
            adapter_dir = os.path.join(staging, "adapter")
            save_adapter(engine.module, state, adapter_dir)
            _stamp(adapter_dir)  # engines serving it from object storage cache it by this
            export_merged_model(model_cfg.path, adapter_dir, model_dir, dtype=dtype,
                                tokenizer=tokenizer, trust_remote_code=model_cfg.trust_remote_code)
            run.upload_dir(adapter_dir, folder, "adapter")
            print(f"[{folder}] exported LoRA adapter {run.uri_of(folder, 'adapter')}", flush=True)
        _stamp(model_dir)
        run.upload_dir(model_dir, folder, "model")
        print(f"[{folder}] exported model ({str(dtype).removeprefix('torch.')}) "
              f"{run.uri_of(folder, 'model')}", flush=True)
