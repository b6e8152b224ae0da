"""Ray job entrypoint for one stage: ``python jobs/run_stage.py NAME CONFIG --run-dir DIR``."""

import sys

from ray_align.cli import main

if __name__ == "__main__":
    sys.exit(main(["stage", *sys.argv[1:]]))
