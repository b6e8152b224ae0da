"""Ray job entrypoint for one stage: ``python jobs/run_stage.py NAME CONFIG --run-dir DIR``."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the job's working dir

from ray_align.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["stage", *sys.argv[1:]]))
