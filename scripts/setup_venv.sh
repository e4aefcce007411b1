#!/usr/bin/env bash
# Create (or update) the project's virtual environment with pinned versions.
# torch/torchvision are pinned to releases that lie on this machine's disk (no multi-GB download).
set -euo pipefail
venv=${1:-.venv}
py=${PYTHON:-python3}
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
# The registry mirror sometimes drops a connection mid-wheel (CI once died on 12.3 of 12.4 MB):
# resume partial downloads, retry connections, and retry the whole install twice before giving up.
export PIP_RESUME_RETRIES=${PIP_RESUME_RETRIES:-20} PIP_RETRIES=${PIP_RETRIES:-10} PIP_TIMEOUT=${PIP_TIMEOUT:-60}
for attempt in 1 2 3; do
  "$venv/bin/python" -m pip install -q -c constraints.txt -e '.[dev]' && break
  [ "$attempt" -lt 3 ] || { echo "setup_venv: pip install failed 3 times (network?); re-run make setup" >&2; exit 1; }
  echo "setup_venv: pip install failed (attempt $attempt); retrying in 10 s" >&2
  sleep 10
done
"$venv/bin/python" -c "import torch, torchvision, timm, open_clip, peft, mlflow, prefect, dvc; print('venv ready: torch', torch.__version__)"
