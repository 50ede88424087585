"""Ingestion assets: one round's inputs read from the round source, validated, and warehoused.

All inputs available at round close are read and validated by one multi-asset and written in one
warehouse transaction: a bad required file (stakes.csv, live.parquet, ...) fails the round before
anything is written, while a bad submission is only rejected, with its reason. `resolved` comes
later, when the round's resolved.parquet arrives; until then it yields nothing, and every
target-dependent asset downstream is skipped (not failed) with "awaiting resolution" in the log.

The checks: predictions usable (blocking: no accepted prediction, low coverage, or no stake
behind them fails the run), the share of rejected files and the coverage of resolved (warn).
"""

from collections.abc import Iterator
from contextlib import contextmanager

import dagster as dg
import pandas as pd

from tc_assets.defs.checks import round_check
from tc_assets.defs.config import IngestConfig, IngestionCheckConfig
from tc_assets.defs.metadata import metadata_table, rounded, timer, warehouse_table
from tc_assets.defs.partitions import (
    WAREHOUSE_POOL,
    round_asset,
    round_failure,
    round_of,
    rounds_partitions,
)
from tc_assets.defs.resources import RoundSourceResource, WarehouseResource
from tc_assets.io.contract import MIN_COVERAGE, RETURN_COLUMN, RoundInputError
from tc_assets.io.ingest import (
    RoundInputs,
    ingest_round,
    load_resolved,
    resolved_table,
    stored_resolved,
    warehouse_tables,
)
from tc_assets.io.source import SourceError, SourceUnavailable
from tc_assets.io.warehouse import WarehouseError, WarehouseLocked

GROUP = "ingestion"
KINDS = {"pandas", "duckdb"}
# A round source that cannot be reached (SourceUnavailable: S3 throttling or a server error past
# the client's own retries, a broken connection) or a warehouse still locked after its wait
# (WarehouseLocked) fails the step, which Dagster runs again after 30 s, 90 s and 210 s, each
# give or take up to 30 s (jitter).
# Anything else (a bad input, a source or warehouse setting, a bug) is a dagster.Failure
# without retries, with its own message: retrying cannot help (`only_transient_retried`).
# The policy is applied by raising RetryRequested, not attached to the assets: Dagster turns
# an interrupt (Ctrl-C, SIGTERM, a cancel) of a step with a retry policy into a retry, and a
# canceled run would then go on.
SOURCE_RETRY = dg.RetryPolicy(
    max_retries=3, delay=30, backoff=dg.Backoff.EXPONENTIAL, jitter=dg.Jitter.PLUS_MINUS
)
TRANSIENT = (SourceUnavailable, WarehouseLocked)


@contextmanager
def only_transient_retried(
    context: dg.AssetExecutionContext, r: int, **metadata: object
) -> Iterator[None]:
    """Retry the step on a transient fault, as SOURCE_RETRY says; turn any other error into a
    Failure that is not retried and whose description is the error's own message. An
    interrupt passes through untouched."""
    try:
        yield
    except TRANSIENT as exc:
        raise dg.RetryRequested(
            max_retries=SOURCE_RETRY.max_retries,
            seconds_to_wait=SOURCE_RETRY.calculate_delay(context.retry_number + 1),
        ) from exc
    except dg.Failure:
        raise
    except Exception as exc:
        known = isinstance(exc, RoundInputError | SourceError | WarehouseError)
        message = str(exc) if known else f"{type(exc).__name__}: {exc}"
        if not message.startswith(f"round {r}"):
            message = f"round {r}: {message}"
        raise round_failure(r, message, **metadata) from exc


PROGRESS_MIN_FILES = 200  # rounds with at least this many submission files log read progress

OUTPUTS = {
    "round_info": "round.json (calendar, payout parameters) and the round's feature sets.",
    "universe": "live.parquet: the round's ids with their era and features (index: id).",
    "example_predictions": "The example model's predictions (index: id).",
    "market": "adv_usd per id from market.parquet (None when the round has none).",
    "stakes": "stakes.csv, validated (index: model_id).",
    "predictions": "Accepted predictions: ids x models, NaN where not submitted.",
    "portfolios": "Accepted portfolio weights: ids x models, 0 where not held.",
}


@dg.multi_asset(
    outs={
        name: dg.AssetOut(group_name=GROUP, description=text, kinds=KINDS)
        for name, text in OUTPUTS.items()
    },
    partitions_def=rounds_partitions,
    pool=WAREHOUSE_POOL,
    can_subset=False,
)
def round_inputs(
    context: dg.AssetExecutionContext,
    config: IngestConfig,
    round_source: RoundSourceResource,
    warehouse: WarehouseResource,
) -> Iterator[dg.Output]:
    """Read and validate every input of the round available at close, then write it at once."""
    r = round_of(context)

    def progress(kind: str, done: int, total: int) -> None:
        if total >= PROGRESS_MIN_FILES:  # a small round reads in a blink: one line at the end
            context.log.info(f"round {r}: read {done}/{total} {kind} files")

    with only_transient_retried(context, r, source=round_source.uri):
        source = round_source.open()
        with timer() as t_read:
            inputs = ingest_round(
                source,
                r,
                allowed_corr_multipliers=tuple(config.allowed_corr_multipliers),
                allowed_tc_multipliers=tuple(config.allowed_tc_multipliers),
                progress=progress,
                workers=config.read_workers,
            )
            # A bad resolved.parquet fails the round here, before any of its inputs is written.
            load_resolved(source, r, inputs.ids)
        with timer() as t_write:
            counts = warehouse.get().write_round(r, warehouse_tables(inputs, source.uri))
    context.log.info(
        f"round {r}: {inputs.predictions.shape[1]} prediction and {inputs.portfolios.shape[1]} "
        f"portfolio submissions accepted, {len(inputs.rejections)} rejected "
        f"({t_read['seconds']:.1f}s read, {t_write['seconds']:.1f}s write)"
    )
    common = {"round": r, "read_seconds": t_read["seconds"], "write_seconds": t_write["seconds"]}
    for name, (value, metadata) in _described(inputs, counts).items():
        yield dg.Output(value, output_name=name, metadata=rounded({**common, **metadata}))


def _described(inputs: RoundInputs, counts: dict[str, int]) -> dict[str, tuple[object, dict]]:
    """Each output's value and metadata."""
    info, market = inputs.info, inputs.market
    return {
        "round_info": (
            {**info, "feature_sets": inputs.feature_sets},
            {
                "open_time": str(info["open_time"]),
                "close_time": str(info["close_time"]),
                "stake_threshold": info["stake_threshold"],
                "clip": info["clip"],
                "features": {k: len(v) for k, v in inputs.feature_sets.items()},
            },
        ),
        "universe": (
            inputs.live,
            {"ids": len(inputs.live), **warehouse_table("universe", counts["universe"])},
        ),
        "example_predictions": (
            inputs.example,
            warehouse_table("example_predictions", counts["example_predictions"]),
        ),
        "market": (
            market,
            {
                **warehouse_table("market", counts["market"]),
                "present": market is not None,
                "median_adv_usd": float(market.median()) if market is not None else 0.0,
            },
        ),
        "stakes": (inputs.stakes, _stakes_metadata(inputs, counts)),
        "predictions": (
            inputs.predictions,
            _submissions_metadata(inputs, counts, "prediction", inputs.predictions),
        ),
        "portfolios": (
            inputs.portfolios,
            _submissions_metadata(inputs, counts, "portfolio", inputs.portfolios),
        ),
    }


def _stakes_metadata(inputs: RoundInputs, counts: dict[str, int]) -> dict:
    stakes = inputs.stakes
    valid = set(inputs.predictions.columns) | set(inputs.portfolios.columns)
    no_submission = sorted(set(stakes.index) - valid)
    return {
        "rows": counts["stakes"],
        "total_stake": float(stakes["stake"].sum()),
        "staked_models": int((stakes["stake"] > 0).sum()),
        "staked_without_valid_submission": len(no_submission),
        "models_without_valid_submission": dg.MetadataValue.md(
            ", ".join(no_submission[:50]) or "_(none)_"
        ),
    }


def _submissions_metadata(
    inputs: RoundInputs, counts: dict[str, int], kind: str, wide: pd.DataFrame
) -> dict:
    name = f"{kind}s"
    rk = inputs.rejections[inputs.rejections["kind"] == kind]
    sk = inputs.submissions[inputs.submissions["kind"] == kind]
    return {
        "rows": counts[name],
        "models_accepted": wide.shape[1],
        "models_rejected": len(rk),
        "rejections_by_rule": rk["rule"].value_counts().to_dict(),
        "rejections": metadata_table(rk[["model_id", "rule", "reason"]], max_rows=50),
        "foreign_ids_dropped": int(sk["foreign_ids_dropped"].sum()),
        "min_coverage": float(sk["coverage"].min()) if len(sk) else 0.0,
    }


@round_asset(group=GROUP, kinds=KINDS, output_required=False)
def resolved(
    context: dg.AssetExecutionContext,
    universe: pd.DataFrame,
    round_source: RoundSourceResource,
    warehouse: WarehouseResource,
) -> Iterator[dg.Output]:
    """Targets, and realized returns when published (index: id), once resolved.parquet has
    arrived.

    Until then nothing is produced: the target-dependent assets downstream are skipped, and
    the resolution sensor materializes them when the file appears.
    """
    r = round_of(context)
    with only_transient_retried(context, r, source=round_source.uri):
        source = round_source.open()
        frame = load_resolved(source, r, universe.index)
    if frame is None:
        frame = _stored(context, r, f"{source.uri}/rounds/{r}/resolved.parquet", warehouse)
        if frame is None:
            return
        metadata = {"source_file": "missing", "kept_rows": len(frame)}
    else:
        with timer() as t, only_transient_retried(context, r):
            counts = warehouse.get().write_round(r, {"resolved": resolved_table(frame)})
        metadata = {
            **warehouse_table("resolved", counts["resolved"]),
            "write_seconds": t["seconds"],
        }
    if RETURN_COLUMN not in frame.columns:
        context.log.info(
            f"round {r}: resolved.parquet has targets only (no return column): the round is "
            "scored and paid in bucket space; the realized-return figures and the capacity "
            "curves are skipped, and the raw payout basis or TC on 'return', if configured, "
            "fail."
        )
    metadata = {"round": r, **metadata, **_resolved_metadata(frame, universe)}
    yield dg.Output(frame, metadata=rounded(metadata))


def _stored(
    context: dg.AssetExecutionContext, r: int, path: str, warehouse: WarehouseResource
) -> pd.DataFrame | None:
    """No resolved.parquet: the round awaits resolution (None), or its file was removed after
    the round was scored. Then the round goes on from the targets stored then, and says so:
    every result downstream is computed again from the same targets, so none is left beside a
    value (a meta-model weight, a payout) that the file's absence would have dropped."""
    with only_transient_retried(context, r):
        rows = warehouse.get().read_round("resolved", r)
    if not len(rows):
        context.log.info(
            f"round {r} is awaiting resolution: {path} has not arrived; target-dependent "
            "assets are skipped until it does."
        )
        return None
    context.log.warning(
        f"round {r}: {path} is gone, but the round was scored on an earlier one: it is scored "
        f"again from the {len(rows)} resolved rows stored then (a new resolved.parquet replaces "
        "them)."
    )
    return stored_resolved(rows)


def _resolved_metadata(frame: pd.DataFrame, universe: pd.DataFrame) -> dict:
    """Coverage of the live ids, the target's distribution, and the returns' spread if any."""
    distribution = frame["target"].value_counts(normalize=True).sort_index()
    has_returns = RETURN_COLUMN in frame.columns
    metadata = {
        "coverage": len(frame) / len(universe),
        "target_distribution": {f"{k:g}": round(float(v), 4) for k, v in distribution.items()},
        "has_returns": has_returns,
    }
    if has_returns:
        metadata["return_std"] = float(frame[RETURN_COLUMN].std())
    return metadata


# --- the ingestion checks -------------------------------------------------------------------


def _unusable(predictions: pd.DataFrame, coverage: pd.Series, staked: float) -> str | None:
    """Why the accepted predictions cannot make a meta model, or None."""
    low = coverage[coverage < MIN_COVERAGE]
    if predictions.shape[1] == 0:
        return "no accepted prediction"
    if len(low):
        return f"{len(low)} models cover < {MIN_COVERAGE:.0%} of ids: {list(low.index[:5])}"
    if staked <= 0:
        return "no stake behind the accepted predictions: the meta model is undefined"
    return None


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
    total = float(stakes["stake"].sum())
    staked = float(stakes["stake"].reindex(predictions.columns).fillna(0.0).sum())
    share = staked / total if total > 0 else 0.0
    metadata = {
        "ids": n_ids,
        "models": n_models,
        "min_coverage": float(coverage.min()) if n_models else 0.0,
        "median_coverage": float(coverage.median()) if n_models else 0.0,
        "stake_with_valid_predictions": staked,
        "staked_share": share,
    }
    why = _unusable(predictions, coverage, staked)
    return dg.AssetCheckResult(
        passed=why is None and share >= config.min_staked_share,
        severity=dg.AssetCheckSeverity.WARN if why is None else dg.AssetCheckSeverity.ERROR,
        description=why or f"{n_models} models, {share:.0%} of the stake has a valid prediction",
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
            "rejections": metadata_table(rejected[["kind", "model_id", "reason"]], max_rows=20),
        },
    )


@round_check(asset=resolved, additional_ins={"universe": dg.AssetIn("universe")})
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


# The ingestion's own checks (dbt's tests of the ingested tables run in the round's dbt build).
CHECKS = [predictions_coverage, submission_rejections, resolved_coverage]

defs = dg.Definitions(
    assets=[round_inputs, resolved],
    asset_checks=CHECKS,
)
