"""Target-token log-probabilities without the full-vocabulary logits.

A causal LM's own loss builds logits for every position (batch x sequence x vocabulary) and
upcasts them all to fp32 (transformers' ``loss/loss_utils.py``): at a 128k vocabulary, 16k packed
tokens are 8 GB of fp32 logits alone, plus as much again for their gradient. Here the model runs
with ``logits_to_keep`` empty (the head sees no position), a forward hook takes the backbone's
final hidden states, and the output head is applied to the target positions only, a chunk of
``LOSS_CHUNK_TOKENS`` at a time, each chunk under activation checkpointing: at most one chunk's
logits are alive, in the forward pass and in the backward pass.

The model is still called as a whole (a DeepSpeed engine, a PEFT model, a plain causal LM), so
its own forward logic and hooks run as they do for the plain loss: DeepSpeed ZeRO-3's step
bookkeeping (its start-of-forward hook is on the top module), PEFT's adapter switching, packed
sequences' ``position_ids`` / ``cu_seq_lens_*``, gradient checkpointing. The head is called as a
module, never through its ``.weight``, so ZeRO-3's hooks gather its (partitioned) weight and a
LoRA-wrapped head applies its adapter.
"""

from __future__ import annotations

import functools
import inspect
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100

# Tokens per chunk of the output head: 1024 x a 128k vocabulary is 0.5 GB of fp32 logits (and
# as much for their log-softmax in backward), small beside the activations, while a chunk is
# still one large matrix multiply that keeps a GPU busy.
LOSS_CHUNK_TOKENS = 1024

# Config fields of models that transform the head's logits after it (soft-capping, scaling):
# those keep the plain full-logits path, since their head alone does not give the logits.
LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def causal_lm(model) -> torch.nn.Module:
    """The transformers model under a DeepSpeed engine (``.module``) and a PEFT wrapper."""
    model = getattr(model, "module", model)
    get_base = getattr(model, "get_base_model", None)  # PEFT; its LoRA layers are in place
    return get_base() if callable(get_base) else model


def separable_head(model) -> tuple[torch.nn.Module, torch.nn.Module] | None:
    """(backbone, output head) when the logits are the head applied to the backbone's last hidden
    state and the model takes ``logits_to_keep``; None otherwise (the plain path is used)."""
    lm = causal_lm(model)
    backbone = getattr(lm, "base_model", lm)
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    config = getattr(lm, "config", None)
    if backbone is lm or head is None or config is None:
        return None
    if "logits_to_keep" not in inspect.signature(lm.forward).parameters:
        return None
    if any(getattr(config, name, None) not in (None, 1, 1.0) for name in LOGIT_POSTPROCESSING):
        return None
    return backbone, head


@contextmanager
def _captured_output(module: torch.nn.Module):
    """Record the last output of ``module`` (the hidden states it hands the head)."""
    seen: dict[str, Any] = {}

    def keep(_module, _args, output) -> None:
        seen["hidden"] = output[0] if isinstance(output, (tuple, list)) else output.last_hidden_state

    handle = module.register_forward_hook(keep)
    try:
        yield seen
    finally:
        handle.remove()


def final_hidden_states(model, backbone: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    """The backbone's last hidden states, (rows, length, hidden), from a whole-model call that
    gives the head no position (``logits_to_keep`` an empty index: logits of length 0)."""
    ids = inputs.get("input_ids")
    none = torch.zeros(0, dtype=torch.long, device=ids.device if ids is not None else None)
    with _captured_output(backbone) as seen:
        model(**inputs, logits_to_keep=none)
    return seen["hidden"]


def _chunk_logps(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Log-probability of each target from its hidden state: one chunk's logits, in fp32."""
    logits = head(hidden).float()
    return -F.cross_entropy(logits, targets.to(logits.device), reduction="none")


def _recompute_mode(head: torch.nn.Module, states: torch.Tensor) -> bool | None:
    """How each chunk is checkpointed: ``use_reentrant`` True or False, or None (not at all).

    A frozen head (LoRA elsewhere) is recomputed reentrantly: the non-reentrant kind checks that
    a recompute saves tensors of the same shapes, and under ZeRO-3 the frozen weight is gathered
    in the forward but still partitioned at the recompute (DeepSpeed issue: "Z3: Support for
    activation ckpt with frozen params"). A trainable head (full fine-tuning) is recomputed
    non-reentrantly: a reentrant backward per chunk would report the weight's gradient to ZeRO
    once per chunk (its bucket asserts each parameter once). A ZeRO-3 head with both (LoRA on
    the head itself) fits neither and is not recomputed, nor is one the hidden states' gradient
    does not reach (reentrant checkpointing would lose the head's own gradients)."""
    trainable = [p.requires_grad for p in head.parameters()]
    if not any(trainable):
        return True if states.requires_grad else None
    if all(trainable) or not any(hasattr(p, "ds_id") for p in head.parameters()):
        return False
    return None


def chunked_target_logps(head: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor,
                         chunk: int | None = None) -> torch.Tensor:
    """Per-token target log-probabilities, (rows, length - 1), 0 where the label is ignored:
    token t is predicted from position t - 1. Only target positions reach the head, ``chunk``
    (default ``LOSS_CHUNK_TOKENS``) at a time; with gradients on, each chunk's logits are
    recomputed in backward rather than kept (``_recompute_mode``)."""
    chunk = chunk or LOSS_CHUNK_TOKENS  # read when called, so a test can shrink it
    shifted = labels[:, 1:].to(hidden.device)
    mask = shifted != IGNORE_INDEX
    states, targets = hidden[:, :-1][mask], shifted[mask]
    step = functools.partial(_chunk_logps, head)
    reentrant = _recompute_mode(head, states) if torch.is_grad_enabled() else None
    parts = []
    for start in range(0, max(len(targets), 1), chunk):  # one (maybe empty) chunk at least
        piece = (states[start : start + chunk], targets[start : start + chunk])
        parts.append(step(*piece) if reentrant is None
                     else checkpoint(step, *piece, use_reentrant=reentrant))
    logps = torch.cat(parts)
    return torch.zeros(shifted.shape, dtype=logps.dtype, device=logps.device).masked_scatter(
        mask.to(logps.device), logps)


def full_logits_target_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The same per-token log-probabilities from full logits (the plain path), in fp32."""
    shifted = labels[:, 1:].to(logits.device)
    per_token = -F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), shifted.flatten(),
                                 ignore_index=IGNORE_INDEX, reduction="none")
    return per_token.view(shifted.shape)


def token_logps(model, inputs: dict[str, Any], labels: torch.Tensor,
                chunk: int | None = None) -> torch.Tensor:
    """Per-token target log-probabilities of ``labels`` under ``model`` given ``inputs`` (model
    inputs without labels): chunked over the hidden states when the model's head is separable
    (``separable_head``), else from the model's full logits."""
    parts = separable_head(model)
    if parts is None:
        return full_logits_target_logps(model(**inputs).logits, labels)
    backbone, head = parts
    return chunked_target_logps(head, final_hidden_states(model, backbone, inputs), labels, chunk)


def lm_loss(model, inputs: dict[str, Any], chunk: int | None = None) -> tuple[torch.Tensor, int]:
    """The language-model loss (mean negative log-likelihood per target token) of model inputs
    that carry ``labels``, and its target tokens. A micro-batch without targets has loss 0 (not
    NaN, which would poison the accumulated gradients) and weight 0."""
    inputs = dict(inputs)
    labels = inputs.pop("labels")
    targets = int((labels[:, 1:] != IGNORE_INDEX).sum())
    return -token_logps(model, inputs, labels, chunk).sum() / max(targets, 1), targets
