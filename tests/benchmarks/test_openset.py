"""benchmarks/openset_t2i.py: the next-generator cases of a stream, read through its feature store, score as the
Predictor's held-out evaluation does (lorax/serving/scan.py::evaluate_heldout) on the same state."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.openset_t2i import feature_parts, next_generator, next_markdown


@pytest.mark.slow
def test_next_generator_through_the_store_equals_the_predictor_path(trace_streams, tmp_path):
    from lorax.continual.state import load_state
    from lorax.serving.predict import Predictor
    from lorax.serving.scan import evaluate_heldout

    manifests, runs = trace_streams
    params, run, _ = runs["lorax+trace"]
    first, second = params.tasks[:2]
    r = next_generator(run / "state", list(params.tasks), manifests, params.cache, seed=params.seed)
    case = r["generators"][second]
    assert case["known"] == [first]

    held = manifests[second][manifests[second]["split"] == "val"]
    predictor = Predictor.from_state(run / "state" / first, device="cpu", openset=None)
    ref = evaluate_heldout(predictor, {first: manifests[first]}, {second: held}, tmp_path / "scans", seed=params.seed)
    g = ref["generators"][second]
    assert case["all"]["threshold"] == pytest.approx(ref["threshold"], rel=1e-4)
    assert case["all"]["auroc_fakes"] == pytest.approx(g["auroc"]["mahalanobis"], abs=1e-9)
    assert case["all"]["auroc_energy_fakes"] == pytest.approx(g["auroc"]["energy"], abs=1e-9)
    assert case["all"]["auroc_msp_fakes"] == pytest.approx(g["auroc"]["msp"], abs=1e-9)
    assert case["all"]["fakes_flagged"] == pytest.approx(g["fake_flag_rate"])
    assert case["all"]["n_known_test"] == ref["n_known_test"]
    for part in ("adapters", "traces"):  # each part scored on its own columns
        assert 0.0 <= case[part]["auroc_fakes"] <= 1.0
    assert "Mahalanobis (traces)" in next_markdown(r)

    method, _ = load_state(run / "state" / second)
    parts = feature_parts(method, params)
    cols = np.sort(np.r_[parts["adapters"], parts["traces"]])
    width = len(method.tasks) * (method.net.embed_dim + params.trace.dim)
    assert np.array_equal(cols, np.arange(width))  # the two parts split the super-feature
    assert len(parts["traces"]) == len(method.tasks) * params.trace.dim
