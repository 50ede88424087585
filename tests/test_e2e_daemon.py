"""End to end: the Dagster webserver and daemon find, ingest and score rounds on their own.

dagster-webserver and dagster-daemon run as subprocesses on loopback with a temporary
DAGSTER_HOME, and load the code location from its own gRPC server (`dagster api grpc`, as
deploy/ runs it); the code location reads rounds from a moto S3 server on 127.0.0.1 and writes a
temporary DuckDB warehouse. It runs on two instances:

- `local`: the project's dagster.yaml (SQLite storage), asset values on local disk;
- `production`: deploy/dagster.yaml on a private PostgreSQL cluster (tests/pgcluster.py), step
  logs to S3 (S3ComputeLogManager) and asset values on S3 (TC_STORAGE=s3://...), both on moto.

The test only uploads files and watches through the webserver's GraphQL API:

1. two new rounds are uploaded at once: the sensor adds their partitions, the daemon runs
   their ingestion and scoring concurrently, all succeed, and the warehouse holds both rounds;
2. round 1's resolved.parquet is uploaded: the round is scored again, targets and all;
3. runs of the two rounds overlapped in time, yet no two DuckDB writers ever did (pool of 1),
   and no run logged a lock error;
4. on `production`, the step logs and the asset values are in their buckets;
5. the three processes stop on SIGTERM, leaving no process behind.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd
import pytest

from tc_assets.defs.automation import REASON_INGESTED, REASON_NEW_ROUND, REASON_RESOLVED, TAG_REASON
from tc_assets.defs.definitions import DEFINITIONS_MODULE, PlatformPaths, build_definitions
from tc_assets.defs.partitions import WAREHOUSE_POOL
from tc_assets.io.synthetic import SyntheticSettings, generate_source
from tc_assets.io.warehouse import Warehouse
from tests.pgcluster import PostgresCluster
from tests.s3server import client, fresh_bucket, moto_s3, s3_env, upload

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TINY = SyntheticSettings(stocks=600, features=12, models=30, seed=5)
BUCKET, PREFIX = "tournament", "live"
LOCATION = "tc_platform"
LOGS_BUCKET, VALUES_BUCKET = "compute-logs", "asset-values"
PARTITION_TAG = "dagster/partition"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descendants(pid: int) -> set[int]:
    """Every live process below `pid` (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.add(child)
            todo.append(child)
    return out


def _accepts(port: int) -> bool:
    """Whether something listens on the loopback port."""
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


class Dagster:
    """dagster-webserver and dagster-daemon over a temporary instance, and a GraphQL client."""

    def __init__(self, tmp: Path, env: dict[str, str], instance_yaml: Path, kind: str) -> None:
        self.kind = kind
        self.home = tmp / "dagster_home"
        self.home.mkdir()
        shutil.copy(instance_yaml, self.home / "dagster.yaml")
        self.env = {**os.environ, **env, "DAGSTER_HOME": str(self.home)}
        # Create the storages once, here: two processes creating them at once can race.
        saved = dict(os.environ)
        os.environ.update(env)
        try:
            dg.DagsterInstance.from_config(str(self.home)).dispose()
        finally:
            os.environ.clear()
            os.environ.update(saved)
        self.port = free_port()
        self.logs = tmp / "logs"
        self.logs.mkdir()
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self) -> None:
        """The code server (`dagster api grpc`, as deploy/ runs it), then the webserver and the
        daemon, which load the code location from it (a `grpc_server` workspace): neither
        imports the code, and the daemon's periodic workspace refresh reconnects to it rather
        than starting a code server of its own again."""
        grpc_port = free_port()
        workspace = self.home / "workspace.yaml"
        workspace.write_text(
            "load_from:\n  - grpc_server:\n      host: 127.0.0.1\n"
            f"      port: {grpc_port}\n      location_name: {LOCATION}\n"
        )
        self._spawn(
            "code",
            [BIN / "dagster", "api", "grpc", "-m", DEFINITIONS_MODULE, "-a", "defs"]
            + ["-h", "127.0.0.1", "-p", str(grpc_port)],
        )
        self.wait("the code server", lambda: _accepts(grpc_port), 300)
        self._spawn(
            "webserver",
            [BIN / "dagster-webserver", "-w", workspace, "-h", "127.0.0.1", "-p", str(self.port)],
        )
        self._spawn("daemon", [BIN / "dagster-daemon", "run", "-w", workspace])

    def _spawn(self, name: str, command: list[Any]) -> None:
        self.procs[name] = subprocess.Popen(
            [str(c) for c in command],
            cwd=REPO,
            env=self.env,
            stdout=(self.logs / f"{name}.log").open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own group: nothing of it outlives the test
        )

    def tail(self, lines: int = 40) -> str:
        return "\n".join(
            f"--- {p.name} ---\n" + "\n".join(p.read_text(errors="replace").splitlines()[-lines:])
            for p in sorted(self.logs.glob("*.log"))
        )

    def query(self, text: str, variables: dict[str, Any] | None = None) -> dict[str, Any]:
        body = json.dumps({"query": text, "variables": variables or {}}).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/graphql",
            data=body,
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            doc = json.loads(response.read())
        assert "errors" not in doc, doc["errors"]
        return doc["data"]

    def wait(self, what: str, probe: Callable[[], Any], timeout: float = 300.0) -> Any:
        """Poll `probe` until it returns something truthy; fail with the logs' tails."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                assert proc.poll() is None, f"{name} exited early\n{self.tail()}"
            try:
                value = probe()
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                value = None
            if value:
                return value
            time.sleep(2)
        pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}\n{self.tail()}")

    def runs(self, partition: str | None = None) -> list[dict[str, Any]]:
        tags = [{"key": PARTITION_TAG, "value": partition}] if partition else None
        data = self.query(
            """query Runs($filter: RunsFilter) {
                 runsOrError(filter: $filter) { ... on Runs { results {
                   runId jobName status startTime endTime tags { key value } } } } }""",
            {"filter": {"tags": tags} if tags else {}},
        )
        runs = data["runsOrError"]["results"]
        for run in runs:
            run["tags"] = {t["key"]: t["value"] for t in run["tags"]}
        return runs

    def events(self, run_id: str) -> list[dict[str, Any]]:
        data = self.query(
            """query Logs($runId: ID!) { logsForRun(runId: $runId, limit: 100000) {
                 ... on EventConnection { events { __typename
                   ... on MessageEvent { message timestamp stepKey eventType level } } } } }""",
            {"runId": run_id},
        )
        return data["logsForRun"]["events"]

    def partitions(self) -> list[str]:
        data = self.query(
            """{ assetNodeOrError(assetKey: {path: ["stakes"]}) {
                 ... on AssetNode { partitionKeys } } }"""
        )
        return data["assetNodeOrError"]["partitionKeys"]

    def sensor_ticks(self, name: str) -> list[dict[str, Any]]:
        """The sensor's latest ticks, newest first ({status, timestamp}); none unless running."""
        data = self.query(
            """query Sensor($selector: SensorSelector!) { sensorOrError(sensorSelector: $selector) {
                 ... on Sensor { sensorState { status ticks(limit: 5) { status timestamp } } } } }""",
            {
                "selector": {
                    "repositoryLocationName": LOCATION,
                    "repositoryName": "__repository__",
                    "sensorName": name,
                }
            },
        )
        state = data["sensorOrError"].get("sensorState") or {}
        return state.get("ticks") or [] if state.get("status") == "RUNNING" else []

    def schedule_status(self, name: str) -> str:
        data = self.query(
            """query Schedule($selector: ScheduleSelector!) {
                 scheduleOrError(scheduleSelector: $selector) {
                   ... on Schedule { cronSchedule scheduleState { status } } } }""",
            {
                "selector": {
                    "repositoryLocationName": LOCATION,
                    "repositoryName": "__repository__",
                    "scheduleName": name,
                }
            },
        )
        return data["scheduleOrError"]["scheduleState"]["status"]

    def stop(self) -> dict[str, int]:
        """SIGTERM both, wait; return their exit codes. Raises if anything is left behind."""
        below = set().union(*(descendants(p.pid) for p in self.procs.values()))
        codes = {}
        for proc in self.procs.values():
            proc.send_signal(signal.SIGTERM)
        for name, proc in self.procs.items():
            try:
                codes[name] = proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                codes[name] = proc.wait()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and any(alive(pid) for pid in below):
            time.sleep(1)
        left = sorted(pid for pid in below if alive(pid))
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        assert not left, f"processes left behind: {left}\n{self.tail()}"
        return codes

    def kill(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def production_env(postgres: PostgresCluster, endpoint: str, s3) -> dict[str, str]:
    """deploy/dagster.yaml's variables for a fresh database of the test cluster, and the moto
    buckets of its step logs and of the asset values."""
    postgres.create_database("dagster_e2e")
    for bucket in (LOGS_BUCKET, VALUES_BUCKET):
        fresh_bucket(s3, bucket)
    return {
        "DAGSTER_POSTGRES_HOST": postgres.host,
        "DAGSTER_POSTGRES_PORT": str(postgres.port),
        "DAGSTER_POSTGRES_USER": postgres.user,
        "DAGSTER_POSTGRES_PASSWORD": postgres.password,
        "DAGSTER_POSTGRES_DB": "dagster_e2e",
        "DAGSTER_COMPUTE_LOGS_BUCKET": LOGS_BUCKET,
        "AWS_ENDPOINT_URL_S3": endpoint,  # the compute-log manager's boto3 client
        "TC_STORAGE": f"s3://{VALUES_BUCKET}/values",
    }


@pytest.fixture(
    params=[
        "local",
        "production",
    ]
)
def dagster(request, tmp_path) -> Iterator[tuple[Dagster, Any, Path]]:
    staging = tmp_path / "staging"
    generate_source(staging, [1, 2], TINY)
    with moto_s3() as endpoint:
        s3 = client(endpoint)
        fresh_bucket(s3, BUCKET)
        upload(s3, staging, BUCKET, PREFIX, include=lambda rel: rel == "features.json")
        env = {
            **s3_env(endpoint),
            "TC_SOURCE": f"s3://{BUCKET}/{PREFIX}",
            "TC_WAREHOUSE": str(tmp_path / "warehouse.duckdb"),
            "TC_STORAGE": str(tmp_path / "storage"),
            "TC_NEW_ROUND_INTERVAL_S": "3",
            "TC_ROUND_CHANGES_INTERVAL_S": "3",
        }
        instance_yaml = REPO / "tc_assets" / "dagster.yaml"
        if request.param == "production":
            env.update(production_env(request.getfixturevalue("postgres"), endpoint, s3))
            instance_yaml = REPO / "deploy" / "dagster.yaml"
        d = Dagster(tmp_path, env, instance_yaml, request.param)
        d.start()
        try:
            yield d, s3, staging
        finally:
            d.kill()


def _succeeded(d: Dagster, partition: str, job: str, reason: str) -> dict[str, Any] | None:
    for run in d.runs(partition):
        if run["jobName"] == job and run["tags"].get(TAG_REASON) == reason:
            assert run["status"] not in ("FAILURE", "CANCELED"), f"{run}\n{d.tail()}"
            return run if run["status"] == "SUCCESS" else None
    return None


def _expected_prediction_rows(staging: Path, r: int) -> int:
    """Rows the warehouse must hold for the round: every prediction whose id is live."""
    live = set(pd.read_parquet(staging / f"rounds/{r}/live.parquet")["id"].astype(str))
    files = (staging / f"rounds/{r}/predictions").iterdir()
    return sum(int(pd.read_csv(f, dtype={"id": str})["id"].isin(live).sum()) for f in files)


def _step_windows(d: Dagster, run_id: str, steps: set[str]) -> list[tuple[float, float, str]]:
    """(start, end, step) of each pool step of the run, from its STEP_START/STEP_SUCCESS."""
    starts: dict[str, float] = {}
    out = []
    for e in d.events(run_id):
        key, kind = e.get("stepKey"), e.get("eventType")
        if key not in steps:
            continue
        if kind == "STEP_START":
            starts[key] = float(e["timestamp"]) / 1000
        elif kind in ("STEP_SUCCESS", "STEP_FAILURE") and key in starts:
            out.append((starts[key], float(e["timestamp"]) / 1000, key))
    return out


def _alive_window(d: Dagster, run: dict[str, Any]) -> tuple[float, float]:
    """From the daemon launching the run's process (RUN_STARTING) to the run's end."""
    for e in d.events(run["runId"]):
        if e.get("eventType") == "RUN_STARTING":
            return float(e["timestamp"]) / 1000, run["endTime"]
    return run["startTime"], run["endTime"]


def _overlap(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


def test_daemon_ingests_and_scores_rounds_from_s3(dagster, tmp_path):
    d, s3, staging = dagster
    start = time.monotonic()
    wh = Warehouse(tmp_path / "warehouse.duckdb")

    # The sensors run without anyone switching them on.
    d.wait("the new-round sensor to tick", lambda: d.sensor_ticks("new_round_sensor"), 420)
    assert d.schedule_status("round_close_schedule") == "RUNNING"
    assert d.partitions() == []

    # 1. Two new rounds at once (not resolved yet): partitions, ingestion and scoring of each.
    upload(
        s3,
        staging,
        BUCKET,
        PREFIX,
        include=lambda rel: rel.startswith("rounds/") and not rel.endswith("resolved.parquet"),
    )
    d.wait("partitions 1 and 2", lambda: sorted(d.partitions()) == ["1", "2"])
    for r in ("1", "2"):
        d.wait(
            f"round {r} ingested", lambda r=r: _succeeded(d, r, "ingest_round", REASON_NEW_ROUND)
        )
    for r in ("1", "2"):
        d.wait(f"round {r} scored", lambda r=r: _succeeded(d, r, "score_round", REASON_INGESTED))
    before = {}
    for r in (1, 2):
        assert len(wh.read_round("predictions", r)) == _expected_prediction_rows(staging, r)
        assert len(wh.read_round("resolved", r)) == 0
        before[r] = {t for t in wh.table_names() if len(wh.read_round(t, r))}
    assert before[1] == before[2]

    # 2. Round 1's resolved file arrives: the round is scored again, targets and all.
    upload(s3, staging, BUCKET, PREFIX, include=lambda rel: rel == "rounds/1/resolved.parquet")
    d.wait("round 1 re-scored", lambda: _succeeded(d, "1", "score_round", REASON_RESOLVED), 600)
    assert len(wh.read_round("resolved", 1)) == TINY.stocks
    after = {t for t in wh.table_names() if len(wh.read_round(t, 1))}
    assert after >= before[1] | {"resolved", "tc_scores", "model_metrics", "payouts"}
    assert {t for t in wh.table_names() if len(wh.read_round(t, 2))} == before[2]
    assert [run["tags"][TAG_REASON] for run in d.runs("1")].count(REASON_RESOLVED) == 1

    # 3. The daemon ran the two rounds concurrently; DuckDB writers never overlapped.
    paths = PlatformPaths.create(f"s3://{BUCKET}/{PREFIX}", str(tmp_path / "warehouse.duckdb"))
    job = build_definitions(paths).resolve_job_def("score_round")
    pool_steps = {n.name for n in job.graph.nodes if WAREHOUSE_POOL in n.definition.pools}
    assert "round_inputs" in pool_steps
    runs = d.runs()
    assert len(runs) == 5 and all(run["status"] == "SUCCESS" for run in runs), runs
    windows = {run["runId"]: _alive_window(d, run) for run in runs}
    concurrent = [
        (a, b)
        for i, a in enumerate(runs)
        for b in runs[i + 1 :]
        if a["tags"][PARTITION_TAG] != b["tags"][PARTITION_TAG]
        and _overlap(windows[a["runId"]], windows[b["runId"]])
    ]
    assert concurrent, "the daemon never ran rounds 1 and 2 at the same time"
    for a, b in concurrent:
        for wa in _step_windows(d, a["runId"], pool_steps):
            for wb in _step_windows(d, b["runId"], pool_steps):
                assert not _overlap(wa[:2], wb[:2]), f"pool steps overlapped: {wa} {wb}"
    for run in runs:
        for e in d.events(run["runId"]):
            message = e.get("message", "").lower()
            assert "lock" not in message or e["level"] not in ("ERROR", "CRITICAL"), e

    # 4. Production: step logs and asset values went to their buckets, none to local disk.
    if d.kind == "production":
        logs = s3.list_objects_v2(Bucket=LOGS_BUCKET, Prefix="dagster/compute-logs/")
        assert logs.get("KeyCount", 0) > 0, "no step logs in the compute-log bucket"
        values = {o["Key"] for o in s3.list_objects_v2(Bucket=VALUES_BUCKET)["Contents"]}
        assert {"values/stakes/1", "values/stakes/2", "values/meta_model/1"} <= values
        assert not (tmp_path / "storage").exists()

    # 5. Both stop cleanly, leaving nothing behind.
    codes = d.stop()
    assert all(code in (0, -signal.SIGTERM) for code in codes.values()), (codes, d.tail())
    print(f"end to end in {time.monotonic() - start:.0f}s, {len(concurrent)} concurrent pairs")
