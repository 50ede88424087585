"""Helpers for every area's asset checks on each round.

A check whose failure means the data cannot be scored (no usable prediction, no stake behind
them) is blocking with ERROR severity: the run fails and nothing downstream is computed from
it. A check that flags something worth a look (many rejections, thin resolution) warns only.

Usage (metrics free of NaN, portfolio constraints, payouts within the clip):

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

from tc_assets.defs.metadata import metadata_table
from tc_assets.defs.partitions import rounds_partitions


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
            "examples": metadata_table(frame.loc[rows].reset_index().head(max_rows)),
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
            "examples": metadata_table(values[outside].reset_index().head(max_rows)),
        },
    )
