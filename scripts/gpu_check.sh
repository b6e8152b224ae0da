#!/usr/bin/env bash
# Every GPU measurement of the training core at once (ray_align/bench/gpu_check.py): the packed
# 1.1B benchmark (MFU as 6N and with attention, target 45%) and the export checks (ZeRO-3
# gathering, LoRA merge, reloaded by transformers); writes docs/results/gpu-<card>.json.
# No Ray, no vLLM: the GPU image's python3 with torch, transformers, peft and accelerate.
#
#   bash scripts/gpu_check.sh --prepare-wheels   # here (with internet): what the image lacks, into .whl/
#   bash scripts/gpu_check.sh [--quick] [ARGS]   # on the GPU machine (.whl/ carried along)
#
# The image has no pydantic (ray_align.config needs it) and no DeepSpeed (the core's engine; the
# ZeRO-3 check is skipped without it, the core contender fails and is recorded as failed): their
# wheels travel in .whl/ (5.6 MB), with DeepSpeed's dependencies the image may lack.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}

if [[ "${1:-}" == "--prepare-wheels" ]]; then
  mkdir -p .whl
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
  platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
  "$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d .whl \
    "pydantic==$(.venv/bin/python -c 'import pydantic; print(pydantic.VERSION)')" \
    "pydantic-core==$(.venv/bin/python -c 'import pydantic_core; print(pydantic_core.__version__)')" \
    annotated-types typing-inspection typing-extensions hjson einops msgpack ninja py-cpuinfo
  # DeepSpeed is published as source only: a wheel of its Python code, ops built just in time
  # (the version from the package metadata: importing deepspeed prints a warning on stdout)
  DS_BUILD_OPS=0 .venv/bin/python -m pip wheel --no-deps --no-build-isolation -w .whl \
    "deepspeed==$(.venv/bin/python -c 'from importlib.metadata import version; print(version("deepspeed"))')"
  ls -l .whl
  exit 0
fi

if compgen -G ".whl/*.whl" > /dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
PYTHONUNBUFFERED=1 exec "$PYTHON" -m ray_align.bench.gpu_check "$@"
