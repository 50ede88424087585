"""The DuckLake backend on a real PostgreSQL catalog (the session's private cluster on loopback)
and a real S3 data path (the session's moto server): the same rows as the DuckDB file, rounds
written by concurrent processes, two writers of one round, a writer killed mid-write, a file
copied into a lake.

Sized to run in a few minutes on two cores: the smallest generated rounds that still plant every
kind of model and bad input, and writers that stop inside their transaction at a known point
(after their first table's rows are inserted) instead of racing large writes against the clock.
"""

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tc_assets.defs.definitions import PlatformPaths, build_definitions
from tc_assets.defs.env import environment
from tc_assets.io import lake
from tc_assets.io.synthetic import SyntheticSettings
from tc_assets.io.tables import TABLES
from tc_assets.io.warehouse import Warehouse, WarehouseError
from tests.conftest import background_run, make_source, run_job
from tests.s3server import client, s3_env

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
# The smallest rounds with every planted kind of model (MIN_MODELS) and one bad submission per
# rule; the pipeline's tables are compared row by row at this size.
TINY = SyntheticSettings(stocks=600, features=12, models=30, seed=11, with_bad_inputs=True)
LIKE = {3: 1, 4: 2, 5: 1, 6: 2}  # rounds written at once -> the round whose files they copy
_names = itertools.count()


@pytest.fixture(scope="module")
def s3(s3_endpoint) -> Iterator[tuple[str, str]]:
    """A fresh bucket on the session's moto server, and the environment that points DuckDB and
    boto3 at it for this module; yields (endpoint, bucket)."""
    bucket = f"lake-{uuid.uuid4().hex[:12]}"
    client(s3_endpoint).create_bucket(Bucket=bucket)
    with environment(s3_env(s3_endpoint)):
        yield s3_endpoint, bucket


def new_lake(postgres, s3: tuple[str, str]) -> tuple[str, str]:
    """A fresh lake: an empty catalog database and an unused data prefix on the bucket."""
    name = f"lake_{next(_names)}_{os.getpid()}"
    return f"ducklake:postgres:{postgres.create_database(name)}", f"s3://{s3[1]}/{name}/"


def objects(s3: tuple[str, str], prefix: str = "") -> set[str]:
    """Keys under `prefix` of the bucket."""
    endpoint, bucket = s3
    pages = client(endpoint).get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {o["Key"] for page in pages for o in page.get("Contents", [])}


def predictions(r: int, n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "round": r,
            "model_id": [f"m{i % 50}" for i in range(n)],
            "id": [f"id{i}" for i in range(n)],
            "prediction": rng.random(n),
        }
    )


def universe(r: int, n: int) -> pd.DataFrame:
    return pd.DataFrame({"round": r, "id": [f"id{i}" for i in range(n)], "era": "era1"})


def sorted_rows(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.sort_values(list(frame.columns)).reset_index(drop=True)


# -- Writers -------------------------------------------------------------------------------

WRITER = """
import sys, numpy as np, pandas as pd
from tc_assets.io.warehouse import Warehouse
location, data, r, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
wh = Warehouse(location, data_path=data)
wh.table_names()  # connected: extensions loaded, lake attached
frame = pd.DataFrame({"model_id": "w", "id": [f"id{i}" for i in range(n)],
                      "prediction": np.random.default_rng(n).random(n)})
print("ready", flush=True)
sys.stdin.readline()
wh.write_round(r, {"predictions": frame})
print("done", flush=True)
"""


def writer(location: str, data: str, r: int, n: int) -> subprocess.Popen:
    """A process that connects to the lake, says `ready`, and on a line of input writes round
    r of predictions (n rows of model `w`) and says `done`."""
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, location, data, str(r), str(n)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert proc.stdout.readline().strip() == "ready"
    return proc


def commit_other(proc: subprocess.Popen) -> None:
    """Let the writer process write and commit its round; wait until it has."""
    proc.stdin.write("go\n")
    proc.stdin.flush()
    assert proc.stdout.readline().strip() == "done"
    assert proc.wait(60) == 0


def pause_after_first_insert(monkeypatch) -> tuple[threading.Event, threading.Event]:
    """Make this process's next write stop inside its transaction once its first table's rows
    are inserted: `inside` is set there, and the write goes on (to its COMMIT) when `go` is."""
    inside, go = threading.Event(), threading.Event()
    real = Warehouse._insert

    def insert(con, spec, data) -> None:
        real(con, spec, data)
        if not inside.is_set():
            inside.set()
            go.wait(120)

    monkeypatch.setattr(Warehouse, "_insert", staticmethod(insert))
    return inside, go


def test_two_writers_of_one_round_one_retries(postgres, s3, monkeypatch, caplog):
    location, data = new_lake(postgres, s3)
    wh = Warehouse(location, data_path=data, retry_wait_s=0.01)
    other = writer(location, data, 3, 10)
    mine = {"predictions": predictions(3, 2_000, 1), "universe": universe(3, 3_000)}
    inside, go = pause_after_first_insert(monkeypatch)
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(wh.write_round(3, mine)))
    thread.start()
    # This transaction is open with rows of round 3 inserted; the other process writes the
    # same round and commits meanwhile.
    assert inside.wait(120)
    commit_other(other)
    go.set()
    thread.join(120)
    assert result == {"predictions": 2_000, "universe": 3_000}
    retries = [r for r in caplog.records if "conflicted with another writer" in r.getMessage()]
    assert len(retries) == 1
    # The retried write ran after the other's commit: the round holds its rows, once.
    for name, frame in mine.items():
        pd.testing.assert_frame_equal(
            sorted_rows(wh.read_round(name, 3)), sorted_rows(frame), check_dtype=False
        )


def test_conflicts_past_the_limit_fail_with_a_message(postgres, s3, monkeypatch):
    location, data = new_lake(postgres, s3)
    wh = Warehouse(location, data_path=data, conflict_retries=0)
    other = writer(location, data, 5, 10)
    inside, go = pause_after_first_insert(monkeypatch)
    errors: list[Exception] = []

    def write() -> None:
        try:
            wh.write_round(5, {"predictions": predictions(5, 500, 2), "universe": universe(5, 500)})
        except WarehouseError as exc:
            errors.append(exc)

    thread = threading.Thread(target=write)
    thread.start()
    assert inside.wait(120)
    commit_other(other)
    go.set()
    thread.join(120)
    assert len(errors) == 1
    assert "another writer changed the same tables" in str(errors[0])
    assert "nothing written" in str(errors[0])
    # The other writer's rows stand, alone.
    assert set(wh.read_round("predictions", 5)["model_id"]) == {"w"}
    assert wh.read_round("universe", 5).empty


KILLED = """
import sys, pandas as pd
from tc_assets.io.warehouse import Warehouse
real = Warehouse._insert
def insert(con, spec, data):
    real(con, spec, data)
    print("inserted", spec.name, flush=True)
    sys.stdin.readline()  # stays here, inside the open transaction, until killed
Warehouse._insert = staticmethod(insert)
location, data, n = sys.argv[1], sys.argv[2], 5_000
frame = pd.DataFrame({"round": 7, "id": [f"new{i}" for i in range(n)], "era": "era2"})
Warehouse(location, data_path=data).write_round(7, {"universe": frame, "predictions": frame.assign(
    model_id="k", prediction=0.5)[["round", "model_id", "id", "prediction"]]})
"""


def test_a_writer_killed_mid_write_leaves_the_round_and_a_rerun_completes(postgres, s3):
    location, data = new_lake(postgres, s3)
    wh = Warehouse(location, data_path=data)
    previous = {"universe": universe(7, 1_000), "predictions": predictions(7, 1_000, 3)}
    wh.write_round(7, previous)
    before = objects(s3)
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED, location, data],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        # Mid-write: its transaction has replaced round 7's universe rows and written them.
        assert proc.stdout.readline().strip() == "inserted universe"
        assert objects(s3) - before, "the killed writer wrote no data file"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(30) == -signal.SIGKILL
    for name, frame in previous.items():
        pd.testing.assert_frame_equal(
            sorted_rows(wh.read_round(name, 7)), sorted_rows(frame), check_dtype=False
        )
    rerun = {"universe": universe(7, 500), "predictions": predictions(7, 500, 4)}
    assert wh.write_round(7, rerun) == {"universe": 500, "predictions": 500}
    for name, frame in rerun.items():
        pd.testing.assert_frame_equal(
            sorted_rows(wh.read_round(name, 7)), sorted_rows(frame), check_dtype=False
        )


# -- The whole pipeline -------------------------------------------------------------------

# Outputs over a window of earlier rounds: what they hold depends on which rounds had landed
# when they ran, so rounds scored at once are not compared with serial runs on these.
WINDOWED = {
    "sharpe_contribution",
    "stg_sharpe_contribution",
    "tc_proxy_importance",
    "tc_proxy_shape",
    "tc_proxy_fit",
    "model_reputation",
}
# Round-local rows, but with a windowed column (sharpe_contribution): compared by count.
WITH_WINDOWED_COLUMNS = {"portfolio_leaderboard"}


def relations(wh: Warehouse) -> list[tuple[str, str]]:
    """(schema, name) of the platform's tables and dbt's views and marts."""
    rows = wh.query(
        "SELECT table_schema, table_name FROM information_schema.tables "
        "WHERE table_catalog = current_database() "
        "AND table_schema IN ('main', 'staging', 'reporting') ORDER BY 1, 2"
    )
    return list(rows.itertuples(index=False, name=None))


def partition_column(schema: str, name: str) -> str:
    return TABLES[name].partition if schema == "main" else "round"


def contents(wh: Warehouse, schema: str, name: str, r: int) -> pd.DataFrame:
    """Rows of round r without their round and the times of writing (`*_at`), in a fixed order."""
    col = partition_column(schema, name)
    frame = wh.query(f'SELECT * FROM "{schema}"."{name}" WHERE "{col}" = {r}')
    return sorted_rows(frame[[c for c in frame.columns if c != col and not c.endswith("_at")]])


def counts(wh: Warehouse, schema: str, name: str) -> dict[int, int]:
    col = partition_column(schema, name)
    rows = wh.query(f'SELECT "{col}" AS k, count(*) AS n FROM "{schema}"."{name}" GROUP BY 1')
    return {int(k): int(n) for k, n in rows.itertuples(index=False, name=None)}


def compare(lake_wh: Warehouse, file_wh: Warehouse, rounds: dict[int, int], windowed: bool) -> int:
    """Every relation of the file: round r of the lake has the rows of round rounds[r] of the
    file (all of them, or by count only for windowed outputs unless `windowed`). The lake has
    every table from its first write: those the file never made must be empty. Rows compared."""
    file_relations = relations(file_wh)
    assert {s for s, _ in file_relations} == {"main", "staging", "reporting"}
    lake_relations = set(relations(lake_wh))
    assert set(file_relations) <= lake_relations
    for schema, name in lake_relations - set(file_relations):
        assert schema == "main" and not counts(lake_wh, schema, name), name
    compared = 0
    for schema, name in file_relations:
        if name in WINDOWED and not windowed:
            continue
        got_counts = counts(lake_wh, schema, name)
        want_counts = counts(file_wh, schema, name)
        assert {r: got_counts.get(r, 0) for r in rounds} == {
            r: want_counts.get(f, 0) for r, f in rounds.items()
        }, f"{schema}.{name}"
        if name in WITH_WINDOWED_COLUMNS and not windowed:
            continue
        for r, f in rounds.items():
            want = contents(file_wh, schema, name, f)
            got = contents(lake_wh, schema, name, r)
            pd.testing.assert_frame_equal(got, want, check_dtype=False, obj=f"{schema}.{name}")
            compared += len(want)
    return compared


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """Rounds 1-2 at small size (one bad submission per rule), and rounds 3 to 6: the same
    files as rounds 1 and 2 under other round numbers (`LIKE`), so a serial run of 1-2 tells
    what every round-local table of 3-6 must hold."""
    root = make_source(tmp_path_factory.mktemp("lake_source"), [1, 2], TINY)
    for r, like in LIKE.items():
        shutil.copytree(root / "rounds" / str(like), root / "rounds" / str(r))
        info = root / "rounds" / str(r) / "round.json"
        info.write_text(json.dumps({**json.loads(info.read_text()), "round": r}))
    return root


@pytest.fixture(scope="module", autouse=True)
def file_run(source, tmp_path_factory) -> Iterator[tuple[subprocess.Popen, Path]]:
    """Rounds 1 and 2 scored one after the other on the DuckDB file (today's default) by
    `tc-platform run` in its own process, started as the module starts so that it runs on the
    second core beside the lake's tests; yields the process and the warehouse file."""
    tmp = tmp_path_factory.mktemp("file_reference")
    proc = background_run(source, tmp, "--rounds", "1-2")
    path = tmp / "warehouse.duckdb"
    yield proc, path
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def file_reference(file_run) -> Warehouse:
    """The DuckDB file of `file_run`, once its process has exited successfully."""
    proc, path = file_run
    returncode = proc.wait(900)
    assert returncode == 0, (path.parent / "output.txt").read_text()
    return Warehouse(path)


@pytest.fixture(scope="module")
def lake_home(tmp_path_factory) -> Path:
    """TC_HOME of every run on the lake (plots, asset values, dbt's kept parse): one deployment
    whose processes share it, as machines share TC_STORAGE."""
    return tmp_path_factory.mktemp("lake_home")


@pytest.fixture(scope="module")
def serial_lake(postgres, s3, source, lake_home) -> tuple[str, str]:
    """A lake with rounds 1 and 2 scored one after the other through the whole `score_round`
    job (dbt included), in process; yields (catalog, data path)."""
    import dagster as dg

    location, data = new_lake(postgres, s3)
    with environment({"TC_HOME": str(lake_home)}):
        paths = PlatformPaths.create(str(source), location, lake_data=data)
        assert paths.backend == "ducklake"
        defs = build_definitions(paths)
        with dg.instance_for_test() as instance:
            for r in (1, 2):
                assert run_job(defs, instance, r).success
    return location, data


def test_score_round_and_dbt_on_the_lake_equal_the_file(s3, serial_lake, file_reference):
    location, data = serial_lake
    wh = Warehouse(location, data_path=data)
    assert compare(wh, file_reference, {1: 1, 2: 2}, windowed=True) > 10_000
    # The data is Parquet on S3, under the lake's prefix.
    assert any(k.endswith(".parquet") for k in objects(s3, data.removeprefix(f"s3://{s3[1]}/")))


def test_processes_score_rounds_at_once(source, serial_lake, file_reference, lake_home, tmp_path):
    """Four `tc-platform run` processes (each its own Dagster instance, as on four machines)
    score rounds 3 to 6 into the lake of rounds 1-2 at the same time: all four rounds land,
    every round-local table equal, row by row (row counts included), to the serial runs of the
    same files."""
    location, data = serial_lake
    procs = []
    for r in LIKE:
        env = {
            **os.environ,
            "TC_HOME": str(lake_home),
            "DAGSTER_HOME": str(tmp_path / f"dagster_home_{r}"),
            "TC_WAREHOUSE": location,
            lake.DATA_PATH_ENV: data,
            "PYTHONPATH": str(ROOT),
        }
        command = [sys.executable, "-m", "tc_assets.cli", "run", "--source", str(source)]
        procs.append(
            subprocess.Popen(
                [*command, "--rounds", str(r)],
                env=env,
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs = [p.communicate(timeout=900)[0] for p in procs]
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out
    wh = Warehouse(location, data_path=data)
    assert compare(wh, file_reference, {1: 1, 2: 2, **LIKE}, windowed=False) > 30_000


def test_copy_a_file_into_a_lake(postgres, s3, file_reference, tmp_path, capsys):
    from tc_assets.cli import main

    name = f"copy_{next(_names)}_{os.getpid()}"
    location = f"ducklake:postgres:{postgres.create_database(name)}"
    data = str(tmp_path / "lake_data")  # a directory, not S3
    args = ["copy-to-lake", "--from", file_reference.location, "--to", location]
    assert main([*args, "--lake-data", data]) == 0
    assert "copied" in capsys.readouterr().out
    wh = Warehouse(location, data_path=data)
    for schema, rel in relations(file_reference):
        if schema == "staging":
            continue  # views: made by dbt's next build
        for r in (1, 2):
            pd.testing.assert_frame_equal(
                contents(wh, schema, rel, r),
                contents(file_reference, schema, rel, r),
                check_dtype=False,
                obj=f"{schema}.{rel}",
            )
    assert any(Path(data).rglob("*.parquet"))
    # A second copy would double the rounds: refused, nothing written.
    before = counts(wh, "main", "predictions")
    assert main([*args, "--lake-data", data]) == 1
    assert "already has rows in" in capsys.readouterr().err
    assert counts(wh, "main", "predictions") == before


# -- Configuration -------------------------------------------------------------------------


def test_s3_secret_from_the_environment():
    sql = lake.s3_secret_sql(
        {
            "AWS_ACCESS_KEY_ID": "key",
            "AWS_SECRET_ACCESS_KEY": "it's",
            "AWS_DEFAULT_REGION": "eu-west-1",
            "TC_S3_ENDPOINT_URL": "http://127.0.0.1:9000",
        }
    )
    assert "KEY_ID 'key'" in sql and "SECRET 'it''s'" in sql and "REGION 'eu-west-1'" in sql
    assert "ENDPOINT '127.0.0.1:9000'" in sql and "USE_SSL false" in sql
    assert "URL_STYLE 'path'" in sql
    chain = lake.s3_secret_sql({"AWS_REGION": "us-east-2"})
    assert "PROVIDER credential_chain" in chain and "ENDPOINT" not in chain


def test_backend_and_writers_follow_the_location(tmp_path, monkeypatch):
    from tc_assets.defs.partitions import writer_slots

    pg = "ducklake:postgres:postgresql://tc:secret@db:5432/lake"
    assert lake.redact(pg) == "ducklake:postgres:postgresql://tc:***@db:5432/lake"
    assert lake.redact("ducklake:postgres:dbname=x password=secret") == (
        "ducklake:postgres:dbname=x password=***"
    )
    monkeypatch.delenv("TC_WAREHOUSE_WRITERS", raising=False)
    assert writer_slots(str(tmp_path / "w.duckdb")) == 1
    assert writer_slots(f"ducklake:{tmp_path}/c.ducklake") == 1  # a DuckDB catalog: one process
    assert writer_slots(pg) == 4
    monkeypatch.setenv("TC_WAREHOUSE_WRITERS", "12")
    assert writer_slots(pg) == 12
    assert writer_slots(str(tmp_path / "w.duckdb")) == 1
    monkeypatch.setenv("TC_WAREHOUSE_WRITERS", "0")
    with pytest.raises(ValueError, match="positive integer"):
        writer_slots(pg)
    with pytest.raises(ValueError, match="TC_LAKE_DATA_PATH"):
        PlatformPaths.create(str(tmp_path), pg)
    with pytest.raises(WarehouseError, match="needs a data path"):
        Warehouse(pg)
    paths = PlatformPaths.create(str(tmp_path), pg, lake_data="s3://b/p/")
    assert (paths.backend, paths.lake_data) == ("ducklake", "s3://b/p/")
    assert "secret" not in paths.describe_warehouse()
