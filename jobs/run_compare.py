"""Ray job entrypoint for the paper's comparison (``ray-align compare``).

    ray job submit --working-dir . -- python jobs/run_compare.py configs/compare-quickstart.yaml \
        --run-dir s3://bucket/runs/my-comparison
"""

import sys

from run_pipeline import run  # the script's own folder is on sys.path

if __name__ == "__main__":
    sys.exit(run("compare"))
