"""Linear algebra shared by the closed-form heads (:mod:`lorax.continual.head`, :mod:`lorax.continual.verdict`)."""

from __future__ import annotations

import torch


def row_space(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(R (N, r), V (D, r))`` with ``z = R V^T`` and orthonormal ``V``, or None when ``z`` is not wider than tall.

    Why: an L2-penalised linear model's weights lie in the row space of its rows (the representer theorem), and
    ``|V b|^2 = |b|^2``, so fitting on ``R`` and mapping back with ``V`` is the same problem, rotated; L-BFGS from
    zero is rotation-invariant, so the iterates are the same too. A super-feature of T tasks is T x ~2,000 wide while
    a task's rows + memory are ~800: each step then costs N x N instead of N x D (on the seven-task t2i stream the
    verdict fit took 298 s at task 2 before, 98 s at task 3 after, both under load). From the Gram matrix: one
    N x N x D product and an N x N eigendecomposition."""
    n, d = z.shape
    if d <= n:
        return None
    z = z.double()
    lam, u = torch.linalg.eigh(z @ z.T)
    keep = lam > lam.max().clamp_min(1e-300) * 1e-12  # numerical rank
    lam, u = lam[keep], u[:, keep]
    root = lam.sqrt()
    return u * root, z.T @ (u / root)
