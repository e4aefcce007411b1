"""The settings schema: typed, validated settings, the one source of their defaults and of what each one means, and
their loading (``params.yaml`` plus dotted-key overrides) with one-line errors.

Every section of ``params.yaml`` maps to a pydantic model that forbids unknown keys (:class:`lorax.settings_base.
Section`), so a typo fails at start with the key's dotted path instead of being silently ignored. The sections live
here, except the backbone's (:mod:`lorax.models.config`), the detector's (:mod:`lorax.detect.config`), kept beside
their code, and ``lorax tune``'s (:mod:`lorax.tune_config`); :class:`Params` assembles them all. Each field's default is what the project runs with and its
``description`` says what it means; ``params.yaml`` states the same values (with short comments) and
tests/test_config.py fails when the two disagree or a field is undocumented. Change a default in its section and in
``params.yaml`` together. Command-line arguments (``--params``, ``-S``) are read in ``pipelines/cli/settings.py``,
MLflow's flat keys made in ``pipelines/tracking/flat.py``. (Over 350 lines: every field carries its own
documentation.)
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, PrivateAttr, ValidationError, field_validator, model_validator

from lorax.detect.config import DetectConfig
from lorax.models.config import ModelConfig
from lorax.settings_base import Section
from lorax.tune_config import TuneConfig, schema_key_problem

DEFAULT_PARAMS = Path("params.yaml")

# The built-in generators in their canonical order (lorax/data/zoo_generators.py GENERATORS; tests/test_config.py
# checks they agree): scenario "zoo-N" is the first N.
ZOO_ORDER = ["deconv", "nnconv", "bilinconv", "pixshuf", "deconv3", "bicubconv", "nnconv4", "pixshuf4", "deconv2x",
             "dilconv"]


# continual.cross_fit: the methods whose newest task trains a new producer (an adapter, a trace expert, or both)
CROSS_FIT_METHODS = ("lorax", "lorax+trace", "trace")


class ConfigError(ValueError):
    """A settings problem, with the offending key and what is allowed."""


class ZooConfig(Section):
    """The built-in generator zoo (docs/design.md section 5), synthesised when ``data.source`` is builtin."""

    seed: int = Field(0, description="seed of the whole zoo: each generator's decoder and real domain are a pure "
                      "function of (seed, task name)")
    image_size: int = Field(48, ge=16, le=1024, description="side of every synthesised image (px)")
    train_per_class: int = Field(100, ge=1, description="images per class (real, fake) per task in the train split")
    val_per_class: int = Field(40, ge=1, description="images per class (real, fake) per task in the val split")
    artifact: float = Field(0.3, ge=0.0, le=2.0, description="generator fingerprint strength: random-readout std / "
                            "image std (0: the upsampling structure only)")
    order: list[str] = Field(default_factory=lambda: list(ZOO_ORDER), min_length=1,
                             description="generators in canonical order: scenario zoo-N is the first N and "
                             "`lorax stream add --next` takes the next one not in the stream")

    @field_validator("order")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        dup = sorted({g for g in v if v.count(g) > 1})
        if dup:
            raise ValueError(f"generators listed twice: {dup}")
        return v


class DataConfig(Section):
    source: Literal["builtin", "folder"] = Field(
        "builtin", description="builtin: the zoo, synthesised under root; folder: an existing dataset under root")
    root: str = Field("data/zoo", description="dataset root, one folder per task (CDDB layout for builtin; see layout "
                      "for folder); relative paths: from the project root")
    layout: Literal["auto", "cddb", "univfd", "genimage"] = Field(
        "auto", description="folder layout of a folder dataset (lorax/data/layouts.py); auto: detected per task")
    manifests: str = Field("data/manifests", description="where preparation writes one parquet manifest per task "
                           "(training reads only these, never the folders)")
    bad_file_limit: float = Field(0.05, ge=0.0, le=1.0, description="share of bad (quarantined) files per task above "
                                  "which preparation fails")
    strict: bool = Field(False, description="any bad file is fatal (else bad files are quarantined, up to "
                         "bad_file_limit)")
    max_image_pixels: int = Field(89478485, ge=1, description="images with more pixels are rejected as decompression "
                                  "bombs (89478485: Pillow's own limit)")
    check_leakage: bool = Field(True, description="the same content (sha256) in train and val, or in two tasks, is an "
                                "error")
    follow_links: bool = Field(
        False,
        description="symlinks in the dataset may point outside its root (preparation and every manifest reader); "
        "off, such files are quarantined and manifest rows that leave the root are refused. Manifest paths with "
        "'..' or absolute ones are refused either way",
    )


class StreamItem(Section):
    prev: str = Field(description="the task before this one in the stream ('init' for the first): each task names "
                      "its predecessor so DVC's foreach stages chain")


class MoleAdapterConfig(Section):
    """Mixture-of-LoRA-experts adapters (``adapter.kind: mole``)."""

    shared_rank: int = Field(8, ge=0, description="rank of the LoRA that is always on (0: none)")
    expert_ranks: list[int] = Field(default_factory=lambda: [4, 8, 16], min_length=1,
                                    description="ranks of the routed experts (top-1 per token), one per expert")
    balance_weight: float = Field(0.01, ge=0.0, description="weight of the router's load-balancing loss")


class AdapterConfig(Section):
    """One adapter per task on the frozen backbone (LoRAX: peft-style LoRA, r=64, alpha=0.25*r in the paper)."""

    kind: Literal["lora", "mole"] = Field("lora", description="lora | mole (mixture of LoRA experts, see mole)")
    target_modules: str = Field(r".*\.attn\.(qk|v|qkv|proj|pos_proj)$", description="regex full-matched against "
                                "module names: the Linear layers that get an adapter (ConViT GPSA and MHSA, ViT)")
    r: int = Field(64, ge=1, description="LoRA rank")
    alpha: float = Field(16.0, gt=0, description="LoRA scaling alpha (update scaled by alpha / r; paper: 0.25 * r)")
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="dropout on the LoRA input")
    blocks: Literal["all", "last_k"] = Field(
        "all", description="all: adapters in every block | last_k: only in the last last_k blocks, so the frozen "
        "blocks below are one shared trunk")
    last_k: int = Field(3, ge=1, description="with blocks last_k: how many of the last blocks get adapters")
    mole: MoleAdapterConfig = Field(default_factory=MoleAdapterConfig, description="used when kind is mole")

    @field_validator("target_modules")
    @classmethod
    def _regex(cls, v: str) -> str:
        try:
            re.compile(v)
        except re.error as e:
            raise ValueError(f"not a valid regular expression: {e}") from e
        return v


class TraceConfig(Section):
    """Trace experts (methods ``trace`` and ``lorax+trace``; lorax/models/trace.py): per task a small residual CNN on a
    fixed high-pass of ``patches`` patches of ``patch`` px read at the image's native resolution (never resized)."""

    patch: int = Field(64, ge=4, description="patch side in px, cut from the decoded image at native resolution "
                       "(an image smaller than this is mirror-padded at its bottom / right, never resized)")
    patches: int = Field(16, ge=1, description="patches per image: drawn from the image's content per training view, "
                         "a fixed grid in evaluation; the image embedding is their mean")
    width: int = Field(32, ge=1, description="channels of the first convolutions (doubled at each downsampling block)")
    depth: int = Field(2, ge=1, description="residual blocks after the stem (each two 3x3 convolutions; every block "
                       "after the first halves the resolution)")
    dim: int = Field(64, ge=1, description="width of one expert's image embedding")
    sigma: float = Field(1.0, gt=0, description="Gaussian sigma of the fixed high-pass (image minus its blur)")


class ContinualConfig(Section):
    method: str = Field("lorax", description="continual method: lorax | finetune | der | joint | probe | trace | "
                        "lorax+trace (lorax/continual/methods.py, lorax/continual/trace_methods.py)")
    memory_size: int = Field(500, ge=0, description="total exemplar budget M (paper: 500, 1000 or 1500; 0: no "
                             "memory)")
    memory_mode: Literal["fixed_total", "fixed_per_class"] = Field(
        "fixed_total", description="fixed_total: memory_size split evenly over the classes seen | fixed_per_class: "
        "memory_per_class exemplars per class")
    memory_per_class: int = Field(20, ge=0, description="exemplars per class when memory_mode is fixed_per_class")
    replay_size: int | None = Field(
        None, ge=1, description="exemplars a task's gradient training replays: the first by rank of each class, "
        "replay_size // classes each (each kind in proportion, as when the memory shrinks); the whole memory still "
        "feeds the head refit, the verdict and the prediction sets, at the cost of one forward pass of the newest "
        "adapter / expert per memory row. So a memory larger than the training can afford still shows the head "
        "more of every old class (docs/results.md \"A larger memory for the head\"). null: the whole memory")
    selection: Literal["herding", "random", "closest"] = Field(
        "herding", description="how exemplars are chosen: herding (iCaRL) | random | closest (to the class mean)")
    calibration_share: float = Field(
        0.3, ge=0.0, lt=1.0, description="share of each class's exemplar slots drawn at random (not by the "
        "selection) when the class is learned, kept proportionally when the memory shrinks: an old class's "
        "prediction sets are calibrated on these rows alone, which are exchangeable with its test images "
        "(lorax/continual/memory.py; 0: every slot selected, sets calibrated on all memory rows as before)")
    diversity_weight: float = Field(0.1, ge=0.0, description="w in loss = CE(head) + w * CE(diversity head)")
    head: Literal["linear", "refit", "lda", "ncm"] = Field(
        "linear", description="the class head after each task: linear (the AdamW-trained head as is) | refit (refit "
        "as a logistic regression on the standardised super-features of the task's train rows + memory; "
        "lorax/continual/head.py) | lda (refit as shrinkage LDA: one covariance pooled over the classes) | ncm "
        "(nearest class mean)")
    head_c: float = Field(1.0, gt=0, description="refit: inverse L2 strength C (C * sum CE + |W|^2 / 2, "
                          "scikit-learn's C)")
    head_max_iter: int = Field(300, ge=1, description="refit: L-BFGS iterations")
    verdict: Literal["binary", "argmax"] = Field(
        "binary", description="the real/fake decision: binary (a class-balanced logistic head on the super-feature, "
        "fitted with the class head on the task's train rows + memory, its threshold cross-fitted there for best "
        "balanced accuracy and stored with the model; lorax/continual/verdict.py) | argmax (the kind of the most "
        "probable class)")
    set_coverage: float | None = Field(
        0.9, ge=0.0, lt=1.0, description="prediction sets: every answer carries the labels (generators, real) it "
        "cannot rule out at this coverage, calibrated class by class (split-conformal) on cross-fitted "
        "probabilities of the task's train rows + memory and stored with the model; lorax/continual/conformal.py "
        "(null or 0: off)")
    cross_fit: int = Field(
        0, description="cross-fitted heads: k >= 2 trains k extra copies of the newest task's adapter / trace expert, "
        "each on k - 1 grouped folds (lorax.data.groups.row_groups) of the task's train rows + memory, and the head "
        "refit, the verdict and the prediction sets are fitted on the super-features whose newest slice comes from "
        "the copy that never saw the row (out of fold); the saved model is the full-data one. Needs continual.head "
        "refit | lda | ncm and a method whose tasks train a producer (lorax, lorax+trace, trace); lorax/continual/"
        "cross_fit.py (0: off)")

    @field_validator("cross_fit")
    @classmethod
    def _cross_fit_folds(cls, v: int) -> int:
        if v == 1 or v < 0:
            raise ValueError(f"{v} is not a number of folds; allowed: 0 (off) or k >= 2")
        return v


class TrainConfig(Section):
    epochs: int = Field(8, ge=0, description="epochs per task (0: no gradient training; with continual.head refit "
                        "the head is then only fitted in closed form, e.g. the frozen probe)")
    batch_size: int = Field(32, ge=1, description="training batch size (global, across DDP ranks)")
    lr_first: float = Field(1e-3, gt=0, description="learning rate of the first task (paper: 1e-4, scaled by "
                            "batch/512 when lr_scale_batch)")
    lr_later: float = Field(1e-3, gt=0, description="learning rate of every later task (paper: 5e-4)")
    lr_scale_batch: bool = Field(False, description="multiply the lr by batch_size/512 (paper); off for the small "
                                 "default model (docs/results.md)")
    backbone_lr_scale: float = Field(0.03, gt=0, description="a trainable backbone (finetune, joint, DER) trains at "
                                     "this times the lr")
    weight_decay: float = Field(1e-6, ge=0, description="AdamW weight decay")
    warmup_epochs: int = Field(1, ge=0, description="linear warmup epochs before the cosine schedule")
    grad_clip: float | None = Field(1.0, gt=0, description="max gradient norm (null: no clipping)")
    amp: bool = Field(True, description="bf16 autocast (CUDA only)")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes (0: load in the training process)")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N (auto: cuda when available)")
    one_pass: bool = Field(True, description="all adapters in one batched pass (same result as the sequential loop)")
    views: int = Field(
        2, ge=0, description="fixed training views per image (a random crop and flip drawn from the image's content, "
        "so the same in every task and run); each epoch trains on one of them. LoRAX then pushes each view through "
        "its frozen trunk and old adapters once (lorax/features/store.py) and a step runs only the newest adapter. "
        "Raise it towards epochs for more augmentation; 0: a fresh random crop every epoch, nothing stored")

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", v):
            raise ValueError("allowed: auto | cpu | cuda | cuda:N")
        return v


class ResampleControl(Section):
    """The resampling shortcut control: every evaluated image is also scored after being resized by ``scale`` (the
    decoded image, before cropping; the crop size is kept), so a model that learned "resampled means real" is caught
    (e.g. ../shared/data/realworld, whose real photos were all resampled and four of its fake sets were not)."""

    scale: float = Field(0.9375, gt=0.0, le=4.0, description="resize factor (0.9375: 256 -> 240 px); not 1.0")
    filter: Literal["lanczos", "bicubic", "bilinear"] = Field("lanczos", description="resampling filter")

    @field_validator("scale")
    @classmethod
    def _not_one(cls, v: float) -> float:
        if v == 1.0:
            raise ValueError("1.0 would not resample; use e.g. 0.9375 (256 -> 240 px), or set resample_control: null")
        return v


class EvalConfig(Section):
    batch_size: int = Field(128, ge=1, description="evaluation batch size (images; each runs eval.crops crops)")
    crops: int = Field(1, ge=1, description="fixed crops per evaluated image, logits averaged (1: the centre crop); "
                       "for images larger than the crop")
    resample_control: ResampleControl | None = Field(
        None, description="null: off; else every evaluation is reported twice, as is and resampled (metrics "
        "control.resampled.*), e.g. {scale: 0.9375, filter: lanczos}")
    jpeg_control: list[int] | None = Field(
        None, description="null: off; else every evaluation is also reported with each image re-encoded as JPEG "
        "of these qualities before cropping (metrics control.jpeg<Q>.*), e.g. [90, 60]: a model that learned the "
        "compression history of a set is caught")

    @field_validator("jpeg_control")
    @classmethod
    def _qualities(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and any(not 1 <= q <= 100 for q in v):
            raise ValueError("JPEG qualities are 1..100, e.g. [90, 60]")
        return v


class CacheConfig(Section):
    """Where computed things are kept between runs (lorax/features/store.py, lorax/data/cache.py). No DVC stage
    but `check` reads this section and results never depend on it: moving, deleting or filling the cache only costs
    time. Moved with $LORAX_CACHE_DIR (``dir: null``), the cache makes no stage stale at all."""

    enabled: bool = Field(True, description="keep the feature store on disk (the frozen trunk's tokens and the "
                          "frozen adapters' embeddings of every view); off: in memory for the run only, same results")
    dir: str | None = Field(None, description="the cache folder (features/ and decoded/ under it); null: "
                            "$LORAX_CACHE_DIR, else cache/; relative: from the project root (`lorax train`: the "
                            "working directory). Keep a machine's own place in the variable: no stage reads it")
    max_mb: float = Field(20000, ge=0, description="disk size of the feature store above which the least recently "
                          "used shards are deleted (0: no limit)")
    decode: bool = Field(False, description="decode every image once into a uint8 memory-mapped cache and cut crops "
                         "from it; use it when decoding dominates a step (large PNG/JPEG files); same pixels")
    decode_max_mb: float = Field(4096, ge=0, description="datasets whose decoded pixels exceed this many MB are read "
                                 "from their files as usual")


class GateConfig(Section):
    """The quality gate a new registered version must pass to become the champion
    (pipelines/tracking/model_registry.py): both models scored on the validation images of every task seen."""

    union_tolerance: float = Field(0.0, ge=0, description="points the candidate's pooled accuracy on the union of "
                                   "the seen tasks may fall below the champion's (0: better or equal)")
    max_task_drop: float = Field(10.0, ge=0, description="points any task of the champion may drop, measured on the "
                                 "champion's own classes")
    max_ap_drop: float = Field(2.0, ge=0, description="points the verdict's AP on the champion's tasks may drop")
    max_real_drop: float = Field(5.0, ge=0, description="points the share of real photos called real (champion's "
                                 "tasks) may drop")


class TrackingConfig(Section):
    uri: str | None = Field(None, description="MLflow tracking URI (null: MLFLOW_TRACKING_URI, else "
                            "sqlite:///mlflow.db in the project)")
    artifact_root: str = Field("mlartifacts", description="artifact folder of the project's own store, under the "
                               "project root")
    experiment: str = Field("lorax-{scenario}", description="MLflow experiment name; {scenario} is replaced by "
                            "scenario")
    scenario: str = Field("zoo-5", description="name of the stream's scenario (experiment name, run tags)")
    registered_model: str = Field("lorax-attributor", description="registered model name of the versions (the "
                                  "champion alias: models:/NAME@champion)")
    gate: GateConfig = Field(default_factory=GateConfig, description="the champion's quality gate")
    # where ``uri`` came from, for messages ("tracking.uri in params.yaml", "-S tracking.uri=..."); set by load_params
    _uri_origin: str | None = PrivateAttr(default=None)

    @property
    def uri_origin(self) -> str | None:
        return self._uri_origin


class Params(Section):
    seed: int = Field(0, description="seed of training (initialisation, batches, crops), exemplar selection "
                      "and the detector")
    zoo: ZooConfig = Field(default_factory=ZooConfig, description="the built-in generator zoo")
    data: DataConfig = Field(default_factory=DataConfig, description="where the images are and how they are prepared")
    # No default: the stream is the project's own data (its tasks, in order), not a setting with a sensible default.
    stream: dict[str, StreamItem] = Field(min_length=1, description="the continual stream, task -> {prev: the task "
                                          "before it}, in task order: task i owns classes 2i (real) and 2i+1 (fake)")
    model: ModelConfig = Field(default_factory=ModelConfig, description="the frozen backbone")
    adapter: AdapterConfig = Field(default_factory=AdapterConfig, description="the per-task adapters")
    trace: TraceConfig = Field(default_factory=TraceConfig, description="the per-task trace experts (methods trace, "
                               "lorax+trace)")
    continual: ContinualConfig = Field(default_factory=ContinualConfig, description="the continual method and its "
                                       "exemplar memory")
    train: TrainConfig = Field(default_factory=TrainConfig, description="training of each task")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="evaluation")
    cache: CacheConfig = Field(default_factory=CacheConfig, description="the feature store and the decode cache "
                               "(no effect on results; only the check stage reads it)")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="MLflow tracking and the model "
                                     "registry")
    detect: DetectConfig = Field(default_factory=DetectConfig, description="the binary real/fake detector")
    tune: TuneConfig = Field(default_factory=TuneConfig, description="`lorax tune`: the settings chosen by grouped "
                             "cross-validation on the train split of the stream's first tasks (val never read)")

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
        depth = self.model.kwargs.get("depth")
        if self.adapter.blocks == "last_k" and depth is not None and self.adapter.last_k > int(depth):
            raise ValueError(f"adapter.last_k: {self.adapter.last_k} exceeds model depth {depth}")
        if self.train.epochs == 0 and self.continual.head == "linear":
            raise ValueError("train.epochs: 0 trains nothing, and continual.head linear would leave the head at its "
                             "random init; use >= 1, or continual.head refit (the head fitted in closed form)")
        if self.continual.cross_fit:
            if self.continual.head == "linear":
                raise ValueError(f"continual.cross_fit: {self.continual.cross_fit} needs continual.head: refit, lda "
                                 "or ncm (a trained linear head has nothing to refit on the out-of-fold features)")
            if self.continual.method not in CROSS_FIT_METHODS:
                raise ValueError(f"continual.cross_fit: method {self.continual.method!r} trains no per-task producer "
                                 f"to cross-fit; allowed: {list(CROSS_FIT_METHODS)}, or 0 (off)")
        if self.continual.replay_size is not None and self.continual.cross_fit:
            raise ValueError(f"continual.replay_size: {self.continual.replay_size} cannot be combined with "
                             f"continual.cross_fit: {self.continual.cross_fit} (the fold copies train on every fit "
                             "row); set one of them to null / 0")
        for key in self.tune.grid:
            problem = schema_key_problem(Params, key)
            if problem:
                raise ValueError(f"tune.grid: {problem}")
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
        elif isinstance(e.get("input"), dict) and (lead := re.match(r"([\w.]+): ", msg)):
            # a cross-check of one section names the key inside it: no dump of the whole section
            key, msg = f"{key}.{lead.group(1)}", msg[lead.end():]
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
