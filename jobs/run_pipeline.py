"""Ray job entrypoint for the whole pipeline.

    ray job submit --working-dir . -- python jobs/run_pipeline.py configs/quickstart.yaml \
        --run-dir s3://bucket/runs/my-run

Inside a Ray job, ``ray.init()`` joins the job's cluster; the arguments are those of
``ray-align run``. A job's driver waits for the run directory's lease to go stale (its holder
stopped heart-beating) before giving up: a driver that KubeRay restarts on another node after the
old one died then continues the run instead of failing at once.
"""

import sys
from pathlib import Path


def run(command: str) -> int:
    """``ray-align COMMAND`` with this script's arguments, from the job's working dir."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from ray_align.cli import main
    from ray_align.lease import HEARTBEAT_S, STALE_AFTER_S

    args = sys.argv[1:]
    if not any(a.startswith("--wait-lease") for a in args):
        args.append(f"--wait-lease={STALE_AFTER_S + HEARTBEAT_S:g}")
    return main([command, *args])


if __name__ == "__main__":
    sys.exit(run("run"))
