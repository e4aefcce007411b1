#!/usr/bin/env bash
# Create (or update) the project's virtual environment with pinned versions.
# torch/torchvision are pinned to releases that lie on this machine's disk (no multi-GB download).
set -euo pipefail
venv=${1:-.venv}
py=${PYTHON:-python3}
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
"$venv/bin/python" -m pip install -q -c constraints.txt -e '.[dev]'
"$venv/bin/python" -c "import torch, torchvision, timm, open_clip, peft, mlflow, prefect, dvc; print('venv ready: torch', torch.__version__)"
