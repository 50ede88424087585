"""Benchmark of True Contribution on one full-size round: fast engine vs the cvxpylayers reference.

    python benchmarks/tc_bench.py --stocks 5000 --features 420 --models 5000 --bags 100

Data: round 1 of the synthetic generator at the given size (cached as arrays under
benchmarks/results/, gitignored), or `--data arrays` for random arrays of the same shapes.
Measured, each in a fresh subprocess so that its peak memory (ru_maxrss) is its own:

* fast: the whole round (`true_contribution`, all bags) on the CPU, and on cuda when present;
* reference: the cvxpylayers engine on ONE bag of the same round (layer construction timed
  apart), whose gradients are also compared with the fast engine's on that bag.

Prints a table; --json writes the figures. The per-bag ratio is reference time per bag over
fast time per bag (whole fast round / bags).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def _load_generated(stocks: int, features: int, models: int, seed: int) -> dict[str, np.ndarray]:
    """Round 1 of the generator, read with pandas into the engine's inputs."""
    import pandas as pd

    from tc_assets.io.synthetic import SyntheticSettings, generate_source
    from tc_assets.scoring.meta_model import prediction_matrix

    settings = SyntheticSettings(
        stocks=stocks, features=features, models=models, seed=seed, file_format="parquet"
    )
    with tempfile.TemporaryDirectory(prefix="tc_bench_") as tmp:
        generate_source(tmp, [1], settings)
        root = Path(tmp)
        d = root / "rounds" / "1"
        medium = json.loads((root / "features.json").read_text())["feature_sets"]["medium"]
        live = pd.read_parquet(d / "live.parquet").set_index("id")
        stakes = pd.read_csv(d / "stakes.csv").set_index("model_id")["stake"]
        row = pd.Series(np.arange(len(live)), index=live.index)
        files = [f for f in sorted((d / "predictions").glob("*.parquet")) if f.stem in stakes]
        raw = np.full((len(live), len(files)), np.nan)
        for j, f in enumerate(files):
            t = pd.read_parquet(f)
            raw[row[t["id"]].to_numpy(), j] = t["prediction"].to_numpy()
        resolved = pd.read_parquet(d / "resolved.parquet").set_index("id").reindex(live.index)
        adv = pd.read_parquet(d / "market.parquet").set_index("id")["adv_usd"]
        return {
            "p": prediction_matrix(raw),
            "stakes": stakes.reindex([f.stem for f in files]).to_numpy(float),
            "target": resolved["target"].to_numpy(),
            "features": live[medium].to_numpy(float),
            "adv": adv.reindex(live.index).to_numpy(),
        }


def _random_arrays(stocks: int, features: int, models: int, seed: int) -> dict[str, np.ndarray]:
    """Random inputs of the same shapes: a shared signal, feature tilts, noise."""
    from tc_assets.scoring.meta_model import prediction_matrix

    rng = np.random.default_rng(seed)
    feats = rng.integers(0, 5, (stocks, features)).astype(float)
    target = rng.choice([0.0, 0.25, 0.5, 0.75, 1.0], stocks, p=[0.05, 0.2, 0.5, 0.2, 0.05])
    signal = (target - 0.5) / 0.2 + rng.standard_normal(stocks)
    tilt = feats[:, rng.integers(0, features, models)] - 2.0
    raw = 0.1 * signal[:, None] + 0.1 * tilt + rng.standard_normal((stocks, models))
    return {
        "p": prediction_matrix(raw),
        "stakes": rng.lognormal(0.0, 1.0, models),
        "target": target,
        "features": feats,
        "adv": np.exp(rng.normal(np.log(2e7), 1.5, stocks)),
    }


def prepare(args: argparse.Namespace) -> Path:
    """The round's arrays, cached in benchmarks/results/; returns the .npz path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = f"round_{args.data}_{args.stocks}x{args.features}x{args.models}_s{args.seed}.npz"
    path = RESULTS / name
    if not path.exists():
        start = time.perf_counter()
        make = _load_generated if args.data == "generated" else _random_arrays
        arrays = make(args.stocks, args.features, args.models, args.seed)
        np.savez(path, **arrays)
        print(f"prepared {name} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return path


def _worker(kind: str, data: Path, bags: int, device: str, threads: int | None) -> dict:
    """One measurement in this (fresh) process; returns its figures."""
    import torch

    from tc_assets.scoring.contribution import TCSettings, round_masks, true_contribution
    from tc_assets.scoring.optimizer import build_spec

    z = np.load(data)
    p, stakes, target = z["p"], z["stakes"], z["target"]
    spec = build_spec(z["features"], z["adv"])
    settings = TCSettings(bags=bags, device=device)
    if threads:
        settings = settings.model_copy(update={"cpu_threads": threads})
    base = {"threads": settings.cpu_threads or torch.get_num_threads()}
    if kind == "fast":
        if device == "cuda":  # warm-up: CUDA context and kernels, not part of the round
            true_contribution(p, stakes, target, spec, settings.model_copy(update={"bags": 2}))
            torch.cuda.synchronize()
        res = true_contribution(p, stakes, target, spec, settings, label="bench")
        pf = res.portfolio
        out = base | {
            "seconds": res.seconds,
            "per_bag_s": res.time_per_bag_s,
            "bags": res.bags,
            "device": res.device,
            "iterations_mean": float(res.iterations.mean()),
            "iterations_max": int(res.iterations.max()),
            "kkt_max": res.kkt_max,
            "split_half": res.split_half(),
            "unbagged_corr": float(np.corrcoef(res.tc, res.unbagged_tc)[0, 1]),
            "active_caps": pf.active_caps,
            "active_exposures": pf.active_exposures,
            "free_positions": pf.free_positions,
            "timings": res.timings,
            "bag0_raw": (res.bag_tc[0] * res.scale).tolist(),
        }
        if device == "cuda":
            out["gpu_peak_bytes"] = int(torch.cuda.max_memory_allocated())
    else:
        from tc_assets.scoring._tc_reference import _layer_bag, build_layer, solver_args

        mask = round_masks(stakes, settings)[0]
        start = time.perf_counter()
        layer = build_layer(spec)
        built = time.perf_counter()
        t = torch.as_tensor(target - target.mean())
        grad, _, _, _, ret, *_ = _layer_bag(
            layer,
            torch.as_tensor(p),
            stakes,
            t,
            mask,
            1.0 - settings.dropout,
            solver_args(settings),
        )
        done = time.perf_counter()
        out = base | {
            "build_s": built - start,
            "per_bag_s": done - built,
            "bag0_raw": (grad * stakes.sum()).tolist(),
            "bag0_return": ret,
        }
    out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return out


def _run_worker(kind: str, data: Path, args: argparse.Namespace, device: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--cache", str(data)]
    cmd += ["--bags", str(args.bags), "--device", device]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} worker failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--stocks", type=int, default=5000)
    ap.add_argument("--features", type=int, default=420)
    ap.add_argument("--models", type=int, default=5000)
    ap.add_argument("--bags", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", choices=["generated", "arrays"], default="generated")
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: TCSettings.cpu_threads, i.e. 1)",
    )
    ap.add_argument("--no-reference", action="store_true", help="skip the cvxpylayers bag")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per measurement")
    ap.add_argument("--json", type=Path, default=None, help="write the figures here")
    ap.add_argument("--worker", choices=["fast", "reference"], help=argparse.SUPPRESS)
    ap.add_argument("--cache", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(_worker(args.worker, args.cache, args.bags, args.device, args.threads)))
        return

    import torch

    data = prepare(args)
    fast = _run_worker("fast", data, args, "cpu")
    gpu = _run_worker("fast", data, args, "cuda") if torch.cuda.is_available() else None
    ref = None if args.no_reference else _run_worker("reference", data, args, "cpu")

    gib = 2**30
    print(
        f"\nTC benchmark: {args.stocks} stocks x {args.features} features x {args.models} models, "
        f"{args.bags} bags, data={args.data}, torch threads={fast['threads']}"
    )
    print(
        f"meta portfolio: {fast['active_caps']} positions at a cap, {fast['active_exposures']} "
        f"exposure limits binding, {fast['free_positions']} free; Newton iterations per bag "
        f"{fast['iterations_mean']:.1f} (max {fast['iterations_max']}), KKT <= {fast['kkt_max']:.1e}"
    )
    print(
        f"stability: split-half {fast['split_half']:.4f}, corr(bagged, unbagged) {fast['unbagged_corr']:.4f}"
    )
    rows = [
        ("fast, CPU, whole round", fast["seconds"], fast["per_bag_s"], fast["peak_rss_bytes"] / gib)
    ]
    if gpu:
        rows.append(
            (
                "fast, GPU, whole round",
                gpu["seconds"],
                gpu["per_bag_s"],
                gpu["gpu_peak_bytes"] / gib,
            )
        )
    if ref:
        rows.append(("reference, layer build", ref["build_s"], float("nan"), float("nan")))
        rows.append(
            ("reference, ONE bag", ref["per_bag_s"], ref["per_bag_s"], ref["peak_rss_bytes"] / gib)
        )
    print(f"\n{'engine':<26}{'seconds':>10}{'s / bag':>10}{'peak GiB':>10}")
    for name, sec, per, mem in rows:
        print(f"{name:<26}{sec:>10.2f}{per:>10.3f}{mem:>10.2f}")
    verdict = {"fast_whole_round_s": fast["seconds"], "fast_peak_gib": fast["peak_rss_bytes"] / gib}
    print(
        f"\nfast whole round <= 60 s: {fast['seconds'] <= 60}; peak memory < 8 GiB: "
        f"{fast['peak_rss_bytes'] < 8 * gib}"
    )
    if ref:
        ratio = ref["per_bag_s"] / fast["per_bag_s"]
        a, b = np.array(fast["bag0_raw"]), np.array(ref["bag0_raw"])
        print(
            f"per-bag ratio reference / fast: {ratio:.0f}x (goal >= 100x); bag 0 stake "
            f"gradients fast vs reference: Pearson {np.corrcoef(a, b)[0, 1]:.6f}, max rel diff "
            f"{np.abs(a - b).max() / np.abs(b).max():.2e}"
        )
        verdict |= {"reference_per_bag_s": ref["per_bag_s"], "ratio": ratio}
    if gpu:
        verdict |= {"gpu_whole_round_s": gpu["seconds"]}
    if args.json:
        args.json.write_text(
            json.dumps({"fast": fast, "gpu": gpu, "reference": ref} | verdict, indent=1)
        )


if __name__ == "__main__":
    main()
