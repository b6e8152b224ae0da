"""What ``generate()`` does around the engines at scale: requests cut in large blocks, prompts
tokenized off the driver with the driver's own tokenizer, answers reduced to a few numbers."""

from __future__ import annotations

import pickle

import pyarrow as pa
import pytest

from ray_align import generate as generation
from ray_align.assets import MODEL_NAME, asset_home
from ray_align.config import EngineConfig
from ray_align.generate import (
    RESULT_SCHEMA,
    Collected,
    block_rows,
    make_requests,
    request_blocks,
    requests_to_do,
    tokenize_block,
    write_answers,
)
from ray_align.storage import RunDir
from ray_align.tokenization import chat_prompt_ids, load_tokenizer
from tests.unit.ray_llm_rows import engine_block, vllm_answered, vllm_failed

CONVERSATIONS = [
    [{"role": "user", "content": "Why is the sky blue?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "café — 你好 <|im_end|>?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
     {"role": "user", "content": "More?"}],
]


def test_block_rows_keeps_small_runs_at_one_engine_batch_and_caps_big_ones():
    quickstart = EngineConfig(batch_size=32)  # one engine, 4 batches in flight
    assert block_rows(64, quickstart) == 32  # as before: a block per engine batch
    assert block_rows(10_000, quickstart) == 640  # 16 blocks: 4 per batch slot
    assert block_rows(1_000_000, quickstart) == generation.BLOCK_ROWS
    big_pool = EngineConfig(batch_size=48, pool=(8, 64))
    # about 4 blocks per engine batch slot (64 engines x 4): 977 rows, up to whole batches of 48
    assert block_rows(1_000_000, big_pool) == 1008
    assert block_rows(1, EngineConfig(batch_size=16)) == 16


def test_request_blocks_are_slices_covering_every_row_once():
    requests = make_requests([f"r{i}" for i in range(100)], [CONVERSATIONS[0]] * 100)
    blocks = request_blocks(requests, EngineConfig(batch_size=8))
    assert [b.num_rows for b in blocks] == [8] * 12 + [4]
    assert pa.concat_tables(blocks).column("key").to_pylist() == [f"r{i}" for i in range(100)]


def test_requests_to_do_leaves_out_exactly_the_answered_keys():
    requests = make_requests(["a", "b", "c", "d"], [CONVERSATIONS[0]] * 4)
    todo = requests_to_do(requests, pa.array(["d", "b", "zz"]), lora=None)
    assert todo.column("key").to_pylist() == ["a", "c"] and todo.column_names == ["key", "messages"]
    # a first run sends the caller's table itself: no copy of a million requests
    first = requests_to_do(requests, pa.array([], pa.string()), lora=None)
    assert (first.column("messages").chunk(0).buffers()[2].address
            == requests.column("messages").chunk(0).buffers()[2].address)
    with_adapter = requests.append_column("adapter", pa.array(["", "x", "", "x"]))
    todo = requests_to_do(with_adapter, pa.array([], pa.string()), lora=object())
    assert todo.column("adapter").to_pylist() == ["", "x", "", "x"]
    none = pa.array([], pa.string())
    assert requests_to_do(requests, none, lora=object()).column("adapter").to_pylist() == [""] * 4
    assert requests_to_do(with_adapter, none, lora=None).column_names == ["key", "messages"]


@pytest.fixture(scope="module")
def smol():
    return load_tokenizer(str(asset_home() / MODEL_NAME))


def test_a_block_tokenized_with_the_shipped_tokenizer_gets_chat_prompt_ids(smol, monkeypatch):
    """The worker's tokenizer is the driver's, pickled as ``ray.put`` does: same ids as
    ``chat_prompt_ids`` on the driver, row for row, other columns kept."""
    shipped = pickle.loads(pickle.dumps(smol))
    monkeypatch.setattr(generation, "shipped_tokenizer", lambda ref: shipped if ref == "ref" else None)
    block = make_requests(["a", "b", "c"], CONVERSATIONS).append_column(
        "adapter", pa.array(["", "x", ""]))
    out = tokenize_block(block, "ref", "unused", False)
    assert out.column_names == ["key", "adapter", "prompt_ids"]
    assert out.column("key").to_pylist() == ["a", "b", "c"]
    assert out.column("adapter").to_pylist() == ["", "x", ""]
    assert out.column("prompt_ids").to_pylist() == [chat_prompt_ids(smol, m) for m in CONVERSATIONS]
    assert out.schema.field("prompt_ids").type == pa.list_(pa.int32())


def test_a_remote_code_tokenizer_is_loaded_in_the_worker(smol, monkeypatch):
    monkeypatch.setattr(generation, "load_tokenizer", lambda path, trust: smol if trust else None)
    out = tokenize_block(make_requests(["a"], CONVERSATIONS[:1]), None, "model", True)
    assert out.column("prompt_ids").to_pylist() == [chat_prompt_ids(smol, CONVERSATIONS[0])]


def _batch(keys, errors, tokens, windows) -> pa.Table:
    """Engine output as ray.data.llm returns it: failed rows (an error) skip the postprocess."""
    rows = [vllm_failed({"key": k}, e) if e else vllm_answered({"key": k}, f"t{k}", n, tuple(w))
            for k, e, n, w in zip(keys, errors, tokens, windows, strict=True)]
    return engine_block(rows, generation.engine_answer)


def test_batches_are_written_beside_the_engines_and_only_counts_reach_the_driver(tmp_path):
    run = RunDir(str(tmp_path))
    collected = Collected()
    first = _batch(["a", "b", "c"], ["", "boom b", ""], [3, 0, 4],
                   [[10.0, 12.0], [0.0, 0.0], [11.0, 15.0]])
    assert collected.add(write_answers(first, run, ("out",), ())) == 3
    (part,) = run.list_files("out")
    written = run.read_table("out", part)
    assert written.schema == RESULT_SCHEMA and written.column("key").to_pylist() == ["a", "c"]
    second = _batch(["d", "e"], ["", "boom e"], [2, 0], [[0.0, 0.0], [9.0, 30.0]])
    assert collected.add(write_answers(second, run, ("out",), ())) == 2
    assert sorted(run.read_tables("out").column("key").to_pylist()) == ["a", "c", "d"]
    assert (collected.tokens, collected.written, collected.failed) == (9, 3, 2)
    assert collected.first_failure == ("b", "boom b")
    # failed rows' windows are left out, as are rows without request stats
    assert collected.windows == [(10.0, 15.0)]
    assert generation.busy_seconds(collected.windows) == 5.0
