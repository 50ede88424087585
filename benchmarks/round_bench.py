"""Benchmark: a whole round through the `score_round` job against the floor of reading its inputs.

The round is generated once (``tc_assets.io.synthetic``, parquet submissions, defaults 5,000
stocks x 420 medium features x 5,000 models) under ``--cache`` and reused while its settings
match. In one run the benchmark then measures:

* the floor: every input file of the round (features.json, round.json, live, example
  predictions, market, stakes, resolved, every prediction and portfolio file) read once into
  memory by pyarrow, in a thread pool of ``--workers`` (the faster of two reads is kept; the
  files are in the page cache for the floor and the job alike);
* the whole ``score_round`` job as ``tc-platform run`` runs it (same Definitions, a fresh
  Dagster instance and warehouse), in a child process: its wall time, each step's time from
  the run's events, and the child's peak resident memory (``ru_maxrss`` of the largest process
  of the run, dbt's included);
* the size on disk of each intermediate value (the value store) against the raw float64 size
  of the (stocks x models) prediction matrix, and of the warehouse.

It prints the job/floor ratio and writes everything to ``<cache>/round_bench.json``.

    .venv/bin/python benchmarks/round_bench.py --stocks 5000 --features 420 --models 5000
    .venv/bin/python benchmarks/round_bench.py --stocks 1000 --features 60 --models 300
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import duckdb
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from tc_assets.io.synthetic import SyntheticSettings, generate_source

GIB = 2**30
ROUND = 1


def _generate(out: str, settings_json: str) -> None:
    generate_source(out, [ROUND], SyntheticSettings.model_validate_json(settings_json))


def ensure_source(root: Path, settings: SyntheticSettings) -> float:
    """Generate the round under ``root`` in a child process unless it is there; seconds spent."""
    stamp = root / "bench_settings.json"
    if stamp.exists() and stamp.read_text() == settings.model_dump_json():
        return 0.0
    shutil.rmtree(root, ignore_errors=True)
    start = time.perf_counter()
    proc = mp.get_context("spawn").Process(
        target=_generate, args=(str(root), settings.model_dump_json())
    )
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        raise SystemExit(f"generator failed with exit code {proc.exitcode}")
    stamp.write_text(settings.model_dump_json())
    return time.perf_counter() - start


def input_files(root: Path) -> list[Path]:
    """Every file ingestion reads for the round (planted.csv, the generator's notes, is not)."""
    rd = root / "rounds" / str(ROUND)
    files = [root / "features.json"]
    files += [p for p in sorted(rd.iterdir()) if p.is_file() and p.name != "planted.csv"]
    for folder in ("predictions", "portfolios"):
        files += sorted((rd / folder).iterdir())
    return files


def _read(path: Path) -> int:
    if path.suffix == ".parquet":
        return pq.read_table(path).nbytes
    if path.suffix == ".csv":
        return pacsv.read_csv(path).nbytes
    return len(path.read_bytes())


def read_floor(files: list[Path], workers: int) -> float:
    """Seconds to read every file once into memory with pyarrow."""
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        sum(pool.map(_read, files))
    return time.perf_counter() - start


def _run_job(source: str, work: str, out: str) -> None:
    """The job as `tc-platform run` runs it, in this (child) process; results to `out`."""
    os.environ["DAGSTER_HOME"] = str(Path(work) / "dagster_home")
    import dagster as dg

    from tc_assets.defs.definitions import PlatformPaths
    from tc_assets.runner import ensure_dagster_home, run_rounds

    ensure_dagster_home(Path(work) / "dagster_home")
    paths = PlatformPaths.create(source, str(Path(work) / "warehouse.duckdb"))
    with open(Path(work) / "run.log", "w") as log, dg.DagsterInstance.get() as instance:
        start = time.perf_counter()
        (outcome,) = run_rounds(paths, [ROUND], instance=instance, echo=lambda _: None, log=log)
        seconds = time.perf_counter() - start
        steps = {
            e.step_key: e.dagster_event.event_specific_data.duration_ms / 1000.0
            for e in instance.all_logs(outcome.run_id, of_type=dg.DagsterEventType.STEP_SUCCESS)
        }
    Path(out).write_text(
        json.dumps(
            {
                "success": outcome.success,
                "failures": outcome.failures,
                "seconds": seconds,
                "steps": steps,
                "storage": paths.storage,
                "warehouse": paths.warehouse,
            }
        )
    )


def run_job(source: Path, work: Path) -> dict:
    """The job in a child process; its results and the peak RSS of the run's processes."""
    out = work / "job.json"
    proc = mp.get_context("spawn").Process(target=_run_job, args=(str(source), str(work), str(out)))
    proc.start()
    proc.join()
    if proc.exitcode != 0 or not out.exists():
        raise SystemExit(f"the job's process failed (exit code {proc.exitcode}); see {work}")
    result = json.loads(out.read_text())
    result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / GIB
    return result


def value_sizes(storage: Path) -> dict[str, int]:
    """Bytes on disk of each asset's value of the round in the value store."""
    sizes = {}
    for path in sorted(storage.rglob("*")):
        if path.is_file() and path.name.startswith(str(ROUND)):
            sizes[str(path.parent.relative_to(storage))] = path.stat().st_size
    return sizes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--stocks", type=int, default=5000)
    ap.add_argument("--features", type=int, default=420, help="size of the medium feature set")
    ap.add_argument("--models", type=int, default=5000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=8, help="threads of the floor's reads")
    ap.add_argument(
        "--cache",
        type=Path,
        default=Path(__file__).resolve().parent / "results" / "round_bench",
        help="where the generated round is kept (reused while its settings match)",
    )
    args = ap.parse_args()
    settings = SyntheticSettings(
        stocks=args.stocks,
        features=args.features,
        models=args.models,
        seed=args.seed,
        file_format="parquet",
    )
    source = args.cache / "source"
    generated = ensure_source(source, settings)
    files = input_files(source)
    floor = min(read_floor(files, args.workers), read_floor(files, args.workers))
    with tempfile.TemporaryDirectory(prefix="round_bench_") as tmp:
        job = run_job(source, Path(tmp))
        if not job["success"]:
            raise SystemExit(f"score_round failed: {job['failures']}")
        shutil.copy(Path(tmp) / "run.log", args.cache / "run.log")  # Dagster's and dbt's log
        values = value_sizes(Path(job["storage"]))
        warehouse_bytes = Path(job["warehouse"]).stat().st_size
        with duckdb.connect(job["warehouse"], read_only=True) as con:
            n_ids, n_models = con.execute(
                "SELECT n_ids, n_prediction_models FROM rounds WHERE round = ?", [ROUND]
            ).fetchone()
    matrix_bytes = n_ids * n_models * 8
    total_values = sum(values.values())
    result = {
        "settings": settings.model_dump(),
        "generated_seconds": generated,
        "input_files": len(files),
        "input_bytes": sum(p.stat().st_size for p in files),
        "floor_seconds": floor,
        "job_seconds": job["seconds"],
        "ratio": job["seconds"] / floor,
        "steps": job["steps"],
        "peak_rss_gib": job["peak_rss_gib"],
        "values_bytes": values,
        "values_total_bytes": total_values,
        "accepted_prediction_models": n_models,
        "prediction_matrix_float64_bytes": matrix_bytes,
        "values_over_matrix": total_values / matrix_bytes,
        "warehouse_bytes": warehouse_bytes,
    }
    (args.cache / "round_bench.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"round of {args.stocks} stocks x {args.features} features x {args.models} models")
    print(f"  floor (pyarrow reads {len(files)} files once): {floor:8.2f} s")
    print(f"  score_round job, whole:                  {job['seconds']:8.2f} s")
    for step, seconds in sorted(job["steps"].items(), key=lambda kv: -kv[1]):
        if seconds >= 0.5:
            print(f"    {step:<46} {seconds:7.2f} s")
    print(f"  job / floor:                              {result['ratio']:8.2f}x (goal <= 4)")
    print(f"  peak memory of the run:                   {job['peak_rss_gib']:8.2f} GiB (goal <= 3)")
    print(
        f"  intermediate values: {total_values / 1e6:.1f} MB = "
        f"{result['values_over_matrix']:.2f}x the float64 prediction matrix "
        f"({matrix_bytes / 1e6:.1f} MB; goal <= 1.2x)"
    )
    for name, size in sorted(values.items(), key=lambda kv: -kv[1]):
        print(f"    {name:<30} {size / 1e6:9.2f} MB")
    print(f"  warehouse: {warehouse_bytes / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
