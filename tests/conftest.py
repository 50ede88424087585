"""Shared fixtures: generated round sources (the project's generator) and Dagster instances."""

import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest

from tc_assets.defs import reporting
from tc_assets.defs.definitions import PlatformPaths, build_definitions
from tc_assets.defs.partitions import ROUNDS_PARTITIONS_NAME
from tc_assets.io.synthetic import SyntheticSettings, generate_source
from tests.pgcluster import PostgresCluster, postgres_bindir, postgres_cluster, postgres_dir
from tests.s3server import client, moto_s3, s3_env

REPO = Path(__file__).resolve().parents[1]

# Small enough for seconds per round, large enough for every planted kind and rule.
SMALL = SyntheticSettings(stocks=600, features=16, models=40, seed=7, with_bad_inputs=True)


def make_source(root: Path, rounds: list[int], settings: SyntheticSettings = SMALL) -> Path:
    generate_source(root, rounds, settings)
    return root


@pytest.fixture(scope="session", autouse=True)
def dbt_manifest() -> Path:
    """The dbt project's manifest, parsed once here (as the Definitions would on first use)."""
    return reporting.prepare_manifest(reporting.dbt_project)


@pytest.fixture(scope="session")
def small_source(tmp_path_factory) -> Path:
    """Rounds 1-2 at small size with one bad submission per rule (read-only: do not modify)."""
    return make_source(tmp_path_factory.mktemp("source"), [1, 2])


@pytest.fixture
def fresh_source(tmp_path) -> Path:
    """Rounds 1-2 at small size that a test may modify."""
    return make_source(tmp_path / "source", [1, 2])


@pytest.fixture
def instance():
    with dg.instance_for_test() as inst:
        yield inst


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresCluster]:
    """A private PostgreSQL cluster on loopback for the whole session (see tests/pgcluster.py).

    Skipped only where the machine has no PostgreSQL server binaries; any other failure to
    start it fails the tests that use it.
    """
    if postgres_bindir() is None:
        pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl): install Debian's postgresql")
    parent = postgres_dir()
    try:
        with postgres_cluster(parent) as cluster:
            yield cluster
    finally:
        shutil.rmtree(parent, ignore_errors=True)


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """One moto S3 server on loopback for the session (tests/s3server.py)."""
    with moto_s3() as endpoint:
        yield endpoint


@pytest.fixture(params=["local", "s3"])
def value_store(request, monkeypatch) -> str | None:
    """Where asset values live between steps, for tests that run with each store: None (the
    local default beside the warehouse) or a fresh s3://bucket/values on the moto server, with
    the platform's S3 environment set."""
    if request.param == "local":
        return None
    endpoint = request.getfixturevalue("s3_endpoint")
    for key, value in s3_env(endpoint).items():
        monkeypatch.setenv(key, value)
    bucket = f"values-{uuid.uuid4().hex[:12]}"
    client(endpoint).create_bucket(Bucket=bucket)
    return f"s3://{bucket}/values"


def platform(
    source: Path | str, tmp_path: Path, storage: str | None = None
) -> tuple[dg.Definitions, PlatformPaths]:
    """The platform's Definitions over `source`, a warehouse under `tmp_path`, values in
    `storage` (default: beside the warehouse)."""
    paths = PlatformPaths.create(str(source), str(tmp_path / "wh" / "warehouse.duckdb"), storage)
    return build_definitions(paths), paths


def background_run(source: Path, tmp: Path, *args: str) -> subprocess.Popen:
    """`tc-platform run --source source *args` into tmp/warehouse.duckdb, started in its own
    process (its own TC_HOME and Dagster instance under `tmp`, no TC_* or DAGSTER_* variable of
    this process) so that it scores beside the test; its output goes to tmp/output.txt."""
    tmp.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TC_", "DAGSTER_"))}
    env |= {
        "TC_HOME": str(tmp / "home"),
        "DAGSTER_HOME": str(tmp / "dagster_home"),
        "PYTHONPATH": str(REPO),
    }
    command = [sys.executable, "-m", "tc_assets.cli", "run", "--source", str(source)]
    with (tmp / "output.txt").open("w") as out:
        return subprocess.Popen(
            [*command, "--warehouse", str(tmp / "warehouse.duckdb"), *args],
            env=env,
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def run_job(
    defs: dg.Definitions,
    instance: dg.DagsterInstance,
    round_number: int,
    job: str = "score_round",
) -> dg.ExecuteInProcessResult:
    """Run a round's job in process on `instance`, adding the partition if needed."""
    key = str(round_number)
    if not instance.has_dynamic_partition(ROUNDS_PARTITIONS_NAME, key):
        instance.add_dynamic_partitions(ROUNDS_PARTITIONS_NAME, [key])
    return defs.resolve_job_def(job).execute_in_process(
        instance=instance, partition_key=key, raise_on_error=False
    )
