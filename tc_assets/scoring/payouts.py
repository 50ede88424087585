"""Classic stake payouts: each staked model earns or burns a clipped share of its stake.

For a model with stake ``s``, elected multipliers ``a`` (CORR) and ``k`` (TC) and scores
``corr`` and ``tc`` of the round::

    score         = a * corr + k * tc
    payout_factor = min(1, stake_threshold / S)
    payout        = s * clip(payout_factor * score, -clip, +clip)

``S`` is the total stake of the round's *valid staked models*: models with a stake row and at
least one valid submission (predictions or portfolio weights). The payout factor caps the round's
total exposure at ``stake_threshold`` units of stake; ``clip`` caps what one round can earn or
burn as a fraction of a stake. Both come from round.json's ``payout`` block (contract defaults
72,000 and 0.05). A multiplier of 0 ignores its metric, even when the metric is missing.

Who gets a row in ``payouts``: every model with a stake row and a valid prediction submission
whose elected metrics are known; a zero stake gets a row that pays exactly zero. A model with a
stake row and no valid submission gets no row (contract: stake 0 in the meta model, no payout),
and neither does a portfolio-only model (its payout is in ``portfolio_scores``); both are counted
in the round's `PayoutSummary`, with the reason in `RoundPayouts.unpaid`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "DEFAULT_CLIP",
    "DEFAULT_STAKE_THRESHOLD",
    "PAYOUT_COLUMNS",
    "PayoutRules",
    "PayoutSummary",
    "RoundPayouts",
    "classic_payouts",
    "clipped_payout",
    "payout_factor",
    "stake_score",
    "valid_stake",
]

DEFAULT_STAKE_THRESHOLD = 72_000.0
DEFAULT_CLIP = 0.05

# The contract's columns of `payouts` (io/tables.py), then the platform's own (`clipped`).
PAYOUT_COLUMNS = [
    "model_id",
    "stake",
    "corr",
    "tc",
    "corr_multiplier",
    "tc_multiplier",
    "payout_factor",
    "score",
    "payout",
    "clipped",
]

# Why a model with a stake row has no payout row (RoundPayouts.unpaid.reason).
NO_VALID_SUBMISSION = "no valid submission"
PORTFOLIO_ONLY = "portfolio weights only (paid in portfolio_scores)"


class PayoutRules(BaseModel):
    """A round's payout parameters (round.json ``payout`` block; the contract's defaults)."""

    model_config = ConfigDict(frozen=True)

    stake_threshold: float = Field(
        default=DEFAULT_STAKE_THRESHOLD,
        gt=0,
        description="Total stake above which every payout is scaled down: payout_factor = "
        "min(1, stake_threshold / total stake of the round's valid staked models). Default "
        "72000 (contract).",
    )
    clip: float = Field(
        default=DEFAULT_CLIP,
        gt=0,
        description="Largest gain or loss of one round as a fraction of the stake: the "
        "factor-scaled score is clipped to [-clip, +clip]. Default 0.05 (contract).",
    )

    @classmethod
    def from_round_info(cls, info: dict) -> PayoutRules:
        """Rules of a round from the `round_info` asset value (defaults where keys are absent)."""
        return cls(
            stake_threshold=info.get("stake_threshold", DEFAULT_STAKE_THRESHOLD),
            clip=info.get("clip", DEFAULT_CLIP),
        )


def payout_factor(total_stake: float, stake_threshold: float) -> float:
    """min(1, stake_threshold / total_stake); 1 when nothing is staked."""
    if not np.isfinite(total_stake) or total_stake < 0:
        raise ValueError(f"total stake must be finite and >= 0, got {total_stake}")
    if stake_threshold <= 0:
        raise ValueError(f"stake_threshold must be > 0, got {stake_threshold}")
    return 1.0 if total_stake <= stake_threshold else stake_threshold / total_stake


def _member(index: pd.Index, models: Iterable[str]) -> np.ndarray:
    """Boolean mask of `index` entries in `models`: a set lookup over object arrays (pandas'
    isin and iteration over Arrow-backed string indexes cost microseconds per element)."""
    as_objects = lambda v: v.to_numpy(dtype=object) if isinstance(v, pd.Index) else v  # noqa: E731
    wanted = set(as_objects(models))
    return np.fromiter((m in wanted for m in as_objects(index)), dtype=bool, count=len(index))


def valid_stake(stakes: pd.Series, submitted: Iterable[str]) -> float:
    """S of the payout factor: total stake of the models with a valid submission of any kind."""
    return float(stakes.to_numpy(np.float64)[_member(stakes.index, submitted)].sum())


def stake_score(
    corr: np.ndarray | float,
    tc: np.ndarray | float,
    corr_multiplier: np.ndarray | float,
    tc_multiplier: np.ndarray | float,
) -> np.ndarray:
    """corr_multiplier * corr + tc_multiplier * tc, where a 0 multiplier drops its metric.

    A metric that is NaN with a non-zero multiplier makes the score NaN (not scorable).
    """
    a, k = np.asarray(corr_multiplier, np.float64), np.asarray(tc_multiplier, np.float64)
    c, t = np.asarray(corr, np.float64), np.asarray(tc, np.float64)
    return np.where(a == 0, 0.0, a * c) + np.where(k == 0, 0.0, k * t)


def clipped_payout(
    stake: np.ndarray | float, score: np.ndarray | float, factor: float, clip: float
) -> np.ndarray:
    """stake * clip(factor * score, -clip, +clip)."""
    if clip <= 0:
        raise ValueError(f"clip must be > 0, got {clip}")
    s = np.asarray(stake, np.float64)
    return s * np.clip(factor * np.asarray(score, np.float64), -clip, clip)


@dataclass(frozen=True)
class PayoutSummary:
    """One round's payout totals, including the staked models that were not paid."""

    stake_rows: int  # models in stakes.csv
    staked_models: int  # stake > 0
    valid_staked_models: int  # stake > 0 and a valid submission of any kind
    total_stake: float  # over every stake row
    valid_stake: float  # S of the payout factor
    payout_factor: float
    payout_rows: int  # rows of `payouts`
    models_paid: int  # rows with stake > 0
    no_valid_submission: int  # stake row, no valid submission of either kind
    staked_no_valid_submission: int  # the same with stake > 0
    portfolio_only: int  # stake row, valid portfolio, no valid predictions
    unscored: int  # valid predictions but an elected metric is missing
    submitted_without_stake_row: int  # valid predictions, no stake row: not paid
    total_payout: float
    total_gains: float
    total_losses: float  # <= 0
    clipped: int  # payouts at the clip bound

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


@dataclass(frozen=True)
class RoundPayouts:
    """`table`: PAYOUT_COLUMNS, one row per paid model, sorted by model_id. `unpaid`: model_id,
    stake, reason for every stake row without a payout row."""

    table: pd.DataFrame
    unpaid: pd.DataFrame
    summary: PayoutSummary


def classic_payouts(
    stakes: pd.DataFrame,
    scores: pd.DataFrame,
    portfolio_models: Iterable[str] = (),
    rules: PayoutRules | None = None,
) -> RoundPayouts:
    """Pay every staked model with a valid prediction submission (see the module docstring).

    Args:
        stakes: index model_id; columns stake, corr_multiplier, tc_multiplier (validated).
        scores: index model_id over exactly the models with a valid prediction submission;
            columns corr and tc (NaN where unknown).
        portfolio_models: models with a valid portfolio-weight submission (they count in the
            payout factor's total stake).
        rules: the round's stake threshold and clip.
    """
    rules = rules or PayoutRules()
    missing = [c for c in ("stake", "corr_multiplier", "tc_multiplier") if c not in stakes]
    missing += [c for c in ("corr", "tc") if c not in scores]
    if missing:
        raise ValueError(f"missing column(s) {missing}")
    if scores.index.has_duplicates or stakes.index.has_duplicates:
        raise ValueError("model ids must be unique in stakes and scores")
    predicted = scores.index
    portfolios = set(portfolio_models)
    stake = stakes["stake"].astype(np.float64)
    has_predictions = _member(stakes.index, predicted)
    has_portfolio = _member(stakes.index, portfolios)
    submitted = has_predictions | has_portfolio
    total_valid = float(stake.to_numpy()[submitted].sum())
    factor = payout_factor(total_valid, rules.stake_threshold)

    rows = stakes.loc[has_predictions].sort_index()
    metric = scores.reindex(rows.index)
    score = stake_score(
        metric["corr"], metric["tc"], rows["corr_multiplier"], rows["tc_multiplier"]
    )
    scorable = np.isfinite(score)
    scaled = factor * score
    table = pd.DataFrame(
        {
            "model_id": rows.index.to_numpy(dtype=object),
            "stake": rows["stake"].to_numpy(np.float64),
            "corr": metric["corr"].to_numpy(np.float64),
            "tc": metric["tc"].to_numpy(np.float64),
            "corr_multiplier": rows["corr_multiplier"].to_numpy(np.float64),
            "tc_multiplier": rows["tc_multiplier"].to_numpy(np.float64),
            "payout_factor": factor,
            "score": score,
            "payout": clipped_payout(rows["stake"].to_numpy(np.float64), score, factor, rules.clip),
            "clipped": (np.abs(scaled) >= rules.clip) & (rows["stake"].to_numpy() > 0),
        }
    )[scorable].reset_index(drop=True)

    unscored = rows.index[~scorable]
    unpaid_parts = [
        (stakes.index[~submitted], NO_VALID_SUBMISSION),
        (stakes.index[has_portfolio & ~has_predictions], PORTFOLIO_ONLY),
        (unscored, "an elected metric (corr or tc) is missing"),
    ]
    unpaid = pd.DataFrame(
        [(m, reason) for ids, reason in unpaid_parts for m in ids], columns=["model_id", "reason"]
    )
    unpaid.insert(1, "stake", stake.reindex(unpaid["model_id"]).to_numpy(np.float64))
    paid = table["payout"]
    summary = PayoutSummary(
        stake_rows=len(stakes),
        staked_models=int((stake > 0).sum()),
        valid_staked_models=int(((stake > 0) & submitted).sum()),
        total_stake=float(stake.sum()),
        valid_stake=total_valid,
        payout_factor=factor,
        payout_rows=len(table),
        models_paid=int((table["stake"] > 0).sum()),
        no_valid_submission=int((~submitted).sum()),
        staked_no_valid_submission=int(((stake > 0) & ~submitted).sum()),
        portfolio_only=int((unpaid["reason"] == PORTFOLIO_ONLY).sum()),
        unscored=len(unscored),
        submitted_without_stake_row=int((~_member(predicted, stakes.index)).sum()),
        total_payout=float(paid.sum()),
        total_gains=float(paid[paid > 0].sum()),
        total_losses=float(paid[paid < 0].sum()),
        clipped=int(table["clipped"].sum()),
    )
    return RoundPayouts(table=table, unpaid=unpaid, summary=summary)
