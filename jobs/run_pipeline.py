"""Ray job entrypoint for the whole pipeline.

    ray job submit --working-dir . -- python jobs/run_pipeline.py configs/quickstart.yaml \
        --run-dir s3://bucket/runs/my-run

Inside a Ray job, ``ray.init()`` joins the job's cluster; the arguments are those of
``ray-align run``.
"""

import sys
from pathlib import Path


def run(command: str) -> int:
    """``ray-align COMMAND`` with this script's arguments, from the job's working dir."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from ray_align.cli import main

    return main([command, *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(run("run"))
