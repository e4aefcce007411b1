"""The ``tune:`` section (``lorax tune``): which settings are chosen on the user's own data, over which candidates,
by which protocol. Kept beside :mod:`lorax.config`, which assembles it into ``Params`` and checks that every grid key
names a setting of the schema (:func:`schema_key_problem`)."""

from __future__ import annotations

from typing import Any, Literal, get_args

from pydantic import BaseModel, Field, field_validator

from lorax.settings_base import Section

# tune.metric -> the key of metrics.json it reads (higher is better); ``coverage`` is derived from the per-task set
# coverage instead (pipelines.tune.fold_metric)
METRIC_KEYS = {"pooled": "pooled_acc", "aa": "aa", "balanced": "balanced_acc"}
# top-level sections a grid may not name: the stream is the project's data, tune is the search itself
NOT_TUNABLE = {"stream": "the stream is the project's data, not a setting", "tune": "tune: is the search itself"}


def default_grid() -> dict[str, list[Any]]:
    return {"model.img_size": [28, 42], "adapter.blocks": ["all", "last_k"]}


class TuneConfig(Section):
    """Grouped cross-validation on the train split of the stream's first tasks (``lorax tune``; val is never read)."""

    tasks: int = Field(2, ge=1, description="the first N tasks of the stream are tuned on (all when it is shorter)")
    folds: int = Field(3, ge=2, description="grouped folds of the tuned tasks' train rows (a source/prompt group is "
                       "never on both sides, lorax/data/groups.py); each fold's held-out rows play val")
    metric: Literal["pooled", "aa", "balanced", "coverage"] = Field(
        "pooled", description="what is maximised, averaged over the folds: pooled (multi-real accuracy after the last "
        "tuned task) | aa (average accuracy) | balanced (the verdict's balanced accuracy) | coverage (the prediction "
        "sets: each task's held-out set coverage after the last tuned task, capped at continual.set_coverage, "
        "averaged over the tasks; ties: higher pooled); ties: fewer seconds")
    search: Literal["auto", "product", "coordinate"] = Field(
        "auto", description="product: every combination of the grid | coordinate: one key at a time from the params' "
        "own values, keeping each key's best | auto: product when it has at most max_runs combinations")
    max_runs: int = Field(8, ge=1, description="search auto: the largest full product run (combinations; each runs "
                          "once per fold)")
    grid: dict[str, list[Any]] = Field(
        default_factory=default_grid, min_length=1,
        description="dotted setting key -> candidate values, e.g. {model.img_size: [112, 224], train.views: [1, 2]}; "
        "any setting of the schema but stream and tune")

    @field_validator("grid")
    @classmethod
    def _candidates(cls, v: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for key, values in v.items():
            if not values:
                raise ValueError(f"{key}: no candidate values; give a list of at least one, e.g. {key}: [a, b]")
            seen: list[Any] = []
            for value in values:
                if value in seen:
                    raise ValueError(f"{key}: {value!r} is listed twice")
                seen.append(value)
        return v


def _section_of(annotation: Any) -> tuple[type[BaseModel] | None, bool]:
    """(the section model an annotation holds, whether it is a free mapping such as ``model.kwargs``)."""
    for t in [annotation, *get_args(annotation)]:
        if isinstance(t, type) and issubclass(t, BaseModel):
            return t, False
    free = any(t is dict or getattr(t, "__origin__", None) is dict for t in [annotation, *get_args(annotation)])
    return None, free


def schema_key_problem(model: type[BaseModel], dotted: str) -> str | None:
    """Why ``dotted`` is not a setting of ``model`` (the schema's ``Params``), or None when it is one."""
    parts = dotted.split(".")
    if parts[0] in NOT_TUNABLE:
        return f"{dotted!r} cannot be tuned ({NOT_TUNABLE[parts[0]]})"
    node: type[BaseModel] | None = model
    for i, part in enumerate(parts):
        where = ".".join(parts[:i]) or "the top level"
        if node is None:
            return f"unknown setting {dotted!r}: {where} is a value, not a section; name it whole"
        fields = node.model_fields
        if part not in fields:
            return (f"unknown setting {dotted!r}: no {part!r} in {where} (there: {', '.join(fields)}); use a dotted "
                    f"key of params.yaml, e.g. model.img_size")
        node, free = _section_of(fields[part].annotation)
        if free and i < len(parts) - 1:  # a free mapping (model.kwargs): any key below it
            return None
    return None
