"""The token loss in chunks of the hidden states (``training.token_loss``): the same loss and
gradients as the model's own full-logits loss, padded or packed, plain or LoRA, under ZeRO-3
with gradient checkpointing; the full logits tensor is never built; DPO's reference pass runs
before the policy's."""

from __future__ import annotations

import pytest
import torch

from ray_align.config import LoraConfig, TrainConfig
from ray_align.training import token_loss
from ray_align.training.core import (
    batch_loss,
    collate,
    collate_packed,
    deepspeed_engine,
    load_model,
    model_inputs,
    pack_rows,
    train_step,
)
from ray_align.training.preference import DpoObjective, collate_pairs, sequence_logps

ROWS = [(list(range(5, 48)), 9), (list(range(300, 321)), 4), (list(range(900, 931)), 12)]
CHUNK = 8  # smaller than every sequence and dividing none of the target counts
HEAD_LORA = LoraConfig(r=8, alpha=16, dropout=0.0, target_modules=["q_proj", "v_proj", "lm_head"])


def _layout(name: str) -> dict:
    if name == "padded":
        return collate(ROWS, pad_id=0)
    return collate_packed(pack_rows(ROWS, capacity=80), pad_id=0, flat=name == "flat")


def _model(path, lora: LoraConfig | None):
    torch.manual_seed(0)
    model = load_model(str(path), lora=lora)
    with torch.no_grad():  # LoRA's B starts at zero: make the adapters count
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05)
    return model


def _loss_and_grads(model, inputs, loss_fn) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = loss_fn(model, inputs)
    loss.backward()
    return float(loss), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("lora", [None, LoraConfig(r=8, alpha=16, dropout=0.0), HEAD_LORA],
                         ids=["full", "lora", "lora-on-head"])
@pytest.mark.parametrize("layout", ["padded", "packed", "flat"])
def test_chunked_loss_and_gradients_equal_the_full_logits_loss(tiny_model, layout, lora):
    model = _model(tiny_model, lora)
    inputs = model_inputs(_layout(layout))
    targets = int((inputs["labels"][:, 1:] != -100).sum())
    assert targets > CHUNK and targets % CHUNK  # several chunks, the last one partial
    expected, expected_grads = _loss_and_grads(model, inputs, lambda m, i: m(**i).loss)
    loss, grads = _loss_and_grads(model, inputs,
                                  lambda m, i: token_loss.lm_loss(m, i, chunk=CHUNK)[0])
    assert loss == pytest.approx(expected, abs=1e-5)
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def _head_outputs(model) -> list[torch.Size]:
    shapes: list[torch.Size] = []
    model.get_output_embeddings().register_forward_hook(lambda m, a, out: shapes.append(out.shape))
    return shapes


def test_no_path_builds_logits_for_more_than_a_chunk_of_positions(tiny_model, monkeypatch):
    monkeypatch.setattr(token_loss, "LOSS_CHUNK_TOKENS", CHUNK)
    model = _model(tiny_model, LoraConfig(r=8, alpha=16, dropout=0.0))
    shapes = _head_outputs(model)
    loss, _ = batch_loss(model, collate(ROWS, pad_id=0), "cpu")
    loss.backward()
    pairs = collate_pairs([(ROWS[0][0], 9, ROWS[1][0], None), (ROWS[2][0], 12, [], None)], 0)
    DpoObjective().loss(model, pairs)[0].backward()
    sequence_logps(model, pairs)
    vocab = model.config.vocab_size
    assert shapes and all(s[-1] == vocab and s[:-1].numel() <= CHUNK for s in shapes), shapes


def test_dpo_scores_the_reference_before_the_policy(tiny_model):
    model = _model(tiny_model, LoraConfig(r=8, alpha=16, dropout=0.0))
    passes: list[bool] = []  # gradients on at each backbone pass: only the policy's has them
    backbone = token_loss.separable_head(model)[0]
    backbone.register_forward_pre_hook(lambda m, a: passes.append(torch.is_grad_enabled()))
    DpoObjective().loss(model, collate_pairs([(ROWS[0][0], 9, ROWS[1][0], None)], 0))
    assert passes == [False, True]


@pytest.mark.parametrize("lora", [None, LoraConfig(r=8, alpha=16, dropout=0.0)], ids=["full", "lora"])
def test_dpo_loss_and_gradients_are_unchanged_by_chunking(tiny_model, lora, monkeypatch):
    model = _model(tiny_model, lora)
    rows = [(ROWS[0][0], 9, ROWS[1][0], None if lora else (-30.0, -40.0)), (ROWS[2][0], 12, [], None)]
    pairs = collate_pairs(rows, pad_id=0)  # full fine-tuning: the reference comes in the rows
    objective = DpoObjective(beta=0.1, sft_weight=1.0)
    monkeypatch.setattr(token_loss, "LOSS_CHUNK_TOKENS", CHUNK)
    loss, grads = _loss_and_grads(model, pairs, lambda m, b: objective.loss(m, b)[0])
    monkeypatch.setattr(token_loss, "separable_head", lambda m: None)  # the full-logits path
    expected, expected_grads = _loss_and_grads(model, pairs, lambda m, b: objective.loss(m, b)[0])
    assert loss == pytest.approx(expected, abs=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_a_micro_batch_without_targets_has_loss_zero_not_nan(tiny_model):
    model = _model(tiny_model, None)
    loss, targets = batch_loss(model, collate([(list(range(5, 20)), 15)], pad_id=0), "cpu")
    loss.backward()
    assert targets == 0 and float(loss) == 0.0


def test_models_whose_logits_are_not_the_heads_output_keep_the_full_logits_path(tiny_model):
    model = _model(tiny_model, None)
    assert token_loss.separable_head(model) is not None
    model.config.final_logit_softcapping = 30.0
    assert token_loss.separable_head(model) is None


@pytest.mark.parametrize("lora", [None, LoraConfig(r=8, alpha=16, dropout=0.0)], ids=["full", "lora"])
def test_zero3_steps_with_gradient_checkpointing_match_the_full_logits_loss(
        tiny_model, single_process_group, lora, monkeypatch):
    """Under ZeRO-3 the head's weight is partitioned and gathered by its module hooks, also when
    a chunk is recomputed in backward (a frozen head reentrantly, a trainable one not)."""
    monkeypatch.setattr(token_loss, "LOSS_CHUNK_TOKENS", CHUNK)
    batch = collate(ROWS[:2], pad_id=0)
    losses = {}
    for name, separable in (("chunked", token_loss.separable_head), ("plain", lambda m: None)):
        monkeypatch.setattr(token_loss, "separable_head", separable)
        torch.manual_seed(0)
        train = TrainConfig(zero_stage=3, precision="fp32", micro_batch_size=2, lr=1e-3, lora=lora,
                            gradient_checkpointing=True)
        engine = deepspeed_engine(load_model(str(tiny_model), lora=lora, gradient_checkpointing=True),
                                  train, world_size=1)
        losses[name] = [train_step(engine, batch)[0] for _ in range(3)]
    assert losses["chunked"] == pytest.approx(losses["plain"], abs=1e-5)
    assert losses["chunked"][-1] < losses["chunked"][0]
