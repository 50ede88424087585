"""The reference TC engine: the published formulation with cvxpylayers, faithfully.

Per bag, as in the published code (`lin1.weight.data = F.dropout(stakes, 0.5)`): the layer's
weights are the dropped-out stakes w_b = s * m_b / (1 - p), a torch leaf; the meta model is the
linear layer over them normalized by their sum, the optimizer is a `CvxpyLayer` over the same
`build_cvxpy_problem(spec)` the fast engine solves, and R = t . (l - s); R.backward() leaves
dR/dw in the leaf's .grad for every model, kept or dropped. Bags go through the layer one
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

from tc_assets.scoring.contribution import BagGradients, TCSettings
from tc_assets.scoring.optimizer import PortfolioSolveError, PortfolioSpec, build_cvxpy_problem

BOUND_TOL = 1e-6
"""A reference solution's position within this share of its cap from 0 or the cap is at a bound."""


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


def _layer_bag(
    layer: CvxpyLayer,
    p: torch.Tensor,
    stakes: np.ndarray,
    t: torch.Tensor,
    mask: np.ndarray,
    keep: float,
    args: dict[str, Any],
) -> tuple[np.ndarray, ...]:
    """Forward + backward for one bag, as the published code does it: the dropped-out stakes
    are the leaf (the linear layer's weights), so every model, kept or dropped, gets dR/dw.

    Returns (dR/dw (models,), S_b, dR/dx (stocks,), x (stocks,), R, max_i min(l_i, s_i),
    (stocks,) long and short positions).
    """
    weights = torch.tensor((stakes * mask / keep)[None, :], dtype=torch.float64, requires_grad=True)
    total = weights.sum(dim=1, keepdim=True)
    x = torch.nn.functional.linear(weights, p) / total
    x.retain_grad()
    long, short = layer(x, solver_args=args)
    r = (long - short) @ t
    r.sum().backward()
    assert weights.grad is not None and x.grad is not None
    return (
        weights.grad[0].numpy().copy(),
        float(total),
        x.grad[0].numpy().copy(),
        x[0].detach().numpy().copy(),
        float(r[0]),
        float(torch.minimum(long, short).max()),
        long[0].detach().numpy().copy(),
        short[0].detach().numpy().copy(),
    )


def reference_bags(
    p: np.ndarray,
    stakes: np.ndarray,
    t: np.ndarray,
    spec: PortfolioSpec,
    masks: np.ndarray,
    bag_ids: np.ndarray,
    settings: TCSettings,
    label: str,
) -> tuple[BagGradients, BagGradients]:
    """The bags (rows of masks) and the unbagged gradient via cvxpylayers, one bag at a time.

    A bag whose solve fails or is inaccurate is retried with tighter settings, then raises
    `PortfolioSolveError` naming the round, the bag and the solver status.
    """
    layer = build_layer(spec)
    pt = torch.as_tensor(p, dtype=torch.float64)
    tt = torch.as_tensor(t, dtype=torch.float64)
    total = float(stakes.sum())
    keep = 1.0 - settings.dropout
    # Bag -1, last, is the unbagged gradient (no dropout).
    jobs = [(int(b), masks[i], keep) for i, b in enumerate(bag_ids)]
    jobs.append((-1, np.ones(masks.shape[1], dtype=bool), 1.0))
    results = []
    for bag, mask, k in jobs:
        status = ""
        for tighten in (0, 1):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    out = _layer_bag(layer, pt, stakes, tt, mask, k, solver_args(settings, tighten))
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
        results.append(out)
    grad, s_b, v, x, r, overlap, long, short = (np.array(col) for col in zip(*results, strict=True))
    # A position is free strictly inside (0, cap), up to the solver's accuracy.
    tol = BOUND_TOL * spec.caps
    free = ((long > tol) & (long < spec.caps - tol)) | ((short > tol) & (short < spec.caps - tol))

    def rows(sl: slice) -> BagGradients:
        return BagGradients(
            raw=total * grad[sl],
            weight=total / s_b[sl],
            v=v[sl],
            x=x[sl],
            returns=r[sl],
            overlap=overlap[sl],
            bound=~free[sl],
            iterations=None,
            kkt=float("nan"),
        )

    return rows(slice(0, -1)), rows(slice(-1, None))
