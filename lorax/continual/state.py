"""A model state is a directory; loading the model after task t needs nothing else.

Layout of ``STATE_DIR``::

    state.json                  method, tasks, the resolved settings, accounting (parameters, seconds)
    tensors/<group>.safetensors adapters/<task>, heads, backbone(s) for methods that train them
    memory.parquet              exemplar memory after this task (manifest rows, never pixels), when known
    rng.json                    seeds used, for the record

The frozen pretrained backbone is never saved: ``state.json`` names it (and its weights file) and the random
init is seeded. Beside ``STATE_DIR`` while its task trains, each with its own name so one never removes another:

    STATE_DIR.resume/   the resume point: the last epoch checkpoint (and a driver's record of its run)
    STATE_DIR.saving/   :func:`save_state` writes here, then renames it to ``STATE_DIR`` (no half state after a crash)

(Older projects kept both in ``STATE_DIR.partial/``; :func:`resume_dirs` still lists it, so they resume.)
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorax.config import Params, params_to_dict, parse_params

if TYPE_CHECKING:
    import torch

STATE_FILE = "state.json"
FORMAT = 1
RESUME = ".resume"  # suffix of the resume point's folder
SAVING = ".saving"  # suffix of save_state's staging folder
LEGACY_PARTIAL = ".partial"  # the one folder older versions used for both


def resume_dir(state_dir: str | Path) -> Path:
    """Where the task training into ``state_dir`` keeps its resume point (epoch checkpoint, run record)."""
    state_dir = Path(state_dir)
    return state_dir.with_name(state_dir.name + RESUME)


def resume_dirs(state_dir: str | Path) -> list[Path]:
    """The resume folder, then the older name it replaces: read a resume point from the first that has it."""
    state_dir = Path(state_dir)
    return [resume_dir(state_dir), state_dir.with_name(state_dir.name + LEGACY_PARTIAL)]


def is_state(path: str | Path) -> bool:
    return (Path(path) / STATE_FILE).is_file()


def read_info(state_dir: str | Path) -> dict[str, Any]:
    p = Path(state_dir) / STATE_FILE
    if not p.is_file():
        raise FileNotFoundError(f"{state_dir}: not a lorax state (no {STATE_FILE}); train a task first")
    info = json.loads(p.read_text())
    if info.get("format") != FORMAT:
        raise ValueError(f"{p}: state format {info.get('format')} not supported (expected {FORMAT})")
    return info


def state_hash(state_dir: str | Path) -> str:
    """Content hash of a state directory, every file (``state.json`` carries the save time, so a retrained state
    never shares a hash with an older one). The one identity of a model: evaluations, open-set calibrations and
    registered versions name the state they belong to by it."""
    import hashlib

    root = Path(state_dir)
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(f.relative_to(root).as_posix().encode() + b"\0")
        h.update(f.read_bytes())
    return h.hexdigest()


def save_state(method, out_dir: str | Path, params: Params, extra: dict[str, Any] | None = None,
               memory=None) -> Path:
    """Write ``method``'s learned tensors and metadata to ``out_dir`` atomically, staged in ``<out_dir>.saving``
    (a failed save leaves the resume point in ``<out_dir>.resume`` untouched)."""
    from safetensors.torch import save_file  # torch only where tensors are touched: read_info stays light

    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + SAVING)
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / "tensors").mkdir(parents=True)
    for group, tensors in method.tensor_groups().items():
        path = tmp / "tensors" / f"{group}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"group": group})
    if memory is not None:
        memory.save(tmp / "memory.parquet")
    verdict = getattr(method, "verdict", None)  # the real/fake head (lorax.continual.verdict), when fitted
    if verdict is not None:
        extra = {**(extra or {}), "verdict": verdict.save(tmp)}
    sets = getattr(method, "sets", None)  # the prediction sets' calibration (lorax.continual.conformal)
    if sets is not None:
        extra = {**(extra or {}), "sets": sets.save(tmp)}
    info = {
        "format": FORMAT,
        "method": method.name,
        "tasks": list(method.tasks),
        "params": params_to_dict(params),
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        **(extra or {}),
    }
    (tmp / STATE_FILE).write_text(json.dumps(info, indent=2))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir


def load_tensor_groups(state_dir: str | Path) -> dict[str, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    root = Path(state_dir) / "tensors"
    groups = {}
    for f in sorted(root.rglob("*.safetensors")):
        groups[str(f.relative_to(root).with_suffix(""))] = load_file(str(f))
    return groups


def load_state(state_dir: str | Path, device: str | torch.device = "cpu", params: Params | None = None):
    """Rebuild the method saved in ``state_dir`` (settings from its ``state.json`` unless ``params`` given)."""
    from lorax.continual import trace_methods  # noqa: F401  (registers trace, lorax+trace)
    from lorax.continual.methods import build_method

    info = read_info(state_dir)
    if params is None:
        params = parse_params(info["params"], f"{state_dir}/{STATE_FILE}")
    params = params.model_copy(deep=True)
    params.continual.method = info["method"]
    method = build_method(params, info["tasks"])
    method.load_tensor_groups(load_tensor_groups(state_dir))
    from lorax.continual.verdict import Verdict

    method.verdict = Verdict.load(state_dir, info.get("verdict"))
    from lorax.continual.conformal import PredictionSets

    method.sets = PredictionSets.load(state_dir, info.get("sets"))
    return method.to(device), info
