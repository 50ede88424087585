"""Contribution assets: the optimized meta portfolio and every model's True Contribution.

Both use the one optimizer problem of `scoring/optimizer.py`, built from the round's medium
features and liquidity. They need the resolved target (the portfolio's realized return R, and
TC = dR/dstake), so they are skipped, not failed, until the round resolves.
"""

from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd

from tc_assets.defs.checks import check_finite, round_check
from tc_assets.defs.config import TCConfig, settings_of
from tc_assets.defs.metadata import metadata_table, rounded, timer, warehouse_table
from tc_assets.defs.partitions import round_asset, round_failure, round_of
from tc_assets.defs.plots import attribution_figure, plot_metadata
from tc_assets.defs.resources import WarehouseResource
from tc_assets.io.contract import RETURN_COLUMN
from tc_assets.scoring.contribution import (
    TCResult,
    TCSettings,
    settings_hash,
    tc_attribution,
    tc_summary,
    true_contribution,
)
from tc_assets.scoring.meta_model import prediction_matrix
from tc_assets.scoring.optimizer import (
    ConstraintViolation,
    OptimizerSettings,
    PortfolioSolution,
    PortfolioSolveError,
    PortfolioSpec,
    build_spec,
    check_constraints,
    inexact_split,
    solve_portfolio,
)

GROUP = "contribution"
KINDS = {"torch", "duckdb"}
CONSTRAINT_TOL = 1e-7
PLOT_DIR = "tc_attribution_plots"


def round_spec(
    universe: pd.DataFrame, round_info: dict, market: pd.Series | None, settings: OptimizerSettings
) -> PortfolioSpec:
    """The round's optimizer problem: medium features and, when present, adv_usd by live id."""
    medium = universe[round_info["feature_sets"]["medium"]].to_numpy(dtype=np.float64)
    adv = None if market is None else market.reindex(universe.index).to_numpy(dtype=np.float64)
    return build_spec(medium, adv, settings)


class OptimizerResource(dg.ConfigurableResource, OptimizerSettings):
    """The meta portfolio problem, one configuration shared by `meta_portfolio`, its check and
    `tc_scores` (see OptimizerSettings for each field and its default)."""

    def round_spec(
        self, universe: pd.DataFrame, round_info: dict, market: pd.Series | None
    ) -> PortfolioSpec:
        """The round's optimizer problem with these settings (see `round_spec`)."""
        return round_spec(universe, round_info, market, settings_of(self, OptimizerSettings))


def centred_target(resolved: pd.DataFrame, ids: pd.Index, column: str) -> np.ndarray:
    """The round's target (or return) on the live ids, centred; ids without one get 0."""
    t = resolved[column].reindex(ids).to_numpy(dtype=np.float64)
    t = t - np.nanmean(t)
    return np.nan_to_num(t, nan=0.0)


def tc_target(resolved: pd.DataFrame, ids: pd.Index, column: str, r: int) -> np.ndarray:
    """The centred `column` TC is scored on; a round that did not publish it fails clearly."""
    if column not in resolved.columns:
        raise round_failure(
            r,
            f"round {r}: TC is configured on target_column {column!r}, but this round's "
            f"resolved.parquet has no {column!r} column (it published targets only); set "
            "target_column: target to score TC on the target",
        )
    return centred_target(resolved, ids, column)


@round_asset(group=GROUP, kinds=KINDS)
def meta_portfolio(
    context: dg.AssetExecutionContext,
    optimizer: OptimizerResource,
    meta_model: pd.Series,
    universe: pd.DataFrame,
    round_info: dict,
    market: pd.Series | None,
    resolved: pd.DataFrame,
    warehouse: WarehouseResource,
) -> dg.Output[pd.DataFrame]:
    """The optimized portfolio of the round's meta model (index: id; weight, swmm), written to
    `meta_model.weight`; its realized return R = w . t (t the centred target) in the metadata."""
    r = round_of(context)
    spec = optimizer.round_spec(universe, round_info, market)
    x = meta_model.reindex(universe.index).to_numpy(dtype=np.float64)
    with timer() as t:
        try:
            sol = solve_portfolio(x, spec, label=str(r))
        except PortfolioSolveError as exc:
            raise round_failure(r, exc) from None
    problem = inexact_split(sol, spec)
    if problem is not None:  # not a tradable portfolio: fail before anything is written
        raise round_failure(r, f"round {r}: {problem}", overlap=sol.long_short_overlap)
    frame = pd.DataFrame({"weight": sol.weights, "swmm": x}, index=universe.index)
    weights = pd.DataFrame({"id": universe.index.to_numpy(), "weight": sol.weights})
    warehouse.get().update_columns("meta_model", r, weights, on=("id",), columns=("weight",))
    columns = ["target", RETURN_COLUMN] if RETURN_COLUMN in resolved.columns else ["target"]
    if RETURN_COLUMN not in columns:
        context.log.info(f"round {r}: no realized returns, realized_R_return is skipped")
    realized = {
        f"realized_R_{column}": float(sol.weights @ centred_target(resolved, frame.index, column))
        for column in columns
    }
    metadata = {"round": r, **_solution_metadata(sol, spec, frame, realized), **t}
    return dg.Output(frame, metadata=metadata)


def _solution_metadata(
    sol: PortfolioSolution, spec: PortfolioSpec, frame: pd.DataFrame, realized: dict
) -> dict:
    """What the solver did and what the portfolio holds."""
    top = frame.assign(abs_weight=frame["weight"].abs()).nlargest(10, "abs_weight")
    return {
        "status": sol.status,
        "objective": sol.objective,
        **realized,
        "iterations": sol.iterations,
        "kkt_residual": sol.kkt_residual,
        "active_position_caps": sol.active_caps,
        "active_exposure_limits": sol.active_exposures,
        "exposure_constraints": spec.n_exposures,
        "free_positions": sol.free_positions,
        "held_long": sol.held_long,
        "held_short": sol.held_short,
        "max_violation": sol.max_violation,
        "largest_positions": metadata_table(top.reset_index()[["id", "weight", "swmm"]]),
    }


def _describe(violations: list[ConstraintViolation]) -> str:
    """The violated constraints in words, or that every one holds."""
    if not violations:
        return "every constraint holds within 1e-7"
    where = {"exposure": "feature"}
    return "; ".join(
        f"{v.constraint} off by {v.amount:.3g}"
        + (f" at {where.get(v.constraint, 'stock')} {v.index}" if v.index is not None else "")
        for v in violations
    )


@round_check(
    asset=meta_portfolio,
    blocking=True,
    additional_ins={name: dg.AssetIn(name) for name in ("universe", "round_info", "market")},
)
def meta_portfolio_constraints(
    optimizer: OptimizerResource,
    meta_portfolio: pd.DataFrame,
    universe: pd.DataFrame,
    round_info: dict,
    market: pd.Series | None,
) -> dg.AssetCheckResult:
    """The weights satisfy every constraint of the problem within 1e-7: each side sums to 1,
    every position within its cap, every medium feature exposure within its limit."""
    spec = optimizer.round_spec(universe, round_info, market)
    w = meta_portfolio["weight"].reindex(universe.index).to_numpy(dtype=np.float64)
    violations = check_constraints(w, spec, tol=CONSTRAINT_TOL)
    exposure = float(np.abs(spec.exposures.T @ w).max()) if spec.n_exposures else 0.0
    return dg.AssetCheckResult(
        passed=not violations,
        severity=dg.AssetCheckSeverity.ERROR,
        description=_describe(violations),
        metadata={
            "violations": len(violations),
            "worst": max((v.amount for v in violations), default=0.0),
            "long_sum": float(np.maximum(w, 0).sum()),
            "short_sum": float(np.maximum(-w, 0).sum()),
            "max_abs_exposure": exposure,
        },
    )


# After the meta portfolio and its blocking constraint check: TC differentiates that same
# problem, so a round whose portfolio is not valid gets no TC (and no payouts).
@round_asset(group=GROUP, kinds=KINDS, deps=[meta_portfolio])
def tc_scores(
    context: dg.AssetExecutionContext,
    config: TCConfig,
    optimizer: OptimizerResource,
    predictions: pd.DataFrame,
    stakes: pd.DataFrame,
    universe: pd.DataFrame,
    round_info: dict,
    market: pd.Series | None,
    resolved: pd.DataFrame,
    model_metrics: pd.DataFrame,
    warehouse: WarehouseResource,
) -> dg.Output[pd.DataFrame]:
    """TC of every model with a valid submission, staked or not (index model_id; tc, tc_std,
    bags), as the README defines it; also the round's `tc_scale`, `tc_vectors` (TC_j =
    P_j . g - c) and `tc_attribution`."""
    r = round_of(context)
    settings = settings_of(config, TCSettings)
    spec = optimizer.round_spec(universe, round_info, market)
    preds = predictions.reindex(universe.index)
    stake = stakes["stake"].reindex(preds.columns).fillna(0.0)
    target = tc_target(resolved, universe.index, settings.target_column, r)
    with timer() as t_rank:
        p = prediction_matrix(preds.to_numpy(dtype=np.float64))
    context.log.info(f"round {r}: TC of {p.shape[1]} models, {settings.bags} bags")
    try:
        result = true_contribution(p, stake.to_numpy(), target, spec, settings, label=str(r))
    except (PortfolioSolveError, ValueError) as exc:
        raise round_failure(r, exc) from None
    scores = _scores_table(result, preds.columns)
    corr = model_metrics["corr"].reindex(preds.columns)
    summary = _summary(result, corr, target, settings, optimizer)
    parts = _attribution_table(p, result, preds.columns)
    counts = warehouse.get().write_round(
        r, _tc_tables(result, scores, summary, parts, universe.index)
    )
    metadata = _tc_metadata(result, scores, stake, rank_seconds=t_rank["seconds"]) | summary
    plot = _attribution_plot(parts, stake, Path(warehouse.directory) / PLOT_DIR / f"round_{r}.png")
    table = warehouse_table("tc_scores", counts["tc_scores"])
    return dg.Output(scores, metadata={"round": r, **table, **rounded(metadata), **plot})


def _summary(
    result: TCResult,
    corr: pd.Series,
    target: np.ndarray,
    settings: TCSettings,
    optimizer: OptimizerResource,
) -> dict:
    """The round's `tc_scale` row (see `tc_summary`); corr in the order of the TC's models."""
    digest = settings_hash(settings, settings_of(optimizer, OptimizerSettings))
    return tc_summary(result, corr.to_numpy(dtype=np.float64), target, digest)


def _tc_tables(
    result: TCResult, scores: pd.DataFrame, summary: dict, parts: pd.DataFrame, ids: pd.Index
) -> dict[str, pd.DataFrame]:
    """The round's rows of `tc_scores`, `tc_scale`, `tc_vectors` and `tc_attribution` (the
    last two are empty for leave-one-out, which has no bags)."""
    g = result.g if result.g is not None else np.zeros(0)
    return {
        "tc_scores": scores.reset_index(),
        "tc_scale": pd.DataFrame([summary]),
        "tc_vectors": pd.DataFrame({"id": ids.to_numpy()[: g.size], "g": g}),
        "tc_attribution": parts.reset_index(),
    }


def _attribution_table(p: np.ndarray, result: TCResult, models: pd.Index) -> pd.DataFrame:
    """`tc_attribution` (index model_id): total = reaches + exposure_budget + bounds."""
    columns = ["total", "reaches", "exposure_budget", "bounds", "tc"]
    index = pd.Index(models, name="model_id")
    if result.g is None:
        return pd.DataFrame(columns=columns, index=index[:0], dtype=float)
    parts = tc_attribution(p, result)
    return pd.DataFrame({name: getattr(parts, name) for name in columns}, index=index)


def _attribution_plot(parts: pd.DataFrame, stake: pd.Series, path: Path) -> dict:
    """The parts of the 20 largest stakes' signals as a plot, and the top and bottom 5 by TC."""
    if parts.empty:
        return {}
    top = parts.loc[stake.reindex(parts.index).nlargest(20).index]
    ranked = parts.sort_values("tc", ascending=False).round(4).reset_index()
    totals = parts[["reaches", "exposure_budget", "bounds"]].abs().sum()
    summary = "share of all models' raw signal: " + ", ".join(
        f"{name} {value / totals.sum():.0%}" for name, value in totals.items()
    )
    return {
        **plot_metadata(
            attribution_figure(top), path, "attribution_plot", "TC attribution", summary
        ),
        "attribution_top_bottom": metadata_table(pd.concat([ranked.head(5), ranked.tail(5)])),
    }


def _scores_table(result: TCResult, models: pd.Index) -> pd.DataFrame:
    """The `tc_scores` table (index: model_id): tc, tc_std, bags, engine."""
    columns = {"tc": result.tc, "tc_std": result.tc_std, "bags": result.bags}
    return pd.DataFrame(
        {**columns, "engine": result.engine}, index=pd.Index(models, name="model_id")
    )


def _tc_metadata(
    result: TCResult, scores: pd.DataFrame, stake: pd.Series, rank_seconds: float
) -> dict:
    """The engine's run, the stability of the scores, and the top and bottom of the ranking."""
    unbagged = (
        float(np.corrcoef(result.tc, result.unbagged_tc)[0, 1])
        if result.unbagged_tc is not None and np.std(result.unbagged_tc) > 0
        else float("nan")
    )
    ranked = scores.sort_values("tc", ascending=False).reset_index()
    iterations = result.iterations if result.iterations is not None else np.array([np.nan])
    return {
        "engine": result.engine,
        "device": result.device,
        "models": len(scores),
        "staked_models": int((stake > 0).sum()),
        "bags": result.bags,
        "skipped_bags": len(result.skipped_bags),
        "untradable_bags": len(result.untradable_bags),
        "seconds": result.seconds,
        "rank_seconds": rank_seconds,
        "time_per_bag_s": result.time_per_bag_s,
        "solver_iterations_mean": float(np.nanmean(iterations)),
        "solver_iterations_max": float(np.nanmax(iterations)),
        "kkt_max": result.kkt_max,
        "split_half_stability": result.split_half(),
        "corr_with_unbagged_gradient": unbagged,
        "scale_kappa": result.scale,
        "target_passthrough": result.passthrough,
        "meta_portfolio_R": result.realized_return,
        "top_tc": metadata_table(ranked.head(10)),
        "bottom_tc": metadata_table(ranked.tail(10)),
    }


@round_check(asset=tc_scores, blocking=True)
def tc_scores_finite(tc_scores: pd.DataFrame) -> dg.AssetCheckResult:
    """Every model has a finite TC and tc_std."""
    return check_finite(tc_scores, ["tc", "tc_std"])


defs = dg.Definitions(
    assets=[meta_portfolio, tc_scores],
    asset_checks=[meta_portfolio_constraints, tc_scores_finite],
    resources={"optimizer": OptimizerResource()},
)
