"""lorax/config.py is the one source of settings' defaults: params.yaml states them, params.realworld.yaml marks
every deviation, and every field says what it means."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from lorax.config import ConfigError, Params, load_params, params_to_dict, parse_params
from pipelines.tracking.flat import flatten

REPO = Path(__file__).resolve().parents[1]

# Keys of params.yaml that are the project's own data, not settings with a default: they may differ from it.
PROJECT_DATA = {
    "stream": "the project's tasks, in order (no default: required)",
    "tracking.scenario": "names the stream (zoo-5: its five zoo tasks), so it follows the stream when a task is added",
}


def _defaults() -> dict[str, Any]:
    """Every default, flattened (``a.b.c``), from a params file that gives nothing but a stream (required)."""
    d = flatten(params_to_dict(parse_params({"stream": {"deconv": {"prev": "init"}}})))
    return {k: v for k, v in d.items() if not k.startswith("stream.")}


def _covered(key: str, allowed: set[str] | dict[str, str]) -> bool:
    """``key`` or a section above it is in ``allowed``."""
    parts = key.split(".")
    return any(".".join(parts[:i]) in allowed for i in range(1, len(parts) + 1))


def _deviations(path: Path) -> dict[str, tuple[Any, Any]]:
    """Flat keys whose value in ``path`` (loaded and validated) differs from the default: key -> (value, default)."""
    values = flatten(params_to_dict(load_params(path)))
    defaults = _defaults()
    return {k: (values.get(k), defaults.get(k)) for k in sorted(set(values) | set(defaults))
            if values.get(k, "<absent>") != defaults.get(k, "<absent>")}


def test_params_yaml_equals_the_defaults():
    bad = {k: v for k, v in _deviations(REPO / "params.yaml").items() if not _covered(k, PROJECT_DATA)}
    assert not bad, ("params.yaml and the defaults in lorax/config.py disagree (key: (params.yaml, default)); change "
                     f"both together: {bad}")


def test_params_yaml_states_every_setting():
    """params.yaml is the complete, commented reference of what runs: no field is left to its default silently."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    stated = flatten(raw)
    missing = [k for k in _defaults() if not _covered(k, set(stated)) and k not in stated]
    assert not missing, f"fields missing from params.yaml: {missing}"


def _models(model: type[BaseModel], seen: set[type[BaseModel]] | None = None) -> set[type[BaseModel]]:
    """``model`` and every section model reachable from its fields."""
    seen = set() if seen is None else seen
    seen.add(model)
    for field in model.model_fields.values():
        args = [field.annotation, *getattr(field.annotation, "__args__", ())]
        for a in args:
            for t in [a, *getattr(a, "__args__", ())]:
                if isinstance(t, type) and issubclass(t, BaseModel) and t not in seen:
                    _models(t, seen)
    return seen


def test_every_field_is_documented():
    models = _models(Params)
    assert {m.__name__ for m in models} >= {"ZooConfig", "DataConfig", "StreamItem", "ModelConfig", "PretextConfig",
                                            "AdapterConfig", "MoleAdapterConfig", "ContinualConfig", "TrainConfig",
                                            "EvalConfig", "ResampleControl", "TrackingConfig", "GateConfig",
                                            "DetectConfig", "TuneConfig"}
    undocumented = sorted(f"{m.__name__}.{name}" for m in models for name, f in m.model_fields.items()
                          if not (f.description or "").strip())
    assert not undocumented, f"fields without a description: {undocumented}"


def test_zoo_order_default_is_the_generators():
    from lorax.data.zoo_generators import GENERATORS

    assert parse_params({"stream": {"deconv": {"prev": "init"}}}).zoo.order == list(GENERATORS)


def test_stream_is_required():
    with pytest.raises(ConfigError, match="stream"):
        parse_params({})


REALWORLD_MARK = re.compile(r"#\s*realworld:")
KEY = re.compile(r"^(\s*)([A-Za-z_][\w-]*)\s*:")


def _marked_keys(text: str) -> set[str]:
    """Dotted keys marked ``# realworld: ...``: on the key's own line, or on a comment line just above the key."""
    marked: set[str] = set()
    stack: list[tuple[int, str]] = []  # (indent, key) of the enclosing keys
    pending = False  # a full-line realworld comment marks the next key
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            if line[: len(line) - len(line.lstrip())] == "" or not stack:
                pending = pending or bool(REALWORLD_MARK.search(line))
            continue
        m = KEY.match(line)
        if not m:
            continue
        indent = len(m.group(1))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, m.group(2)))
        if pending or REALWORLD_MARK.search(line):
            marked.add(".".join(k for _, k in stack))
        pending = False
    return marked


def test_marked_keys_parser():
    text = "a: 1\nb:\n  c: 2   # realworld: x\n  d: 3\n# realworld: y\ne:\n  f: 1\ng:  # realworld: z\n  h: 1\n"
    assert _marked_keys(text) == {"b.c", "e", "g"}


def test_realworld_profile_deviates_only_where_marked():
    """params.realworld.yaml loads, and each value that differs from the default carries a ``# realworld:`` mark
    (on its line, a section's line, or the comment line just above); each mark is a real deviation."""
    path = REPO / "params.realworld.yaml"
    marked = _marked_keys(path.read_text())
    dev = _deviations(path)
    unmarked = {k: v for k, v in dev.items() if not _covered(k, marked)}
    assert not unmarked, f"{path.name}: deviations from the defaults without a '# realworld:' mark: {unmarked}"
    stale = [k for k in marked if not any(d == k or d.startswith(k + ".") for d in dev)]
    assert not stale, f"{path.name}: '# realworld:' marks on values equal to the defaults: {stale}"
    assert {k.split(".")[0] for k in marked} >= {"data", "stream", "model", "adapter", "eval", "tracking",
                                                 "detect"}


@pytest.mark.parametrize("share", [1.0, -0.1, 2])
def test_calibration_share_out_of_range_names_the_key(share):
    with pytest.raises(ConfigError, match=r"continual\.calibration_share"):
        parse_params({"stream": {"deconv": {"prev": "init"}}, "continual": {"calibration_share": share}})
