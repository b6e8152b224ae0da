"""Sequence packing: the same per-sample losses as padded micro-batches, attention that never
crosses samples, every row once in a deterministic order, real tokens counted."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ray_align.training.core import (
    IGNORE_INDEX,
    collate,
    collate_packed,
    micro_batches,
    model_inputs,
    pack_rows,
    packed_micro_batches,
    real_tokens,
    uses_varlen_attention,
)


@pytest.fixture(scope="module")
def llama() -> LlamaForCausalLM:
    """A tiny random Llama, head_dim 32, fp32, its config's default ``use_cache=True``."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=211, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                         attn_implementation="sdpa")
    return LlamaForCausalLM(config).eval()


def sample_rows(seed: int = 0) -> list[tuple[np.ndarray, int]]:
    rng = np.random.default_rng(seed)
    spec = [(7, 2), (12, 5), (3, 1), (20, 4), (9, 3), (30, 10), (1, 1), (16, 6)]
    return [(rng.integers(1, 200, size=n), p) for n, p in spec]


def per_sample_losses(logits: torch.Tensor, labels: torch.Tensor,
                      starts: list[tuple[int, int, int]]) -> list[float]:
    """Mean next-token loss of each sample at (row, offset, length) of a batch."""
    losses = []
    for row, offset, length in starts:
        out = logits[row, offset : offset + length - 1]
        target = labels[row, offset + 1 : offset + length]
        keep = target != IGNORE_INDEX
        losses.append(float(torch.nn.functional.cross_entropy(out[keep], target[keep]))
                      if keep.any() else float("nan"))
    return losses


def packed_places(bins) -> dict[int, tuple[int, int, int]]:
    """Where each sample (by id of its ids array) sits in a packed batch."""
    places, width = {}, 0
    for r, rows in enumerate(bins):
        offset = 0
        for ids, _ in rows:
            places[id(ids)] = (r, offset, len(ids))
            offset += len(ids)
        width = max(width, offset)
    return places


@pytest.mark.parametrize("flat", [False, True])
def test_per_sample_losses_packed_equal_unpacked(llama, flat):
    rows = sample_rows()
    bins = pack_rows(rows, capacity=40)
    packed = collate_packed(bins, pad_id=0, flat=flat)
    padded = collate(rows, pad_id=0)
    if flat:  # sdpa has no varlen kernel: the flat layout goes through the position ids here
        assert packed["input_ids"].shape[0] == 1 and packed["cu_seq_lens_q"][-1] == 98
    with torch.no_grad():
        inputs = {k: v for k, v in model_inputs(packed).items() if not k.startswith(("cu_", "max_"))}
        packed_logits = llama(**inputs).logits
        padded_logits = llama(**padded).logits
    places = packed_places([[r for b in bins for r in b]] if flat else bins)
    got = per_sample_losses(packed_logits, packed["labels"], [places[id(ids)] for ids, _ in rows])
    want = per_sample_losses(padded_logits, padded["labels"],
                             [(i, 0, len(ids)) for i, (ids, _) in enumerate(rows)])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    with torch.no_grad():  # the micro-batch's loss too: the same target tokens, the same mean
        assert abs(float(llama(**inputs).loss)
                   - float(llama(**padded).loss)) < 1e-5


def test_attention_never_crosses_samples(llama):
    rows = sample_rows()
    bins = pack_rows(rows, capacity=64)
    changed = [[(ids if i else np.full_like(ids, 5), p) for i, (ids, p) in enumerate(rows_)]
               for rows_ in bins]  # the first sample of every sequence rewritten
    with torch.no_grad():
        before = llama(**model_inputs(collate_packed(bins, 0))).logits
        after = llama(**model_inputs(collate_packed(changed, 0))).logits
    for r, rows_ in enumerate(bins):
        first = len(rows_[0][0])
        length = sum(len(ids) for ids, _ in rows_)
        assert not torch.allclose(before[r, :first], after[r, :first])
        torch.testing.assert_close(before[r, first:length], after[r, first:length], rtol=0, atol=1e-5)


def test_packing_fills_sequences_within_capacity_and_keeps_every_row():
    rows = sample_rows()
    bins = pack_rows(rows, capacity=32)
    assert all(sum(len(ids) for ids, _ in b) <= 32 for b in bins)
    assert sorted(id(ids) for b in bins for ids, _ in b) == sorted(id(ids) for ids, _ in rows)
    assert len(bins) == 4  # 98 tokens: 4 sequences of up to 32
    long = [(np.arange(50), 1)]
    assert pack_rows(long, capacity=32) == [long]  # too long: a sequence of its own


def test_packed_batch_layout_targets_and_real_tokens():
    rows = [(np.array([5, 6, 7, 8]), 2), (np.array([9, 10, 11]), 1), (np.array([3, 4]), 1)]
    batch = collate_packed(pack_rows(rows, capacity=7), pad_id=0)
    i = IGNORE_INDEX
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10, 11], [3, 4, 0, 0, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2], [0, 1, 0, 1, 2, 3, 4]]
    assert batch["labels"].tolist() == [[i, i, 7, 8, i, 10, 11], [i, 4, i, i, i, i, i]]
    assert real_tokens(batch) == 9 and "sample_lengths" not in model_inputs(batch)
    assert batch["use_cache"] is False  # with a cache, transformers ignores the sample boundaries
    assert real_tokens(collate(rows, 0)) == 9


def test_packed_micro_batches_are_deterministic_and_counted_ahead():
    rng = np.random.default_rng(1)
    lengths = rng.integers(5, 200, size=64)
    window = {"input_ids": [np.arange(n) for n in lengths], "prompt_len": np.ones(64, dtype=int)}
    windows = [{k: v[i : i + 32] for k, v in window.items()} for i in (0, 32)]
    first = list(micro_batches(windows, pad_id=0, size=2, seed=3, pack_len=256))
    again = list(micro_batches(windows, pad_id=0, size=2, seed=3, pack_len=256))
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(first, again, strict=True))
    assert sum(real_tokens(b) for b in first) == lengths.sum()
    assert all(b["input_ids"].shape[1] <= 256 for b in first)
    padded = list(micro_batches(windows, pad_id=0, size=2, seed=3))
    assert len(first) < len(padded) / 2  # fewer, fuller micro-batches
    assert packed_micro_batches(list(lengths), size=2, window=32, pack_len=256) == len(first)


def test_flash_attention_models_get_the_flat_layout():
    class Model:
        def __init__(self, name):
            self.config = type("C", (), {"_attn_implementation": name})()

    assert uses_varlen_attention(Model("flash_attention_2"))
    assert not uses_varlen_attention(Model("sdpa")) and not uses_varlen_attention(None)


def test_the_progress_bar_counts_packed_micro_batches(tmp_path):
    import pyarrow as pa

    from ray_align.config import TrainConfig
    from ray_align.stages.train import packed_micro_per_epoch, total_steps
    from ray_align.storage import RunDir

    run = RunDir(str(tmp_path))
    lengths = [40, 300, 120, 90, 500, 60, 80, 250] * 4
    run.write_table(pa.table({"input_ids": [list(range(n)) for n in lengths], "num_tokens": lengths,
                              "rejected_ids": pa.array([[]] * len(lengths), pa.list_(pa.int32()))}),
                    "build", "train.parquet")
    train = TrainConfig(num_workers=2, micro_batch_size=1, grad_accum=2)
    per_epoch = packed_micro_per_epoch(train, run, "build", 512)
    assert per_epoch == packed_micro_batches(lengths[:16], 1, 16, 512) == 6  # 2720 tokens a rank
    assert total_steps(train, len(lengths), per_epoch) == 3 < total_steps(train, len(lengths)) == 8
    assert packed_micro_per_epoch(train, run, "missing", 512) is None
