"""A real/fake decision from scores: the threshold of best accuracy, shared by the attributor's binary figures
(:func:`lorax.continual.metrics.binary_decision`) and the detector (:mod:`lorax.detect`). numpy only."""

from __future__ import annotations

import numpy as np


def fit_threshold(scores: np.ndarray, labels: np.ndarray, balanced: bool = False) -> float:
    """The threshold t (fake iff score >= t) of highest accuracy on ``(scores, labels)``; ``balanced``: of highest
    balanced accuracy (mean of the real and the fake recall), so a class with more images does not pull it.

    Candidates are the midpoints between consecutive distinct scores and the two ends; among equally accurate ones
    the middle of the best run is taken, which keeps the threshold away from the scores it separates.
    """
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(int)
    if scores.size == 0:
        raise ValueError("fit_threshold: no validation images of the training generators to fit the threshold on")
    if scores.shape != labels.shape:
        raise ValueError(f"fit_threshold: {scores.size} scores but {labels.size} labels")
    uniq = np.unique(scores)
    cands = np.concatenate([[uniq[0]], (uniq[:-1] + uniq[1:]) / 2, [np.nextafter(uniq[-1], np.inf)]])
    # accuracy of each candidate: fakes at or above it + reals below it
    real_sorted, fake_sorted = np.sort(scores[labels == 0]), np.sort(scores[labels == 1])
    reals_below = np.searchsorted(real_sorted, cands, side="left")
    fakes_above = fake_sorted.size - np.searchsorted(fake_sorted, cands, side="left")
    if balanced and real_sorted.size and fake_sorted.size:
        acc = reals_below / real_sorted.size + fakes_above / fake_sorted.size
    else:
        acc = (reals_below + fakes_above) / scores.size
    best = np.flatnonzero(acc == acc.max())
    return float(cands[best[len(best) // 2]])
