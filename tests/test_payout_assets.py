"""Payout assets on generated rounds: the real Definitions, Dagster runs, DuckDB and the numbers
checked against independent SQL definitions over the warehouse tables."""

import base64

import dagster as dg
import numpy as np
import pandas as pd
import pytest

from tc_assets.defs.definitions import INGEST_ROUND_JOB
from tc_assets.defs.partitions import ROUNDS_PARTITIONS_NAME
from tc_assets.defs.payouts import CLIP_CHECK, PORTFOLIO_CLIP_CHECK
from tc_assets.io.warehouse import Warehouse
from tc_assets.reports import leaderboard, print_demo_report
from tests.conftest import SMALL, make_source, platform, run_job

ROUNDS = (1, 2)
# Two rounds are enough for a Sharpe ratio per model in this test.
RUN_CONFIG = {"ops": {"sharpe_contribution": {"config": {"min_rounds": 2}}}}


PAYOUT_ASSETS = ("payouts", "portfolio_scores", "sharpe_contribution")


def run_payouts(defs: dg.Definitions, instance, r: int) -> dg.ExecuteInProcessResult:
    """Materialize the payout assets of round r with everything upstream of them (and checks)."""
    key = str(r)
    if not instance.has_dynamic_partition(ROUNDS_PARTITIONS_NAME, key):
        instance.add_dynamic_partitions(ROUNDS_PARTITIONS_NAME, [key])
    selection = dg.AssetSelection.assets(*PAYOUT_ASSETS).upstream()
    return defs.resolve_implicit_global_asset_job_def().execute_in_process(
        instance=instance,
        partition_key=key,
        asset_selection=list(selection.resolve(defs.resolve_asset_graph())),
        run_config=RUN_CONFIG,
        raise_on_error=False,
    )


@pytest.fixture(scope="module")
def scored(tmp_path_factory, small_source):
    """Rounds 1-2 of the small source scored up to the payout assets, once for the module."""
    defs, paths = platform(small_source, tmp_path_factory.mktemp("payouts"))
    with dg.instance_for_test() as instance:
        results = {r: run_payouts(defs, instance, r) for r in ROUNDS}
        yield paths, instance, results


def _materialization(instance, key: str, round_number: int) -> dict:
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(key), asset_partitions=[str(round_number)]),
        limit=1,
    ).records
    assert records, f"{key} was not materialized for round {round_number}"
    return records[0].asset_materialization.metadata


def _first_column(table: dg.TableMetadataValue) -> list[str]:
    """The model_id of each row of a metadata table."""
    return [row.data["model_id"] for row in table.records]


def test_payouts_metadata_and_clip_check(scored):
    paths, instance, results = scored
    wh = Warehouse(paths.warehouse)
    for r in ROUNDS:
        assert results[r].success
        table = wh.read_round("payouts", r)
        md = _materialization(instance, "payouts", r)
        assert md["total_payout"].value == pytest.approx(
            table["payout"].sum(), rel=1e-5
        )  # shown to 6 digits
        assert md["models_paid"].value == int((table["stake"] > 0).sum()) > 10
        gains = md["largest_gains"]
        losses = md["largest_losses"]
        best = table.loc[table["payout"].idxmax(), "model_id"]
        worst = table.loc[table["payout"].idxmin(), "model_id"]
        assert best == _first_column(gains)[0] and worst == _first_column(losses)[0]
        paid = table.set_index("model_id")["payout"]
        assert all(paid[m] > 0 for m in _first_column(gains))
        assert all(paid[m] < 0 for m in _first_column(losses))
        for name in (CLIP_CHECK, PORTFOLIO_CLIP_CHECK):
            checks = [e for e in results[r].get_asset_check_evaluations() if e.check_name == name]
            assert len(checks) == 1 and checks[0].passed, name
        clip = wh.query("SELECT clip FROM rounds WHERE round = ?", [r])["clip"].iloc[0]
        assert (table["payout"].abs() <= clip * table["stake"] * (1 + 1e-12)).all()


def test_payouts_equal_an_independent_sql_definition(scored):
    paths, _, _ = scored
    wh = Warehouse(paths.warehouse)
    for r in ROUNDS:
        want = wh.query(
            """
            WITH s AS (SELECT * FROM stakes WHERE round = $r),
            f AS (
                SELECT least(1.0, (SELECT stake_threshold FROM rounds WHERE round = $r)
                                  / (SELECT sum(stake) FROM s WHERE submitted)) AS factor,
                       (SELECT clip FROM rounds WHERE round = $r) AS clip
            )
            SELECT s.model_id,
                   s.stake * greatest(-f.clip, least(f.clip, f.factor
                       * (s.corr_multiplier * m.corr + s.tc_multiplier * t.tc))) AS payout
            FROM s
            JOIN submissions u ON u.round = s.round AND u.model_id = s.model_id
                               AND u.kind = 'prediction'
            JOIN model_metrics m ON m.round = s.round AND m.model_id = s.model_id
            JOIN tc_scores t ON t.round = s.round AND t.model_id = s.model_id
            CROSS JOIN f
            ORDER BY s.model_id
            """.replace("$r", str(r))
        )
        got = wh.read_round("payouts", r).sort_values("model_id").reset_index(drop=True)
        assert list(got["model_id"]) == list(want["model_id"])
        np.testing.assert_allclose(got["payout"], want["payout"], rtol=1e-12, atol=1e-9)

        stakes = wh.read_round("stakes", r).set_index("model_id")
        summary = wh.read_round("payout_summary", r).iloc[0]
        not_submitted = stakes.index[~stakes["submitted"]]
        assert len(not_submitted) > 0  # absent models and bad inputs
        assert summary["no_valid_submission"] == len(not_submitted)
        assert not set(not_submitted) & set(got["model_id"])
        zero = got[got["stake"] == 0]
        assert len(zero) and (zero["payout"] == 0).all()  # zero stakes pay zero


def test_portfolio_scores_on_a_generated_round(scored, small_source):
    paths, instance, _ = scored
    wh = Warehouse(paths.warehouse)
    r = 2
    table = wh.read_round("portfolio_scores", r).set_index("model_id")
    accepted = wh.read_round("submissions", r).query("kind == 'portfolio'")["model_id"]
    assert sorted(table.index) == sorted(accepted) and len(table) >= 3

    # Invalid portfolio files were rejected with their reasons; the rest of the round is scored.
    planted = pd.read_csv(small_source / "rounds" / str(r) / "planted.csv", dtype=str).fillna("")
    bad = planted[(planted["kind"] == "bad_input") & (planted["submits"] == "portfolio")]
    rejections = wh.read_round("submission_rejections", r).query("kind == 'portfolio'")
    assert set(bad["model_id"]) == set(rejections["model_id"])
    assert (rejections["reason"].str.len() > 10).all()
    assert not set(bad["model_id"]) & set(table.index)

    # PB, PR, MB, MR from the warehouse tables, b = target - mean(target).
    want = wh.query(
        f"""
        WITH res AS (SELECT * FROM resolved WHERE round = {r}),
        k AS (SELECT avg(target) mt FROM res),
        b AS (SELECT id, target - k.mt AS b, "return" AS r FROM res CROSS JOIN k),
        meta AS (SELECT sum(m.weight * b.b) mb, sum(m.weight * b.r) mr
                 FROM meta_model m JOIN b USING (id) WHERE m.round = {r})
        SELECT p.model_id, sum(p.weight * b.b) pb, sum(p.weight * b.r) pr,
               any_value(meta.mb) mb, any_value(meta.mr) mr
        FROM portfolios p JOIN b USING (id) CROSS JOIN meta
        WHERE p.round = {r} GROUP BY p.model_id
        """
    ).set_index("model_id")
    for col in ("pb", "pr", "mb", "mr"):
        np.testing.assert_allclose(table[col], want.loc[table.index, col], rtol=1e-9, atol=1e-12)
    clip = wh.query(f"SELECT clip FROM rounds WHERE round = {r}")["clip"].iloc[0]
    assert (table["payout"].abs() <= clip * table["stake"] * (1 + 1e-12)).all()
    up = table["mr"] >= 0
    gain = table["marginal_return"] > 0
    expected = np.where(
        up, np.where(gain, "A", "B"), np.where(table["marginal_return"] >= 0, "C", "D")
    )
    assert list(table["scenario"]) == list(expected)
    assert (table["meta_loss_basis"] == "mr").all()
    assert (table["meta_lost"] == (table["mr"] < 0)).all()

    # The concentrated bet on illiquid names costs the most (its capacity also depends on PR).
    positions = wh.query(
        f"SELECT model_id, count(*) n FROM portfolios WHERE round = {r} GROUP BY model_id"
    ).set_index("model_id")["n"]
    concentrated = positions.idxmin()
    assert table["transaction_cost"].idxmax() == concentrated

    md = _materialization(instance, "portfolio_scores", r)
    png = paths.warehouse.rsplit("/", 1)[0] + f"/capacity_curves/round_{r}.png"
    assert md["capacity_plot_path"].value == png
    with open(png, "rb") as fh:
        data = fh.read()
    assert data.startswith(b"\x89PNG")
    assert base64.b64encode(data).decode() in md["capacity_plot"].value
    assert md["models_scored"].value == len(table)
    assert md["models_rejected"].value == len(bad)
    curves = wh.read_round("capacity_curves", r)
    assert set(curves["model_id"]) == set(table.index)


def test_sharpe_contribution_over_the_window(scored):
    paths, _, _ = scored
    wh = Warehouse(paths.warehouse)
    out = wh.read_round("sharpe_contribution", 2).set_index("model_id")
    meta = wh.query("SELECT round, net_return FROM meta_portfolio_returns ORDER BY round")
    assert list(meta["round"]) == list(ROUNDS)
    scores = wh.query("SELECT round, model_id, marginal_return FROM portfolio_scores")
    delta = scores.pivot(index="round", columns="model_id", values="marginal_return")
    assert sorted(out.index) == sorted(wh.read_round("portfolio_scores", 2)["model_id"])
    m = meta["net_return"].to_numpy()
    for model, row in out.iterrows():
        blend = m + delta[model].reindex(meta["round"]).fillna(0.0).to_numpy()
        assert row["window_rounds"] == 2
        assert row["meta_sharpe"] == pytest.approx(m.mean() / m.std(ddof=1))
        if row["rounds_submitted"] == 2:
            assert row["blended_sharpe"] == pytest.approx(blend.mean() / blend.std(ddof=1))
            assert row["sharpe_contribution"] == pytest.approx(
                row["blended_sharpe"] - row["meta_sharpe"]
            )


def test_demo_report_prints_the_leaderboard(scored, capsys):
    paths, _, _ = scored
    wh = Warehouse(paths.warehouse)
    board = leaderboard(wh, 2)
    assert list(board.columns) == ["model", "stake", "corr", "tc", "fnc_v3", "payout"]
    assert board["payout"].is_monotonic_decreasing
    assert len(board) == len(wh.read_round("payouts", 2))
    assert board["fnc_v3"].notna().all()
    print_demo_report(paths.warehouse, list(ROUNDS))
    out = capsys.readouterr().out
    assert "Leaderboard of round 2" in out
    assert board["model"].iloc[0] in out.split("Leaderboard of round 2")[1].splitlines()[2]


def test_payout_assets_wait_for_resolution(tmp_path, instance, value_store):
    settings = SMALL.model_copy(update={"write_resolved": False})
    source = make_source(tmp_path / "source", [1], settings)
    defs, paths = platform(source, tmp_path, value_store)
    result = run_payouts(defs, instance, 1)
    assert result.success  # skipped, not failed
    done = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    assert "round_inputs" not in done and "stakes" in done  # the round was ingested
    assert not done & {"payouts", "portfolio_scores", "sharpe_contribution"}
    assert Warehouse(paths.warehouse).read_round("payouts", 1).empty


def test_configured_multiplier_elections_are_enforced_at_ingestion(
    fresh_source, tmp_path, instance
):
    defs, paths = platform(fresh_source, tmp_path)
    assert run_job(defs, instance, 1, INGEST_ROUND_JOB).success  # the default sets accept all
    stakes = pd.read_csv(fresh_source / "rounds/1/stakes.csv", dtype={"model_id": str})
    config = {"ops": {"round_inputs": {"config": {"allowed_corr_multipliers": [0.0, 1.0]}}}}
    result = defs.resolve_job_def(INGEST_ROUND_JOB).execute_in_process(
        instance=instance, partition_key="1", run_config=config, raise_on_error=False
    )
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE)
    message = failure.event_specific_data.error.message
    outside = stakes.index[~stakes["corr_multiplier"].isin([0.0, 1.0])]
    assert len(outside) > 0
    for i in outside:  # each bad row named by its line in the file (header = line 1)
        value = stakes.loc[i, "corr_multiplier"]
        assert f"line {i + 2}: corr_multiplier {value:g} is not an allowed election" in message
    assert f"{len(outside)} bad row(s)" in message


def _pb_by_sql(wh: Warehouse, r: int) -> pd.Series:
    """w . target per portfolio, straight from the warehouse (no centring, no returns)."""
    return wh.query(
        f"""
        SELECT p.model_id, sum(p.weight * v.target) AS pb
        FROM portfolios p JOIN resolved v ON v.round = p.round AND v.id = p.id
        WHERE p.round = {r} GROUP BY p.model_id
        """
    ).set_index("model_id")["pb"]


BUCKETED = ["pb", "mb", "meta_lost", "transaction_cost", "pp", "payout"]


def test_bucketed_payouts_do_not_depend_on_the_returns(scored, tmp_path, instance):
    """Round 2 again with every return multiplied by 10: PB = w . target to 1e-12 and no
    bucketed payout moves; PR and MR scale by 10."""
    paths, _, _ = scored
    r = 2
    source = make_source(tmp_path / "source", [r])  # a round depends only on its settings
    resolved = tmp_path / "source" / "rounds" / str(r) / "resolved.parquet"
    frame = pd.read_parquet(resolved)
    frame["return"] *= 10
    frame.to_parquet(resolved)
    defs, scaled_paths = platform(source, tmp_path)
    assert run_payouts(defs, instance, r).success

    before = Warehouse(paths.warehouse).read_round("portfolio_scores", r).set_index("model_id")
    wh = Warehouse(scaled_paths.warehouse)
    after = wh.read_round("portfolio_scores", r).set_index("model_id")
    assert sorted(after.index) == sorted(before.index) and len(after) >= 3
    np.testing.assert_allclose(after["pb"], _pb_by_sql(wh, r).loc[after.index], rtol=0, atol=1e-12)
    for col in BUCKETED:
        np.testing.assert_allclose(
            after[col].astype(float), before.loc[after.index, col].astype(float), rtol=0, atol=1e-12
        )
    np.testing.assert_allclose(after["pr"], 10 * before.loc[after.index, "pr"], rtol=1e-12)
    np.testing.assert_allclose(after["mr"], 10 * before.loc[after.index, "mr"], rtol=1e-12)
    classic = Warehouse(paths.warehouse).read_round("payouts", r).set_index("model_id")
    classic_after = wh.read_round("payouts", r).set_index("model_id")
    np.testing.assert_allclose(
        classic_after["payout"], classic.loc[classic_after.index, "payout"], rtol=0, atol=1e-9
    )


def _log_messages(instance, run_id: str) -> list[str]:
    return [e.user_message for e in instance.all_logs(run_id) if e.user_message]


def test_a_round_resolved_with_targets_only_is_scored_and_paid(tmp_path, instance):
    """resolved.parquet with only id, target: the score_round job scores and pays the round in
    bucket space, skips what needs returns and says why; TC on 'return' fails clearly."""
    r = 1
    source = make_source(tmp_path / "source", [r])
    resolved = tmp_path / "source" / "rounds" / str(r) / "resolved.parquet"
    pd.read_parquet(resolved)[["id", "target"]].to_parquet(resolved)
    defs, paths = platform(source, tmp_path)
    result = run_job(defs, instance, r)
    assert result.success
    wh = Warehouse(paths.warehouse)

    res = wh.read_round("resolved", r)
    assert len(res) > 0 and res["return"].isna().all() and res["target"].notna().all()
    assert len(wh.read_round("tc_scores", r)) > 10
    assert len(wh.read_round("payouts", r)) > 10  # classic payouts: corr and TC on the target

    table = wh.read_round("portfolio_scores", r).set_index("model_id")
    assert len(table) >= 3
    np.testing.assert_allclose(table["pb"], _pb_by_sql(wh, r).loc[table.index], rtol=0, atol=1e-12)
    assert (table["meta_loss_basis"] == "mb").all()
    assert (table["meta_lost"] == (table["mb"] < 0)).all()
    amplify = np.where(table["meta_lost"], 2.0, 1.0)  # default c_b
    np.testing.assert_allclose(
        table["pp"], amplify * (table["pb"] - table["transaction_cost"]) / 1.0, rtol=1e-12
    )
    assert table["payout"].notna().all() and (table["payout"] != 0).any()
    for col in ("pr", "mr", "pp_raw", "marginal_return", "scenario", "capacity_usd"):
        assert table[col].isna().all(), col
    assert wh.read_round("capacity_curves", r).empty
    meta = wh.read_round("meta_portfolio_returns", r).iloc[0]
    assert meta["meta_loss_basis"] == "mb" and pd.isna(meta["net_return"])
    assert meta["bucket_per_return"] == 10.0
    board = wh.query(f"SELECT * FROM reporting.portfolio_leaderboard WHERE round = {r}")
    assert len(board) == len(table) and (board["meta_loss_basis"] == "mb").all()

    logs = " ".join(_log_messages(instance, result.run_id))
    assert "resolved.parquet has targets only (no return column)" in logs
    assert "capacity curves need realized returns and are skipped" in logs
    assert "realized_R_return is skipped" in logs
    md = _materialization(instance, "portfolio_scores", r)
    assert md["meta_loss_basis"].value == "mb"
    assert "skipped" in md["capacity_curves"].value
    assert "capacity_plot" not in md
    assert _materialization(instance, "resolved", r)["has_returns"].value is False

    # TC configured on the realized return cannot be computed without returns: a clear failure.
    tc_on_return = defs.resolve_implicit_global_asset_job_def().execute_in_process(
        instance=instance,
        partition_key=str(r),
        asset_selection=[dg.AssetKey("tc_scores")],
        run_config={"ops": {"tc_scores": {"config": {"target_column": "return"}}}},
        raise_on_error=False,
    )
    assert not tc_on_return.success
    failure = next(
        e for e in tc_on_return.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE
    )
    message = failure.event_specific_data.error.message
    assert "target_column 'return'" in message and "no 'return' column" in message
