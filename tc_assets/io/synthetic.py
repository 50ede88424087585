"""Synthetic Numerai-like round source in the layout of the input contract, with known truth.

Each round is drawn from a small generative model, so later scores can be checked against it:

* Features: latent factors plus idiosyncratic noise (partly persistent per stock across rounds),
  binned per round into 5 equal bins, ints 0..4. `medium` carries the signal, `small` is a
  subset of it, `all` adds features driven by other factors that carry no signal.
* Signal: ``f`` = standardized ``X_medium @ beta`` (beta non-zero on a few features) and a unique
  alpha ``u`` made exactly orthogonal to the constant and the medium features in-sample. The
  realized residual return is ``r = return_std * (rho_f f + rho_u u + sqrt(1 - rho_f² - rho_u²) e)``
  with ``e`` orthogonal to both, so corr(r, f) = rho_f and corr(r, u) = rho_u exactly in every
  round. The target buckets ``r`` plus a little noise into 0..1 with shares 5/20/50/20/5%.
* Models: a population fixed by the seed. Each model's latent score is
  ``feature_weight f + alpha_weight u (+ bets on single features) + noise``; its kind (written to
  ``planted.csv``, which ingestion ignores) says which truth it carries. Model ids are neutral.

A round's data depend only on (settings, round): generating rounds 1-3 then 4 writes the same
round 4 as generating 1-4, byte for byte. Each round directory is written aside and renamed
into place, so a reader never sees half a round.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from pydantic import BaseModel, Field, model_validator
from scipy.special import ndtr, ndtri
from scipy.stats import rankdata

# --- calendar -------------------------------------------------------------------------------

ROUND_ONE_OPEN = datetime(2024, 1, 2, 12, tzinfo=UTC)  # a Tuesday
ROUND_WEEKDAYS = (1, 2, 3, 4, 5)  # Tuesday..Saturday (Monday = 0)
ROUND_DURATION = timedelta(hours=1)
RESOLVE_DELAY = timedelta(days=28)
PAYOUT = {"stake_threshold": 72000, "clip": 0.05}

# --- data shapes ----------------------------------------------------------------------------

FEATURE_BINS = 5
TARGET_VALUES = (0.0, 0.25, 0.5, 0.75, 1.0)
TARGET_SHARES = (0.05, 0.20, 0.50, 0.20, 0.05)
CORR_MULTIPLIERS = (0.0, 0.5, 1.0, 2.0)
CORR_MULTIPLIER_P = (0.05, 0.45, 0.40, 0.10)
TC_MULTIPLIERS = (0.0, 0.5, 1.0, 2.0, 3.0)
TC_MULTIPLIER_P = (0.05, 0.30, 0.30, 0.25, 0.10)
EXTRA_FEATURE_SHARE = 0.2  # `all` = medium + this share of extra, signal-free features
SMALL_FEATURE_SHARE = 0.25  # `small` = this share of medium
FOREIGN_IDS = 50  # ids not in the round, appended to the `foreign_ids_dropped` submission
PREDICTION_DECIMALS = 6  # every prediction is written rounded to this many decimals
ADV_ROUND_SHARE = 0.1  # share of log-ADV variance redrawn each round (the rest is the stock's)
STAKE_ROUND_SIGMA = 0.05  # log-stake drift of a model from round to round

PLANTED_KINDS = (
    "feature_exposed",
    "unique_alpha",
    "mixed",
    "noise",
    "example_copy",
    "duplicate",
    "zero_stake_informative",
    "perfect",
    "perfect_negated",
    "portfolio",
)
BAD_INPUT_KIND = "bad_input"
INVALID_MODEL_ID = "bad model!"
# (expected_rule, what the model submits); `non_finite` predictions twice: one NaN, one inf.
BAD_INPUTS: tuple[tuple[str, str], ...] = (
    ("invalid_model_id", "predictions"),
    ("unreadable", "predictions"),
    ("duplicate_ids", "predictions"),
    ("non_finite", "predictions"),
    ("non_finite", "predictions"),
    ("out_of_range", "predictions"),
    ("constant", "predictions"),
    ("low_coverage", "predictions"),
    ("foreign_ids_dropped", "predictions"),
    ("not_dollar_neutral", "portfolio"),
    ("longs_not_one", "portfolio"),
    ("duplicate_ids", "portfolio"),
    ("non_finite", "portfolio"),
)
PLANTED_COLUMNS = (
    "model_id",
    "kind",
    "submits",
    "duplicate_of",
    "feature_weight",
    "alpha_weight",
    "expected_rule",
)

# Independent random streams: np.random.default_rng([seed, stream, ...]).
_STRUCTURE, _POPULATION, _UNIVERSE, _ROUND = 1, 2, 3, 4
# Salts of the per-stock hashed draws (a stock keeps them for as long as it is live).
_SALT_ID, _SALT_FACTORS, _SALT_IDIO, _SALT_ADV, _SALT_FOREIGN = 11, 12, 13, 14, 15


class SyntheticSettings(BaseModel, frozen=True):
    """Size, seed and signal strength of a synthetic round source (defaults: tests and demo)."""

    stocks: int = Field(1500, ge=100, description="Live ids per round.")
    features: int = Field(
        60,
        ge=4,
        description="Size of the `medium` feature set; `small` is ~1/4 of it, `all` adds ~20% "
        "signal-free features.",
    )
    models: int = Field(
        40,
        description="Models in the persistent population (stake row each round; a few are absent "
        "from a round). At least MIN_MODELS so that every planted kind is present.",
    )
    seed: int = Field(
        0, ge=0, description="Seed of everything; a round is seeded by (seed, round)."
    )
    with_bad_inputs: bool = Field(
        False, description="Add one submission per rejection rule of the contract (planted.csv)."
    )
    file_format: Literal["csv", "parquet"] = Field(
        "csv", description="File format of predictions/ and portfolios/."
    )
    write_resolved: bool = Field(
        True, description="Write resolved.parquet (False: the round is not resolved yet)."
    )
    universe_turnover: float = Field(
        0.05, ge=0.0, le=0.5, description="Share of ids replaced by new ones from round to round."
    )
    latent_factors: int = Field(
        8, ge=1, description="Latent factors behind the medium features' correlations."
    )
    factor_share: float = Field(
        0.5, ge=0.0, le=1.0, description="Share of a feature's variance due to latent factors."
    )
    feature_persistence: float = Field(
        0.7,
        ge=0.0,
        le=1.0,
        description="Share of a stock's raw feature variance that it keeps from round to round.",
    )
    signal_features: int = Field(
        8, ge=1, description="Medium features with a non-zero true beta (the signal f)."
    )
    feature_signal_corr: float = Field(
        0.1, ge=0.0, lt=1.0, description="corr(return, f): the feature-explained signal, exact."
    )
    alpha_signal_corr: float = Field(
        0.1, ge=0.0, lt=1.0, description="corr(return, u): the unique (feature-neutral) alpha."
    )
    return_std: float = Field(0.02, gt=0.0, description="Std of the realized residual return.")
    target_noise: float = Field(
        0.3, ge=0.0, description="Std of noise added to return/return_std before bucketing."
    )
    example_beta_noise: float = Field(
        1.0,
        ge=0.0,
        description="Noise of the example model's betas, as a multiple of |beta| (over all "
        "medium features).",
    )
    perfect_corr: float = Field(
        0.5,
        gt=0.0,
        le=1.0,
        description="Pearson corr of the near-perfect model's latent score with the target.",
    )
    adv_median_usd: float = Field(20e6, gt=0.0, description="Median average daily dollar volume.")
    adv_sigma: float = Field(1.5, ge=0.0, description="Std of log(adv_usd).")
    stake_median: float = Field(1000.0, gt=0.0, description="Median stake of a staked model.")
    stake_sigma: float = Field(1.0, ge=0.0, description="Std of log(stake) across models.")
    absent_share: float = Field(
        0.03, ge=0.0, le=0.2, description="Share of models with a stake row but no file (>= 1)."
    )
    rounding_share: float = Field(
        0.15,
        ge=0.0,
        le=1.0,
        description="Share of mixed models rounding predictions to 2-3 decimals (>= 1).",
    )
    partial_share: float = Field(
        0.1,
        ge=0.0,
        le=1.0,
        description="Share of mixed models covering only 85-95% of ids each round (>= 1).",
    )

    @model_validator(mode="after")
    def _check(self) -> SyntheticSettings:
        if self.models < MIN_MODELS:
            raise ValueError(f"models must be >= {MIN_MODELS} so that every kind is planted")
        if self.stocks < 4 * (self.features + 1):
            raise ValueError("stocks must be >= 4 * (features + 1) to residualize on the features")
        if self.signal_features > self.features:
            raise ValueError("signal_features must be <= features")
        if self.feature_signal_corr**2 + self.alpha_signal_corr**2 >= 1.0:
            raise ValueError("feature_signal_corr² + alpha_signal_corr² must be < 1")
        return self


def _kind_counts(models: int) -> dict[str, int]:
    """Models per planted kind: fixed minima at small sizes, `mixed` the rest (most at scale)."""
    counts = {
        "feature_exposed": max(4, models // 50),
        "unique_alpha": max(4, models // 50),
        "noise": max(3, models // 100),
        "example_copy": max(2, models // 500),
        "duplicate": max(2, models // 500),
        "zero_stake_informative": max(2, models // 500),
        "perfect": 1,
        "perfect_negated": 1,
        "portfolio": max(3, models // 500),
    }
    counts["mixed"] = models - sum(counts.values())
    return counts


# Mixed models must cover duplicate originals, the predictions+portfolio model and a few others.
MIN_MODELS = sum(v for k, v in _kind_counts(0).items() if k != "mixed") + 8


# --- calendar -------------------------------------------------------------------------------


def round_open_time(round_number: int) -> datetime:
    """Open time of a round: the R-th Tuesday..Saturday from 2024-01-02, at 12:00 UTC."""
    if round_number < 1:
        raise ValueError(f"rounds start at 1, got {round_number}")
    week, day = divmod(round_number - 1, len(ROUND_WEEKDAYS))
    return ROUND_ONE_OPEN + timedelta(weeks=week, days=day)


def round_close_time(round_number: int) -> datetime:
    """Close time of a round: one hour after it opens."""
    return round_open_time(round_number) + ROUND_DURATION


def round_resolve_time(round_number: int) -> datetime:
    """When a round's targets are known: 28 days after it closes."""
    return round_close_time(round_number) + RESOLVE_DELAY


def _iso(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


# --- hashed per-stock draws -----------------------------------------------------------------


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finalizer over a uint64 array (wrapping arithmetic): a fast, good 64-bit hash."""
    z = x + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _stock_hash(keys: np.ndarray, seed: int, salt: int, width: int) -> np.ndarray:
    """(len(keys), width) uint64 hashes of (seed, salt, stock key, column)."""
    base = _splitmix64(keys ^ _splitmix64(np.array([seed * 1024 + salt], dtype=np.uint64)))
    cols = np.arange(width, dtype=np.uint64)
    return _splitmix64(base[:, None] + _splitmix64(cols)[None, :])


def _stock_normals(keys: np.ndarray, seed: int, salt: int, width: int) -> np.ndarray:
    """Standard normals that belong to a stock: the same in every round the stock is live."""
    h = _stock_hash(keys, seed, salt, width)
    return ndtri(((h >> np.uint64(11)).astype(np.float64) + 0.5) / 2.0**53)


def _stock_ids(keys: np.ndarray, seed: int, salt: int = _SALT_ID) -> list[str]:
    """Numerai-like ids: 'n' + 15 hex digits of the stock's hash."""
    h = _stock_hash(keys, seed, salt, 1)[:, 0]
    return ["n" + format(int(v), "016x")[1:] for v in h]


# --- the fixed structure: features, betas, population ---------------------------------------


@dataclass(frozen=True)
class _Structure:
    """What the seed fixes about features: names, sets, factor loadings, true and example betas."""

    names: list[str]  # all features, in column order of live.parquet
    medium: np.ndarray  # indices into names
    small: np.ndarray  # indices into names, a subset of medium
    loadings: np.ndarray  # (factors, all features)
    beta: np.ndarray  # (medium,) true betas, non-zero on a few features
    beta_hat: np.ndarray  # (medium,) the example model's noisy estimate


def _structure(s: SyntheticSettings) -> _Structure:
    rng = np.random.default_rng([s.seed, _STRUCTURE])
    n_all = s.features + round(EXTRA_FEATURE_SHARE * s.features)
    width = max(4, len(str(n_all - 1)))
    names = [f"feature_{i:0{width}d}" for i in range(n_all)]
    medium = np.sort(rng.choice(n_all, s.features, replace=False))
    extra = np.setdiff1d(np.arange(n_all), medium)
    n_small = max(1, round(SMALL_FEATURE_SHARE * s.features))
    small = np.sort(rng.choice(medium, n_small, replace=False))
    # Medium features load on `latent_factors` factors, extras on their own few: no signal leaks.
    k_extra = max(1, s.latent_factors // 4)
    loadings = np.zeros((s.latent_factors + k_extra, n_all))
    loadings[: s.latent_factors, medium] = rng.standard_normal((s.latent_factors, medium.size))
    loadings[s.latent_factors :, extra] = rng.standard_normal((k_extra, extra.size))
    loadings /= np.linalg.norm(loadings, axis=0, keepdims=True)
    beta = np.zeros(s.features)
    support = rng.choice(s.features, s.signal_features, replace=False)
    beta[support] = rng.choice([-1.0, 1.0], support.size) * rng.uniform(0.5, 1.5, support.size)
    noise = rng.standard_normal(s.features)
    beta_hat = beta + s.example_beta_noise * np.linalg.norm(beta) * noise / np.linalg.norm(noise)
    return _Structure(names, medium, small, loadings, beta, beta_hat)


@dataclass(frozen=True)
class _Population:
    """The persistent model population, in kind order (ids are assigned at random)."""

    ids: list[str]
    kinds: list[str]
    feature_weight: np.ndarray  # coefficient on f; NaN where the mix does not define the model
    alpha_weight: np.ndarray  # coefficient on u; NaN likewise
    bets: dict[int, tuple[np.ndarray, np.ndarray]]  # model -> (medium feature idx, coefficients)
    cdf_output: np.ndarray  # output Phi(score) instead of the rank of the score
    decimals: np.ndarray  # decimals the predictions are rounded to
    partial: np.ndarray  # covers only part of the ids each round
    stake: np.ndarray  # base stake (0 for zero_stake_informative)
    corr_multiplier: np.ndarray
    tc_multiplier: np.ndarray
    duplicate_of: np.ndarray  # index of the original, -1 if none
    absent_pool: np.ndarray  # mixed models that may skip a round (no file, stake row kept)
    portfolio_style: dict[int, str]  # models that submit portfolios -> portfolio construction
    bad_ids: list[str]  # ids of the bad-input models, in BAD_INPUTS order


_PORTFOLIO_STYLES = ("illiquid_concentrated", "liquid_spread", "signal_weighted")


def _population(s: SyntheticSettings, st: _Structure) -> _Population:
    rng = np.random.default_rng([s.seed, _POPULATION])
    counts = _kind_counts(s.models)
    kinds = [k for k in PLANTED_KINDS for _ in range(counts[k])]
    m = len(kinds)
    kind = np.array(kinds)
    width = max(4, len(str(10 * (m + len(BAD_INPUTS)))))
    numbers = rng.choice(10**width - 1, m + len(BAD_INPUTS), replace=False) + 1
    ids = [f"model_{n:0{width}d}" for n in numbers]

    fw = np.full(m, np.nan)
    aw = np.full(m, np.nan)
    mixed = np.flatnonzero(kind == "mixed")
    fw[mixed] = rng.uniform(0.05, 0.6, mixed.size)
    aw[mixed] = rng.uniform(0.05, 0.6, mixed.size)
    for k, (f_lo, f_hi, a_lo, a_hi) in {
        "feature_exposed": (0.5, 0.7, 0.0, 0.0),
        "unique_alpha": (0.0, 0.0, 0.5, 0.7),
        "noise": (0.0, 0.0, 0.0, 0.0),
        "zero_stake_informative": (0.3, 0.4, 0.5, 0.6),
        "portfolio": (0.5, 0.5, 0.5, 0.5),
    }.items():
        i = np.flatnonzero(kind == k)
        fw[i] = rng.uniform(f_lo, f_hi, i.size)
        aw[i] = rng.uniform(a_lo, a_hi, i.size)
    # Feature-exposed models also bet on single features: a large bet on one of the four
    # highest-|beta| features and a smaller one on another, in the direction of their betas.
    top = np.argsort(-np.abs(st.beta), kind="stable")[:4]
    bets = {}
    for i in np.flatnonzero(kind == "feature_exposed"):
        j = rng.choice(top, 2, replace=False)
        size = np.array([rng.uniform(1.0, 1.4), rng.uniform(0.3, 0.6)])
        bets[int(i)] = (j, np.sign(st.beta[j]) * size)

    duplicate_of = np.full(m, -1)
    dups = np.flatnonzero(kind == "duplicate")
    duplicate_of[dups] = mixed[: dups.size]
    fw[dups], aw[dups] = fw[mixed[: dups.size]], aw[mixed[: dups.size]]
    both = int(mixed[dups.size])  # a mixed model that submits a portfolio too
    spare = mixed[dups.size + 1 :]
    portfolio_style = {
        int(i): _PORTFOLIO_STYLES[n % len(_PORTFOLIO_STYLES)]
        for n, i in enumerate(np.flatnonzero(kind == "portfolio"))
    }
    portfolio_style[both] = "liquid_spread"

    cdf_output = np.zeros(m, dtype=bool)
    cdf_output[mixed] = rng.random(mixed.size) < 0.5
    # Disjoint roles among the spare mixed models: rounders, partial coverage, may be absent.
    free = rng.permutation(spare)
    n_round = min(free.size, max(1, round(s.rounding_share * mixed.size)))
    n_partial = min(free.size - n_round, max(1, round(s.partial_share * mixed.size)))
    decimals = np.full(m, PREDICTION_DECIMALS)
    decimals[free[:n_round]] = np.where(np.arange(n_round) % 2 == 0, 2, 3)
    partial = np.zeros(m, dtype=bool)
    partial[free[n_round : n_round + n_partial]] = True
    stake = np.round(s.stake_median * np.exp(s.stake_sigma * rng.standard_normal(m)), 2)
    stake[kind == "zero_stake_informative"] = 0.0
    corr_mult = rng.choice(CORR_MULTIPLIERS, m, p=CORR_MULTIPLIER_P)
    tc_mult = rng.choice(TC_MULTIPLIERS, m, p=TC_MULTIPLIER_P)
    return _Population(
        ids=ids[:m],
        kinds=kinds,
        feature_weight=np.round(fw, 4),
        alpha_weight=np.round(aw, 4),
        bets=bets,
        cdf_output=cdf_output,
        decimals=decimals,
        partial=partial,
        stake=stake,
        corr_multiplier=corr_mult,
        tc_multiplier=tc_mult,
        duplicate_of=duplicate_of,
        absent_pool=np.sort(free[n_round + n_partial :]),
        portfolio_style=portfolio_style,
        bad_ids=ids[m:],
    )


# --- one round ------------------------------------------------------------------------------


def _universe(s: SyntheticSettings, rounds: Sequence[int]) -> dict[int, np.ndarray]:
    """Stock keys live in each round: slot j's occupant is replaced w.p. turnover each round.

    Replacements of round r are seeded by (seed, r), so a round's universe does not depend on
    which other rounds are generated. A key is slot << 32 | occupant number.
    """
    slots = np.arange(s.stocks, dtype=np.uint64) << np.uint64(32)
    occupant = np.zeros(s.stocks, dtype=np.uint64)
    wanted, keys = set(rounds), {}
    for r in range(1, max(rounds) + 1):
        if r > 1:
            moved = np.random.default_rng([s.seed, _UNIVERSE, r]).random(s.stocks)
            occupant += (moved < s.universe_turnover).astype(np.uint64)
        if r in wanted:
            keys[r] = slots | occupant
    return keys


def _standardize(v: np.ndarray) -> np.ndarray:
    return (v - v.mean()) / v.std()


def _residualize(v: np.ndarray, q: np.ndarray) -> np.ndarray:
    """v minus its projection on the constant and on span(q) (q: orthonormal, centred columns)."""
    v = v - v.mean()
    return v - q @ (q.T @ v)


def _unit_rank(x: np.ndarray) -> np.ndarray:
    """(rank - 0.5) / n along the last axis, rounded to PREDICTION_DECIMALS: values in (0, 1).

    A vector is ranked with ties averaged; a matrix holds rows of continuous scores (ties have
    probability 0), ranked with one argsort, several times faster than scipy's rankdata.
    """
    n = x.shape[-1]
    if x.ndim == 1:
        ranks = rankdata(x)
    else:
        ranks = np.empty(x.shape)
        positions = np.arange(1.0, n + 1.0)[None, :]
        np.put_along_axis(ranks, np.argsort(x, axis=-1), positions, axis=-1)
    return np.round((ranks - 0.5) / n, PREDICTION_DECIMALS)


def _bucket_target(z: np.ndarray) -> np.ndarray:
    """TARGET_VALUES by rank of z, in TARGET_SHARES (exact up to rounding of the counts)."""
    cuts = np.round(np.cumsum((0.0, *TARGET_SHARES)) * z.size).astype(int)
    target = np.empty(z.size)
    target[np.argsort(z, kind="stable")] = np.repeat(TARGET_VALUES, np.diff(cuts))
    return target


@dataclass(frozen=True)
class _Truth:
    """One round's stocks (sorted by id) and the latent truth behind its files."""

    ids: list[str]
    bins: np.ndarray  # (stocks, all features) int8 in 0..FEATURE_BINS-1
    xs: np.ndarray  # (stocks, medium) standardized medium features
    f: np.ndarray  # standardized feature signal
    u: np.ndarray  # standardized unique alpha, orthogonal to 1 and the medium features
    ret: np.ndarray  # realized residual return
    target: np.ndarray
    adv: np.ndarray
    example: np.ndarray  # example predictions in (0, 1)


def _truth(
    s: SyntheticSettings, st: _Structure, keys: np.ndarray, rng: np.random.Generator
) -> _Truth:
    ids = _stock_ids(keys, s.seed)
    order = np.argsort(ids, kind="stable")
    keys, ids = keys[order], [ids[i] for i in order]
    if len(set(ids)) != len(ids):  # 60-bit hashes: never expected
        raise RuntimeError("synthetic stock ids collide; use another seed")
    n, (k, n_all) = keys.size, st.loadings.shape
    p, fs = s.feature_persistence, s.factor_share

    def persistent_normals(salt: int, width: int) -> np.ndarray:
        kept = _stock_normals(keys, s.seed, salt, width)
        return np.sqrt(p) * kept + np.sqrt(1.0 - p) * rng.standard_normal((n, width))

    raw = np.sqrt(fs) * (persistent_normals(_SALT_FACTORS, k) @ st.loadings)
    raw += np.sqrt(1.0 - fs) * persistent_normals(_SALT_IDIO, n_all)
    ranks = np.argsort(np.argsort(raw, axis=0), axis=0)
    bins = (ranks * FEATURE_BINS // n).astype(np.int8)

    xc = bins[:, st.medium].astype(np.float64)
    xc -= xc.mean(axis=0)
    q, _ = np.linalg.qr(xc)
    f = _standardize(xc @ st.beta)
    u = _standardize(_residualize(rng.standard_normal(n), q))
    e = _residualize(rng.standard_normal(n), q)
    e = _standardize(e - u * (u @ e) / (u @ u))
    rho_f, rho_u = s.feature_signal_corr, s.alpha_signal_corr
    ret = s.return_std * (rho_f * f + rho_u * u + np.sqrt(1.0 - rho_f**2 - rho_u**2) * e)
    target = _bucket_target(ret / s.return_std + s.target_noise * rng.standard_normal(n))

    own = _stock_normals(keys, s.seed, _SALT_ADV, 1)[:, 0]
    log_adv = np.sqrt(1.0 - ADV_ROUND_SHARE) * own
    log_adv += np.sqrt(ADV_ROUND_SHARE) * rng.standard_normal(n)
    adv = s.adv_median_usd * np.exp(s.adv_sigma * log_adv)
    return _Truth(
        ids=ids,
        bins=bins,
        xs=xc / xc.std(axis=0),
        f=f,
        u=u,
        ret=ret,
        target=target,
        adv=adv,
        example=_unit_rank(xc @ st.beta_hat),
    )


def _scores(
    pop: _Population, t: _Truth, perfect_corr: float, rng: np.random.Generator
) -> np.ndarray:
    """(models, stocks) latent scores: fw f + aw u + noise (fw² + aw² + noise² = 1), plus the
    feature bets of feature-exposed models; the perfect model mixes the target with noise."""
    fw, aw = np.nan_to_num(pop.feature_weight), np.nan_to_num(pop.alpha_weight)
    noise_w = np.sqrt(np.clip(1.0 - fw**2 - aw**2, 0.0, 1.0))
    scores = rng.standard_normal((fw.size, t.f.size))
    scores *= noise_w[:, None]
    scores += fw[:, None] * t.f[None, :]
    scores += aw[:, None] * t.u[None, :]
    for i, (j, c) in pop.bets.items():
        scores[i] += t.xs[:, j] @ c
    zt = _standardize(t.target)
    for i in np.flatnonzero(np.array(pop.kinds) == "perfect"):
        scores[i] = perfect_corr * zt + np.sqrt(1.0 - perfect_corr**2) * scores[i]
    return scores


def _predictions(
    pop: _Population, t: _Truth, scores: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """(models, stocks) predictions in [0, 1] as each model submits them."""
    kind = np.array(pop.kinds)
    preds = _unit_rank(scores)
    cdf = pop.cdf_output
    preds[cdf] = ndtr(scores[cdf] / scores[cdf].std(axis=1, keepdims=True))
    for d in np.unique(pop.decimals):
        rows = pop.decimals == d
        preds[rows] = np.round(preds[rows], d)
    copies = np.flatnonzero(kind == "example_copy")
    preds[copies] = t.example
    tiny = 1e-4 * rng.standard_normal(t.example.size)  # the last copy is not quite exact
    preds[copies[-1]] = np.round(np.clip(t.example + tiny, 0.0, 1.0), PREDICTION_DECIMALS)
    perfect = np.flatnonzero(kind == "perfect")
    preds[kind == "perfect_negated"] = np.round(1.0 - preds[perfect], PREDICTION_DECIMALS)
    dups = np.flatnonzero(pop.duplicate_of >= 0)
    preds[dups] = preds[pop.duplicate_of[dups]]
    return preds


def _portfolio(score: np.ndarray, adv: np.ndarray, style: str) -> np.ndarray:
    """Dollar-neutral weights from a score: longs sum to 1, shorts to -1, over every id."""
    n = score.size
    w = np.zeros(n)
    if style == "signal_weighted":
        c = score - score.mean()
        pos = c > 0
        w[pos] = c[pos] / c[pos].sum()
        w[~pos] = c[~pos] / -c[~pos].sum()
        return w
    if style == "illiquid_concentrated":
        eligible, k = np.flatnonzero(adv <= np.quantile(adv, 0.3)), max(5, n // 100)
    elif style == "liquid_spread":
        eligible, k = np.flatnonzero(adv >= np.median(adv)), n // 10
    else:
        raise ValueError(f"unknown portfolio style {style!r}")
    ranked = eligible[np.argsort(score[eligible], kind="stable")]
    w[ranked[-k:]] = 1.0 / k
    w[ranked[:k]] = -1.0 / k
    return w


# --- writing --------------------------------------------------------------------------------

# Unquoted values; the header is written by hand (pyarrow quotes header names before 23.0).
_CSV_OPTIONS = pacsv.WriteOptions(include_header=False, quoting_style="none")


def _write_table(table: pa.Table, path: Path) -> None:
    if path.suffix == ".csv":
        with path.open("wb") as fh:
            fh.write((",".join(table.column_names) + "\n").encode())
            pacsv.write_csv(table, fh, write_options=_CSV_OPTIONS)
    else:
        pq.write_table(table, path)


def _write_text_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def _fmt(x: float) -> str:
    """Shortest round-trip text of a float; empty for NaN (not defined)."""
    return "" if np.isnan(x) else repr(float(x))


@dataclass
class _Files:
    """Prediction/portfolio tables of a round and the planted.csv rows, collected before writing."""

    predictions: dict[str, pa.Table]
    portfolios: dict[str, pa.Table]
    planted: list[list[str]]
    stakes: list[list[str]]


def _bad_inputs(
    s: SyntheticSettings,
    pop: _Population,
    t: _Truth,
    round_number: int,
    rng: np.random.Generator,
    files: _Files,
) -> None:
    """Add one submission per rejection rule (BAD_INPUTS order) and its planted.csv row.

    Each file breaks exactly its rule: the rest of it is a valid submission of a mixed model.
    """
    n = len(t.ids)
    ids = pa.array(t.ids, pa.string())
    fw = aw = 0.3
    score = fw * t.f + aw * t.u + np.sqrt(1 - fw**2 - aw**2) * rng.standard_normal(n)
    pred = _unit_rank(score)
    weight = _portfolio(score, t.adv, "liquid_spread")
    idle = np.flatnonzero(weight == 0)  # ids the portfolio does not hold

    def table(col: str, values: np.ndarray, rows: np.ndarray | None = None) -> pa.Table:
        if rows is not None:
            values = values[rows]
        return pa.table({"id": ids if rows is None else ids.take(rows), col: values})

    def with_nonfinite(values: np.ndarray, at: np.ndarray, value: float) -> np.ndarray:
        out = values.copy()
        out[at] = value
        return out

    twice = np.sort(np.concatenate([np.arange(n), rng.choice(n, 10, replace=False)]))
    idle_twice = np.sort(np.concatenate([np.arange(n), idle[:10]]))  # weights still sum right
    covered = np.sort(rng.choice(n, int(0.7 * n), replace=False))
    foreign_keys = np.arange(FOREIGN_IDS, dtype=np.uint64) + (np.uint64(round_number) << 32)
    foreign = _stock_ids(foreign_keys, s.seed, _SALT_FOREIGN)
    if set(foreign) & set(t.ids):
        raise RuntimeError("synthetic foreign ids collide with live ids; use another seed")
    foreign_table = pa.table(
        {
            "id": pa.array(foreign, pa.string()),
            "prediction": _unit_rank(rng.standard_normal(FOREIGN_IDS)),
        }
    )
    tables = [
        table("prediction", pred),  # invalid_model_id: only the file name is wrong
        table("pred", pred),  # unreadable: no `prediction` column
        table("prediction", pred, twice),  # duplicate_ids
        table("prediction", with_nonfinite(pred, rng.choice(n, 5, replace=False), np.nan)),
        table("prediction", with_nonfinite(pred, rng.choice(n, 1), np.inf)),
        table("prediction", np.round(1.2 * pred - 0.1, PREDICTION_DECIMALS)),  # out_of_range
        table("prediction", np.full(n, 0.5)),  # constant
        table("prediction", pred, covered),  # low_coverage: 70% of ids
        pa.concat_tables([table("prediction", pred), foreign_table]),  # foreign_ids_dropped
        table("weight", np.where(weight < 0, 0.8 * weight, weight)),  # not_dollar_neutral
        table("weight", 0.5 * weight),  # longs_not_one: longs 0.5, shorts -0.5
        table("weight", weight, idle_twice),  # duplicate_ids
        table("weight", with_nonfinite(weight, idle[:1], np.nan)),  # non_finite
    ]
    for (rule, submits), model_id, tab in zip(BAD_INPUTS, pop.bad_ids, tables, strict=True):
        if rule == "invalid_model_id":
            model_id = INVALID_MODEL_ID  # kept out of stakes.csv: the id itself is invalid
        else:
            files.stakes.append([model_id, f"{s.stake_median:.2f}", "1.0", "1.0"])
        (files.predictions if submits == "predictions" else files.portfolios)[model_id] = tab
        files.planted.append([model_id, BAD_INPUT_KIND, submits, "", _fmt(fw), _fmt(aw), rule])


def _round_files(
    s: SyntheticSettings, st: _Structure, pop: _Population, round_number: int, keys: np.ndarray
) -> tuple[_Truth, _Files]:
    """Everything a round holds, computed from (settings, round) only."""
    rng = np.random.default_rng([s.seed, _ROUND, round_number])
    t = _truth(s, st, keys, rng)
    scores = _scores(pop, t, s.perfect_corr, rng)
    preds = _predictions(pop, t, scores, rng)
    n, m = len(t.ids), len(pop.ids)
    ids = pa.array(t.ids, pa.string())
    n_absent = min(pop.absent_pool.size, max(1, round(s.absent_share * m)))
    absent = set(rng.choice(pop.absent_pool, n_absent, replace=False).tolist())
    stake = np.round(pop.stake * np.exp(STAKE_ROUND_SIGMA * rng.standard_normal(m)), 2)
    files = _Files(predictions={}, portfolios={}, planted=[], stakes=[])
    for i, (model_id, kind) in enumerate(zip(pop.ids, pop.kinds, strict=True)):
        sends_predictions = kind != "portfolio" and i not in absent
        sends_portfolio = i in pop.portfolio_style and i not in absent
        if sends_predictions:
            table = pa.table({"id": ids, "prediction": preds[i]})
            if pop.partial[i]:
                rows = np.sort(rng.choice(n, int(rng.uniform(0.85, 0.95) * n), replace=False))
                table = table.take(rows)
            files.predictions[model_id] = table
        if sends_portfolio:
            weight = _portfolio(scores[i], t.adv, pop.portfolio_style[i])
            files.portfolios[model_id] = pa.table({"id": ids, "weight": weight})
        submits = {
            (True, True): "both",
            (True, False): "predictions",
            (False, True): "portfolio",
            (False, False): "none",
        }[(sends_predictions, sends_portfolio)]
        original = pop.duplicate_of[i]
        files.planted.append(
            [
                model_id,
                kind,
                submits,
                pop.ids[original] if original >= 0 else "",
                _fmt(pop.feature_weight[i]),
                _fmt(pop.alpha_weight[i]),
                "",
            ]
        )
        files.stakes.append(
            [
                model_id,
                f"{stake[i]:.2f}",
                _fmt(pop.corr_multiplier[i]),
                _fmt(pop.tc_multiplier[i]),
            ]
        )
    if s.with_bad_inputs:
        _bad_inputs(s, pop, t, round_number, rng, files)
    return t, files


def _write_round(
    root: Path,
    s: SyntheticSettings,
    st: _Structure,
    pop: _Population,
    round_number: int,
    keys: np.ndarray,
) -> int:
    """Write rounds/<R>/ aside, then swap it into place; returns the number of files written."""
    t, files = _round_files(s, st, pop, round_number, keys)
    rounds_dir = root / "rounds"
    tmp = rounds_dir / f".{round_number}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "predictions").mkdir(parents=True)
    (tmp / "portfolios").mkdir()

    meta = {
        "round": round_number,
        "open_time": _iso(round_open_time(round_number)),
        "close_time": _iso(round_close_time(round_number)),
        "resolve_time": _iso(round_resolve_time(round_number)),
        "payout": PAYOUT,
    }
    (tmp / "round.json").write_text(json.dumps(meta, indent=2) + "\n")
    ids = pa.array(t.ids, pa.string())
    n = len(t.ids)
    columns = np.ascontiguousarray(t.bins.T)
    live = {"id": ids, "era": pa.array([str(round_number)] * n, pa.string())}
    live |= {name: columns[j] for j, name in enumerate(st.names)}
    pq.write_table(pa.table(live), tmp / "live.parquet")
    pq.write_table(
        pa.table({"id": ids, "prediction": t.example}), tmp / "example_predictions.parquet"
    )
    pq.write_table(pa.table({"id": ids, "adv_usd": t.adv}), tmp / "market.parquet")
    if s.write_resolved:
        resolved = pa.table({"id": ids, "target": t.target, "return": t.ret})
        pq.write_table(resolved, tmp / "resolved.parquet")
    stake_header = ("model_id", "stake", "corr_multiplier", "tc_multiplier")
    _write_text_csv(tmp / "stakes.csv", stake_header, sorted(files.stakes))
    _write_text_csv(tmp / "planted.csv", PLANTED_COLUMNS, sorted(files.planted))
    for folder, tables in (("predictions", files.predictions), ("portfolios", files.portfolios)):
        for model_id, table in tables.items():
            _write_table(table, tmp / folder / f"{model_id}.{s.file_format}")

    final = rounds_dir / str(round_number)
    if final.exists():
        old = rounds_dir / f".{round_number}.old"
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    return 6 + int(s.write_resolved) + len(files.predictions) + len(files.portfolios)


DEFAULT_SETTINGS = SyntheticSettings()


def generate_source(
    out: str | os.PathLike[str],
    rounds: Sequence[int],
    settings: SyntheticSettings = DEFAULT_SETTINGS,
) -> dict[str, object]:
    """Write features.json and rounds/<R>/ for each R in `rounds` under `out`; return a summary.

    Deterministic: the same settings write byte-identical files, and a round's files do not
    depend on which other rounds are generated. An existing rounds/<R>/ is replaced whole.
    """
    start = time.perf_counter()
    wanted = sorted({int(r) for r in rounds})
    if not wanted or wanted[0] < 1:
        raise ValueError(f"rounds must be a non-empty set of numbers >= 1, got {list(rounds)}")
    root = Path(out)
    (root / "rounds").mkdir(parents=True, exist_ok=True)
    st = _structure(settings)
    pop = _population(settings, st)
    feature_sets = {
        "small": [st.names[i] for i in st.small],
        "medium": [st.names[i] for i in st.medium],
        "all": list(st.names),
    }
    (root / "features.json").write_text(json.dumps({"feature_sets": feature_sets}, indent=2) + "\n")
    files = 1
    for r, keys in _universe(settings, wanted).items():
        files += _write_round(root, settings, st, pop, r, keys)
    return {
        "out": str(root),
        "rounds": wanted,
        "stocks": settings.stocks,
        "features": {k: len(v) for k, v in feature_sets.items()},
        "models": settings.models,
        "files": files,
        "seconds": round(time.perf_counter() - start, 3),
    }
