"""Interrupt a run in the middle of a stage (SIGKILL of the driver's process group), rerun it on
the same run directory, and check that every row is there exactly once; then the same in the
middle of training: the rerun continues from the last checkpoint's step, not from 0."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from ray_align.config import load_config
from ray_align.stages.train import total_steps
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


def test_interrupted_induce_resumes_without_loss_or_duplicates(tiny_model, tmp_path):
    rows = 24
    config = tiny_config(tmp_path, tiny_model, harmful=rows, **{
        "engine.batch_size": 4, "engine.shard_rows": 4, "engine.max_concurrent_batches": 1,
        "induce.max_tokens": 48, "train.checkpoint_every_steps": 2, "train.micro_batch_size": 1})
    parts = tmp_path / "run" / "induce" / "parts"
    cmd = [sys.executable, "-m", "ray_align.cli", "run", str(config), "--until", "induce"]
    first = subprocess.Popen(cmd, cwd=REPO, env=ray_align_env(), start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while time.time() < deadline and first.poll() is None:
        if parts.exists() and any(p.suffix == ".parquet" for p in parts.iterdir()):
            break
        time.sleep(0.5)
    assert first.poll() is None, "the run ended before it could be interrupted"
    kill_group(first)
    written = pq.read_table(parts).num_rows
    print(f"interrupted after {written} of {2 * rows} generations")
    assert 0 < written < 2 * rows

    # The rerun resumes induce, then goes on through training, and is killed after a
    # mid-epoch checkpoint; the next run continues from that step and ends at the step count
    # of an uninterrupted run.
    cmd = [sys.executable, "-m", "ray_align.cli", "run", str(config), "--until", "train"]
    log = tmp_path / "second.log"
    with log.open("w") as out:
        second = subprocess.Popen(cmd, cwd=REPO, env=ray_align_env(), start_new_session=True,
                                  stdout=out, stderr=subprocess.STDOUT)
    # Ray Train records a checkpoint in this snapshot once it is fully written
    registered = tmp_path / "run" / "train" / "ray_train" / "checkpoint_manager_snapshot.json"
    deadline = time.time() + 900
    while time.time() < deadline and second.poll() is None and not registered.exists():
        time.sleep(0.5)
    assert second.poll() is None, "the run ended before training could be interrupted:\n" + \
        log.read_text()[-4000:]
    kill_group(second)
    assert f"resuming: {written} done" in log.read_text()
    keys = pq.read_table(parts).column("key").to_pylist()
    print(f"after resume: {len(keys)} generations, {len(set(keys))} distinct")
    assert len(keys) == len(set(keys)) == 2 * rows
    induced = pq.read_table(tmp_path / "run" / "induce" / "data.parquet")
    assert induced.num_rows == rows and len(set(induced.column("id").to_pylist())) == rows

    third = subprocess.run(cmd, cwd=REPO, env=ray_align_env(), capture_output=True, text=True,
                           timeout=900, start_new_session=True)
    assert third.returncode == 0, third.stderr[-4000:]
    record = json.loads((tmp_path / "run" / "train" / "manifest.json").read_text())
    train_rows = pq.read_metadata(tmp_path / "run" / "build" / "train.parquet").num_rows
    expected = total_steps(load_config(str(config)).train, train_rows)
    metrics = record["metrics"]
    print(f"train: driver killed after a checkpoint; rerun resumed from step "
          f"{metrics['resumed_from_step']}, ended at {metrics['global_step']} of {expected}")
    assert record["status"] == "complete"
    assert 0 < metrics["resumed_from_step"] < expected
    assert metrics["global_step"] == expected
