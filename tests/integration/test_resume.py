"""A whole ``ray-align run`` with its run directory on a real S3 API server (moto, loopback):
interrupted in the middle of a stage (SIGKILL of the driver's process group) and rerun, every
row is there exactly once; interrupted in the middle of training, the rerun continues from the
last Ray Train checkpoint (on S3) at its step, not from 0; the model is exported to S3, the
evaluation serves it from there on vLLM and reports, and transformers loads it. Execution settings
changed between runs redo nothing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from ray_align.config import load_config
from ray_align.stages.train import total_steps
from ray_align.storage import RunDir
from tests.conftest import REPO, ray_align_env, tiny_config

pytestmark = pytest.mark.integration


def kill_group(process: subprocess.Popen) -> None:
    """SIGKILL the driver and the local Ray cluster it started, again until the group is empty:
    a process forked while the first signal lands (an engine worker) would otherwise survive."""
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()  # reap the leader; the group lives on while any member does
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        time.sleep(0.5)


def test_run_on_s3_resumes_induce_and_training_then_serves_the_exported_model(
        tiny_model, tmp_path, s3_bucket):
    rows = 24
    uri = f"{s3_bucket}/runs/resume"
    config = tiny_config(tmp_path, tiny_model, harmful=rows, run_dir=uri, **{
        "engine.batch_size": 4, "engine.shard_rows": 4, "engine.max_concurrent_batches": 1,
        "induce.max_tokens": 48, "train.checkpoint_every_steps": 2, "train.micro_batch_size": 1,
        "engine.serve_adapters": True})  # the adapter served from S3 (on CPU it is opt-in)
    run = RunDir(uri)
    cmd = [sys.executable, "-m", "ray_align.cli", "run", str(config), "--until", "induce"]
    first = subprocess.Popen(cmd, cwd=REPO, env=ray_align_env(), start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while time.time() < deadline and first.poll() is None:
        if run.list_files("induce", "parts", suffix=".parquet"):
            break
        time.sleep(0.5)
    assert first.poll() is None, "the run ended before it could be interrupted"
    kill_group(first)
    written = run.read_tables("induce", "parts").num_rows
    print(f"interrupted after {written} of {2 * rows} generations")
    assert 0 < written < 2 * rows

    # The rerun resumes induce (the dead driver's lease is stale: its pid is gone), goes on
    # through training, and is killed after a mid-epoch checkpoint; the next run continues from
    # that step and ends at the step count of an uninterrupted run.
    cmd = [sys.executable, "-m", "ray_align.cli", "run", str(config), "--until", "train"]
    log = tmp_path / "second.log"
    with log.open("w") as out:
        second = subprocess.Popen(cmd, cwd=REPO, env=ray_align_env(), start_new_session=True,
                                  stdout=out, stderr=subprocess.STDOUT)
    # Ray Train records a checkpoint in this snapshot once it is fully written
    deadline = time.time() + 900
    while (time.time() < deadline and second.poll() is None
           and not run.exists("train", "ray_train", "checkpoint_manager_snapshot.json")):
        time.sleep(0.5)
    assert second.poll() is None, "the run ended before training could be interrupted:\n" + \
        log.read_text()[-4000:]
    kill_group(second)
    assert f"resuming: {written} done" in log.read_text()
    keys = run.read_tables("induce", "parts").column("key").to_pylist()
    print(f"after resume: {len(keys)} generations, {len(set(keys))} distinct")
    assert len(keys) == len(set(keys)) == 2 * rows
    induced = run.read_tables("induce", "data")
    assert induced.num_rows == rows and len(set(induced.column("id").to_pylist())) == rows

    # Only execution settings differ: finished stages are skipped, training resumes.
    started = time.perf_counter()
    third = subprocess.run([sys.executable, "-m", "ray_align.cli", "run", str(config),
                            "engine.batch_size=8", "engine.shard_rows=3", "train.max_failures=1"],
                           cwd=REPO, env=ray_align_env(), capture_output=True, text=True,
                           timeout=1200, start_new_session=True)
    assert third.returncode == 0, third.stdout[-3000:] + third.stderr[-4000:]
    print(f"third run (train resumed, evaluate from S3): {time.perf_counter() - started:.0f} s")
    for name in ("induce", "analyze", "build"):
        assert f"[{name}] complete in an earlier run: skipped" in third.stdout
    record = run.read_json("train", "manifest.json")
    train_rows = pq.read_metadata(run.path("build", "train.parquet"), filesystem=run.fs).num_rows
    expected = total_steps(load_config(str(config)).train, train_rows)
    metrics = record["metrics"]
    print(f"train: driver killed after a checkpoint; rerun resumed from step "
          f"{metrics['resumed_from_step']}, ended at {metrics['global_step']} of {expected}")
    assert record["status"] == "complete"
    assert 0 < metrics["resumed_from_step"] < expected
    assert metrics["global_step"] == expected

    # the export on S3: a merged model and the LoRA adapter, nothing half-written or renamed
    files = run.walk()
    print(f"{len(files)} objects in the run directory")
    assert not [f for f in files if ".tmp" in f], "temporary objects were left behind"
    model = run.walk("train", "model")
    assert "config.json" in model and any(f.endswith(".safetensors") for f in model)
    assert "adapter_config.json" in run.walk("train", "adapter")
    assert not run.exists("lease.json")  # released at the end of each run
    # vLLM served the exported model from S3 in the evaluation
    answers = run.read_table("evaluate", "answers.parquet").to_pylist()
    assert {a["variant"] for a in answers} == {"base", "aligned", "aligned+reminder"}
    assert all(isinstance(a["answer"], str) for a in answers)
    summary = run.read_json("summary.json")
    # base and aligned on one engine pool: the LoRA adapter (and the base's zero adapter)
    # downloaded from S3 by the engine
    assert summary["metrics"]["evaluate.engine_pools"] == 1
    assert run.exists("evaluate", "base-adapter", "adapter_model.safetensors")
    assert summary["model_dir"] == run.uri_of("train", "model")
    assert [s["status"] for s in summary["stages"].values()] == ["complete"] * 5

    report = run.read_json("evaluate", "report.json")
    assert set(report["metrics"]) == {"base", "aligned", "aligned+reminder"}
    assert report["refusal_detector"]["n"] > 0 and 0 <= report["refusal_detector"]["accuracy"] <= 1
    assert report["judge"]["kind"] == "offline" and summary["metrics"]["evaluate.judge"] == "offline"
    assert {"harmless_rate", "refusal_rate", "over_refusal_rate"} <= set(report["metrics"]["base"])
    assert run.read_bytes("evaluate", "report.md").decode().startswith("# ray_align evaluation")

    # the exported model is a plain HF directory that transformers loads and runs
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = tmp_path / "exported"
    run.download_dir("train", "model", to=local)
    model = AutoModelForCausalLM.from_pretrained(local)
    tokenizer = AutoTokenizer.from_pretrained(local)
    out = model.generate(**tokenizer("Hello", return_tensors="pt"), max_new_tokens=4, do_sample=False)
    assert out.shape[1] > 1
