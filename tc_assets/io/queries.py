"""Named warehouse queries that the assets read (SQL lives here, not in asset bodies)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pandas as pd

from tc_assets.io.warehouse import Warehouse


def submitted_models(wh: Warehouse, r: int) -> tuple[pd.Index, pd.Index]:
    """(prediction models, portfolio models) with a valid submission in round r, sorted."""
    sub = wh.read_round("submissions", r)
    models = sub.groupby("kind")["model_id"].agg(sorted)
    predicted, portfolios = (
        pd.Index(models.get(kind, []), dtype=object) for kind in ("prediction", "portfolio")
    )
    return predicted, portfolios


def rejections(wh: Warehouse, r: int, kind: str) -> pd.DataFrame:
    """model_id, rule, reason of round r's rejected submissions of `kind`."""
    rejected = wh.read_round("submission_rejections", r)
    return rejected[rejected["kind"] == kind][["model_id", "rule", "reason"]]


def meta_returns_window(wh: Warehouse, r: int, window_rounds: int) -> pd.Series:
    """The meta portfolio's net return of the last `window_rounds` rounds <= r that have one
    (rounds resolved without returns have none), by round, newest first."""
    return wh.query(
        "SELECT round, net_return FROM meta_portfolio_returns "
        "WHERE round <= ? AND net_return IS NOT NULL ORDER BY round DESC LIMIT ?",
        [r, window_rounds],
    ).set_index("round")["net_return"]


def marginal_returns(wh: Warehouse, first: int, last: int) -> pd.DataFrame:
    """Each portfolio model's marginal return in each round from `first` to `last` (rounds x
    models)."""
    return wh.query(
        "SELECT round, model_id, marginal_return FROM portfolio_scores WHERE round BETWEEN ? AND ?",
        [first, last],
    ).pivot(index="round", columns="model_id", values="marginal_return")


def metrics_with_tc(
    wh: Warehouse, window_end: int, window_rounds: int, metrics: Sequence[str]
) -> pd.DataFrame:
    """model_metrics joined with tc_scores: every row of the last `window_rounds` rounds
    <= `window_end` that have a model with tc and every one of `metrics` finite (empty before
    either table exists)."""
    columns = ["round", "model_id", "tc", *metrics]
    if not {"model_metrics", "tc_scores"} <= set(wh.table_names()):
        return pd.DataFrame(columns=columns)
    selected = ", ".join(f"m.{c}" for c in metrics)
    complete = " AND ".join(f"isfinite({c})" for c in ("tc", *metrics))
    return wh.query(
        f"""
        WITH joined AS (
            SELECT m.round, m.model_id, t.tc, {selected}
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


def relation_round_counts(wh: Warehouse, relations: Mapping[str, str], r: int) -> pd.Series:
    """Rows of round r in each relation (`schema.name`, quoted), by the caller's key."""
    sql = " union all ".join(
        f"select '{key}' as key, count(*) as n from {rel} where round = {int(r)}"
        for key, rel in relations.items()
    )
    return wh.query(sql).set_index("key")["n"]


def relation_top(wh: Warehouse, relation: str, columns: str, rank: str, r: int) -> pd.DataFrame:
    """The first 10 rows of round r of a ranked relation (`columns`, ordered by `rank`)."""
    return wh.query(
        f"select {columns} from {relation} where round = {int(r)} "
        f"order by {rank}, model_id limit 10"
    )


def relation_round(wh: Warehouse, relation: str, r: int) -> pd.DataFrame:
    """Every row of round r of a relation."""
    return wh.query(f"select * from {relation} where round = {int(r)}")
