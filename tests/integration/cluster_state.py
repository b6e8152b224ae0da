"""What is alive on a Ray cluster a test started, read with Ray's own ``ray list`` (state API)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

RAY = str(Path(sys.executable).with_name("ray"))
# Ray Data's own detached helpers, one per cluster and shared by every driver that uses Ray Data
# (there after any ray.data run, shared pools or not): not a run's to remove.
RAY_DATA_SINGLETONS = {"ActorLocationTracker", "_AutoscalingCoordinatorActor", "TelemetryAgent",
                       "_StatsActor", "_UsageCollectionActor"}


def listed(gcs: str, env: dict, what: str, *filters: str) -> list[dict] | None:
    """``ray list WHAT`` on the cluster at ``gcs``, or None while it does not answer."""
    args = [RAY, "list", what, f"--address={gcs}", "--format=json", "--detail"]
    for condition in filters:
        args += ["--filter", condition]
    out = subprocess.run(args, env=env, capture_output=True, text=True, timeout=60)
    try:
        return json.loads(out.stdout)
    except json.JSONDecodeError:
        return None


def left_behind(gcs: str, env: dict) -> list[str]:
    """Live actors (Ray Data's singletons aside) and placement groups on the cluster."""
    actors = [a for a in listed(gcs, env, "actors", "state=ALIVE") or []
              if a.get("class_name") not in RAY_DATA_SINGLETONS]
    groups = listed(gcs, env, "placement-groups", "state=CREATED") or []
    return ([f"actor {a.get('class_name')}" for a in actors]
            + [f"placement group {g.get('placement_group_id')}" for g in groups])


def nothing_left_behind(gcs: str, env: dict, timeout: float = 90) -> None:
    """No actor or placement group of a finished driver outlives it (given time to end)."""
    deadline = time.time() + timeout
    while (left := left_behind(gcs, env)) and time.time() < deadline:
        time.sleep(2)
    assert not left, f"left on the cluster after the driver ended: {left}"


def stop_nodes(nodes: list[subprocess.Popen], grace_s: float = 3) -> None:
    """Stop the ``ray start --block`` process groups a test started: SIGTERM, then SIGKILL for
    any still up after ``grace_s`` (the cluster is thrown away; a long grace only costs CI)."""
    for node in reversed(nodes):
        if node.poll() is None:
            os.killpg(node.pid, signal.SIGTERM)
    for node in reversed(nodes):
        try:
            node.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(node.pid, signal.SIGKILL)
            node.wait()
