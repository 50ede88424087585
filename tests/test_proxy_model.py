"""The TC proxy model: an EBM of TC on the per-round metrics over a window of rounds.

The main data: 10 generated rounds scored by the project's own functions (ingestion, metrics,
the fast TC engine), cached once per session. Its settings make TC depend mostly on fnc_v3,
which the first test checks before relying on it:

* the fund trades almost every stock and holds no feature exposure (a large quadratic term,
  loose position caps, no liquidity caps, exposure limit 0.01), so a model's TC is close to
  the feature-neutral covariance of its predictions with the target: what fnc_v3 measures;
* a strong feature signal (corr 0.35) against the unique alpha (0.15), so CORR and MMC, which
  keep feature exposure, are poor proxies: feature-exposed models score well on them only;
* nearly equal stakes and a moderate "perfect" model, so no single model dominates a round;
* fnc_v3_tb200 keeps the top and bottom 25 of 600 ids (8%, as 200 of 5,000 do at full size),
  not 200 (2/3 of the round, a near copy of fnc_v3).
"""

import base64
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pytest
from matplotlib.image import imread
from pydantic import ValidationError
from scipy.stats import spearmanr
from sklearn.metrics import r2_score

from tc_assets.defs.config import ProxyConfig
from tc_assets.defs.definitions import PlatformPaths, build_definitions
from tc_assets.defs.partitions import ROUNDS_PARTITIONS_NAME
from tc_assets.defs.plots import importance_figure, shapes_figure
from tc_assets.defs.proxy import load_window, tc_proxy_model
from tc_assets.defs.resources import WarehouseResource
from tc_assets.io.ingest import ingest_round, load_resolved
from tc_assets.io.source import LocalRoundSource
from tc_assets.io.synthetic import SyntheticSettings, generate_source
from tc_assets.io.warehouse import Warehouse
from tc_assets.scoring.contribution import TCSettings, true_contribution
from tc_assets.scoring.meta_model import prediction_matrix, swmm
from tc_assets.scoring.metrics import (
    MODEL_METRICS,
    MetricsSettings,
    feature_metrics,
    target_metrics,
)
from tc_assets.scoring.optimizer import OptimizerSettings, build_spec
from tc_assets.scoring.proxy_model import (
    INTERACTION_TERM,
    TERMS,
    InsufficientRoundsError,
    ProxyResult,
    ProxySettings,
    fit_tc_proxy,
    proxy_terms,
)

ROUNDS = list(range(1, 11))
GENERATED = SyntheticSettings(
    stocks=600,
    features=16,
    models=60,
    seed=3,
    feature_signal_corr=0.35,
    alpha_signal_corr=0.15,
    stake_sigma=0.3,
    perfect_corr=0.15,
)
FUND = OptimizerSettings(gamma=50.0, exposure_limit=0.01, max_position=0.2)
METRICS = MetricsSettings(top_bottom=25)
TC = TCSettings(engine="fast", bags=10, seed=0)
WINDOW = ProxySettings(window_rounds=10, held_out_rounds=3, min_rounds=6)
FNC_FAMILY = {"fnc_v3", INTERACTION_TERM}


def score_round(source: LocalRoundSource, r: int) -> pd.DataFrame:
    """One round's model_metrics columns and TC, by the project's own scoring functions."""
    inputs = ingest_round(source, r)
    target = load_resolved(source, r, inputs.ids)["target"]
    medium = inputs.live[inputs.medium]
    stakes = inputs.stakes["stake"].reindex(inputs.predictions.columns).fillna(0.0)
    metrics = target_metrics(
        inputs.predictions, medium, target, swmm(inputs.predictions, stakes), METRICS
    ).join(feature_metrics(inputs.predictions, medium, inputs.example, METRICS)[0])
    spec = build_spec(medium.to_numpy(dtype=np.float64), None, FUND)
    tc = true_contribution(
        prediction_matrix(inputs.predictions.to_numpy(dtype=np.float64)),
        stakes.to_numpy(),
        target.reindex(inputs.ids).to_numpy(),
        spec,
        TC,
        label=str(r),
    )
    out = metrics[list(MODEL_METRICS)].assign(tc=tc.tc, tc_std=tc.tc_std, bags=tc.bags)
    return out.rename_axis("model_id").reset_index().assign(round=r)


@pytest.fixture(scope="session")
def scored(tmp_path_factory) -> pd.DataFrame:
    """Long table (round, model_id, tc, metrics, kind) of the generated rounds (read-only)."""
    root = tmp_path_factory.mktemp("proxy_source")
    generate_source(root, ROUNDS, GENERATED)
    source = LocalRoundSource(root)
    frame = pd.concat([score_round(source, r) for r in ROUNDS], ignore_index=True)
    kinds = pd.read_csv(root / "rounds" / "1" / "planted.csv").set_index("model_id")["kind"]
    return frame.assign(kind=frame["model_id"].map(kinds))


@pytest.fixture(scope="session")
def fitted(scored) -> ProxyResult:
    return fit_tc_proxy(scored, WINDOW)


def planted(rounds: int = 8, models: int = 80, seed: int = 0) -> pd.DataFrame:
    """Independent metrics with a known truth: tc = 0.5 fnc_v3 - 0.02 max_feature_exposure
    + noise (fnc_v3's effect five times max_feature_exposure's, the rest nothing)."""
    rng = np.random.default_rng(seed)
    n = rounds * models
    frame = pd.DataFrame(
        {
            "round": np.repeat(np.arange(1, rounds + 1), models),
            "model_id": np.tile([f"m{j:03d}" for j in range(models)], rounds),
            **{m: rng.normal(0.0, 0.05, n) for m in MODEL_METRICS},
        }
    )
    frame["exposure_dissimilarity"] = rng.uniform(0.0, 1.2, n)
    frame["max_feature_exposure"] = rng.uniform(0.05, 0.9, n)
    frame["tc"] = (
        0.5 * frame["fnc_v3"] - 0.02 * frame["max_feature_exposure"] + rng.normal(0, 0.004, n)
    )
    return frame


FAST = {"outer_bags": 2, "refit_on_window": False}


# --- the proxy on generated rounds ----------------------------------------------------------


def test_fnc_v3_is_the_most_important_term_with_positive_monotonicity(scored, fitted):
    # The premise: on these rounds tc follows fnc_v3 far more than corr or mmc.
    rho = {m: spearmanr(scored["tc"], scored[m]).statistic for m in ("fnc_v3", "corr", "mmc")}
    assert rho["fnc_v3"] > 0.8 and rho["fnc_v3"] > max(rho["corr"], rho["mmc"]) + 0.2, rho

    imp = fitted.importance
    assert set(imp.index) == set(TERMS) and (imp["kind"] == "main").all()
    assert imp.index[0] in FNC_FAMILY, imp
    assert imp["monotonicity"].iloc[0] > 0.9
    assert imp["importance"].is_monotonic_decreasing
    assert imp["share"].sum() == pytest.approx(1.0)
    # Feature-exposed and example-copy models get lower TC: exposure lowers predicted TC.
    assert imp.loc["max_feature_exposure", "monotonicity"] < 0
    assert fitted.held_out_r2 > 0.5
    assert fitted.rounds == tuple(ROUNDS) and fitted.held_out_rounds == (8, 9, 10)
    assert fitted.rows == len(scored) and fitted.rows_dropped == 0


def test_outputs_reproduce_the_model_and_match_their_definitions(scored, fitted):
    """The shape tables alone rebuild every fitted prediction; importance, monotonicity and
    the interaction's centre follow their definitions on the window's rows."""
    m_f, m_e = scored["fnc_v3"].mean(), scored["exposure_dissimilarity"].mean()
    assert fitted.interaction_center == pytest.approx((m_f, m_e), rel=1e-12)
    x = scored[list(MODEL_METRICS)].assign(
        **{INTERACTION_TERM: (scored["fnc_v3"] - m_f) * (scored["exposure_dissimilarity"] - m_e)}
    )
    predicted = np.full(len(scored), fitted.intercept)
    for term in TERMS:
        shape = fitted.shapes[fitted.shapes["term"] == term].sort_values("bin")
        assert (np.diff(shape["lower"]) > 0).all() and (shape["upper"] > shape["lower"]).all()
        assert shape["weight"].sum() == len(scored)
        values = x[term].to_numpy()
        cell = np.searchsorted(shape["upper"].to_numpy()[:-1], values, side="right")
        assert (shape["lower"].to_numpy()[cell] <= values).all()
        assert (values <= shape["upper"].to_numpy()[cell]).all()
        contribution = shape["contribution"].to_numpy()[cell]
        predicted += contribution
        row = fitted.importance.loc[term]
        assert row["importance"] == pytest.approx(np.abs(contribution).mean(), rel=1e-9)
        assert row["monotonicity"] == pytest.approx(spearmanr(values, contribution).statistic)
    assert fitted.fit_r2 == pytest.approx(r2_score(scored["tc"], predicted), abs=1e-9)
    held = fitted.held_out
    assert sorted(held["round"].unique()) == [8, 9, 10]
    assert fitted.held_out_r2 == pytest.approx(r2_score(held["tc"], held["predicted"]))


def test_shuffled_tc_has_held_out_r2_near_zero(scored):
    rng = np.random.default_rng(11)
    shuffled = scored.copy()
    shuffled["tc"] = shuffled.groupby("round")["tc"].transform(lambda s: rng.permutation(s.values))
    control = fit_tc_proxy(shuffled, WINDOW.model_copy(update={"refit_on_window": False}))
    assert -0.2 < control.held_out_r2 < 0.05
    assert abs(control.held_out_corr) < 0.2


def test_same_seed_same_result_other_seed_differs():
    frame = planted()
    settings = ProxySettings(min_rounds=6, **FAST)
    a, b = fit_tc_proxy(frame, settings), fit_tc_proxy(frame, settings)
    pd.testing.assert_frame_equal(a.importance, b.importance, check_exact=True)
    pd.testing.assert_frame_equal(a.shapes, b.shapes, check_exact=True)
    pd.testing.assert_frame_equal(a.held_out, b.held_out, check_exact=True)
    c = fit_tc_proxy(frame, settings.model_copy(update={"seed": 1}))
    assert not np.array_equal(
        a.importance.loc[list(TERMS), "importance"], c.importance.loc[list(TERMS), "importance"]
    )


# --- window, errors, options ----------------------------------------------------------------


def test_too_few_rounds_is_a_clear_error(scored):
    early = scored[scored["round"] <= 5]
    with pytest.raises(InsufficientRoundsError, match=r"needs >= 6 .* found 5 \(1, 2, 3, 4, 5\)"):
        fit_tc_proxy(early, WINDOW)
    with pytest.raises(InsufficientRoundsError, match=r"up to round 4, found 4"):
        fit_tc_proxy(scored, WINDOW, window_end=4)
    with pytest.raises(InsufficientRoundsError, match="round 11 has no model with tc"):
        fit_tc_proxy(scored, WINDOW, window_end=11)
    # A round whose rows all lack tc does not count.
    unscored = scored.assign(tc=scored["tc"].where(scored["round"] > 5))
    with pytest.raises(InsufficientRoundsError, match=r"found 5 \(6, 7, 8, 9, 10\)"):
        fit_tc_proxy(unscored, WINDOW)
    with pytest.raises(ValidationError, match="min_rounds"):
        ProxySettings(held_out_rounds=4, min_rounds=5)
    with pytest.raises(ValidationError, match="window_rounds"):
        ProxySettings(window_rounds=6, min_rounds=8)
    with pytest.raises(ValueError, match="lacks columns"):
        fit_tc_proxy(scored.drop(columns="mmc"), WINDOW)


def test_window_takes_the_last_rounds_up_to_its_end_and_drops_incomplete_rows(scored):
    frame = scored.copy()
    frame.loc[frame.index[frame["round"] == 5][:7], "fnc_v3_tb200"] = np.nan
    settings = ProxySettings(window_rounds=6, held_out_rounds=2, min_rounds=4, **FAST)
    result = fit_tc_proxy(frame, settings, window_end=8)
    assert result.rounds == (3, 4, 5, 6, 7, 8) and result.window_end == 8
    assert result.train_rounds == (3, 4, 5, 6) and result.held_out_rounds == (7, 8)
    assert result.rows_dropped == 7
    assert result.rows == frame["round"].between(3, 8).sum() - 7
    assert set(result.held_out["round"]) == {7, 8}


def test_known_truth_is_recovered_and_pair_terms_are_reported():
    result = fit_tc_proxy(planted(), ProxySettings(interactions=1, min_rounds=6, **FAST))
    imp = result.importance
    assert imp.index[0] == "fnc_v3" and imp.loc["fnc_v3", "monotonicity"] > 0.95
    assert imp.loc["max_feature_exposure", "monotonicity"] < -0.95
    main = imp[imp["kind"] == "main"].drop(["fnc_v3", "max_feature_exposure"])
    assert (main["importance"] < 0.1 * imp.loc["fnc_v3", "importance"]).all()
    assert result.held_out_r2 > 0.9
    assert result.train_rounds == (1, 2, 3, 4) and result.held_out_rounds == (5, 6, 7, 8)
    pair = imp[imp["kind"] == "pair"]
    assert len(pair) == 1 and " & " in pair.index[0] and pair["monotonicity"].isna().all()
    assert set(result.shapes["term"]) == set(TERMS)
    assert result.top_terms(2) == ["fnc_v3", "max_feature_exposure"]


def test_interaction_term_centred_or_raw():
    frame = planted()
    raw = proxy_terms(frame)
    assert list(raw.columns) == list(TERMS)
    np.testing.assert_array_equal(
        raw[INTERACTION_TERM], frame["fnc_v3"] * frame["exposure_dissimilarity"]
    )
    result = fit_tc_proxy(frame, ProxySettings(center_interaction=False, min_rounds=6, **FAST))
    assert result.interaction_center == (0.0, 0.0)
    shape = result.shapes[result.shapes["term"] == INTERACTION_TERM]
    train = frame[frame["round"] <= 4]
    product = train["fnc_v3"] * train["exposure_dissimilarity"]
    assert shape["lower"].min() == pytest.approx(product.min())
    assert shape["upper"].max() == pytest.approx(product.max())


# --- the asset --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def warehouse(scored, tmp_path_factory) -> Warehouse:
    """A warehouse holding the generated rounds' model_metrics and tc_scores (read-only)."""
    wh = Warehouse(tmp_path_factory.mktemp("proxy_wh") / "warehouse.duckdb")
    for r, rows in scored.groupby("round"):
        wh.write_round(
            int(r),
            {
                "model_metrics": rows[["model_id", *MODEL_METRICS]],
                "tc_scores": rows[["model_id", "tc", "tc_std", "bags"]].assign(engine="fast"),
            },
        )
    return wh


def materialize(wh: Warehouse, key: str, **config) -> dg.ExecuteInProcessResult:
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(ROUNDS_PARTITIONS_NAME, [key])
        result = dg.materialize(
            [tc_proxy_model],
            partition_key=key,
            instance=instance,
            resources={"warehouse": WarehouseResource(path=str(wh.path))},
            run_config=dg.RunConfig({"tc_proxy_model": ProxyConfig(**config)}),
            raise_on_error=False,
        )
        result.logs = [e.message for e in instance.all_logs(result.run_id)]  # type: ignore[attr-defined]
        return result


def test_load_window_reads_the_last_rounds_up_to_the_end(warehouse, scored):
    frame = load_window(warehouse, window_end=8, window_rounds=4)
    assert sorted(frame["round"].unique()) == [5, 6, 7, 8]
    expected = scored[scored["round"].between(5, 8)].sort_values(["round", "model_id"])
    np.testing.assert_array_equal(frame["tc"], expected["tc"])
    np.testing.assert_array_equal(frame["fnc_v3"], expected["fnc_v3"])
    empty = Warehouse(warehouse.path.parent / "empty.duckdb")
    assert load_window(empty, 8, 4).empty


def test_asset_writes_the_window_and_plots(warehouse, fitted):
    result = materialize(warehouse, "10", **WINDOW.model_dump())
    assert result.success
    imp = warehouse.read_round("tc_proxy_importance", 10).set_index("term")
    assert list(imp.sort_values("rank").index) == list(fitted.importance.index)
    np.testing.assert_array_equal(
        imp.loc[fitted.importance.index, "importance"], fitted.importance["importance"]
    )
    np.testing.assert_array_equal(
        imp.loc[fitted.importance.index, "monotonicity"], fitted.importance["monotonicity"]
    )
    fit = warehouse.read_round("tc_proxy_fit", 10).iloc[0]
    assert fit["held_out_r2"] == fitted.held_out_r2 and fit["first_round"] == 1
    assert fit["top_term"] in FNC_FAMILY
    assert len(warehouse.read_round("tc_proxy_shape", 10)) == len(fitted.shapes)

    (mat,) = result.asset_materializations_for_node("tc_proxy_model")
    meta = mat.metadata
    assert meta["window"].value == "1-10" and meta["held_out_r2"].value == fitted.held_out_r2
    for name in ("importance", "shapes"):
        path = Path(meta[f"{name}_plot_path"].value)
        assert (
            path.parent == warehouse.path.parent / "tc_proxy" and str(path) == fit[f"{name}_plot"]
        )
        image = imread(path)
        assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 600
        assert image[..., :3].std() > 0.05  # something is drawn
        md = meta[f"{name}_plot"].value
        assert md.startswith("![") and "(data:image/png;base64," in md
        assert base64.b64decode(md.split("base64,")[1].rstrip(")")) == path.read_bytes()


def test_plots_have_titled_axes(fitted):
    (ax, colorbar) = importance_figure(fitted).axes
    assert "What explains TC" in ax.get_title() and ax.get_xlabel() and ax.get_ylabel()
    assert [t.get_text() for t in ax.get_yticklabels()][-1] == fitted.importance.index[0]
    assert colorbar.get_ylabel() == "monotonicity (Spearman)"
    terms = fitted.top_terms(4)
    panels = [a for a in shapes_figure(fitted, terms).axes if a.get_ylabel()]
    assert len(panels) == 4
    for term, ax in zip(terms, panels, strict=True):
        assert ax.get_title().startswith(term) and ax.get_xlabel()
        assert ax.get_ylabel() == "contribution to predicted TC"


def test_asset_with_too_few_rounds_skips_or_fails_clearly(warehouse):
    """A short window is recorded as done without a fit (the partition views count the round
    as materialized), with the reason; `fail_when_short` fails instead."""
    skipped = materialize(warehouse, "3")
    (mat,) = skipped.asset_materializations_for_node("tc_proxy_model")
    assert skipped.success and mat.metadata["fitted"].value is False
    assert "the TC proxy needs >= 8" in mat.metadata["reason"].value
    assert any("no fit: the TC proxy needs >= 8" in (m or "") for m in skipped.logs)
    failed = materialize(warehouse, "3", fail_when_short=True)
    assert not failed.success
    (failure,) = [e for e in failed.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE]
    assert "found 3 (1, 2, 3)" in failure.event_specific_data.error.message


def test_a_window_refit_with_too_few_rounds_leaves_no_earlier_fit(warehouse):
    """Window 5 fitted with a low min_rounds, then re-run with the default (8): the earlier
    fit of that window is removed, not left in the warehouse as if it still held."""
    small = {"min_rounds": 3, "held_out_rounds": 1, "window_rounds": 5}
    assert materialize(warehouse, "5", **small).success
    tables = ("tc_proxy_importance", "tc_proxy_shape", "tc_proxy_fit")
    assert all(len(warehouse.read_round(t, 5)) for t in tables)
    again = materialize(warehouse, "5")
    (mat,) = again.asset_materializations_for_node("tc_proxy_model")
    assert again.success and mat.metadata["fitted"].value is False
    assert all(warehouse.read_round(t, 5).empty for t in tables)


def test_definitions_run_the_proxy_in_the_round_job(tmp_path):
    defs = build_definitions(PlatformPaths.create(str(tmp_path / "src"), str(tmp_path / "w.db")))
    job = defs.resolve_job_def("score_round")
    assert dg.AssetKey("tc_proxy_model") in job.asset_layer.executable_asset_keys
    deps = defs.resolve_assets_def("tc_proxy_model").asset_deps[dg.AssetKey("tc_proxy_model")]
    assert {dg.AssetKey("model_metrics"), dg.AssetKey("tc_scores")} <= set(deps)
