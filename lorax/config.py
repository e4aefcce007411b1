"""Typed, validated settings loaded from ``params.yaml``.

``params.yaml`` is the single source of settings. Every section maps to a pydantic model that forbids unknown
keys, so a typo fails at start with the key's dotted path instead of being silently ignored.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

DEFAULT_PARAMS = Path("params.yaml")


class ConfigError(ValueError):
    """A settings problem, with the offending key and what is allowed."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class ZooConfig(_Section):
    seed: int = 0
    image_size: int = Field(48, ge=16, le=1024)
    train_per_class: int = Field(100, ge=1)
    val_per_class: int = Field(40, ge=1)
    artifact: float = Field(0.3, ge=0.0, le=2.0)  # fingerprint strength (0: upsampling structure only)
    order: list[str] = Field(min_length=1)

    @field_validator("order")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        dup = sorted({g for g in v if v.count(g) > 1})
        if dup:
            raise ValueError(f"generators listed twice: {dup}")
        return v


class DataConfig(_Section):
    source: Literal["builtin", "folder"] = "builtin"
    root: str = "data/zoo"
    layout: Literal["auto", "cddb", "univfd", "genimage"] = "auto"
    manifests: str = "data/manifests"
    bad_file_limit: float = Field(0.05, ge=0.0, le=1.0)
    strict: bool = False
    max_image_pixels: int = Field(89478485, ge=1)
    check_leakage: bool = True
    follow_links: bool = Field(
        False,
        description="symlinks in the dataset may point outside its root (preparation and every manifest reader); "
        "off, such files are quarantined and manifest rows that leave the root are refused. Manifest paths with "
        "'..' or absolute ones are refused either way",
    )


class StreamItem(_Section):
    prev: str


class PretextConfig(_Section):
    """The built-in pretrained backbone (``model.pretrained: pretext``): see lorax/models/pretext.py."""

    n_images: int = Field(3000, ge=64)
    epochs: int = Field(16, ge=1)
    batch_size: int = Field(64, ge=8)
    lr: float = Field(2e-3, gt=0)
    seed: int = 0


class ModelConfig(_Section):
    backbone: str = "convit_tiny"
    pretrained: str | None = None
    img_size: int = Field(32, ge=8, le=1024)
    init_seed: int = 0
    kwargs: dict[str, Any] = Field(default_factory=dict)
    normalize: Literal["auto", "half", "clip", "imagenet"] = "auto"
    pretext: PretextConfig = Field(default_factory=PretextConfig)
    feature_levels: list[int] = Field(
        default_factory=list,
        description="block numbers (1-based) whose output tokens, layer-normed, add their first (class) token and "
        "mean patch token to every embedding, besides the pooled last block: generators' low-level traces live in "
        "early blocks (docs/results.md, real images). [] = the pooled last block only",
    )

    @field_validator("feature_levels")
    @classmethod
    def _levels(cls, v: list[int]) -> list[int]:
        if any(b < 1 for b in v) or len(set(v)) != len(v):
            raise ValueError(f"block numbers must be distinct and >= 1, got {v}")
        return sorted(v)


class MoleAdapterConfig(_Section):
    shared_rank: int = Field(8, ge=0)
    expert_ranks: list[int] = Field(default_factory=lambda: [4, 8, 16], min_length=1)
    balance_weight: float = Field(0.01, ge=0.0)


class AdapterConfig(_Section):
    kind: Literal["lora", "mole"] = "lora"
    target_modules: str = r".*\.attn\.(qk|v|qkv|proj|pos_proj)$"
    r: int = Field(64, ge=1)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    blocks: Literal["all", "last_k"] = "all"
    last_k: int = Field(3, ge=1)
    mole: MoleAdapterConfig = Field(default_factory=MoleAdapterConfig)

    @field_validator("target_modules")
    @classmethod
    def _regex(cls, v: str) -> str:
        try:
            re.compile(v)
        except re.error as e:
            raise ValueError(f"not a valid regular expression: {e}") from e
        return v


class ContinualConfig(_Section):
    method: str = "lorax"
    memory_size: int = Field(500, ge=0)
    memory_mode: Literal["fixed_total", "fixed_per_class"] = "fixed_total"
    memory_per_class: int = Field(20, ge=0)
    selection: Literal["herding", "random", "closest"] = "herding"
    diversity_weight: float = Field(0.1, ge=0.0)
    # after each task, refit the class head on the standardised super-features of the task's train rows + memory
    # (lorax/continual/head.py): linear = off (the AdamW-trained head) | refit (logistic regression) | ncm
    head: Literal["linear", "refit", "ncm"] = "linear"
    head_c: float = Field(1.0, gt=0)  # refit: inverse L2 strength (C * sum CE + |W|^2 / 2, scikit-learn's C)
    head_max_iter: int = Field(300, ge=1)  # refit: L-BFGS iterations


class TrainConfig(_Section):
    epochs: int = Field(8, ge=1)
    batch_size: int = Field(32, ge=1)
    lr_first: float = Field(1e-3, gt=0)
    lr_later: float = Field(1e-3, gt=0)
    lr_scale_batch: bool = False
    backbone_lr_scale: float = Field(0.03, gt=0)  # lr of a trainable backbone (finetune, joint, DER) / lr
    weight_decay: float = Field(1e-6, ge=0)
    warmup_epochs: int = Field(1, ge=0)
    grad_clip: float | None = Field(1.0, gt=0)
    amp: bool = True
    num_workers: int = Field(0, ge=0)
    device: str = "auto"
    one_pass: bool = True
    feature_cache: bool = False
    feature_cache_crops: int = Field(2, ge=1)  # fixed crops per training image per task when feature_cache is on
    trunk_cache: bool = Field(
        False,
        description="with adapter.blocks last_k: the frozen blocks below the first adapter run once per fixed "
        "crop, their tokens kept on disk (fp16, content-addressed) and reused by every epoch, task, run and "
        "evaluation (lorax/continual/trunk_cache.py); training then uses train.feature_cache_crops fixed crops "
        "per image. No effect with adapter.blocks all (no frozen trunk). Off by default: it changes the crops",
    )
    trunk_cache_dir: str = Field(
        "cache/trunk", description="where the trunk cache lives (relative paths: from the working directory, like "
        "decode_cache_dir); a cache: safe to delete, never a DVC output",
    )
    crop_seed: Literal["auto", "task", "content"] = Field(
        "auto",
        description="how the fixed training crops (feature_cache, trunk_cache) are drawn: task (from seed and task "
        "index: new crops every task), content (from the image's sha256: the same feature_cache_crops crops of an "
        "image in every task and run, so its cached trunk tokens are reused; fixed from the first task on), auto "
        "(content when the trunk cache is used, else task)",
    )
    decode_cache: bool = False  # decode images once into a uint8 memory-mapped cache (lorax.data.cache)
    decode_cache_dir: str = "cache/decoded"
    decode_cache_max_mb: float = Field(4096, ge=0)  # larger datasets are read from their files as usual

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", v):
            raise ValueError("allowed: auto | cpu | cuda | cuda:N")
        return v


class ResampleControl(_Section):
    """The resampling shortcut control: every evaluated image is also scored after being resized by ``scale`` (the
    decoded image, before cropping; the crop size is kept), so a model that learned "resampled means real" is caught
    (e.g. ../shared/data/realworld, whose real photos were all resampled and four of its fake sets were not)."""

    scale: float = Field(0.9375, gt=0.0, le=4.0)  # 0.9375: 256 -> 240 px
    filter: Literal["lanczos", "bicubic", "bilinear"] = "lanczos"

    @field_validator("scale")
    @classmethod
    def _not_one(cls, v: float) -> float:
        if v == 1.0:
            raise ValueError("1.0 would not resample; use e.g. 0.9375 (256 -> 240 px), or set resample_control: null")
        return v


class EvalConfig(_Section):
    batch_size: int = Field(128, ge=1)
    crops: int = Field(1, ge=1)
    embedding_cache: bool = True
    embedding_cache_dir: str = "cache/embeddings"
    # null: off; else every evaluation is reported twice, as is and resampled (metrics ``control.resampled.*``)
    resample_control: ResampleControl | None = None


class GateConfig(_Section):
    aaf_tolerance: float = Field(2.0, ge=0)
    max_task_drop: float = Field(10.0, ge=0)


class TrackingConfig(_Section):
    uri: str | None = None
    artifact_root: str = "mlartifacts"
    experiment: str = "lorax-{scenario}"
    scenario: str = "zoo-5"
    registered_model: str = "lorax-attributor"
    gate: GateConfig = Field(default_factory=GateConfig)
    # where ``uri`` came from, for messages ("tracking.uri in params.yaml", "-S tracking.uri=..."); set by load_params
    _uri_origin: str | None = PrivateAttr(default=None)

    @property
    def uri_origin(self) -> str | None:
        return self._uri_origin


class DetectConfig(_Section):
    method: Literal["mole", "probe", "shared", "separate"] = "mole"
    train_tasks: list[str] = Field(default_factory=lambda: ["deconv"], min_length=1)
    blocks: int = Field(3, ge=0)
    where: Literal["mlp", "attn", "both"] = "mlp"
    shared_rank: int = Field(8, ge=0)
    expert_ranks: list[int] = Field(default_factory=lambda: [4, 8, 16])
    balance_weight: float = Field(0.01, ge=0)
    lr: float = Field(6e-4, gt=0)
    epochs: int = Field(4, ge=1)
    batch_size: int = Field(32, ge=1)
    aug_prob: float = Field(0.1, ge=0, le=1)
    blur_sigmas: list[float] = Field(default_factory=lambda: [1, 2, 3, 4])
    jpeg_qualities: list[int] = Field(default_factory=lambda: [90, 70, 50, 30])
    model: ModelConfig | None = None  # the detector's own backbone (a model section); None = the model section


class Params(_Section):
    seed: int = 0
    zoo: ZooConfig
    data: DataConfig = Field(default_factory=DataConfig)
    stream: dict[str, StreamItem] = Field(min_length=1)
    model: ModelConfig = Field(default_factory=ModelConfig)
    adapter: AdapterConfig = Field(default_factory=AdapterConfig)
    continual: ContinualConfig = Field(default_factory=ContinualConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    detect: DetectConfig = Field(default_factory=DetectConfig)

    @property
    def tasks(self) -> list[str]:
        """Task names in stream order; task i owns classes 2i (real) and 2i+1 (fake)."""
        return list(self.stream)

    @model_validator(mode="after")
    def _cross_checks(self) -> Params:
        tasks = list(self.stream)
        for i, (name, item) in enumerate(self.stream.items()):
            want = "init" if i == 0 else tasks[i - 1]
            if item.prev != want:
                raise ValueError(
                    f"stream.{name}.prev: is {item.prev!r}, must be {want!r} (each task names the one before it; "
                    f"the first names 'init')"
                )
        if self.data.source == "builtin":
            unknown = [t for t in tasks if t not in self.zoo.order]
            if unknown:
                raise ValueError(f"stream: {unknown} are not zoo generators; allowed: {self.zoo.order}")
            if self.model.img_size > self.zoo.image_size:
                raise ValueError(
                    f"model.img_size: crop {self.model.img_size} is larger than the images "
                    f"(zoo.image_size={self.zoo.image_size}); allowed: <= {self.zoo.image_size}"
                )
        n_classes = 2 * len(tasks)
        if self.continual.memory_mode == "fixed_total" and 0 < self.continual.memory_size < n_classes:
            raise ValueError(
                f"continual.memory_size: {self.continual.memory_size} is fewer than the {n_classes} classes of the "
                f"stream; allowed: 0 (no memory) or >= {n_classes}"
            )
        if self.adapter.blocks == "last_k" and "depth" in self.model.kwargs:
            if self.adapter.last_k > int(self.model.kwargs["depth"]):
                raise ValueError(
                    f"adapter.last_k: {self.adapter.last_k} exceeds model depth {self.model.kwargs['depth']}"
                )
        return self


MAX_SHOWN = 80  # characters of a bad value quoted in a message: a whole section is never dumped


def _show(value: Any, quote: bool = True) -> str:
    text = value if isinstance(value, str) and not quote else repr(value)
    return text if len(text) <= MAX_SHOWN else text[: MAX_SHOWN - 3] + "..."


def _override_for(key: str, overrides: dict[str, Any]) -> str | None:
    """The ``-S KEY=VALUE`` that set ``key`` (or a section above or below it), if any."""
    for k, v in overrides.items():
        if key and (key == k or key.startswith(k + ".") or k.startswith(key + ".")):
            return f"{k}={_show(v, quote=False)}"
    return None


def _format_errors(err: ValidationError, source: str, overrides: dict[str, Any] | None = None) -> str:
    """Short lines (one per problem; one line for one problem) naming the key, the bad value and where it was set."""
    items: list[tuple[str, str, str | None]] = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        msg = re.sub(r"^(Value error|Assertion failed), ", "", e["msg"])
        if not key:  # a cross-check of the whole file: its message starts with the key it is about
            lead = re.match(r"([\w.]+): ", msg)
            key, msg = (lead.group(1), msg[lead.end():]) if lead else ("", msg)
        elif e["type"] == "extra_forbidden":
            msg = "unknown key (remove it or check its spelling)"
        elif "input" in e and e["type"] != "missing":
            msg = f"{msg} (got {_show(e['input'])})"
        items.append((key, msg, _override_for(key, overrides or {})))
    if len(items) == 1:
        key, msg, by = items[0]
        return f"invalid settings {f'from -S {by}' if by else f'in {source}'}: {key + ': ' if key else ''}{msg}"
    head = f"invalid settings in {source}{' and its -S overrides' if any(by for *_, by in items) else ''}:"
    return "\n".join([head] + [f"  {key or '(top level)'}: {msg}{f' (from -S {by})' if by else ''}"
                                for key, msg, by in items])


def set_by_path(raw: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``a.b.c`` in a nested dict (used for ``-S key=value`` style overrides)."""
    node = raw
    parts = dotted.split(".")
    for i, p in enumerate(parts[:-1]):
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: {'.'.join(parts[: i + 1])} is a value, not a section; set it directly")
    node[parts[-1]] = value


def parse_params(raw: dict[str, Any], source: str = "params", overrides: dict[str, Any] | None = None) -> Params:
    """Validate a raw mapping; errors name every bad key (and the ``-S`` override that set it, if one did)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source, overrides)) from None


def load_params(path: str | Path = DEFAULT_PARAMS, overrides: dict[str, Any] | None = None) -> Params:
    """Read ``params.yaml`` (plus dotted-key overrides) into validated :class:`Params`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: settings file not found; pass --params PATH or run from the project root")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    raw = copy.deepcopy(raw)
    overrides = overrides or {}
    for k, v in overrides.items():
        try:
            set_by_path(raw, k, v)
        except ConfigError as e:
            raise ConfigError(f"invalid settings from -S {k}={_show(v, quote=False)}: {e}") from None
    params = parse_params(raw, str(path), overrides)
    by = _override_for("tracking.uri", overrides)
    params.tracking._uri_origin = f"-S {by}" if by else f"tracking.uri in {path}"
    return params


def params_to_dict(p: Params) -> dict[str, Any]:
    return p.model_dump(mode="json")


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{'a': {'b': 1}} -> {'a.b': 1}`` (for MLflow params)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
