"""True Contribution (TC): the derivative of the meta portfolio's return w.r.t. each model's
weight in the meta model, through the optimizer, averaged over dropout bags.

Definition (README text)
------------------------
Let P be the (stocks x models) matrix of gaussianized tie-kept ranks of every model with a valid
submission (staked or not; missing ids 0), s >= 0 the stakes, S = sum(s) > 0, and t the round's
target (or realized `return`) centred to mean 0. For layer weights w >= 0 the meta model is
x(w) = P w / sum(w), the meta portfolio w*(x) solves the optimizer problem of `optimizer.py`,
and its return is R(w) = t . w*(x(w)).

Bags (the published method). B dropout masks m_b in {0, 1}^models (default B = 100, keep
probability 1 - p = 0.5) are drawn once from the seed for the staked models and shared by every
engine (a zero-stake model has nothing to drop, so adding one changes no bag). Bag b sets the
layer's weights to the dropped-out stakes, w_b = s * m_b / (1 - p) (torch dropout), with total
S_b = sum(w_b), and reads the gradient with respect to those weights:

    dR/dw_j at w_b = (P_j - x_b) . v_b / S_b,    x_b = x(w_b),  v_b = (dw*/dx)^T t at x_b.

Every model, kept, dropped or unstaked, gets this value in every bag: it depends on the model
only through its column P_j, never on its own stake or mask. A bag whose kept stake is 0 has no
meta model and is skipped; so is a bag whose portfolio is not tradable (see below).

Scale. With G_bj = S * dR/dw_j at w_b = (S / S_b) (P_j - x_b) . v_b,

    TC_j = mean_b G_bj / kappa,    kappa = mean_b [ (S / S_b) t . v_b ] / std(t).

kappa is G for the standardized target itself: a model whose deviation from every bag's meta
model were t / std(t) would get TC = 1, so TC is in correlation units (a model's TC is the share
of a perfect unit-spread signal's contribution that its own deviation achieves). t . v_b =
t' (dw*/dx) t >= 0 is a quadratic form of the optimizer's (positive semi-definite) Jacobian,
summed over every stock, so kappa changes by a small fraction when one position enters or leaves
the free set, and it is positive whenever any bag passes any of the target to its portfolio.
When none does (no free position in any bag, e.g. a tiny gamma makes the problem a linear
program), every gradient is 0, TC is undefined and the round fails naming the setting.

* Multiplying every stake by c leaves x_b, w*, S / S_b and so TC unchanged.
* Identical columns of P get identical TC whatever their stakes; a zero-stake model is scored
  in every bag. TC_j = P_j . g - c is affine in the model's ranks, with
  g = mean_b (S / S_b) v_b / kappa and c = mean_b (S / S_b) x_b . v_b / kappa (`TCResult.g`,
  `TCResult.c`): a candidate added with zero stake changes no x_b or v_b, so its TC is that dot
  product.

Tradable bags. The l/s problem is a valid portfolio only when no stock is held on both sides
(see `optimizer.inexact_split`). A bag whose portfolio overlaps by more than `SPLIT_TOL` is
skipped and counted (`TCResult.untradable_bags`); when more than
`TCSettings.max_untradable_bags` of the requested bags are, the round fails with the reason and
the settings to change.

Engines (`TCSettings.engine`, the `ENGINES` registry; all return a `TCResult`), on the same masks:
* "fast": exact dual Newton solves batched over bags, warm-started from the full-stake solution,
  and one active-set vector-Jacobian product per bag (`_tc_dual.py`); every model's gradient is
  then P^T v_b - x_b . v_b, one matrix product for all bags. torch, cuda when available.
* "reference": the published formulation: the dropped-out stakes w_b are a torch leaf, the meta
  model a linear layer over them, the optimizer a cvxpylayers `CvxpyLayer` (diffcp, SCS at eps
  1e-10, LSMR derivative), R.backward() leaves dR/dw in the leaf's .grad. Slow; for validation.
* "leave_one_out": TC_j = (R(s) - R(s with s_j = 0)) / kappa0 for staked models, 0 for the
  others, kappa0 = t . v / std(t) at the full stakes; no bags. Small rounds only. Its flaws are
  the reason for the gradient: unstaked models get 0 and identical predictions with different
  stakes get different scores.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

if TYPE_CHECKING:  # torch and the solver load with the first TC, not with the definitions
    import torch

    from tc_assets.scoring._tc_dual import DualBatch, DualNewtonSolver
    from tc_assets.scoring.optimizer import PortfolioSolution, PortfolioSpec

__all__ = [
    "ENGINES",
    "SPLIT_TOL",
    "BagGradients",
    "TCAttribution",
    "TCResult",
    "TCSettings",
    "candidate_tc",
    "dropout_masks",
    "round_masks",
    "settings_hash",
    "tc_attribution",
    "tc_summary",
    "true_contribution",
]

Engine = Literal["fast", "reference", "leave_one_out"]

SPLIT_TOL = 1e-7
"""A bag's portfolio is tradable when no stock is held more than this on both sides."""

PASSTHROUGH_MIN = 1e-9
"""Below this share of the target passed to the bags' portfolios, TC is undefined."""


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
        "plain gradient at the full stakes).",
    )
    seed: int = Field(default=0, ge=0, description="Seed of the dropout masks.")
    antithetic: bool = Field(
        default=True,
        description="With dropout 0.5, draw the bags in complementary pairs (a mask and its "
        "complement): each bag alone is still a random 50% dropout and the mean estimates the "
        "same TC, but every model is kept in exactly half of the bags, so the bags' meta models "
        "are balanced around the full one. Needs an even number of bags. Ignored at other "
        "dropout rates. False: independent bags, as in the published method.",
    )
    max_untradable_bags: float = Field(
        default=0.1,
        ge=0.0,
        le=1.0,
        description="Largest share of the requested bags whose portfolio may hold a stock both "
        "long and short (not tradable as specified: too small a universe for the caps); those "
        "bags are skipped and counted, and above this share the round fails.",
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

    @model_validator(mode="after")
    def _pairs_need_even_bags(self) -> TCSettings:
        if self.antithetic and self.dropout == 0.5 and self.bags % 2:
            raise ValueError(
                f"antithetic bags come in complementary pairs, so bags must be even (got "
                f"{self.bags}); use an even number or antithetic: false"
            )
        return self


@dataclass(frozen=True)
class TCResult:
    """TC of every model (columns of P, in order) and what the tc_scores metadata reports.

    Attributes:
        engine: the engine used.
        tc: (models,) mean over the used bags of G_bj / kappa.
        tc_std: (models,) standard deviation of the per-bag values (ddof=1; 0 for one bag).
        bag_tc: (bags used, models) per-bag values G_bj / kappa, in bag order.
        bags: bags used.
        skipped_bags: indices of the bags with zero kept stake (no meta model).
        untradable_bags: indices of the bags skipped because their portfolio held a stock both
            long and short.
        masks: (requested bags, models) the dropout keep masks.
        unbagged_tc: (models,) the plain gradient at the full stakes on the same scale (no
            dropout); None for leave-one-out.
        scale: kappa (see the module docstring); always > 0.
        passthrough: mean_b (S/S_b) t'(dw*/dx)t over mean_b (S/S_b) |t|^2 / gamma, in (0, 1]:
            the share of the target the optimizer lets through to the bags' portfolios.
        target_std: std(t).
        g: (stocks,) TC's weight on each stock's rank, and c its offset: tc = P' g - c
            (None and NaN for leave-one-out).
        target_g: (stocks,) the centred target scaled like g (g where every position were
            free: mean_b (S / S_b) t / (gamma kappa)); bound_g: its part on positions at a
            bound (see `tc_attribution`). None for leave-one-out.
        portfolio: the full-stake meta portfolio; realized_return: its R = w . t.
        bag_returns: (bags used,) R of each bag's portfolio.
        iterations: (bags solved,) dual Newton iterations per bag (fast and leave-one-out
            engines: per re-optimization), None for the reference engine.
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
    untradable_bags: list[int]
    masks: np.ndarray
    unbagged_tc: np.ndarray | None
    scale: float
    passthrough: float
    target_std: float
    g: np.ndarray | None
    c: float
    target_g: np.ndarray | None
    bound_g: np.ndarray | None
    portfolio: PortfolioSolution
    realized_return: float
    bag_returns: np.ndarray
    iterations: np.ndarray | None
    kkt_max: float
    seconds: float
    time_per_bag_s: float
    device: str
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def used_bags(self) -> np.ndarray:
        """Indices (among the requested bags) of the bags in bag_tc, in order."""
        dropped = set(self.skipped_bags) | set(self.untradable_bags)
        return np.array([i for i in range(self.masks.shape[0]) if i not in dropped], dtype=int)

    def split_half(self) -> float:
        """Pearson correlation across models of the TC from two halves of the bags: the
        stability of the bagged estimate. Halves: alternate pairs of bags by their index
        among the requested bags (so an antithetic pair stays together even when a bag was
        skipped); NaN with fewer than 4 bags."""
        if self.bags < 4:
            return float("nan")
        half = (self.used_bags // 2) % 2 == 0
        a, b = self.bag_tc[half].mean(axis=0), self.bag_tc[~half].mean(axis=0)
        if a.std() == 0 or b.std() == 0:
            return float("nan")
        return float(np.corrcoef(a, b)[0, 1])


@dataclass(frozen=True)
class BagGradients:
    """What an engine computes for the bags it solves (rows, in order).

    Attributes:
        raw: (rows, models) G_bj = S * dR/dw_j at the bag's layer weights w_b.
        weight: (rows,) S / S_b.
        v: (rows, stocks) dR/dx = (dw*/dx)' t at the bag's meta model.
        x: (rows, stocks) the bag's meta model.
        returns: (rows,) R = t . w* of the bag's portfolio.
        overlap: (rows,) max_i min(long_i, short_i) of the bag's portfolio.
        bound: (rows, stocks) True where the stock is at a bound on both sides (0, its cap, or
            a zero cap for zero liquidity): nothing of the signal there moves the portfolio.
        iterations: (rows,) solver iterations, None when the engine has none to report.
        kkt: largest KKT residual (NaN when the engine has none to report).
    """

    raw: np.ndarray
    weight: np.ndarray
    v: np.ndarray
    x: np.ndarray
    returns: np.ndarray
    overlap: np.ndarray
    bound: np.ndarray
    iterations: np.ndarray | None
    kkt: float

    def rows(self, keep: np.ndarray) -> BagGradients:
        """The rows where keep is True."""
        its = None if self.iterations is None else self.iterations[keep]
        return BagGradients(
            self.raw[keep],
            self.weight[keep],
            self.v[keep],
            self.x[keep],
            self.returns[keep],
            self.overlap[keep],
            self.bound[keep],
            its,
            self.kkt,
        )


def dropout_masks(
    models: int, bags: int, dropout: float, seed: int, antithetic: bool = False
) -> np.ndarray:
    """(bags, models) keep masks: Bernoulli(1 - dropout), as torch dropout draws them.

    Drawn on the CPU from torch.Generator(seed), so every engine and device gets the same bags.
    antithetic (dropout 0.5 only): bags 2i and 2i + 1 are a mask and its complement.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    pairs = antithetic and dropout == 0.5
    draws = (bags + 1) // 2 if pairs else bags
    keep = torch.full((draws, models), 1.0 - dropout, dtype=torch.float64)
    masks = torch.bernoulli(keep, generator=gen).to(torch.bool).numpy()
    if pairs:
        masks = np.stack([masks, ~masks], axis=1).reshape(2 * draws, models)[:bags]
    return masks


def round_masks(stakes: np.ndarray, settings: TCSettings) -> np.ndarray:
    """A round's (bags, models) keep masks, drawn for the staked models in column order.

    A zero-stake model has no weight to drop (its mask is False and changes nothing), so adding
    or removing one leaves every bag, and every other model's TC, exactly as it was.
    """
    staked = np.asarray(stakes) > 0
    masks = np.zeros((settings.bags, staked.size), dtype=bool)
    masks[:, staked] = dropout_masks(
        int(staked.sum()), settings.bags, settings.dropout, settings.seed, settings.antithetic
    )
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


@dataclass(frozen=True)
class _Full:
    """The full-stake meta portfolio, solved by the fast solver for every engine: it is the
    portfolio reported, the warm start of the bags and leave-one-out's baseline."""

    solver: DualNewtonSolver
    batch: DualBatch
    portfolio: PortfolioSolution
    device: str
    start: float
    seconds: float


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


def _solve_full(rnd: _Round, settings: TCSettings) -> _Full:
    from tc_assets.scoring._tc_dual import DualNewtonSolver, resolve_device

    start = time.perf_counter()
    device = resolve_device(settings.device) if settings.engine == "fast" else "cpu"
    solver = DualNewtonSolver(
        rnd.spec, device=device, kkt_tol=settings.kkt_tol, max_iter=settings.max_newton_iter
    )
    batch = solver.solve_or_raise((rnd.p @ (rnd.stakes / rnd.total))[None, :], label=rnd.label)
    return _Full(
        solver=solver,
        batch=batch,
        portfolio=batch.solution(0, rnd.spec),
        device=str(solver.device),
        start=start,
        seconds=time.perf_counter() - start,
    )


def _gradients(
    solver: DualNewtonSolver,
    batch: DualBatch,
    p: torch.Tensor,
    t: torch.Tensor,
    weight: torch.Tensor,
) -> BagGradients:
    """G = weight * (P' v - x . v) for every row of a solved batch, v = (dw*/dx)' t."""
    import torch

    v = solver.vjp(batch, t)
    raw = weight[:, None] * (v @ p - (batch.x * v).sum(dim=1, keepdim=True))
    st = batch.state
    return BagGradients(
        raw=raw.cpu().numpy(),
        weight=weight.cpu().numpy(),
        v=v.cpu().numpy(),
        x=batch.x.cpu().numpy(),
        returns=(batch.weights @ t).cpu().numpy(),
        overlap=torch.minimum(st.long, st.short).amax(dim=1).cpu().numpy(),
        bound=solver.bound(batch).cpu().numpy(),
        iterations=batch.iterations.numpy().copy(),
        kkt=float(batch.kkt.max()),
    )


def _fast_bags(
    rnd: _Round, masks: np.ndarray, bag_ids: np.ndarray, settings: TCSettings, full: _Full
) -> tuple[BagGradients, BagGradients]:
    """The bags (rows of masks) and the unbagged gradient by the dual Newton solver: the bags'
    meta models are one (bags x models) @ (models x stocks) product, their solves one batch."""
    import torch

    solver = full.solver
    dd = {"dtype": torch.float64, "device": solver.device}
    p = torch.as_tensor(rnd.p, **dd)
    t = torch.as_tensor(rnd.t, **dd)
    unbagged = _gradients(solver, full.batch, p, t, torch.ones(1, **dd))
    w = torch.as_tensor(masks, **dd) * torch.as_tensor(rnd.stakes, **dd) / (1.0 - settings.dropout)
    s_b = w.sum(dim=1)
    x = (w @ p.T) / s_b[:, None]
    batch = solver.solve_or_raise(
        x, label=rnd.label, lam0=full.batch.lam, bag_ids=[int(b) for b in bag_ids]
    )
    return _gradients(solver, batch, p, t, rnd.total / s_b), unbagged


def _reference_bags(
    rnd: _Round, masks: np.ndarray, bag_ids: np.ndarray, settings: TCSettings, full: _Full
) -> tuple[BagGradients, BagGradients]:
    from tc_assets.scoring._tc_reference import reference_bags

    return reference_bags(rnd.p, rnd.stakes, rnd.t, rnd.spec, masks, bag_ids, settings, rnd.label)


BagEngine = Callable[
    [_Round, np.ndarray, np.ndarray, TCSettings, _Full], tuple[BagGradients, BagGradients]
]


def _scale(rnd: _Round, bags: BagGradients, what: str) -> tuple[float, float]:
    """(kappa, passthrough) from the used bags; raises when no bag passes any target through."""
    sensitivity = bags.weight * (bags.v @ rnd.t)
    ceiling = float(bags.weight.mean()) * float(rnd.t @ rnd.t) / rnd.spec.gamma
    passthrough = float(sensitivity.mean()) / ceiling
    if not passthrough > PASSTHROUGH_MIN:
        raise ValueError(
            f"round {rnd.label}: TC is undefined: the optimizer passes none of the target to "
            f"the portfolio in {what} (t'(dw*/dx)t is {max(passthrough, 0.0):.2g} of its largest "
            f"value: no position is free at gamma {rnd.spec.gamma:g}, so every gradient is 0). Raise "
            "gamma or max_position (the optimizer resource's settings)."
        )
    return float(sensitivity.mean()) / float(rnd.t.std()), passthrough


def _check_tradable(
    rnd: _Round, settings: TCSettings, overlap: np.ndarray, ids: np.ndarray
) -> None:
    bad = overlap > SPLIT_TOL
    if bad.sum() <= settings.max_untradable_bags * settings.bags and not bad.all():
        return
    raise ValueError(
        f"round {rnd.label}: {int(bad.sum())} of {settings.bags} TC bags (e.g. bag "
        f"{int(ids[bad][0])}) hold stocks both long and short (largest overlap "
        f"{overlap.max():.3g}), more than max_untradable_bags={settings.max_untradable_bags:g} "
        f"allows: their portfolios cannot be traded as specified. The universe of "
        f"{rnd.spec.n_stocks} stocks is too small for the caps at gamma {rnd.spec.gamma:g}: "
        "lower gamma or raise max_position (the optimizer resource's settings)."
    )


def _bagged(bag_engine: BagEngine) -> Callable[[_Round, TCSettings], TCResult]:
    """A TC engine from a function that computes the bags' gradients."""

    def run(rnd: _Round, settings: TCSettings) -> TCResult:
        full = _solve_full(rnd, settings)
        masks = round_masks(rnd.stakes, settings)
        kept = masks @ rnd.stakes
        solved = np.flatnonzero(kept > 0)
        bags_start = time.perf_counter()
        if solved.size == 0:
            raise ValueError(f"round {rnd.label}: no TC bag keeps any stake")
        bags, unbagged = bag_engine(rnd, masks[solved], solved, settings, full)
        _check_tradable(rnd, settings, bags.overlap, solved)
        tradable = bags.overlap <= SPLIT_TOL
        used = bags.rows(tradable)
        kappa, passthrough = _scale(rnd, used, f"any of the {tradable.sum()} bags")
        now = time.perf_counter()
        bag_tc = used.raw / kappa
        m = rnd.p.shape[1]
        return TCResult(
            engine=settings.engine,
            tc=bag_tc.mean(axis=0),
            tc_std=bag_tc.std(axis=0, ddof=1) if bag_tc.shape[0] > 1 else np.zeros(m),
            bag_tc=bag_tc,
            bags=int(bag_tc.shape[0]),
            skipped_bags=[int(b) for b in np.flatnonzero(kept <= 0)],
            untradable_bags=[int(b) for b in solved[~tradable]],
            masks=masks,
            unbagged_tc=unbagged.raw[0] / kappa,
            scale=kappa,
            passthrough=passthrough,
            target_std=float(rnd.t.std()),
            g=(used.weight[:, None] * used.v).mean(axis=0) / kappa,
            c=float((used.weight * (used.x * used.v).sum(axis=1)).mean()) / kappa,
            target_g=float(used.weight.mean()) * rnd.t / (rnd.spec.gamma * kappa),
            bound_g=(used.weight[:, None] * used.bound).mean(axis=0)
            * rnd.t
            / (rnd.spec.gamma * kappa),
            portfolio=full.portfolio,
            realized_return=full.portfolio.realized_return(rnd.t),
            bag_returns=used.returns,
            iterations=bags.iterations,
            kkt_max=max(bags.kkt, float(full.batch.kkt.max())),
            seconds=now - full.start,
            time_per_bag_s=(now - full.start) / max(int(bag_tc.shape[0]), 1),
            device=full.device,
            timings={"meta_portfolio": full.seconds, "bags": now - bags_start},
        )

    return run


def _leave_one_out(rnd: _Round, settings: TCSettings) -> TCResult:
    """(R(s) - R(s with s_j = 0)) / kappa0 for each staked model j, 0 for the others, kappa0
    the scale of the full-stake meta model alone.

    The only staked model of a round leaves no meta model behind: R without it is 0.
    A failed re-optimization raises naming "bag" = the dropped model's column.
    """
    import torch

    staked = np.flatnonzero(rnd.stakes > 0)
    if staked.size > settings.loo_max_models:
        raise ValueError(
            f"round {rnd.label}: leave-one-out is for small rounds ({staked.size} staked models "
            f"> loo_max_models={settings.loo_max_models})"
        )
    full = _solve_full(rnd, settings)
    solver = full.solver
    dd = {"dtype": torch.float64, "device": solver.device}
    plain = _gradients(
        solver,
        full.batch,
        torch.as_tensor(rnd.p, **dd),
        torch.as_tensor(rnd.t, **dd),
        torch.ones(1, **dd),
    )
    kappa, passthrough = _scale(rnd, plain, "the full-stake meta portfolio")
    r_full = full.portfolio.realized_return(rnd.t)
    raw = np.zeros(rnd.p.shape[1])
    rest = rnd.total - rnd.stakes[staked]
    alone = rest <= 0
    rows = staked[~alone]
    iterations = np.zeros(0, dtype=np.int64)
    kkt = float(full.batch.kkt.max())
    if rows.size:
        x = (rnd.p @ rnd.stakes)[None, :] - rnd.p[:, rows].T * rnd.stakes[rows, None]
        x /= rest[~alone, None]
        batch = solver.solve_or_raise(
            x, label=f"{rnd.label} (leave-one-out)", lam0=full.batch.lam, bag_ids=rows.tolist()
        )
        raw[rows] = r_full - batch.weights.cpu().numpy() @ rnd.t
        iterations, kkt = batch.iterations.numpy().copy(), max(kkt, float(batch.kkt.max()))
    raw[staked[alone]] = r_full
    tc = raw / kappa
    seconds = time.perf_counter() - full.start
    return TCResult(
        engine="leave_one_out",
        tc=tc,
        tc_std=np.zeros_like(tc),
        bag_tc=tc[None, :],
        bags=0,
        skipped_bags=[],
        untradable_bags=[],
        masks=np.zeros((0, tc.size), dtype=bool),
        unbagged_tc=None,
        scale=kappa,
        passthrough=passthrough,
        target_std=float(rnd.t.std()),
        g=None,
        c=float("nan"),
        target_g=None,
        bound_g=None,
        portfolio=full.portfolio,
        realized_return=r_full,
        bag_returns=np.zeros(0),
        iterations=iterations,
        kkt_max=kkt,
        seconds=seconds,
        time_per_bag_s=seconds / max(int(staked.size), 1),
        device=full.device,
        timings={"leave_one_out": seconds},
    )


ENGINES: dict[str, Callable[[_Round, TCSettings], TCResult]] = {
    "fast": _bagged(_fast_bags),
    "reference": _bagged(_reference_bags),
    "leave_one_out": _leave_one_out,
}
"""Every TC engine by name (`TCSettings.engine`); each returns a `TCResult`."""


def tc_summary(
    result: TCResult, corr: np.ndarray, target: np.ndarray, settings_digest: str
) -> dict[str, float | int | str]:
    """The round-level facts of a TC (the `tc_scale` row): kappa, c, passthrough, bag counts,
    std(TC)/std(CORR) over the models with a CORR, corr(g, centred target)."""
    both = np.isfinite(corr)
    ratio = (
        float(result.tc[both].std(ddof=1) / corr[both].std(ddof=1))
        if both.sum() > 1 and corr[both].std() > 0
        else float("nan")
    )
    g_corr = (
        float(np.corrcoef(result.g, target)[0, 1])
        if result.g is not None and result.g.std() > 0
        else float("nan")
    )
    return {
        "engine": result.engine,
        "kappa": result.scale,
        "c": result.c,
        "passthrough": result.passthrough,
        "bags": result.bags,
        "skipped_bags": len(result.skipped_bags),
        "untradable_bags": len(result.untradable_bags),
        "tc_std_over_corr_std": ratio,
        "g_target_corr": g_corr,
        "settings_hash": settings_digest,
    }


def settings_hash(*settings: BaseModel) -> str:
    """A short stable hash of the settings a TC depends on (to compare rounds' TC)."""
    text = json.dumps([s.model_dump(mode="json") for s in settings], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class TCAttribution:
    """Why each model's TC is what it is (each (models,), in P's column order).

    total = P_j . target_g: the model's raw signal, the centred target scaled like g (what TC
    would be, before the meta model's offset c, if every position were free and nothing were
    projected out). It splits exactly into
      reaches = P_j . g: the part that reaches the portfolio; TC = reaches - c;
      exposure_budget = P_j . (target_g - g - bound_g): removed on free positions by the
        binding exposure limits and the two budget rows (the projection in dw*/dx);
      bounds = P_j . bound_g: on positions at a bound in the bags (at their cap, with zero
        liquidity, or not held at all), where the signal moves nothing.
    """

    total: np.ndarray
    reaches: np.ndarray
    exposure_budget: np.ndarray
    bounds: np.ndarray
    tc: np.ndarray


def tc_attribution(p: np.ndarray, result: TCResult) -> TCAttribution:
    """Split each model's raw signal into what reaches the portfolio, what the exposure and
    budget rows remove, and what sits on positions at a bound (bagged engines only)."""
    if result.g is None or result.target_g is None or result.bound_g is None:
        raise ValueError(f"TC attribution needs a bagged engine, not {result.engine!r}")
    p = np.asarray(p, dtype=np.float64)
    reaches = p.T @ result.g
    return TCAttribution(
        total=p.T @ result.target_g,
        reaches=reaches,
        exposure_budget=p.T @ (result.target_g - result.g - result.bound_g),
        bounds=p.T @ result.bound_g,
        tc=reaches - result.c,
    )


def candidate_tc(p: np.ndarray, g: np.ndarray, c: float) -> np.ndarray:
    """Exact TC of candidate signals against a scored round: (stocks,) -> scalar, or
    (stocks, candidates) -> (candidates,). P is the candidates' gaussianized ranks on the
    round's ids; a candidate entering with zero stake changes no bag, so this is the TC it would
    get if it had been in the round (one matrix product for every candidate)."""
    return np.asarray(p, dtype=np.float64).T @ np.asarray(g, dtype=np.float64) - c


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
        ValueError: bad inputs, a leave-one-out round above its size guard, too many
            untradable bags, or a round where TC is undefined (no target passes the optimizer).
    """
    from tc_assets.scoring._tc_dual import torch_threads

    settings = settings or TCSettings()
    rnd = _validate(p, stakes, target, spec, label)
    with torch_threads(settings.cpu_threads):
        return ENGINES[settings.engine](rnd, settings)
