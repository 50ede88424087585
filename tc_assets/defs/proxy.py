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
error of the round: by default the asset logs the reason and does not materialize, so the
round's job still succeeds; `fail_when_short` makes it fail with the same message.

Plots (matplotlib, Agg canvas, no pyplot state): importances as a bar chart and the shape
functions of the top terms, saved as PNG under `<warehouse dir>/tc_proxy/` and attached as
markdown images (data URIs, which the Dagster UI's markdown renderer allows for images) under
"[Show Markdown]", with their paths.
"""

import base64
import io
import math
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from pydantic import Field

from tc_assets.defs.contribution import tc_scores
from tc_assets.defs.metadata import markdown_table, timer
from tc_assets.defs.metrics import model_metrics
from tc_assets.defs.partitions import WAREHOUSE_POOL, round_of, rounds_partitions
from tc_assets.defs.resources import WarehouseResource
from tc_assets.io.warehouse import Warehouse
from tc_assets.scoring.proxy_model import (
    INTERACTION_TERM,
    METRIC_TERMS,
    InsufficientRoundsError,
    ProxyResult,
    ProxySettings,
    fit_tc_proxy,
)

GROUP = "proxy"
PLOT_DIR = "tc_proxy"
PROXY_TABLES = ("tc_proxy_importance", "tc_proxy_shape", "tc_proxy_fit")


class ProxyConfig(dg.Config, ProxySettings):
    """Run configuration of `tc_proxy_model` (see ProxySettings for the model's fields)."""

    fail_when_short: bool = Field(
        default=False,
        description="Fail the step when fewer than min_rounds rounds are available (default: "
        "log why and do not materialize, so that the round's job succeeds).",
    )
    plot_terms: int = Field(
        default=4, ge=1, le=7, description="Top terms whose shape functions are plotted."
    )

    def settings(self) -> ProxySettings:
        """The model's settings alone (without the asset's own fields)."""
        return ProxySettings.model_validate(
            {name: getattr(self, name) for name in ProxySettings.model_fields}
        )


# --- warehouse --------------------------------------------------------------------------


def load_window(wh: Warehouse, window_end: int, window_rounds: int) -> pd.DataFrame:
    """model_metrics joined with tc_scores: every row of the last `window_rounds` rounds
    <= `window_end` that have a model with tc and every metric finite (empty before either
    table exists)."""
    columns = ["round", "model_id", "tc", *METRIC_TERMS]
    if not {"model_metrics", "tc_scores"} <= set(wh.table_names()):
        return pd.DataFrame(columns=columns)
    metrics = ", ".join(f"m.{c}" for c in METRIC_TERMS)
    complete = " AND ".join(f"isfinite({c})" for c in ("tc", *METRIC_TERMS))
    return wh.query(
        f"""
        WITH joined AS (
            SELECT m.round, m.model_id, t.tc, {metrics}
            FROM model_metrics AS m
            JOIN tc_scores AS t ON t.round = m.round AND t.model_id = m.model_id
            WHERE m.round <= ?
        ),
        window_rounds AS (
            SELECT DISTINCT round FROM joined WHERE {complete}
            ORDER BY round DESC LIMIT ?
        )
        SELECT * FROM joined WHERE round IN (SELECT round FROM window_rounds)
        ORDER BY round, model_id
        """,
        [int(window_end), int(window_rounds)],
    )


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
                "rows": result.rows,
                "rows_dropped": result.rows_dropped,
                "models": result.models,
                "held_out_r2": result.held_out_r2,
                "held_out_corr": result.held_out_corr,
                "fit_r2": result.fit_r2,
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


# --- plots ------------------------------------------------------------------------------


def _label(term: str, result: ProxyResult) -> str:
    """A term's input, as the x-axis label of its shape function."""
    if term != INTERACTION_TERM:
        return term
    mf, me = result.interaction_center
    if mf == 0 and me == 0:
        return "fnc_v3 x exposure_dissimilarity"
    return f"(fnc_v3 - {mf:.3g}) x (exposure_dissimilarity - {me:.3g})"


def importance_figure(result: ProxyResult) -> Figure:
    """Horizontal bars of term importance, coloured by monotonicity (blue +1, red -1)."""
    imp = result.importance.iloc[::-1]
    fig = Figure(figsize=(8.5, 0.45 * len(imp) + 2.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    cmap, norm = colormaps["RdBu"], Normalize(-1.0, 1.0)
    mono = imp["monotonicity"].to_numpy()
    colors = [cmap(norm(m)) if np.isfinite(m) else "lightgrey" for m in mono]
    bars = ax.barh(imp.index, imp["importance"], color=colors, edgecolor="black", lw=0.5)
    for bar, share, m in zip(bars, imp["share"], mono, strict=True):
        rho = f", monotonicity {m:+.2f}" if np.isfinite(m) else ""
        ax.annotate(
            f" {share:.0%}{rho}",
            (bar.get_width(), bar.get_y() + bar.get_height() / 2),
            va="center",
            fontsize=8,
        )
    ax.set_xlim(0, imp["importance"].max() * 1.6 if len(imp) else 1)
    ax.set_xlabel("importance: mean |contribution to predicted TC| over the window's rows")
    ax.set_ylabel("term")
    rounds = result.rounds
    ax.set_title(
        f"What explains TC, rounds {rounds[0]}-{rounds[-1]} ({result.rows} model-rounds): "
        f"held-out R² {result.held_out_r2:.2f}",
        fontsize=10,
    )
    fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, label="monotonicity (Spearman)")
    fig.tight_layout()
    return fig


def shapes_figure(result: ProxyResult, terms: list[str]) -> Figure:
    """One panel per term: its contribution to predicted TC against its input (steps over the
    EBM's bins), with the distribution of the fitted rows underneath."""
    cols = min(2, len(terms))
    nrows = math.ceil(len(terms) / cols)
    fig = Figure(figsize=(5.2 * cols, 3.6 * nrows + 0.6), dpi=100)
    FigureCanvasAgg(fig)
    for k, term in enumerate(terms):
        ax = fig.add_subplot(nrows, cols, k + 1)
        s = result.shapes[result.shapes["term"] == term]
        edges = np.append(s["lower"].to_numpy(), s["upper"].to_numpy()[-1])
        ax.stairs(s["contribution"].to_numpy(), edges, baseline=None, color="tab:blue", lw=1.5)
        ax.axhline(0.0, color="black", lw=0.6)
        rug = ax.twinx()
        rug.hist(s["x"], bins=30, weights=s["weight"], color="grey", alpha=0.25)
        rug.set_yticks([])
        rug.set_ylim(top=rug.get_ylim()[1] * 4)  # keep the histogram in the bottom quarter
        row = result.importance.loc[term]
        ax.set_title(
            f"{term}: importance {row['importance']:.4f}, monotonicity {row['monotonicity']:+.2f}",
            fontsize=9,
        )
        ax.set_xlabel(_label(term, result), fontsize=8)
        ax.set_ylabel("contribution to predicted TC")
        ax.set_zorder(rug.get_zorder() + 1)
        ax.patch.set_visible(False)
    rounds = result.rounds
    fig.suptitle(f"TC proxy shape functions, rounds {rounds[0]}-{rounds[-1]}", fontsize=11)
    fig.tight_layout()
    return fig


def png_bytes(fig: Figure) -> bytes:
    """The figure as PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return buf.getvalue()


def _markdown_image(png: bytes, alt: str) -> dg.MetadataValue:
    return dg.MetadataValue.md(f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode()})")


# --- asset ------------------------------------------------------------------------------


@dg.asset(
    partitions_def=rounds_partitions,
    group_name=GROUP,
    pool=WAREHOUSE_POOL,
    deps=[model_metrics, tc_scores],
    output_required=False,
    kinds={"scikitlearn", "duckdb"},
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
    settings = config.settings()
    with timer() as t_read:
        frame = load_window(wh, r, settings.window_rounds)
    try:
        with timer() as t_fit:
            result = fit_tc_proxy(frame, settings, window_end=r)
    except InsufficientRoundsError as exc:
        if config.fail_when_short:
            raise dg.Failure(
                description=str(exc), metadata={"round": r}, allow_retries=False
            ) from exc
        context.log.warning(f"tc_proxy_model[{r}] not materialized: {exc}")
        wh.clear_partition(r, PROXY_TABLES)  # an earlier fit of this window no longer holds
        return
    folder = warehouse.directory / PLOT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    top = result.top_terms(config.plot_terms)
    pngs = {
        "importance": png_bytes(importance_figure(result)),
        "shapes": png_bytes(shapes_figure(result, top)),
    }
    paths = {name: folder / f"window_{r}_{name}.png" for name in pngs}
    for name, png in pngs.items():
        paths[name].write_bytes(png)
    with timer() as t_write:
        counts = wh.write_partition(r, proxy_tables(result, paths))
    imp = result.importance
    yield dg.MaterializeResult(
        metadata={
            "window_end": r,
            "window": f"{result.rounds[0]}-{result.rounds[-1]}",
            "rounds": len(result.rounds),
            "held_out": f"{result.held_out_rounds[0]}-{result.held_out_rounds[-1]}",
            "rows": result.rows,
            "rows_dropped": result.rows_dropped,
            "models": result.models,
            "held_out_r2": result.held_out_r2,
            "held_out_corr": result.held_out_corr,
            "fit_r2": result.fit_r2,
            "top_term": imp.index[0],
            "top_term_monotonicity": float(imp["monotonicity"].iloc[0]),
            "importance": markdown_table(imp.reset_index(), max_rows=len(imp)),
            "importance_plot": _markdown_image(pngs["importance"], "TC proxy importances"),
            "shapes_plot": _markdown_image(pngs["shapes"], "TC proxy shape functions"),
            "importance_plot_path": dg.MetadataValue.path(str(paths["importance"])),
            "shapes_plot_path": dg.MetadataValue.path(str(paths["shapes"])),
            "shape_rows": counts["tc_proxy_shape"],
            "read_seconds": t_read["seconds"],
            "fit_seconds": t_fit["seconds"],
            "write_seconds": t_write["seconds"],
        }
    )


defs = dg.Definitions(assets=[tc_proxy_model])
