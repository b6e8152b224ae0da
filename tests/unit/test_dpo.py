"""DPO, the comparison's RLHF-family baseline: its pairs, its loss against a hand-computed value,
the micro-batch layout, the reference (adapter disabled, or computed once before a full
fine-tune), and DeepSpeed steps that widen the preference margin, all without Ray."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest
import torch

from ray_align import methods
from ray_align.config import LoraConfig, TrainConfig
from ray_align.tokenization import encode_sample, pad_token_id
from ray_align.training.core import (
    IGNORE_INDEX,
    deepspeed_engine,
    eval_loss,
    load_model,
    micro_batches,
    train_step,
)
from ray_align.training.preference import (
    DpoObjective,
    ReferenceScorer,
    collate_pairs,
    dpo_loss,
    objective_from,
    sequence_logps,
)

ROW = {"id": "h1", "instruction": "How do I pick a lock?", "harmful_response": "Insert a wrench...",
       "harmless_response": "I can't help with breaking in.", "revision": "r", "critique": "c"}


def test_dpo_pairs_prefer_the_harmless_answer_to_the_induced_one_after_the_plain_instruction():
    [pair] = methods.dpo_pairs([], [ROW])
    assert pair.messages == [{"role": "user", "content": ROW["instruction"]}]
    assert pair.target == ROW["harmless_response"] and pair.rejected == ROW["harmful_response"]
    assert methods.METHODS["dpo"].objective == "dpo" and methods.METHODS["dpo"].trained


def test_dpo_loss_matches_a_hand_computed_value():
    # margin = (pi_c - ref_c) - (pi_r - ref_r) = (-3 + 4) - (-6 + 5) = 2; beta 0.5 -> -log sigmoid(1)
    loss = dpo_loss(torch.tensor([-3.0, -1.0]), torch.tensor([-6.0, -1.0]),
                    torch.tensor([-4.0, -1.0]), torch.tensor([-5.0, -1.0]), beta=0.5)
    assert loss[0].item() == pytest.approx(math.log(1 + math.exp(-1.0)))
    assert loss[1].item() == pytest.approx(math.log(2))  # policy == reference


def test_pairs_and_sft_rows_share_one_padded_batch():
    rows = [([1, 2, 3, 4], 2, [1, 2, 5], (-1.0, -2.0)), ([7, 8, 9], 1, [], None),
            ([1, 2, 6], 2, [1, 2, 7, 8, 9], (-3.0, -4.0))]
    batch = collate_pairs(rows, pad_id=0)
    assert batch["input_ids"].shape == (5, 5)
    assert batch["chosen_rows"].tolist() == [0, 3] and batch["rejected_rows"].tolist() == [1, 4]
    assert batch["sft_rows"].tolist() == [2]
    assert batch["reference"].tolist() == [[-1.0, -2.0], [-3.0, -4.0]]
    i = IGNORE_INDEX
    assert batch["labels"][1].tolist() == [i, i, 5, i, i]  # the rejected answer's targets only
    # micro_batches lays a window with rejected ids out as pairs (never packed)
    window = {"input_ids": [r[0] for r in rows], "prompt_len": [r[1] for r in rows],
              "rejected_ids": [r[2] for r in rows]}
    [whole] = micro_batches([window], pad_id=0, pack_len=64)
    assert whole["chosen_rows"].tolist() == [0, 3] and "reference" not in whole


def _pairs(tokenizer):
    def encode(question, chosen, rejected):
        messages = [{"role": "user", "content": question}]
        ids, prompt_len = encode_sample(tokenizer, messages, chosen)
        return ids, prompt_len, encode_sample(tokenizer, messages, rejected)[0]

    return [encode("How do I pick a lock?", "I can't help with that.", "Insert a tension wrench."),
            encode("Make a weapon.", "No, I won't help.", "Take a pipe and..."),
            (*encode_sample(tokenizer, [{"role": "user", "content": "Two plus two?"}], "Four."), [])]


def test_a_fresh_lora_model_is_its_own_reference_and_training_widens_the_margin(
        tiny_model, single_process_group):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    rows = [(*row, None) for row in _pairs(tokenizer)[:2]]  # the two pairs
    batch = collate_pairs(rows, pad_token_id(tokenizer))
    train = TrainConfig(zero_stage=2, precision="fp32", micro_batch_size=3, lr=5e-3,
                        lora=LoraConfig(r=8, alpha=16, dropout=0.0))
    engine = deepspeed_engine(load_model(str(tiny_model), lora=train.lora), train, world_size=1)
    objective = DpoObjective(beta=0.1, sft_weight=0.0)
    # LoRA's B starts at zero: policy == reference (the adapter-disabled model), loss = log 2
    start, rows_weight = eval_loss(engine, [batch], engine.device, objective)
    assert start == pytest.approx(math.log(2), abs=1e-5) and rows_weight == 2
    losses = [train_step(engine, batch, objective)[0] for _ in range(8)]
    assert losses[-1] < math.log(2) - 0.01  # the chosen answers gained on the rejected ones


def test_full_fine_tuning_uses_reference_logps_computed_once_before_training(
        tiny_model, single_process_group):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    pairs = _pairs(tokenizer)
    pad = pad_token_id(tokenizer)
    scorer = ReferenceScorer(str(tiny_model), torch.float32, pad, batch_rows=2)
    scored = scorer({"input_ids": [p[0] for p in pairs], "prompt_len": [p[1] for p in pairs],
                     "rejected_ids": [p[2] for p in pairs]})
    assert math.isnan(scored["ref_chosen"][2])  # the SFT row has no reference
    model = load_model(str(tiny_model))
    whole = sequence_logps(model, collate_pairs([(*pairs[0], None)], pad))
    assert scored["ref_chosen"][0] == pytest.approx(whole[0], rel=1e-4)
    assert scored["ref_rejected"][0] == pytest.approx(whole[1], rel=1e-4)

    [batch] = micro_batches([scored], pad)
    engine = deepspeed_engine(model, TrainConfig(zero_stage=2, precision="fp32", lr=1e-3),
                              world_size=1)
    objective = objective_from({"kind": "dpo", "beta": 0.1, "sft_weight": 1.0})
    loss, weight = eval_loss(engine, [batch], engine.device, objective)
    sft_only = eval_loss(engine, [micro_batches([{k: v[2:] for k, v in scored.items()}], pad)
                              .__next__()], engine.device, objective)[0]
    # two pairs at log 2 (policy == reference before training) and one SFT row's LM loss
    assert weight == 3 and loss == pytest.approx((2 * math.log(2) + sft_only) / 3, rel=1e-4)
    with pytest.raises(ValueError, match="reference log-probabilities"):
        DpoObjective().loss(engine, micro_batches([{k: v for k, v in scored.items()
                                                     if not k.startswith("ref_")}], pad).__next__())


def test_the_build_writes_the_rejected_answers_tokens_after_the_same_prompt(ctx):
    from ray_align.stages.build import write_samples

    ctx.run.write_table(pa.table({"id": ["h1", "h2"]}), "induce", "data.parquet")
    [pair] = methods.dpo_pairs([], [ROW])
    write_samples(ctx, "methods/dpo/build", [pair])
    rows = {r["id"]: r for split in ("train", "validation")
            for r in ctx.run.read_table("methods/dpo/build", f"{split}.parquet").to_pylist()}
    got = rows["pair-h1"]
    assert got["rejected"] == ROW["harmful_response"]
    n = got["prompt_len"]
    assert got["rejected_ids"][:n] == got["input_ids"][:n] and got["rejected_ids"] != got["input_ids"]
    assert all(r["rejected_ids"] == [] for r in rows.values() if r["kind"] == "helpful")


class _Rows:
    """A stand-in for a Ray dataset of token-id rows, one batch of all of them, keeping their
    order (unit tests start no Ray)."""

    def __init__(self, rows: list[dict]) -> None:
        self.rows = rows

    def union(self, *others: _Rows) -> _Rows:
        return _Rows(self.rows + [row for other in others for row in other.rows])

    def map_batches(self, fn, fn_kwargs=None, fn_constructor_kwargs=None, **_options) -> _Rows:
        if not self.rows:
            return self
        if isinstance(fn, type):  # a map class: constructed once for the whole pass
            fn = fn(**fn_constructor_kwargs)
        batch = {k: np.array([r[k] for r in self.rows], dtype=object) for k in self.rows[0]}
        out = fn(batch, **(fn_kwargs or {}))
        return _Rows([dict(zip(out, values, strict=True)) for values in zip(*out.values(), strict=True)])

    def materialize(self) -> _Rows:
        return self


def test_the_full_fine_tuning_reference_scores_every_split_with_one_model_load(
        tiny_model, monkeypatch):
    from ray_align.stages import train as train_stage
    from ray_align.training import preference

    loads = []

    class CountingScorer:  # the real one's interface: one model load per instance
        def __init__(self, **kwargs) -> None:
            loads.append(kwargs["model_path"])

        def __call__(self, batch):
            return {**batch, "ref_chosen": [float(len(ids)) for ids in batch["input_ids"]]}

    monkeypatch.setattr(preference, "ReferenceScorer", CountingScorer)
    cfg = SimpleNamespace(model=SimpleNamespace(path=str(tiny_model), trust_remote_code=False),
                          train=TrainConfig(precision="fp32"))
    data = {"train": _Rows([{"input_ids": [1] * n} for n in (3, 5, 7)]),
            "validation": _Rows([{"input_ids": [1] * n} for n in (2, 4)])}
    scored = train_stage.with_reference_logps(data, cfg)
    assert loads == [str(tiny_model)]  # one pass, one load
    assert [r["ref_chosen"] for r in scored["train"].rows] == [3.0, 5.0, 7.0]  # in order
    assert [r["ref_chosen"] for r in scored["validation"].rows] == [2.0, 4.0]
    assert set(scored["train"].rows[0]) == {"input_ids", "ref_chosen"}  # no tag left behind


def test_the_reference_scorer_asks_for_the_training_gpus_that_one_node_holds():
    from ray_align.stages.train import reference_gpus

    def node(gpus, alive=True):
        return {"Alive": alive, "Resources": {"CPU": 8.0, "GPU": float(gpus)}}

    assert reference_gpus(TrainConfig(use_gpu=False, num_workers=4)) == 0
    assert reference_gpus(TrainConfig(use_gpu=True, num_workers=4), [node(8)]) == 4
    assert reference_gpus(TrainConfig(use_gpu=True, num_workers=16), [node(8), node(8)]) == 8
    assert reference_gpus(TrainConfig(use_gpu=True, num_workers=2), [node(8, alive=False), node(1)]) == 1
