"""Payout assets (issue 5): classic stake payouts, portfolio-weight scores, Sharpe contribution.

Each asset loads the round's inputs, calls `scoring.payouts` / `scoring.portfolio_weights`,
writes through the warehouse (writer pool) and describes the result. All of them need the
resolved round: until it resolves they are skipped with their upstream.

Which models submitted validly comes from the warehouse's `submissions` table (ingestion's
record), so the payout factor counts exactly the stakes that ingestion accepted.
"""

import base64
import io
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from pydantic import Field

from tc_assets.defs.checks import check_within, round_check
from tc_assets.defs.metadata import markdown_table, timer
from tc_assets.defs.partitions import WAREHOUSE_POOL, round_of, rounds_partitions
from tc_assets.defs.resources import WarehouseResource
from tc_assets.io.warehouse import Warehouse
from tc_assets.scoring import portfolio_weights as pw
from tc_assets.scoring.payouts import PayoutRules, classic_payouts, payout_factor, valid_stake

GROUP = "payouts"
CLIP_CHECK = "payouts_within_clip"
PORTFOLIO_CLIP_CHECK = "portfolio_payouts_within_clip"
CLIP_TOLERANCE = 1e-12  # slack of the clip check on payout / stake (floating point)


class PortfolioPayoutConfig(dg.Config, pw.PortfolioPayoutSettings):
    """Constants of the portfolio-weight payout design (defaults documented per field)."""


class SharpeContributionConfig(dg.Config):
    """The window of rounds the Sharpe contribution is computed over."""

    window_rounds: int = Field(
        default=20, ge=2, description="Resolved rounds, ending at this one, in the window."
    )
    min_rounds: int = Field(
        default=3,
        ge=2,
        description="Rounds a model must have submitted within the window to get a Sharpe.",
    )


def _submitted(wh: Warehouse, r: int) -> tuple[pd.Index, pd.Index]:
    """(prediction models, portfolio models) with a valid submission in round r."""
    sub = wh.read_round("submissions", r)
    models = sub.groupby("kind")["model_id"].agg(sorted)
    predicted, portfolios = (
        pd.Index(models.get(kind, []), dtype=object) for kind in ("prediction", "portfolio")
    )
    return predicted, portfolios


def _kv(values: dict) -> dg.MetadataValue:
    """A dict as a two-column markdown table."""
    frame = pd.DataFrame({"": list(values), "value": [str(v) for v in values.values()]})
    return dg.MetadataValue.md(frame.to_markdown(index=False))


# --- classic payouts ------------------------------------------------------------------------


@dg.asset(
    partitions_def=rounds_partitions,
    group_name=GROUP,
    pool=WAREHOUSE_POOL,
    kinds={"pandas", "duckdb"},
)
def payouts(
    context: dg.AssetExecutionContext,
    round_info: dict,
    stakes: pd.DataFrame,
    model_metrics: pd.DataFrame,
    tc_scores: pd.DataFrame,
    warehouse: WarehouseResource,
) -> dg.Output[pd.DataFrame]:
    """Classic payouts: stake * clip(payout_factor * (corr_mult * corr + tc_mult * tc), +-clip).

    payout_factor = min(1, stake_threshold / total stake of the models with a valid
    submission); stake_threshold and clip come from round.json. Models with a stake row but no
    payout row (no valid submission, portfolio only, a missing elected metric) are counted in
    `payout_summary` and listed in the metadata.
    """
    r = round_of(context)
    wh = warehouse.get()
    rules = PayoutRules.from_round_info(round_info)
    predicted, portfolio_models = _submitted(wh, r)
    scores = pd.DataFrame(
        {
            "corr": model_metrics["corr"].reindex(predicted),
            "tc": tc_scores["tc"].reindex(predicted),
        },
        index=predicted,
    )
    with timer() as t:
        result = classic_payouts(stakes, scores, portfolio_models, rules)
    summary = result.summary.as_dict()
    with timer() as t_write:
        counts = wh.write_round(
            r, {"payouts": result.table, "payout_summary": pd.DataFrame([summary])}
        )
    table = result.table
    gains = table[table["payout"] > 0].sort_values("payout", ascending=False)
    losses = table[table["payout"] < 0].sort_values("payout")
    shown = ["model_id", "stake", "corr", "tc", "corr_multiplier", "tc_multiplier", "payout"]
    return dg.Output(
        table,
        metadata={
            "round": r,
            "rows": counts["payouts"],
            "total_payout": summary["total_payout"],
            "models_paid": summary["models_paid"],
            "payout_factor": summary["payout_factor"],
            "total_gains": summary["total_gains"],
            "total_losses": summary["total_losses"],
            "clipped": summary["clipped"],
            "largest_gains": markdown_table(gains[shown].head(5), max_rows=5),
            "largest_losses": markdown_table(losses[shown].head(5), max_rows=5),
            "summary": _kv(
                summary | {"stake_threshold": rules.stake_threshold, "clip": rules.clip}
            ),
            "not_paid": markdown_table(result.unpaid, max_rows=30, floatfmt=".2f"),
            "compute_seconds": t["seconds"],
            "write_seconds": t_write["seconds"],
        },
    )


def _within_clip(table: str, r: int, round_info: dict, warehouse: WarehouseResource):
    """Every payout of `table` written for round r lies within +-clip * stake (read back from
    the warehouse): payout / stake in [-clip, clip], and a zero stake pays exactly zero."""
    clip = PayoutRules.from_round_info(round_info).clip
    written = warehouse.get().read_round(table, r)
    stake, paid = written["stake"].to_numpy(), written["payout"].to_numpy()
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(stake > 0, paid / stake, np.where(paid == 0, 0.0, np.inf))
    values = pd.Series(ratio, index=written["model_id"], name="payout / stake")
    return check_within(values, -clip, clip, tol=CLIP_TOLERANCE)


@round_check(
    asset=payouts,
    name=CLIP_CHECK,
    blocking=True,
    pool=WAREHOUSE_POOL,
    additional_ins={"round_info": dg.AssetIn("round_info")},
)
def payouts_within_clip(
    context: dg.AssetCheckExecutionContext, round_info: dict, warehouse: WarehouseResource
) -> dg.AssetCheckResult:
    """Every classic payout of the round lies within +-clip * stake (a zero stake pays zero).
    Blocking: a payout beyond the clip is not published (the reports are not built)."""
    return _within_clip("payouts", round_of(context), round_info, warehouse)


# --- portfolio-weight submissions -----------------------------------------------------------


def _capacity_png(curves: pd.DataFrame, table: pd.DataFrame, fund_lmv: float, r: int) -> bytes:
    """Dollar return against long market value, one line per portfolio, peaks and break-evens
    marked; the y range is set by the peaks so that the fall past them stays readable."""
    fig = Figure(figsize=(9, 5.5), dpi=100)
    ax = fig.add_subplot()
    caps = table.set_index("model_id")
    top, right = 0.0, 0.0
    for model, c in curves.groupby("model_id", sort=True):
        lmv = c["long_market_value_usd"].to_numpy() / 1e6
        d = c["dollar_return_usd"].to_numpy() / 1e6
        row = caps.loc[model]
        peak, even = row["capacity_usd"] / 1e6, row["breakeven_usd"] / 1e6
        label = f"{model}: peak at ${peak:,.1f}M" if peak > 0 else f"{model}: never pays"
        (line,) = ax.plot(lmv, d, label=label, lw=1.5)
        if 0 < peak < np.inf:
            best = row["peak_dollar_return_usd"] / 1e6
            top, right = max(top, best), max(right, even)
            ax.plot([peak], [best], "o", color=line.get_color())
            ax.plot([even], [0.0], "x", color=line.get_color())
    ax.axhline(0.0, color="black", lw=0.8)
    ax.axvline(
        fund_lmv / 1e6, color="grey", ls="--", lw=1, label=f"fund LMV ${fund_lmv / 1e6:,.0f}M"
    )
    ax.set_xscale("log")
    if top > 0:
        ax.set_ylim(-1.5 * top, 1.25 * top)
        ax.set_xlim(right=min(curves["long_market_value_usd"].max() / 1e6, 10 * right))
    ax.set_xlabel("long market value invested ($M, log scale)")
    ax.set_ylabel("dollar return of the round after costs ($M)")
    ax.set_title(f"Round {r}: capacity of portfolio submissions (o peak, x break-even)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return buf.getvalue()


@dg.asset(
    partitions_def=rounds_partitions,
    group_name=GROUP,
    pool=WAREHOUSE_POOL,
    kinds={"pandas", "duckdb"},
)
def portfolio_scores(
    context: dg.AssetExecutionContext,
    config: PortfolioPayoutConfig,
    round_info: dict,
    stakes: pd.DataFrame,
    portfolios: pd.DataFrame,
    market: pd.Series | None,
    resolved: pd.DataFrame,
    meta_portfolio: pd.DataFrame,
    warehouse: WarehouseResource,
) -> dg.Output[pd.DataFrame]:
    """Portfolio-weight submissions scored against the centred target (PB, target units) and
    the realized return (PR), the meta portfolio's (MB, MR), transaction costs, payout
    percentages, payouts, the scenario of moving a fraction of the fund into each, and capacity
    curves (plot attached, PNG saved beside the warehouse). A round resolved without returns is
    paid in bucket space; its return-space outputs are NULL and the reason is logged. Invalid
    portfolio files were rejected at ingestion, with reasons."""
    r = round_of(context)
    wh = warehouse.get()
    settings = pw.PortfolioPayoutSettings(**config.model_dump())
    rules = PayoutRules.from_round_info(round_info)
    predicted, portfolio_models = _submitted(wh, r)
    factor = payout_factor(
        valid_stake(stakes["stake"], predicted.union(portfolio_models)), rules.stake_threshold
    )
    with timer() as t:
        try:
            scored = pw.score_portfolios(
                portfolios,
                meta_portfolio["weight"],
                resolved,
                stakes["stake"],
                factor,
                rules.clip,
                market,
                settings,
            )
        except ValueError as exc:
            raise dg.Failure(description=f"round {r}: {exc}", allow_retries=False) from exc
        table = scored.table
        curves = (
            pw.capacity_curves(
                list(table["model_id"]), table["pr"].to_numpy(), scored.terms, settings
            )
            if scored.terms is not None and scored.has_returns and len(table)
            else pd.DataFrame(columns=pw.CAPACITY_COLUMNS)
        )
    if not scored.has_returns:
        context.log.info(
            f"round {r}: resolved.parquet has no return column, so the round is paid in bucket "
            "space only: PR, MR, PP_raw, the marginal return, scenario and the capacity curves "
            "need realized returns and are skipped (NULL); whether the meta portfolio lost is "
            "read from MB < 0 instead of MR < 0 (meta_loss_basis = 'mb')."
        )
    if len(scored.rejected):
        context.log.warning(f"round {r}: portfolios breaking the contract: {scored.rejected}")
    with timer() as t_write:
        counts = wh.write_round(
            r,
            {
                "portfolio_scores": table,
                "meta_portfolio_returns": scored.meta,
                "capacity_curves": curves,
            },
        )
    rejections = wh.read_round("submission_rejections", r)
    rejected = rejections[rejections["kind"] == "portfolio"][["model_id", "rule", "reason"]]
    meta = scored.meta.iloc[0]
    metadata: dict = {
        "round": r,
        "rows": counts["portfolio_scores"],
        "models_scored": len(table),
        "models_rejected": len(rejected) + len(scored.rejected),
        "rejected_at_ingestion": markdown_table(rejected, max_rows=20),
        "cost_model": scored.cost_model,
        "bucket_per_return": settings.bucket_per_return,
        "meta_mb": float(meta["mb"]),
        "meta_mr": float(meta["mr"]),
        "meta_loss_basis": str(meta["meta_loss_basis"]),
        "meta_lost": bool(meta["meta_lost"]),
        "meta_transaction_cost": float(meta["transaction_cost"]),
        "payout_factor": factor,
        "total_payout": float(table["payout"].sum()),
        "scenarios": {k: int(v) for k, v in table["scenario"].value_counts().sort_index().items()},
        "scores": markdown_table(
            table[["model_id", "pb", "pr", "transaction_cost", "pp", "payout", "scenario"]].assign(
                capacity_musd=table["capacity_usd"] / 1e6
            ),
            max_rows=30,
        ),
        "compute_seconds": t["seconds"],
        "write_seconds": t_write["seconds"],
    }
    if not scored.has_returns:
        metadata["capacity_curves"] = "skipped: the round has no realized returns"
    if len(curves):
        png = _capacity_png(curves, table, settings.long_market_value_usd, r)
        path = Path(warehouse.directory) / "capacity_curves" / f"round_{r}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png)
        metadata["capacity_plot"] = dg.MetadataValue.md(
            f"![capacity curves](data:image/png;base64,{base64.b64encode(png).decode()})"
        )
        metadata["capacity_plot_path"] = dg.MetadataValue.path(str(path))
    return dg.Output(table, metadata=metadata)


@round_check(
    asset=portfolio_scores,
    name=PORTFOLIO_CLIP_CHECK,
    blocking=True,
    pool=WAREHOUSE_POOL,
    additional_ins={"round_info": dg.AssetIn("round_info")},
)
def portfolio_payouts_within_clip(
    context: dg.AssetCheckExecutionContext, round_info: dict, warehouse: WarehouseResource
) -> dg.AssetCheckResult:
    """Every portfolio payout of the round lies within +-clip * stake (a zero stake pays zero)."""
    return _within_clip("portfolio_scores", round_of(context), round_info, warehouse)


# --- Sharpe contribution over a window of rounds --------------------------------------------


@dg.asset(
    partitions_def=rounds_partitions,
    group_name=GROUP,
    pool=WAREHOUSE_POOL,
    kinds={"pandas", "duckdb"},
    deps=[portfolio_scores],
    name="sharpe_contribution",
)
def sharpe_contribution_asset(
    context: dg.AssetExecutionContext,
    config: SharpeContributionConfig,
    warehouse: WarehouseResource,
) -> dg.Output[pd.DataFrame]:
    """For each portfolio model: the Sharpe of the meta portfolio's net returns over the last
    `window_rounds` resolved rounds with a fraction moved into the model, minus the meta
    portfolio's own (rounds the model skipped: nothing moved). Read from the warehouse. Rounds
    resolved without returns have no net return and are left out of the window."""
    r = round_of(context)
    wh = warehouse.get()
    meta = wh.query(
        "SELECT round, net_return FROM meta_portfolio_returns "
        "WHERE round <= ? AND net_return IS NOT NULL ORDER BY round DESC LIMIT ?",
        [r, config.window_rounds],
    ).set_index("round")["net_return"]
    if r not in meta.index:
        context.log.info(
            f"round {r} has no realized returns: its Sharpe window is the last "
            f"{len(meta)} round(s) with returns"
        )
    rounds = [int(x) for x in meta.index]
    marginal = (
        wh.query(
            "SELECT round, model_id, marginal_return FROM portfolio_scores "
            "WHERE round BETWEEN ? AND ?",
            [min(rounds + [r]), r],
        )
        .pivot(index="round", columns="model_id", values="marginal_return")
        .reindex(meta.index)
    )
    # Models of this round only: the table answers "which of today's portfolios help most".
    current = wh.read_round("portfolio_scores", r)["model_id"]
    out = pw.sharpe_contribution(
        meta, marginal[marginal.columns.intersection(current)], config.min_rounds
    )
    counts = wh.write_round(r, {"sharpe_contribution": out})
    return dg.Output(
        out,
        metadata={
            "round": r,
            "rows": counts["sharpe_contribution"],
            "window_rounds": len(rounds),
            "window": f"{min(rounds)}-{max(rounds)}" if rounds else "",
            "meta_sharpe": float(out["meta_sharpe"].iloc[0]) if len(out) else float("nan"),
            "ranking": markdown_table(out, max_rows=20),
        },
    )


defs = dg.Definitions(
    assets=[payouts, portfolio_scores, sharpe_contribution_asset],
    asset_checks=[payouts_within_clip, portfolio_payouts_within_clip],
)
