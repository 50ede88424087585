"""Payout assets: classic stake payouts, portfolio-weight scores, Sharpe contribution.

Each asset loads the round's inputs, calls `scoring.payouts` / `scoring.portfolio_weights`,
writes through the warehouse (writer pool) and describes the result. All of them need the
resolved round: until it resolves they are skipped with their upstream.

Which models submitted validly comes from the warehouse's `submissions` table (ingestion's
record), so the payout factor counts exactly the stakes that ingestion accepted.
"""

from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd

from tc_assets.defs.checks import check_within, round_check
from tc_assets.defs.config import PortfolioPayoutConfig, SharpeContributionConfig, settings_of
from tc_assets.defs.metadata import (
    key_values,
    metadata_table,
    plain,
    rounded,
    timer,
    warehouse_table,
)
from tc_assets.defs.partitions import (
    WAREHOUSE_POOL,
    WINDOW_METADATA_KEY,
    WINDOW_TAGS,
    round_asset,
    round_failure,
    round_of,
    window_label,
)
from tc_assets.defs.plots import capacity_figure, capacity_summary, plot_metadata
from tc_assets.defs.resources import WarehouseResource
from tc_assets.io import queries
from tc_assets.io.warehouse import Warehouse
from tc_assets.scoring import portfolio_weights as pw
from tc_assets.scoring.payouts import PayoutRules, classic_payouts, payout_factor, valid_stake

GROUP = "payouts"
KINDS = {"pandas", "duckdb"}
CLIP_CHECK = "payouts_within_clip"
PORTFOLIO_CLIP_CHECK = "portfolio_payouts_within_clip"
CLIP_TOLERANCE = 1e-12  # slack of the clip check on payout / stake (floating point)
PLOT_DIR = "capacity_curves"
NO_RETURNS = (
    "round {r}: resolved.parquet has no return column, so the round is paid in bucket "
    "space only: PR, MR, PP_raw, the marginal return, scenario and the capacity curves "
    "need realized returns and are skipped (NULL); whether the meta portfolio lost is "
    "read from MB < 0 instead of MR < 0 (meta_loss_basis = 'mb')."
)


def clip_check(asset: dg.AssetsDefinition, name: str, description: str) -> dg.AssetChecksDefinition:
    """A blocking check that every payout the asset wrote for the round (its warehouse table of
    the same name, read back) lies within +-clip * stake: payout / stake in [-clip, clip], and
    a zero stake pays exactly zero."""
    table = asset.key.to_user_string()

    @round_check(
        asset=asset,
        name=name,
        description=description,
        blocking=True,
        pool=WAREHOUSE_POOL,
        additional_ins={"round_info": dg.AssetIn("round_info")},
    )
    def within_clip(
        context: dg.AssetCheckExecutionContext, round_info: dict, warehouse: WarehouseResource
    ) -> dg.AssetCheckResult:
        clip = PayoutRules.from_round_info(round_info).clip
        written = warehouse.get().read_round(table, round_of(context))
        stake, paid = written["stake"].to_numpy(), written["payout"].to_numpy()
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(stake > 0, paid / stake, np.where(paid == 0, 0.0, np.inf))
        values = pd.Series(ratio, index=written["model_id"], name="payout / stake")
        return check_within(values, -clip, clip, tol=CLIP_TOLERANCE)

    return within_clip


# --- classic payouts ------------------------------------------------------------------------


@round_asset(group=GROUP, kinds=KINDS)
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
    r, wh = round_of(context), warehouse.get()
    rules = PayoutRules.from_round_info(round_info)
    predicted, portfolio_models = queries.submitted_models(wh, r)
    metrics = {"corr": model_metrics["corr"], "tc": tc_scores["tc"]}
    scores = pd.DataFrame({k: v.reindex(predicted) for k, v in metrics.items()}, index=predicted)
    with timer() as t:
        result = classic_payouts(stakes, scores, portfolio_models, rules)
    summary = result.summary.as_dict()
    tables = {"payouts": result.table, "payout_summary": pd.DataFrame([summary])}
    with timer() as t_write:
        counts = wh.write_round(r, tables)
    metadata = {
        "round": r,
        **warehouse_table("payouts", counts["payouts"]),
        **_payouts_metadata(result.table, summary, rules),
        "not_paid": metadata_table(result.unpaid, max_rows=30),
        "compute_seconds": t["seconds"],
        "write_seconds": t_write["seconds"],
    }
    return dg.Output(result.table, metadata=rounded(metadata))


def _payouts_metadata(table: pd.DataFrame, summary: dict, rules: PayoutRules) -> dict:
    """The round's totals and its largest gains and losses."""
    gains = table[table["payout"] > 0].sort_values("payout", ascending=False)
    losses = table[table["payout"] < 0].sort_values("payout")
    shown = ["model_id", "stake", "corr", "tc", "corr_multiplier", "tc_multiplier", "payout"]
    totals = ("total_payout", "models_paid", "payout_factor", "total_gains", "total_losses")
    return {
        **{k: summary[k] for k in (*totals, "clipped")},
        "largest_gains": metadata_table(gains[shown].head(5), max_rows=5),
        "largest_losses": metadata_table(losses[shown].head(5), max_rows=5),
        "summary": key_values(
            summary | {"stake_threshold": rules.stake_threshold, "clip": rules.clip}
        ),
    }


payouts_within_clip = clip_check(
    payouts,
    CLIP_CHECK,
    "Every classic payout of the round lies within +-clip * stake (a zero stake pays zero). "
    "Blocking: a payout beyond the clip is not published (the reports are not built).",
)


# --- portfolio-weight submissions -----------------------------------------------------------


def _score_portfolios(
    wh: Warehouse,
    r: int,
    settings: pw.PortfolioPayoutSettings,
    round_info: dict,
    stakes: pd.DataFrame,
    portfolios: pd.DataFrame,
    market: pd.Series | None,
    resolved: pd.DataFrame,
    meta_portfolio: pd.DataFrame,
) -> tuple[pw.PortfolioRound, pd.DataFrame, float]:
    """(the scores, the capacity curves, the payout factor) of the round's portfolios."""
    rules = PayoutRules.from_round_info(round_info)
    predicted, portfolio_models = queries.submitted_models(wh, r)
    valid = valid_stake(stakes["stake"], predicted.union(portfolio_models))
    factor = payout_factor(valid, rules.stake_threshold)
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
        raise round_failure(r, f"round {r}: {exc}") from None
    table = scored.table
    if scored.terms is None or not scored.has_returns or not len(table):
        return scored, pd.DataFrame(columns=pw.CAPACITY_COLUMNS), factor
    curves = pw.capacity_curves(
        list(table["model_id"]), table["pr"].to_numpy(), scored.terms, settings
    )
    return scored, curves, factor


@round_asset(group=GROUP, kinds=KINDS)
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
    r, wh = round_of(context), warehouse.get()
    settings = settings_of(config, pw.PortfolioPayoutSettings)
    inputs = (round_info, stakes, portfolios, market, resolved, meta_portfolio)
    with timer() as t:
        scored, curves, factor = _score_portfolios(wh, r, settings, *inputs)
    if not scored.has_returns:
        context.log.info(NO_RETURNS.format(r=r))
    if len(scored.rejected):
        context.log.warning(f"round {r}: portfolios breaking the contract: {scored.rejected}")
    tables = {"portfolio_scores": scored.table, "meta_portfolio_returns": scored.meta}
    with timer() as t_write:
        counts = wh.write_round(r, {**tables, "capacity_curves": curves})
    metadata = {
        "round": r,
        **warehouse_table("portfolio_scores", counts["portfolio_scores"]),
        **_portfolio_metadata(scored, queries.rejections(wh, r, "portfolio"), factor, settings),
        "compute_seconds": t["seconds"],
        "write_seconds": t_write["seconds"],
    }
    plot = _capacity_plot(curves, scored, settings, Path(warehouse.directory) / PLOT_DIR, r)
    return dg.Output(scored.table, metadata=rounded({**metadata, **plot}))


def _capacity_plot(
    curves: pd.DataFrame,
    scored: pw.PortfolioRound,
    settings: pw.PortfolioPayoutSettings,
    folder: Path,
    r: int,
) -> dict:
    """The capacity curves' plot, saved and attached; why there is none without returns."""
    if not scored.has_returns:
        return {"capacity_curves": "skipped: the round has no realized returns"}
    if not len(curves):
        return {}
    fig = capacity_figure(curves, scored.table, settings.long_market_value_usd, r)
    summary = capacity_summary(scored.table)
    return plot_metadata(
        fig, folder / f"round_{r}.png", "capacity_plot", "capacity curves", summary
    )


def _portfolio_metadata(
    scored: pw.PortfolioRound,
    rejected: pd.DataFrame,
    factor: float,
    settings: pw.PortfolioPayoutSettings,
) -> dict:
    """Rejections, the meta portfolio's own returns and costs, and the scores table."""
    table, meta = scored.table, scored.meta.iloc[0]
    shown = ["model_id", "pb", "pr", "transaction_cost", "pp", "payout", "scenario"]
    scenarios = table["scenario"].value_counts().sort_index()
    return {
        "models_scored": len(table),
        "models_rejected": len(rejected) + len(scored.rejected),
        "rejected_at_ingestion": metadata_table(rejected, max_rows=20),
        "cost_model": scored.cost_model,
        "bucket_per_return": settings.bucket_per_return,
        "meta_mb": float(meta["mb"]),
        "meta_mr": float(meta["mr"]),
        "meta_loss_basis": str(meta["meta_loss_basis"]),
        "meta_lost": bool(meta["meta_lost"]),
        "meta_transaction_cost": float(meta["transaction_cost"]),
        "payout_factor": factor,
        "total_payout": float(table["payout"].sum()),
        "scenarios": {k: int(v) for k, v in scenarios.items()},
        "scores": metadata_table(
            table[shown].assign(capacity_musd=table["capacity_usd"] / 1e6), max_rows=30
        ),
    }


portfolio_payouts_within_clip = clip_check(
    portfolio_scores,
    PORTFOLIO_CLIP_CHECK,
    "Every portfolio payout of the round lies within +-clip * stake (a zero stake pays zero).",
)


# --- Sharpe contribution over a window of rounds --------------------------------------------


@round_asset(
    group=GROUP,
    kinds=KINDS,
    deps=[portfolio_scores],
    name="sharpe_contribution",
    tags=WINDOW_TAGS,
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
    meta = queries.meta_returns_window(wh, r, config.window_rounds)
    if r not in meta.index:
        context.log.info(
            f"round {r} has no realized returns: its Sharpe window is the last "
            f"{len(meta)} round(s) with returns"
        )
    rounds = [int(x) for x in meta.index]
    marginal = queries.marginal_returns(wh, min([*rounds, r]), r).reindex(meta.index)
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
            **warehouse_table("sharpe_contribution", counts["sharpe_contribution"]),
            "window_rounds": len(rounds),
            WINDOW_METADATA_KEY: window_label(rounds, config.window_rounds),
            "meta_sharpe": plain(out["meta_sharpe"].iloc[0]) if len(out) else None,
            "ranking": metadata_table(out, max_rows=20),
        },
    )


defs = dg.Definitions(
    assets=[payouts, portfolio_scores, sharpe_contribution_asset],
    asset_checks=[payouts_within_clip, portfolio_payouts_within_clip],
)
