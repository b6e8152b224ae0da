import functools

import pyarrow as pa
import pytest

from ray_align import generate as generation
from ray_align.config import EngineConfig, ModelConfig, SamplingConfig
from ray_align.generate import (
    RESULT_SCHEMA,
    GenerationError,
    GenerationStats,
    LoraAdapters,
    check_engine_fits,
    engine_kwargs,
    engine_window,
    generate,
    make_requests,
    part_rows,
    placement_bundles,
    results_by_id,
)
from ray_align.storage import RunDir
from tests.unit.ray_llm_rows import engine_block, vllm_answered, vllm_failed


def test_placement_bundles_one_per_tensor_parallel_rank():
    engine = EngineConfig(tensor_parallel_size=4, gpus_per_engine=1, cpus_per_engine=2)
    assert placement_bundles(engine) == [{"CPU": 2, "GPU": 1}] * 4
    assert placement_bundles(EngineConfig()) == [{"CPU": 1}]


def test_engine_kwargs_user_settings_win():
    model = ModelConfig(path="m", max_model_len=1024, dtype="float32")
    kwargs = engine_kwargs(model, EngineConfig(engine_kwargs={"max_model_len": 512, "enforce_eager": True}))
    assert kwargs["max_model_len"] == 512 and kwargs["dtype"] == "float32"
    assert kwargs["trust_remote_code"] is False and kwargs["enforce_eager"] is True


def test_missing_gpus_are_named_before_an_engine_starts():
    engine = EngineConfig(tensor_parallel_size=8, gpus_per_engine=1)
    with pytest.raises(GenerationError, match=r"8 GPU \(has 4\).*tensor_parallel_size=8"):
        check_engine_fits(engine, {"CPU": 64, "GPU": 4})
    check_engine_fits(engine, {"CPU": 64, "GPU": 8})


def test_steady_rate_uses_the_engines_busy_window_when_vllm_reports_it():
    stats = {"scheduled_ts": 100.0, "first_token_ts": 100.5, "last_token_ts": 104.0}
    assert engine_window(stats) == (100.0, 104.0)
    assert engine_window(None) == engine_window({}) == (0.0, 0.0)  # stats off, or a failed row
    done = GenerationStats(requests=4, generated_now=4, output_tokens=200, seconds=30.0, engine_s=4.0)
    assert done.steady_tokens_per_s == 50.0 and done.tokens_per_s == pytest.approx(200 / 30)
    assert GenerationStats(4, 4, 200, 30.0).steady_tokens_per_s is None
    assert done.metrics() == {"output_tokens": 200, "tokens_per_s": 6.7, "engine_s": 4.0,
                              "steady_tokens_per_s": 50.0, "engine_pools": 0,
                              "engine_first_result_s": 0.0}
    assert GenerationStats(4, 4, 200, 30.0).metrics()["engine_s"] is None


# ----------------------------------------------------------------------------- generate() itself


class StubEngines:
    """Stands in for ``build_engine_processor``: maps the blocks of ``generate``'s prompt
    dataset (a list here) to what the real processor returns, one batch per block, and records
    the keys it was sent. Each row goes through ``generate``'s own postprocess under Ray's own
    ``wrap_postprocess`` (``ray_llm_rows``): keys in ``fail`` come back as ray.data.llm 2.60
    returns a failed request, which skips the postprocess."""

    def __init__(self):
        self.fail: set[str] = set()
        self.sent: list[list[str]] = []  # the keys of each generate() call
        self.adapters: list[list[str]] = []  # the adapter column of each call that had one
        self.lora = []  # the LoraAdapters each call was built with

    def build(self, model, engine, sampling, lora=None, carry=()):
        def processor(blocks):
            assert isinstance(blocks, list) and all(isinstance(b, pa.Table) for b in blocks)
            self.sent.append([k for b in blocks for k in b.column("key").to_pylist()])
            self.lora.append(lora)
            if "adapter" in blocks[0].column_names:
                self.adapters.append([a for b in blocks for a in b.column("adapter").to_pylist()])
            return StubDataset(blocks, self.fail, carry)

        return processor


class StubDataset:
    """The engine stage's output, one batch per block, and Ray Data's ``map_batches`` over it
    as ``generate`` uses it: batches of exactly ``batch_size`` rows (the last one shorter)."""

    def __init__(self, blocks, fail, carry=()):
        self.blocks, self.fail, self.carry = blocks, fail, carry

    def engine_batches(self):
        for block in self.blocks:
            rows = []
            for i, row in enumerate(block.to_pylist()):
                key = row["key"]
                rows.append(vllm_failed(row, f"ValueError: engine died on {key}") if key in self.fail
                            else vllm_answered(row, f"answer to {key}", 3, (10.0 + i, 12.0 + i)))
            yield engine_block(rows, functools.partial(generation.engine_answer, carry=self.carry))

    def map_batches(self, fn, *, fn_kwargs, batch_format, batch_size, num_cpus):
        assert batch_format == "pyarrow"
        whole = pa.concat_tables(self.engine_batches(), promote_options="default")
        return MappedDataset([fn(whole.slice(i, batch_size), **fn_kwargs)
                              for i in range(0, whole.num_rows, batch_size)])


class MappedDataset:
    def __init__(self, outputs):
        self.outputs = outputs

    def iter_batches(self, *, batch_size, batch_format):
        assert batch_size is None and batch_format == "pyarrow"
        yield from self.outputs


@pytest.fixture
def stub(monkeypatch):
    import ray
    import ray.data

    engines = StubEngines()
    monkeypatch.setattr(generation, "build_engine_processor", engines.build)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    # no Ray Data and no tokenizer: the blocks as a list, one token id per character of messages
    monkeypatch.setattr(generation, "prompt_dataset", lambda todo, model, engine, rows=None: [
        fake_tokenize(block) for block in generation.request_blocks(todo, engine)])
    return engines


def fake_tokenize(block: pa.Table) -> pa.Table:
    ids = pa.array([[1] * len(m) for m in block.column("messages").to_pylist()], pa.list_(pa.int32()))
    return block.drop_columns(["messages"]).append_column("prompt_ids", ids)


def _requests(n: int, start: int = 0):
    ids = [f"r{i}" for i in range(start, start + n)]
    return make_requests(ids, [[{"role": "user", "content": f"question {i}"}] for i in ids])


def _generate(run, requests, **engine):
    settings = {"batch_size": 1, "shard_rows": 3, **engine}
    return generate(run, ("gen",), requests, ModelConfig(path="m"), EngineConfig(**settings),
                    SamplingConfig(), "test")


def _parts(run) -> list[int]:
    return [run.read_table("gen", name).num_rows for name in run.list_files("gen", suffix=".parquet")]


def test_results_are_written_in_parts_of_shard_rows(stub, tmp_path):
    run = RunDir(str(tmp_path / "run"))
    stats = _generate(run, _requests(10))
    assert stub.sent == [[f"r{i}" for i in range(10)]]
    # batches of one row in a stage of 10: a part per engine batch (a twentieth of the stage is
    # less than one), so its progress moves and a crash loses one batch
    assert _parts(run) == [1] * 10
    results = results_by_id(run, "gen")
    assert sorted(results) == sorted(f"r{i}" for i in range(10))
    assert all(r["generated_text"] == f"answer to {k}" and r["num_generated_tokens"] == 3
               for k, r in results.items())
    messages = dict(zip(*_requests(10).to_pydict().values(), strict=True))
    assert all(r["num_input_tokens"] == len(messages[k]) for k, r in results.items())  # its prompt ids
    assert run.read_tables("gen").schema == RESULT_SCHEMA
    assert (stats.requests, stats.generated_now, stats.output_tokens) == (10, 10, 30)
    assert stats.engine_s == 2.0  # the stub's windows, all (10, 12) for one-row batches
    # engine batches larger than a part: parts still hold shard_rows rows each
    other = RunDir(str(tmp_path / "other"))
    _generate(other, _requests(10), batch_size=4)
    assert _parts(other) == [3, 3, 3, 1]


def test_a_small_stage_writes_parts_of_an_engine_batch_so_its_progress_moves():
    engine = EngineConfig(batch_size=128, shard_rows=2048)
    assert part_rows(engine, 256) == 128  # two parts, not one at the very end
    assert part_rows(engine, 100_000) == 2048  # at scale: shard_rows, a few files
    assert part_rows(engine, 20_000) == 1000  # about twenty parts
    assert part_rows(EngineConfig(batch_size=1, shard_rows=3), 10) == 1


def test_a_rerun_sends_only_the_missing_ids(stub, tmp_path, capsys):
    run = RunDir(str(tmp_path / "run"))
    _generate(run, _requests(6))
    capsys.readouterr()
    stats = _generate(run, _requests(10))
    assert stub.sent[1] == ["r6", "r7", "r8", "r9"]
    assert "[test] resuming: 6 done, 4 to go" in capsys.readouterr().out
    assert (stats.requests, stats.generated_now) == (10, 4)
    assert sorted(results_by_id(run, "gen")) == sorted(f"r{i}" for i in range(10))
    assert len(run.read_tables("gen")) == 10  # nothing written twice
    # all done: no engine is built at all
    again = _generate(run, _requests(10))
    assert len(stub.sent) == 2 and again.generated_now == 0
    assert "resuming: 10 done, 0 to go" in capsys.readouterr().out
    assert (stats.engine_pools, again.engine_pools) == (1, 0)  # an engine start counted once


def test_adapter_rows_keep_their_adapter_through_a_resume(stub, tmp_path):
    run = RunDir(str(tmp_path / "run"))
    lora = LoraAdapters(("/a/sft",), max_rank=16)
    requests = _requests(4).append_column("adapter", pa.array(["", "/a/sft", "", "/a/sft"]))
    generate(run, ("gen",), requests.slice(0, 2), ModelConfig(path="m"), EngineConfig(batch_size=1),
             SamplingConfig(), "test", lora=lora)
    generate(run, ("gen",), requests, ModelConfig(path="m"), EngineConfig(batch_size=1),
             SamplingConfig(), "test", lora=lora)
    assert stub.sent == [["r0", "r1"], ["r2", "r3"]] and stub.lora == [lora, lora]
    assert stub.adapters == [["", "/a/sft"], ["", "/a/sft"]]
    # without an adapter column every row is the base model's
    generate(run, ("other",), _requests(2), ModelConfig(path="m"), EngineConfig(batch_size=1),
             SamplingConfig(), "test", lora=lora)
    assert stub.adapters[-1] == ["", ""]


def test_failed_rows_are_not_saved_and_the_rerun_retries_only_them(stub, tmp_path):
    run = RunDir(str(tmp_path / "run"))
    stub.fail = {"r7", "r3"}
    with pytest.raises(GenerationError) as info:
        _generate(run, _requests(10))
    message = str(info.value)
    assert "test: 2 of 10 requests failed in the engine" in message
    assert "(first: r3: ValueError: engine died on r3)" in message  # the first in request order
    assert "8 were saved, rerun to retry the rest" in message
    saved = results_by_id(run, "gen")
    assert sorted(saved) == sorted(f"r{i}" for i in range(10) if i not in (3, 7))
    assert all(r["generated_text"] == f"answer to {k}" for k, r in saved.items())

    stub.fail = set()
    stats = _generate(run, _requests(10))
    assert stub.sent[1] == ["r3", "r7"]
    assert stats.generated_now == 2
    assert sorted(results_by_id(run, "gen")) == sorted(f"r{i}" for i in range(10))


def test_an_engine_the_cluster_cannot_hold_is_refused_before_it_is_built(stub, tmp_path, monkeypatch):
    import ray

    run = RunDir(str(tmp_path / "run"))
    with pytest.raises(GenerationError, match=r"1 GPU \(has 0\)"):
        _generate(run, _requests(2), gpus_per_engine=1)  # the stub's cluster: 2 CPUs, no GPU
    assert stub.sent == [] and not run.exists("gen")
    monkeypatch.setattr(ray, "cluster_resources", lambda: pytest.fail("asked the cluster"))
    _generate(run, _requests(2), gpus_per_engine=1, check_resources=False)  # the autoscaler's job
    assert stub.sent == [["r0", "r1"]]


def test_a_failed_request_in_a_mixed_block_is_never_stored_as_an_answer(stub, tmp_path):
    # Ray Data fills the columns a failed row lacks with nulls: the failure must still show
    run = RunDir(str(tmp_path / "run"))
    stub.fail = {"r1", "r6"}
    with pytest.raises(GenerationError, match=r"2 of 8 requests failed.*first: r1: ValueError"):
        _generate(run, _requests(8), batch_size=4, shard_rows=100)
    saved = results_by_id(run, "gen")
    assert sorted(saved) == ["r0", "r2", "r3", "r4", "r5", "r7"]
    assert all(r["generated_text"] == f"answer to {k}" for k, r in saved.items())


def test_outcomes_of_both_backends_split_into_answers_and_failures():
    from ray_align.engine_pool import completion_result
    from ray_align.generate import ANSWER_SCHEMA, engine_answer, split_outcomes
    from tests.unit.ray_llm_rows import serve_failed, serve_replied

    rows = [{"key": k, "prompt_ids": [1, 2]} for k in ("a", "b", "c", "d")]
    vllm = engine_block([vllm_answered(rows[0], "fine", 2, (1.0, 2.0)),
                         vllm_failed(rows[1], "ValueError: prompt too long"),
                         vllm_answered(rows[2], "", 1)], engine_answer)  # an empty answer is one
    answers, failures = split_outcomes(vllm)
    assert answers.schema == ANSWER_SCHEMA and answers.column("key").to_pylist() == ["a", "c"]
    assert failures.to_pylist() == [{"key": "b", "error": "ValueError: prompt too long"}]

    serve = engine_block([serve_replied(rows[0], {"choices": [{"text": "ok"}],
                                                  "usage": {"prompt_tokens": 2, "completion_tokens": 1}}),
                          serve_failed(rows[1], "TimeoutError: Request timed out after 9s"),
                          serve_replied(rows[2], {"error": {"message": "bad request", "code": 400}}),
                          serve_replied(rows[3], {"choices": [{"text": "yes"}]})], completion_result)
    answers, failures = split_outcomes(serve)
    assert answers.column("key").to_pylist() == ["a", "d"]
    assert answers.column("generated_text").to_pylist() == ["ok", "yes"]
    assert failures.column("key").to_pylist() == ["b", "c"]
    assert "timed out" in failures.column("error")[0].as_py()
    assert "bad request" in failures.column("error")[1].as_py()

    # a block in which every request failed has none of our columns at all
    answers, failures = split_outcomes(engine_block([vllm_failed(r, "boom") for r in rows], engine_answer))
    assert answers.num_rows == 0 and answers.schema == ANSWER_SCHEMA and failures.num_rows == 4


def test_engine_output_without_the_error_column_is_refused_not_trusted():
    from ray_align.generate import split_outcomes

    batch = pa.table({"key": ["a"], "generated_text": [""], "num_input_tokens": [1],
                      "num_generated_tokens": [0], "engine_window": [[0.0, 0.0]]})
    with pytest.raises(GenerationError, match="no __inference_error__ column"):
        split_outcomes(batch)
    # an "answered" row with no text at all is a failure too, never an empty answer
    batch = batch.append_column("__inference_error__", pa.array([""])).set_column(
        1, "generated_text", pa.array([None], pa.string()))
    answers, failures = split_outcomes(batch)
    assert answers.num_rows == 0 and "no answer text" in failures.column("error")[0].as_py()
