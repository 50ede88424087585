"""Payouts for portfolio-weight submissions, their marginal value to the fund, and capacity.

**Units.** A valid portfolio ``w`` is dollar neutral with longs summing to 1 (gross 2), like the
optimized meta portfolio ``m``. Two spaces:

* *bucket space* (target units): ``b_i = target_i - mean(target)`` over the resolved ids, the
  centred bucketed residual return (buckets 0, 0.25, ..., 1). ``PB = w . b`` is the mean target of
  the longs minus that of the shorts (a valid ``w`` sums to 0, so centring changes nothing:
  ``PB = w . target`` when every held id is resolved). No stock return is needed: a round that
  publishes only targets is paid in this space.
* *return space* (return units): ``r`` the realized residual return (the optional ``return``
  column); ``w . r`` is a return per dollar of long market value (LMV).

Held ids without a resolution count as b = r = 0.

**Scores**: ``PB = w.b``, ``MB = m.b`` (target units); ``PR = w.r``, ``MR = m.r`` (return
units, NaN without returns).

**Transaction cost** of building a portfolio from an empty book (payouts do not depend on
holdings) at the fund's long market value ``L``, in return units (cost dollars / L):

* ``constant``: ``t`` (return units) for the raw form and ``t_b`` (target units) for the
  bucketed form, any portfolio;
* ``liquidity``: position i trades ``D_i = |w_i| L`` dollars and pays, per dollar, a spread term
  plus an impact term that grows with its size against the stock's average daily volume::

      TC(w; L) = sum_i |w_i| * (spread_bps / 1e4 + impact_coef * (|w_i| L / adv_i) ** alpha)
               = s * G(w) + impact_coef * L**alpha * A(w)
      G(w) = sum_i |w_i|,   A(w) = sum_i |w_i| ** (1 + alpha) / adv_i ** alpha

  so a position's cost is superlinear in its dollars (alpha = 0.5: the square-root law), and a
  concentrated bet on illiquid names costs more than the same return from liquid names. A held
  id without ``adv_usd`` is charged at the round's smallest ADV. The raw form pays ``t = TC``;
  the bucketed form pays ``t_b = k * TC`` with ``k = bucket_per_return`` (target units per unit
  of return), a constant of the configuration, not of the round, so the cost needs no returns.

**Bucket per return** ``k``: the pooled within-round least-squares slope of the target on the
return over resolved history (``estimate_bucket_per_return``; ``tc-platform bucket-per-return``
computes it from the warehouse). It is the target a portfolio earns per unit of return it
earns, ``E[PB] ~= k PR`` for a portfolio that does not know the bucketing noise, so
``PB - k TC`` is the bucketed counterpart of ``PR - TC``. The ratio of spreads
``std(target) / std(return)`` would overstate it by ``1 / corr(target, return)``.

**Payout percentage**. The meta portfolio lost money when ``MR < 0``; a round without returns
uses ``MB < 0`` instead, and each row records which (``meta_loss_basis``) and the outcome
(``meta_lost``); ``c_b`` weighs those rounds::

    PP     = c_b * (PB - t_b) / g   if meta_lost   else (PB - t_b) / g
    PP_raw = c_b * c * (PR - t)     if meta_lost   else c * (PR - t)
    payout = stake * clip(payout_factor * PP_basis, -clip, +clip)

with ``PP_basis`` = PP (``payout_basis="bucketed"``, default) or PP_raw (``"raw"``, needs
returns), and ``payout_factor`` and ``clip`` the round's, as for classic payouts. ``g`` (target
units) defaults to 1, the default ``k / c``: then ``E[PP] ~= PP_raw`` and the two forms pay
alike in expectation.

**Marginal contribution.** The fund at LMV ``L`` moves a fraction ``f`` of it from the meta
portfolio into the user's: it holds the blended book ``v = (1 - f) m + f w`` instead of ``m``.
Orders in the same stock net, so the cost is that of the blended book::

    delta = v.r - TC(v; L) - (m.r - TC(m; L)) = f * (PR - MR) - [TC(v; L) - TC(m; L)]

(the bracket is 0 under the constant model, which charges every book the same). Adding to the
names the meta portfolio already trades heavily costs more than adding elsewhere, and moving
out of the meta portfolio saves its marginal impact. ``scenario``: A when MR >= 0 and delta > 0 (meta
made money, the user more), B when MR >= 0 and delta <= 0, C when MR < 0 and delta >= 0 (meta
lost, the user lost less or made money), D when MR < 0 and delta < 0. The marginal return, the
scenario, the Sharpe contribution and capacity are the fund's dollars, in return space: a round
without returns has them NaN (and is left out of Sharpe windows).

**Sharpe contribution** over a window of rounds: with the meta portfolio's net return
``R_t = MR_t - TC(m; L)_t`` and ``delta_t`` a model's marginal return (0 in rounds it did not
submit), ``sharpe(R + delta) - sharpe(R)``, ``sharpe(x) = mean(x) / std(x)`` per round (sample
std, not annualized). A model that pays when the meta portfolio loses lowers the blend's variance
and beats a model with the same mean and the opposite timing.

**Capacity** under the liquidity model: the dollar return at LMV ``L``::

    D(L) = L * (PR - s G) - impact_coef * L**(1 + alpha) * A

rises, peaks at ``L* = ((PR - s G) / ((1 + alpha) impact_coef A)) ** (1 / alpha)`` and stops
paying at ``L0 = (1 + alpha) ** (1 / alpha) * L*`` (D(L0) = 0). A portfolio with PR <= s G never
pays (L* = L0 = 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = [
    "CAPACITY_COLUMNS",
    "META_COLUMNS",
    "PORTFOLIO_SCORE_COLUMNS",
    "SCENARIOS",
    "SHARPE_COLUMNS",
    "Capacity",
    "LiquidityTerms",
    "PortfolioPayoutSettings",
    "PortfolioRound",
    "BucketPerReturn",
    "bucketed_returns",
    "capacity",
    "capacity_curves",
    "check_portfolios",
    "estimate_bucket_per_return",
    "meta_lost",
    "liquidity_cost",
    "liquidity_terms",
    "marginal_return",
    "payout_percentage",
    "raw_payout_percentage",
    "scenario",
    "score_portfolios",
    "sharpe_contribution",
    "sharpe_ratio",
]

PORTFOLIO_TOLERANCE = 1e-6  # the contract's: |sum(w)| and |sum(w > 0) - 1| at most this
SCENARIOS = ("A", "B", "C", "D")

PORTFOLIO_SCORE_COLUMNS = [
    "model_id",
    "pb",
    "pr",
    "mb",
    "mr",
    "meta_loss_basis",
    "meta_lost",
    "transaction_cost",
    "pp",
    "scenario",
    "transaction_cost_raw",
    "pp_raw",
    "marginal_return",
    "stake",
    "payout_factor",
    "payout",
    "capacity_usd",
    "breakeven_usd",
    "peak_dollar_return_usd",
    "cost_model",
]
META_COLUMNS = [
    "mb",
    "mr",
    "meta_loss_basis",
    "meta_lost",
    "transaction_cost",
    "net_return",
    "long_market_value_usd",
    "cost_model",
    "bucket_per_return",
]
CAPACITY_COLUMNS = ["model_id", "long_market_value_usd", "dollar_return_usd", "cost_usd"]
SHARPE_COLUMNS = [
    "model_id",
    "window_rounds",
    "rounds_submitted",
    "meta_sharpe",
    "blended_sharpe",
    "sharpe_contribution",
    "mean_marginal_return",
    "corr_with_meta",
]


class PortfolioPayoutSettings(BaseModel):
    """Constants of the portfolio-weight payout design (see the module docstring)."""

    model_config = ConfigDict(frozen=True)

    cost_model: Literal["liquidity", "constant"] = Field(
        default="liquidity",
        description="Transaction cost model: 'liquidity' (spread + impact against adv_usd at "
        "long_market_value_usd) or 'constant' (t and t_b). A round without market data falls "
        "back to 'constant'.",
    )
    t: float = Field(
        default=0.003,
        ge=0,
        description="Constant model: cost subtracted from PR (return units). Default 0.003: "
        "about what the liquidity model charges a spread-out portfolio of liquid names at the "
        "default size.",
    )
    t_b: float = Field(
        default=0.03,
        ge=0,
        description="Constant model: cost subtracted from PB (target units). Default 0.03 = "
        "bucket_per_return * t: the same cost as t, in bucket space.",
    )
    bucket_per_return: float = Field(
        default=10.0,
        gt=0,
        description="k: target units per unit of return, converts the liquidity cost (return "
        "units) to bucket space, t_b = k * TC, without the round's returns. Estimate: the pooled "
        "within-round least-squares slope of target on return over resolved rounds "
        "(`tc-platform bucket-per-return --warehouse FILE`); default 10.0, measured 10.1 on the "
        "generated demo rounds 1-8. Refresh it when the return or target definition changes.",
    )
    spread_bps: float = Field(
        default=5.0,
        ge=0,
        description="Liquidity model: cost per dollar traded that does not depend on size "
        "(half spread and fees), in basis points. Default 5.",
    )
    impact_coef: float = Field(
        default=0.01,
        ge=0,
        description="Liquidity model: impact per dollar traded of a position of one day's "
        "volume (|dollars| = adv). Default 0.01: a square-root law with daily volatility 2% and "
        "coefficient 0.5, i.e. 32 bps at 10% of ADV.",
    )
    alpha: float = Field(
        default=0.5,
        gt=0,
        description="Liquidity model: exponent of (|dollars| / adv) in the impact term. Default "
        "0.5 (square-root law).",
    )
    long_market_value_usd: float = Field(
        default=1.0e8,
        gt=0,
        description="Fund long market value L at which costs are charged (the optimizer's "
        "default). Default 1e8.",
    )
    g: float = Field(
        default=1.0,
        gt=0,
        description="Divisor of the bucketed form, target units: PP = (PB - t_b) / g. Default "
        "1 = bucket_per_return / c, so that PP ~= PP_raw in expectation: a long-short target "
        "spread of 0.05 after cost (a fifth of a bucket step) is a payout percentage of 5% "
        "(the default clip).",
    )
    c: float = Field(
        default=10.0,
        gt=0,
        description="Multiplier of the raw-return form: PP_raw = c (PR - t). Default 10 = 1/g.",
    )
    c_b: float = Field(
        default=2.0,
        gt=0,
        description="Weight of both forms in rounds where the meta portfolio lost money "
        "(MR < 0, or MB < 0 in a round without returns). Default 2: returns count double when "
        "the fund needs them.",
    )
    payout_basis: Literal["bucketed", "raw"] = Field(
        default="bucketed",
        description="Which payout percentage the payout is computed from: PP ('bucketed', "
        "default, needs targets only) or PP_raw ('raw', needs the round's returns).",
    )
    move_fraction: float = Field(
        default=0.01,
        gt=0,
        lt=1,
        description="Fraction f of the fund's LMV moved from the meta portfolio into the user's "
        "for the marginal contribution, scenario and Sharpe contribution. Default 0.01.",
    )
    capacity_min_usd: float = Field(
        default=1.0e5, gt=0, description="Smallest LMV of the capacity curves. Default 1e5."
    )
    capacity_max_usd: float = Field(
        default=1.0e10, gt=0, description="Largest LMV of the capacity curves. Default 1e10."
    )
    capacity_points: int = Field(
        default=81, ge=2, description="LMV grid points (log spaced) of a capacity curve."
    )

    @model_validator(mode="after")
    def _check(self) -> PortfolioPayoutSettings:
        if self.capacity_max_usd <= self.capacity_min_usd:
            raise ValueError("capacity_max_usd must be > capacity_min_usd")
        return self

    @property
    def spread(self) -> float:
        """spread_bps as a fraction."""
        return self.spread_bps / 1e4

    def lmv_grid(self) -> np.ndarray:
        """The capacity curves' LMV grid."""
        return np.geomspace(self.capacity_min_usd, self.capacity_max_usd, self.capacity_points)


# --- formulas -------------------------------------------------------------------------------


def bucketed_returns(target: np.ndarray) -> np.ndarray:
    """b = target - mean(target): the bucketed residual return in target units."""
    t = np.asarray(target, np.float64)
    if t.ndim != 1:
        raise ValueError(f"target must be 1-d, got shape {t.shape}")
    if not np.all(np.isfinite(t)):
        raise ValueError("target must be finite")
    return t - t.mean() if t.size else t


@dataclass(frozen=True)
class BucketPerReturn:
    """The estimate of k (target units per unit of return) and what it rests on.

    slope: pooled within-round least-squares slope of target on return.
    per_round: the same slope round by round (index: round), to see its stability.
    rows: resolved ids with both a target and a return that entered the estimate.
    """

    slope: float
    per_round: pd.Series
    rows: int


def estimate_bucket_per_return(resolved: pd.DataFrame) -> BucketPerReturn:
    """k = sum_r sum_i (t_i - tbar_r)(x_i - xbar_r) / sum_r sum_i (x_i - xbar_r)^2.

    `resolved`: columns round, target, return over any number of rounds; rows without a return
    (rounds that published only targets) are left out. Centring within each round removes the
    round's level, as b does. Raises ValueError when no round has a spread of returns.
    """
    missing = {"round", "target", "return"} - set(resolved.columns)
    if missing:
        raise ValueError(f"resolved history lacks column(s) {sorted(missing)}")
    d = resolved[["round", "target", "return"]].dropna().astype({"round": np.int64})
    if not np.all(np.isfinite(d[["target", "return"]].to_numpy(np.float64))):
        raise ValueError("resolved history has non-finite targets or returns")
    grouped = d.groupby("round")[["target", "return"]]
    c = d[["target", "return"]] - grouped.transform("mean")
    cross = (c["target"] * c["return"]).groupby(d["round"]).sum()
    spread = (c["return"] ** 2).groupby(d["round"]).sum()
    if spread.sum() <= 0:
        raise ValueError("no resolved round with returns that vary: nothing to estimate from")
    with np.errstate(divide="ignore", invalid="ignore"):
        per_round = (cross / spread).where(spread > 0)
    return BucketPerReturn(float(cross.sum() / spread.sum()), per_round.rename("slope"), len(d))


@dataclass(frozen=True)
class LiquidityTerms:
    """Per portfolio: G = sum|w| and A = sum |w|^(1+alpha) / adv^alpha, so that
    TC(w; L) = spread * G + impact_coef * L**alpha * A."""

    gross: np.ndarray
    impact: np.ndarray
    alpha: float

    def cost(
        self, long_market_value: float | np.ndarray, spread: float, impact_coef: float
    ) -> np.ndarray:
        """TC in return units: (portfolios,) at one LMV, (LMVs, portfolios) at an array of LMVs."""
        scale = np.asarray(long_market_value, np.float64)[..., None] ** self.alpha
        return spread * self.gross + impact_coef * scale * self.impact


def _adv_filled(adv_usd: np.ndarray, n: int) -> np.ndarray:
    adv = np.asarray(adv_usd, np.float64)
    if adv.shape != (n,):
        raise ValueError(f"adv_usd has shape {adv.shape}, expected ({n},)")
    known = np.isfinite(adv)
    if not known.any():
        raise ValueError("adv_usd has no finite value")
    if np.any(adv[known] <= 0):
        raise ValueError("adv_usd must be > 0")
    return np.where(known, adv, adv[known].min())


def liquidity_terms(weights: np.ndarray, adv_usd: np.ndarray, alpha: float) -> LiquidityTerms:
    """G and A of each column of `weights` (stocks x portfolios, or one vector)."""
    w = np.abs(np.asarray(weights, np.float64))
    vec = w.ndim == 1
    w2 = w[:, None] if vec else w
    adv = _adv_filled(adv_usd, w2.shape[0])
    gross = w2.sum(axis=0)
    impact = (w2 ** (1.0 + alpha) * adv[:, None] ** -alpha).sum(axis=0)
    if vec:
        return LiquidityTerms(gross[:1], impact[:1], alpha)
    return LiquidityTerms(gross, impact, alpha)


def liquidity_cost(
    weights: np.ndarray,
    adv_usd: np.ndarray,
    long_market_value_usd: float,
    *,
    spread_bps: float,
    impact_coef: float,
    alpha: float,
) -> np.ndarray | float:
    """TC(w; L) = sum_i |w_i| (spread_bps/1e4 + impact_coef (|w_i| L / adv_i)^alpha).

    Per column of `weights` (stocks x portfolios), or a float for one weight vector.
    """
    terms = liquidity_terms(weights, adv_usd, alpha)
    cost = terms.cost(float(long_market_value_usd), spread_bps / 1e4, impact_coef)
    return float(cost[0]) if np.asarray(weights).ndim == 1 else cost


def meta_lost(mr: float, mb: float) -> tuple[str, bool]:
    """Whether the meta portfolio lost money, and on which measure: ("mr", MR < 0) when the
    round has returns (MR finite), else ("mb", MB < 0)."""
    if np.isfinite(mr):
        return "mr", bool(mr < 0)
    if not np.isfinite(mb):
        raise ValueError("neither MR nor MB is finite: cannot tell whether the meta portfolio lost")
    return "mb", bool(mb < 0)


def payout_percentage(
    pb: np.ndarray | float, t_b: np.ndarray | float, lost: bool, g: float, c_b: float
) -> np.ndarray:
    """PP = c_b (PB - t_b) / g when the meta portfolio lost (`lost`), else (PB - t_b) / g."""
    base = (np.asarray(pb, np.float64) - t_b) / g
    return c_b * base if lost else base


def raw_payout_percentage(
    pr: np.ndarray | float, t: np.ndarray | float, lost: bool, c: float, c_b: float
) -> np.ndarray:
    """PP_raw = c_b c (PR - t) when the meta portfolio lost (`lost`), else c (PR - t)."""
    base = c * (np.asarray(pr, np.float64) - t)
    return c_b * base if lost else base


def marginal_return(
    pr: np.ndarray | float,
    mr: float,
    f: float,
    blend_cost: np.ndarray | float = 0.0,
    meta_cost: float = 0.0,
) -> np.ndarray:
    """delta = f (PR - MR) - [TC((1 - f) m + f w; L) - TC(m; L)].

    `blend_cost` = TC of the blended book, `meta_cost` = TC(m; L) (both 0, or equal, under the
    constant model).
    """
    return f * (np.asarray(pr, np.float64) - mr) - (np.asarray(blend_cost, np.float64) - meta_cost)


def scenario(mr: float, delta: np.ndarray | float) -> np.ndarray:
    """A: MR >= 0, delta > 0. B: MR >= 0, delta <= 0. C: MR < 0, delta >= 0. D: MR < 0, delta < 0.
    None everywhere when MR is NaN (a round without returns)."""
    d = np.asarray(delta, np.float64)
    if not np.isfinite(mr):
        return np.full(d.shape, None, dtype=object)
    if mr >= 0:
        return np.where(d > 0, "A", "B")
    return np.where(d >= 0, "C", "D")


@dataclass(frozen=True)
class Capacity:
    """Per portfolio: LMV of the largest dollar return, the LMV past which it loses money, and
    that largest dollar return (0, 0, 0 for a portfolio that never pays; inf without impact)."""

    peak_usd: np.ndarray
    breakeven_usd: np.ndarray
    peak_dollar_return_usd: np.ndarray


def capacity(pr: np.ndarray, terms: LiquidityTerms, spread: float, impact_coef: float) -> Capacity:
    """Closed-form peak and break-even of D(L) = L (PR - s G) - k L^(1+alpha) A."""
    edge = np.asarray(pr, np.float64) - spread * terms.gross
    a = terms.alpha
    k_a = impact_coef * terms.impact
    with np.errstate(divide="ignore", invalid="ignore"):
        peak = np.where(
            edge <= 0, 0.0, np.where(k_a > 0, (edge / ((1.0 + a) * k_a)) ** (1.0 / a), np.inf)
        )
    breakeven = peak * (1.0 + a) ** (1.0 / a)
    with np.errstate(invalid="ignore"):
        best = np.where(np.isfinite(peak), peak * edge * a / (1.0 + a), np.inf)
    return Capacity(peak, breakeven, np.where(edge <= 0, 0.0, best))


def sharpe_ratio(x: np.ndarray) -> float:
    """mean / sample std of a return series; NaN with fewer than 2 values or zero spread."""
    v = np.asarray(x, np.float64)
    if v.size < 2:
        return float("nan")
    sd = v.std(ddof=1)
    return float(v.mean() / sd) if sd > 0 else float("nan")


def sharpe_contribution(
    meta_returns: pd.Series, marginal: pd.DataFrame, min_rounds: int = 3
) -> pd.DataFrame:
    """Sharpe of the meta portfolio with the fraction moved into each model, minus its own.

    Args:
        meta_returns: the meta portfolio's net return per round (index: round), the window.
        marginal: index round (a subset of meta_returns'), one column per model: its marginal
            return delta; NaN (or a missing round) = the model did not submit, delta = 0.
        min_rounds: models that submitted in fewer rounds get NaN Sharpe values.
    Returns SHARPE_COLUMNS, one row per model, sorted by sharpe_contribution (best first).
    """
    r = meta_returns.sort_index().astype(np.float64)
    if r.index.has_duplicates:
        raise ValueError("meta_returns has duplicate rounds")
    extra = marginal.index.difference(r.index)
    if len(extra):
        raise ValueError(f"marginal returns for rounds without a meta return: {list(extra)[:5]}")
    d = marginal.reindex(r.index)
    submitted = d.notna().sum(axis=0)
    blended = d.fillna(0.0).to_numpy() + r.to_numpy()[:, None]
    meta_sharpe = sharpe_ratio(r.to_numpy())
    rows = []
    for j, model in enumerate(d.columns):
        enough = int(submitted[model]) >= min_rounds
        b = sharpe_ratio(blended[:, j]) if enough else float("nan")
        delta = d[model].dropna()
        corr = (
            float(np.corrcoef(delta.to_numpy(), r.loc[delta.index].to_numpy())[0, 1])
            if enough and delta.std() > 0 and r.loc[delta.index].std() > 0
            else float("nan")
        )
        rows.append(
            {
                "model_id": model,
                "window_rounds": len(r),
                "rounds_submitted": int(submitted[model]),
                "meta_sharpe": meta_sharpe,
                "blended_sharpe": b,
                "sharpe_contribution": b - meta_sharpe,
                "mean_marginal_return": float(delta.mean()) if len(delta) else float("nan"),
                "corr_with_meta": corr,
            }
        )
    out = pd.DataFrame(rows, columns=SHARPE_COLUMNS)
    return out.sort_values(
        ["sharpe_contribution", "model_id"], ascending=[False, True], na_position="last"
    ).reset_index(drop=True)


# --- one round ------------------------------------------------------------------------------


def check_portfolios(weights: pd.DataFrame) -> dict[str, str]:
    """Contract invariants (|sum w| <= 1e-6, |sum of longs - 1| <= 1e-6, finite) per column:
    the models breaking them, with the reason."""
    bad: dict[str, str] = {}
    for model in weights.columns:
        w = weights[model].to_numpy(np.float64)
        if not np.all(np.isfinite(w)):
            bad[str(model)] = "weights contain NaN or infinite values"
        elif abs(w.sum()) > PORTFOLIO_TOLERANCE:
            bad[str(model)] = f"weights sum to {w.sum():.3g}, not 0"
        elif abs(w[w > 0].sum() - 1.0) > PORTFOLIO_TOLERANCE:
            bad[str(model)] = f"positive weights sum to {w[w > 0].sum():.6g}, not 1"
    return bad


@dataclass(frozen=True)
class PortfolioRound:
    """One round's portfolio scores.

    table: PORTFOLIO_SCORE_COLUMNS, one row per scored model (sorted by model_id).
    meta: META_COLUMNS of the meta portfolio (a one-row frame).
    rejected: model_id, reason for the portfolios that break the contract's invariants.
    terms: liquidity terms of the scored portfolios (None without market data).
    has_returns: the round's resolution has returns (PR, MR, capacity are NaN without).
    """

    table: pd.DataFrame
    meta: pd.DataFrame
    rejected: pd.DataFrame
    terms: LiquidityTerms | None
    cost_model: str
    has_returns: bool


def score_portfolios(
    weights: pd.DataFrame,
    meta_weights: pd.Series,
    resolved: pd.DataFrame,
    stakes: pd.Series,
    payout_factor: float,
    clip: float,
    adv_usd: pd.Series | None = None,
    settings: PortfolioPayoutSettings | None = None,
) -> PortfolioRound:
    """Score every portfolio submission of a resolved round (see the module docstring).

    Args:
        weights: ids x models (0 = not held); the universe of the round.
        meta_weights: the optimized meta portfolio by id (missing ids: 0).
        resolved: index id; target, and return when the round has returns (the column may be
            absent: PR, MR, PP_raw, the marginal return, scenario and capacity are then NaN).
        stakes: stake by model_id (a model without one has stake 0).
        payout_factor, clip: the round's, as for classic payouts.
        adv_usd: average daily dollar volume by id, or None (constant costs then).
        settings: the design's constants.
    Raises ValueError for payout_basis 'raw' without returns, or an invalid meta portfolio.
    """
    s = settings or PortfolioPayoutSettings()
    ids = weights.index
    if ids.has_duplicates:
        raise ValueError("weights has duplicate ids")
    has_returns = "return" in resolved.columns
    if s.payout_basis == "raw" and not has_returns:
        raise ValueError(
            "payout_basis 'raw' pays on realized returns, and this round's resolution has no "
            "return column; pay it on 'bucketed' (targets only)"
        )
    res = resolved.reindex(ids)
    known = res["target"].notna().to_numpy()
    b = np.zeros(len(ids))
    b[known] = bucketed_returns(res["target"].to_numpy(np.float64)[known])
    if has_returns:
        r = np.nan_to_num(res["return"].to_numpy(np.float64), nan=0.0)
    else:
        r = np.full(len(ids), np.nan)

    m = meta_weights.reindex(ids).fillna(0.0).to_numpy(np.float64)
    meta_bad = check_portfolios(pd.DataFrame({"meta": m}))
    if meta_bad:
        raise ValueError(f"the meta portfolio is not a valid portfolio: {meta_bad['meta']}")
    bad = check_portfolios(weights)
    rejected = pd.DataFrame(
        [{"model_id": k, "reason": v} for k, v in sorted(bad.items())],
        columns=["model_id", "reason"],
    )
    good = weights[[c for c in weights.columns if str(c) not in bad]]
    w = good.to_numpy(np.float64)
    pb, pr = b @ w, r @ w
    mb, mr = float(b @ m), float(r @ m)
    loss_basis, lost = meta_lost(mr, mb)
    f, lmv, k = s.move_fraction, s.long_market_value_usd, s.bucket_per_return

    cost_model = s.cost_model if adv_usd is not None else "constant"
    terms = None
    if adv_usd is not None:
        adv = adv_usd.reindex(ids).to_numpy(np.float64)
        terms = liquidity_terms(w, adv, s.alpha)
    if cost_model == "liquidity":
        assert terms is not None
        t_raw = terms.cost(lmv, s.spread, s.impact_coef)
        t_b = k * t_raw
        meta_cost = float(liquidity_terms(m, adv, s.alpha).cost(lmv, s.spread, s.impact_coef)[0])
        blend = (1.0 - f) * m[:, None] + f * w
        blend_cost = liquidity_terms(blend, adv, s.alpha).cost(lmv, s.spread, s.impact_coef)
        delta = marginal_return(pr, mr, f, blend_cost, meta_cost)
    else:
        t_raw, t_b = np.full(len(pr), s.t), np.full(len(pr), s.t_b)
        meta_cost = s.t
        delta = marginal_return(pr, mr, f)
    pp = payout_percentage(pb, t_b, lost, s.g, s.c_b)
    pp_raw = raw_payout_percentage(pr, t_raw, lost, s.c, s.c_b)
    basis = pp if s.payout_basis == "bucketed" else pp_raw
    stake = stakes.reindex(good.columns).fillna(0.0).to_numpy(np.float64)
    if terms is not None and has_returns:
        cap = capacity(pr, terms, s.spread, s.impact_coef)
        peak, breakeven, best = cap.peak_usd, cap.breakeven_usd, cap.peak_dollar_return_usd
    else:
        peak = breakeven = best = np.full(len(pr), np.nan)
    table = pd.DataFrame(
        {
            "model_id": np.asarray([str(c) for c in good.columns], dtype=object),
            "pb": pb,
            "pr": pr,
            "mb": mb,
            "mr": mr,
            "meta_loss_basis": loss_basis,
            "meta_lost": lost,
            "transaction_cost": t_b,
            "pp": pp,
            "scenario": scenario(mr, delta),
            "transaction_cost_raw": t_raw,
            "pp_raw": pp_raw,
            "marginal_return": delta,
            "stake": stake,
            "payout_factor": payout_factor,
            "payout": stake * np.clip(payout_factor * basis, -clip, clip) + 0.0,  # no -0.0
            "capacity_usd": peak,
            "breakeven_usd": breakeven,
            "peak_dollar_return_usd": best,
            "cost_model": cost_model,
        },
        columns=PORTFOLIO_SCORE_COLUMNS,
    )
    table = table.sort_values("model_id").reset_index(drop=True)
    meta = pd.DataFrame(
        [
            {
                "mb": mb,
                "mr": mr,
                "meta_loss_basis": loss_basis,
                "meta_lost": lost,
                "transaction_cost": meta_cost,
                "net_return": mr - meta_cost,
                "long_market_value_usd": lmv,
                "cost_model": cost_model,
                "bucket_per_return": k,
            }
        ],
        columns=META_COLUMNS,
    )
    return PortfolioRound(table, meta, rejected, terms, cost_model, has_returns)


def capacity_curves(
    model_ids: list[str],
    pr: np.ndarray,
    terms: LiquidityTerms,
    settings: PortfolioPayoutSettings | None = None,
) -> pd.DataFrame:
    """Dollar return and cost of each portfolio on the settings' LMV grid (CAPACITY_COLUMNS).

    D(L) = L (PR - TC(w; L)) under the liquidity model; cost_usd = L TC(w; L).
    """
    s = settings or PortfolioPayoutSettings()
    grid = s.lmv_grid()
    cost = grid[:, None] * terms.cost(grid, s.spread, s.impact_coef)  # grid x portfolios
    dollars = grid[:, None] * np.asarray(pr, np.float64)[None, :] - cost
    k = len(model_ids)
    return pd.DataFrame(
        {
            "model_id": np.repeat(np.asarray(model_ids, dtype=object), len(grid)),
            "long_market_value_usd": np.tile(grid, k),
            "dollar_return_usd": dollars.T.ravel(),
            "cost_usd": cost.T.ravel(),
        },
        columns=CAPACITY_COLUMNS,
    )
