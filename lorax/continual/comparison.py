"""Two models on the same images, scored by one rule: the registry gate's evidence.

The registry's gate (``pipelines/tracking/model_registry.py``) asks the user's question: is the candidate better
than the champion on everything seen so far? The two usually know different generators (the candidate learned one
more), so both are scored on every validation image of the union of their tasks by the pooled multi-real rule the
user lives with: a real photo is right when the verdict is real (whichever task it came from), a fake when the
verdict is fake and the generator named is its own. A model is never asked for classes it lacks: on a generator it
never learned, the champion still gets the real photos right by calling them real and can still call the fakes
fake, but it cannot name them, which is exactly the answer a user of the champion would get.

The per-task check compares each of the champion's tasks on the champion's own classes: the candidate's verdict as
it is, its generator chosen among the champion's generators only. A sibling the candidate learned since (sd21 next
to sd15) then cannot make sd15 "drop"; a candidate that stopped calling sd15's images fake, or calls them by another
old generator's name, still does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lorax.continual.verdict import decide


@dataclass(frozen=True)
class Answers:
    """One model's answers on a set of images: its tasks (class ``2i`` real, ``2i+1`` fake of task ``i``), the
    per-class probabilities, its verdict's fake probability and threshold (None: the argmax decides)."""

    tasks: list[str]
    probs: np.ndarray
    fake_p: np.ndarray
    threshold: float | None

    def __post_init__(self) -> None:
        if self.probs.shape != (len(self.fake_p), 2 * len(self.tasks)):
            raise ValueError(f"probs {self.probs.shape} for {len(self.fake_p)} images and tasks {self.tasks}")


@dataclass(frozen=True)
class Truth:
    """What each image is: its task's name and whether it is fake."""

    task: np.ndarray  # str, one per image
    is_fake: np.ndarray  # bool

    @classmethod
    def of(cls, tasks: Sequence[str], task_index: np.ndarray, class_id: np.ndarray) -> Truth:
        return cls(np.asarray(tasks, dtype=object)[np.asarray(task_index)], np.asarray(class_id) % 2 == 1)


def fair_correct(a: Answers, truth: Truth, among: Sequence[str] | None = None) -> np.ndarray:
    """Per image, right or wrong by the module's rule; ``among``: name generators from these tasks only (the
    candidate restricted to the champion's classes). A fake of a generator the model does not know is never right:
    it cannot name it."""
    keep = list(a.tasks) if among is None else [t for t in a.tasks if t in set(among)]
    cols = np.array([2 * a.tasks.index(t) + k for t in keep for k in (0, 1)], dtype=np.int64)
    probs = a.probs[:, cols]
    if a.threshold is None:  # the argmax rule decides real/fake and the class at once
        pred = probs.argmax(axis=1)
    else:
        pred = decide(probs, a.fake_p, a.threshold)
    called_fake = pred % 2 == 1
    named = np.asarray(keep, dtype=object)[pred // 2]
    return np.where(truth.is_fake, called_fake & (named == truth.task), ~called_fake)


def _percent(x: np.ndarray) -> float:
    return float(100.0 * x.mean()) if x.size else float("nan")


def average_precision(score: np.ndarray, is_fake: np.ndarray) -> float:
    """AP (%) of ``score`` for the fake class; NaN when only one kind is present."""
    if is_fake.all() or not is_fake.any():
        return float("nan")
    from sklearn.metrics import average_precision_score

    return float(100.0 * average_precision_score(is_fake, score))


def compare(candidate: Answers, champion: Answers, truth: Truth) -> dict:
    """The figures the gate decides on (percent): ``pooled`` on the union of the two models' tasks, per champion
    task on the champion's classes, and the verdict (AP, real photos called real) on the champion's tasks' images.

    Images of tasks neither model knows are not expected (the caller passes the union's validation images)."""
    champ_tasks = list(champion.tasks)
    cand_ok = fair_correct(candidate, truth)
    champ_ok = fair_correct(champion, truth)
    restricted = fair_correct(candidate, truth, among=champ_tasks)
    on_champ = np.isin(truth.task, np.asarray(champ_tasks, dtype=object))
    real = on_champ & ~truth.is_fake
    return {
        "union_tasks": sorted(set(candidate.tasks) | set(champ_tasks), key=lambda t: (t not in champ_tasks, t)),
        "n_images": int(len(truth.task)),
        "pooled": {"candidate": _percent(cand_ok), "champion": _percent(champ_ok)},
        "task": {t: {"candidate": _percent(restricted[truth.task == t]), "champion": _percent(champ_ok[truth.task == t])}
                 for t in champ_tasks},
        "ap": {"candidate": average_precision(candidate.fake_p[on_champ], truth.is_fake[on_champ]),
               "champion": average_precision(champion.fake_p[on_champ], truth.is_fake[on_champ])},
        "real_acc": {"candidate": _percent(cand_ok[real]), "champion": _percent(champ_ok[real])},
    }
