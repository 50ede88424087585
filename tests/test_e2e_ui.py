"""End to end, what an operator sees in the UI after `tc-platform run`.

Rounds 1-2 are generated and run by the command line, round 3 with a negative stake; then
dagster-webserver starts on loopback over the same instance and workspace.yaml, with the paths
the command line used, and the test reads through its GraphQL API, as the UI does:

* the score_round job's own run list holds the command line's runs, tagged with the code
  location, with the job snapshot the UI has loaded (re-execution without a version warning);
* every asset of the job is materialized for rounds 1 and 2 (the partitions view counts the
  rounds done, the TC proxy's short windows included); round 3 is failed;
* a dbt source test is an asset check of the Python asset it tests, and it ran;
* tc_scores carries dagster/row_count and a table-typed leaderboard;
* round 3's run failure says why in one line, without a numpy repr.
"""

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from tc_assets.io.synthetic import SyntheticSettings, generate_source
from tc_assets.io.warehouse import Warehouse
from tests.test_e2e_daemon import BIN, LOCATION, REPO, Dagster

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

SETTINGS = SyntheticSettings(stocks=600, features=12, models=30, seed=5)
JOB = {
    "pipelineName": "score_round",
    "repositoryName": "__repository__",
    "repositoryLocationName": LOCATION,
}


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "tc-platform"), *args],
        cwd=env["TC_HOME"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=1200,
    )


@pytest.fixture(scope="module")
def ui(tmp_path_factory) -> Iterator[tuple[Dagster, subprocess.CompletedProcess, Path]]:
    tmp = tmp_path_factory.mktemp("ui")
    source, warehouse = tmp / "source", tmp / "warehouse.duckdb"
    generate_source(source, [1, 2, 3], SETTINGS)
    stakes = pd.read_csv(source / "rounds/3/stakes.csv", dtype={"model_id": str})
    stakes.loc[1, "stake"] = -5.0
    stakes.to_csv(source / "rounds/3/stakes.csv", index=False)
    paths = {
        "TC_SOURCE": str(source),
        "TC_WAREHOUSE": str(warehouse),
        "TC_STORAGE": str(tmp / "storage"),
    }
    d = Dagster(tmp, paths, REPO / "tc_assets" / "dagster.yaml", "local")  # the project's instance
    home = tmp / "home"
    home.mkdir()
    env = {"TC_HOME": str(home), "DAGSTER_HOME": str(d.home)}
    run = _cli(env, "run", "--source", str(source), "--warehouse", str(warehouse))
    assert run.returncode == 1, run.stdout + run.stderr  # round 3 fails
    command = [BIN / "dagster-webserver", "-w", REPO / "workspace.yaml", "-h", "127.0.0.1"]
    d.procs["webserver"] = subprocess.Popen(
        [str(c) for c in [*command, "-p", str(d.port)]],
        cwd=REPO,
        env=d.env,
        stdout=(d.logs / "webserver.log").open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        d.wait("the webserver", lambda: d.query("{ version }"), 600)
        yield d, run, warehouse
    finally:
        d.kill()
        shutil.rmtree(tmp, ignore_errors=True)


def _job(d: Dagster) -> dict[str, Any]:
    data = d.query(
        """query Job($selector: PipelineSelector!) { pipelineOrError(params: $selector) {
             ... on Pipeline { pipelineSnapshotId runs { runId status pipelineSnapshotId
               repositoryOrigin { repositoryLocationName repositoryName }
               tags { key value } } } } }""",
        {"selector": JOB},
    )
    return data["pipelineOrError"]


def test_cli_runs_are_the_jobs_runs_with_the_loaded_snapshot(ui):
    d, run, _ = ui
    assert "round 1: ok" in run.stdout and "round_inputs" in run.stdout  # compact progress
    job = _job(d)
    by_round = {
        {t["key"]: t["value"] for t in r["tags"]}["dagster/partition"]: r for r in job["runs"]
    }
    assert sorted(by_round) == ["1", "2", "3"]
    for r in ("1", "2"):
        assert by_round[r]["status"] == "SUCCESS"
    for r in by_round.values():
        tags = {t["key"]: t["value"] for t in r["tags"]}
        assert tags["dagster/code_location"] == LOCATION
        assert r["repositoryOrigin"] == {
            "repositoryLocationName": LOCATION,
            "repositoryName": "__repository__",
        }
        # The UI re-executes without "may be a different version" when these are equal.
        assert r["pipelineSnapshotId"] == job["pipelineSnapshotId"]


def test_every_asset_of_the_job_is_materialized_for_the_scored_rounds(ui):
    d, _, _ = ui
    data = d.query(
        """query Assets($selector: PipelineSelector!) { assetNodes(pipeline: $selector) {
             assetKey { path } assetPartitionStatuses { ... on DefaultPartitionStatuses {
               materializedPartitions failedPartitions } } } }""",
        {"selector": JOB},
    )
    nodes = data["assetNodes"]
    keys = {"/".join(n["assetKey"]["path"]) for n in nodes}
    assert {"tc_proxy_model", "tc_scores", "payouts", "reporting/round_leaderboard"} <= keys
    for node in nodes:
        status = node["assetPartitionStatuses"]
        assert {"1", "2"} <= set(status["materializedPartitions"]), node
        assert "3" not in status["materializedPartitions"], node
    stakes = next(n for n in nodes if n["assetKey"]["path"] == ["stakes"])
    assert stakes["assetPartitionStatuses"]["failedPartitions"] == ["3"]


def test_a_dbt_source_test_is_a_check_of_the_python_asset(ui):
    d, _, _ = ui
    data = d.query(
        """{ assetNodeOrError(assetKey: {path: ["payouts"]}) { ... on AssetNode {
             assetChecksOrError { ... on AssetChecks { checks { name } } } } } }"""
    )
    names = [c["name"] for c in data["assetNodeOrError"]["assetChecksOrError"]["checks"]]
    dbt = [n for n in names if n.startswith("source_")]
    assert dbt, names
    scored = {r["runId"] for r in _job(d)["runs"] if r["status"] == "SUCCESS"}
    for name in dbt:
        executions = d.query(
            """query Checks($name: String!) { assetCheckExecutions(
                 assetKey: {path: ["payouts"]}, checkName: $name, limit: 20) { runId status } }""",
            {"name": name},
        )["assetCheckExecutions"]
        ran = {e["runId"]: e["status"] for e in executions if e["runId"] in scored}
        assert len(ran) == 2 and set(ran.values()) == {"SUCCEEDED"}, (name, executions)


def test_tc_scores_shows_row_count_and_a_table_leaderboard(ui):
    d, _, warehouse = ui
    data = d.query(
        """{ assetOrError(assetKey: {path: ["tc_scores"]}) { ... on Asset {
             assetMaterializations(partitions: ["2"]) { metadataEntries { __typename label
               ... on IntMetadataEntry { intValue }
               ... on TableMetadataEntry { table { records } }
               ... on FloatMetadataEntry { floatValue } } } } } }"""
    )
    (mat,) = data["assetOrError"]["assetMaterializations"]
    entries = {e["label"]: e for e in mat["metadataEntries"]}
    rows = len(Warehouse(warehouse).read_round("tc_scores", 2))
    assert rows > 20 and entries["dagster/row_count"]["intValue"] == rows
    assert entries["top_tc"]["__typename"] == "TableMetadataEntry"
    assert len(entries["top_tc"]["table"]["records"]) == 10
    assert "dagster/column_schema" in entries and "dagster/table_name" in entries
    floats = [e["floatValue"] for e in entries.values() if e["__typename"] == "FloatMetadataEntry"]
    assert floats and all(float(f"{v:.6g}") == v for v in floats if v is not None)  # rounded


def test_a_bad_stakes_file_fails_the_round_with_a_one_line_reason(ui):
    d, run, _ = ui
    (failed,) = [r for r in _job(d)["runs"] if r["status"] == "FAILURE"]
    events = d.query(
        """query Logs($runId: ID!) { logsForRun(runId: $runId) { ... on EventConnection {
             events { __typename ... on RunFailureEvent { message error { message } } } } } }""",
        {"runId": failed["runId"]},
    )["logsForRun"]["events"]
    (failure,) = [e for e in events if e["__typename"] == "RunFailureEvent"]
    reason = failure["error"]["message"].strip()
    assert "\n" not in reason and "np.float64" not in reason, reason
    assert "round 3: stakes.csv has 1 bad row(s)" in reason and "stake -5 is not" in reason
    assert "stake -5 is not a finite number" in run.stdout
