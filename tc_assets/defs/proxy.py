"""The TC proxy asset: what explains TC, fitted over a window of resolved rounds.

`tc_proxy_model` is partitioned by **window end**: partition R fits the EBM of
`scoring.proxy_model` on the last `window_rounds` resolved rounds up to and including R, read
from the warehouse (`model_metrics` joined with `tc_scores`), and writes `tc_proxy_importance`,
`tc_proxy_shape` and `tc_proxy_fit` for window_end = R in one transaction. Why by window end:

* Re-fit after each resolution, with no extra trigger: it shares the rounds partitions, so it
  is a step of the round's `score_round` job (the job the resolution sensor runs), downstream
  of that round's metrics and TC, and is skipped with them while the round awaits resolution.
* Reproducible: a window is named by its end and reads only rounds <= R, so re-running R later
  (after newer rounds arrived, or to backfill) refits the same window, and each window's result
  stays in the warehouse, so the drift of the importances over time can be read.
* An unpartitioned asset would fit "the latest N rounds": its result would depend on when it
  ran, and a re-run of an old round could not reproduce it.

A window with too few rounds (a young deployment, the first rounds of a backfill) is not an
error of the round: by default the asset logs the reason and records the skip as its
materialization (`fitted: false` and the reason; no fit is written, an earlier fit of the
window is removed), so the round's job succeeds and the round counts as done in the partition
views; `fail_when_short` makes it fail with the same message.

Plots (plots.py): importances as a bar chart and the shape functions of the top terms, saved
as PNG under `<warehouse dir>/tc_proxy/` and attached as markdown images, with their paths.
"""

from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd

from tc_assets.defs.config import ProxyConfig, settings_of
from tc_assets.defs.contribution import tc_scores
from tc_assets.defs.metadata import metadata_table, timer
from tc_assets.defs.metrics import model_metrics
from tc_assets.defs.partitions import (
    WINDOW_METADATA_KEY,
    WINDOW_TAGS,
    round_asset,
    round_failure,
    round_of,
    window_label,
)
from tc_assets.defs.plots import (
    importance_figure,
    importance_summary,
    plot_metadata,
    shapes_figure,
    shapes_summary,
)
from tc_assets.defs.resources import WarehouseResource
from tc_assets.io import queries
from tc_assets.io.warehouse import Warehouse
from tc_assets.scoring.proxy_model import (
    METRIC_TERMS,
    InsufficientRoundsError,
    ProxyResult,
    ProxySettings,
    fit_tc_proxy,
)

GROUP = "proxy"
PLOT_DIR = "tc_proxy"
PROXY_TABLES = ("tc_proxy_importance", "tc_proxy_shape", "tc_proxy_fit")


def load_window(wh: Warehouse, window_end: int, window_rounds: int) -> pd.DataFrame:
    """The fitted rows of the window: every model of the last `window_rounds` rounds
    <= `window_end` with tc and every metric term finite (see `queries.metrics_with_tc`)."""
    return queries.metrics_with_tc(wh, window_end, window_rounds, METRIC_TERMS)


def proxy_tables(result: ProxyResult, plots: dict[str, Path]) -> dict[str, pd.DataFrame]:
    """The three warehouse tables of one window (window_end filled in by the write)."""
    imp = result.importance.reset_index()
    importance = pd.DataFrame(
        {
            "term": imp["term"],
            "importance": imp["importance"],
            "monotonicity": imp["monotonicity"],
            "share": imp["share"],
            "rank": np.arange(1, len(imp) + 1, dtype=np.int32),
            "kind": imp["kind"],
        }
    )
    s = result.settings
    fit = pd.DataFrame(
        [
            {
                "first_round": result.rounds[0],
                "rounds": len(result.rounds),
                "train_rounds": len(result.train_rounds),
                "held_out_rounds": len(result.held_out_rounds),
                **_fit_quality(result),
                "intercept": result.intercept,
                "interaction_fnc_v3_center": result.interaction_center[0],
                "interaction_dissimilarity_center": result.interaction_center[1],
                "top_term": result.importance.index[0],
                "seed": s.seed,
                "settings": s.model_dump_json(),
                "importance_plot": str(plots["importance"]),
                "shapes_plot": str(plots["shapes"]),
            }
        ]
    )
    shape = result.shapes.astype({"bin": np.int32})
    return {"tc_proxy_importance": importance, "tc_proxy_shape": shape, "tc_proxy_fit": fit}


@round_asset(
    group=GROUP,
    kinds={"scikitlearn", "duckdb"},
    deps=[model_metrics, tc_scores],
    tags=WINDOW_TAGS,
)
def tc_proxy_model(
    context: dg.AssetExecutionContext, config: ProxyConfig, warehouse: WarehouseResource
):
    """An explainable boosting model of TC on corr, mmc, fnc_v3, fnc_v3_tb200, exposure
    dissimilarity, max feature exposure and fnc_v3 x exposure dissimilarity, over the
    `window_rounds` resolved rounds ending at this partition's round. Writes term importances
    and monotonicity (`tc_proxy_importance`), shape functions (`tc_proxy_shape`) and the fit
    (`tc_proxy_fit`, held-out R^2), and attaches the plots."""
    r = round_of(context)
    wh = warehouse.get()
    settings = settings_of(config, ProxySettings)
    with timer() as t_read:
        frame = load_window(wh, r, settings.window_rounds)
    try:
        with timer() as t_fit:
            result = fit_tc_proxy(frame, settings, window_end=r)
    except InsufficientRoundsError as exc:
        if config.fail_when_short:
            raise round_failure(r, exc) from None
        context.log.warning(f"tc_proxy_model[{r}]: no fit: {exc}")
        wh.clear_partition(r, PROXY_TABLES)  # an earlier fit of this window no longer holds
        yield dg.MaterializeResult(
            metadata={"window_end": r, "fitted": False, "reason": str(exc), "rows": len(frame)}
        )
        return
    plots = _plots(result, warehouse.directory / PLOT_DIR, r, config.plot_terms)
    paths = {name: Path(plots[f"{name}_plot_path"].value) for name in ("importance", "shapes")}
    with timer() as t_write:
        counts = wh.write_partition(r, proxy_tables(result, paths))
    timings = {"read_seconds": t_read, "fit_seconds": t_fit, "write_seconds": t_write}
    yield dg.MaterializeResult(
        metadata={
            "fitted": True,
            **_fit_metadata(r, result),
            **plots,
            "shape_rows": counts["tc_proxy_shape"],
            **{name: t["seconds"] for name, t in timings.items()},
        }
    )


def _plots(result: ProxyResult, folder: Path, r: int, terms: int) -> dict[str, dg.MetadataValue]:
    """The importances and the shape functions of the top `terms`, saved and attached."""
    top = result.top_terms(terms)
    return {
        **plot_metadata(
            importance_figure(result),
            folder / f"window_{r}_importance.png",
            "importance_plot",
            "TC proxy importances",
            importance_summary(result),
        ),
        **plot_metadata(
            shapes_figure(result, top),
            folder / f"window_{r}_shapes.png",
            "shapes_plot",
            "TC proxy shape functions",
            shapes_summary(result, top),
        ),
    }


def _fit_quality(result: ProxyResult) -> dict:
    """The rows fitted and how well the model explains TC, in sample and held out."""
    return {
        "rows": result.rows,
        "rows_dropped": result.rows_dropped,
        "models": result.models,
        "held_out_r2": result.held_out_r2,
        "held_out_corr": result.held_out_corr,
        "fit_r2": result.fit_r2,
    }


def _fit_metadata(r: int, result: ProxyResult) -> dict:
    """The window, the fit's quality and the terms by importance."""
    imp = result.importance
    return {
        "window_end": r,
        WINDOW_METADATA_KEY: window_label(result.rounds, result.settings.window_rounds),
        "rounds": len(result.rounds),
        "held_out": f"{result.held_out_rounds[0]}-{result.held_out_rounds[-1]}",
        **_fit_quality(result),
        "top_term": imp.index[0],
        "top_term_monotonicity": float(imp["monotonicity"].iloc[0]),
        "importance": metadata_table(imp.reset_index(), max_rows=len(imp)),
    }


defs = dg.Definitions(assets=[tc_proxy_model])
