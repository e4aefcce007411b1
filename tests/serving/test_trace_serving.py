"""Serving trace states (``trace``, ``lorax+trace``; lorax/serving/trace.py): the same answers as the stream's
evaluation, bytes and broken inputs as for LoRAX, small images mirror-padded, `lorax predict`, the pyfunc model and
the registry gate on a tiny 2-task stream."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from lorax.continual.evaluation import predict_logits, val_rows
from lorax.continual.metrics import softmax
from lorax.continual.state import load_state
from lorax.data.manifest import abs_paths
from lorax.features import open_store
from lorax.serving.inputs import Refused
from lorax.serving.predict import Predictor
from lorax.serving.schema import read_csv

METHODS = ("trace", "lorax+trace")


@pytest.fixture
def streams(trace_streams):
    return trace_streams  # trained once per session (tests/conftest.py)


def _last(streams, name):
    manifests, out = streams
    params, run, _ = out[name]
    return params, run, run / "state" / params.tasks[-1], val_rows([manifests[t] for t in params.tasks])


def _png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("name", METHODS)
def test_served_probabilities_equal_the_evaluations(streams, name):
    """The stream's own evaluation (the store's expert / adapter embeddings, its predictions CSV) and the Predictor
    (no store: every expert over the decoded image's patch grid) give the same probabilities, verdicts and
    super-features for every val image."""
    params, run, state, val = _last(streams, name)
    method, _ = load_state(state, params=params)
    ref, ref_feats = predict_logits(method, val, params, torch.device("cpu"), features=True,
                                    store=open_store(params.cache))
    # no open-set calibration, as in the evaluation; batches of 7 patches split images unevenly
    predictor = Predictor.from_state(state, device="cpu", batch_size=7, openset=None)
    assert predictor.trace == (params.trace.patch, params.trace.patches)
    paths = [str(p) for p in abs_paths(val)]
    got = predictor.predict(paths, progress=False, keep_features=True)
    assert (got.table["status"] == "ok").all()
    np.testing.assert_allclose(softmax(got.logits), softmax(ref), atol=1e-5)
    np.testing.assert_allclose(got.features, ref_feats, atol=1e-5)
    if name == "lorax+trace":  # eval.crops 2: each adapter's embedding is the mean over two crops, as in evaluation
        two = params.model_copy(deep=True)
        two.eval.crops = 2
        ref2, _ = predict_logits(method, val, two, torch.device("cpu"), store=open_store(params.cache))
        got2 = Predictor.from_state(state, device="cpu", crops=2, openset=None).predict(paths, progress=False)
        np.testing.assert_allclose(softmax(got2.logits), softmax(ref2), atol=1e-5)
        assert not np.allclose(ref2, ref, atol=1e-4)  # the second crop counts
    written = read_csv(run / "eval" / f"{params.tasks[-1]}.predictions.csv")  # what the evaluation wrote
    assert list(written["path"]) == paths
    for c in ("verdict", "generator"):
        assert got.table[c].astype(object).where(got.table[c].notna(), None).tolist() == \
            written[c].astype(object).where(written[c].notna(), None).tolist(), c
    np.testing.assert_allclose(got.table["fake_probability"].astype(float), written["fake_probability"], atol=1e-6)
    for a, b in zip(got.table["top"], written["top"], strict=True):
        assert [e["class"] for e in a] == [e["class"] for e in b]
        np.testing.assert_allclose([e["probability"] for e in a], [e["probability"] for e in b], atol=1e-6)


@pytest.mark.parametrize("name", METHODS)
def test_bytes_refused_and_broken_inputs_as_for_lorax(streams, name, tmp_path):
    _, _, state, val = _last(streams, name)
    predictor = Predictor.from_state(state, device="cpu")
    path = abs_paths(val)[0]
    (tmp_path / "text.png").write_text("not an image")
    noise = np.random.default_rng(1).integers(0, 256, (24, 24, 3), dtype=np.uint8)
    (tmp_path / "truncated.png").write_bytes(_png(noise)[:80])
    sources = [str(path), path.read_bytes(), b"\x89PNG junk", str(tmp_path / "text.png"),
               str(tmp_path / "truncated.png"), str(tmp_path / "missing.png"),
               Refused("fifo", "a FIFO (not opened)")]
    res = predictor.predict(sources, progress=False)
    t = res.table
    assert list(t["status"]) == ["ok", "ok"] + ["error"] * 5
    np.testing.assert_allclose(res.logits[1], res.logits[0], atol=1e-6)  # bytes: the same pixels as the file
    assert t["path"][1] == "<bytes 1>" and t["width"][1] == 24
    err = t["error"].tolist()
    assert "not an image" in err[3] and ("truncated" in err[4] or "corrupt" in err[4])
    assert err[5] == "file not found" and err[6] == "a FIFO (not opened)"
    assert t["verdict"][2:].isna().all() and np.isnan(res.logits[2:]).all()


def test_an_image_smaller_than_the_patch_is_mirror_padded(streams, tmp_path):
    """``trace`` reads no crop: a 5x6 image is served as its mirror padding to the patch (here 8 px), the same
    answer as the padded image itself; ``lorax+trace`` still needs the model's crop for its adapters."""
    params, _, state, _ = _last(streams, "trace")
    p = params.trace.patch
    small = np.random.default_rng(0).integers(0, 256, (5, 6, 3), dtype=np.uint8)
    padded = np.pad(small, ((0, p - 5), (0, p - 6), (0, 0)), mode="symmetric")
    Image.fromarray(small).save(tmp_path / "small.png")
    Image.fromarray(padded).save(tmp_path / "padded.png")
    predictor = Predictor.from_state(state, device="cpu")
    res = predictor.predict([str(tmp_path / "small.png"), str(tmp_path / "padded.png")], progress=False)
    assert list(res.table["status"]) == ["ok", "ok"] and (res.table["width"][0], res.table["height"][0]) == (6, 5)
    np.testing.assert_allclose(res.logits[0], res.logits[1], atol=1e-6)
    _, _, both, _ = _last(streams, "lorax+trace")
    t = Predictor.from_state(both, device="cpu").predict([str(tmp_path / "small.png")], progress=False).table
    assert t["status"][0] == "error" and "smaller than the model's crop" in t["error"][0]


def test_cli_predict_and_the_pyfunc_model_on_a_trace_state(streams, tmp_path, capsys):
    """`lorax predict --model STATE` calibrates the open-set score (through the same Predictor) and writes the
    rows; the saved pyfunc model (what `lorax serve` / MLflow serve load) answers the same."""
    import mlflow.pyfunc

    from pipelines.cli import main
    from pipelines.serving.pyfunc import save_attributor

    _, _, state, val = _last(streams, "lorax+trace")
    paths = [str(p) for p in abs_paths(val)[:3]]
    (tmp_path / "bad.png").write_text("nope")
    out = tmp_path / "preds.parquet"
    assert main(["predict", *paths, str(tmp_path / "bad.png"), "--model", str(state), "--out", str(out),
                 "--device", "cpu"]) == 0
    t = pd.read_parquet(out)
    assert list(t["status"]) == ["ok"] * 3 + ["error"] and t["unknown_score"][:3].notna().all()
    assert "4 images:" in capsys.readouterr().out
    save_attributor(tmp_path / "model", state)
    served = mlflow.pyfunc.load_model(str(tmp_path / "model")).predict(
        pd.DataFrame({"image": [Path(p).read_bytes() for p in paths]}))
    assert list(served["status"]) == ["ok"] * 3
    np.testing.assert_allclose(served["fake_probability"].astype(float), t["fake_probability"][:3], atol=1e-6)
    np.testing.assert_allclose(served["unknown_score"].astype(float), t["unknown_score"][:3], atol=1e-6)
    assert [r[0]["class"] for r in served["top"]] == [r[0]["class"] for r in t["top"][:3]]


def test_the_gate_scores_a_trace_candidate_against_its_champion(streams):
    """The registry gate runs candidate (the state after task 2) and champion (after task 1) over the val images
    through the evaluation's prediction path: trace states pass through it."""
    from lorax.continual.state import state_hash
    from pipelines.gate import compare_with_champion
    from pipelines.layout import Layout

    _, out = streams
    params, run, _ = out["trace"]
    layout = Layout.run(params, run, params.data.manifests)
    first = params.tasks[0]
    before = {"version": 1, "tasks": [first], "state_id": state_hash(layout.state(first))}
    figures = compare_with_champion(params, layout, params.tasks[-1], before)
    assert figures["champion_version"] == 1
    assert 0 <= figures["pooled"]["candidate"] <= 100 and 0 <= figures["pooled"]["champion"] <= 100
