"""Benchmark: rounds per minute on the DuckDB file (serially) and on a DuckLake (in parallel),
and what a round's writes cost on the lake.

In one run, on the same generated rounds (``tc_assets.io.synthetic``):

* **file**: one ``tc-platform run`` process scores the N rounds one after the other into a
  DuckDB file (its only way: one writer per file);
* **lake**: ``--workers`` ``tc-platform run`` processes score the N rounds at once (round i goes
  to worker i mod workers) into a DuckLake, catalog in PostgreSQL, data on S3;
* **writes**: every round's rows of the platform's tables, read back from the file, are written
  again in one transaction per round (``Warehouse.write_round``) into a fresh DuckDB file and
  into a fresh lake: seconds per round on each, and the ratio.

Both pipelines run the whole ``score_round`` job, dbt included, with the same Dagster
definitions; wall time includes each process's start. The lake is a private PostgreSQL cluster
on loopback and moto's S3 server (the test suite's helpers, ``tests/pgcluster.py`` and
``tests/s3server.py``): the figures are those of local servers, not of a network.

    PYTHONPATH=. .venv/bin/python benchmarks/lake_bench.py                  # 4 rounds, 2 workers
    PYTHONPATH=. .venv/bin/python benchmarks/lake_bench.py --rounds 8 --stocks 1500 --models 40
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tc_assets.io import lake  # noqa: E402
from tc_assets.io.synthetic import SyntheticSettings, generate_source  # noqa: E402
from tc_assets.io.tables import TABLES  # noqa: E402
from tc_assets.io.warehouse import Warehouse  # noqa: E402

BUCKET = "tc-lake-bench"


@contextlib.contextmanager
def local_lake(tmp: Path) -> Iterator[tuple[Callable[[str], str], str]]:
    """A private PostgreSQL cluster and moto's S3 server; yields (new catalog URL maker, prefix)."""
    from tests.pgcluster import postgres_cluster, postgres_dir
    from tests.s3server import client, moto_s3, s3_env

    with postgres_cluster(postgres_dir()) as pg, moto_s3() as endpoint:
        client(endpoint).create_bucket(Bucket=BUCKET)
        os.environ.update(s3_env(endpoint))
        yield (lambda name: f"ducklake:postgres:{pg.create_database(name)}"), f"s3://{BUCKET}"


def run_cli(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with log.open("w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "tc_assets.cli", "run", *args],
            env={**os.environ, "PYTHONPATH": str(ROOT), **env},
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def score(
    source: Path, warehouse: str, data: str | None, groups: list[list[int]], tmp: Path
) -> float:
    """Wall seconds for one `tc-platform run` process per group of rounds, all started at once."""
    start = time.perf_counter()
    procs = []
    for i, rounds in enumerate(groups):
        home = tmp / f"home_{Path(warehouse).name}_{i}"
        env = {"TC_HOME": str(home), "DAGSTER_HOME": str(home / "dagster_home")}
        if data:
            env[lake.DATA_PATH_ENV] = data
        spec = ",".join(map(str, rounds))
        args = ["--source", str(source), "--warehouse", warehouse, "--rounds", spec]
        procs.append((run_cli(args, env, tmp / f"worker_{i}.log"), tmp / f"worker_{i}.log"))
    for proc, log in procs:
        if proc.wait() != 0:
            raise SystemExit(f"a run failed; see {log}:\n{log.read_text()[-3000:]}")
    return time.perf_counter() - start


def write_seconds(reference: Warehouse, target: Warehouse, rounds: list[int]) -> list[float]:
    """Seconds to write each round's rows of every table (one transaction per round)."""
    present = set(reference.table_names())
    out = []
    for r in rounds:
        frames = {
            name: reference.read_round(name, r)
            for name, spec in TABLES.items()
            if name in present and spec.partition == "round"
        }
        start = time.perf_counter()
        target.write_round(r, frames)
        out.append(time.perf_counter() - start)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--stocks", type=int, default=1500)
    parser.add_argument("--features", type=int, default=60)
    parser.add_argument("--models", type=int, default=40)
    args = parser.parse_args()

    rounds = list(range(1, args.rounds + 1))
    with tempfile.TemporaryDirectory(prefix="lake_bench_") as tmp_name:
        tmp = Path(tmp_name)
        settings = SyntheticSettings(
            stocks=args.stocks, features=args.features, models=args.models, seed=1
        )
        generate_source(tmp / "source", rounds, settings)
        with local_lake(tmp) as (make, prefix):
            print(
                f"{args.rounds} rounds of {args.stocks} stocks x {args.features} features x "
                f"{args.models} models; file: 1 process, lake: {args.workers} processes",
                flush=True,
            )
            file_path = str(tmp / "file" / "warehouse.duckdb")
            file_s = score(tmp / "source", file_path, None, [rounds], tmp)
            print(f"file  serial:   {file_s:7.1f} s  {60 * len(rounds) / file_s:6.2f} rounds/min")
            groups = [rounds[i :: args.workers] for i in range(args.workers)]
            catalog, data = make("bench_runs"), f"{prefix}/bench_runs/"
            lake_s = score(tmp / "source", catalog, data, groups, tmp)
            print(
                f"lake  parallel: {lake_s:7.1f} s  {60 * len(rounds) / lake_s:6.2f} rounds/min  "
                f"({file_s / lake_s:.2f}x the file)"
            )
            reference = Warehouse(file_path)
            to_file = write_seconds(reference, Warehouse(tmp / "copy.duckdb"), rounds)
            to_lake = write_seconds(
                reference, Warehouse(make("bench_writes"), data_path=f"{prefix}/writes/"), rounds
            )
            f_mean, l_mean = sum(to_file) / len(to_file), sum(to_lake) / len(to_lake)
            print(
                f"write of a round's tables (one transaction): file {f_mean:.2f} s, "
                f"lake {l_mean:.2f} s ({l_mean / f_mean:.1f}x, +{l_mean - f_mean:.2f} s per round)"
            )


if __name__ == "__main__":
    main()
