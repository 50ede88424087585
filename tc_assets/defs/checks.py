"""Asset checks on each round: the ingestion checks, and helpers for every area's own checks.

A check whose failure means the data cannot be scored (no usable prediction, no stake behind
them) is blocking with ERROR severity: the run fails and nothing downstream is computed from
it. A check that flags something worth a look (many rejections, thin resolution) warns only.

Helpers for other areas (metrics free of NaN, portfolio constraints, payouts within the clip):

    from tc_assets.defs.checks import round_check, check_finite, check_within

    @round_check(asset=model_metrics, blocking=True)
    def metrics_finite(model_metrics: pd.DataFrame) -> dg.AssetCheckResult:
        return check_finite(model_metrics, ["corr", "mmc"])
"""

import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import dagster as dg
import numpy as np
import pandas as pd
from pydantic import Field

from tc_assets.defs import ingest
from tc_assets.defs.metadata import markdown_table
from tc_assets.defs.partitions import WAREHOUSE_POOL, round_of, rounds_partitions
from tc_assets.defs.resources import WarehouseResource
from tc_assets.io.contract import MIN_COVERAGE

# --- helpers for any area -------------------------------------------------------------------


def round_check(
    *,
    asset: dg.AssetsDefinition | dg.AssetKey | str,
    name: str | None = None,
    description: str | None = None,
    blocking: bool = False,
    additional_ins: Mapping[str, dg.AssetIn] | None = None,
    pool: str | None = None,
) -> Callable[[Callable[..., Any]], dg.AssetChecksDefinition]:
    """`dg.asset_check` for a round-partitioned asset: runs per round, in the round's run.

    `blocking=True` with an ERROR result fails the run and skips everything downstream of the
    asset. The check must carry the rounds partitions: without them Dagster loads the wrong
    partition of the asset. Partitioned checks are a Dagster preview, hence the silenced warning.
    """

    def decorate(fn: Callable[..., Any]) -> dg.AssetChecksDefinition:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", dg.PreviewWarning)
            return dg.asset_check(
                asset=asset,
                name=name,
                description=description,
                blocking=blocking,
                additional_ins=additional_ins,
                partitions_def=rounds_partitions,
                pool=pool,
            )(fn)

    return decorate


def check_finite(
    frame: pd.DataFrame,
    columns: Sequence[str] | None = None,
    *,
    severity: dg.AssetCheckSeverity = dg.AssetCheckSeverity.ERROR,
    max_rows: int = 10,
) -> dg.AssetCheckResult:
    """Pass when `columns` (default: every numeric column) hold no NaN or infinite value."""
    cols = list(columns) if columns is not None else list(frame.select_dtypes("number").columns)
    values = frame[cols].to_numpy(dtype=np.float64)
    bad = ~np.isfinite(values)
    by_column = {col: int(n) for col, n in zip(cols, bad.sum(axis=0), strict=True) if n}
    rows = bad.any(axis=1)
    return dg.AssetCheckResult(
        passed=not rows.any(),
        severity=severity,
        description=(
            f"{int(rows.sum())} of {len(frame)} rows have NaN or infinite values"
            if rows.any()
            else f"all {len(frame)} rows finite in {len(cols)} columns"
        ),
        metadata={
            "rows": len(frame),
            "bad_rows": int(rows.sum()),
            "bad_by_column": by_column,
            "examples": markdown_table(frame.loc[rows].reset_index().head(max_rows)),
        },
    )


def check_within(
    values: pd.Series,
    lower: float,
    upper: float,
    *,
    tol: float = 0.0,
    severity: dg.AssetCheckSeverity = dg.AssetCheckSeverity.ERROR,
    max_rows: int = 10,
) -> dg.AssetCheckResult:
    """Pass when every value lies in [lower - tol, upper + tol] (NaN counts as outside)."""
    x = values.to_numpy(dtype=np.float64)
    excess = np.maximum(lower - x, x - upper)
    outside = ~(excess <= tol)
    label = values.name or "value"
    worst = float(np.nanmax(excess)) if np.isfinite(excess).any() else float("nan")
    return dg.AssetCheckResult(
        passed=not outside.any(),
        severity=severity,
        description=(
            f"{int(outside.sum())} of {len(x)} {label} outside [{lower:g}, {upper:g}]"
            if outside.any()
            else f"every {label} within [{lower:g}, {upper:g}]"
        ),
        metadata={
            "count": len(x),
            "outside": int(outside.sum()),
            "worst_excess": worst,
            "min": float(np.nanmin(x)) if len(x) and not np.isnan(x).all() else float("nan"),
            "max": float(np.nanmax(x)) if len(x) and not np.isnan(x).all() else float("nan"),
            "examples": markdown_table(values[outside].reset_index().head(max_rows)),
        },
    )


def check_close(
    actual: float,
    expected: float,
    *,
    tol: float,
    label: str,
    severity: dg.AssetCheckSeverity = dg.AssetCheckSeverity.ERROR,
) -> dg.AssetCheckResult:
    """Pass when |actual - expected| <= tol (e.g. a portfolio's weights summing to zero)."""
    gap = abs(float(actual) - float(expected))
    ok = bool(gap <= tol)
    return dg.AssetCheckResult(
        passed=ok,
        severity=severity,
        description=f"{label} = {actual:.3g}, expected {expected:g} (tolerance {tol:g})",
        metadata={label: float(actual), "expected": float(expected), "gap": gap, "tol": tol},
    )


# --- the ingestion checks -------------------------------------------------------------------


class IngestionCheckConfig(dg.Config):
    """Thresholds of the ingestion checks (the contract's hard rules are enforced at ingestion)."""

    min_staked_share: float = Field(
        default=0.5,
        ge=0.0,
        le=1.0,
        description="Warn when models with a valid prediction hold less than this share of "
        "the round's stake (the meta model then speaks for few stakers).",
    )
    max_rejected_share: float = Field(
        default=0.25,
        ge=0.0,
        le=1.0,
        description="Warn when more than this share of the round's submission files is "
        "rejected (a broken upload or a changed format upstream).",
    )
    min_resolved_share: float = Field(
        default=0.95,
        ge=0.0,
        le=1.0,
        description="Warn when resolved.parquet resolves less than this share of live ids "
        f"(below {MIN_COVERAGE:.0%} ingestion refuses the file).",
    )


@round_check(
    asset="predictions",
    blocking=True,
    additional_ins={"stakes": dg.AssetIn("stakes")},
)
def predictions_coverage(
    config: IngestionCheckConfig, predictions: pd.DataFrame, stakes: pd.DataFrame
) -> dg.AssetCheckResult:
    """Accepted predictions are usable: at least one model, each covering at least 80% of the
    round's ids, and a positive stake behind them (else the meta model is undefined). Fails the
    run (ERROR) when not; warns when the models with valid predictions hold little of the stake.
    """
    n_ids, n_models = predictions.shape
    coverage = predictions.notna().mean(axis=0) if n_models else pd.Series(dtype=float)
    low = coverage[coverage < MIN_COVERAGE]
    stake = stakes["stake"]
    total = float(stake.sum())
    staked = float(stake.reindex(predictions.columns).fillna(0.0).sum())
    share = staked / total if total > 0 else 0.0
    metadata = {
        "ids": n_ids,
        "models": n_models,
        "min_coverage": float(coverage.min()) if n_models else 0.0,
        "median_coverage": float(coverage.median()) if n_models else 0.0,
        "stake_with_valid_predictions": staked,
        "staked_share": share,
    }
    if n_models == 0 or staked <= 0 or len(low):
        why = (
            "no accepted prediction"
            if n_models == 0
            else f"{len(low)} models cover < {MIN_COVERAGE:.0%} of ids: {list(low.index[:5])}"
            if len(low)
            else "no stake behind the accepted predictions: the meta model is undefined"
        )
        return dg.AssetCheckResult(
            passed=False, severity=dg.AssetCheckSeverity.ERROR, description=why, metadata=metadata
        )
    return dg.AssetCheckResult(
        passed=share >= config.min_staked_share,
        severity=dg.AssetCheckSeverity.WARN,
        description=f"{n_models} models, {share:.0%} of the stake has a valid prediction",
        metadata=metadata,
    )


@round_check(asset="predictions", pool=WAREHOUSE_POOL)
def submission_rejections(
    context: dg.AssetCheckExecutionContext,
    config: IngestionCheckConfig,
    warehouse: WarehouseResource,
) -> dg.AssetCheckResult:
    """How many submission files ingestion rejected, by kind and rule (warehouse tables
    submissions and submission_rejections); warns above `max_rejected_share`."""
    r = round_of(context)
    wh = warehouse.get()
    accepted = wh.read_round("submissions", r)
    rejected = wh.read_round("submission_rejections", r)
    total = len(accepted) + len(rejected)
    share = len(rejected) / total if total else 0.0
    by_rule = rejected.groupby(["kind", "rule"]).size() if len(rejected) else pd.Series()
    return dg.AssetCheckResult(
        passed=share <= config.max_rejected_share,
        severity=dg.AssetCheckSeverity.WARN,
        description=f"{len(rejected)} of {total} submission files rejected ({share:.0%})",
        metadata={
            "accepted": len(accepted),
            "rejected": len(rejected),
            "rejected_share": share,
            "rejected_by_rule": {f"{k}/{rule}": int(n) for (k, rule), n in by_rule.items()},
            "rejections": markdown_table(rejected[["kind", "model_id", "reason"]], max_rows=20),
        },
    )


@round_check(asset=ingest.resolved, additional_ins={"universe": dg.AssetIn("universe")})
def resolved_coverage(
    config: IngestionCheckConfig, resolved: pd.DataFrame, universe: pd.DataFrame
) -> dg.AssetCheckResult:
    """Share of the round's live ids with a target; warns below `min_resolved_share`."""
    share = len(resolved) / len(universe) if len(universe) else 0.0
    return dg.AssetCheckResult(
        passed=share >= config.min_resolved_share,
        severity=dg.AssetCheckSeverity.WARN,
        description=f"{len(resolved)} of {len(universe)} live ids resolved ({share:.1%})",
        metadata={"resolved": len(resolved), "ids": len(universe), "share": share},
    )


asset_checks = [predictions_coverage, submission_rejections, resolved_coverage]
