"""True Contribution (TC): the derivative of the meta portfolio's return w.r.t. each stake.

Definition (README text)
------------------------
Let P be the (stocks x models) matrix of gaussianized tie-kept ranks of every model with a valid
submission (staked or not; missing ids 0), s >= 0 the stakes, S = sum(s) > 0, and t the round's
target (or realized `return`) centred to mean 0. The meta model is x(s) = P s / sum(s), the
meta portfolio w*(x) solves the optimizer problem of `optimizer.py`, and its return is
R(s) = t . w*(x(s)).

Bags. B dropout masks m_b in {0, 1}^models (default B = 100, keep probability 1 - p = 0.5) are
drawn once from the seed and shared by every engine. In bag b the stakes are those of
torch dropout, s_b = s * m_b / (1 - p), and by the chain rule through x,

    dR_b/ds_j = m_bj (P_j - x_b) . v_b / sum(m_b * s),   v_b = (dw*/dx)^T t at x_b = x(s_b),

so a dropped model gets 0 in that bag and a kept one its gradient w.r.t. the dropped-out stake
times 1/(1 - p) (which cancels against the normalization by the bag's total stake). A bag whose
kept stake sums to 0 has no meta model: it is skipped by every engine, and `TCResult.bags`
counts the bags used.

Scale. TC_j = mean_b [ S * dR_b/ds_j ] / kappa,   kappa = std(t) * tr(dw*/dx at x(s)).

* Multiplying every stake by c leaves x, w* and S * dR/ds unchanged: TC is stake-scale free.
* kappa is the optimizer's total gain from signal to weights (the number of free positions
  minus the binding budget and exposure rows, over gamma) times the target's spread, computed
  once per round at the full-stake meta portfolio and shared by all engines. If the optimizer
  were an isotropic linear map of gain g on the stocks it trades, a model whose deviation from
  the meta model has correlation rho with t and unit spread would get TC ~= rho: TC is in
  correlation units, the same size as CORR (the ratio is reported on generated data).
* A model's TC is positive when moving stake towards it raises the optimized portfolio's
  return: exposure the optimizer's limits remove earns nothing; signal it can trade earns.

Engines (`TCSettings.engine`), all on the same masks:
* "fast": exact dual Newton solves batched over bags, warm-started from the full-stake solution,
  and one active-set vector-Jacobian product per bag (`_tc_dual.py`); every model's gradient is
  then P^T v_b - x_b . v_b, one matrix product for all bags. torch, cuda when available.
* "reference": the published formulation: stakes as a torch leaf, dropout, the meta model as a
  linear layer, the optimizer as a cvxpylayers `CvxpyLayer` (diffcp, SCS at eps 1e-10, LSMR
  derivative), R.backward(). Slow; for validation.
* "leave_one_out": TC_j = (R(s) - R(s with s_j = 0)) / kappa for staked models, 0 for the
  others; no bags. Small rounds only. Its flaws are the reason for the gradient: unstaked models
  get 0 and identical predictions with different stakes get different scores.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from tc_assets.scoring._tc_dual import DualBatch, DualNewtonSolver, resolve_device, torch_threads
from tc_assets.scoring.optimizer import PortfolioSolution, PortfolioSpec

__all__ = ["TCResult", "TCSettings", "dropout_masks", "true_contribution"]

Engine = Literal["fast", "reference", "leave_one_out"]


class TCSettings(BaseModel):
    """How TC is computed: engine, bags, dropout, solver accuracy."""

    model_config = ConfigDict(frozen=True)

    engine: Engine = Field(
        default="fast",
        description="'fast' (exact active-set gradients, production), 'reference' (cvxpylayers, "
        "slow, for validation) or 'leave_one_out' (drop each staked model; small rounds only).",
    )
    bags: int = Field(default=100, ge=1, description="Dropout bags averaged into TC.")
    dropout: float = Field(
        default=0.5,
        ge=0.0,
        lt=1.0,
        description="Probability that a model's stake is dropped in a bag (0: every bag is the "
        "plain gradient).",
    )
    seed: int = Field(default=0, ge=0, description="Seed of the dropout masks.")
    antithetic: bool = Field(
        default=True,
        description="With dropout 0.5, draw the bags in complementary pairs (a mask and its "
        "complement): each bag alone is still a random 50% dropout and the mean estimates the "
        "same TC, but with an even number of bags every model is kept in exactly half of them, "
        "so no model's TC rests on a luckier keep count than another's. False: independent "
        "bags, as in the published method.",
    )
    target_column: Literal["target", "return"] = Field(
        default="target",
        description="Column of resolved.parquet whose centred values are t in R = w . t.",
    )
    device: str = Field(
        default="auto", description="torch device of the fast engine ('auto': cuda if present)."
    )
    kkt_tol: float = Field(
        default=1e-10,
        gt=0,
        description="Fast solver: largest KKT residual accepted (budgets and exposures, absolute).",
    )
    max_newton_iter: int = Field(
        default=200,
        ge=1,
        description="Fast solver: Newton iterations per solve; a solve that does not converge is "
        "retried from a cold start with 4x as many, then fails the round.",
    )
    reference_solver: Literal["SCS", "Clarabel"] = Field(
        default="SCS", description="Reference engine: conic solver behind diffcp."
    )
    reference_eps: float = Field(
        default=1e-10,
        gt=0,
        description="Reference engine: solver tolerance (SCS eps_abs = eps_rel; Clarabel gap "
        "and feasibility tolerances). At SCS's default 1e-4 the gradients are off by ~1e-2.",
    )
    reference_max_iters: int = Field(
        default=100_000, ge=1, description="Reference engine: SCS iteration limit."
    )
    reference_mode: Literal["lsmr", "lsqr", "dense"] = Field(
        default="lsmr",
        description="Reference engine: diffcp's derivative mode. lsmr reaches ~1e-6 relative "
        "gradient accuracy; lsqr stops near 1e-4; dense is exact but O(size^2) memory.",
    )
    loo_max_models: int = Field(
        default=200, ge=1, description="Leave-one-out engine: most staked models allowed."
    )
    cpu_threads: int | None = Field(
        default=1,
        ge=1,
        description="torch CPU threads while the engine runs (restored afterwards; None keeps "
        "torch's setting). Default 1: the solver's per-iteration tensors are small, so extra "
        "threads gain little, and on a busy machine oversubscribed OpenMP threads wait on each "
        "other (the full-size round took 7x longer with 2 threads than with 1 under load).",
    )


@dataclass(frozen=True)
class TCResult:
    """TC of every model (columns of P, in order) and what the tc_scores metadata reports.

    Attributes:
        engine: the engine used.
        tc: (models,) mean over the bags of S * dR_b/ds_j / scale.
        tc_std: (models,) standard deviation of the per-bag values (ddof=1; 0 for one bag).
        bag_tc: (bags, models) per-bag values (bags used only, in order).
        bags: bags used; skipped_bags: indices of the bags with zero kept stake.
        masks: (requested bags, models) the dropout keep masks.
        unbagged_tc: (models,) the plain gradient at the full stakes on the same scale (no
            dropout); None for leave-one-out.
        scale: kappa = target_std * jacobian_trace (0 when nothing is free: then TC = 0).
        portfolio: the full-stake meta portfolio; realized_return: its R = w . t.
        bag_returns: (bags,) R of each bag's portfolio.
        iterations: (bags,) dual Newton iterations per bag (fast and leave-one-out engines:
            per re-optimization), None for the reference engine.
        kkt_max: largest KKT residual over every fast solve (NaN for the reference engine).
        seconds: engine wall time; time_per_bag_s: seconds / max(bags, 1).
        timings: seconds by phase ("meta_portfolio", "bags", ...).
        device: where the solves ran.
    """

    engine: str
    tc: np.ndarray
    tc_std: np.ndarray
    bag_tc: np.ndarray
    bags: int
    skipped_bags: list[int]
    masks: np.ndarray
    unbagged_tc: np.ndarray | None
    scale: float
    target_std: float
    jacobian_trace: float
    portfolio: PortfolioSolution
    realized_return: float
    bag_returns: np.ndarray
    iterations: np.ndarray | None
    kkt_max: float
    seconds: float
    time_per_bag_s: float
    device: str
    timings: dict[str, float] = field(default_factory=dict)

    def split_half(self) -> float:
        """Pearson correlation across models of the TC from two halves of the bags: the
        stability of the bagged estimate. Halves: alternate pairs of bags by their index
        among the requested bags (so an antithetic pair stays together even when a bag was
        skipped); NaN with fewer than 4 bags."""
        if self.bags < 4:
            return float("nan")
        skipped = set(self.skipped_bags)
        used = np.array([i for i in range(self.masks.shape[0]) if i not in skipped])
        half = (used // 2) % 2 == 0
        a, b = self.bag_tc[half].mean(axis=0), self.bag_tc[~half].mean(axis=0)
        if a.std() == 0 or b.std() == 0:
            return float("nan")
        return float(np.corrcoef(a, b)[0, 1])


def dropout_masks(
    models: int, bags: int, dropout: float, seed: int, antithetic: bool = False
) -> np.ndarray:
    """(bags, models) keep masks: Bernoulli(1 - dropout), as torch dropout draws them.

    Drawn on the CPU from torch.Generator(seed), so every engine and device gets the same bags.
    antithetic (dropout 0.5 only): bags 2i and 2i + 1 are a mask and its complement.
    """
    gen = torch.Generator().manual_seed(seed)
    pairs = antithetic and dropout == 0.5
    draws = (bags + 1) // 2 if pairs else bags
    keep = torch.full((draws, models), 1.0 - dropout, dtype=torch.float64)
    masks = torch.bernoulli(keep, generator=gen).to(torch.bool).numpy()
    if pairs:
        masks = np.stack([masks, ~masks], axis=1).reshape(2 * draws, models)[:bags]
    return masks


@dataclass(frozen=True)
class _Round:
    """Validated inputs shared by the engines."""

    p: np.ndarray  # (stocks, models)
    stakes: np.ndarray  # (models,)
    total: float
    t: np.ndarray  # centred target
    spec: PortfolioSpec
    label: str


def _validate(
    p: np.ndarray, stakes: np.ndarray, target: np.ndarray, spec: PortfolioSpec, label: str
) -> _Round:
    p = np.ascontiguousarray(p, dtype=np.float64)
    s = np.array(stakes, dtype=np.float64)
    t = np.array(target, dtype=np.float64)
    if p.ndim != 2:
        raise ValueError(f"round {label}: P must be (stocks, models), got shape {p.shape}")
    n, m = p.shape
    if s.shape != (m,):
        raise ValueError(f"round {label}: stakes has shape {s.shape}, expected ({m},)")
    if t.shape != (n,) or spec.n_stocks != n:
        raise ValueError(f"round {label}: target and spec must cover P's {n} stocks")
    if not (np.all(np.isfinite(p)) and np.all(np.isfinite(t)) and np.all(np.isfinite(s))):
        raise ValueError(f"round {label}: P, stakes and target must be finite")
    if np.any(s < 0):
        raise ValueError(f"round {label}: stakes must be >= 0")
    total = float(s.sum())
    if total <= 0:
        raise ValueError(f"round {label}: TC needs at least one positive stake")
    t -= t.mean()
    if t.std() == 0:
        raise ValueError(f"round {label}: the target is constant")
    return _Round(p=p, stakes=s, total=total, t=t, spec=spec, label=label)


def true_contribution(
    p: np.ndarray,
    stakes: np.ndarray,
    target: np.ndarray,
    spec: PortfolioSpec,
    settings: TCSettings | None = None,
    *,
    label: str = "?",
) -> TCResult:
    """TC of every column of P for one round (see the module docstring for the definition).

    Args:
        p: (stocks, models) gaussianized ranks (`meta_model.prediction_matrix`), float64.
        stakes: (models,) stakes >= 0 with a positive sum.
        target: (stocks,) the round's target or realized return (centred here).
        spec: the round's optimizer problem (`optimizer.build_spec`).
        settings: engine, bags, dropout, tolerances.
        label: the round, named in every error.

    Raises:
        PortfolioSolveError: a solve failed after its retry (names round, bag and status).
        ValueError: bad inputs, or a leave-one-out round above its size guard.
    """
    settings = settings or TCSettings()
    with torch_threads(settings.cpu_threads):
        return _true_contribution(p, stakes, target, spec, settings, label)


def _true_contribution(
    p: np.ndarray,
    stakes: np.ndarray,
    target: np.ndarray,
    spec: PortfolioSpec,
    settings: TCSettings,
    label: str,
) -> TCResult:
    rnd = _validate(p, stakes, target, spec, label)
    start = time.perf_counter()
    device = resolve_device(settings.device) if settings.engine != "reference" else None
    solver = DualNewtonSolver(
        spec, device=device or "cpu", kkt_tol=settings.kkt_tol, max_iter=settings.max_newton_iter
    )
    # The full-stake meta portfolio fixes the scale and warm-starts the bags.
    x_full = rnd.p @ (rnd.stakes / rnd.total)
    full = solver.solve_or_raise(x_full[None, :], label=label)
    portfolio = full.solution(0, spec)
    trace = solver.jacobian_trace(full, 0)
    target_std = float(rnd.t.std())
    scale = target_std * trace
    timings = {"meta_portfolio": time.perf_counter() - start}
    masks = dropout_masks(
        rnd.p.shape[1], settings.bags, settings.dropout, settings.seed, settings.antithetic
    )
    if settings.engine == "leave_one_out":
        return _leave_one_out(rnd, settings, solver, full, portfolio, trace, scale, start)
    kept = masks @ rnd.stakes
    used = np.flatnonzero(kept > 0)
    skipped = [int(b) for b in np.flatnonzero(kept <= 0)]
    bags_start = time.perf_counter()
    if settings.engine == "fast":
        raw, unbagged, returns, iterations, kkt = _fast(rnd, solver, full, masks[used], used)
    else:
        from tc_assets.scoring._tc_reference import reference_gradients

        raw, unbagged, returns = reference_gradients(
            rnd.p, rnd.stakes, rnd.t, spec, masks[used], used, settings, label
        )
        iterations, kkt = None, float("nan")
    now = time.perf_counter()
    timings["bags"] = now - bags_start
    inv = 1.0 / scale if scale > 0 else 0.0
    bag_tc = raw * inv
    m = rnd.p.shape[1]
    return TCResult(
        engine=settings.engine,
        tc=bag_tc.mean(axis=0) if used.size else np.zeros(m),
        tc_std=bag_tc.std(axis=0, ddof=1) if used.size > 1 else np.zeros(m),
        bag_tc=bag_tc,
        bags=int(used.size),
        skipped_bags=skipped,
        masks=masks,
        unbagged_tc=unbagged * inv,
        scale=scale,
        target_std=target_std,
        jacobian_trace=trace,
        portfolio=portfolio,
        realized_return=portfolio.realized_return(rnd.t),
        bag_returns=returns,
        iterations=iterations,
        kkt_max=max(kkt, float(full.kkt.max())) if iterations is not None else float("nan"),
        seconds=now - start,
        time_per_bag_s=(now - start) / max(int(used.size), 1),
        device=str(solver.device) if device is not None else "cpu",
        timings=timings,
    )


def _fast(
    rnd: _Round, solver: DualNewtonSolver, full: DualBatch, masks: np.ndarray, bag_ids: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float]:
    """Per-bag raw gradients S * dR_b/ds (bags, models), the unbagged one, R per bag, Newton
    iterations per bag and the worst KKT residual.

    The bags' signals and the models' gradients are one (bags x models) @ (models x stocks)
    product each: x_b = P (m_b * s) / sum(m_b * s), grad_bj = (P_j - x_b) . v_b.
    """
    dd = {"dtype": torch.float64, "device": solver.device}
    p = torch.as_tensor(rnd.p, **dd)
    t = torch.as_tensor(rnd.t, **dd)
    v_full = solver.vjp(full, t)
    unbagged = (v_full @ p - (full.x * v_full).sum(dim=1, keepdim=True))[0]
    if masks.shape[0] == 0:
        empty = np.zeros((0, rnd.p.shape[1]))
        return empty, unbagged.cpu().numpy(), np.zeros(0), np.zeros(0, dtype=np.int64), 0.0
    m = torch.as_tensor(masks, **dd)
    kept = m * torch.as_tensor(rnd.stakes, **dd)
    kept_total = kept.sum(dim=1)
    x = (kept @ p.T) / kept_total[:, None]
    batch = solver.solve_or_raise(
        x, label=rnd.label, lam0=full.lam, bag_ids=[int(b) for b in bag_ids]
    )
    v = solver.vjp(batch, t)  # (B, stocks): dR_b/dx
    grad = v @ p - (x * v).sum(dim=1, keepdim=True)
    raw = m * grad * (rnd.total / kept_total)[:, None]
    return (
        raw.cpu().numpy(),
        unbagged.cpu().numpy(),
        (batch.weights @ t).cpu().numpy(),
        batch.iterations.numpy().copy(),
        float(batch.kkt.max()),
    )


def _leave_one_out(
    rnd: _Round,
    settings: TCSettings,
    solver: DualNewtonSolver,
    full: DualBatch,
    portfolio: PortfolioSolution,
    trace: float,
    scale: float,
    start: float,
) -> TCResult:
    """(R(s) - R(s with s_j = 0)) / scale for each staked model j, 0 for the others.

    The only staked model of a round leaves no meta model behind: R without it is 0.
    A failed re-optimization raises naming "bag" = the dropped model's column.
    """
    staked = np.flatnonzero(rnd.stakes > 0)
    if staked.size > settings.loo_max_models:
        raise ValueError(
            f"round {rnd.label}: leave-one-out is for small rounds ({staked.size} staked models "
            f"> loo_max_models={settings.loo_max_models})"
        )
    r_full = portfolio.realized_return(rnd.t)
    raw = np.zeros(rnd.p.shape[1])
    rest = rnd.total - rnd.stakes[staked]
    alone = rest <= 0
    rows = staked[~alone]
    iterations = np.zeros(0, dtype=np.int64)
    kkt = float(full.kkt.max())
    if rows.size:
        x = (rnd.p @ rnd.stakes)[None, :] - rnd.p[:, rows].T * rnd.stakes[rows, None]
        x /= rest[~alone, None]
        batch = solver.solve_or_raise(
            x, label=f"{rnd.label} (leave-one-out)", lam0=full.lam, bag_ids=rows.tolist()
        )
        raw[rows] = r_full - batch.weights.cpu().numpy() @ rnd.t
        iterations, kkt = batch.iterations.numpy().copy(), max(kkt, float(batch.kkt.max()))
    raw[staked[alone]] = r_full
    tc = raw / scale if scale > 0 else np.zeros_like(raw)
    seconds = time.perf_counter() - start
    return TCResult(
        engine="leave_one_out",
        tc=tc,
        tc_std=np.zeros_like(tc),
        bag_tc=tc[None, :],
        bags=0,
        skipped_bags=[],
        masks=np.zeros((0, tc.size), dtype=bool),
        unbagged_tc=None,
        scale=scale,
        target_std=float(rnd.t.std()),
        jacobian_trace=trace,
        portfolio=portfolio,
        realized_return=r_full,
        bag_returns=np.zeros(0),
        iterations=iterations,
        kkt_max=kkt,
        seconds=seconds,
        time_per_bag_s=seconds / max(int(staked.size), 1),
        device=str(solver.device),
        timings={"leave_one_out": seconds},
    )
