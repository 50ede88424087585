"""Benchmark: the whole per-model metrics step of one round, and numerai-tools model by model.

The step = SWMM (``meta_model.swmm``), feature-only metrics with every exposure
(``metrics.feature_metrics``) and target metrics (``metrics.target_metrics``) for every model
of a generated round (``tc_assets.io.synthetic``, defaults 5,000 stocks x 420 medium features x
5,000 models), and the DuckDB writes of the metrics assets (the long ``feature_exposures``
table has models x features rows). In the same run, ``numerai_tools.scoring`` scores
``--reference-models`` of those models one by one (numerai_corr, correlation_contribution,
feature_neutral_corr with and without top_bottom, a Pearson per feature for the exposures),
which gives the speed ratio; the results are compared too.

Memory: the resident set size (RSS) of this process, sampled every 2 ms by a thread reading
/proc/self/statm while the step runs (peak and increase over the RSS before the step), and
``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (the kernel's exact lifetime peak, which also
covers loading the round; the generator runs in a child process so it does not count).

    .venv/bin/python benchmarks/metrics_bench.py                     # full size
    .venv/bin/python benchmarks/metrics_bench.py --stocks 1000 --features 60 --models 300
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from numerai_tools import scoring as ns

from tc_assets.io.synthetic import SyntheticSettings, generate_source
from tc_assets.io.warehouse import Warehouse
from tc_assets.scoring.meta_model import swmm
from tc_assets.scoring.metrics import (
    MODEL_METRICS,
    MetricsSettings,
    exposures_long,
    feature_metrics,
    target_metrics,
)

GIB = 2**30
PAGE = os.sysconf("SC_PAGE_SIZE")


# --- data ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RoundData:
    predictions: pd.DataFrame
    features: pd.DataFrame
    example: pd.Series
    target: pd.Series
    stakes: pd.Series


def _generate(out: str, settings_json: str) -> None:
    generate_source(out, [1], SyntheticSettings.model_validate_json(settings_json))


def ensure_source(root: Path, settings: SyntheticSettings) -> float:
    """Generate round 1 under ``root`` in a child process unless it is there; seconds spent."""
    stamp = root / "bench_settings.json"
    if stamp.exists() and stamp.read_text() == settings.model_dump_json():
        return 0.0
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


def load_round(root: Path) -> RoundData:
    """Round 1 as wide frames (ids sorted; NaN where a model did not submit)."""
    rd = root / "rounds" / "1"
    medium = json.loads((root / "features.json").read_text())["feature_sets"]["medium"]
    live = pq.read_table(rd / "live.parquet", columns=["id", *medium]).to_pandas()
    features = live.set_index("id").sort_index().astype(np.float64)
    ids = features.index
    files = sorted((rd / "predictions").glob("*.csv"))
    x = np.full((len(ids), len(files)), np.nan, order="F")
    for j, path in enumerate(files):
        t = pacsv.read_csv(path)
        pos = ids.get_indexer(t.column("id").to_pandas())
        x[pos, j] = t.column("prediction").to_numpy()
    predictions = pd.DataFrame(x, index=ids, columns=pd.Index([p.stem for p in files]))
    example = pq.read_table(rd / "example_predictions.parquet").to_pandas().set_index("id")
    resolved = pq.read_table(rd / "resolved.parquet").to_pandas().set_index("id")
    stakes = pd.read_csv(rd / "stakes.csv").set_index("model_id")["stake"]
    return RoundData(predictions, features, example["prediction"], resolved["target"], stakes)


# --- measurement -----------------------------------------------------------------------------


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * PAGE


class PeakRss:
    """Peak RSS of this process while the block runs, sampled by a thread every ``interval``."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval, self.peak, self.before = interval, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def __enter__(self) -> PeakRss:
        self.before = self.peak = rss_bytes()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def metrics_step(
    d: RoundData,
    predictions: pd.DataFrame,
    cfg: MetricsSettings,
    timings: dict[str, float],
    meta_model: pd.Series | None = None,
    warehouse: Warehouse | None = None,
) -> pd.DataFrame:
    """The step for the models of ``predictions``: SWMM (unless given), feature and target
    metrics and, with a warehouse, writing what the assets write (meta_model, the long
    feature_exposures table, exposure_metrics, model_metrics) as they do."""
    t0 = time.perf_counter()
    if meta_model is None:
        meta_model = swmm(d.predictions, d.stakes)
    t1 = time.perf_counter()
    per_model, exposures = feature_metrics(predictions, d.features, d.example, cfg)
    t2 = time.perf_counter()
    target = target_metrics(predictions, d.features, d.target, meta_model, cfg)
    t3 = time.perf_counter()
    metrics = target.join(per_model)[list(MODEL_METRICS)]
    if warehouse is not None:
        swmm_rows = pd.DataFrame(
            {"id": meta_model.index.to_numpy(), "swmm": meta_model.to_numpy(), "weight": np.nan}
        )
        warehouse.write_round(1, {"meta_model": swmm_rows})
        warehouse.write_round(
            1,
            {
                "feature_exposures": exposures_long(exposures),
                "exposure_metrics": per_model.reset_index(),
            },
        )
        warehouse.write_round(1, {"model_metrics": metrics.reset_index()})
    t4 = time.perf_counter()
    timings |= {
        "swmm": t1 - t0,
        "feature_metrics": t2 - t1,
        "target_metrics": t3 - t2,
        "write": t4 - t3,
    }
    return metrics


def numerai_per_model(d: RoundData, models: list[str], meta_model: pd.Series) -> pd.DataFrame:
    """The same metrics by numerai-tools, one model at a time."""
    target = d.target.dropna().rename("target")
    ex = d.example.dropna()
    e = d.features.loc[ex.index].apply(lambda f: ns.pearson_correlation(f, ex))
    rows = {}
    for model in models:
        s = d.predictions[model].dropna()
        dom = s.index.intersection(target.index)
        sd = s.loc[dom].to_frame()
        fd = d.features.loc[dom]
        u = d.features.loc[s.index].apply(lambda f, s=s: ns.pearson_correlation(f, s))
        rows[model] = {
            "corr": ns.numerai_corr(sd, target).iloc[0],
            "mmc": ns.correlation_contribution(sd, meta_model, target).iloc[0],
            "fnc_v3": ns.feature_neutral_corr(sd, fd, target).iloc[0],
            "fnc_v3_tb200": ns.feature_neutral_corr(sd, fd, target, top_bottom=200).iloc[0],
            "exposure_dissimilarity": 1.0 - np.nansum(u * e) / np.nansum(e * e),
            "max_feature_exposure": u.abs().max(),
        }
    return pd.DataFrame.from_dict(rows, orient="index")


def _blas_threads(n: int | None):  # noqa: ANN202 - context manager from threadpoolctl
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=n, user_api="blas")


# --- main ------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--stocks", type=int, default=5000)
    ap.add_argument("--features", type=int, default=420, help="size of the medium feature set")
    ap.add_argument("--models", type=int, default=5000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reference-models", type=int, default=200, help="models numerai-tools scores")
    ap.add_argument("--block-models", type=int, default=MetricsSettings().block_models)
    ap.add_argument(
        "--blas-threads",
        type=int,
        default=MetricsSettings().blas_threads,
        help="BLAS threads inside our step (MetricsSettings.blas_threads; 0 = library default)",
    )
    ap.add_argument(
        "--reference-blas-threads",
        type=int,
        default=1,
        help="BLAS threads while numerai-tools runs (1: its many small lstsq calls are much "
        "faster single-threaded on this box; 0 = library default)",
    )
    ap.add_argument(
        "--source",
        type=Path,
        default=None,
        help="where the generated round lives (reused when its settings match); default: a "
        "fresh temporary directory",
    )
    args = ap.parse_args()

    settings = SyntheticSettings(
        stocks=args.stocks, features=args.features, models=args.models, seed=args.seed
    )
    cfg = MetricsSettings(block_models=args.block_models, blas_threads=args.blas_threads or None)
    tmp = None
    if args.source is None:
        tmp = tempfile.TemporaryDirectory(prefix="metrics_bench_")
        args.source = Path(tmp.name)
    args.source.mkdir(parents=True, exist_ok=True)
    gen_s = ensure_source(args.source, settings)

    t = time.perf_counter()
    d = load_round(args.source)
    load_s = time.perf_counter() - t
    n, m = d.predictions.shape
    partial = int(d.predictions.isna().any().sum())

    # 1. The whole step, every model.
    timings: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="metrics_bench_wh_") as wh_dir, PeakRss() as mem:
        warehouse = Warehouse(Path(wh_dir) / "warehouse.duckdb")
        t = time.perf_counter()
        ours = metrics_step(d, d.predictions, cfg, timings, warehouse=warehouse)
        step_s = time.perf_counter() - t
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    # 2. The same reference models: ours alone on them, then numerai-tools one by one.
    k = min(args.reference_models, m)
    models = list(d.predictions.columns[np.linspace(0, m - 1, k).round().astype(int)])
    meta_model = swmm(d.predictions, d.stakes)  # an input of both, as in numerai-tools
    t = time.perf_counter()
    metrics_step(d, d.predictions[models], cfg, {}, meta_model)
    ours_k_s = time.perf_counter() - t
    threads = args.reference_blas_threads or None
    with _blas_threads(threads):
        t = time.perf_counter()
        ref = numerai_per_model(d, models, meta_model)
        ref_s = time.perf_counter() - t
    diff = (ours.loc[models, list(MODEL_METRICS)] - ref[list(MODEL_METRICS)]).abs().max()

    per_model_ours = step_s / m
    per_model_ref = ref_s / k
    rows = [
        ("round", f"{n} stocks x {d.features.shape[1]} features x {m} models ({partial} partial)"),
        ("generate (child process, not timed in the step)", f"{gen_s:.1f} s"),
        ("load round (not in the step)", f"{load_s:.1f} s"),
        ("step: swmm", f"{timings['swmm']:.2f} s"),
        ("step: feature_metrics (exposures, dissimilarity)", f"{timings['feature_metrics']:.2f} s"),
        ("step: target_metrics (corr, mmc, fnc_v3, tb200)", f"{timings['target_metrics']:.2f} s"),
        ("step: DuckDB writes (4 tables, long exposures)", f"{timings['write']:.2f} s"),
        ("step: total, all models", f"{step_s:.2f} s  ({1e3 * per_model_ours:.2f} ms/model)"),
        ("step: BLAS threads, block size", f"{cfg.blas_threads or 'default'}, {cfg.block_models}"),
        ("peak RSS during step (sampled 2 ms)", f"{mem.peak / GIB:.2f} GiB"),
        ("RSS increase during step", f"{(mem.peak - mem.before) / GIB:.2f} GiB"),
        ("ru_maxrss (process lifetime: load + step)", f"{maxrss / GIB:.2f} GiB"),
        (f"ours, the {k} reference models only (SWMM given)", f"{ours_k_s:.2f} s"),
        (
            f"numerai-tools, {k} models one by one (BLAS threads: {threads or 'default'})",
            f"{ref_s:.1f} s  ({1e3 * per_model_ref:.0f} ms/model)",
        ),
        (
            "speed ratio, per model (numerai / full-round step)",
            f"{per_model_ref / per_model_ours:.0f}x",
        ),
        (f"speed ratio, same {k} models (numerai / ours)", f"{ref_s / ours_k_s:.0f}x"),
        ("max |ours - numerai| over the reference models", f"{diff.max():.1e}"),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"\n{'metrics step benchmark':<{width}}   value")
    print("-" * (width + 40))
    for name, value in rows:
        print(f"{name:<{width}}   {value}")
    print("\nmax |ours - numerai| by metric: " + ", ".join(f"{c} {v:.1e}" for c, v in diff.items()))
    nan_mismatch = int(
        (ours.loc[models, list(MODEL_METRICS)].isna() != ref[list(MODEL_METRICS)].isna())
        .sum()
        .sum()
    )
    print(f"values NaN in one and not the other: {nan_mismatch}")
    # Memory: the kernel's exact peak (ru_maxrss) covers loading the round too, so it bounds
    # the step's peak from above; the sampled RSS can miss a short spike.
    targets = {
        "time < 60 s": step_s < 60,
        "peak memory < 8 GiB": max(mem.peak, maxrss) < 8 * GIB,
        f"ratio on the same {k} models >= 20x": ref_s / ours_k_s >= 20,
        "equal to numerai-tools within 1e-9": bool(diff.max() <= 1e-9) and nan_mismatch == 0,
    }
    print(
        "targets: "
        + ", ".join(f"{name}: {'met' if ok else 'MISSED'}" for name, ok in targets.items())
    )
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
