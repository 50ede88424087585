"""The data contract (README, "Input contract") as code: names, rules and validators.

Everything here is pure: validators take DataFrames and return clean values or a rejection.
Reading files lives in `source.py`, assembling a round in `ingest.py`, writing in `warehouse.py`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pandas as pd

MODEL_ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
ROUND_DIR_PATTERN = re.compile(r"^[1-9][0-9]*$")
TARGET_VALUES = (0.0, 0.25, 0.5, 0.75, 1.0)
MIN_COVERAGE = 0.8
PORTFOLIO_TOLERANCE = 1e-6

# File names inside rounds/<R>/.
FEATURES_FILE = "features.json"
ROUND_FILE = "round.json"
LIVE_FILE = "live.parquet"
EXAMPLE_FILE = "example_predictions.parquet"
MARKET_FILE = "market.parquet"
STAKES_FILE = "stakes.csv"
PREDICTIONS_DIR = "predictions"
PORTFOLIOS_DIR = "portfolios"
RESOLVED_FILE = "resolved.parquet"
RETURN_COLUMN = "return"  # optional in RESOLVED_FILE: a round may publish only targets
SUBMISSION_SUFFIXES = (".csv", ".parquet")

DEFAULT_STAKE_THRESHOLD = 72_000.0
DEFAULT_CLIP = 0.05


class Rule:
    """Rejection rule codes, stored in `submission_rejections.rule` beside the readable reason."""

    INVALID_MODEL_ID = "invalid_model_id"
    UNREADABLE = "unreadable"
    DUPLICATE_IDS = "duplicate_ids"
    NON_FINITE = "non_finite"
    OUT_OF_RANGE = "out_of_range"
    CONSTANT = "constant"
    LOW_COVERAGE = "low_coverage"
    NOT_DOLLAR_NEUTRAL = "not_dollar_neutral"
    LONGS_NOT_ONE = "longs_not_one"
    DUPLICATE_SUBMISSION = "duplicate_submission"
    DUPLICATE_COLUMNS = "duplicate_columns"


class RoundInputError(ValueError):
    """A required input of a round is missing or malformed: the round's ingestion fails whole.
    `rows` lists the offending rows of a file (line, model_id, problem) when there are any."""

    def __init__(self, message: str, rows: list[dict[str, object]] | None = None) -> None:
        super().__init__(message)
        self.rows = rows or []


def shown(value: object) -> str:
    """A cell as written in the file: numbers plainly (-5, 0.5, nan), text quoted."""
    if isinstance(value, str):
        return repr(value)
    try:
        return f"{float(value):g}"
    except (TypeError, ValueError):
        return repr(value)


@dataclass(frozen=True)
class Rejection:
    """Why one submission file was not accepted."""

    rule: str
    reason: str


@dataclass(frozen=True)
class Accepted:
    """A validated submission: values indexed by id (sorted), and how many foreign ids it dropped."""

    values: pd.Series
    foreign_ids: int
    rows: int


def is_valid_model_id(name: str) -> bool:
    return bool(MODEL_ID_PATTERN.fullmatch(name))


def _examples(ids: pd.Index, limit: int = 3) -> str:
    shown = ", ".join(repr(str(i)) for i in ids[:limit])
    return shown + (", ..." if len(ids) > limit else "")


def repeated_columns(df: pd.DataFrame) -> list[str]:
    """Column names that appear more than once in a file's header."""
    return sorted({str(c) for c in df.columns[df.columns.duplicated()]})


def require_unique_columns(df: pd.DataFrame, file: str) -> None:
    """A required file with a repeated column name fails the round (which column is meant?)."""
    repeated = repeated_columns(df)
    if repeated:
        raise RoundInputError(f"{file}: column(s) {repeated} appear more than once in the header")


def _prepare(
    df: pd.DataFrame, value_column: str, live_ids: pd.Index
) -> tuple[pd.Series | None, Rejection | None, int]:
    """Shared id rules: columns present once each, ids unique, values finite; drop ids not in
    the round."""
    repeated = repeated_columns(df)
    if repeated:
        return (
            None,
            Rejection(
                Rule.DUPLICATE_COLUMNS,
                f"column(s) {repeated} appear more than once in the header",
            ),
            0,
        )
    missing = [c for c in ("id", value_column) if c not in df.columns]
    if missing:
        return (
            None,
            Rejection(
                Rule.UNREADABLE,
                f"missing column(s) {missing}; expected 'id' and '{value_column}', "
                f"found {list(df.columns)[:10]}",
            ),
            0,
        )
    ids = df["id"].astype("string")
    if ids.isna().any():
        return None, Rejection(Rule.UNREADABLE, f"{int(ids.isna().sum())} rows have no id"), 0
    dup = ids[ids.duplicated()].unique()
    if len(dup):
        return (
            None,
            Rejection(
                Rule.DUPLICATE_IDS,
                f"{len(dup)} id(s) appear more than once (e.g. {_examples(pd.Index(dup))})",
            ),
            0,
        )
    if pd.api.types.is_bool_dtype(df[value_column]) or any(
        isinstance(v, bool | np.bool_) for v in df[value_column].head(1000)
    ):
        return (
            None,
            Rejection(Rule.UNREADABLE, f"'{value_column}' values are booleans, not numbers"),
            0,
        )
    values = pd.to_numeric(df[value_column], errors="coerce").astype("float64")
    bad_text = values.isna() & df[value_column].notna()
    if bad_text.any():
        return (
            None,
            Rejection(
                Rule.UNREADABLE, f"{int(bad_text.sum())} '{value_column}' values are not numbers"
            ),
            0,
        )
    arr = values.to_numpy()
    n_nan = int(np.isnan(arr).sum())
    n_inf = int(np.isinf(arr).sum())
    if n_nan or n_inf:
        return (
            None,
            Rejection(Rule.NON_FINITE, f"{n_nan} NaN and {n_inf} infinite '{value_column}' values"),
            0,
        )
    series = pd.Series(
        arr, index=pd.Index(ids.to_numpy(dtype=object), name="id"), name=value_column
    )
    in_round = live_ids.get_indexer(series.index) >= 0  # hash lookup; isin is slow on str
    foreign = int((~in_round).sum())
    return series[in_round].sort_index(), None, foreign


def validate_predictions(df: pd.DataFrame, live_ids: pd.Index) -> Accepted | Rejection:
    """Contract rules for a prediction file (ids not in the round are dropped and counted)."""
    series, rejection, foreign = _prepare(df, "prediction", live_ids)
    if rejection is not None:
        return rejection
    assert series is not None
    arr = series.to_numpy()
    outside = (arr < 0) | (arr > 1)
    if outside.any():
        return Rejection(
            Rule.OUT_OF_RANGE,
            f"{int(outside.sum())} predictions outside [0, 1] "
            f"(min {arr.min():.6g}, max {arr.max():.6g})",
        )
    coverage = len(arr) / len(live_ids)
    if len(arr) and np.all(arr == arr[0]):
        return Rejection(Rule.CONSTANT, "predictions are constant (no ranking information)")
    if coverage < MIN_COVERAGE:  # an empty file, or one of ids not in the round, included
        return Rejection(
            Rule.LOW_COVERAGE,
            f"covers {len(arr)} of {len(live_ids)} live ids ({coverage:.1%}); "
            f"at least {MIN_COVERAGE:.0%} required",
        )
    return Accepted(values=series, foreign_ids=foreign, rows=len(df))


def validate_portfolio(df: pd.DataFrame, live_ids: pd.Index) -> Accepted | Rejection:
    """Contract rules for a portfolio file: sum 0 and longs sum to 1, within 1e-6.

    The sums are checked on the ids of the round: a weight on an id not in the round cannot be
    held, so it is dropped and counted before the sums are checked.
    """
    series, rejection, foreign = _prepare(df, "weight", live_ids)
    if rejection is not None:
        return rejection
    assert series is not None
    arr = series.to_numpy()
    total = float(arr.sum())
    if abs(total) > PORTFOLIO_TOLERANCE:
        return Rejection(
            Rule.NOT_DOLLAR_NEUTRAL,
            f"weights sum to {total:.3g}; must be 0 within {PORTFOLIO_TOLERANCE:g}",
        )
    longs = float(arr[arr > 0].sum())
    if abs(longs - 1.0) > PORTFOLIO_TOLERANCE:
        return Rejection(
            Rule.LONGS_NOT_ONE,
            f"positive weights sum to {longs:.6g}; must be 1 within {PORTFOLIO_TOLERANCE:g}",
        )
    return Accepted(values=series, foreign_ids=foreign, rows=len(df))


STAKE_COLUMNS = ("model_id", "stake", "corr_multiplier", "tc_multiplier")


def validate_stakes(
    df: pd.DataFrame,
    allowed_corr_multipliers: tuple[float, ...] | None = None,
    allowed_tc_multipliers: tuple[float, ...] | None = None,
) -> pd.DataFrame:
    """Validate stakes.csv as a whole; raise RoundInputError naming every bad row.

    Returns the stakes indexed by model_id, float columns. Multiplier elections are checked
    against the allowed sets when given (payout rules), else only for finite and >= 0.
    """
    require_unique_columns(df, STAKES_FILE)
    missing = [c for c in STAKE_COLUMNS if c not in df.columns]
    if missing:
        raise RoundInputError(f"{STAKES_FILE}: missing column(s) {missing}")
    problems: list[dict[str, object]] = []
    ids = df["model_id"].astype("string")
    counts = ids.value_counts()
    numeric = {c: pd.to_numeric(df[c], errors="coerce") for c in STAKE_COLUMNS[1:]}
    allowed = {"corr_multiplier": allowed_corr_multipliers, "tc_multiplier": allowed_tc_multipliers}
    # Only rows a vectorized pass flags are examined one by one (and worded) below.
    text = ids.fillna("")
    flagged = (
        ids.isna() | ~text.str.fullmatch(MODEL_ID_PATTERN.pattern) | ids.duplicated(keep=False)
    )
    for col in STAKE_COLUMNS[1:]:
        v = numeric[col].to_numpy(dtype=np.float64, na_value=np.nan)
        bad = ~np.isfinite(v) | (v < 0)
        if allowed.get(col) is not None:
            bad |= ~np.any(np.abs(v[:, None] - np.array(allowed[col])[None, :]) <= 1e-12, axis=1)
        flagged |= bad
    for i in np.flatnonzero(flagged.to_numpy(dtype=bool)):
        row_problems: list[str] = []
        model_id = ids.iloc[i]
        if pd.isna(model_id) or not is_valid_model_id(str(model_id)):
            row_problems.append(f"invalid model_id {shown(df['model_id'].iloc[i])}")
        elif counts[model_id] > 1:
            row_problems.append(f"model_id {model_id!r} appears {counts[model_id]} times")
        stake = numeric["stake"].iloc[i]
        if not np.isfinite(stake) or stake < 0:
            row_problems.append(f"stake {shown(df['stake'].iloc[i])} is not a finite number >= 0")
        for col in ("corr_multiplier", "tc_multiplier"):
            v = numeric[col].iloc[i]
            if not np.isfinite(v) or v < 0:
                row_problems.append(f"{col} {shown(df[col].iloc[i])} is not a finite number >= 0")
            elif allowed[col] is not None and not any(abs(v - a) <= 1e-12 for a in allowed[col]):
                row_problems.append(
                    f"{col} {v:g} is not an allowed election {sorted(allowed[col])}"
                )
        if row_problems:
            # Row numbers as in the file: line 1 is the header.
            model = None if pd.isna(model_id) else str(model_id)
            problems.append({"line": i + 2, "model_id": model, "problem": ", ".join(row_problems)})
    if problems:
        listed = "; ".join(f"line {p['line']}: {p['problem']}" for p in problems)
        raise RoundInputError(
            f"{STAKES_FILE} has {len(problems)} bad row(s), nothing of this round was written: "
            + listed,
            problems,
        )
    out = pd.DataFrame(
        {c: numeric[c].astype("float64").to_numpy() for c in STAKE_COLUMNS[1:]},
        index=pd.Index(ids.to_numpy(dtype=object), name="model_id"),
    )
    return out.sort_index()


def validate_live(df: pd.DataFrame, all_features: list[str]) -> pd.DataFrame:
    """live.parquet: unique string ids, an era, every feature of `all` with values in range."""
    require_unique_columns(df, LIVE_FILE)
    missing = [c for c in ["id", "era", *all_features] if c not in df.columns]
    if missing:
        raise RoundInputError(
            f"{LIVE_FILE}: missing {len(missing)} column(s): {missing[:5]}"
            + (" ..." if len(missing) > 5 else "")
        )
    if len(df) == 0:
        raise RoundInputError(f"{LIVE_FILE}: no rows")
    ids = df["id"].astype("string")
    if ids.isna().any() or ids.duplicated().any():
        raise RoundInputError(f"{LIVE_FILE}: ids must be present and unique")
    feats = df[all_features].to_numpy(dtype=np.float64, na_value=np.nan)
    if not np.all(np.isfinite(feats)):
        raise RoundInputError(f"{LIVE_FILE}: feature values contain NaN or infinity")
    is_int = np.all(feats == np.round(feats))
    lo, hi = (0.0, 4.0) if is_int else (0.0, 1.0)
    if feats.min() < lo or feats.max() > hi:
        raise RoundInputError(
            f"{LIVE_FILE}: feature values must be integers 0..4 or floats in [0, 1] "
            f"(found min {feats.min():g}, max {feats.max():g})"
        )
    out = df[["era", *all_features]].copy()
    out.index = pd.Index(ids.to_numpy(dtype=object), name="id")
    out["era"] = out["era"].astype(str)
    return out.sort_index()


def validate_example(df: pd.DataFrame, live_ids: pd.Index) -> pd.Series:
    """example_predictions.parquet: id, prediction in [0, 1] for the round's ids."""
    result = validate_predictions(df, live_ids)
    if isinstance(result, Rejection):
        raise RoundInputError(f"{EXAMPLE_FILE}: {result.reason}")
    return result.values


def validate_market(df: pd.DataFrame, live_ids: pd.Index) -> pd.Series:
    """market.parquet: id, adv_usd > 0 and finite for at least MIN_COVERAGE of the live ids
    (ids not in the round are ignored; a live id without adv_usd cannot be held)."""
    series, rejection, _ = _prepare(df, "adv_usd", live_ids)
    if rejection is not None:
        raise RoundInputError(f"{MARKET_FILE}: {rejection.reason}")
    assert series is not None
    if (series <= 0).any():
        raise RoundInputError(f"{MARKET_FILE}: {int((series <= 0).sum())} adv_usd values <= 0")
    if len(series) < MIN_COVERAGE * len(live_ids):
        raise RoundInputError(
            f"{MARKET_FILE}: has adv_usd for {len(series)} of {len(live_ids)} live ids "
            f"({len(series) / len(live_ids):.1%}); at least {MIN_COVERAGE:.0%} required (a live "
            "id without adv_usd gets a position cap of 0)"
        )
    return series


def validate_resolved(df: pd.DataFrame, live_ids: pd.Index) -> pd.DataFrame:
    """resolved.parquet: id, target in the five buckets, and optionally a finite return;
    indexed by id. The result has a `return` column only when the file has one."""
    require_unique_columns(df, RESOLVED_FILE)
    missing = [c for c in ("id", "target") if c not in df.columns]
    if missing:
        raise RoundInputError(f"{RESOLVED_FILE}: missing column(s) {missing}")
    ids = df["id"].astype("string")
    if ids.isna().any() or ids.duplicated().any():
        raise RoundInputError(f"{RESOLVED_FILE}: ids must be present and unique")
    target = pd.to_numeric(df["target"], errors="coerce").to_numpy(dtype=np.float64)
    bad_target = ~np.isin(target, TARGET_VALUES)
    if bad_target.any():
        raise RoundInputError(
            f"{RESOLVED_FILE}: {int(bad_target.sum())} target values outside {TARGET_VALUES}"
        )
    columns = {"target": target}
    if RETURN_COLUMN in df.columns:
        ret = pd.to_numeric(df[RETURN_COLUMN], errors="coerce").to_numpy(dtype=np.float64)
        if not np.all(np.isfinite(ret)):
            raise RoundInputError(
                f"{RESOLVED_FILE}: return has NaN or infinite values (leave the column out "
                "when the round publishes only targets)"
            )
        columns[RETURN_COLUMN] = ret
    out = pd.DataFrame(columns, index=pd.Index(ids.to_numpy(dtype=object), name="id"))
    out = out[live_ids.get_indexer(out.index) >= 0].sort_index()
    if len(out) < MIN_COVERAGE * len(live_ids):
        raise RoundInputError(
            f"{RESOLVED_FILE}: resolves {len(out)} of {len(live_ids)} live ids; "
            f"at least {MIN_COVERAGE:.0%} required"
        )
    return out


def validate_round_info(info: object, round_number: int) -> dict:
    """round.json: the round number must match its folder; times are ISO 8601; payout optional."""
    if not isinstance(info, dict):
        raise RoundInputError(f"{ROUND_FILE}: expected a JSON object")
    for key in ("round", "open_time", "close_time"):
        if key not in info:
            raise RoundInputError(f"{ROUND_FILE}: missing required key {key!r}")
    if isinstance(info["round"], bool) or not isinstance(info["round"], int):
        raise RoundInputError(f"{ROUND_FILE}: round must be an integer, got {info['round']!r}")
    if info["round"] != round_number:
        raise RoundInputError(
            f"{ROUND_FILE}: says round {info['round']!r} but lives in rounds/{round_number}/"
        )
    out = {"round": round_number}
    for key in ("open_time", "close_time", "resolve_time"):
        value = info.get(key)
        if value is None and key == "resolve_time":
            out[key] = None
            continue
        try:
            if not isinstance(value, str):
                raise TypeError
            ts = pd.Timestamp(value)
            if pd.isna(ts):  # "" and "NaT" parse to NaT
                raise ValueError
        except (ValueError, TypeError) as exc:
            raise RoundInputError(
                f"{ROUND_FILE}: {key} {value!r} is not an ISO 8601 time (e.g. 2026-12-01T13:00:00Z)"
            ) from exc
        out[key] = ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")
    if out["close_time"] <= out["open_time"]:
        raise RoundInputError(
            f"{ROUND_FILE}: close_time {info['close_time']!r} is not after open_time "
            f"{info['open_time']!r}"
        )
    payout = info.get("payout", {})
    if not isinstance(payout, dict):
        raise RoundInputError(f"{ROUND_FILE}: 'payout' must be an object, got {payout!r}")
    for key, default in (("stake_threshold", DEFAULT_STAKE_THRESHOLD), ("clip", DEFAULT_CLIP)):
        value = payout.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise RoundInputError(f"{ROUND_FILE}: payout.{key} must be a number, got {value!r}")
        if not np.isfinite(value) or value <= 0 or (key == "clip" and value > 1):
            bound = "in (0, 1]" if key == "clip" else "positive and finite"
            raise RoundInputError(f"{ROUND_FILE}: payout.{key} must be {bound}, got {value!r}")
        out[key] = float(value)
    return out


def validate_feature_sets(doc: object) -> dict[str, list[str]]:
    """features.json: small/medium/all lists; medium and small must be subsets of all."""
    if not isinstance(doc, dict) or not isinstance(doc.get("feature_sets"), dict):
        raise RoundInputError(f"{FEATURES_FILE}: expected {{'feature_sets': {{...}}}}")
    sets = doc["feature_sets"]
    for name in ("small", "medium", "all"):
        if not isinstance(sets.get(name), list) or not sets[name]:
            raise RoundInputError(f"{FEATURES_FILE}: feature set {name!r} missing or empty")
    all_set = set(sets["all"])
    for name in ("small", "medium"):
        extra = [f for f in sets[name] if f not in all_set]
        if extra:
            raise RoundInputError(f"{FEATURES_FILE}: {name} has features not in all: {extra[:3]}")
    return {k: [str(f) for f in v] for k, v in sets.items()}
