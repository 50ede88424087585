"""Warehouse tables: names, columns and DuckDB types (the contract's and the platform's own).

Each table is partitioned by one integer column (`round` unless stated): a write replaces
exactly the rows of one partition. Columns listed here are the only ones a write may carry.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Table:
    name: str
    columns: tuple[tuple[str, str], ...]
    description: str
    partition: str = "round"
    key: tuple[str, ...] = ()

    @property
    def column_names(self) -> list[str]:
        return [c for c, _ in self.columns]


def _t(name: str, description: str, columns: str, key: str = "", partition: str = "round") -> Table:
    cols = tuple(
        (part.split()[0], " ".join(part.split()[1:]))
        for part in (c.strip() for c in columns.split(","))
        if part
    )
    return Table(name, cols, description, partition, tuple(key.split()))


TABLES: dict[str, Table] = {
    t.name: t
    for t in [
        # Ingestion (issue: foundation).
        _t(
            "rounds",
            "One row per ingested round: its calendar, payout parameters and counts.",
            "round INTEGER, open_time TIMESTAMPTZ, close_time TIMESTAMPTZ, "
            "resolve_time TIMESTAMPTZ, stake_threshold DOUBLE, clip DOUBLE, n_ids INTEGER, "
            "n_prediction_models INTEGER, n_portfolio_models INTEGER, n_rejected INTEGER, "
            "source VARCHAR, ingested_at TIMESTAMPTZ",
            key="round",
        ),
        _t(
            "universe",
            "The round's live ids.",
            "round INTEGER, id VARCHAR, era VARCHAR",
            "round id",
        ),
        _t(
            "example_predictions",
            "The example model's predictions.",
            "round INTEGER, id VARCHAR, prediction DOUBLE",
            "round id",
        ),
        _t("market", "Liquidity per id.", "round INTEGER, id VARCHAR, adv_usd DOUBLE", "round id"),
        _t(
            "stakes",
            "stakes.csv as validated; `submitted` = the model has a valid submission this round.",
            "round INTEGER, model_id VARCHAR, stake DOUBLE, corr_multiplier DOUBLE, "
            "tc_multiplier DOUBLE, submitted BOOLEAN",
            "round model_id",
        ),
        _t(
            "predictions",
            "Accepted predictions, ids of the round only.",
            "round INTEGER, model_id VARCHAR, id VARCHAR, prediction DOUBLE",
            "round model_id id",
        ),
        _t(
            "portfolios",
            "Accepted portfolio weights, ids of the round only.",
            "round INTEGER, model_id VARCHAR, id VARCHAR, weight DOUBLE",
            "round model_id id",
        ),
        _t(
            "submissions",
            "Every accepted submission file: rows read, ids dropped as not in the round, coverage.",
            "round INTEGER, model_id VARCHAR, kind VARCHAR, rows INTEGER, "
            "foreign_ids_dropped INTEGER, ids_used INTEGER, coverage DOUBLE",
            "round model_id kind",
        ),
        _t(
            "submission_rejections",
            "Every rejected submission file with its rule code and a readable reason.",
            "round INTEGER, model_id VARCHAR, kind VARCHAR, rule VARCHAR, reason VARCHAR",
            "round model_id kind",
        ),
        _t(
            "resolved",
            "Targets and realized residual returns, once the round resolves; `return` is NULL "
            "for a round that published targets only.",
            "round INTEGER, id VARCHAR, target DOUBLE, return DOUBLE",
            "round id",
        ),
        # Metrics and meta model.
        _t(
            "meta_model",
            "Stake-weighted meta model signal and the optimized meta portfolio weight per id.",
            "round INTEGER, id VARCHAR, swmm DOUBLE, weight DOUBLE",
            "round id",
        ),
        _t(
            "model_metrics",
            "Per-model proxy metrics of a resolved round.",
            "round INTEGER, model_id VARCHAR, corr DOUBLE, mmc DOUBLE, fnc_v3 DOUBLE, "
            "fnc_v3_tb200 DOUBLE, exposure_dissimilarity DOUBLE, max_feature_exposure DOUBLE",
            "round model_id",
        ),
        _t(
            "exposure_metrics",
            "Feature-only metrics, known at round close (before resolution).",
            "round INTEGER, model_id VARCHAR, exposure_dissimilarity DOUBLE, "
            "max_feature_exposure DOUBLE, max_exposure_feature VARCHAR",
            "round model_id",
        ),
        _t(
            "feature_exposures",
            "Pearson correlation of each model's predictions with each medium feature.",
            "round INTEGER, model_id VARCHAR, feature VARCHAR, exposure DOUBLE",
            "round model_id feature",
        ),
        # True Contribution.
        _t(
            "tc_scores",
            "True Contribution per model: mean over bags, its standard deviation, bag count.",
            "round INTEGER, model_id VARCHAR, tc DOUBLE, tc_std DOUBLE, bags INTEGER, "
            "engine VARCHAR",
            "round model_id",
        ),
        _t(
            "tc_scale",
            "TC's round-level terms: kappa, the offset c of TC_j = P_j . g - c, the share of "
            "the target the optimizer passes (passthrough), bags used and skipped, "
            "std(TC)/std(CORR), corr(g, centred target), and a hash of the settings.",
            "round INTEGER, engine VARCHAR, kappa DOUBLE, c DOUBLE, passthrough DOUBLE, "
            "bags INTEGER, skipped_bags INTEGER, untradable_bags INTEGER, "
            "tc_std_over_corr_std DOUBLE, g_target_corr DOUBLE, settings_hash VARCHAR",
            "round",
        ),
        _t(
            "tc_vectors",
            "TC's weight g on each stock's gaussianized rank: TC_j = P_j . g - c.",
            "round INTEGER, id VARCHAR, g DOUBLE",
            "round id",
        ),
        _t(
            "tc_attribution",
            "Why a model's TC is what it is: its raw signal (total = P_j . target scaled like g) "
            "split exactly into reaches (P_j . g; tc = reaches - c), exposure_budget (removed by "
            "binding exposure limits and the budget rows) and bounds (on positions at a bound).",
            "round INTEGER, model_id VARCHAR, total DOUBLE, reaches DOUBLE, "
            "exposure_budget DOUBLE, bounds DOUBLE, tc DOUBLE",
            "round model_id",
        ),
        # Payouts.
        _t(
            "payouts",
            "Classic stake payouts: stake * clip(payout_factor * score, -clip, +clip), "
            "score = corr_multiplier * corr + tc_multiplier * tc; `clipped`: at the bound.",
            "round INTEGER, model_id VARCHAR, stake DOUBLE, corr DOUBLE, tc DOUBLE, "
            "corr_multiplier DOUBLE, tc_multiplier DOUBLE, payout_factor DOUBLE, score DOUBLE, "
            "payout DOUBLE, clipped BOOLEAN",
            "round model_id",
        ),
        _t(
            "payout_summary",
            "One row per round: stakes, payout factor, payout totals, and the staked models "
            "without a payout row (no valid submission, portfolio only, unscored).",
            "round INTEGER, stake_rows INTEGER, staked_models INTEGER, "
            "valid_staked_models INTEGER, total_stake DOUBLE, valid_stake DOUBLE, "
            "payout_factor DOUBLE, payout_rows INTEGER, models_paid INTEGER, "
            "no_valid_submission INTEGER, staked_no_valid_submission INTEGER, "
            "portfolio_only INTEGER, unscored INTEGER, submitted_without_stake_row INTEGER, "
            "total_payout DOUBLE, total_gains DOUBLE, total_losses DOUBLE, clipped INTEGER",
            "round",
        ),
        _t(
            "portfolio_scores",
            "Portfolio-weight submissions: PB and MB (target units), PR and MR (return units), "
            "whether the meta portfolio lost money (`meta_lost`) judged on MR or, in a round "
            "without returns, on MB (`meta_loss_basis` 'mr' or 'mb'), transaction cost "
            "(`transaction_cost` in target units, `transaction_cost_raw` in return units), "
            "payout percentages, marginal return of moving a fraction of the fund into the "
            "portfolio and its scenario (A-D), payout, and capacity under the liquidity model "
            "(LMV of the largest dollar return, that return, and the LMV past which it loses "
            "money). Return-space columns are NULL in a round without returns.",
            "round INTEGER, model_id VARCHAR, pb DOUBLE, pr DOUBLE, mb DOUBLE, mr DOUBLE, "
            "meta_loss_basis VARCHAR, meta_lost BOOLEAN, "
            "transaction_cost DOUBLE, pp DOUBLE, scenario VARCHAR, transaction_cost_raw DOUBLE, "
            "pp_raw DOUBLE, marginal_return DOUBLE, stake DOUBLE, payout_factor DOUBLE, "
            "payout DOUBLE, capacity_usd DOUBLE, breakeven_usd DOUBLE, "
            "peak_dollar_return_usd DOUBLE, cost_model VARCHAR",
            "round model_id",
        ),
        _t(
            "meta_portfolio_returns",
            "The optimized meta portfolio's bucketed (target units) and raw return, whether it "
            "lost money and on which measure, its transaction cost (return units) and net "
            "return per round (the Sharpe contribution's baseline; NULL without returns), and "
            "the bucket_per_return conversion the round's bucketed costs used.",
            "round INTEGER, mb DOUBLE, mr DOUBLE, meta_loss_basis VARCHAR, meta_lost BOOLEAN, "
            "transaction_cost DOUBLE, net_return DOUBLE, "
            "long_market_value_usd DOUBLE, cost_model VARCHAR, bucket_per_return DOUBLE",
            "round",
        ),
        _t(
            "capacity_curves",
            "Dollar return and transaction cost of each portfolio submission against the long "
            "market value invested, under the liquidity cost model.",
            "round INTEGER, model_id VARCHAR, long_market_value_usd DOUBLE, "
            "dollar_return_usd DOUBLE, cost_usd DOUBLE",
            "round model_id long_market_value_usd",
        ),
        _t(
            "sharpe_contribution",
            "Per portfolio model, over the window of rounds ending at `round`: the meta "
            "portfolio's Sharpe with a fraction moved into the model, minus its own.",
            "round INTEGER, model_id VARCHAR, window_rounds INTEGER, rounds_submitted INTEGER, "
            "meta_sharpe DOUBLE, blended_sharpe DOUBLE, sharpe_contribution DOUBLE, "
            "mean_marginal_return DOUBLE, corr_with_meta DOUBLE",
            "round model_id",
        ),
        # TC proxy model: one EBM per window of rounds, keyed by its last round.
        _t(
            "tc_proxy_importance",
            "Per term of the TC proxy fitted over the window ending at `window_end`: importance "
            "(mean |contribution| to predicted TC), monotonicity (Spearman of the shape "
            "function against its input; NULL for pair terms), share of the total, rank, kind.",
            "window_end INTEGER, term VARCHAR, importance DOUBLE, monotonicity DOUBLE, "
            "share DOUBLE, rank INTEGER, kind VARCHAR",
            "window_end term",
            partition="window_end",
        ),
        _t(
            "tc_proxy_shape",
            "Shape function of each main term of the TC proxy: its contribution on each bin of "
            "its input (edges, midpoint x, fitted rows in the bin).",
            "window_end INTEGER, term VARCHAR, bin INTEGER, lower DOUBLE, upper DOUBLE, "
            "x DOUBLE, contribution DOUBLE, weight DOUBLE",
            "window_end term bin",
            partition="window_end",
        ),
        _t(
            "tc_proxy_fit",
            "One row per TC proxy window: its rounds, rows, held-out R^2 (fitted on the earlier "
            "rounds, scored on the last ones), in-sample R^2, settings (JSON), plot files.",
            "window_end INTEGER, first_round INTEGER, rounds INTEGER, train_rounds INTEGER, "
            "held_out_rounds INTEGER, rows INTEGER, rows_dropped INTEGER, models INTEGER, "
            "held_out_r2 DOUBLE, held_out_corr DOUBLE, fit_r2 DOUBLE, intercept DOUBLE, "
            "interaction_fnc_v3_center DOUBLE, interaction_dissimilarity_center DOUBLE, "
            "top_term VARCHAR, seed INTEGER, settings VARCHAR, importance_plot VARCHAR, "
            "shapes_plot VARCHAR",
            "window_end",
            partition="window_end",
        ),
    ]
}


def table(name: str) -> Table:
    try:
        return TABLES[name]
    except KeyError:
        raise KeyError(f"unknown warehouse table {name!r}; known: {sorted(TABLES)}") from None
