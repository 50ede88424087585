"""Benchmark of candidate scoring: many candidates over many full-size rounds, beside one TC.

    python benchmarks/candidate_bench.py --stocks 5000 --features 420 --models 5000 \\
        --candidates 1000 --rounds 20

Data: round 1 of the synthetic generator at the given size (the same cache as `tc_bench.py`,
under benchmarks/results/). Measured in one run:

* one full TC computation of that round (`true_contribution`, 100 bags), which gives g and c;
* the TC of C candidates over R rounds from g and c (ranks and one matrix product per round);
* the whole `score_candidate` over a warehouse and a source of R rounds (copies of that round:
  the same size, so the same cost per round), candidates in one wide parquet file, with CORR,
  MMC, FNCv3 and max feature exposure besides TC.

Checked in the same run: 10 candidates appended to the round with zero stake and TC recomputed
in full get the TC that the dot product gave them, to 1e-9. Prints a table; --json writes it.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tc_bench import prepare  # noqa: E402

from tc_assets.candidates import score_candidate  # noqa: E402
from tc_assets.io.warehouse import Warehouse  # noqa: E402
from tc_assets.scoring.contribution import (  # noqa: E402
    candidate_tc,
    tc_summary,
    true_contribution,
)
from tc_assets.scoring.meta_model import prediction_matrix  # noqa: E402
from tc_assets.scoring.optimizer import build_spec  # noqa: E402


def _candidates(z: dict, n: int, seed: int) -> np.ndarray:
    """(stocks, n) predictions in (0, 1): random mixes of the target, features and noise."""
    rng = np.random.default_rng(seed)
    stocks = z["target"].size
    t = (z["target"] - z["target"].mean()) / z["target"].std()
    f = z["features"][:, rng.integers(0, z["features"].shape[1], n)]
    f = (f - f.mean(axis=0)) / (f.std(axis=0) + 1e-12)
    raw = rng.uniform(0, 0.3, n) * t[:, None] + rng.uniform(0, 0.5, n) * f
    raw += rng.standard_normal((stocks, n))
    return (raw.argsort(axis=0).argsort(axis=0) + 1) / (stocks + 1)


def _world(root: Path, z: dict, res, rounds: int) -> tuple[Path, Path, pd.Index]:
    """A round source and a warehouse holding `rounds` copies of the benchmark round."""
    stocks, k = z["features"].shape
    ids = pd.Index([f"id{i:06d}" for i in range(stocks)], name="id")
    names = [f"feature_{j:04d}" for j in range(k)]
    source = root / "source"
    (source / "rounds").mkdir(parents=True)
    sets = {"small": names[:10], "medium": names, "all": names}
    (source / "features.json").write_text(json.dumps({"feature_sets": sets}))
    live = pd.DataFrame(z["features"], columns=names).assign(id=ids, era="era1")
    wh = Warehouse(str(root / "warehouse.duckdb"))
    target = z["target"] - z["target"].mean()
    x = z["p"] @ (z["stakes"] / z["stakes"].sum())
    summary = tc_summary(res, np.full(res.tc.size, np.nan), target, "bench")
    for r in range(1, rounds + 1):
        (source / "rounds" / str(r)).mkdir()
        live.to_parquet(source / "rounds" / str(r) / "live.parquet", index=False)
        wh.write_round(
            r,
            {
                "tc_scale": pd.DataFrame([summary]),
                "tc_vectors": pd.DataFrame({"id": ids, "g": res.g}),
                "resolved": pd.DataFrame({"id": ids, "target": z["target"], "return": target}),
                "meta_model": pd.DataFrame({"id": ids, "swmm": x, "weight": res.portfolio.weights}),
            },
        )
    return source, root / "warehouse.duckdb", ids


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--stocks", type=int, default=5000)
    ap.add_argument("--features", type=int, default=420)
    ap.add_argument("--models", type=int, default=5000)
    ap.add_argument("--candidates", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = ap.parse_args()
    args.data = "generated"
    z = dict(np.load(prepare(args)))
    spec = build_spec(z["features"], z["adv"])

    start = time.perf_counter()
    res = true_contribution(z["p"], z["stakes"], z["target"], spec, label="bench")
    full_tc = time.perf_counter() - start

    cands = _candidates(z, args.candidates, args.seed)
    start = time.perf_counter()
    for _ in range(args.rounds):
        tc = candidate_tc(prediction_matrix(cands), res.g, res.c)
    tc_only = time.perf_counter() - start

    few = prediction_matrix(cands[:, :10])
    joined = true_contribution(
        np.column_stack([z["p"], few]), np.append(z["stakes"], np.zeros(10)), z["target"], spec
    )
    exact = float(np.abs(joined.tc[-10:] - tc[:10]).max() / np.abs(joined.tc).max())

    with tempfile.TemporaryDirectory(prefix="candidate_bench_") as tmp:
        source, warehouse, ids = _world(Path(tmp), z, res, args.rounds)
        wide = pd.DataFrame(cands, columns=[f"c{i:04d}" for i in range(args.candidates)])
        wide.insert(0, "id", ids)
        wide.to_parquet(Path(tmp) / "wide.parquet", index=False)
        start = time.perf_counter()
        scores = score_candidate(
            warehouse, range(1, args.rounds + 1), Path(tmp) / "wide.parquet", str(source)
        )
        whole = time.perf_counter() - start
    assert len(scores.rounds) == args.candidates * args.rounds and scores.rejections.empty
    figures = {
        "one full TC (s)": full_tc,
        f"TC of {args.candidates} candidates x {args.rounds} rounds (s)": tc_only,
        "ratio to one full TC": tc_only / full_tc,
        f"score_candidate, {args.candidates} x {args.rounds}, all metrics (s)": whole,
        "its ratio to one full TC": whole / full_tc,
        "max relative difference, dot product vs full TC with the candidates": exact,
    }
    for name, value in figures.items():
        print(f"{name:>72}: {value:.4g}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
