"""How stable bagged TC is on generated rounds, against the published claims.

    python benchmarks/tc_stability.py --rounds 1-4                      # the demo's size
    python benchmarks/tc_stability.py --rounds 1-4 --models 400 --stocks 3000 --features 120

For each round of the synthetic generator (read through the platform's own ingestion), TC is
computed with the default settings (100 bags, dropout 0.5, antithetic pairs) for two dropout
seeds, and beside it the plain gradient at the full stakes (no dropout). Printed per round and
on average:

* seed_corr: Pearson correlation across models of the TC of seed 0 and seed 1 (the published
  claim: 99.5% across dropout seeds), and seed_spearman;
* unbagged_corr: correlation of bagged TC with the unbagged gradient (published: about 90%);
* tc_std / corr_std: TC's spread in units of CORR's;

each with and without the generator's planted `perfect` and `perfect_negated` models, two points
far out that carry any correlation they are part of. --json writes the figures.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from numerai_tools.scoring import numerai_corr
from scipy.stats import spearmanr

from tc_assets.io.ingest import ingest_round
from tc_assets.io.source import LocalRoundSource
from tc_assets.io.synthetic import SyntheticSettings, generate_source
from tc_assets.scoring.contribution import TCSettings, true_contribution
from tc_assets.scoring.meta_model import prediction_matrix
from tc_assets.scoring.optimizer import build_spec

PUBLISHED = {"seed_corr": 0.995, "unbagged_corr": 0.90}
PAIR = ("perfect", "perfect_negated")


def round_figures(root: Path, r: int) -> dict[str, float]:
    """The stability figures of round r of a generated source."""
    inputs = ingest_round(LocalRoundSource(root), r)
    d = root / "rounds" / str(r)
    kinds = pd.read_csv(d / "planted.csv").set_index("model_id")["kind"]
    target = pd.read_parquet(d / "resolved.parquet").set_index("id")["target"]
    target = target.reindex(inputs.ids)
    preds = inputs.predictions.reindex(inputs.ids)
    stakes = inputs.stakes["stake"].reindex(preds.columns).fillna(0.0).to_numpy()
    adv = None if inputs.market is None else inputs.market.reindex(inputs.ids).to_numpy()
    spec = build_spec(inputs.live[inputs.medium].to_numpy(float), adv)
    p = prediction_matrix(preds.to_numpy(dtype=np.float64))
    t = target.fillna(target.mean()).to_numpy()
    runs = [
        true_contribution(p, stakes, t, spec, TCSettings(seed=seed), label=str(r))
        for seed in (0, 1)
    ]
    corr = np.array(
        [numerai_corr(preds[[m]].dropna(), target.rename("target"))[m] for m in preds.columns]
    )
    rest = ~np.isin(kinds.reindex(preds.columns).to_numpy(), PAIR)
    out: dict[str, float] = {"round": r, "models": p.shape[1], "stocks": p.shape[0]}
    for tag, keep in (("", np.ones_like(rest)), ("_without_pair", rest)):
        a, b, u = runs[0].tc[keep], runs[1].tc[keep], runs[0].unbagged_tc[keep]
        out[f"seed_corr{tag}"] = float(np.corrcoef(a, b)[0, 1])
        out[f"seed_spearman{tag}"] = float(spearmanr(a, b)[0])
        out[f"unbagged_corr{tag}"] = float(np.corrcoef(a, u)[0, 1])
        out[f"tc_std_over_corr_std{tag}"] = float(a.std() / corr[keep].std())
    out["split_half"] = runs[0].split_half()
    out["untradable_bags"] = len(runs[0].untradable_bags)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", default="1-4", help="A-B (default 1-4)")
    parser.add_argument("--stocks", type=int, default=1500)
    parser.add_argument("--features", type=int, default=60)
    parser.add_argument("--models", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0, help="generator seed")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    a, _, b = args.rounds.partition("-")
    rounds = list(range(int(a), int(b or a) + 1))
    settings = SyntheticSettings(
        stocks=args.stocks, features=args.features, models=args.models, seed=args.seed
    )
    with tempfile.TemporaryDirectory(prefix="tc_stability_") as tmp:
        root = Path(tmp)
        generate_source(root, rounds, settings)
        rows = [round_figures(root, r) for r in rounds]
    table = pd.DataFrame(rows).set_index("round")
    table.loc["mean"] = table.mean()
    shown = [c for c in table.columns if c not in ("models", "stocks")]
    print(
        f"TC stability, default settings (100 bags, dropout 0.5, antithetic), generated rounds "
        f"of {args.stocks} stocks x {args.features} features x {args.models} models:"
    )
    print(table[shown].T.round(4).to_string())
    mean = table.loc["mean"]
    for name, claim in PUBLISHED.items():
        print(
            f"{name}: {mean[name]:.3f} with the planted pair, {mean[name + '_without_pair']:.3f} "
            f"without it; published {claim:.3f}"
        )
    if args.json:
        args.json.write_text(json.dumps(table.reset_index().to_dict("records"), indent=2))


if __name__ == "__main__":
    main()
