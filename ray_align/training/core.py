"""The training core: tokenization with target-only loss, batching, the model and one step.

Nothing here imports Ray, so the same code runs under plain ``torch.distributed`` (or in one
process) where Ray is absent, for example to measure it on a GPU machine.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch

from ray_align.config import LoraConfig, TrainConfig

IGNORE_INDEX = -100


def chat_prompt_ids(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of chat messages through the model's template, the assistant turn opened."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return list(ids)


def encode_sample(tokenizer, messages: list[dict[str, str]], target: str) -> tuple[list[int], int]:
    """Token ids of prompt + target (+ end of turn), and how many leading tokens are prompt.

    The prompt goes through the model's chat template with the assistant turn opened, so the
    loss falls on exactly the tokens the model must learn to produce.
    """
    prompt_ids = chat_prompt_ids(tokenizer, messages)
    target_ids = tokenizer(target, add_special_tokens=False)["input_ids"]
    end = tokenizer.eos_token_id
    return list(prompt_ids) + list(target_ids) + ([end] if end is not None else []), len(prompt_ids)


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


def micro_batches(
    batches: Iterable[dict[str, Any]], pad_id: int, size: int | None = None, seed: int = 0
) -> Iterator[dict[str, torch.Tensor]]:
    """Turn column batches (``input_ids``, ``prompt_len``) into padded micro-batch tensors.

    With ``size``, each incoming batch (a window of several micro-batches) is sorted by length
    and cut into micro-batches of ``size`` rows, taken in a seeded random order: rows of like
    length share a micro-batch, so far less compute goes to padding. The order depends only on
    the data and the seed, so a resumed run can skip exactly the micro-batches already done.
    """
    rng = np.random.default_rng(seed)
    for batch in batches:
        rows = list(zip(batch["input_ids"], batch["prompt_len"], strict=True))
        if size is None:
            yield collate(rows, pad_id)
            continue
        rows.sort(key=lambda row: len(row[0]))
        chunks = [rows[i : i + size] for i in range(0, len(rows), size)]
        for index in rng.permutation(len(chunks)):
            yield collate(chunks[index], pad_id)


def load_model(
    path: str,
    *,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    lora: LoraConfig | None = None,
    gradient_checkpointing: bool = False,
):
    """A causal LM ready to train: safetensors weights only, LoRA adapters when asked."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=True
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


def train_step(engine, batch: dict[str, torch.Tensor]) -> tuple[float, int]:
    """One micro-batch through a DeepSpeed engine: forward, backward, step (it accumulates).

    Returns the loss and the number of target tokens it was computed on.
    """
    batch = {k: v.to(engine.device) for k, v in batch.items()}
    loss = engine(**batch).loss
    engine.backward(loss)
    engine.step()
    return float(loss.detach()), int((batch["labels"] != IGNORE_INDEX).sum())


def step_loss(micro: list[tuple[float, int]]) -> float:
    """An optimizer step's loss from its micro-batches' (loss, target tokens): their
    token-weighted mean, not the last micro-batch's (one row's loss with micro-batches of 1)."""
    tokens = sum(n for _, n in micro)
    return sum(loss * n for loss, n in micro) / tokens if tokens else float("nan")


@torch.no_grad()
def eval_loss(model, batches: Iterable[dict[str, torch.Tensor]], device) -> tuple[float, int]:
    """Token-weighted mean loss over batches, and the token count."""
    total, tokens = 0.0, 0
    model.eval()
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        total += float(model(**batch).loss) * n
        tokens += n
    model.train()
    return (total / tokens if tokens else float("nan")), tokens


def export_model(state_dict: dict[str, torch.Tensor], base_path: str, out_dir: str, *,
                 lora: LoraConfig | None, trust_remote_code: bool, tokenizer) -> None:
    """Write a plain Hugging Face directory (safetensors, LoRA merged) from trained weights.

    ``state_dict`` is the full (for ZeRO-3: gathered) state of the trained module.
    """
    model = load_model(base_path, dtype=torch.float32, trust_remote_code=trust_remote_code, lora=lora)
    missing, unexpected = model.load_state_dict(
        {k: v.float() for k, v in state_dict.items()}, strict=False
    )
    real_missing = [k for k in missing if "lm_head" not in k]
    if real_missing or unexpected:
        raise RuntimeError(f"export: weights do not match the model: missing {real_missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    if lora is not None:
        model = model.merge_and_unload()
    model.config.use_cache = True
    model.to(torch.bfloat16).save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
