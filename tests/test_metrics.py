"""Per-model metrics and the SWMM against numerai-tools, model by model, on a generated round.

The reference calls `numerai_tools.scoring` on each model's own series (its submitted ids, and
for target metrics those with a target), as the README's Metrics section defines them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from numerai_tools import scoring as ns
from threadpoolctl import threadpool_limits

from tc_assets.io.synthetic import SyntheticSettings, generate_source
from tc_assets.scoring.meta_model import swmm
from tc_assets.scoring.metrics import (
    MODEL_METRICS,
    TARGET_METRICS,
    MetricsSettings,
    exposures_long,
    feature_exposures,
    feature_metrics,
    target_metrics,
    top_bottom_positions,
)
from tc_assets.scoring.transforms import gaussian_rank, rank_keys, tie_kept_rank

TOL = 1e-9
SETTINGS = SyntheticSettings(stocks=800, features=24, models=60, seed=3)


# --- data ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Round:
    predictions: pd.DataFrame  # ids x models, NaN = not submitted
    features: pd.DataFrame  # ids x medium features
    example: pd.Series
    target: pd.Series
    stakes: pd.Series
    planted: pd.DataFrame  # index model_id: kind, duplicate_of, ...


def load_round(root: Path, r: int) -> Round:
    """Read a generated round with pandas (stand-in for the ingestion code)."""
    rd = root / "rounds" / str(r)
    medium = json.loads((root / "features.json").read_text())["feature_sets"]["medium"]
    features = pd.read_parquet(rd / "live.parquet").set_index("id").sort_index()[medium]
    files = sorted((rd / "predictions").glob("*.csv"))
    predictions = pd.concat(
        {p.stem: pd.read_csv(p).set_index("id")["prediction"] for p in files}, axis=1
    ).reindex(features.index)
    predictions.columns.name = "model_id"
    return Round(
        predictions=predictions,
        features=features,
        example=pd.read_parquet(rd / "example_predictions.parquet").set_index("id")["prediction"],
        target=pd.read_parquet(rd / "resolved.parquet").set_index("id")["target"],
        stakes=pd.read_csv(rd / "stakes.csv").set_index("model_id")["stake"],
        planted=pd.read_csv(rd / "planted.csv").set_index("model_id"),
    )


@pytest.fixture(scope="module")
def rnd(tmp_path_factory: pytest.TempPathFactory) -> Round:
    root = tmp_path_factory.mktemp("metrics_source")
    generate_source(root, [1], SETTINGS)
    r = load_round(root, 1)
    # A target may lack a few ids: drop 1% so every domain rule is exercised.
    ids = r.target.index
    kept = ids[np.random.default_rng(0).random(len(ids)) >= 0.01]
    return Round(r.predictions, r.features, r.example, r.target.loc[kept], r.stakes, r.planted)


@pytest.fixture(scope="module")
def computed(rnd: Round) -> pd.DataFrame:
    mm = swmm(rnd.predictions, rnd.stakes)
    tm = target_metrics(rnd.predictions, rnd.features, rnd.target, mm)
    fm, exposures = feature_metrics(rnd.predictions, rnd.features, rnd.example)
    return tm.join(fm.drop(columns="max_exposure_feature")).join(exposures)


def numerai_reference(
    predictions: pd.DataFrame,
    features: pd.DataFrame,
    target: pd.Series,
    meta_model: pd.Series,
    example: pd.Series | None = None,
    top_bottom: int = 200,
) -> pd.DataFrame:
    """Every metric by numerai-tools, one model at a time (contract formula for dissimilarity).

    BLAS runs single-threaded: numerai's small per-model lstsq is ~100x slower multi-threaded.
    """
    with threadpool_limits(limits=1, user_api="blas"):
        return _numerai_reference(predictions, features, target, meta_model, example, top_bottom)


def _numerai_reference(
    predictions: pd.DataFrame,
    features: pd.DataFrame,
    target: pd.Series,
    meta_model: pd.Series,
    example: pd.Series | None,
    top_bottom: int,
) -> pd.DataFrame:
    tgt = target.dropna().rename("target")
    e = None
    if example is not None:
        ex = example.dropna()
        e = features.loc[ex.index].apply(lambda f: ns.pearson_correlation(f, ex))
    rows = {}
    for model in predictions.columns:
        s = predictions[model].dropna()
        d = s.index.intersection(tgt.index)
        sd = s.loc[d].to_frame()
        row = {
            "corr": ns.numerai_corr(sd, tgt).iloc[0],
            "mmc": ns.correlation_contribution(sd, meta_model, tgt).iloc[0],
            "fnc_v3": ns.feature_neutral_corr(sd, features.loc[d], tgt).iloc[0],
            "fnc_v3_tb200": ns.feature_neutral_corr(
                sd, features.loc[d], tgt, top_bottom=top_bottom
            ).iloc[0],
        }
        if e is not None:
            u = features.loc[s.index].apply(lambda f, s=s: ns.pearson_correlation(f, s))
            row["max_feature_exposure"] = ns.max_feature_correlation(s, features.loc[s.index])[1]
            row["exposure_dissimilarity"] = 1.0 - np.nansum(u * e) / np.nansum(e * e)
            row |= u.to_dict()
        rows[model] = row
    return pd.DataFrame.from_dict(rows, orient="index")


@pytest.fixture(scope="module")
def reference(rnd: Round) -> pd.DataFrame:
    mm = swmm(rnd.predictions, rnd.stakes)
    return numerai_reference(rnd.predictions, rnd.features, rnd.target, mm, rnd.example)


def max_abs_diff(a: pd.Series, b: pd.Series) -> float:
    a, b = a.astype(float), b.astype(float).reindex(a.index)
    assert (a.isna() == b.isna()).all(), "NaN pattern differs"
    return float(np.nanmax(np.abs(a - b))) if a.notna().any() else 0.0


# --- exactness against numerai-tools ----------------------------------------------------------


def test_round_has_ties_partial_coverage_and_missing_targets(rnd: Round) -> None:
    p = rnd.predictions
    assert p.isna().any().sum() >= 2  # partial coverage, each its own mask
    assert (p.nunique() < p.count()).sum() >= 3  # models with tied predictions
    assert len(rnd.target) < len(p.index)  # ids without a target


@pytest.mark.parametrize("metric", TARGET_METRICS)
def test_target_metrics_equal_numerai_tools(
    computed: pd.DataFrame, reference: pd.DataFrame, metric: str
) -> None:
    assert max_abs_diff(computed[metric], reference[metric]) <= TOL


@pytest.mark.parametrize("metric", ["max_feature_exposure", "exposure_dissimilarity"])
def test_feature_metrics_equal_numerai_tools(
    computed: pd.DataFrame, reference: pd.DataFrame, metric: str
) -> None:
    assert max_abs_diff(computed[metric], reference[metric]) <= TOL


def test_every_feature_exposure_equals_numerai_pearson(
    rnd: Round, computed: pd.DataFrame, reference: pd.DataFrame
) -> None:
    for feature in rnd.features.columns:
        assert max_abs_diff(computed[feature], reference[feature]) <= TOL, feature


def test_swmm_is_stake_weighted_mean_of_numerai_gaussian_ranks(rnd: Round) -> None:
    staked = rnd.stakes[(rnd.stakes > 0) & rnd.stakes.index.isin(rnd.predictions.columns)]
    assert (rnd.stakes == 0).any() and len(staked) < rnd.predictions.shape[1]
    ranks = {}
    for model in staked.index:
        s = rnd.predictions[model].dropna().to_frame()
        ranks[model] = ns.gaussian(ns.tie_kept_rank(s)).iloc[:, 0]
    p = pd.DataFrame(ranks).reindex(rnd.predictions.index).fillna(0.0)
    expected = ns.stake_weight(p, staked)
    got = swmm(rnd.predictions, rnd.stakes)
    assert got.name == "swmm" and got.index.equals(rnd.predictions.index)
    assert np.max(np.abs(got - expected)) <= 1e-12


def test_swmm_errors() -> None:
    p = pd.DataFrame({"a": [0.1, 0.5, 0.9]}, index=["x", "y", "z"])
    with pytest.raises(ValueError, match="positive stake"):
        swmm(p, pd.Series({"a": 0.0, "b": 5.0}))  # b has no submission
    with pytest.raises(ValueError, match=">= 0"):
        swmm(p, pd.Series({"a": -1.0}))


def test_transforms_equal_numerai_with_nan_and_ties() -> None:
    rng = np.random.default_rng(1)
    x = np.round(rng.random((300, 7)), 1)  # heavy ties
    x[rng.random(x.shape) < 0.2] = np.nan  # distinct counts: values computed directly
    x[:, 5] = x[::-1, 4]  # a count shared by two columns: values from a lookup table
    x[:, 6] = 0.5  # constant column
    r, g = tie_kept_rank(x), gaussian_rank(x)
    for j in range(x.shape[1]):
        s = pd.Series(x[:, j]).dropna().to_frame()
        ref_r = ns.tie_kept_rank(s).iloc[:, 0].to_numpy()
        ref_g = ns.gaussian(ns.tie_kept_rank(s)).iloc[:, 0].to_numpy()
        assert np.array_equal(r[~np.isnan(x[:, j]), j], ref_r)
        assert np.array_equal(g[~np.isnan(x[:, j]), j], ref_g)
        assert np.isnan(r[np.isnan(x[:, j]), j]).all()


def test_top_bottom_positions_equal_stable_argsort_with_ties_and_nan() -> None:
    rng = np.random.default_rng(2)
    values = rng.integers(0, 12, (200, 60)).astype(float)  # tie groups straddle every cut
    values[rng.random(values.shape) < 0.1] = np.nan  # not submitted: left out
    keys, counts, order = rank_keys(values, return_order=True)
    for k in (1, 5, 13, 20):
        sel = top_bottom_positions(keys, order, k, counts)
        for r in range(values.shape[0]):
            valid = np.flatnonzero(~np.isnan(values[r]))
            stable = valid[np.argsort(values[r, valid], kind="stable")]
            expected = np.concatenate([stable[:k], stable[-k:]])
            assert np.array_equal(np.sort(sel[r]), np.sort(expected)), (k, r)


def test_tb200_reproduces_numerai_selection_with_tied_neutral_values() -> None:
    """Triplicated ids (same features, same predictions) tie after neutralization, so tie
    groups straddle the top/bottom cuts and numerai's stable argsort decides."""
    rng = np.random.default_rng(4)
    base, k, m = 160, 10, 6
    f = np.repeat(rng.integers(0, 5, (base, k)), 3, axis=0).astype(float)
    p = np.repeat(np.round(rng.random((base, m)), 3), 3, axis=0)
    signal = f[:, :2].sum(axis=1) + rng.standard_normal(f.shape[0])
    t = np.digitize(signal, np.quantile(signal, [0.05, 0.25, 0.75, 0.95])) / 4
    ids = pd.Index([f"id{i:04d}" for i in range(f.shape[0])])
    preds = pd.DataFrame(p, index=ids, columns=[f"m{j}" for j in range(m)])
    feats = pd.DataFrame(f, index=ids, columns=[f"f{i}" for i in range(k)])
    target = pd.Series(t, index=ids)
    mm = swmm(preds, pd.Series(1.0, index=preds.columns))
    tb = 100
    got = target_metrics(preds, feats, target, mm, MetricsSettings(top_bottom=tb))
    ref = numerai_reference(preds, feats, target, mm, top_bottom=tb)
    for metric in TARGET_METRICS:
        assert max_abs_diff(got[metric], ref[metric]) <= TOL, metric
    # The case is real: in some model the tie group at a cut is split by the cut.
    from tc_assets.scoring.neutralize import Neutralizer

    neutral = Neutralizer(feats.to_numpy()).residual_rows(gaussian_rank(preds.to_numpy()).T)
    keys, _, order = rank_keys(neutral, return_order=True)
    n = len(ids)
    cut = np.take_along_axis(keys, order[:, [tb - 1, tb, n - tb - 1, n - tb]], axis=1)
    assert ((cut[:, 0] == cut[:, 1]) | (cut[:, 2] == cut[:, 3])).any()


def test_results_do_not_depend_on_block_size(rnd: Round, computed: pd.DataFrame) -> None:
    mm = swmm(rnd.predictions, rnd.stakes)
    small = MetricsSettings(block_models=3)
    tm = target_metrics(rnd.predictions, rnd.features, rnd.target, mm, small)
    fm, _ = feature_metrics(rnd.predictions, rnd.features, rnd.example, small)
    both = tm.join(fm)
    for metric in MODEL_METRICS:
        assert max_abs_diff(both[metric], computed[metric]) <= 1e-12, metric


# --- planted kinds ----------------------------------------------------------------------------


def kinds(rnd: Round, computed: pd.DataFrame) -> pd.DataFrame:
    return computed.join(rnd.planted["kind"])


def test_feature_exposed_models_have_highest_max_feature_exposure(
    rnd: Round, computed: pd.DataFrame
) -> None:
    k = kinds(rnd, computed)
    exposed = k[k.kind == "feature_exposed"]
    top = k.nlargest(len(exposed), "max_feature_exposure")
    assert set(top.index) == set(exposed.index)


def test_feature_exposed_fnc_far_below_corr(rnd: Round, computed: pd.DataFrame) -> None:
    k = kinds(rnd, computed)
    exposed = k[k.kind == "feature_exposed"]
    assert (exposed.fnc_v3 < exposed["corr"] - 0.02).all()
    assert (exposed["corr"] - exposed.fnc_v3).mean() > 0.04


def test_unique_alpha_fnc_close_to_corr(rnd: Round, computed: pd.DataFrame) -> None:
    k = kinds(rnd, computed)
    alpha = k[k.kind == "unique_alpha"]
    assert (np.abs(alpha.fnc_v3 - alpha["corr"]) < 0.015).all()
    gap_alpha = np.abs(alpha.fnc_v3 - alpha["corr"]).mean()
    exposed = k[k.kind == "feature_exposed"]
    assert gap_alpha < 0.2 * (exposed["corr"] - exposed.fnc_v3).mean()


def test_example_copies_have_dissimilarity_near_zero(rnd: Round, computed: pd.DataFrame) -> None:
    k = kinds(rnd, computed)
    copies = k[k.kind == "example_copy"]
    assert len(copies) >= 2
    assert (np.abs(copies.exposure_dissimilarity) < 0.01).all()
    assert np.abs(copies.exposure_dissimilarity).min() <= 1e-12  # the exact copy
    others = k[k.kind != "example_copy"]
    assert (others.exposure_dissimilarity > 0.1).all()


def test_duplicates_get_identical_metrics(rnd: Round, computed: pd.DataFrame) -> None:
    dups = rnd.planted[rnd.planted.kind == "duplicate"]
    assert len(dups) >= 2
    for model, original in dups.duplicate_of.items():
        a, b = computed.loc[model], computed.loc[original]
        assert np.max(np.abs(a.to_numpy(float) - b.to_numpy(float))) <= 1e-12


# --- API and errors ---------------------------------------------------------------------------


def test_feature_metrics_need_no_target_and_long_table(rnd: Round) -> None:
    per_model, exposures = feature_metrics(rnd.predictions, rnd.features, rnd.example)
    assert list(per_model.columns) == [
        "max_feature_exposure",
        "exposure_dissimilarity",
        "max_exposure_feature",
    ]
    assert exposures.shape == (rnd.predictions.shape[1], rnd.features.shape[1])
    assert (per_model["max_exposure_feature"] == exposures.abs().idxmax(axis=1)).all()
    long = exposures_long(exposures)
    assert list(long.columns) == ["model_id", "feature", "exposure"]
    assert len(long) == exposures.size
    row = long.iloc[exposures.shape[1] + 2]
    assert row.exposure == exposures.loc[row.model_id, row.feature]


def test_model_without_target_ids_gets_nan() -> None:
    ids = pd.Index([f"i{j:03d}" for j in range(40)])
    rng = np.random.default_rng(0)
    preds = pd.DataFrame(rng.random((40, 2)), index=ids, columns=["a", "b"])
    preds.iloc[20:, 1] = np.nan
    feats = pd.DataFrame(rng.integers(0, 5, (40, 3)).astype(float), index=ids)
    target = pd.Series(rng.integers(0, 5, 20) / 4, index=ids[20:])
    got = target_metrics(preds, feats, target, preds["a"], MetricsSettings(top_bottom=5))
    assert got.loc["b"].isna().all() and got.loc["a"].notna().all()


def _frames() -> tuple[pd.DataFrame, pd.DataFrame, pd.Series]:
    ids = pd.Index([f"i{j:03d}" for j in range(30)])
    rng = np.random.default_rng(0)
    preds = pd.DataFrame(rng.random((30, 3)), index=ids, columns=["a", "b", "c"])
    feats = pd.DataFrame(rng.integers(0, 5, (30, 4)).astype(float), index=ids)
    target = pd.Series(rng.integers(0, 5, 30) / 4, index=ids)
    return preds, feats, target


@pytest.mark.parametrize(
    ("case", "error", "match"),
    [
        ("features_misaligned", ValueError, "features index"),
        ("unsorted_ids", ValueError, "sorted"),
        ("empty", ValueError, ">= 2 ids"),
        ("no_models", ValueError, ">= 1 model"),
        ("nan_features", ValueError, "NaN"),
        ("inf_prediction", ValueError, "infinite"),
        ("empty_model", ValueError, "fewer than 2"),
        ("foreign_target_ids", ValueError, "not in the predictions index"),
        ("no_target", ValueError, "fewer than 2 ids"),
        ("meta_model_gap", ValueError, "meta_model"),
        ("series_not_frame", TypeError, "DataFrame"),
    ],
)
def test_bad_input_raises_clear_error(case: str, error: type[Exception], match: str) -> None:
    preds, feats, target = _frames()
    mm = preds.mean(axis=1)
    if case == "features_misaligned":
        feats = feats.iloc[::-1]
    elif case == "unsorted_ids":
        preds, feats = preds.iloc[::-1], feats.iloc[::-1]
    elif case == "empty":
        preds, feats = preds.iloc[:0], feats.iloc[:0]
    elif case == "no_models":
        preds = preds.iloc[:, :0]
    elif case == "nan_features":
        feats.iloc[3, 1] = np.nan
    elif case == "inf_prediction":
        preds.iloc[2, 0] = np.inf
    elif case == "empty_model":
        preds["b"] = np.nan
    elif case == "foreign_target_ids":
        target = pd.concat([target, pd.Series({"zzz": 0.5})])
    elif case == "no_target":
        target = target.iloc[:1]
    elif case == "meta_model_gap":
        mm.iloc[4] = np.nan
    elif case == "series_not_frame":
        preds = preds["a"]
    with pytest.raises(error, match=match):
        target_metrics(preds, feats, target, mm, MetricsSettings(top_bottom=5))
    if case not in {"foreign_target_ids", "no_target", "meta_model_gap"}:
        with pytest.raises(error, match=match):
            feature_exposures(preds, feats)


def test_a_model_without_any_defined_exposure_gets_nan_feature_metrics() -> None:
    """Constant predictions have no Pearson exposure to any feature: every feature-only metric
    is undefined (NaN), not a dissimilarity of 1 from an all-zero exposure vector."""
    ids = pd.Index([f"i{j:03d}" for j in range(50)])
    rng = np.random.default_rng(1)
    preds = pd.DataFrame({"a": rng.random(50), "flat": 0.5}, index=ids)
    feats = pd.DataFrame(rng.integers(0, 5, (50, 4)).astype(float), index=ids)
    example = pd.Series(rng.random(50), index=ids)
    per_model, exposures = feature_metrics(preds, feats, example)
    assert exposures.loc["flat"].isna().all()
    assert np.isnan(per_model.loc["flat", "max_feature_exposure"])
    assert np.isnan(per_model.loc["flat", "exposure_dissimilarity"])
    assert per_model.loc["flat", "max_exposure_feature"] is None
    assert per_model.loc["a"].notna().all()
