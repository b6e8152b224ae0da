"""Engine pools shared across stages (``engine.share_across_stages``) on a long-lived Ray cluster
(``ray start --head``, as users run one): a driver interrupted (Ctrl-C) while a stage samples
from the shared Ray Serve deployment leaves no Serve application, actor or placement group
behind. Sharing itself and the clean end of a finished run are checked in
test_two_node_job.py (a submitted job with shared pools)."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import threading

import pytest

from tests.conftest import REPO, ray_align_env, tiny_config
from tests.integration.cluster_state import RAY, listed, nothing_left_behind, stop_nodes
from tests.integration.test_two_node_job import free_port, wait_for

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
        wait_for(lambda: listed(address, env, "nodes") is not None, 120, "the head node")
        yield address, env
    finally:
        stop_nodes([head])


def test_ctrl_c_during_a_shared_pool_stage_leaves_nothing_on_the_cluster(head_node, tiny_model,
                                                                         tmp_path):
    address, env = head_node
    config = tiny_config(tmp_path, tiny_model, harmful=6, **{"induce.max_tokens": 48})
    driver = subprocess.Popen(
        [sys.executable, "-m", "ray_align.cli", "run", str(config), "--until", "induce",
         f"ray.address={address}", "engine.share_across_stages=true"],
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
    nothing_left_behind(address, env)
