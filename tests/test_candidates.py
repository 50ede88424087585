"""Transparent TC: a candidate's exact TC from the round's TC vector, its metrics, the CLI, the
contract on candidate files, and the attribution of each model's signal."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.stats import rankdata

from tc_assets.candidates import score_candidate
from tc_assets.cli import main
from tc_assets.defs.contribution import round_spec
from tc_assets.io.ingest import ingest_round
from tc_assets.io.source import LocalRoundSource
from tc_assets.io.synthetic import SyntheticSettings
from tc_assets.io.warehouse import Warehouse
from tc_assets.scoring.contribution import TCSettings, tc_attribution, true_contribution
from tc_assets.scoring.meta_model import prediction_matrix
from tc_assets.scoring.optimizer import OptimizerSettings
from tests.conftest import SMALL, make_source, platform
from tests.test_contribution_assets import run_contribution

CANDIDATES = ("cand_alpha", "cand_features")


def _candidates(source: Path, r: int) -> dict[str, pd.DataFrame]:
    """Two candidate signals on the round's ids: one from the target, one from the features."""
    d = source / "rounds" / str(r)
    live = pd.read_parquet(d / "live.parquet").set_index("id").sort_index()
    target = pd.read_parquet(d / "resolved.parquet").set_index("id")["target"].reindex(live.index)
    rng = np.random.default_rng(r)
    medium = json.loads((source / "features.json").read_text())["feature_sets"]["medium"]
    signals = {
        "cand_alpha": target.fillna(0.5).to_numpy() + rng.normal(0, 0.3, len(live)),
        "cand_features": live[medium[:3]].sum(axis=1).to_numpy() + rng.normal(0, 0.5, len(live)),
    }
    return {
        name: pd.DataFrame({"id": live.index, "prediction": rankdata(s) / (len(s) + 1)})
        for name, s in signals.items()
    }


@pytest.fixture(scope="module")
def scored(tmp_path_factory) -> dict:
    """Round 1 with the two candidates submitted at zero stake, scored through the assets."""
    import dagster as dg

    root = tmp_path_factory.mktemp("cand")
    source = make_source(root / "source", [1])
    outside = root / "candidates"
    stakes = pd.read_csv(source / "rounds" / "1" / "stakes.csv")
    for name, frame in _candidates(source, 1).items():
        frame.to_csv(source / "rounds" / "1" / "predictions" / f"{name}.csv", index=False)
        (outside / name).mkdir(parents=True)
        frame.to_csv(outside / name / "1.csv", index=False)
        zero = stakes.iloc[:1].assign(model_id=name, stake=0.0)
        stakes = pd.concat([stakes, zero], ignore_index=True)
    stakes.to_csv(source / "rounds" / "1" / "stakes.csv", index=False)
    defs, paths = platform(source, root)
    with dg.instance_for_test() as instance:
        assert run_contribution(defs, instance, 1).success
    return {"source": source, "warehouse": paths.warehouse, "candidates": outside}


def test_a_candidate_gets_exactly_the_tc_it_gets_in_the_round(scored: dict) -> None:
    wh = Warehouse(scored["warehouse"])
    res = score_candidate(scored["warehouse"], [1], scored["candidates"])
    assert res.rejections.empty
    rounds = res.rounds.set_index("candidate")
    tc = wh.read_round("tc_scores", 1).set_index("model_id")["tc"]
    metrics = wh.read_round("model_metrics", 1).set_index("model_id")
    for name in CANDIDATES:
        assert rounds.loc[name, "tc"] == pytest.approx(tc[name], rel=1e-9, abs=1e-12)
        for m in ("corr", "mmc", "fnc_v3", "max_feature_exposure"):
            assert rounds.loc[name, m] == pytest.approx(metrics.loc[name, m], rel=1e-9)
    assert rounds.loc["cand_alpha", "tc"] > rounds.loc["cand_features", "tc"]


def test_zero_stake_candidates_leave_every_other_tc_unchanged(scored: dict) -> None:
    """The round re-scored without the candidates gives the other models the same TC."""
    inputs = ingest_round(LocalRoundSource(scored["source"]), 1)
    others = [m for m in inputs.predictions.columns if m not in CANDIDATES]
    preds = inputs.predictions[others].reindex(inputs.ids)
    stake = inputs.stakes["stake"].reindex(others).fillna(0.0).to_numpy()
    target = pd.read_parquet(scored["source"] / "rounds" / "1" / "resolved.parquet")
    t = target.set_index("id")["target"].reindex(inputs.ids)
    spec = round_spec(
        inputs.live, {"feature_sets": inputs.feature_sets}, inputs.market, OptimizerSettings()
    )
    p = prediction_matrix(preds.to_numpy(dtype=np.float64))
    without = true_contribution(p, stake, (t - t.mean()).fillna(0.0).to_numpy(), spec, label="1")
    tc = Warehouse(scored["warehouse"]).read_round("tc_scores", 1).set_index("model_id")["tc"]
    np.testing.assert_allclose(tc.reindex(others), without.tc, rtol=1e-9, atol=1e-12)


def test_score_candidate_cli_prints_and_writes_json(scored: dict, tmp_path, capsys) -> None:
    wide = pd.DataFrame({"id": pd.read_csv(scored["candidates"] / "cand_alpha" / "1.csv")["id"]})
    for name in CANDIDATES:
        wide[name] = pd.read_csv(scored["candidates"] / name / "1.csv")["prediction"]
    path = tmp_path / "wide.csv"
    wide.to_csv(path, index=False)
    out = tmp_path / "scores.json"
    code = main(
        ["score-candidate", "--warehouse", str(scored["warehouse"]), "--rounds", "1",
         "--predictions", str(path), "--json", str(out)]
    )  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "wide:cand_alpha" in printed and "tc_sharpe" in printed
    doc = json.loads(out.read_text())
    tc = Warehouse(scored["warehouse"]).read_round("tc_scores", 1).set_index("model_id")["tc"]
    for row in doc["rounds"]:
        assert row["tc"] == pytest.approx(tc[row["candidate"].split(":")[1]], rel=1e-9)
    assert {r["candidate"] for r in doc["summary"]} == {f"wide:{n}" for n in CANDIDATES}


def test_bad_candidate_files_are_rejected_with_the_contract_reasons(scored: dict, tmp_path) -> None:
    good = pd.read_csv(scored["candidates"] / "cand_alpha" / "1.csv")
    bad = {
        "out_of_range": good.assign(prediction=good["prediction"] * 3),
        "constant": good.assign(prediction=0.5),
        "duplicate_ids": pd.concat([good, good.iloc[:5]]),
        "low_coverage": good.iloc[:10],
    }
    for name, frame in bad.items():
        (tmp_path / name).mkdir()
        frame.to_csv(tmp_path / name / "1.csv", index=False)
    res = score_candidate(scored["warehouse"], [1], tmp_path)
    assert res.rounds.empty
    rules = dict(zip(res.rejections["candidate"], res.rejections["rule"], strict=True))
    assert rules == {name: name for name in bad}
    assert main(
        ["score-candidate", "--warehouse", str(scored["warehouse"]), "--rounds", "1",
         "--predictions", str(tmp_path / "nowhere")]
    ) == 2  # fmt: skip


def test_attribution_parts_sum_and_exposure_removes_feature_signal(tmp_path) -> None:
    """On generated rounds with the default settings: the parts sum to the raw signal, and
    feature-exposed models lose more to the exposure limits than unique-alpha models."""
    settings = SyntheticSettings(**(SMALL.model_dump() | {"with_bad_inputs": False, "stocks": 800}))
    source = make_source(tmp_path, [1, 2, 3], settings)
    lost = {"feature_exposed": [], "unique_alpha": []}
    for r in (1, 2, 3):
        inputs = ingest_round(LocalRoundSource(source), r)
        d = source / "rounds" / str(r)
        kinds = pd.read_csv(d / "planted.csv").set_index("model_id")["kind"]
        t = pd.read_parquet(d / "resolved.parquet").set_index("id")["target"]
        t = t.reindex(inputs.ids)
        preds = inputs.predictions.reindex(inputs.ids)
        stake = inputs.stakes["stake"].reindex(preds.columns).fillna(0.0).to_numpy()
        spec = round_spec(
            inputs.live, {"feature_sets": inputs.feature_sets}, inputs.market, OptimizerSettings()
        )
        p = prediction_matrix(preds.to_numpy(dtype=np.float64))
        res = true_contribution(p, stake, (t - t.mean()).fillna(0.0).to_numpy(), spec, TCSettings())
        parts = tc_attribution(p, res)
        total = parts.reaches + parts.exposure_budget + parts.bounds
        np.testing.assert_allclose(total, parts.total, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(parts.tc, res.tc, rtol=1e-9, atol=1e-12)
        kind = kinds.reindex(preds.columns).to_numpy()
        for k in lost:
            lost[k].append(float(parts.exposure_budget[kind == k].mean()))
    assert np.mean(lost["feature_exposed"]) > np.mean(lost["unique_alpha"])
