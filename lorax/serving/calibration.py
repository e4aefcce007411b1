"""``lorax calibrate``: a trained state's open-set calibration, computed with the :class:`Predictor` and stored.

It sits above both :mod:`lorax.serving.predict` (which reads a stored calibration through
:mod:`lorax.serving.openset`) and :mod:`lorax.serving.openset` (the statistics; its ``calibrate`` takes any object
with ``predict``): the one place that loads a Predictor to calibrate, so the imports run one way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lorax.serving.openset import calibrate, check_manifests, store_calibration
from lorax.serving.predict import Predictor


def calibrate_state(state_dir: str | Path, manifests_dir: str | Path | None = None, out_dir: str | Path | None = None,
                    device: str = "auto", require_fake: bool = False, predictor: Any = None) -> Path:
    """Calibrate ``state_dir`` on its tasks' manifests and store the result (default ``<state_dir>.openset``).

    ``manifests_dir`` defaults to the ``data.manifests`` the state was trained with; ``predictor``: the state already
    loaded, else it is loaded here.
    """
    from lorax.continual.state import read_info
    from lorax.data.manifest import load_stream_manifests

    info = read_info(state_dir)
    mdir = Path(manifests_dir or info["params"]["data"]["manifests"])
    check_manifests(mdir, info["tasks"])
    predictor = predictor or Predictor.from_state(state_dir, device=device, openset=None)
    links = bool(info["params"]["data"].get("follow_links", False))  # the data setting the state was trained with
    stats = calibrate(predictor, load_stream_manifests(mdir, info["tasks"]), require_fake=require_fake,
                      follow_links=links)
    return store_calibration(stats, state_dir, mdir, out_dir)
