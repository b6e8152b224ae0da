"""Ray job entrypoint for the whole pipeline.

    ray job submit --working-dir . -- python jobs/run_pipeline.py configs/quickstart.yaml \
        --run-dir s3://bucket/runs/my-run

Inside a Ray job, ``ray.init()`` joins the job's cluster; the arguments are those of
``ray-align run``.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the job's working dir

from ray_align.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
