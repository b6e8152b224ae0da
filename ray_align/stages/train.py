"""Step 3, unguided analysis fine-tuning: Ray Train drives DeepSpeed ZeRO on every worker, data
through Ray Data shards, loss on target tokens only; exports a Hugging Face model directory."""

from __future__ import annotations

import contextlib
import math
import os
import uuid
from collections.abc import Iterator

from ray_align.pipeline import Context, StageOutput, manifest
from ray_align.tracking import tracker_spec

TRAIN_COLUMNS = ["input_ids", "prompt_len"]
PAIR_COLUMNS = [*TRAIN_COLUMNS, "rejected_ids"]  # a preference objective's rows


def check_resources(train_cfg, available: dict[str, float]) -> None:
    """Fail fast, naming the setting, when the cluster cannot hold the training workers
    (otherwise the run would wait forever for resources)."""
    need_cpu = train_cfg.num_workers * train_cfg.cpus_per_worker
    if available.get("CPU", 0) < need_cpu:
        raise ValueError(
            f"train: {train_cfg.num_workers} workers x train.cpus_per_worker="
            f"{train_cfg.cpus_per_worker} need {need_cpu:g} CPUs; the cluster has "
            f"{available.get('CPU', 0):g}. Lower train.cpus_per_worker or train.num_workers, "
            "or add nodes.")
    if train_cfg.use_gpu and available.get("GPU", 0) < train_cfg.num_workers:
        raise ValueError(f"train: {train_cfg.num_workers} GPU workers but the cluster has "
                         f"{available.get('GPU', 0):g} GPUs; lower train.num_workers or add GPU nodes.")


def total_steps(train_cfg, train_rows: int, micro_per_epoch: int | None = None) -> int:
    """Optimizer steps the run will take (each worker reads an equal share of the rows), with
    padded micro-batches; packed, each worker's ``micro_per_epoch`` (``packed_steps``)."""
    if micro_per_epoch is None:
        micro_per_epoch = math.ceil(train_rows // train_cfg.num_workers / train_cfg.micro_batch_size)
    steps = train_cfg.epochs * micro_per_epoch // train_cfg.grad_accum
    return min(steps, train_cfg.max_steps or steps)


def estimated_total_steps(cfg) -> int | None:
    """Optimizer steps estimated from the config alone, before any data exists: one analysis
    per harmful prompt (``data.harmful.limit``), ``build.helpful_ratio`` helpful samples each,
    less the validation share, one sample per row. Packed, that is an upper bound (a sequence
    holds one sample or more). None without ``data.harmful.limit``."""
    harmful = cfg.data.harmful.limit
    if harmful is None:
        return None
    helpful = round(cfg.build.helpful_ratio * harmful)
    if cfg.data.helpful.limit is not None:
        helpful = min(helpful, cfg.data.helpful.limit)
    train_rows = int((harmful + helpful) * (1 - cfg.build.val_fraction))
    return total_steps(cfg.train, train_rows)


def planned_steps(cfg, run=None, build_folder: str = "build") -> tuple[int, bool, str] | None:
    """The run's optimizer steps, whether that is an upper bound (a packed estimate), and how
    they were found: counted from ``build_folder``'s rows when ``run`` holds them, else
    estimated from the config (``estimated_total_steps``)."""
    if run is not None and run.exists(build_folder, "train.parquet"):
        import pyarrow.parquet as pq

        rows = pq.read_metadata(run.path(build_folder, "train.parquet"), filesystem=run.fs).num_rows
        micro = (packed_micro_per_epoch(cfg.train, run, build_folder, cfg.max_seq_len)
                 if cfg.train.packing else None)
        return total_steps(cfg.train, rows, micro), False, f"counted from {build_folder}/train.parquet"
    estimate = estimated_total_steps(cfg)
    if estimate is None:
        return None
    how = ("estimated from the config: data.harmful.limit x (1 + build.helpful_ratio) rows less "
           "build.val_fraction, one row per micro-batch slot" + ("; packing makes fewer steps"
                                                                   if cfg.train.packing else ""))
    return estimate, cfg.train.packing, how


def schedule_warnings(train_cfg, steps: int, upper_bound: bool, how: str) -> list[str]:
    """What in the learning-rate and checkpoint schedule does not fit ``steps`` optimizer
    steps (``upper_bound``: at most that many): a warmup that never ends, a checkpoint
    interval that saves nothing before the end."""
    total = f"optimizer steps of training, {'at most ' if upper_bound else ''}{steps} ({how})"
    lines = []
    if train_cfg.warmup_steps and train_cfg.warmup_steps >= steps:
        lines.append(f"train.warmup_steps {train_cfg.warmup_steps} >= the {total}: the learning "
                     "rate never reaches train.lr; set a few % of the steps, or train on more data")
    every = train_cfg.checkpoint_every_steps
    if every is not None and every > steps:
        lines.append(f"train.checkpoint_every_steps {every} > the {total}: no checkpoint before "
                     "the end, a failed worker restarts from step 0; set it below the total")
    return lines


def check_warnings(cfg) -> list[str]:
    """``ray-align check``'s schedule warnings: from the build's rows when a local run directory
    holds them (a remote one is not opened by a check), else from the config."""
    from ray_align.storage import RunDir

    run = RunDir(cfg.run_dir) if "://" not in cfg.run_dir else None
    planned = planned_steps(cfg, run)
    return schedule_warnings(cfg.train, *planned) if planned else []


def packed_micro_per_epoch(train_cfg, run, build_folder: str, max_seq_len: int) -> int | None:
    """Micro-batches a worker takes in a packed epoch, estimated for the progress bar: its
    share of the rows taken as a contiguous slice (Ray Data hands the shares out as it goes).
    None where the build's rows cannot be read here."""
    import pyarrow.compute as pc

    from ray_align.training.core import packed_micro_batches
    from ray_align.training.ray_worker import LENGTH_GROUP_WINDOW

    if not run.exists(build_folder, "train.parquet"):
        return None
    # the chosen answer's length without reading any token ids: num_tokens less the rejected's
    table = run.read_table(build_folder, "train.parquet", columns=["num_tokens", "rejected_ids"])
    lengths = pc.subtract(table.column("num_tokens"),
                          pc.list_value_length(table.column("rejected_ids"))).to_pylist()
    share = len(lengths) // train_cfg.num_workers
    return max(packed_micro_batches(lengths[rank * share : (rank + 1) * share],
                                    train_cfg.micro_batch_size,
                                    train_cfg.micro_batch_size * LENGTH_GROUP_WINDOW, max_seq_len)
               for rank in range(train_cfg.num_workers))


def ordered_dataset_config():
    """Ray Train's data options for the workers' shards, with ``preserve_order``: the same
    order on every run, so a resumed epoch skips exactly the batches already trained. Given to
    the trainer alone, not set in the global ``DataContext``, where every later stage's datasets
    would inherit it (and lose the speed of out-of-order execution)."""
    from ray.train import DataConfig

    options = DataConfig.default_ingest_options()
    options.preserve_order = True
    return DataConfig(execution_options=options)


def read_ordered(uri: str, columns: list[str]):
    """A build split's token ids, materialized in file order (the order resuming relies on)."""
    import ray.data

    dataset = ray.data.read_parquet(uri, columns=columns)
    dataset.context.execution_options.preserve_order = True  # this dataset's own context copy
    return dataset.materialize()


# Ray Train's controller takes one report per worker each time it polls the workers, every
# RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by default), and a worker's report waits until the one
# before it is taken (ray/train/v2/_internal/execution/context.py: a result queue of size 1).
# Reporting every optimizer step would hold training to one step per poll: polled this often,
# a step waits at most this long. Each poll is one small call to each worker.
REPORT_POLL_S = 0.1
POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"  # read where the controller starts; Ray passes it on


@contextlib.contextmanager
def reports_taken_every(seconds: float) -> Iterator[None]:
    """Ray Train's controller polls the workers every ``seconds`` during ``fit()``, unless the
    environment sets the interval already."""
    if POLL_ENV in os.environ:
        yield
        return
    os.environ[POLL_ENV] = str(seconds)
    try:
        yield
    finally:
        os.environ.pop(POLL_ENV, None)


def train(ctx: Context) -> StageOutput:
    """The method's fine-tuning: ``build`` -> ``train/model``."""
    return train_model(ctx, "build", "train")


def reference_gpus(train_cfg, nodes: list[dict] | None = None) -> int:
    """GPUs for the reference scorer: the training workers' (all free before they start), at
    most what one node holds (one actor lives on one node), so a model that only fits across
    the training GPUs fits across the scorer's too (``ReferenceScorer`` spreads its layers)."""
    if not train_cfg.use_gpu:
        return 0
    if nodes is None:
        import ray

        nodes = ray.nodes()
    per_node = max((node.get("Resources", {}).get("GPU", 0) for node in nodes
                    if node.get("Alive", True)), default=0)
    return max(1, min(train_cfg.num_workers, int(per_node)))


@contextlib.contextmanager
def _order_preserved() -> Iterator[None]:
    """Ray Data keeps rows in order for the block's datasets built and run in it (the global
    context: a dataset's own copy does not reach ``union``), and as it was afterwards."""
    from ray.data import DataContext

    options = DataContext.get_current().execution_options
    saved, options.preserve_order = options.preserve_order, True
    try:
        yield
    finally:
        options.preserve_order = saved


def with_reference_logps(data: dict, cfg) -> dict:
    """DPO with full fine-tuning: each pair's log-probabilities under the base model, computed
    once before training (the CPUs and GPUs are free then, the training workers have not
    started). Every split goes through one pass of one actor, so the base model is loaded
    once: the splits' rows are tagged, joined, scored and taken apart by their tags (``union``
    interleaves its inputs' blocks; each input's own order is kept)."""
    from ray.data import ActorPoolStrategy

    from ray_align.tokenization import load_tokenizer, pad_token_id
    from ray_align.training.core import training_dtype
    from ray_align.training.preference import ReferenceScorer

    names = list(data)
    pad_id = pad_token_id(load_tokenizer(cfg.model.path, cfg.model.trust_remote_code))
    with _order_preserved():  # each split's rows stay in file order (resuming relies on it)
        tagged = [data[name].map_batches(_tagged, fn_kwargs={"split": i}, batch_format="numpy")
                  for i, name in enumerate(names)]
        scored = tagged[0].union(*tagged[1:]).map_batches(
        ReferenceScorer, batch_format="numpy", batch_size=64, compute=ActorPoolStrategy(size=1),
        num_gpus=reference_gpus(cfg.train), num_cpus=cfg.train.cpus_per_worker,
        fn_constructor_kwargs={"model_path": cfg.model.path, "dtype": training_dtype(cfg.train),
                               "pad_id": pad_id, "batch_rows": cfg.train.micro_batch_size,
                               "trust_remote_code": cfg.model.trust_remote_code,
                               "device": "cuda" if cfg.train.use_gpu else "cpu"}).materialize()
        return {name: scored.map_batches(_untagged, fn_kwargs={"split": i}, batch_format="numpy")
                .materialize() for i, name in enumerate(names)}


SPLIT_TAG = "__split"


def _tagged(batch: dict, split: int) -> dict:
    """A batch of one split's rows, each tagged with the split's number."""
    import numpy as np

    return {**batch, SPLIT_TAG: np.full(len(next(iter(batch.values()))), split, dtype=np.int8)}


def _untagged(batch: dict, split: int) -> dict:
    """The rows of a batch tagged ``split``, without the tag."""
    keep = batch[SPLIT_TAG] == split
    return {key: values[keep] for key, values in batch.items() if key != SPLIT_TAG}


def objective_spec(cfg, objective: str) -> dict | None:
    """What the training workers need of the objective (None: the language-model loss)."""
    if objective == "sft":
        return None
    return {"kind": objective, **cfg.compare.dpo.model_dump(mode="json")}


def train_model(ctx: Context, build_folder: str, folder: str, objective: str = "sft") -> StageOutput:
    """Fine-tune on ``build_folder``'s samples; export the model to ``folder/model`` (the
    baselines of ``ray-align compare`` train the same way, each into its own folder).
    ``objective`` ``dpo`` trains on the build's preference pairs (padded, never packed)."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from ray_align.training.progress import TrainProgressBar
    from ray_align.training.ray_worker import train_loop_per_worker

    cfg, run = ctx.config, ctx.run
    if objective != "sft":  # pairs are laid out padded, chosen beside rejected
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"packing": False})})
    ctx.ensure_ray()
    ctx.release_engines(for_training=True)
    if cfg.train.check_resources:
        check_resources(cfg.train, ray.cluster_resources())
    # Token ids are small: read them before the workers take the CPUs, so feeding the workers
    # needs no further tasks (a read waiting for a CPU the workers hold would wait forever).
    columns = TRAIN_COLUMNS if objective == "sft" else PAIR_COLUMNS
    data = {split: read_ordered(run.uri_of(build_folder, f"{split}.parquet"), columns)
            for split in ("train", "validation")}
    if objective != "sft" and cfg.train.lora is None:  # LoRA: the adapter-disabled model
        data = with_reference_logps(data, cfg)
    train_rows = data["train"].count()
    if train_rows < cfg.train.num_workers:
        raise ValueError(f"{folder}: {train_rows} training rows for {cfg.train.num_workers} workers")
    micro_per_epoch = (packed_micro_per_epoch(cfg.train, run, build_folder, cfg.max_seq_len)
                       if cfg.train.packing else None)
    steps = total_steps(cfg.train, train_rows, micro_per_epoch)
    for line in schedule_warnings(cfg.train, steps, False, f"counted from {build_folder}/train.parquet"):
        print(f"[{folder}] warning: {line}", flush=True)
    progress = TrainProgressBar(steps)
    # the stage attempt run_stage recorded (the training benchmark calls this without one)
    attempt = (manifest(run, folder) or {}).get("attempt") or uuid.uuid4().hex[:12]
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"train": cfg.train.model_dump(mode="json"),
                           "model": cfg.model.model_dump(mode="json"),
                           "run_dir": run.uri, "folder": folder, "train_rows": train_rows,
                           "max_seq_len": cfg.max_seq_len,
                           "objective": objective_spec(cfg, objective),
                           "progress": progress.handle,
                           "tracking": tracker_spec(cfg, run, folder, attempt)},
        scaling_config=ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu,
                                     resources_per_worker={"CPU": cfg.train.cpus_per_worker}),
        run_config=RunConfig(
            name="ray_train", storage_path=run.uri_of(folder),
            checkpoint_config=CheckpointConfig(num_to_keep=1),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
        ),
        datasets=data,
        dataset_config=ordered_dataset_config(),
    )
    with progress, reports_taken_every(REPORT_POLL_S):
        result = trainer.fit()
    if result.error:
        raise result.error
    if not run.exists(folder, "model", "config.json"):
        raise RuntimeError(f"{folder} finished but no model was exported to {run.uri_of(folder, 'model')}")
    metrics = {k: v for k, v in (result.metrics or {}).items()
               if k in ("loss", "val_loss", "global_step", "tokens_per_s", "tokens", "train_seconds",
                        "resumed_from_step")}
    return StageOutput(train_rows, "model", metrics)
