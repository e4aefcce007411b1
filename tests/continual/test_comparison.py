"""The gate's arithmetic: both models on the union of their tasks, siblings that do not block, lost generators that do."""

from __future__ import annotations

import numpy as np
import pytest

from lorax.config import GateConfig
from lorax.continual.comparison import Answers, Truth, compare, fair_correct
from pipelines.tracking.model_registry import quality_gate

# 10 images of each: a real, a fake, b real, b fake
TRUTH = Truth(np.array(["a"] * 20 + ["b"] * 20, dtype=object), np.array(([False] * 10 + [True] * 10) * 2))


def answers(tasks: list[str], said: list[tuple[bool, str]]) -> Answers:
    """A model whose verdict is ``said[i][0]`` (fake?) and whose most probable class of that kind is task
    ``said[i][1]``'s."""
    probs = np.full((len(said), 2 * len(tasks)), 0.01)
    for i, (fake, task) in enumerate(said):
        probs[i, 2 * tasks.index(task) + int(fake)] = 1.0
    probs /= probs.sum(axis=1, keepdims=True)
    fake_p = np.array([0.9 if f else 0.1 for f, _ in said])
    return Answers(tasks, probs, fake_p, 0.5)


def champion_a() -> Answers:
    """Knows a only: right on a, calls b's photos real and b's fakes fake (naming them a: it knows no b)."""
    return answers(["a"], [(False, "a")] * 10 + [(True, "a")] * 10 + [(False, "a")] * 10 + [(True, "a")] * 10)


def test_the_champion_cannot_name_a_generator_it_never_learned() -> None:
    ok = fair_correct(champion_a(), TRUTH)
    assert ok[:30].all() and not ok[30:].any()


def test_a_sibling_that_shares_traces_does_not_block_promotion() -> None:
    # the candidate calls 4 of a's fakes b (the sibling it learned since), everything else right
    cand = answers(["a", "b"], [(False, "a")] * 10 + [(True, "a")] * 6 + [(True, "b")] * 4 + [(False, "b")] * 10
                   + [(True, "b")] * 10)
    f = compare(cand, champion_a(), TRUTH)
    assert f["pooled"] == {"candidate": pytest.approx(90.0), "champion": pytest.approx(75.0)}
    # on the champion's own classes the 4 are named a: no drop, although plain task accuracy would say 80 vs 100
    assert f["task"]["a"] == {"candidate": pytest.approx(100.0), "champion": pytest.approx(100.0)}
    gate = quality_gate(f, ["a"], ["a", "b"], GateConfig())
    assert gate.passed, gate.reason


def test_a_candidate_that_loses_a_known_generator_is_refused_with_the_number_and_the_override() -> None:
    cand = answers(["a", "b"], [(False, "a")] * 10 + [(True, "a")] * 5 + [(False, "a")] * 5 + [(False, "b")] * 10
                   + [(True, "b")] * 10)
    f = compare(cand, champion_a(), TRUTH)
    assert f["pooled"]["candidate"] == pytest.approx(87.5)  # better on the union...
    assert f["task"]["a"]["candidate"] == pytest.approx(75.0)  # ...but a's fakes are half called real
    gate = quality_gate(f, ["a"], ["a", "b"], GateConfig(max_task_drop=10.0))
    assert not gate.passed
    assert "a -25.0" in gate.reason and "max_task_drop=10.0" in gate.reason
    assert "lorax models promote" in gate.reason and "pooled accuracy" not in gate.reason
    assert quality_gate(f, ["a"], ["a", "b"], GateConfig(max_task_drop=30.0, max_ap_drop=100.0)).passed


def test_worse_on_the_union_and_a_weaker_verdict_are_refused() -> None:
    # names nothing right on b and calls a's photos fake: worse everywhere
    cand = answers(["a", "b"], [(True, "a")] * 10 + [(True, "a")] * 10 + [(False, "b")] * 10 + [(True, "a")] * 10)
    f = compare(cand, champion_a(), TRUTH)
    assert f["pooled"]["candidate"] < f["pooled"]["champion"]
    gate = quality_gate(f, ["a"], ["a", "b"], GateConfig())
    assert not gate.passed
    assert "union_tolerance=0.0" in gate.reason and "real photos called real" in gate.reason
    assert f["real_acc"] == {"candidate": pytest.approx(0.0), "champion": pytest.approx(100.0)}


def test_coverage_and_first_version() -> None:
    assert quality_gate(None, None, ["a"], GateConfig()).passed
    missing = quality_gate(None, ["a", "b"], ["a", "c"], GateConfig())
    assert not missing.passed and "['b']" in missing.reason


def test_answers_shape_is_checked() -> None:
    with pytest.raises(ValueError, match="probs"):
        Answers(["a", "b"], np.zeros((3, 2)), np.zeros(3), 0.5)
