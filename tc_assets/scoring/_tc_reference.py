"""The reference TC engine: the published formulation with cvxpylayers, faithfully.

Per bag: the stakes are a torch leaf, dropout multiplies them by the bag's mask / (1 - p), the
meta model is a linear layer over the dropped-out stakes normalized by their sum, the optimizer
is a `CvxpyLayer` over the same `build_cvxpy_problem(spec)` the fast engine solves, and
R = t . (l - s); R.backward() leaves dR/ds in the leaf's .grad. Bags go through the layer one
at a time (a forward solve and a backward pass each), so that a bag whose solve fails or is
inaccurate is retried alone with tighter settings; the unbagged gradient is one more pass.

Accuracy: diffcp differentiates the homogeneous self-dual embedding at the solver's solution,
so the solve must be tight (SCS eps 1e-10: at SCS's default 1e-4 the gradients are off by
~1e-2) and the adjoint linear system solved accurately (LSMR to 1e-10; diffcp's default LSQR
stops near 1e-4 relative).
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
from cvxpylayers.torch import CvxpyLayer

from tc_assets.scoring.contribution import TCSettings
from tc_assets.scoring.optimizer import PortfolioSolveError, PortfolioSpec, build_cvxpy_problem


def solver_args(settings: TCSettings, tighten: int = 0) -> dict[str, Any]:
    """diffcp/solver keyword arguments; tighten=1 is the retry (100x tighter, 10x iterations,
    SCS without Anderson acceleration)."""
    eps = settings.reference_eps * (1e-2**tighten)
    args: dict[str, Any] = {"mode": settings.reference_mode, "n_jobs_forward": -1}
    if settings.reference_solver == "SCS":
        args |= {
            "solve_method": "SCS",
            "eps_abs": eps,
            "eps_rel": eps,
            "max_iters": settings.reference_max_iters * (10**tighten),
        }
        if tighten:
            args["acceleration_lookback"] = 0
    else:
        args |= {
            "solve_method": "Clarabel",
            "tol_gap_abs": eps,
            "tol_gap_rel": eps,
            "tol_feas": eps,
            "max_iter": 200 * (10**tighten),
        }
    return args


def build_layer(spec: PortfolioSpec) -> CvxpyLayer:
    """The optimizer as a torch layer: signal x -> (long, short)."""
    prob = build_cvxpy_problem(spec)
    return CvxpyLayer(prob.problem, parameters=[prob.signal], variables=[prob.long, prob.short])


def _layer_returns(
    layer: CvxpyLayer,
    p: torch.Tensor,
    stakes: np.ndarray,
    t: torch.Tensor,
    masks: np.ndarray,
    keep: float,
    args: dict[str, Any],
) -> tuple[np.ndarray, np.ndarray]:
    """Forward + backward for a batch of bags: (dR_b/ds (bags, models), R_b (bags,))."""
    leaf = torch.tensor(np.tile(stakes, (masks.shape[0], 1)), requires_grad=True)
    dropped = leaf * torch.as_tensor(masks, dtype=torch.float64) / keep  # torch dropout
    x = torch.nn.functional.linear(dropped, p) / dropped.sum(dim=1, keepdim=True)
    long, short = layer(x, solver_args=args)
    r = (long - short) @ t
    r.sum().backward()
    assert leaf.grad is not None
    return leaf.grad.numpy().copy(), r.detach().numpy()


def reference_gradients(
    p: np.ndarray,
    stakes: np.ndarray,
    t: np.ndarray,
    spec: PortfolioSpec,
    masks: np.ndarray,
    bag_ids: np.ndarray,
    settings: TCSettings,
    label: str,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(S * dR_b/ds (bags, models), the unbagged S * dR/ds, R_b (bags,)) via cvxpylayers.

    A bag whose solve fails or is inaccurate is retried with tighter settings, then raises
    `PortfolioSolveError` naming the round, the bag and the solver status.
    """
    layer = build_layer(spec)
    pt = torch.as_tensor(p, dtype=torch.float64)
    tt = torch.as_tensor(t, dtype=torch.float64)
    total = float(stakes.sum())
    keep = 1.0 - settings.dropout
    grads = np.zeros(masks.shape)
    returns = np.zeros(masks.shape[0])
    ones = np.ones((1, masks.shape[1]), dtype=bool)
    # Bag -1, last, is the unbagged gradient (no dropout).
    jobs = [(int(b), masks[i : i + 1], keep) for i, b in enumerate(bag_ids)] + [(-1, ones, 1.0)]
    results: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    status = ""
    for bag, mask, k in jobs:
        for tighten in (0, 1):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    results[bag] = _layer_returns(
                        layer, pt, stakes, tt, mask, k, solver_args(settings, tighten)
                    )
                    status = ""
                except Exception as exc:  # diffcp/cvxpy raise SolverError, ValueError, ...
                    status = str(exc) or type(exc).__name__
            inaccurate = [str(w.message) for w in caught if "naccurate" in str(w.message)]
            if not status and inaccurate:
                status = inaccurate[0]
            if not status:
                break
        if status:
            raise PortfolioSolveError(label, "unbagged gradient" if bag < 0 else bag, status)
    for i, b in enumerate(bag_ids):
        g, r = results[int(b)]
        grads[i], returns[i] = g[0] * total, r[0]
    return grads, results[-1][0][0] * total, returns
