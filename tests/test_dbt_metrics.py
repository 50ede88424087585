"""The dbt reporting project on generated rounds: real `score_round` runs (dbt included), real
dbt builds by hand as an analyst runs them, and the marts checked against pandas definitions
over the warehouse tables.

dbt starts slowly (seconds per invocation), so the module scores two rounds once and each
hand-run test works on its own copy of that warehouse.
"""

import json
import os
import shutil
import subprocess
from pathlib import Path

import dagster as dg
import duckdb
import numpy as np
import pandas as pd
import pytest

from tc_assets.defs import reporting
from tc_assets.defs.definitions import SCORE_ROUND_JOB
from tc_assets.io.tables import TABLES
from tests.conftest import platform, run_job

ROUNDS = (1, 2)
MARTS = ("round_leaderboard", "model_reputation", "round_summary", "portfolio_leaderboard")
MART_KEYS = {m: dg.AssetKey(["reporting", m]) for m in MARTS}
# The Python assets a round's dbt build reads from, through the dbt sources.
PYTHON_UPSTREAM = (
    "round_inputs",
    "resolved",
    "model_metrics",
    "tc_scores",
    "payouts",
    "portfolio_scores",
    "sharpe_contribution",
)


@pytest.fixture(scope="module")
def scored(tmp_path_factory, small_source):
    """Rounds 1-2 through the real score_round job (Python assets, then dbt), once."""
    defs, paths = platform(small_source, tmp_path_factory.mktemp("dbt_metrics"))
    with dg.instance_for_test() as instance:
        results = {r: run_job(defs, instance, r) for r in ROUNDS}
        yield defs, paths, instance, results


def read(warehouse: str | Path, sql: str) -> pd.DataFrame:
    with duckdb.connect(str(warehouse), read_only=True) as con:
        return con.execute(sql).df()


def mart(warehouse: str | Path, name: str) -> pd.DataFrame:
    """A mart sorted by its key, for exact comparisons."""
    key = "round" if name == "round_summary" else "round, model_id"
    return read(warehouse, f"select * from reporting.{name} order by {key}")


def round_rows(frame: pd.DataFrame, r: int) -> pd.DataFrame:
    """One round's rows of a mart, re-indexed from 0 (for comparisons across builds)."""
    return frame[frame["round"] == r].reset_index(drop=True)


def copy_warehouse(src: str, dst_dir: Path) -> Path:
    """A copy under the same file name: dbt's views name the file's catalog (its stem)."""
    dst = dst_dir / "copy" / Path(src).name
    dst.parent.mkdir()
    shutil.copy(src, dst)
    if Path(src + ".wal").exists():
        shutil.copy(src + ".wal", str(dst) + ".wal")
    return dst


def dbt(warehouse: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict[str, str]]:
    """Run dbt by hand as an analyst would (`cd dbt_metrics && dbt ...`) on `warehouse`;
    returns the process and each node's status (run_results.json, or sources.json for
    freshness). Artifacts go beside the warehouse, leaving the project's manifest alone."""
    target = warehouse.parent / "dbt_target"
    proc = subprocess.run(
        [reporting.dbt_executable(), *args, "--target-path", str(target)],
        cwd=reporting.DBT_PROJECT_DIR,
        env={**os.environ, reporting.WAREHOUSE_ENV: str(warehouse), "DBT_LOG_PATH": str(target)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    artifact = target / (
        "sources.json" if args[:2] == ("source", "freshness") else "run_results.json"
    )
    results = json.loads(artifact.read_text())["results"]
    return proc, {r["unique_id"]: r["status"] for r in results}


# --- the Dagster graph ----------------------------------------------------------------------


def test_dbt_assets_sit_downstream_of_the_python_assets(scored):
    defs, _, _, _ = scored
    graph = defs.resolve_asset_graph()
    dbt_def = defs.resolve_assets_def(MART_KEYS["round_leaderboard"])
    keys = set(dbt_def.keys)
    assert set(MART_KEYS.values()) <= keys
    assert {k.path[0] for k in keys} == {"reporting", "staging"}
    assert {dbt_def.specs_by_key[k].group_name for k in keys} == {reporting.GROUP}
    assert dbt_def.partitions_def == defs.resolve_assets_def("payouts").partitions_def
    assert dbt_def.op.pool == "duckdb_writers"
    # Every dbt source is keyed as a Python asset that the Definitions materialize.
    upstream = dbt_def.dependency_keys - keys
    assert upstream >= {dg.AssetKey(k) for k in ("payouts", "tc_scores", "model_metrics")}
    assert all(graph.get(k).is_materializable for k in upstream)
    stg_payouts = graph.get(dg.AssetKey(["staging", "stg_payouts"]))
    assert stg_payouts.parent_keys == {dg.AssetKey("payouts")}
    assert stg_payouts.key in graph.get(MART_KEYS["round_leaderboard"]).parent_keys
    # The round job runs them with the Python assets.
    job_keys = defs.resolve_job_def(SCORE_ROUND_JOB).asset_layer.selected_asset_keys
    assert keys <= job_keys


def test_no_dbt_relation_shadows_a_platform_table():
    """Warehouse._ensure looks columns up by table name in any schema: names must differ."""
    manifest = json.loads(reporting.dbt_project.manifest_path.read_text())
    models = {n["alias"] for n in manifest["nodes"].values() if n["resource_type"] == "model"}
    assert models and not models & set(TABLES)
    sources = {s["name"] for s in manifest["sources"].values()}
    assert sources <= set(TABLES)


def test_the_manifest_is_parsed_on_demand_per_version_of_the_project(tmp_path, monkeypatch):
    """A missing manifest is parsed into the cache; an edited project gets a new folder; a
    project dbt cannot parse is a clear error naming it."""
    monkeypatch.setenv(reporting.DBT_CACHE_ENV, str(tmp_path / "cache"))
    project_dir = tmp_path / "dbt_metrics"
    shutil.copytree(reporting.DBT_PROJECT_DIR, project_dir, ignore=shutil.ignore_patterns("target"))

    def project() -> reporting.DbtProject:
        return reporting.DbtProject(
            project_dir=project_dir,
            profiles_dir=project_dir,
            target_path=reporting.manifest_dir(project_dir),
        )

    first = project()
    assert first.manifest_path.is_relative_to(tmp_path / "cache")
    assert not first.manifest_path.exists()
    assert json.loads(reporting.prepare_manifest(first).read_text())["nodes"]
    assert sorted(p.name for p in first.manifest_path.parent.iterdir()) == ["manifest.json"]
    (project_dir / "models" / "sources.yml").write_text("version: 2\nsources: [oops\n")
    broken = project()
    assert broken.manifest_path != first.manifest_path
    with pytest.raises(reporting.ReportingSetupError, match="dbt parse of .* failed"):
        reporting.prepare_manifest(broken)


def test_a_source_without_an_asset_key_is_refused():
    props = {"resource_type": "source", "source_name": "warehouse", "name": "x", "config": {}}
    with pytest.raises(reporting.ReportingSetupError, match="warehouse.x"):
        reporting.ReportingTranslator().get_asset_key(props)


# --- one Dagster run per round ----------------------------------------------------------------


def test_round_run_builds_the_marts_after_the_python_assets(scored):
    defs, paths, instance, results = scored
    for r, result in results.items():
        assert result.success, r
        # In this same run, each Python step succeeded before the dbt step started.
        at = {(e.event_type, e.step_key): i for i, e in enumerate(result.all_events)}
        dbt_start = at[(dg.DagsterEventType.STEP_START, "dbt_metrics")]
        for step in PYTHON_UPSTREAM:
            assert at[(dg.DagsterEventType.STEP_SUCCESS, step)] < dbt_start, step
        materialized = {
            e.asset_key: e.step_materialization_data.materialization
            for e in result.get_asset_materialization_events()
        }
        for key in MART_KEYS.values():
            assert key in materialized and materialized[key].partition == str(r), key
        rows = materialized[MART_KEYS["round_leaderboard"]].metadata["round_rows"].value
        assert rows == len(read(paths.warehouse, f"select * from payouts where round = {r}"))
        summary = materialized[MART_KEYS["round_summary"]].metadata
        assert summary["round_rows"].value == 1 and summary["is_resolved"].value is True
        # Every dbt test ran as an asset check, and passed: tests on models as checks of the
        # models, tests on sources as checks of the Python assets that write them.
        checks = result.get_asset_check_evaluations()
        dbt_checks = [
            c
            for c in checks
            if c.asset_key.path[0] in ("reporting", "staging") or c.check_name.startswith("source_")
        ]
        assert any(c.asset_key == dg.AssetKey("payouts") for c in dbt_checks)
        expected = defs.resolve_assets_def(MART_KEYS["round_leaderboard"]).check_keys
        assert {c.asset_check_key for c in dbt_checks} == set(expected)
        assert all(c.passed for c in dbt_checks)


# --- the marts against independent definitions ------------------------------------------------


def test_round_leaderboard(scored):
    _, paths, _, _ = scored
    wh = paths.warehouse
    board = mart(wh, "round_leaderboard")
    p = read(wh, "select * from payouts order by round, model_id")
    m = read(wh, "select round, model_id, mmc, fnc_v3 from model_metrics")
    expected = p.merge(m, on=["round", "model_id"], how="left")
    assert len(board) == len(p) and sorted(board["round"].unique()) == list(ROUNDS)
    for col in ("stake", "corr", "tc", "mmc", "fnc_v3", "payout"):
        np.testing.assert_allclose(board[col], expected[col], rtol=1e-12, err_msg=col)
    staked = expected["stake"] > 0
    np.testing.assert_allclose(
        board.loc[staked, "payout_return"], (expected["payout"] / expected["stake"])[staked]
    )
    assert board.loc[~staked, "payout_return"].isna().all()
    by_round = expected.groupby("round")
    for col, rank in (("tc", "tc_rank"), ("payout", "payout_rank")):
        ranks = by_round[col].rank(method="min", ascending=False).astype(int)
        assert (board[rank].to_numpy() == ranks.to_numpy()).all(), rank
    clip = read(wh, "select clip from rounds")["clip"]
    assert (board["payout"].abs() <= clip.max() * board["stake"] * (1 + 1e-12)).all()


def test_round_summary(scored):
    _, paths, _, _ = scored
    wh = paths.warehouse
    s = mart(wh, "round_summary").set_index("round")
    for r in ROUNDS:
        row = s.loc[r]
        q = lambda sql, r=r: read(wh, sql.format(r=r))  # noqa: E731
        sub = q("select * from submissions where round = {r}")
        rej = q("select * from submission_rejections where round = {r}")
        stakes = q("select * from stakes where round = {r}")
        pay = q("select * from payouts where round = {r}")
        meta = q("select * from meta_portfolio_returns where round = {r}").iloc[0]
        factor = q("select payout_factor from payout_summary where round = {r}").iloc[0, 0]
        assert row["models_submitted"] == sub["model_id"].nunique()
        assert row["portfolio_submissions"] == (sub["kind"] == "portfolio").sum()
        assert row["models_rejected"] == rej["model_id"].nunique() > 0
        assert row["models_staked"] == (stakes["stake"] > 0).sum()
        assert row["total_stake"] == pytest.approx(stakes["stake"].sum())
        assert row["total_payout"] == pytest.approx(pay["payout"].sum())
        assert row["payout_factor"] == pytest.approx(factor)
        assert row["meta_return"] == pytest.approx(meta["mr"])
        assert row["meta_net_return"] == pytest.approx(meta["net_return"])
        scores = q("select model_id, tc from tc_scores where round = {r}").merge(
            q("select model_id, corr, fnc_v3, mmc from model_metrics where round = {r}")
        )
        assert row["models_scored"] == len(scores)
        for metric in ("corr", "fnc_v3", "mmc"):
            expected = np.corrcoef(scores["tc"], scores[metric])[0, 1]
            assert row[f"tc_vs_{metric}"] == pytest.approx(expected, abs=1e-12), metric


def expected_reputation(wh: str, as_of: int, window: int) -> pd.DataFrame:
    """Means over the last `window` resolved rounds <= as_of, from the raw tables."""
    resolved = read(wh, f"select distinct round from resolved where round <= {as_of}")["round"]
    rounds = sorted(resolved)[-window:]
    keep = f"round in ({', '.join(map(str, rounds))})"
    m = read(wh, f"select round, model_id, corr, fnc_v3 from model_metrics where {keep}")
    t = read(wh, f"select round, model_id, tc from tc_scores where {keep}")
    p = read(
        wh, f"select round, model_id, payout / stake as ret from payouts where {keep} and stake > 0"
    )
    facts = m.merge(t, how="outer").merge(p, how="outer")
    g = facts.groupby("model_id")
    out = pd.DataFrame(
        {
            "corr_mean": g["corr"].mean(),
            "corr_rounds": g["corr"].count(),
            "tc_mean": g["tc"].mean(),
            "tc_rounds": g["tc"].count(),
            "fnc_v3_mean": g["fnc_v3"].mean(),
            "payout_return_mean": g["ret"].mean(),
            "payout_rounds": g["ret"].count(),
        }
    )
    return out.assign(window_rounds=len(rounds))


def check_reputation(wh: str | Path, window: int, rounds: tuple[int, ...] = ROUNDS) -> None:
    rep = mart(wh, "model_reputation").set_index(["round", "model_id"])
    for r in rounds:
        got = rep.loc[r]
        expected = expected_reputation(str(wh), r, window).loc[got.index]
        assert sorted(got.index) == sorted(expected_reputation(str(wh), r, window).index)
        for col in expected.columns:
            np.testing.assert_allclose(
                got[col].to_numpy(float), expected[col].to_numpy(float), rtol=1e-12, err_msg=col
            )


def test_model_reputation_default_window(scored):
    _, paths, _, _ = scored
    check_reputation(paths.warehouse, window=20)
    rep = mart(paths.warehouse, "model_reputation")
    assert set(rep.loc[rep["round"] == 2, "window_rounds"]) == {2}


def test_portfolio_leaderboard(scored):
    _, paths, _, _ = scored
    board = mart(paths.warehouse, "portfolio_leaderboard")
    p = read(paths.warehouse, "select * from portfolio_scores order by round, model_id")
    assert len(board) == len(p) > 0
    np.testing.assert_allclose(board["pp"], p["pp"])
    ranks = p.groupby("round")["pp"].rank(method="min", ascending=False).astype(int)
    assert (board["pp_rank"].to_numpy() == ranks.to_numpy()).all()
    sharpe = read(
        paths.warehouse, "select round, model_id, sharpe_contribution from sharpe_contribution"
    )
    joined = board[["round", "model_id"]].merge(sharpe, how="left")
    np.testing.assert_allclose(board["sharpe_contribution"], joined["sharpe_contribution"])


# --- dbt by hand: vars, full refresh, a failing test ------------------------------------------


def test_full_refresh_through_dagster_rebuilds_every_round(scored):
    """A run of round 1 with `full_refresh` rebuilds every round of every mart: rows of round 2
    deleted from each mart beforehand come back, identical to what they were."""
    defs, paths, instance, _ = scored
    before = {m: mart(paths.warehouse, m) for m in MARTS}
    with duckdb.connect(paths.warehouse) as con:
        for m in MARTS:
            con.execute(f"delete from reporting.{m} where round = 2")
    result = defs.resolve_job_def(SCORE_ROUND_JOB).execute_in_process(
        instance=instance,
        partition_key="1",
        asset_selection=list(defs.resolve_assets_def(MART_KEYS["round_summary"]).keys),
        run_config={"ops": {"dbt_metrics": {"config": {"full_refresh": True}}}},
        raise_on_error=False,
    )
    assert result.success
    assert {MART_KEYS[m] for m in MARTS} <= {
        e.asset_key for e in result.get_asset_materialization_events()
    }
    for m in MARTS:
        pd.testing.assert_frame_equal(mart(paths.warehouse, m), before[m])


def test_rerunning_a_round_rebuilds_exactly_that_round(scored, tmp_path):
    """`--vars '{round: 2}'` deletes and re-inserts round 2 of every mart: its rows follow the
    sources (and the reputation window var), round 1 stays as it was, and no leaderboard or
    summary gains or loses a row."""
    _, paths, _, _ = scored
    wh = copy_warehouse(paths.warehouse, tmp_path)
    before = {m: mart(wh, m) for m in MARTS}
    with duckdb.connect(str(wh)) as con:  # a new corr in both rounds; only round 2 is rebuilt
        con.execute("update payouts set corr = corr / 2")
    marts = "path:models/marts"
    proc, _ = dbt(wh, "build", "--select", marts, "--vars", "{round: 2, reputation_window: 1}")
    assert proc.returncode == 0, proc.stdout
    for m in MARTS:
        after = mart(wh, m)
        pd.testing.assert_frame_equal(round_rows(after, 1), round_rows(before[m], 1))
        if m != "model_reputation":  # whose round 2 now covers one round: checked below
            assert after.groupby("round").size().equals(before[m].groupby("round").size()), m
    board, old = mart(wh, "round_leaderboard"), before["round_leaderboard"]
    two = board["round"] == 2
    np.testing.assert_allclose(board.loc[two, "corr"], old.loc[two, "corr"] / 2, rtol=1e-12)
    pd.testing.assert_frame_equal(board.drop(columns="corr"), old.drop(columns="corr"))
    check_reputation(wh, window=1, rounds=(2,))
    rep = mart(wh, "model_reputation")
    assert set(rep.loc[rep["round"] == 2, "window_rounds"]) == {1}


def test_rebuilding_an_earlier_round_refreshes_later_reputations(scored, tmp_path):
    """Round 1's inputs change after round 2 was built (a late re-score, or rounds scored out
    of order): the run for round 1 rebuilds the reputation of round 2 too, whose window holds
    round 1, while the round-by-round marts of round 2 stay as they were."""
    _, paths, _, _ = scored
    wh = copy_warehouse(paths.warehouse, tmp_path)
    before = {m: mart(wh, m) for m in MARTS}
    with duckdb.connect(str(wh)) as con:
        con.execute("update tc_scores set tc = tc + 1 where round = 1")
    proc, _ = dbt(wh, "build", "--select", "path:models/marts", "--vars", "{round: 1}")
    assert proc.returncode == 0, proc.stdout
    check_reputation(wh, window=20)
    rep, old = (
        round_rows(mart(wh, "model_reputation"), 2),
        round_rows(before["model_reputation"], 2),
    )
    in_round_1 = rep["model_id"].isin(
        read(wh, "select model_id from tc_scores where round = 1")["model_id"]
    )
    changed = (rep["tc_mean"] - old["tc_mean"]).abs() > 1e-9
    assert in_round_1.any() and (changed == in_round_1).all()
    for m in ("round_leaderboard", "round_summary", "portfolio_leaderboard"):
        pd.testing.assert_frame_equal(round_rows(mart(wh, m), 2), round_rows(before[m], 2))


def test_a_payout_beyond_the_clip_fails_the_range_test(scored, tmp_path):
    _, paths, _, _ = scored
    wh = copy_warehouse(paths.warehouse, tmp_path)
    with duckdb.connect(str(wh)) as con:
        model = con.execute(
            "select model_id from payouts where round = 2 and stake > 0 order by model_id limit 1"
        ).fetchone()[0]
        con.execute(
            "update payouts set payout = 2 * stake * (select clip from rounds where round = 2) "
            "where round = 2 and model_id = ?",
            [model],
        )
    proc, status = dbt(wh, "build", "--select", "round_leaderboard", "--vars", "{round: 2}")
    assert proc.returncode != 0
    failed = {uid.split(".")[2] for uid, s in status.items() if s == "fail"}
    range_test = "accepted_range_round_leaderboard_payout"
    assert any(name.startswith(range_test) for name in failed), status
    # Nothing else broke but the round's total, which the planted payout also changes.
    assert {n for n in failed if not n.startswith(range_test)} <= {"round_total_payout"}
    assert all(s in ("success", "pass", "fail") for s in status.values()), status


def test_sources_are_fresh(scored, tmp_path):
    _, paths, _, _ = scored
    wh = copy_warehouse(paths.warehouse, tmp_path)
    proc, status = dbt(wh, "source", "freshness")
    assert proc.returncode == 0, proc.stdout
    assert status == {"source.tc_metrics.warehouse.rounds": "pass"}


def test_a_submission_without_a_stake_row_is_scored_and_the_marts_pass(
    fresh_source, tmp_path, instance
):
    """No stake row: scored as stake 0 (TC, metrics, reputation), no payout row, counted in
    payout_summary; every dbt test passes."""
    stakes_file = fresh_source / "rounds/1/stakes.csv"
    stakes = pd.read_csv(stakes_file, dtype={"model_id": str}, keep_default_na=False)
    accepted = {p.stem for p in (fresh_source / "rounds/1/predictions").iterdir()}
    model = sorted(set(stakes["model_id"]) & accepted)[0]
    stakes[stakes["model_id"] != model].to_csv(stakes_file, index=False)
    defs, paths = platform(fresh_source, tmp_path)
    result = run_job(defs, instance, 1)
    assert result.success, [
        e.message for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE
    ]
    failed = [
        e.event_specific_data.check_name
        for e in result.all_events
        if e.event_type == dg.DagsterEventType.ASSET_CHECK_EVALUATION
        and not e.event_specific_data.passed
    ]
    assert not failed
    wh = paths.warehouse
    rep = read(wh, f"select * from reporting.model_reputation where model_id = '{model}'")
    assert len(rep) == 1 and rep["tc_rounds"].iloc[0] == 1 and np.isfinite(rep["tc_mean"].iloc[0])
    assert read(wh, f"select * from payouts where model_id = '{model}'").empty
    summary = read(wh, "select submitted_without_stake_row from payout_summary where round = 1")
    assert summary.iloc[0, 0] >= 1


def test_a_failed_dbt_test_says_which_and_shows_its_rows(scored, tmp_path):
    _, paths, _, _ = scored
    defs, copy = platform(paths.source, tmp_path)
    Path(copy.warehouse).parent.mkdir(parents=True)
    shutil.copy(paths.warehouse, copy.warehouse)
    with duckdb.connect(copy.warehouse) as con:
        con.execute(
            "update payouts set payout = 2 * stake * (select clip from rounds where round = 2) "
            "where round = 2 and stake > 0"
        )
    dbt_keys = [k for k in defs.resolve_all_asset_keys() if k.path[0] in ("reporting", "staging")]
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("rounds", ["2"])
        result = defs.resolve_job_def(SCORE_ROUND_JOB).execute_in_process(
            instance=instance, partition_key="2", asset_selection=dbt_keys, raise_on_error=False
        )
    assert not result.success
    checks = [
        e.event_specific_data
        for e in result.all_events
        if e.event_type == dg.DagsterEventType.ASSET_CHECK_EVALUATION
        and not e.event_specific_data.passed
    ]
    (payout,) = [c for c in checks if c.check_name.startswith("accepted_range_round_leaderboard")]
    text = payout.description
    assert text.startswith("dbt test accepted_range_round_leaderboard_payout")
    assert "failing row(s)" in text and "first rows:" in text and "payout" in text
    failures = [e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE]
    for message in [text, *(f.event_specific_data.error.message for f in failures)]:
        assert "\x1b[" not in message  # no colour escape codes
