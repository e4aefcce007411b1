#!/usr/bin/env bash
# Create (or update) the project's virtual environment with pinned versions.
# torch/torchvision are pinned to releases that lie on this machine's disk (no multi-GB download).
set -euo pipefail
venv=${1:-.venv}
py=${PYTHON:-python3}
# A new venv takes about 7 GB (torch's CUDA build and its libraries). A full disk used to surface as three failed
# installs "(network?)": say what is missing before starting, and again if an install dies on it.
need_gb=${LORAX_SETUP_NEED_GB:-9}
free_gb() { df -Pk "$(dirname "$(readlink -f "$venv")")" | awk 'NR==2 {print int($4 / 1048576)}'; }
if [ ! -x "$venv/bin/python" ] && [ "$(free_gb)" -lt "$need_gb" ]; then
  echo "setup_venv: only $(free_gb) GB free where $venv goes; a new venv needs about $need_gb GB." >&2
  echo "setup_venv: free disk space (old clones' .venv folders, cache/, outputs/) and re-run make setup" >&2
  exit 1
fi
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
# The registry mirror sometimes drops a connection mid-wheel (CI once died on 12.3 of 12.4 MB):
# resume partial downloads, retry connections, and retry the whole install twice before giving up.
export PIP_RESUME_RETRIES=${PIP_RESUME_RETRIES:-20} PIP_RETRIES=${PIP_RETRIES:-10} PIP_TIMEOUT=${PIP_TIMEOUT:-60}
export PIP_NO_CACHE_DIR=${PIP_NO_CACHE_DIR:-1}  # no second copy of every wheel in ~/.cache/pip
log=$(mktemp)
trap 'rm -f "$log"' EXIT
for attempt in 1 2 3; do
  if "$venv/bin/python" -m pip install -q -c constraints.txt -e '.[dev]' 2>"$log"; then cat "$log" >&2; break; fi
  cat "$log" >&2
  if grep -q "No space left on device" "$log"; then
    echo "setup_venv: the disk is full ($(free_gb) GB free where $venv goes; a venv needs about $need_gb GB)." >&2
    echo "setup_venv: free disk space and re-run make setup (a retry cannot help)" >&2
    exit 1
  fi
  [ "$attempt" -lt 3 ] || { echo "setup_venv: pip install failed 3 times (network?); re-run make setup" >&2; exit 1; }
  echo "setup_venv: pip install failed (attempt $attempt); retrying in 10 s" >&2
  sleep 10
done
"$venv/bin/python" -c "import torch, torchvision, timm, open_clip, peft, mlflow, prefect, dvc; print('venv ready: torch', torch.__version__)"
