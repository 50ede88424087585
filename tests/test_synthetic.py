"""The synthetic round source: contract layout, determinism, and the planted truth it promises.

Every property is checked on the written files with definitions independent of the generator
(calendar by walking the days, contract rules re-implemented here, scores by numerai-tools).
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from numerai_tools.scoring import feature_neutral_corr, numerai_corr
from pydantic import ValidationError
from scipy.special import ndtri

from tc_assets.io.synthetic import (
    MIN_MODELS,
    PLANTED_COLUMNS,
    PLANTED_KINDS,
    SyntheticSettings,
    generate_source,
    round_close_time,
    round_open_time,
    round_resolve_time,
)

MODEL_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
ROUNDS = [1, 2, 3]
# Defaults (1,500 stocks, 60 features, 40 models) plus one submission per rejection rule.
DEFAULT = SyntheticSettings(with_bad_inputs=True)
# Small and quick, for the byte-level tests.
TINY = SyntheticSettings(stocks=400, features=20, models=MIN_MODELS, seed=3, with_bad_inputs=True)


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    generate_source(root, ROUNDS, DEFAULT)
    return root


def round_dir(root: Path, r: int) -> Path:
    return root / "rounds" / str(r)


def feature_sets(root: Path) -> dict[str, list[str]]:
    return json.loads((root / "features.json").read_text())["feature_sets"]


def read_any(path: Path) -> pd.DataFrame:
    return pd.read_csv(path) if path.suffix == ".csv" else pd.read_parquet(path)


def planted(root: Path, r: int) -> pd.DataFrame:
    return pd.read_csv(round_dir(root, r) / "planted.csv", dtype=str, keep_default_na=False)


def stakes(root: Path, r: int) -> pd.DataFrame:
    return pd.read_csv(round_dir(root, r) / "stakes.csv", dtype={"model_id": str})


def submission(root: Path, r: int, folder: str, model_id: str) -> Path:
    (path,) = (round_dir(root, r) / folder).glob(f"{model_id}.*")
    return path


def all_bytes(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def prediction_frame(root: Path, r: int, kinds: set[str] | None = None) -> pd.DataFrame:
    """(ids x models) predictions of the planted models of `kinds` (NaN where not submitted)."""
    p = planted(root, r)
    p = p[p["submits"].isin(["predictions", "both"]) & (p["kind"] != "bad_input")]
    if kinds is not None:
        p = p[p["kind"].isin(kinds)]
    cols = {
        m: read_any(submission(root, r, "predictions", m)).set_index("id")["prediction"]
        for m in p["model_id"]
    }
    live = pd.read_parquet(round_dir(root, r) / "live.parquet", columns=["id"])["id"]
    return pd.DataFrame(cols).reindex(pd.Index(sorted(live), name="id"))


# --- the contract rules, independently --------------------------------------------------------


def prediction_violations(df: pd.DataFrame, live_ids: set[str]) -> set[str]:
    """The contract's prediction-file rules that `df` breaks (foreign ids are not a rule)."""
    if "prediction" not in df.columns or "id" not in df.columns:
        return {"unreadable"}
    out = set()
    v = df["prediction"].to_numpy(dtype=float)
    if df["id"].duplicated().any():
        out.add("duplicate_ids")
    if not np.isfinite(v).all():
        out.add("non_finite")
    finite = v[np.isfinite(v)]
    if (finite < 0).any() or (finite > 1).any():
        out.add("out_of_range")
    if np.unique(finite).size == 1:
        out.add("constant")
    if len(set(df["id"]) & live_ids) < 0.8 * len(live_ids):
        out.add("low_coverage")
    return out


def portfolio_violations(df: pd.DataFrame) -> set[str]:
    """The contract's portfolio-file rules that `df` breaks."""
    out = set()
    w = df["weight"].to_numpy(dtype=float)
    if df["id"].duplicated().any():
        out.add("duplicate_ids")
    if not np.isfinite(w).all():
        out.add("non_finite")
        return out
    if abs(w.sum()) > 1e-6:
        out.add("not_dollar_neutral")
    if abs(w[w > 0].sum() - 1) > 1e-6:
        out.add("longs_not_one")
    return out


# --- calendar and round.json ------------------------------------------------------------------


def test_rounds_open_tuesday_to_saturday_at_noon_and_close_an_hour_later():
    days, day = [], datetime(2024, 1, 2, tzinfo=UTC)
    while len(days) < 40:
        if day.strftime("%a") in {"Tue", "Wed", "Thu", "Fri", "Sat"}:
            days.append(day)
        day += timedelta(days=1)
    for r, d in enumerate(days, start=1):
        assert round_open_time(r) == d.replace(hour=12)
        assert round_close_time(r) == d.replace(hour=13)
        assert round_resolve_time(r) == d.replace(hour=13) + timedelta(days=28)
    with pytest.raises(ValueError):
        round_open_time(0)


def test_round_json_has_the_calendar_and_payout(source: Path):
    for r in ROUNDS:
        meta = json.loads((round_dir(source, r) / "round.json").read_text())
        assert meta["round"] == r
        for key, fn in [
            ("open_time", round_open_time),
            ("close_time", round_close_time),
            ("resolve_time", round_resolve_time),
        ]:
            assert meta[key].endswith("Z")
            assert datetime.fromisoformat(meta[key]) == fn(r)
        assert meta["payout"] == {"stake_threshold": 72000, "clip": 0.05}


# --- determinism --------------------------------------------------------------------------------


def test_same_settings_write_the_same_bytes_and_a_round_does_not_depend_on_the_others(
    tmp_path: Path,
):
    generate_source(tmp_path / "a", [1, 2, 3], TINY)
    generate_source(tmp_path / "b", [1, 2, 3], TINY)
    generate_source(tmp_path / "c", [3], TINY)
    a, b, c = (all_bytes(tmp_path / x) for x in "abc")
    assert a == b
    assert {k: v for k, v in a.items() if k.startswith("rounds/3/")} == {
        k: v for k, v in c.items() if k.startswith("rounds/3/")
    }
    assert a["features.json"] == c["features.json"]

    generate_source(tmp_path / "d", [3], TINY.model_copy(update={"seed": 4}))
    d = all_bytes(tmp_path / "d")
    assert d["rounds/3/live.parquet"] != c["rounds/3/live.parquet"]
    assert d["rounds/3/resolved.parquet"] != c["rounds/3/resolved.parquet"]


def test_regenerating_a_round_replaces_it_whole(tmp_path: Path):
    generate_source(tmp_path, [2], TINY)
    summary = generate_source(tmp_path, [2], TINY.model_copy(update={"with_bad_inputs": False}))
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert summary["files"] == len(files)
    assert not list((tmp_path / "rounds").glob(".*"))  # no partial or old round left behind
    assert "bad_input" not in set(planted(tmp_path, 2)["kind"])
    assert not (tmp_path / "rounds" / "2" / "predictions" / "bad model!.csv").exists()
    assert set(summary) >= {"rounds", "stocks", "features", "models", "files", "seconds"}


def test_parquet_submissions_hold_the_same_values_as_csv(tmp_path: Path):
    generate_source(tmp_path / "csv", [1], TINY)
    generate_source(tmp_path / "pq", [1], TINY.model_copy(update={"file_format": "parquet"}))
    csv_dir, pq_dir = round_dir(tmp_path / "csv", 1), round_dir(tmp_path / "pq", 1)
    for folder in ("predictions", "portfolios"):
        csv_files = sorted((csv_dir / folder).glob("*.csv"))
        assert [p.stem for p in csv_files] == sorted(p.stem for p in (pq_dir / folder).iterdir())
        for p in csv_files:
            pd.testing.assert_frame_equal(
                pd.read_csv(p), pd.read_parquet(pq_dir / folder / f"{p.stem}.parquet")
            )


def test_settings_are_validated_and_frozen():
    with pytest.raises(ValidationError):
        SyntheticSettings(models=MIN_MODELS - 1)
    with pytest.raises(ValidationError):
        SyntheticSettings(stocks=200, features=60)  # too few stocks to residualize on features
    with pytest.raises(ValidationError):
        SyntheticSettings(feature_signal_corr=0.8, alpha_signal_corr=0.7)
    with pytest.raises(ValidationError):
        DEFAULT.stocks = 10
    with pytest.raises(ValueError):
        generate_source("unused", [0], TINY)


# --- features and live universe -------------------------------------------------------------------


def test_feature_sets_nest_with_the_documented_sizes(source: Path):
    sets = feature_sets(source)
    small, medium, every = sets["small"], sets["medium"], sets["all"]
    assert (len(small), len(medium), len(every)) == (15, 60, 72)
    assert set(small) <= set(medium) <= set(every)
    assert len(set(every)) == len(every)
    assert all(re.fullmatch(r"feature_\d{4}", f) for f in every)


def test_live_has_the_contract_columns_and_five_equal_bins_per_feature(source: Path):
    features = feature_sets(source)["all"]
    for r in ROUNDS:
        live = pd.read_parquet(round_dir(source, r) / "live.parquet")
        assert list(live.columns) == ["id", "era", *features]
        assert len(live) == DEFAULT.stocks
        assert live["id"].is_unique
        assert all(re.fullmatch(r"n[0-9a-f]{15}", i) for i in live["id"])
        assert (live["era"] == str(r)).all()
        x = live[features]
        assert all(pd.api.types.is_integer_dtype(t) for t in x.dtypes)
        counts = x.apply(lambda col: col.value_counts().reindex(range(5), fill_value=0))
        assert (counts == DEFAULT.stocks // 5).all().all()


def test_features_are_correlated_and_persist_across_rounds(source: Path):
    medium = feature_sets(source)["medium"]
    one = pd.read_parquet(round_dir(source, 1) / "live.parquet").set_index("id")[medium]
    two = pd.read_parquet(round_dir(source, 2) / "live.parquet").set_index("id")[medium]
    c = np.corrcoef(one.to_numpy(dtype=float), rowvar=False)
    off_diagonal = np.abs(c[~np.eye(len(medium), dtype=bool)])
    assert off_diagonal.mean() > 0.05  # independent features: ~0.02
    common = one.index.intersection(two.index)
    same_stock = [np.corrcoef(one.loc[common, f], two.loc[common, f])[0, 1] for f in medium]
    assert np.mean(same_stock) > 0.5


def test_consecutive_rounds_share_about_95_percent_of_ids(source: Path):
    ids = [set(pd.read_parquet(round_dir(source, r) / "live.parquet")["id"]) for r in ROUNDS]
    for a, b in zip(ids, ids[1:], strict=False):
        assert 0.92 <= len(a & b) / len(a) <= 0.98


def test_market_adv_is_lognormal_and_sticks_to_the_stock(source: Path):
    one = pd.read_parquet(round_dir(source, 1) / "market.parquet").set_index("id")["adv_usd"]
    two = pd.read_parquet(round_dir(source, 2) / "market.parquet").set_index("id")["adv_usd"]
    live = pd.read_parquet(round_dir(source, 1) / "live.parquet", columns=["id"])["id"]
    assert set(one.index) == set(live)
    assert (one > 0).all()
    log = np.log(one)
    assert abs(log.median() - np.log(20e6)) < 0.15
    assert abs(log.std() - 1.5) < 0.1
    common = one.index.intersection(two.index)
    assert np.corrcoef(log[common], np.log(two[common]))[0, 1] > 0.8  # 0.9 expected


def test_resolved_target_buckets_the_return_in_the_contract_proportions(source: Path):
    medium = feature_sets(source)["medium"]
    for r in ROUNDS:
        res = pd.read_parquet(round_dir(source, r) / "resolved.parquet")
        live = pd.read_parquet(round_dir(source, r) / "live.parquet").set_index("id")
        assert list(res.columns) == ["id", "target", "return"]
        assert set(res["id"]) == set(live.index)
        shares = res["target"].value_counts(normalize=True).sort_index()
        assert list(shares.index) == [0.0, 0.25, 0.5, 0.75, 1.0]
        np.testing.assert_allclose(shares, [0.05, 0.2, 0.5, 0.2, 0.05], atol=1e-3)
        ret = res.set_index("id")["return"]
        assert np.corrcoef(ret, res["target"])[0, 1] > 0.85
        assert np.std(ret) == pytest.approx(DEFAULT.return_std, rel=1e-9)
        # Exactly rho_f² of the return is explained by the medium features (and the constant).
        x = np.column_stack([np.ones(len(ret)), live.loc[ret.index, medium].to_numpy(float)])
        fitted = x @ np.linalg.lstsq(x, ret.to_numpy(), rcond=None)[0]
        r2 = 1 - np.sum((ret - fitted) ** 2) / np.sum((ret - ret.mean()) ** 2)
        assert r2 == pytest.approx(DEFAULT.feature_signal_corr**2, abs=1e-9)


def test_example_predictions_are_a_feature_linear_ranking(source: Path):
    medium = feature_sets(source)["medium"]
    ex = pd.read_parquet(round_dir(source, 1) / "example_predictions.parquet").set_index("id")
    live = pd.read_parquet(round_dir(source, 1) / "live.parquet").set_index("id")
    assert list(ex.columns) == ["prediction"]
    assert set(ex.index) == set(live.index)
    p = ex["prediction"]
    assert p.between(0, 1).all()
    assert p.is_unique  # the rank of a continuous score: no ties
    # A linear model of the medium features explains nearly all of its (gaussianized) rank.
    y = ndtri(p.to_numpy())
    x = np.column_stack([np.ones(len(p)), live.loc[p.index, medium].to_numpy(float)])
    resid = y - x @ np.linalg.lstsq(x, y, rcond=None)[0]
    assert 1 - resid.var() / y.var() > 0.9


# --- models, stakes, submissions --------------------------------------------------------------


def test_every_planted_kind_is_present_with_stake_rows_and_neutral_ids(source: Path):
    minimum = {
        "feature_exposed": 4,
        "unique_alpha": 4,
        "noise": 3,
        "example_copy": 2,
        "duplicate": 2,
        "zero_stake_informative": 2,
        "perfect": 1,
        "perfect_negated": 1,
        "portfolio": 3,
        "mixed": 1,
    }
    assert set(minimum) == set(PLANTED_KINDS)
    for r in ROUNDS:
        p = planted(source, r)
        s = stakes(source, r)
        assert list(p.columns) == list(PLANTED_COLUMNS)
        population = p[p["kind"] != "bad_input"]
        assert len(population) == DEFAULT.models
        counts = population["kind"].value_counts()
        assert all(counts[k] >= n for k, n in minimum.items())
        assert all(re.fullmatch(r"model_\d{4}", m) for m in population["model_id"])
        assert set(population["submits"]) == {"predictions", "portfolio", "both", "none"}
        assert (population.loc[population["kind"] == "portfolio", "submits"] == "portfolio").all()
        # Every model but the one with an invalid id has exactly one stake row.
        assert list(s.columns) == ["model_id", "stake", "corr_multiplier", "tc_multiplier"]
        assert s["model_id"].is_unique
        assert set(s["model_id"]) == set(p["model_id"]) - {"bad model!"}
        assert all(MODEL_ID.fullmatch(m) for m in s["model_id"])
        assert np.isfinite(s["stake"]).all() and (s["stake"] >= 0).all()
        assert set(s["corr_multiplier"]) <= {0, 0.5, 1, 2}
        assert set(s["tc_multiplier"]) <= {0, 0.5, 1, 2, 3}
        stake = s.set_index("model_id")["stake"]
        zero = p.loc[p["kind"] == "zero_stake_informative", "model_id"]
        assert (stake[zero] == 0).all()
        assert (stake.drop(zero) > 0).all()
        # Files exist for exactly the models that submit.
        for folder, sends in (
            ("predictions", {"predictions", "both"}),
            ("portfolios", {"portfolio", "both"}),
        ):
            written = {f.stem for f in (round_dir(source, r) / folder).iterdir()}
            assert written == set(p.loc[p["submits"].isin(sends), "model_id"])


def test_the_population_persists_and_absent_models_vary(source: Path):
    rows = [planted(source, r).set_index("model_id") for r in ROUNDS]
    cols = ["kind", "duplicate_of", "feature_weight", "alpha_weight"]
    for p in rows[1:]:
        pd.testing.assert_frame_equal(p[cols], rows[0][cols])
    absent = [set(p.index[p["submits"] == "none"]) for p in rows]
    assert all(absent) and len(set(map(frozenset, absent))) > 1


def test_prediction_files_are_valid_with_ties_and_partial_coverage(source: Path):
    live = set(pd.read_parquet(round_dir(source, 1) / "live.parquet")["id"])
    p = planted(source, 1)
    good = p[p["submits"].isin(["predictions", "both"]) & (p["kind"] != "bad_input")]
    coverage, decimals = [], []
    for m in good["model_id"]:
        df = read_any(submission(source, 1, "predictions", m))
        assert list(df.columns) == ["id", "prediction"]
        assert df["prediction"].dtype == np.float64
        assert prediction_violations(df, live) == set()
        assert set(df["id"]) <= live
        coverage.append(len(df) / len(live))
        v = df["prediction"].to_numpy()
        decimals.append(next(d for d in range(2, 20) if np.allclose(v, np.round(v, d), atol=0)))
    coverage, decimals = np.array(coverage), np.array(decimals)
    partial = coverage < 1
    assert partial.any() and np.all((coverage[partial] >= 0.85) & (coverage[partial] <= 0.95))
    # Most models write 6 decimals; some round to 2 or 3, so that many ids tie.
    assert {2, 3} <= set(decimals) <= {2, 3, 6}
    assert np.mean(decimals == 6) > 0.8


def test_copies_duplicates_and_the_negated_model_are_what_they_claim(source: Path):
    for r in ROUNDS:
        p = planted(source, r).set_index("model_id")
        d = round_dir(source, r)
        example = pd.read_parquet(d / "example_predictions.parquet").set_index("id")["prediction"]
        copies = [
            read_any(submission(source, r, "predictions", m)).set_index("id")["prediction"]
            for m in p.index[p["kind"] == "example_copy"]
        ]
        exact = [c.reindex(example.index).equals(example) for c in copies]
        assert any(exact)
        for c in copies:
            np.testing.assert_allclose(c.reindex(example.index), example, atol=1e-3)
        for m in p.index[p["kind"] == "duplicate"]:
            original = p.loc[m, "duplicate_of"]
            assert p.loc[original, "kind"] == "mixed"
            a = submission(source, r, "predictions", m).read_bytes()
            assert a == submission(source, r, "predictions", original).read_bytes()
            stake = stakes(source, r).set_index("model_id")["stake"]
            assert stake[m] != stake[original]
        (perfect,) = p.index[p["kind"] == "perfect"]
        (negated,) = p.index[p["kind"] == "perfect_negated"]
        a = read_any(submission(source, r, "predictions", perfect)).set_index("id")["prediction"]
        b = read_any(submission(source, r, "predictions", negated)).set_index("id")["prediction"]
        np.testing.assert_allclose(b.reindex(a.index), 1 - a, atol=1e-12)


def test_portfolios_are_dollar_neutral_and_differ_in_liquidity(source: Path):
    for r in ROUNDS:
        p = planted(source, r)
        adv = pd.read_parquet(round_dir(source, r) / "market.parquet").set_index("id")["adv_usd"]
        held_adv, held_share = [], []
        for m in p.loc[
            p["submits"].isin(["portfolio", "both"]) & (p["kind"] != "bad_input"), "model_id"
        ]:
            df = read_any(submission(source, r, "portfolios", m))
            assert list(df.columns) == ["id", "weight"]
            assert portfolio_violations(df) == set()
            assert set(df["id"]) == set(adv.index)
            w = df.set_index("id")["weight"]
            assert abs(w.sum()) < 1e-9
            assert abs(w[w > 0].sum() - 1) < 1e-9 and abs(w[w < 0].sum() + 1) < 1e-9
            held = w.index[w != 0]
            held_adv.append(adv[held].median())
            held_share.append(len(held) / len(w))
        assert max(held_adv) / min(held_adv) > 5  # one in illiquid names, one in liquid ones
        assert min(held_share) <= 0.03 and max(held_share) >= 0.2  # concentrated vs spread


def test_each_bad_input_breaks_exactly_its_rule(source: Path):
    for r in ROUNDS:
        d = round_dir(source, r)
        live = set(pd.read_parquet(d / "live.parquet")["id"])
        bad = planted(source, r)
        bad = bad[bad["kind"] == "bad_input"]
        predictions = bad[bad["submits"] == "predictions"]
        assert sorted(predictions["expected_rule"]) == sorted(
            [
                "invalid_model_id",
                "unreadable",
                "duplicate_ids",
                "non_finite",
                "non_finite",
                "out_of_range",
                "constant",
                "low_coverage",
                "foreign_ids_dropped",
            ]
        )
        portfolios = bad[bad["submits"] == "portfolio"]
        assert sorted(portfolios["expected_rule"]) == sorted(
            ["not_dollar_neutral", "longs_not_one", "duplicate_ids", "non_finite"]
        )
        nonfinite = []
        for row in predictions.itertuples():
            df = read_any(submission(source, r, "predictions", row.model_id))
            if row.expected_rule == "invalid_model_id":
                assert not MODEL_ID.fullmatch(row.model_id)
                assert prediction_violations(df, live) == set()
            elif row.expected_rule == "foreign_ids_dropped":
                assert prediction_violations(df, live) == set()
                assert set(df["id"]) >= live
                assert 40 <= len(set(df["id"]) - live) <= 60
            else:
                assert MODEL_ID.fullmatch(row.model_id)
                assert prediction_violations(df, live) == {row.expected_rule}
            if row.expected_rule == "non_finite":
                nonfinite.append(df["prediction"])
        assert any(s.isna().any() for s in nonfinite)
        assert any(np.isinf(s).any() for s in nonfinite)
        for row in portfolios.itertuples():
            df = read_any(submission(source, r, "portfolios", row.model_id))
            assert portfolio_violations(df) == {row.expected_rule}


# --- the signal -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scores(source: Path) -> pd.DataFrame:
    """Per model and round: kind, CORR, FNC (medium) and max |corr| with a medium feature."""
    root = source
    medium = feature_sets(root)["medium"]
    rows = []
    for r in ROUNDS:
        p = planted(root, r).set_index("model_id")
        preds = prediction_frame(root, r)
        full = preds.dropna(axis=1)  # feature-neutral scores need every id
        target = pd.read_parquet(round_dir(root, r) / "resolved.parquet").set_index("id")["target"]
        live = pd.read_parquet(round_dir(root, r) / "live.parquet").set_index("id")
        x = live.loc[full.index, medium].astype(float)
        corr = numerai_corr(full, target.sort_index())
        fnc = feature_neutral_corr(full, x, target.sort_index())
        z = full.rank()
        exposure = pd.Series(
            np.abs(
                np.corrcoef(z.to_numpy(), x.to_numpy(), rowvar=False)[: z.shape[1], z.shape[1] :]
            ).max(axis=1),
            index=full.columns,
        )
        rows.append(
            pd.DataFrame(
                {
                    "kind": p.loc[full.columns, "kind"],
                    "corr": corr,
                    "fnc": fnc,
                    "exposure": exposure,
                }
            )
        )
    return pd.concat(rows)


def test_corr_orders_the_planted_kinds(scores: pd.DataFrame):
    s = scores
    corr = s.groupby("kind")["corr"].mean()
    assert corr["perfect"] > 0.3
    assert corr["perfect"] > 3 * max(corr["feature_exposed"], corr["unique_alpha"])
    for k in ("feature_exposed", "unique_alpha", "zero_stake_informative", "mixed"):
        assert 0.02 < corr[k] < 0.12, k
        assert corr[k] > corr["noise"] + 0.02, k
    assert abs(corr["noise"]) < 0.02
    perfect = s.loc[s["kind"] == "perfect", "corr"].to_numpy()
    negated = s.loc[s["kind"] == "perfect_negated", "corr"].to_numpy()
    np.testing.assert_allclose(negated, -perfect, atol=1e-9)


def test_feature_exposed_models_are_explained_by_the_features_and_unique_alpha_is_not(
    scores: pd.DataFrame,
):
    s = scores
    by_kind = s.groupby("kind")
    exposure = by_kind["exposure"].mean()
    assert exposure.idxmax() == "feature_exposed"
    # Every feature-exposed model beats every model of the kinds not built from the features
    # alone (the example model and its copies are purely feature-linear: they come close).
    others = by_kind["exposure"].max().drop(["feature_exposed", "example_copy"])
    assert s.loc[s["kind"] == "feature_exposed", "exposure"].min() > others.max()
    fe = s[s["kind"] == "feature_exposed"]
    ua = s[s["kind"] == "unique_alpha"]
    assert (fe["fnc"] - fe["corr"]).mean() < -0.03  # CORR the features explain
    assert (ua["fnc"] - ua["corr"]).abs().mean() < 0.01  # CORR ~ FNC
    assert ua["exposure"].max() < 0.1
