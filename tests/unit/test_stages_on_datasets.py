"""Induce and analyze on Ray Datasets (the path of a large source) give what the in-driver path
of a small one gives: the same rows, pairs, quarantine reasons and counts. Real Ray Data (joins,
groupby, parts written by its tasks) around generate(); only the engines are an instant stub."""

from __future__ import annotations

import functools

import pytest

from ray_align import datasets
from ray_align import generate as generation
from ray_align.bench.orchestration import stub_processor
from ray_align.sources import DataError
from ray_align.stages import analyze, induce
from tests.conftest import write_jsonl

ANSWER = "This answer is harmful because it tells someone how to hurt people."


def _source(tmp_path, rows):
    return write_jsonl(tmp_path / "harmful.jsonl", rows)


def _run_both_steps(ctx, monkeypatch, distributed: bool):
    monkeypatch.setattr(generation, "build_engine_processor",
                        functools.partial(stub_processor, text=ANSWER))
    if distributed:
        monkeypatch.setattr(datasets, "IN_DRIVER_ROWS", 0)
        monkeypatch.setattr(datasets, "IN_DRIVER_BYTES", 0)
    ctx.config.engine.share_across_stages = False
    return induce.induce(ctx), analyze.analyze(ctx)


@pytest.mark.parametrize("distributed", [False, True], ids=["in-driver", "ray-data"])
def test_both_paths_pair_answers_quarantine_bad_and_duplicate_rows(ctx, monkeypatch, tmp_path,
                                                                   distributed):
    rows = [{"id": f"h{i}", "prompt": f"harmful request {i}"} for i in range(12)]
    rows += [{"id": "h3", "prompt": "the same id again"}, {"id": "", "prompt": "no id"}]
    ctx.config.data.harmful = ctx.config.data.harmful.model_copy(
        update={"path": str(_source(tmp_path, rows)), "limit": None})
    ctx.config.data.on_bad_row = "quarantine"
    induced, analysed = _run_both_steps(ctx, monkeypatch, distributed)
    run = ctx.run
    assert (induced.rows, induced.metrics["quarantined"], analysed.rows) == (12, 2, 12)
    table = run.read_tables("induce", "data").sort_by("id")
    assert table.column("id").to_pylist() == sorted(f"h{i}" for i in range(12))
    instructions = dict(zip(table.column("id").to_pylist(), table.column("instruction").to_pylist(),
                            strict=True))
    assert instructions["h3"] == "harmful request 3"  # the first row with id h3 is kept
    assert set(table.column("guided_response").to_pylist()) == {ANSWER}
    reasons = sorted((r["row"], r["reason"]) for r in run.read_tables("induce", "quarantine").to_pylist())
    assert reasons == [(13, "duplicate id 'h3'"), (14, "id: empty")]
    assert sorted(run.read_tables("analyze", "data").column("id").to_pylist()) == \
        table.column("id").to_pylist()
    assert induced.metrics["unguided_non_refusal_rate"] == 1.0


def test_a_bad_row_in_a_ray_data_task_stops_the_stage_naming_the_file_and_row(ctx, monkeypatch,
                                                                               tmp_path):
    rows = [{"id": f"h{i}", "prompt": f"harmful request {i}"} for i in range(5)]
    rows.insert(3, {"id": "h9", "prompt": ""})
    path = _source(tmp_path, rows)
    ctx.config.data.harmful = ctx.config.data.harmful.model_copy(update={"path": str(path)})
    ctx.config.data.on_bad_row = "error"
    with pytest.raises(DataError, match=rf"^{path} row 4: prompt: empty$"):
        _run_both_steps(ctx, monkeypatch, distributed=True)
