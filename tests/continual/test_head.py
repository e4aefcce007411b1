"""The refit class head (``continual.head``: refit | lda | ncm): the solvers, and train_task saving it in the
state."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lorax.continual import trainer
from lorax.continual.head import refit_head, standardizer
from lorax.continual.state import load_state, read_info
from lorax.continual.evaluation import predict_logits
from lorax.continual.trainer import train_task, training_rows
from tests.helpers import tiny_params


def _toy(seed: int = 0, n: int = 60, d: int = 40, k: int = 4):
    """Linearly separable classes hidden in one of ``d`` columns, the others large, offset noise: features on the
    scale of raw super-features, where an unstandardised head has to learn the scale first."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % k
    x = 50.0 + 20.0 * torch.randn(n, d, generator=g)
    x[:, 3] = 0.01 * y.float() + 0.001 * torch.rand(n, generator=g)  # the class, in a tiny-variance column
    return x, y


@pytest.mark.parametrize("kind", ["refit", "lda", "ncm"])
def test_refit_head_separates_what_an_untrained_head_does_not(kind):
    x, y = _toy()
    w, b = refit_head(x, y, 4, kind, C=10.0)
    if kind in ("refit", "lda"):
        assert ((x @ w.T + b).argmax(1) == y).float().mean() == 1.0
    else:  # nearest class mean in the standardised space: the 39 noise columns blur it, it still beats chance well
        assert ((x @ w.T + b).argmax(1) == y).float().mean() > 0.5
    torch.manual_seed(0)
    untrained = torch.nn.Linear(x.shape[1], 4)
    assert (untrained(x).argmax(1) == y).float().mean() < 0.5


def test_folded_standardisation_is_the_standardised_fit():
    """The returned head on raw features = the logistic regression on standardised features."""
    from lorax.continual.head import fit_logistic

    x, y = _toy(1)
    w, b = refit_head(x, y, 4, "refit", C=1.0)
    mean, std = standardizer(x.double())
    ws, bs = fit_logistic((x.double() - mean) / std, y, 4, C=1.0)
    torch.testing.assert_close(x.double() @ w.double().T + b.double(), ((x.double() - mean) / std) @ ws.T + bs,
                               rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("kind", ["lda", "ncm"])
@pytest.mark.parametrize("present", [2, 3])
def test_refit_head_classes_without_rows_are_never_predicted(kind, present):
    x, y = _toy(2)
    w, b = refit_head(x[y < present], y[y < present], 4, kind)
    assert set((x @ w.T + b).argmax(1).tolist()) <= set(range(present))


def test_lda_head_is_scikit_learns_shrinkage_lda_on_the_standardised_features():
    """The folded head gives scikit-learn's decision function (two classes: its one margin as logits (0, m))."""
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    x, y = _toy(3)
    for k in (2, 4):
        xk, yk = x[y < k], y[y < k]
        w, b = refit_head(xk, yk, 4, "lda")
        ours = (xk.double() @ w.double().T + b.double())[:, :k]
        ref = LinearDiscriminantAnalysis(solver="lsqr", shrinkage="auto").fit(_std(xk), yk.numpy())
        theirs = ref.decision_function(_std(xk))
        np.testing.assert_allclose((ours[:, 1] - ours[:, 0] if k == 2 else ours).numpy(), theirs, rtol=1e-3,
                                   atol=1e-3)
    with pytest.raises(ValueError, match="balanced class weights are a logistic refit's"):
        refit_head(x, y, 4, "lda", balanced=True)


def _std(x: torch.Tensor) -> np.ndarray:
    mean, std = standardizer(x.double())
    return ((x.double() - mean) / std).numpy()


@pytest.fixture(scope="module")
def first_task(tmp_path_factory):
    from lorax.data.manifest import load_stream_manifests
    from lorax.data.prepare import prepare_tasks
    from lorax.data.zoo import synth_tasks

    root = tmp_path_factory.mktemp("head")
    params = tiny_params(root)
    synth_tasks(params.tasks, params.data.root, params.zoo)
    prepare_tasks(params.data.root, params.tasks, params.data.manifests, params.data, params.model.img_size)
    manifests = load_stream_manifests(params.data.manifests, params.tasks)
    return root, params, manifests


def test_train_task_refits_the_head_and_the_state_keeps_it(first_task, monkeypatch):
    root, base, manifests = first_task
    task_df = manifests[base.tasks[0]]
    linear = train_task(None, task_df, None, base, root / "linear")
    params = tiny_params(root, continual__head="refit", continual__head_c=10.0)
    seen: list = []
    real = trainer.save_state
    monkeypatch.setattr(trainer, "save_state", lambda m, *a, **k: (seen.append(m), real(m, *a, **k))[1])
    refit = train_task(None, task_df, None, params, root / "refit")
    assert read_info(refit)["head"]["kind"] == "refit"
    assert "head" not in read_info(linear)  # off by default: the zoo's states are unchanged

    rows = training_rows(seen[0], task_df, None)
    y = rows["class_id"].to_numpy()
    m_lin, _ = load_state(linear, params=base)
    m_ref, _ = load_state(refit, params=params)
    # same seeds, same adapter: only the head differs
    for k, v in m_lin.net.adapters.state_dict(base.tasks[0]).items():
        torch.testing.assert_close(v, m_ref.net.adapters.state_dict(base.tasks[0])[k])
    # the state round-trips the refit head: the loaded one is the one train_task fitted
    torch.testing.assert_close(m_ref.net.head.weight, seen[0].net.head.weight)
    torch.testing.assert_close(m_ref.net.head.bias, seen[0].net.head.bias)
    # ... and it is the refit of the rows' features (evaluation reads it through the ordinary head)
    logits, feats = predict_logits(m_ref, rows, params, torch.device("cpu"), features=True)
    w, b = refit_head(torch.tensor(feats), torch.tensor(y), 2, "refit", C=10.0)  # copies: pandas gives read-only arrays
    torch.testing.assert_close(torch.from_numpy(logits), torch.from_numpy(feats) @ w.T + b, rtol=1e-3, atol=1e-3)
    acc_ref = float((logits.argmax(1) == y).mean())
    acc_lin = float((predict_logits(m_lin, rows, base, torch.device("cpu"))[0].argmax(1) == y).mean())
    assert acc_ref == 1.0 and acc_ref >= acc_lin, (acc_ref, acc_lin)
    assert not np.allclose(m_ref.net.head.weight.detach().numpy(), m_lin.net.head.weight.detach().numpy())


def test_wide_fits_solve_the_full_problem():
    """Rows fewer than features (a many-task super-feature): the row-space fits are optima of the full objective
    (its gradient vanishes there), for the multinomial head and the binary verdict."""
    from lorax.continual.head import fit_logistic
    from lorax.utils.linalg import row_space
    from lorax.continual.verdict import fit_binary_logistic

    g = torch.Generator().manual_seed(0)
    n, d, k, C = 60, 300, 3, 1.0
    z = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.arange(n) % k
    z[:, :5] += y[:, None].double()
    r, v = row_space(z)
    torch.testing.assert_close(r @ v.T, z)
    assert r.shape[1] <= n and row_space(z[:, :40]) is None  # tall: fitted as is

    w, b = fit_logistic(z, y, k, C)
    w, b = w.clone().requires_grad_(), b.clone().requires_grad_()
    loss = torch.nn.functional.cross_entropy(z @ w.T + b, y) + 0.5 / (C * n) * (w * w).sum()
    gw, gb = torch.autograd.grad(loss, [w, b])
    assert gw.norm() < 1e-4 * max(1.0, w.norm().item() / (C * n)) and gb.abs().max() < 1e-5

    t = (y == 0).double()
    wb, bb = fit_binary_logistic(z.numpy(), t.numpy(), C)
    wb, bb = torch.from_numpy(wb).requires_grad_(), torch.tensor(bb, requires_grad=True)
    sw = torch.where(t > 0, n / (2 * t.sum()), n / (2 * (n - t.sum())))
    loss = (sw * torch.nn.functional.binary_cross_entropy_with_logits(z @ wb + bb, t, reduction="none")).mean()
    loss = loss + 0.5 / (C * n) * (wb * wb).sum()
    gw, gb = torch.autograd.grad(loss, [wb, bb])
    assert gw.norm() < 1e-4 * max(1.0, wb.norm().item() / (C * n)) and abs(gb.item()) < 1e-5


def test_balanced_refit_weights_the_rare_class_up():
    """``balanced``: a class with few rows gets the weight of a common one, so its region grows (and the default
    stays the unweighted fit)."""
    from lorax.continual.head import refit_head

    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(200, 4, generator=g), torch.randn(10, 4, generator=g) + 1.0])
    y = torch.cat([torch.zeros(200, dtype=torch.long), torch.ones(10, dtype=torch.long)])
    probe = torch.randn(400, 4, generator=g) + 0.5
    plain = refit_head(x, y, 2)
    again = refit_head(x, y, 2, balanced=False)
    assert torch.equal(plain[0], again[0]) and torch.equal(plain[1], again[1])
    w, b = refit_head(x, y, 2, balanced=True)
    rare_plain = ((probe @ plain[0].T + plain[1]).argmax(1) == 1).float().mean()
    rare_bal = ((probe @ w.T + b).argmax(1) == 1).float().mean()
    assert rare_bal > rare_plain + 0.1


def test_train_task_with_the_lda_head_saves_and_serves_it(first_task):
    """`continual.head: lda` through train_task: the state's head is the LDA of the task's rows' features, the loaded
    state answers with it, and the prediction sets are calibrated on its probabilities."""
    root, base, manifests = first_task
    task_df = manifests[base.tasks[0]]
    params = tiny_params(root, continual__head="lda")
    state = train_task(None, task_df, None, params, root / "lda")
    assert read_info(state)["head"]["kind"] == "lda"
    method, _ = load_state(state, params=params)
    rows = training_rows(method, task_df, None)
    logits, feats = predict_logits(method, rows, params, torch.device("cpu"), features=True)
    w, b = refit_head(torch.tensor(feats), torch.tensor(rows["class_id"].to_numpy()), 2, "lda")
    torch.testing.assert_close(torch.from_numpy(logits), torch.from_numpy(feats) @ w.T + b, rtol=1e-3, atol=1e-3)
    assert method.sets is not None and method.sets.thresholds.shape == (2,)
