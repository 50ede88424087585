"""Plain-text reports printed by `tc-platform demo` from the warehouse."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from tc_assets.io.warehouse import Warehouse


def round_summary(warehouse: Warehouse, rounds: Sequence[int]) -> pd.DataFrame:
    """Per round: ids, accepted and rejected submissions, staking, resolution."""
    keys = ",".join(str(int(r)) for r in rounds)
    tables = set(warehouse.table_names())
    if "rounds" not in tables:
        return pd.DataFrame()
    resolved = (
        "(SELECT count(*) FROM resolved v WHERE v.round = r.round) > 0"
        if "resolved" in tables
        else "false"
    )
    return warehouse.query(
        f"""
        SELECT r.round, r.n_ids AS ids, r.n_prediction_models AS predictions,
               r.n_portfolio_models AS portfolios, r.n_rejected AS rejected,
               (SELECT count(*) FROM stakes s WHERE s.round = r.round AND s.stake > 0) AS staked,
               (SELECT count(*) FROM stakes s WHERE s.round = r.round AND s.stake > 0
                  AND NOT s.submitted) AS staked_no_submission,
               (SELECT round(sum(stake)) FROM stakes s WHERE s.round = r.round) AS total_stake,
               {resolved} AS resolved
        FROM rounds r WHERE r.round IN ({keys}) ORDER BY r.round
        """
    )


def rejections(warehouse: Warehouse, round_number: int) -> pd.DataFrame:
    frame = warehouse.read_round("submission_rejections", round_number)
    return frame[["model_id", "kind", "rule", "reason"]]


def leaderboard(warehouse: Warehouse, round_number: int) -> pd.DataFrame:
    """The round's classic payouts with the model's metrics, largest payout first."""
    tables = set(warehouse.table_names())
    if "payouts" not in tables:
        return pd.DataFrame()
    fnc, join = "NULL", ""
    if "model_metrics" in tables:
        fnc = "m.fnc_v3"
        join = "LEFT JOIN model_metrics m ON m.round = p.round AND m.model_id = p.model_id"
    return warehouse.query(
        f"""
        SELECT p.model_id AS model, p.stake, p.corr, p.tc, {fnc} AS fnc_v3, p.payout
        FROM payouts p {join}
        WHERE p.round = ? ORDER BY p.payout DESC, p.model_id
        """,
        [int(round_number)],
    )


def _mart(warehouse: Warehouse, name: str) -> str | None:
    """`reporting.<name>` if dbt has built that mart in the warehouse, else None."""
    found = warehouse.query(
        "SELECT count(*) AS n FROM information_schema.tables "
        "WHERE table_schema = 'reporting' AND table_name = ?",
        [name],
    )
    return f"reporting.{name}" if int(found["n"].iloc[0]) else None


def mart_leaderboard(warehouse: Warehouse, round_number: int) -> pd.DataFrame | None:
    """The round's rows of the dbt mart `round_leaderboard` by payout (None: mart not built)."""
    mart = _mart(warehouse, "round_leaderboard")
    if mart is None:
        return None
    return warehouse.query(
        f"""
        SELECT model_id AS model, stake, corr, mmc, fnc_v3, tc, payout, tc_rank, payout_rank
        FROM {mart} WHERE round = ? ORDER BY payout_rank, model_id
        """,
        [int(round_number)],
    )


def model_reputation(warehouse: Warehouse, round_number: int) -> pd.DataFrame | None:
    """The dbt mart `model_reputation` as of the round, by mean TC (None: mart not built)."""
    mart = _mart(warehouse, "model_reputation")
    if mart is None:
        return None
    return warehouse.query(
        f"""
        SELECT model_id AS model, window_rounds AS rounds, corr_mean, tc_mean, fnc_v3_mean,
               payout_return_mean, tc_rounds, payout_rounds
        FROM {mart} WHERE round = ? ORDER BY tc_rank, model_id
        """,
        [int(round_number)],
    )


def proxy_importance(warehouse: Warehouse, window_end: int) -> tuple[pd.DataFrame, pd.Series]:
    """The TC proxy's terms (by importance) and fit of the window ending at `window_end`."""
    terms = warehouse.query(
        "SELECT term, importance, share, monotonicity FROM tc_proxy_importance "
        "WHERE window_end = ? ORDER BY rank",
        [int(window_end)],
    )
    fit = warehouse.query("SELECT * FROM tc_proxy_fit WHERE window_end = ?", [int(window_end)])
    return terms, fit.iloc[0]


def tc_attribution_report(warehouse: Warehouse, round_number: int, n: int = 5) -> pd.DataFrame:
    """Why TC is what it is: the n models with the highest CORR and the n with the highest TC,
    each model's raw signal split into what reaches the portfolio, what the exposure limits and
    budget rows remove, and what sits on positions at a bound (`tc_attribution`)."""
    return warehouse.query(
        """
        WITH parts AS (
            SELECT a.model_id AS model, m.corr, m.max_feature_exposure AS max_exposure, a.tc,
                   a.total, a.reaches, a.exposure_budget, a.bounds,
                   row_number() OVER (ORDER BY m.corr DESC) AS corr_rank,
                   row_number() OVER (ORDER BY a.tc DESC) AS tc_rank
            FROM tc_attribution a JOIN model_metrics m USING (round, model_id)
            WHERE a.round = ?
        )
        SELECT * EXCLUDE (corr_rank, tc_rank), corr_rank, tc_rank FROM parts
        WHERE corr_rank <= ? OR tc_rank <= ? ORDER BY corr DESC
        """,
        [int(round_number), n, n],
    )


def print_demo_report(warehouse_path: str, rounds: Sequence[int]) -> None:
    """Print what a newcomer should see after the demo."""
    wh = Warehouse(warehouse_path)
    summary = round_summary(wh, rounds)
    if summary.empty:
        print("nothing was written to the warehouse")
        return
    print("Rounds")
    print(summary.to_string(index=False))
    last = int(summary["round"].max())
    rej = rejections(wh, last)
    print(f"\nRejected submissions of round {last}")
    print(rej.to_string(index=False, max_colwidth=70) if len(rej) else "(none)")
    paid = [r for r in wh.partitions("payouts") if r in set(rounds)]
    if not paid:
        return
    fmt = {"float_format": lambda v: f"{v:,.4f}", "index": False}
    board = mart_leaderboard(wh, max(paid))
    if board is None:  # the dbt reporting step has not run on this warehouse
        board = leaderboard(wh, max(paid))
        print(f"\nLeaderboard of round {max(paid)} (classic payouts, largest first)")
        print(board.to_string(**fmt))
        return
    print(
        f"\nLeaderboard of round {max(paid)} (dbt mart reporting.round_leaderboard, largest "
        "payout first; ranks by tc and by payout)"
    )
    print(board.to_string(**fmt))
    parts = tc_attribution_report(wh, max(paid))
    if len(parts):
        print(
            f"\nWhy TC is what it is, round {max(paid)} (table tc_attribution: each model's raw "
            "signal = reaches + exposure_budget + bounds, tc = reaches - c; the top 5 by corr "
            "and by tc)"
        )
        print(parts.to_string(**fmt))
    reputation = model_reputation(wh, max(paid))
    if reputation is not None and len(reputation):
        shown = 20
        print(
            f"\nModel reputation as of round {max(paid)} (dbt mart reporting.model_reputation: "
            f"means over the last {int(reputation['rounds'].max())} resolved rounds, best mean "
            f"tc first{f'; top {shown} of {len(reputation)}' if len(reputation) > shown else ''})"
        )
        print(reputation.head(shown).to_string(**fmt))
    windows = [r for r in wh.partitions("tc_proxy_fit") if r in set(rounds)]
    if windows:
        terms, fit = proxy_importance(wh, max(windows))
        print(
            f"\nWhat explains TC (EBM over rounds {int(fit['first_round'])}-{max(windows)}, "
            f"{int(fit['rows'])} model-rounds; held-out R^2 {fit['held_out_r2']:.3f} on the last "
            f"{int(fit['held_out_rounds'])} rounds; monotonicity = Spearman of the shape "
            "function against its input)"
        )
        print(terms.to_string(**fmt))
        print(f"plots: {fit['importance_plot']}\n       {fit['shapes_plot']}")
