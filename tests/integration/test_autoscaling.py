"""Autoscaling generation workers on one machine: Ray's fake multi-node provider (the one
``ray.cluster_utils.AutoscalingCluster`` drives) starts with the head only (0 CPUs, so nothing
can run there); the induce stage's engine pool (min 1, max 2) makes the autoscaler add worker
nodes with the engines placed on them, and the idle nodes are removed after the timeout.

``AutoscalingCluster.start()`` itself runs ``ray stop --force`` (every Ray process on the
machine) and reads an ``example.yaml`` the wheel lacks, so this test writes the whole cluster
config and starts the head under its own process session, which it ends by session id.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time

import pyarrow.parquet as pq
import pytest

from tests.conftest import REPO, processes_of, ray_align_env, tiny_config
from tests.integration.test_two_node_job import RAY, free_port, wait_for

pytestmark = pytest.mark.integration

IDLE_TIMEOUT_MIN = 0.2
POLLER = """
import json, sys, time, ray
ray.init(address=sys.argv[1], log_to_driver=False)
from ray._private import state
while True:
    total, free = state.total_resources_per_node(), state.available_resources_per_node()
    nodes = {n: round(total[n].get("CPU", 0) - free.get(n, {}).get("CPU", 0), 2) for n in total}
    print(json.dumps({"t": time.time(), "cpu_in_use": nodes}), flush=True)
    time.sleep(1)
"""


def cluster_config(gcs_address: str) -> dict:
    empty: list = []
    return {
        "cluster_name": "ray-align-autoscaling-test",
        "max_workers": 2,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": IDLE_TIMEOUT_MIN,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True,
                     "disable_node_updaters": True, "disable_launch_config_check": True,
                     "gcs_address": gcs_address},
        "auth": {"ssh_user": "ubuntu"},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            # one engine (1 CPU) plus the light map steps fit a node; a second engine needs another
            "cpu_worker": {"resources": {"CPU": 2}, "node_config": {}, "min_workers": 0,
                           "max_workers": 2},
        },
        "head_node_type": "ray.head.default",
        "head_node": {}, "worker_nodes": {}, "file_mounts": {}, "cluster_synced_files": empty,
        "file_mounts_sync_continuously": False, "rsync_exclude": empty, "rsync_filter": empty,
        "initialization_commands": empty, "setup_commands": empty, "head_setup_commands": empty,
        "worker_setup_commands": empty, "head_start_ray_commands": empty,
        "worker_start_ray_commands": empty,
    }


def end_session(leader: subprocess.Popen) -> None:
    """SIGKILL every process of the session the head was started in (fake nodes included)."""
    deadline = time.time() + 30
    while (pids := processes_of(leader.pid)) and time.time() < deadline:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.5)
    leader.wait(timeout=10)


def test_engine_pool_scales_worker_nodes_up_and_back_down(tiny_model, tmp_path):
    from ray._private.services import get_node_ip_address

    port = free_port()
    gcs = f"{get_node_ip_address()}:{port}"
    config_file = tmp_path / "autoscaling.json"
    config_file.write_text(json.dumps(cluster_config(gcs)))
    env = {**ray_align_env(), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
           "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", f"--port={port}", "--num-cpus=0",
         f"--autoscaling-config={config_file}", "--include-dashboard=false", "--disable-usage-stats"],
        env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    timeline: list[dict] = []
    try:
        poller = subprocess.Popen([sys.executable, "-c", POLLER, gcs], env=env, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                  start_new_session=True)
        threading.Thread(target=lambda: timeline.extend(json.loads(line) for line in poller.stdout),
                         daemon=True).start()
        wait_for(lambda: len(timeline) > 0, 120, "the head node")
        assert len(timeline[-1]["cpu_in_use"]) == 1, "the cluster must start with the head only"

        config = tiny_config(tmp_path, tiny_model, harmful=24, **{
            "engine.pool": [1, 2], "engine.batch_size": 2, "engine.max_concurrent_batches": 1,
            "engine.check_resources": False, "induce.max_tokens": 48,
            "ray.shared_run_dir": True})
        started = time.time()
        result = subprocess.run(
            [sys.executable, "-m", "ray_align.cli", "run", str(config), "--until", "induce"],
            cwd=REPO, env={**env, "RAY_ADDRESS": gcs}, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        finished = time.time()
        table = pq.read_table(tmp_path / "run" / "induce" / "data")
        assert table.num_rows == 24

        wait_for(lambda: len(timeline[-1]["cpu_in_use"]) == 1, 180, "idle worker nodes to go")
    finally:
        for line in timeline:
            print(f"t={line['t'] - timeline[0]['t']:6.1f}s nodes={len(line['cpu_in_use'])} "
                  f"cpu_in_use={sorted(line['cpu_in_use'].values())}")
        os.killpg(poller.pid, signal.SIGKILL)
        end_session(head)

    during = [line for line in timeline if started <= line["t"] <= finished]
    most = max(len(line["cpu_in_use"]) for line in during)
    print(f"nodes: 1 at start, {most} at most during induce, "
          f"{len(timeline[-1]['cpu_in_use'])} {timeline[-1]['t'] - finished:.0f} s after it ended")
    assert most >= 2, "no worker node was added while the engines had work"
    # engines hold whole CPUs, only ever on worker nodes (the head has none)
    assert max(max(line["cpu_in_use"].values()) for line in during) >= 1
