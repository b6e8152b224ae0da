"""Engine pools shared across stages (``engine.share_across_stages``), on a long-lived Ray cluster
(``ray start --head``, as users run one): induce and analyze sample from one Ray Serve LLM
deployment, and a driver that is interrupted (Ctrl-C) or finishes leaves no Serve application,
actor or placement group behind on the cluster."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, ray_align_env, tiny_config
from tests.integration.test_two_node_job import RAY, free_port, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
def head_node():
    env = {**ray_align_env(), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    port, dashboard = free_port(), free_port()
    head = subprocess.Popen(  # the dashboard answers `ray list` (Ray's state API)
        [RAY, "start", "--head", "--block", f"--port={port}", "--num-cpus=2",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
         "--disable-usage-stats"],
        env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    address = f"127.0.0.1:{port}"
    try:
        wait_for(lambda: _listed(address, env, "nodes") is not None, 120, "the head node")
        yield address, env
    finally:
        if head.poll() is None:
            os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)


def _listed(address: str, env: dict, what: str, *filters: str) -> list[dict] | None:
    """``ray list WHAT`` on the cluster, or None while it does not answer."""
    args = [RAY, "list", what, f"--address={address}", "--format=json", "--detail"]
    for condition in filters:
        args += ["--filter", condition]
    out = subprocess.run(args, env=env, capture_output=True, text=True, timeout=60)
    try:
        return json.loads(out.stdout)
    except json.JSONDecodeError:
        return None


# Ray Data's own detached helpers, one per cluster and shared by every driver that uses Ray Data
# (they are there after any ray.data run, shared pools or not): not the run's to remove.
RAY_DATA_SINGLETONS = {"ActorLocationTracker", "_AutoscalingCoordinatorActor", "TelemetryAgent",
                       "_StatsActor", "_UsageCollectionActor"}


def _left_behind(address: str, env: dict) -> list[str]:
    """Live actors and placement groups on the cluster: none of the run's may outlive it."""
    actors = [a for a in _listed(address, env, "actors", "state=ALIVE") or []
              if a.get("class_name") not in RAY_DATA_SINGLETONS]
    groups = _listed(address, env, "placement-groups", "state=CREATED") or []
    return ([f"actor {a.get('class_name')}" for a in actors]
            + [f"placement group {g.get('placement_group_id')}" for g in groups])


def _nothing_left(address: str, env: dict, timeout: float = 90) -> None:
    deadline = time.time() + timeout
    while (left := _left_behind(address, env)) and time.time() < deadline:
        time.sleep(2)
    assert not left, f"left on the cluster after the driver ended: {left}"


def _driver(config: Path, address: str, env: dict) -> tuple[subprocess.Popen, list[str]]:
    """``ray-align run --until analyze`` on the cluster, its output collected line by line."""
    driver = subprocess.Popen(
        [sys.executable, "-m", "ray_align.cli", "run", str(config), "--until", "analyze",
         f"ray.address={address}", "engine.share_across_stages=true"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(driver.stdout), daemon=True).start()
    return driver, lines


def test_stages_share_one_pool_and_nothing_outlives_the_driver(head_node, tiny_model, tmp_path):
    address, env = head_node
    config = tiny_config(tmp_path, tiny_model, harmful=6, **{"induce.max_tokens": 48})
    run = tmp_path / "run"

    # Ctrl-C while induce samples from the shared pool: the run stops, the pool goes with it
    driver, lines = _driver(config, address, env)
    try:
        wait_for(lambda: any("shared engine pool up" in line for line in lines), 400, "the shared pool")
        time.sleep(3)
        driver.send_signal(signal.SIGINT)
        assert driver.wait(timeout=180) == 130, "".join(lines)[-3000:]
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    assert any("shared engine pool released" in line for line in lines), "".join(lines)[-3000:]
    _nothing_left(address, env)

    # the rerun resumes; induce starts the pool, analyze reuses it; the end shuts it down
    driver, lines = _driver(config, address, env)
    assert driver.wait(timeout=900) == 0, "".join(lines)[-4000:]
    manifests = {stage: json.loads((run / stage / "manifest.json").read_text())
                 for stage in ("induce", "analyze")}
    assert manifests["induce"]["rows"] == manifests["analyze"]["rows"] == 6
    assert manifests["induce"]["metrics"]["engine_pools"] == 1
    assert manifests["analyze"]["metrics"]["engine_pools"] == 0
    assert all(m["metrics"]["output_tokens"] > 0 for m in manifests.values())
    assert (run / "analyze" / manifests["analyze"]["output"]).exists()
    _nothing_left(address, env)
