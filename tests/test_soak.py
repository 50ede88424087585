"""Soak: ten rounds through the daemon while run processes are killed and resolutions arrive late.

The webserver and the daemon (tests/test_e2e_daemon.py's harness, local instance) watch a local
round source. Beside them, from the start, `tc-platform run` scores the same rounds, every file
present, one after the other into a clean warehouse: the reference. All ten rounds are published
at once, four of them without resolved.parquet. While the daemon ingests and scores them, the
test kills run processes with SIGKILL (by the pid their `tc/process` tag names, at a random
moment of the run, never a retry) and uploads the late resolutions one by one at random times.
It ends when nothing is left to run, and then requires:

- no run left queued or in progress, and every killed run marked failed and run again (unless
  it was killed after its last step, when Dagster has nothing to run again);
- every round scored on its resolution;
- the warehouse equal to the reference, every table,
  the dbt marts included, except the ingestion time stamp.
"""

import os
import random
import shutil
import signal
import time
import urllib.error
from pathlib import Path

import pandas as pd
import pytest

from tc_assets.io.synthetic import SyntheticSettings, generate_source
from tc_assets.io.warehouse import Warehouse
from tests.conftest import background_run
from tests.test_e2e_daemon import REPO, Dagster, alive

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]

ROUNDS = list(range(1, 11))
SOAK = SyntheticSettings(stocks=600, features=12, models=30, seed=5)
LATE = 4  # rounds whose resolved.parquet arrives while the daemon works
MAX_KILLS = 3
UNFINISHED = {"QUEUED", "NOT_STARTED", "STARTING", "STARTED", "CANCELING"}
TIMESTAMPS = ("ingested_at",)  # when a round was ingested: differs between any two runs


def publish(staging: Path, root: Path, rounds: list[int], late: set[int]) -> None:
    """Copy the rounds into the watched folder, round.json last, late resolutions held back."""
    shutil.copy(staging / "features.json", root / "features.json")
    for r in rounds:
        src, dst = staging / "rounds" / str(r), root / "rounds" / str(r)
        shutil.copytree(
            src, dst, ignore=shutil.ignore_patterns("round.json", "planted.csv", "resolved.parquet")
        )
        if r not in late:
            shutil.copy(src / "resolved.parquet", dst / "resolved.parquet")
        shutil.copy(src / "round.json", dst / "round.json")


def warehouse_contents(path: str, renamed: dict[str, str]) -> dict[str, pd.DataFrame]:
    """Every base table (marts included) in a canonical row order, timestamps dropped, paths
    of files beside the warehouse (plots) made relative to it, and values in `renamed` (the
    source folder) replaced."""
    wh = Warehouse(path)
    beside = f"{Path(path).parent}/"
    names = wh.query(
        "SELECT table_schema, table_name FROM information_schema.tables "
        "WHERE table_type = 'BASE TABLE' ORDER BY 1, 2"
    )
    out = {}
    for schema, name in names.itertuples(index=False):
        frame = wh.query(f'SELECT * FROM "{schema}"."{name}"')
        frame = frame.drop(columns=[c for c in TIMESTAMPS if c in frame.columns])
        for column in frame.columns:
            if frame[column].map(lambda v: isinstance(v, str) and v.startswith(beside)).any():
                frame[column] = frame[column].str.removeprefix(beside)
            if frame[column].map(lambda v: isinstance(v, str) and v in renamed).any():
                frame[column] = frame[column].replace(renamed)
        out[f"{schema}.{name}"] = frame.sort_values(list(frame.columns)).reset_index(drop=True)
    return out


def last_tick(d: Dagster, sensor: str) -> tuple[str, float]:
    """(status, timestamp) of the sensor's latest tick, ("", 0) before its first."""
    ticks = d.sensor_ticks(sensor)
    return (ticks[0]["status"], float(ticks[0]["timestamp"])) if ticks else ("", 0.0)


def finished_its_steps(d: Dagster, run_id: str) -> bool:
    """Whether the run's executor had finished every step before the run was killed (its
    process was still reporting the run's end): Dagster's retry then has no step to run again,
    and creates no run."""
    return any(
        e.get("eventType") == "ENGINE_EVENT"
        and (e.get("message") or "").startswith("Finished steps in process")
        for e in d.events(run_id)
    )


def test_ten_rounds_through_the_daemon_with_kills_and_late_resolutions(tmp_path, request):
    rng = random.Random(20261202)
    staging, root = tmp_path / "staging", tmp_path / "source"
    generate_source(staging, ROUNDS, SOAK)
    reference = background_run(staging, tmp_path / "clean")
    request.addfinalizer(lambda: reference.poll() is None and reference.kill())
    (root / "rounds").mkdir(parents=True)
    late = rng.sample(ROUNDS, LATE)
    env = {
        "TC_SOURCE": str(root),
        "TC_WAREHOUSE": str(tmp_path / "daemon" / "warehouse.duckdb"),  # beside "clean"
        "TC_STORAGE": str(tmp_path / "daemon" / "storage"),
        "TC_SCORE_DELAY_S": "0",
        # Each tick of each sensor costs the daemon and the code server CPU time that the runs
        # share: every 5 s reacts well within a run's length and leaves them most of it.
        "TC_NEW_ROUND_INTERVAL_S": "5",
        "TC_ROUND_CHANGES_INTERVAL_S": "5",
        "TC_WINDOW_REFRESH_INTERVAL_S": "5",
        "TC_DEAD_RUNS_INTERVAL_S": "5",
    }
    d = Dagster(tmp_path, env, REPO / "tc_assets" / "dagster.yaml", "local")
    d.start()
    try:
        publish(staging, root, ROUNDS, set(late))
        kill_after: dict[str, float] = {}  # run id -> seconds into the run to kill it at
        killed: dict[str, str] = {}  # run id -> its round
        started: dict[str, float] = {}
        next_resolution = time.monotonic() + rng.uniform(20, 60)
        quiet_since = None
        deadline = time.monotonic() + 2700  # the whole soak takes 14 to 30 minutes on 2 cores
        while time.monotonic() < deadline:
            try:
                runs = d.runs()
            except (urllib.error.URLError, ConnectionError, TimeoutError):  # still starting
                time.sleep(2)
                continue
            now = time.monotonic()
            for run in runs:
                rid, tags = run["runId"], run["tags"]
                if run["status"] != "STARTED" or "tc/process" not in tags:
                    continue
                started.setdefault(rid, now)
                if (
                    "dagster/retry_number" in tags
                    or tags.get("dagster/partition") in killed.values()
                ):
                    continue
                if rid not in kill_after and len(killed) < MAX_KILLS:
                    kill_after[rid] = rng.uniform(0, 12) if rng.random() < 0.3 else float("inf")
                if rid in kill_after and now - started[rid] >= kill_after[rid]:
                    pid = int(tags["tc/process"].rsplit("/", 2)[1])
                    if alive(pid):
                        os.kill(pid, signal.SIGKILL)
                        killed[rid] = tags["dagster/partition"]
                    kill_after[rid] = float("inf")
            if late and now >= next_resolution:
                r = late.pop()
                shutil.copy(
                    staging / f"rounds/{r}/resolved.parquet", root / f"rounds/{r}/resolved.parquet"
                )
                next_resolution = now + rng.uniform(10, 40)
            busy = [run for run in runs if run["status"] in UNFINISHED]
            if late or busy or not runs:
                quiet_since = None
            else:
                ended = max(run["endTime"] or 0 for run in runs)
                quiet_since = quiet_since or time.time()
                ticks = [last_tick(d, s) for s in ("round_changes_sensor", "window_refresh_sensor")]
                # Both sensors looked after the last run ended (and after the quiet began) and
                # found nothing more to do.
                if all(s == "SKIPPED" and t > max(ended, quiet_since) for s, t in ticks):
                    break
            time.sleep(2)
        else:
            pytest.fail(f"the daemon did not settle in time\n{d.tail()}")

        runs = d.runs()
        assert not [r for r in runs if r["status"] in UNFINISHED], runs
        assert killed, "no run was killed: the soak tested nothing"
        by_id = {r["runId"]: r for r in runs}
        for rid in killed:
            assert by_id[rid]["status"] == "FAILURE", by_id[rid]
            retries = [r for r in runs if r["tags"].get("dagster/parent_run_id") == rid]
            assert retries or finished_its_steps(d, rid), f"killed run {rid} was not run again"
        codes = d.stop()
        assert all(code in (0, -signal.SIGTERM) for code in codes.values()), (codes, d.tail())
    finally:
        d.kill()

    got = warehouse_contents(env["TC_WAREHOUSE"], {})
    for r in ROUNDS:
        assert len(got["main.tc_scores"].query(f"round == {r}")), f"round {r} has no TC"
    assert reference.wait(1200) == 0, (tmp_path / "clean" / "output.txt").read_text()
    expected = warehouse_contents(
        str(tmp_path / "clean" / "warehouse.duckdb"), {str(staging): str(root)}
    )
    assert sorted(got) == sorted(expected)
    for name, frame in expected.items():
        pd.testing.assert_frame_equal(
            got[name], frame, check_exact=False, rtol=1e-9, atol=1e-12, obj=name
        )
