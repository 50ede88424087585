"""Metrics assets: the stake-weighted meta model, feature exposures, and per-model metrics.

`meta_model` and `feature_exposures` need no target, so they are computed at round close;
`model_metrics` needs `resolved` and is skipped (not failed) until the round resolves.
"""

import dagster as dg
import numpy as np
import pandas as pd

from tc_assets.defs.checks import check_finite, round_check
from tc_assets.defs.config import MetricsConfig, settings_of
from tc_assets.defs.metadata import metadata_table, plain, timer, warehouse_table
from tc_assets.defs.partitions import round_asset, round_of
from tc_assets.defs.resources import WarehouseResource
from tc_assets.scoring.meta_model import swmm
from tc_assets.scoring.metrics import (
    MODEL_METRICS,
    TARGET_METRICS,
    MetricsSettings,
    exposures_long,
    feature_metrics,
    target_metrics,
)

GROUP = "metrics"
KINDS = {"numpy", "duckdb"}


def _medium(universe: pd.DataFrame, round_info: dict) -> pd.DataFrame:
    return universe[round_info["feature_sets"]["medium"]]


@round_asset(group=GROUP, kinds=KINDS)
def meta_model(
    context: dg.AssetExecutionContext,
    predictions: pd.DataFrame,
    stakes: pd.DataFrame,
    warehouse: WarehouseResource,
) -> dg.Output[pd.Series]:
    """The stake-weighted meta model (SWMM) by id: x = P s / sum(s) over staked valid models.

    P holds each model's gaussianized tie-kept ranks (0 where it did not submit an id); models
    without a valid submission, or with stake 0, weigh nothing. Written to `meta_model.swmm`.
    """
    r = round_of(context)
    with timer() as t:
        x = swmm(predictions, stakes["stake"])
    frame = pd.DataFrame({"id": x.index.to_numpy(), "swmm": x.to_numpy(), "weight": np.nan})
    counts = warehouse.get().write_round(r, {"meta_model": frame})
    stake = stakes["stake"].reindex(predictions.columns).fillna(0.0)
    staked = stake[stake > 0].sort_values(ascending=False)
    share = (staked / staked.sum()).rename("stake_share").reset_index()
    return dg.Output(
        x,
        metadata={
            "round": r,
            **warehouse_table("meta_model", counts["meta_model"]),
            "ids": len(x),
            "staked_models": len(staked),
            "total_stake": plain(staked.sum()),
            "largest_stake_share": plain(share["stake_share"].max()),
            "top_stakes": metadata_table(share.head(10)),
            "swmm_std": plain(x.std()),
            "seconds": t["seconds"],
        },
    )


@round_asset(group=GROUP, kinds=KINDS)
def feature_exposures(
    context: dg.AssetExecutionContext,
    config: MetricsConfig,
    predictions: pd.DataFrame,
    universe: pd.DataFrame,
    round_info: dict,
    example_predictions: pd.Series,
    warehouse: WarehouseResource,
) -> dg.Output[pd.DataFrame]:
    """Each model's Pearson exposure to every medium feature, and the target-free metrics
    (max_feature_exposure, exposure_dissimilarity against the example model), at round close.

    Writes `feature_exposures` (long: model, feature, exposure) and `exposure_metrics`.
    """
    r = round_of(context)
    with timer() as t:
        per_model, exposures = feature_metrics(
            predictions,
            _medium(universe, round_info),
            example_predictions,
            settings_of(config, MetricsSettings),
        )
    tables = {"feature_exposures": exposures_long(exposures)}
    counts = warehouse.get().write_round(r, {**tables, "exposure_metrics": per_model.reset_index()})
    top = per_model.sort_values("max_feature_exposure", ascending=False).reset_index()
    return dg.Output(
        per_model,
        metadata={
            "round": r,
            **warehouse_table("feature_exposures", counts["feature_exposures"]),
            "models": len(per_model),
            "features": exposures.shape[1],
            "rows": int(exposures.size),
            "most_exposed": metadata_table(top.head(10)),
            "median_max_feature_exposure": plain(per_model["max_feature_exposure"].median()),
            "seconds": t["seconds"],
        },
    )


@round_asset(group=GROUP, kinds=KINDS)
def model_metrics(
    context: dg.AssetExecutionContext,
    config: MetricsConfig,
    predictions: pd.DataFrame,
    universe: pd.DataFrame,
    round_info: dict,
    resolved: pd.DataFrame,
    meta_model: pd.Series,
    feature_exposures: pd.DataFrame,
    warehouse: WarehouseResource,
) -> dg.Output[pd.DataFrame]:
    """corr, mmc, fnc_v3, fnc_v3_tb200 (numerai-tools definitions, over each model's ids) with
    the exposure metrics: the contract's `model_metrics` table. Needs the resolved target."""
    r = round_of(context)
    with timer() as t:
        metrics = target_metrics(
            predictions,
            _medium(universe, round_info),
            resolved["target"],
            meta_model,
            settings_of(config, MetricsSettings),
        )
    metrics = metrics.join(feature_exposures[["exposure_dissimilarity", "max_feature_exposure"]])
    metrics = metrics[list(MODEL_METRICS)]
    counts = warehouse.get().write_round(r, {"model_metrics": metrics.reset_index()})
    return dg.Output(
        metrics,
        metadata={
            "round": r,
            **warehouse_table("model_metrics", counts["model_metrics"]),
            "models": len(metrics),
            "top_models": metadata_table(_top_models(metrics).reset_index()),
            "summary": metadata_table(
                metrics.describe().T.reset_index().rename(columns={"index": "metric"})
            ),
            "mean_corr": plain(metrics["corr"].mean()),
            "corr_fnc_v3_correlation": float(metrics["corr"].corr(metrics["fnc_v3"])),
            "seconds": t["seconds"],
        },
    )


def _top_models(metrics: pd.DataFrame) -> pd.DataFrame:
    """The five best models by each metric, as "model (value)", one column per metric."""
    tops = pd.DataFrame(
        {
            name: pd.Series([f"{m} ({v:.4f})" for m, v in metrics[name].nlargest(5).items()])
            for name in (*TARGET_METRICS, "exposure_dissimilarity", "max_feature_exposure")
        }
    ).fillna("")  # fewer than 5 models with a value: empty cells
    tops.index = pd.Index(range(1, len(tops) + 1), name="rank")
    return tops


@round_check(asset=model_metrics, blocking=True)
def model_metrics_finite(model_metrics: pd.DataFrame) -> dg.AssetCheckResult:
    """Every accepted model has finite corr, mmc and fnc_v3 (a NaN means unusable scores)."""
    return check_finite(model_metrics, ["corr", "mmc", "fnc_v3"])


defs = dg.Definitions(
    assets=[meta_model, feature_exposures, model_metrics], asset_checks=[model_metrics_finite]
)
