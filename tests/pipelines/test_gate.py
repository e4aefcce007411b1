"""Where the gate keeps a champion it had to fetch from the registry: the cache folder (``cache.dir`` or
``$LORAX_CACHE_DIR``), like every other cached thing, and reused by the next gate."""

from __future__ import annotations

from pathlib import Path

from pipelines import gate
from pipelines.layout import Layout
from tests.helpers import tiny_params


def test_a_fetched_champion_lands_in_the_cache_folder_and_is_reused(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("LORAX_CACHE_DIR", str(tmp_path / "far" / "cache"))
    params = tiny_params(tmp_path, cache__dir=None)
    layout = Layout.from_params(params, tmp_path / "project")
    fetched: list[Path] = []

    def download(before, dest):  # the registry's copy of the champion's state (MLflow itself: test_model_registry)
        fetched.append(Path(dest))
        state = Path(dest) / "state" / "deconv"
        state.mkdir(parents=True)
        return state, {}

    monkeypatch.setattr(gate, "download_version", download)
    before = {"version": "3", "state_id": "ab" * 16, "tasks": ["deconv"]}  # no local state of that content
    first = gate.champion_state(layout, before, params)
    assert first.is_dir() and first.is_relative_to(tmp_path / "far" / "cache" / "registry")
    assert gate.champion_state(layout, before, params) == first and len(fetched) == 1  # the next gate reuses it
