"""A real two-node Ray cluster on this machine (``ray start --head``, then a second node with its
own resources), long-lived as users run one and shared by this module's tests. Engine pools
shared across stages (``engine.share_across_stages``): a driver interrupted (Ctrl-C) while a stage
samples from the shared Ray Serve deployment leaves no Serve application, actor or placement
group behind. The pipeline (up to the trained model: the engines' evaluation stage is proven in
test_resume.py) submitted with Ray's own ``ray job submit`` CLI, SUCCEEDED awaited, and the outputs
checked in the run directory. Token auth stays on: every process gets the token."""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from ray_align.submit import NO_AGENT_YET
from tests.conftest import REPO, ray_align_env, tiny_config
from tests.integration.cluster_state import RAY, nothing_left_behind, stop_nodes

pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(1)
    raise TimeoutError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")  # scripts/test.sh runs a module's tests on one xdist worker
def two_node_cluster():
    env = {**ray_align_env(), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
           # jobs run `python ...` as on a real cluster image: this environment's python
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    # every port its own: the node agents' default (52365) is taken by any other cluster on the
    # host, and a node whose agent cannot listen takes no jobs ("No available agent")
    gcs, dashboard, head_agent, node_agent = free_port(), free_port(), free_port(), free_port()
    started = []
    try:
        started.append(subprocess.Popen(
            [RAY, "start", "--head", "--block", f"--port={gcs}",
             "--num-cpus=2", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
             f"--dashboard-port={dashboard}", f"--dashboard-agent-listen-port={head_agent}",
             "--disable-usage-stats"],
            env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        address = f"http://127.0.0.1:{dashboard}"

        def nodes() -> int:
            out = subprocess.run([RAY, "list", "nodes", f"--address=127.0.0.1:{gcs}", "--format=json"],
                                 env=env, capture_output=True, text=True)
            try:
                return sum(n["state"] == "ALIVE" for n in json.loads(out.stdout))
            except (json.JSONDecodeError, KeyError, TypeError):
                return 0

        wait_for(lambda: nodes() >= 1, 120, "the head node")
        started.append(subprocess.Popen(
            # its own temp dir: two nodes on one host must not share runtime-env folders
            [RAY, "start", "--block", f"--address=127.0.0.1:{gcs}", f"--temp-dir=/tmp/ray-node2-{gcs}",
             "--num-cpus=1", '--resources={"second_node": 1}', f"--dashboard-agent-listen-port={node_agent}",
             "--disable-usage-stats"],
            env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_for(lambda: nodes() >= 2, 120, "the second node")
        print(f"cluster up: 2 nodes, job server {address}")
        yield address, env, f"127.0.0.1:{gcs}"
    finally:
        stop_nodes(started)


def test_ctrl_c_during_a_shared_pool_stage_leaves_nothing_on_the_cluster(two_node_cluster, tiny_model,
                                                                         tmp_path):
    _, env, gcs = two_node_cluster
    config = tiny_config(tmp_path, tiny_model, harmful=6, **{"induce.max_tokens": 48})
    driver = subprocess.Popen(
        [sys.executable, "-m", "ray_align.cli", "run", str(config), "--until", "induce",
         f"ray.address={gcs}", "ray.shared_run_dir=true", "engine.share_across_stages=true"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(driver.stdout), daemon=True).start()
    try:
        wait_for(lambda: any("shared engine pool up" in line for line in lines), 400, "the shared pool")
        driver.send_signal(signal.SIGINT)  # what Ctrl-C in the driver's terminal sends
        assert driver.wait(timeout=180) == 130, "".join(lines)[-3000:]
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    assert any("shared engine pool released" in line for line in lines), "".join(lines)[-3000:]
    nothing_left_behind(gcs, env)


def test_pipeline_submitted_with_ray_job_submit(two_node_cluster, tiny_model, tmp_path):
    address, env, gcs = two_node_cluster
    # induce and analyze share one engine pool (a Ray Serve application), released for training
    config = tiny_config(tmp_path, tiny_model, harmful=4, **{"ray.shared_run_dir": True,
                                                              "engine.share_across_stages": True})
    runtime_env = json.dumps({"working_dir": str(REPO),
                              "excludes": [".git", ".venv", "runs", "**/__pycache__"]})
    command = [RAY, "job", "submit", f"--address={address}", f"--runtime-env-json={runtime_env}", "--",
               sys.executable, "jobs/run_pipeline.py", str(config), "--until", "train"]
    deadline = time.time() + 120
    while True:  # a cluster just started may have no node agent taking jobs yet: Ray says so
        result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
        if NO_AGENT_YET not in result.stdout + result.stderr or time.time() > deadline:
            break
        time.sleep(2)
    print(result.stdout[-2000:])
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "succeeded" in result.stdout.lower()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert {name: s["status"] for name, s in summary["stages"].items()} == {
        "induce": "complete", "analyze": "complete", "build": "complete", "train": "complete",
        "evaluate": "not started"}
    assert (tmp_path / "run" / "train" / "model" / "config.json").exists()
    pools = {stage: json.loads((tmp_path / "run" / stage / "manifest.json").read_text())["metrics"]
             ["engine_pools"] for stage in ("induce", "analyze")}
    assert pools == {"induce": 1, "analyze": 0}
    nothing_left_behind(gcs, env)  # the job's shared pool and Serve went with it

    # ray_align's own client on the same cluster: the rerun skips every finished stage.
    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "ray_align.cli", *args, f"--address={address}"],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=600)

    submitted = cli("submit", str(config), "--until", "train")
    print(submitted.stdout[-2000:])
    assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-2000:]
    job_id = submitted.stdout.split("submitted job ", 1)[1].split(":", 1)[0]
    assert submitted.stdout.count("complete in an earlier run: skipped") == 4
    assert f"job {job_id}: SUCCEEDED" in submitted.stdout
    assert cli("status", job_id).stdout.strip() == "SUCCEEDED"
    assert "ray_align run summary" in cli("logs", job_id).stdout
