"""The training core: batching with target-only loss, the model and one step, export.

Nothing here imports Ray, so the same code runs under plain ``torch.distributed`` (or in one
process) where Ray is absent, for example to measure it on a GPU machine. Samples are tokenized
in ``ray_align.tokenization`` (no torch there).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch

from ray_align.config import LoraConfig, TrainConfig
from ray_align.training.token_loss import IGNORE_INDEX, lm_loss


def training_dtype(train: TrainConfig) -> torch.dtype:
    """The dtype the model is loaded and trained in, from ``train.precision``."""
    return torch.bfloat16 if train.precision == "bf16" else torch.float32


def collate(rows: Iterable[tuple[Any, int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch; labels are the input ids with prompt and padding ignored."""
    rows = list(rows)
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, prompt_len) in enumerate(rows):
        ids = torch.as_tensor(np.asarray(ids, dtype=np.int64))
        input_ids[i, : len(ids)] = ids
        attention[i, : len(ids)] = 1
        labels[i, prompt_len : len(ids)] = ids[prompt_len:]
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def pack_rows(rows: Iterable[tuple[Any, int]], capacity: int) -> list[list[tuple[Any, int]]]:
    """Group rows into sequences of at most ``capacity`` tokens (first-fit decreasing), so a
    micro-batch carries tokens, not padding. A row longer than ``capacity`` (the build stage
    truncates to it, so none should be) gets a sequence of its own. Deterministic: the same rows
    in the same order give the same sequences."""
    bins: list[list[tuple[Any, int]]] = []
    room: list[int] = []
    for row in sorted(rows, key=lambda r: -len(r[0])):  # stable: ties keep their order
        size = len(row[0])
        free = next((i for i, left in enumerate(room) if size <= left), None)
        if free is None:
            bins.append([row])
            room.append(capacity - size)
        else:
            bins[free].append(row)
            room[free] -= size
    return bins


def _packed_sequence(rows: list[tuple[Any, int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One packed sequence: ids, labels (targets only) and position ids restarting per sample.

    Each sample's first position is never a target (unpacked, nothing predicts it), so the last
    token of one sample is never trained to predict the next sample's first token."""
    ids, labels, positions = [], [], []
    for row_ids, prompt_len in rows:
        row = torch.as_tensor(np.asarray(row_ids, dtype=np.int64))
        target = row.clone()
        target[: max(prompt_len, 1)] = IGNORE_INDEX
        ids.append(row)
        labels.append(target)
        positions.append(torch.arange(len(row)))
    return torch.cat(ids), torch.cat(labels), torch.cat(positions)


def collate_packed(bins: list[list[tuple[Any, int]]], pad_id: int,
                   flat: bool = False) -> dict[str, Any]:
    """A micro-batch of packed sequences; attention stays within each sample.

    Default layout (SDPA, eager, flex): one row per sequence, right-padded, no 2-D attention
    mask, position ids restarting at every sample: transformers then builds a block-diagonal
    causal mask from the position ids (``masking_utils.find_packed_sequence_indices``); padding
    gets position ids of its own, so it is a separate block that real tokens never see.
    ``flat`` (flash-attention, which has a padding-free varlen kernel): every sample end to end
    in a single row with ``cu_seq_lens_*`` / ``max_length_*``, no padding at all.
    ``use_cache`` is off: with a cache transformers ignores the position ids' sample boundaries
    (and attention would cross samples). ``sample_lengths`` (real tokens per sample, for tokens/s
    and FLOPs) is not a model input: ``model_inputs`` drops it.
    """
    seqs = [_packed_sequence(rows) for rows in bins]
    lengths = [len(ids) for rows in bins for ids, _ in rows]
    if flat:
        input_ids, labels, positions = (torch.cat(part)[None] for part in zip(*seqs, strict=True))
        cu = torch.tensor([0, *np.cumsum(lengths)], dtype=torch.int32)
        return {"input_ids": input_ids, "labels": labels, "position_ids": positions,
                "cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": max(lengths),
                "max_length_k": max(lengths), "use_cache": False,
                "sample_lengths": torch.tensor(lengths)}
    width = max(len(ids) for ids, _, _ in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), width), IGNORE_INDEX, dtype=torch.long)
    positions = torch.arange(width).repeat(len(seqs), 1)
    for i, (ids, target, pos) in enumerate(seqs):
        input_ids[i, : len(ids)], labels[i, : len(ids)] = ids, target
        positions[i, : len(ids)] = pos
        positions[i, len(ids) :] = torch.arange(width - len(ids))  # padding: a block of its own
    return {"input_ids": input_ids, "labels": labels, "position_ids": positions,
            "use_cache": False, "sample_lengths": torch.tensor(lengths)}


NOT_MODEL_INPUTS = frozenset({"sample_lengths", "chosen_rows", "rejected_rows", "sft_rows", "reference"})


def model_inputs(batch: dict[str, Any], device: torch.device | str | None = None) -> dict[str, Any]:
    """The keyword arguments a micro-batch gives the model (bookkeeping keys dropped), tensors
    moved to ``device``."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) and device is not None else v
            for k, v in batch.items() if k not in NOT_MODEL_INPUTS}


def real_tokens(batch: dict[str, Any]) -> int:
    """Tokens of the samples in a micro-batch, padding not counted (the measure of tokens/s)."""
    if "sample_lengths" in batch:
        return int(batch["sample_lengths"].sum())
    return int(batch["attention_mask"].sum())


def uses_varlen_attention(model) -> bool:
    """Whether the model's attention has a padding-free varlen kernel (flash-attention): then
    packed micro-batches are laid out flat (``collate_packed(flat=True)``)."""
    name = getattr(getattr(model, "config", None), "_attn_implementation", None) or ""
    return "flash" in name  # flash_attention_2 / _3, or a hub kernel such as .../flash-attn2


def packed_micro_batches(lengths: list[int], size: int, window: int, pack_len: int) -> int:
    """How many micro-batches ``micro_batches(..., size, pack_len=pack_len)`` makes of rows of
    these lengths read in windows of ``window`` rows (the progress bar's total)."""
    count = 0
    for start in range(0, len(lengths), window):
        rows = [(range(n), 0) for n in lengths[start : start + window]]
        count += -(-len(pack_rows(rows, pack_len)) // size)
    return count


def micro_batches(
    batches: Iterable[dict[str, Any]], pad_id: int, size: int | None = None, seed: int = 0,
    pack_len: int | None = None, flat: bool = False,
) -> Iterator[dict[str, Any]]:
    """Turn column batches (``input_ids``, ``prompt_len``) into micro-batch tensors.

    With ``size``, each incoming batch (a window of several micro-batches) is sorted by length
    and cut into micro-batches of ``size`` rows, taken in a seeded random order: rows of like
    length share a micro-batch, so far less compute goes to padding. The order depends only on
    the data and the seed, so a resumed run can skip exactly the micro-batches already done.

    With ``pack_len``, the window's rows are first packed into sequences of at most ``pack_len``
    tokens (``pack_rows``) and a micro-batch is ``size`` such sequences (``collate_packed``):
    fewer, fuller micro-batches, the same deterministic order.
    """
    rng = np.random.default_rng(seed)
    for batch in batches:
        rows, make = _rows_of(batch)
        if pack_len is not None and make is collate:
            bins = pack_rows(rows, pack_len)
            step = size or len(bins)
            chunks = [bins[i : i + step] for i in range(0, len(bins), step)]
            for index in rng.permutation(len(chunks)) if size else range(len(chunks)):
                yield collate_packed(chunks[index], pad_id, flat)
            continue
        if size is None:
            yield make(rows, pad_id)
            continue
        rows.sort(key=lambda row: len(row[0]))
        chunks = [rows[i : i + size] for i in range(0, len(rows), size)]
        for index in rng.permutation(len(chunks)):
            yield make(chunks[index], pad_id)


def _rows_of(batch: dict[str, Any]) -> tuple[list[tuple], Callable[..., dict[str, Any]]]:
    """A column batch's rows and how a micro-batch of them is laid out: (ids, prompt_len)
    padded; with ``rejected_ids``, preference pairs (``preference.collate_pairs``: padded,
    never packed)."""
    if "rejected_ids" not in batch:
        return list(zip(batch["input_ids"], batch["prompt_len"], strict=True)), collate
    from ray_align.training.preference import collate_pairs

    references = (zip(batch["ref_chosen"], batch["ref_rejected"], strict=True) if "ref_chosen" in batch
                  else [None] * len(batch["input_ids"]))
    return (list(zip(batch["input_ids"], batch["prompt_len"], batch["rejected_ids"], references,
                     strict=True)), collate_pairs)


def attention_implementation(choice: str, use_gpu: bool) -> str:
    """The attention kernel ``train.attn_implementation`` names; ``auto``: flash-attention 2 on
    a GPU worker that has it (transformers never picks it itself: it defaults to sdpa), so
    packed sequences reach its padding-free varlen layout; sdpa elsewhere."""
    if choice != "auto":
        return choice
    from importlib.util import find_spec

    flash = use_gpu and torch.cuda.is_available() and find_spec("flash_attn") is not None
    return "flash_attention_2" if flash else "sdpa"


@contextlib.contextmanager
def partitioned_loading(ds_config: dict[str, Any]) -> Iterator[None]:
    """While open, ``from_pretrained`` builds a ZeRO-3 model already partitioned over the ranks
    (``deepspeed.zero.Init``): without it every rank holds a whole copy in host memory first
    (70B in bf16 is 140 GB per rank). transformers reads the config through a weak reference
    to an ``HfDeepSpeedConfig``, so it is held here; closed, it is released, or a later plain
    load (rank 0's export of the base model) would run ZeRO-3 collectives alone and hang."""
    if ds_config["zero_optimization"]["stage"] != 3:
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    _deepspeed_comm_over_torch_group()
    held = HfDeepSpeedConfig(ds_config)
    try:
        yield
    finally:
        unset_hf_deepspeed_config()
        del held


def _deepspeed_comm_over_torch_group() -> None:
    """Put DeepSpeed's communication layer on the launcher's process group (Ray Train,
    torchrun) before ``zero.Init`` parses the config: until ``deepspeed.init_distributed`` it
    reads the world size as 1 and rejects ``train_batch_size`` for any world of more ranks (only
    ``deepspeed.initialize``, after the load, would set it up). Without a process group
    ``zero.Init`` sets one up itself."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    import deepspeed
    import deepspeed.ops

    backend = dist.get_backend()
    if backend == "gloo":  # as in deepspeed_engine: no shared-memory op build for CPU inference
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend=backend)


def load_model(
    path: str,
    *,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    lora: LoraConfig | None = None,
    gradient_checkpointing: bool = False,
    attn_implementation: str | None = None,
):
    """A causal LM ready to train: safetensors weights only, LoRA adapters when asked, the
    given attention kernel (None: transformers' default)."""
    from transformers import AutoModelForCausalLM

    kernel = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=True, **kernel
    )
    model.config.use_cache = False
    if gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if lora is not None:
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model

        model = get_peft_model(
            model,
            PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                           target_modules=lora.target_modules, task_type="CAUSAL_LM"),
        )
        if gradient_checkpointing:
            model.enable_input_require_grads()
    return model


def deepspeed_engine(model, train: TrainConfig, world_size: int):
    """Wrap a model in a DeepSpeed ZeRO engine configured from ``train``.

    The process group must exist (Ray Train, ``torchrun`` or ``deepspeed.init_distributed``).
    """
    import deepspeed
    import deepspeed.ops

    from ray_align.training.deepspeed_config import deepspeed_config

    if not train.use_gpu:
        # DeepSpeed compiles a shared-memory all-reduce for CPU *inference* at engine start
        # (a minute per fresh install or checkout); training reduces through torch.distributed.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    engine, *_ = deepspeed.initialize(
        model=model,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=deepspeed_config(train, world_size),
    )
    return engine


def full_state_dict(engine, zero_stage: int, rank: int) -> dict[str, torch.Tensor] | None:
    """The whole trained module's weights on rank 0 (None elsewhere). Under ZeRO-3 each rank
    holds a shard, so every rank must call this: the shards are gathered collectively."""
    if zero_stage == 3:
        return engine._zero3_consolidated_16bit_state_dict()
    return engine.module.state_dict() if rank == 0 else None


def batch_loss(model, batch: dict[str, Any], device, objective=None) -> tuple[torch.Tensor, int]:
    """A micro-batch's loss and its weight: the language-model loss (mean per target token) and
    its target tokens, or ``objective``'s (``preference.DpoObjective``: rows). The token loss is
    computed in chunks of the hidden states (``token_loss.lm_loss``): the full-vocabulary logits
    are never built."""
    if objective is not None:
        return objective.loss(model, batch, device)
    return lm_loss(model, model_inputs(batch, device))


def train_step(engine, batch: dict[str, Any], objective=None) -> tuple[float, int]:
    """One micro-batch through a DeepSpeed engine: forward, backward, step (it accumulates).

    Returns the loss and its weight (target tokens; rows for a preference objective).
    """
    loss, weight = batch_loss(engine, batch, engine.device, objective)
    engine.backward(loss)
    engine.step()
    return float(loss.detach()), weight


def step_loss(micro: list[tuple[float, int]]) -> float:
    """An optimizer step's loss from its micro-batches' (loss, target tokens): their
    token-weighted mean, not the last micro-batch's (one row's loss with micro-batches of 1)."""
    return weighted_mean(sum(loss * n for loss, n in micro), sum(n for _, n in micro))


def weighted_mean(total: float, tokens: int) -> float:
    """A loss summed over tokens, as a mean per token (NaN without tokens)."""
    return total / tokens if tokens else float("nan")


def while_every_rank_has_one(batches: Iterable[Any],
                             device: torch.device | str | None = None) -> Iterator[Any]:
    """The micro-batches for as long as every rank still has one. Packed epochs differ in
    length between ranks (each packs its own rows); a rank stepping alone would wait forever in
    the gradient all-reduce, so all stop at the shortest (a few packed sequences of the longer
    ranks are left out of that epoch). One all-reduce of one number per micro-batch; without a
    process group, every batch."""
    import torch.distributed as dist

    together = dist.is_available() and dist.is_initialized()
    iterator = iter(batches)
    while True:
        batch = next(iterator, None)
        if together:
            have = torch.tensor([0 if batch is None else 1], dtype=torch.long, device=device)
            dist.all_reduce(have, op=dist.ReduceOp.MIN)
            if not int(have):
                return
        elif batch is None:
            return
        yield batch


def sum_over_ranks(values: list[float], device: torch.device | str | None = None) -> list[float]:
    """Each value summed over every rank, in one all-reduce (on ``device``: NCCL reduces no host
    tensors). Every rank must call it; without a process group, the values as they are."""
    import torch.distributed as dist

    sums = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(sums)
    return sums.tolist()


def mean_over_ranks(loss: float, tokens: int,
                    device: torch.device | str | None = None) -> tuple[float, int]:
    """The token-weighted mean of every rank's (mean loss, tokens), and all their tokens: each
    rank evaluates its own shard, so rank 0's loss alone is a fraction of the data. Every rank
    must call it (an all-reduce); without a process group it is this process's own."""
    total = loss * tokens if tokens else 0.0  # a rank with no tokens has a NaN mean
    total, count = sum_over_ranks([total, float(tokens)], device)
    return weighted_mean(total, int(count)), int(count)


class StepMeter:
    """An optimizer step's numbers, gathered from its micro-batches: the loss over every rank
    (token-weighted: what the step's gradient came from), the learning rate and gradient norm
    DeepSpeed stepped with, and every rank's real tokens per second of the step. ``finish`` is
    collective (one all-reduce): every rank calls it at the end of every optimizer step."""

    def __init__(self, device: torch.device | str | None = None) -> None:
        self.device = device
        self._micro: list[tuple[float, int, int, float]] = []
        self.restart()

    def restart(self) -> None:
        """Start the clock again (an epoch's start: validation and skipped batches left out)."""
        self._mark = time.perf_counter()

    def add(self, result: tuple[float, int], tokens: int) -> None:
        """One micro-batch: ``train_step``'s (loss, target tokens) and its real tokens."""
        now = time.perf_counter()
        loss, targets = result
        self._micro.append((loss * targets if targets else 0.0, targets, tokens, now - self._mark))
        self._mark = now

    def finish(self, engine) -> dict[str, float]:
        """The step that just ended: ``loss``, ``lr``, ``grad_norm`` (when DeepSpeed computed
        one) and ``step_tokens_per_s``."""
        total, targets, tokens = sum_over_ranks(
            [sum(m[0] for m in self._micro), sum(m[1] for m in self._micro),
             sum(m[2] for m in self._micro)], self.device)
        seconds = sum(m[3] for m in self._micro)
        self._micro.clear()
        metrics = {"loss": weighted_mean(total, int(targets)), "lr": float(engine.get_lr()[0]),
                   "step_tokens_per_s": tokens / seconds if seconds else 0.0}
        norm = engine.get_global_grad_norm()
        if norm is not None:
            metrics["grad_norm"] = float(norm)
        return metrics


@torch.no_grad()
def eval_loss(model, batches: Iterable[dict[str, Any]], device, objective=None) -> tuple[float, int]:
    """Weighted mean loss over batches (per target token; per row for a preference
    objective), and the total weight."""
    total, weight = 0.0, 0
    model.eval()
    for batch in batches:
        loss, n = batch_loss(model, batch, device, objective)
        total += float(loss) * n
        weight += n
    model.train()
    return weighted_mean(total, weight), weight


# --- Export: a servable Hugging Face directory from the trained weights -------------------------
#
# Rank 0 never rebuilds an fp32 copy of the model: full fine-tuning writes the gathered state as it
# is (cast tensor by tensor), LoRA saves the small adapter and merges it into the base loaded once
# in the export dtype. Every file is safetensors, sharded so no shard (and no write buffer) is big.

DEFAULT_MAX_SHARD_SIZE = "2GB"
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def export_dtype(name: str, base_path: str, training_dtype: torch.dtype, *,
                 trust_remote_code: bool = False) -> torch.dtype:
    """The dtype the exported weights are written in: ``ModelConfig.dtype``; for ``"auto"`` the
    base checkpoint's own dtype (what engines would load it as), else the training dtype."""
    if name != "auto":
        return _DTYPES[name]
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(base_path, trust_remote_code=trust_remote_code)
    declared = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(declared, str):
        declared = _DTYPES.get(declared)
    return declared if declared in _DTYPES.values() else training_dtype


def adapter_state_dict(model, zero_stage: int, rank: int) -> dict[str, torch.Tensor] | None:
    """The trainable (LoRA adapter) parameters of a PEFT model, on the host, on rank 0 (None
    elsewhere). Only those are gathered, never the frozen base: under ZeRO-3 every rank must call
    this, since the adapter's shards are gathered collectively."""
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    gather = contextlib.nullcontext()
    if zero_stage == 3:
        import deepspeed

        gather = deepspeed.zero.GatheredParameters([p for _, p in trainable], modifier_rank=None)
    with gather:
        if rank != 0:
            return None
        return {name: p.detach().to("cpu", copy=True) for name, p in trainable}


def save_adapter(peft_model, state_dict: dict[str, torch.Tensor], out_dir: str | os.PathLike) -> None:
    """A plain PEFT adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``):
    what ``PeftModel.from_pretrained`` and vLLM's LoRA serving load. ``state_dict`` is the
    gathered adapter (``adapter_state_dict``), so the model's own (maybe partitioned) parameters
    are not read."""
    peft_model.save_pretrained(str(out_dir), state_dict=state_dict, safe_serialization=True,
                               save_embedding_layers=False)


def export_full_model(state_dict: dict[str, torch.Tensor], base_path: str, out_dir: str | os.PathLike,
                      *, dtype: torch.dtype, tokenizer=None, trust_remote_code: bool = False,
                      max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> None:
    """Write fully fine-tuned weights as a Hugging Face directory in ``dtype``, sharded.

    The base model is not loaded again: its config builds a weightless (meta-device) skeleton
    that only names the layout, ties embeddings and writes ``config.json``. ``state_dict`` (the
    whole trained module, for ZeRO-3 the gathered one) is consumed: its entries are replaced one
    by one by host copies in ``dtype`` (so the old and new copies never coexist whole) and it is
    empty afterwards. Tied tensors stay tied, so they are written once.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(base_path, trust_remote_code=trust_remote_code)
    config.use_cache = True
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, dtype=dtype,
                                                    trust_remote_code=trust_remote_code)
    _check_keys(skeleton, state_dict)
    _cast_to_host_(state_dict, dtype)
    _use_base_generation_config(skeleton, base_path)
    skeleton.save_pretrained(str(out_dir), state_dict=state_dict, max_shard_size=max_shard_size,
                             safe_serialization=True)
    state_dict.clear()
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out_dir))


def export_merged_model(base_path: str, adapter_dir: str | os.PathLike, out_dir: str | os.PathLike,
                        *, dtype: torch.dtype, tokenizer=None, trust_remote_code: bool = False,
                        max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> None:
    """Write base + LoRA adapter, merged, as a plain Hugging Face directory in ``dtype``, sharded.

    The base is loaded once, directly in ``dtype`` (no fp32 copy of it); the adapter is applied
    and folded into its linear layers in place (``W += B @ A * alpha / r``, each delta computed in
    the adapter's precision), then written. The base is frozen in LoRA training, so the weights
    on disk are exactly the ones that were trained against.
    """
    from peft import PeftModel

    base = load_model(base_path, dtype=dtype, trust_remote_code=trust_remote_code)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.config.use_cache = True
    merged.save_pretrained(str(out_dir), max_shard_size=max_shard_size, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out_dir))


def _check_keys(skeleton, state_dict: dict[str, torch.Tensor]) -> None:
    """Fail before writing anything if the weights do not fit the model's layout. A missing key
    is fine only when its parameter is tied to one that is present (lm_head to embed_tokens)."""
    expected = set(skeleton.state_dict())
    present = set(state_dict)
    tied_to: dict[int, set[str]] = {}
    for name, param in skeleton.named_parameters(remove_duplicate=False):
        tied_to.setdefault(id(param), set()).add(name)
    tied_present = {name for names in tied_to.values() if names & present for name in names}
    missing = sorted(expected - present - tied_present)
    unexpected = sorted(present - expected)
    if missing or unexpected:
        raise RuntimeError(f"export: weights do not match the model: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")


def _cast_to_host_(state_dict: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    """Replace each tensor in place by a CPU copy in ``dtype`` (the same tensor when it already is
    one), so at most one tensor exists in both dtypes at a time. Entries that alias one storage
    (tied weights) are replaced together by one copy: they stay tied, and the old one is freed."""
    aliases: dict[tuple, list[str]] = {}
    for name, tensor in state_dict.items():
        if isinstance(tensor, torch.Tensor):
            key = (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(),
                   tuple(tensor.shape), tuple(tensor.stride()))
            aliases.setdefault(key, []).append(name)
    for names in aliases.values():
        cast = state_dict[names[0]].detach().to(device="cpu", dtype=dtype)
        for name in names:
            state_dict[name] = cast


def _use_base_generation_config(skeleton, base_path: str) -> None:
    """Keep the base's generation defaults (stop tokens, sampling) rather than ones derived from
    the model config, as a full ``from_pretrained`` of the base would."""
    from transformers import GenerationConfig

    with contextlib.suppress(OSError):  # no generation_config.json: keep the derived one
        skeleton.generation_config = GenerationConfig.from_pretrained(base_path)
