"""Preference training (DPO, Rafailov et al. 2023), the comparison's stand-in for the paper's
PPO-based RLHF: the training core's second objective beside the language-model loss.

A training row is a pair (``input_ids`` the chosen answer, ``rejected_ids`` the rejected one,
after the same ``prompt_len`` prompt tokens) or, with no rejected ids, an SFT row (the helpful
samples every method shares). A micro-batch lays each pair's two sequences and each SFT row out
as rows of one padded batch: one forward pass scores all of them.

The reference is the base model: with LoRA, the same model with its adapter disabled (no second
copy); with full fine-tuning, log-probabilities computed once before training
(``ReferenceScorer``) and carried in the rows as ``ref_chosen`` / ``ref_rejected``. Nothing here imports Ray.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ray_align.training.core import IGNORE_INDEX, collate, model_inputs
from ray_align.training.token_loss import full_logits_target_logps, token_logps

PairRow = tuple[Any, int, Any, Any]  # (input_ids, prompt_len, rejected_ids, (ref c, ref r) or None)


def collate_pairs(rows: Iterable[PairRow], pad_id: int) -> dict[str, torch.Tensor]:
    """A micro-batch of pairs and SFT rows: every sequence a row of one right-padded batch,
    with the indices of chosen, rejected and SFT rows, and (when every pair carries them) the
    reference log-probabilities, shape (pairs, 2)."""
    sequences: list[tuple[Any, int]] = []
    chosen, rejected, sft, reference = [], [], [], []
    for ids, prompt_len, rejected_ids, ref in rows:
        if rejected_ids is not None and len(rejected_ids):
            chosen.append(len(sequences))
            rejected.append(len(sequences) + 1)
            sequences += [(ids, prompt_len), (rejected_ids, prompt_len)]
            reference.append(ref)
        else:
            sft.append(len(sequences))
            sequences.append((ids, prompt_len))
    batch = collate(sequences, pad_id)
    batch.update(chosen_rows=torch.tensor(chosen, dtype=torch.long),
                 rejected_rows=torch.tensor(rejected, dtype=torch.long),
                 sft_rows=torch.tensor(sft, dtype=torch.long))
    if reference and all(r is not None and len(r) == 2 for r in reference):
        batch["reference"] = torch.as_tensor(np.asarray(reference, dtype=np.float32))
    return batch


def target_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Log-probability of each target token (0 where the label is ignored), shape (rows,
    length - 1): token t is predicted from position t - 1. Computed in fp32 through
    ``cross_entropy`` (no full log-softmax tensor kept). From logits the caller already has;
    the training paths use ``token_loss.token_logps``, which never builds them whole."""
    return full_logits_target_logps(logits, labels)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-pair DPO loss: -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))), from each
    answer's summed log-probability under the policy and the reference."""
    margin = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    return -F.logsigmoid(beta * margin)


def _unwrapped(model):
    """The module under a DeepSpeed engine (the PEFT model, with ``disable_adapter``)."""
    return getattr(model, "module", model)


@torch.no_grad()
def _reference_logps(model, inputs: dict[str, Any], labels: torch.Tensor) -> torch.Tensor:
    """Summed target log-probabilities under the base model: the LoRA adapter disabled."""
    module = _unwrapped(model)
    disabled = getattr(module, "disable_adapter", None)
    if disabled is None:
        raise ValueError("DPO with full fine-tuning needs reference log-probabilities computed "
                         "before training (ref_logps); only a LoRA model is its own reference")
    with disabled():
        return token_logps(module, inputs, labels).sum(-1)


@dataclass(frozen=True)
class DpoObjective:
    """The DPO loss on a micro-batch's pairs plus ``sft_weight`` x the language-model loss of
    its SFT rows (mean per target token), averaged over the micro-batch's rows."""

    beta: float = 0.1
    sft_weight: float = 1.0

    def loss(self, model, batch: dict[str, Any], device=None) -> tuple[torch.Tensor, int]:
        """The micro-batch's loss and its weight (rows) for averaging over micro-batches. A LoRA
        model's reference pass runs first (no gradients, its activations freed) and the
        policy's second, so the two passes' activations are never alive together."""
        inputs = model_inputs(batch, device)
        labels = inputs.pop("labels")
        chosen, rejected, sft = batch["chosen_rows"], batch["rejected_rows"], batch["sft_rows"]
        reference = batch.get("reference")
        if len(chosen) and reference is None:
            summed = _reference_logps(model, inputs, labels)
            reference = torch.stack([summed[chosen.to(summed.device)],
                                     summed[rejected.to(summed.device)]], dim=1)
        per_token = token_logps(model, inputs, labels)
        chosen, rejected, sft = (rows.to(per_token.device) for rows in (chosen, rejected, sft))
        total = per_token.new_zeros(())
        if len(chosen):
            sequence = per_token.sum(-1)
            reference = reference.to(per_token.device)
            total = total + dpo_loss(sequence[chosen], sequence[rejected], reference[:, 0],
                                     reference[:, 1], self.beta).sum()
        if len(sft) and self.sft_weight:
            targets = (labels[sft, 1:] != IGNORE_INDEX).sum()
            nll = -per_token[sft].sum() / targets.clamp(min=1)
            total = total + self.sft_weight * len(sft) * nll
        rows = len(chosen) + len(sft)
        return total / max(rows, 1), rows


def objective_from(spec: dict[str, Any] | None) -> DpoObjective | None:
    """The objective a training config names (None: the language-model loss)."""
    if not spec or spec.get("kind", "sft") == "sft":
        return None
    return DpoObjective(beta=spec["beta"], sft_weight=spec["sft_weight"])


class ReferenceScorer:
    """Adds ``ref_chosen`` and ``ref_rejected``, the pair's summed log-probabilities under the
    base model, once before a full fine-tune (a Ray Data map class: the model is loaded once per
    actor). SFT rows get NaN. On GPUs the model is spread over every GPU the actor holds
    (``device="cuda"``), so a base model that needs all the training GPUs fits here too."""

    def __init__(self, model_path: str, dtype: torch.dtype, pad_id: int, batch_rows: int,
                 trust_remote_code: bool = False, device: str = "cpu") -> None:
        from ray_align.storage import local_model_path

        self.model = reference_model(local_model_path(model_path), dtype, trust_remote_code, device)
        self.pad_id, self.batch_rows = pad_id, batch_rows
        self.device = self.model.get_input_embeddings().weight.device  # where the ids go in

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = list(zip(batch["input_ids"], batch["prompt_len"], batch["rejected_ids"], strict=True))
        scores: list[tuple[float, float]] = []
        for start in range(0, len(rows), self.batch_rows):
            part = rows[start : start + self.batch_rows]
            sums = iter(sequence_logps(self.model, collate_pairs(
                [(ids, n, rej, None) for ids, n, rej in part], self.pad_id), self.device))
            # collate_pairs lays rows out in order: a pair's chosen then rejected, an SFT row once
            scores += [(next(sums), next(sums)) if len(rej) else (np.nan, np.nan)
                       for _, _, rej in part]
        chosen, rejected = np.asarray(scores, dtype=np.float32).reshape(-1, 2).T
        return {**batch, "ref_chosen": chosen, "ref_rejected": rejected}


def reference_model(path: str, dtype: torch.dtype, trust_remote_code: bool, device: str):
    """The base model for scoring, in eval mode: on the CPU as training loads it; on CUDA with
    its layers spread over the visible GPUs (accelerate's ``device_map="auto"``: each layer on
    one GPU, activations handed on), not a whole copy on each."""
    if not device.startswith("cuda"):
        from ray_align.training.core import load_model

        return load_model(path, dtype=dtype, trust_remote_code=trust_remote_code).to(device).eval()
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map="auto",
                                                 trust_remote_code=trust_remote_code,
                                                 use_safetensors=True)
    model.config.use_cache = False
    return model.eval()


@torch.no_grad()
def sequence_logps(model, batch: dict[str, Any], device=None) -> list[float]:
    """Each sequence's summed target log-probability under ``model``, in the batch's row order."""
    inputs = model_inputs(batch, device)
    labels = inputs.pop("labels")
    return token_logps(model, inputs, labels).sum(-1).tolist()
