"""The scale benchmark's prompt pool: distinct prompts across sources, or a clear refusal."""

from __future__ import annotations

import json

import pytest

from ray_align.bench.scale import ScaleError, write_prompt_pool
from ray_align.config import load_config
from tests.conftest import write_jsonl
from tests.unit.test_config import QUICKSTART


def config_with(tmp_path, harmful: list[str], held_out: list[str]):
    first = write_jsonl(tmp_path / "a.jsonl", [{"id": f"a{i}", "prompt": p} for i, p in enumerate(harmful)])
    second = write_jsonl(tmp_path / "b.jsonl", [{"id": f"b{i}", "prompt": p} for i, p in enumerate(held_out)])
    return load_config(QUICKSTART, [
        f"data.harmful={{path: {first}, id_column: id, limit: 2}}",
        f"evaluate.harmful=[{{path: {second}, id_column: id, offset: 1, limit: 1}}]"])


def test_pool_fills_from_every_harmful_source_without_repeating_a_prompt(tmp_path):
    config = config_with(tmp_path, ["p0", "p1", "p2"], ["p1", "q0", "q1"])
    pool = write_prompt_pool(config, 5, tmp_path / "pool.jsonl")
    rows = [json.loads(line) for line in pool.read_text().splitlines()]
    # no source's offset or limit (a stage's slice) narrows the pool; the repeated "p1" is taken once
    assert [r["prompt"] for r in rows] == ["p0", "p1", "p2", "q0", "q1"]
    assert [r["id"] for r in rows] == ["a0", "a1", "a2", "b1", "b2"]


def test_pool_larger_than_the_sources_is_refused_with_the_count(tmp_path):
    config = config_with(tmp_path, ["p0", "p1"], ["p1", "q0"])
    with pytest.raises(ScaleError, match="asks for 9 prompts .* hold 3 distinct"):
        write_prompt_pool(config, 9, tmp_path / "pool.jsonl")


def test_steady_time_is_the_stages_engine_busy_time(tmp_path, monkeypatch):
    """The glue of one size's run (the stages themselves, and the engine_s they record, are
    proven on real engines in the end-to-end test)."""
    from ray_align import pipeline
    from ray_align.bench import scale
    from ray_align.bench.common import BenchError

    busy = {"induce": {"output_tokens": 40, "engine_s": 3.0},
            "analyze": {"output_tokens": 20, "engine_s": 2.0}}
    ran = []

    def fake_run_stage(ctx, stage):
        ran.append(stage.name)
        return {"metrics": busy[stage.name]}

    monkeypatch.setattr(pipeline, "run_stage", fake_run_stage)
    spec = {"config": load_config(QUICKSTART).model_dump(mode="json")}
    row = scale.run_generation_stages(spec)
    assert ran == ["induce", "analyze"]
    assert (row["tokens"], row["steady_s"]) == (60, 5.0)
    assert row["start_s"] == pytest.approx(row["wall_s"] - 5.0)

    busy["analyze"]["engine_s"] = None  # vLLM recorded no request stats
    with pytest.raises(BenchError, match="analyze recorded no engine busy time"):
        scale.run_generation_stages(spec)
