"""The meta portfolio optimizer, defined once for the meta_portfolio asset and every TC engine.

Given the meta model signal x (one value per stock), the fund holds the portfolio w = l - s that
solves

    maximize    x'(l - s) - (gamma / 2) (|l|^2 + |s|^2)
    subject to  sum(l) = 1,  sum(s) = 1                  (dollar neutral, gross 2)
                0 <= l <= u,  0 <= s <= u                (position caps)
                -e <= E'(l - s) <= e                     (feature exposure limits)

* u_i = min(max_position, liquidity_fraction * adv_i / long_market_value): the position cap and,
  when average daily dollar volumes are given, the liquidity cap (a stock without an ADV gets cap
  0: a position whose liquidity is unknown is not taken).
* E holds the round's `medium` features standardized over the round's stocks (mean 0, std 1;
  constant columns dropped), so E'w = (long-weighted mean - short-weighted mean) of each feature,
  in feature standard deviations; e is the same limit for every feature.
* The quadratic term makes the solution unique and its derivative informative: a linear program
  sits on a vertex, so its weights are piecewise constant in x and their gradient is zero almost
  everywhere. Here every position strictly between 0 and its cap moves with x.
* No turnover term and an empty starting portfolio: the solution depends only on the round.

Splitting w into l and s makes the problem convex. The split is exact (never both l_i > 0 and
s_i > 0) whenever the budget multipliers satisfy nu_l + nu_s >= 0, i.e. whenever the fund would
rather be more than 1 long and 1 short: true unless gamma is large against the signal's spread;
`PortfolioSolution.long_short_overlap` reports it, `inexact_split` explains it (a universe too
small for the position caps) and `check_constraints` on w flags it.

Two solvers are built from one `PortfolioSpec`: `build_cvxpy_problem` (a DPP cvxpy problem whose
parameter is x, used by the cvxpylayers reference engine and as an independent check), and the
fast exact dual Newton solver in `_tc_dual.py`, used by `solve_portfolio` and the fast engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:  # cvxpy loads with the first cvxpy problem, not with the definitions
    import cvxpy as cp

__all__ = [
    "ConstraintViolation",
    "CvxpyPortfolio",
    "OptimizerSettings",
    "PortfolioSolution",
    "PortfolioSolveError",
    "PortfolioSpec",
    "build_cvxpy_problem",
    "build_spec",
    "check_constraints",
    "inexact_split",
    "solve_portfolio",
]


class OptimizerSettings(BaseModel):
    """Parameters of the meta portfolio problem (defaults make caps and exposure limits bind)."""

    model_config = ConfigDict(frozen=True)

    gamma: float = Field(
        default=50.0,
        gt=0,
        description="Coefficient of the quadratic term (gamma/2)(|l|^2 + |s|^2), in signal units "
        "per unit of weight: a position is free (moves with x) while its signal is within "
        "gamma * cap above the side's threshold, and at its cap beyond. Default 50: with "
        "max_position 0.01 that band is 0.5, about one standard deviation of the meta model on "
        "generated data, so a few hundred positions are free (a smooth, stable gradient) while "
        "the strongest signals and the illiquid names sit at their caps.",
    )
    max_position: float = Field(
        default=0.01,
        gt=0,
        le=1,
        description="Largest weight of one stock on either side (each side sums to 1). Default "
        "0.01: at least 100 names long and 100 short.",
    )
    exposure_limit: float = Field(
        default=0.1,
        ge=0,
        description="Limit on |E'w| for every medium feature: the long-weighted minus the "
        "short-weighted mean of the standardized feature. Default 0.1 (a tenth of a standard "
        "deviation): binds on the features the meta model leans on.",
    )
    liquidity_fraction: float = Field(
        default=0.1,
        gt=0,
        description="Liquidity cap: a position is at most this fraction of the stock's average "
        "daily dollar volume (adv_usd). Only applied when the round has market data.",
    )
    long_market_value_usd: float = Field(
        default=1.0e8,
        gt=0,
        description="Dollar value of the long side (= the short side), which converts the "
        "liquidity cap into a weight: cap_i = liquidity_fraction * adv_i / long_market_value.",
    )


@dataclass(frozen=True)
class PortfolioSpec:
    """One round's problem data: the single source both solvers are built from.

    Attributes:
        gamma: quadratic coefficient.
        caps: (stocks,) per-stock upper bound u on l_i and s_i.
        exposures: (stocks, k) standardized feature matrix E (non-constant medium features).
        limits: (k,) exposure limits e, >= 0.
    """

    gamma: float
    caps: np.ndarray
    exposures: np.ndarray
    limits: np.ndarray

    @property
    def n_stocks(self) -> int:
        return int(self.caps.shape[0])

    @property
    def n_exposures(self) -> int:
        return int(self.exposures.shape[1])


def build_spec(
    features: np.ndarray,
    adv_usd: np.ndarray | None,
    settings: OptimizerSettings | None = None,
) -> PortfolioSpec:
    """Build the round's `PortfolioSpec` from its medium features and optional ADV.

    Args:
        features: (stocks, features) medium feature values (integers 0..4 or floats).
        adv_usd: (stocks,) average daily dollar volume, or None when the round has no market
            data (then only max_position caps). NaN means unknown: cap 0.
        settings: the optimizer parameters.
    """
    settings = settings or OptimizerSettings()
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2:
        raise ValueError(f"features must be (stocks, features), got shape {f.shape}")
    n = f.shape[0]
    if not np.all(np.isfinite(f)):
        raise ValueError("features must be finite")
    std = f.std(axis=0)
    keep = std > 1e-12 * np.maximum(1.0, np.abs(f).max(axis=0))
    exposures = (f[:, keep] - f[:, keep].mean(axis=0)) / std[keep]
    caps = np.full(n, settings.max_position)
    if adv_usd is not None:
        adv = np.asarray(adv_usd, dtype=np.float64)
        if adv.shape != (n,):
            raise ValueError(f"adv_usd has shape {adv.shape}, expected ({n},)")
        if np.any(adv[np.isfinite(adv)] <= 0):
            raise ValueError("adv_usd must be > 0 where given")
        liquidity = settings.liquidity_fraction * adv / settings.long_market_value_usd
        caps = np.minimum(caps, np.nan_to_num(liquidity, nan=0.0, posinf=settings.max_position))
    limits = np.full(exposures.shape[1], settings.exposure_limit)
    return PortfolioSpec(
        gamma=float(settings.gamma),
        caps=np.ascontiguousarray(caps),
        exposures=np.ascontiguousarray(exposures),
        limits=limits,
    )


@dataclass(frozen=True)
class CvxpyPortfolio:
    """The DPP cvxpy problem of a spec: parameter `signal` (x), variables `long`, `short`."""

    problem: cp.Problem
    signal: cp.Parameter
    long: cp.Variable
    short: cp.Variable


def build_cvxpy_problem(spec: PortfolioSpec) -> CvxpyPortfolio:
    """The spec's problem in cvxpy, disciplined parametrized (DPP) in the signal x.

    The quadratic is written as a sum of squares so that cvxpylayers' default conic path
    (diffcp) can canonicalize and differentiate it.
    """
    import cvxpy as cp

    n = spec.n_stocks
    x = cp.Parameter(n, name="signal")
    long = cp.Variable(n, name="long", nonneg=True)
    short = cp.Variable(n, name="short", nonneg=True)
    w = long - short
    objective = cp.Maximize(
        x @ w - (spec.gamma / 2.0) * (cp.sum_squares(long) + cp.sum_squares(short))
    )
    constraints = [
        cp.sum(long) == 1.0,
        cp.sum(short) == 1.0,
        long <= spec.caps,
        short <= spec.caps,
    ]
    if spec.n_exposures:
        expo = spec.exposures.T @ w
        constraints += [expo <= spec.limits, expo >= -spec.limits]
    problem = cp.Problem(objective, constraints)
    assert problem.is_dpp()
    return CvxpyPortfolio(problem=problem, signal=x, long=long, short=short)


class PortfolioSolveError(RuntimeError):
    """A portfolio solve failed or did not converge, even after its retry (the meta portfolio,
    a bag by number, or another solve named by a string)."""

    def __init__(
        self,
        label: str,
        bag: int | str | None,
        status: str,
        detail: str = "",
        retry: str = "a retry with tighter settings",
    ) -> None:
        self.label = label
        self.bag = bag
        self.status = status
        if bag is None:
            what = "meta portfolio"
        elif isinstance(bag, str):
            what = bag
        else:
            what = f"bag {bag}"
        super().__init__(
            f"round {label}, {what}: portfolio solve failed with status {status!r} after "
            f"{retry}{': ' + detail if detail else ''}"
        )


@dataclass(frozen=True)
class PortfolioSolution:
    """The optimized meta portfolio and what the asset metadata reports about it.

    Attributes:
        weights: (stocks,) w = l - s.
        long, short: (stocks,) the two sides, each summing to 1.
        status: "optimal" (KKT conditions hold within kkt_residual).
        objective: x'w - (gamma/2)(|l|^2 + |s|^2) at the solution.
        iterations: dual Newton iterations.
        kkt_residual: largest violation of any KKT condition (budgets, exposures, multiplier
            signs and complementary slackness; box and stationarity hold by construction).
        active_caps: positions at their cap (long and short counted separately).
        active_exposures: exposure limits that bind (non-zero multiplier).
        free_positions: positions strictly between 0 and their cap: the ones that move with x.
        held_long, held_short: non-zero positions per side.
        max_violation: largest constraint violation of w (see `check_constraints`).
        long_short_overlap: max_i min(l_i, s_i); 0 when the l/s split is exact.
        exposure_multipliers: (k,) lambda; > 0 upper limit binds, < 0 lower limit binds.
        budget_multipliers: (nu_l, nu_s), the value of one more unit of gross per side.
    """

    weights: np.ndarray
    long: np.ndarray
    short: np.ndarray
    status: str
    objective: float
    iterations: int
    kkt_residual: float
    active_caps: int
    active_exposures: int
    free_positions: int
    held_long: int
    held_short: int
    max_violation: float
    long_short_overlap: float
    exposure_multipliers: np.ndarray
    budget_multipliers: tuple[float, float]

    @property
    def overlapping_positions(self) -> int:
        """Stocks held both long and short (0 when the l/s split is exact)."""
        return int(np.count_nonzero(np.minimum(self.long, self.short) > 0))

    def realized_return(self, target: np.ndarray) -> float:
        """R = w . t with t the centered target (or return) of the round."""
        t = np.asarray(target, dtype=np.float64)
        return float(self.weights @ (t - t.mean()))


def solve_portfolio(
    x: np.ndarray,
    spec: PortfolioSpec,
    *,
    label: str = "?",
    kkt_tol: float = 1e-10,
    max_iter: int = 200,
    device: str = "cpu",
    cpu_threads: int | None = 1,
) -> PortfolioSolution:
    """Solve the spec's problem for one signal x with the fast exact dual Newton solver.

    Raises `PortfolioSolveError` (naming `label`) when the problem is infeasible or the solver
    does not reach `kkt_tol` even after a cold restart with four times the iterations.
    cpu_threads: torch threads during the solve (see `TCSettings.cpu_threads`).
    """
    from tc_assets.scoring._tc_dual import DualNewtonSolver, torch_threads

    with torch_threads(cpu_threads):
        solver = DualNewtonSolver(spec, device=device, kkt_tol=kkt_tol, max_iter=max_iter)
        batch = solver.solve_or_raise(np.asarray(x, dtype=np.float64)[None, :], label=label)
        return batch.solution(0, spec)


def inexact_split(
    solution: PortfolioSolution, spec: PortfolioSpec, tol: float = 1e-9
) -> str | None:
    """Why the solution's w = l - s is not a valid portfolio, or None when the split is exact.

    The l/s problem is the convex form of "longs sum to 1, shorts sum to 1" only while the fund
    wants its full gross (budget multipliers nu_l + nu_s >= 0). When the universe is small for
    the position caps (each side needs at least 1 / max_position names) and the quadratic term
    is strong, the optimum spreads over both sides of the same stocks and the net w has less
    than 1 long and 1 short. That portfolio cannot be traded as specified; this says so, with
    the settings that fix it.
    """
    if solution.long_short_overlap <= tol:
        return None
    nu_l, nu_s = solution.budget_multipliers
    w = solution.weights
    return (
        f"the optimizer holds {solution.overlapping_positions} stocks both long and short "
        f"(largest overlap {solution.long_short_overlap:.3g}), so the net portfolio is "
        f"{np.maximum(w, 0).sum():.4f} long and {np.maximum(-w, 0).sum():.4f} short instead of "
        f"1 and 1: the budget prices nu_l + nu_s = {nu_l + nu_s:.3g} < 0 mean the fund would "
        f"rather hold less than its full gross. The universe of {spec.n_stocks} stocks is too "
        f"small for these caps (each side needs at least {1 / spec.caps.max():.0f} names, the "
        f"caps sum to {spec.caps.sum():.2f} per side) at gamma {spec.gamma:g}: lower gamma or "
        "raise max_position (the optimizer resource's settings)."
    )


@dataclass(frozen=True)
class ConstraintViolation:
    """One violated constraint: its name, the worst index (stock or feature), by how much."""

    constraint: str
    index: int | None
    amount: float


def check_constraints(
    weights: np.ndarray, spec: PortfolioSpec, tol: float = 1e-8
) -> list[ConstraintViolation]:
    """Every constraint of the spec that w violates by more than tol (empty list: all hold).

    Checks w itself (long side l = max(w, 0), short side s = max(-w, 0)): each side sums to 1,
    0 <= l, s <= cap, |E'w| <= limit. One entry per violated constraint family, at its worst index.
    """
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (spec.n_stocks,):
        raise ValueError(f"weights has shape {w.shape}, expected ({spec.n_stocks},)")
    out: list[ConstraintViolation] = []
    if not np.all(np.isfinite(w)):
        return [ConstraintViolation("finite", int(np.argmin(np.isfinite(w))), float("inf"))]
    long, short = np.maximum(w, 0.0), np.maximum(-w, 0.0)
    for name, side in (("long_sum", long), ("short_sum", short)):
        gap = abs(side.sum() - 1.0)
        if gap > tol:
            out.append(ConstraintViolation(name, None, float(gap)))
    over = np.abs(w) - spec.caps
    if over.max() > tol:
        out.append(ConstraintViolation("position_cap", int(over.argmax()), float(over.max())))
    if spec.n_exposures:
        expo = np.abs(spec.exposures.T @ w) - spec.limits
        if expo.max() > tol:
            out.append(ConstraintViolation("exposure", int(expo.argmax()), float(expo.max())))
    return out
