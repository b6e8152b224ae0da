"""Faults on real Ray, recovered inside one run: an engine actor SIGKILLed in the middle of the
induce stage (Ray Data restarts it and retries its batches) and a training worker SIGKILLed in
the middle of the epoch (Ray Train restarts the group from the last checkpoint). Each prints its
counts: rows expected, written, lost and duplicated; steps expected, resumed from and final."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from ray_align.config import load_config
from ray_align.stages.train import total_steps
from tests.conftest import REPO, ray_align_env, tiny_config
from tests.integration.test_resume import kill_group

pytestmark = pytest.mark.integration


def processes_of(session: int, title: str) -> list[int]:
    """PIDs in our driver's process session whose command line contains ``title``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getsid(int(entry.name)) != session:
                continue
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (ProcessLookupError, FileNotFoundError, PermissionError):
            continue
        if title in cmdline:
            found.append(int(entry.name))
    return found


def wait_until(predicate, driver: subprocess.Popen, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        if driver.poll() is not None:
            raise AssertionError(f"the run ended before {what}: {driver.stdout.read()[-3000:]}")
        time.sleep(0.5)
    raise TimeoutError(f"timed out waiting for {what}")


def test_engine_actor_and_training_worker_killed_mid_stage(tiny_model, tmp_path):
    rows = 24
    config = tiny_config(tmp_path, tiny_model, harmful=rows, **{
        "engine.batch_size": 2, "engine.shard_rows": 2, "engine.max_concurrent_batches": 1,
        "induce.max_tokens": 64, "train.max_failures": 2, "train.checkpoint_every_steps": 2,
        "train.micro_batch_size": 1, "build.val_fraction": 0.1,
        "train.lora": None})  # full fine-tuning here; the other integration tests train LoRA
    run = tmp_path / "run"
    driver = subprocess.Popen(
        [sys.executable, "-m", "ray_align.cli", "run", str(config), "--until", "train"],
        cwd=REPO, env=ray_align_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)
    try:
        def written() -> int:
            parts = list((run / "induce" / "parts").glob("*.parquet"))
            return sum(pq.read_metadata(p).num_rows for p in parts)

        wait_until(lambda: written() >= 6, driver, 600, "the first induce parts")
        engines = processes_of(driver.pid, "vLLMEngineStageUDF")
        assert engines, "no engine actor found"
        before = written()
        for pid in engines:
            os.kill(pid, signal.SIGKILL)
        print(f"engine actor(s) {engines} killed with {before} of {2 * rows} answers written")

        checkpoints = run / "train" / "ray_train"
        wait_until(lambda: list(checkpoints.glob("checkpoint_*")), driver, 900, "a checkpoint")
        workers = processes_of(driver.pid, "RayTrainWorker")
        assert workers, "no training worker found"
        os.kill(workers[-1], signal.SIGKILL)
        print(f"training worker {workers[-1]} killed after the first checkpoint")
        output, _ = driver.communicate(timeout=1200)
    finally:
        if driver.poll() is None:
            kill_group(driver)
    assert driver.returncode == 0, output[-4000:]

    induced = pq.read_table(run / "induce" / "data.parquet").column("id").to_pylist()
    parts = pq.read_table(run / "induce" / "parts").column("key").to_pylist()
    print(f"induce: expected {rows} rows, got {len(induced)}, unique {len(set(induced))}, "
          f"lost {rows - len(set(induced))}; answers in parts {len(parts)} "
          f"({len(parts) - len(set(parts))} retried duplicates absorbed)")
    assert len(induced) == len(set(induced)) == rows
    assert set(parts) == {f"{i}::{kind}" for i in induced for kind in ("guided", "unguided")}

    metrics = load_manifest_metrics(run / "train" / "manifest.json")
    cfg = load_config(str(config))
    train_rows = pq.read_metadata(run / "build" / "train.parquet").num_rows
    expected_steps = total_steps(cfg.train, train_rows)
    print(f"train: expected {expected_steps} steps, resumed from step "
          f"{metrics['resumed_from_step']}, finished at step {metrics['global_step']}")
    assert metrics["resumed_from_step"] > 0, "the restarted workers did not load the checkpoint"
    assert metrics["global_step"] == expected_steps
    assert (run / "train" / "model" / "model.safetensors").exists()


def load_manifest_metrics(path: Path) -> dict:
    record = json.loads(path.read_text())
    assert record["status"] == "complete", record
    return record["metrics"]
