"""The contribution assets on generated rounds: `meta_portfolio` (weights in the warehouse, its
metadata and constraint check) and `tc_scores` (table and metadata), and what a round whose
portfolio or TC cannot be computed leaves behind: a clear failure and nothing written."""

import dagster as dg
import numpy as np
import pandas as pd
import pytest

from tc_assets.defs.contribution import round_spec
from tc_assets.defs.partitions import ROUNDS_PARTITIONS_NAME
from tc_assets.io.ingest import ingest_round
from tc_assets.io.source import LocalRoundSource
from tc_assets.io.synthetic import SyntheticSettings
from tc_assets.io.warehouse import Warehouse
from tc_assets.scoring.meta_model import prediction_matrix
from tc_assets.scoring.optimizer import OptimizerSettings, check_constraints
from tests.conftest import make_source, platform, run_job

SELECTION = ("meta_portfolio", "tc_scores")


def run_contribution(defs, instance, r: int, run_config: dict | None = None):
    """Materialize the contribution assets of round r, their upstream and checks."""
    key = str(r)
    if not instance.has_dynamic_partition(ROUNDS_PARTITIONS_NAME, key):
        instance.add_dynamic_partitions(ROUNDS_PARTITIONS_NAME, [key])
    selection = dg.AssetSelection.assets(*SELECTION).upstream().required_multi_asset_neighbors()
    return defs.resolve_implicit_global_asset_job_def().execute_in_process(
        instance=instance,
        partition_key=key,
        asset_selection=list(selection.resolve(defs.resolve_asset_graph())),
        run_config=run_config or {},
        raise_on_error=False,
    )


def metadata(result: dg.ExecuteInProcessResult, key: str) -> dict:
    (event,) = [e for e in result.get_asset_materialization_events() if e.asset_key.path == [key]]
    return {k: v.value for k, v in event.step_materialization_data.materialization.metadata.items()}


def failure(result: dg.ExecuteInProcessResult, step: str) -> str:
    (event,) = [
        e
        for e in result.all_events
        if e.event_type == dg.DagsterEventType.STEP_FAILURE and e.step_key == step
    ]
    return event.step_failure_data.error.message


def test_meta_portfolio_and_tc_scores_on_a_generated_round(
    small_source, tmp_path, instance, value_store
):
    defs, paths = platform(small_source, tmp_path, value_store)
    result = run_contribution(defs, instance, 1)
    assert result.success
    wh = Warehouse(paths.warehouse)
    inputs = ingest_round(LocalRoundSource(small_source), 1)
    spec = round_spec(
        inputs.live, {"feature_sets": inputs.feature_sets}, inputs.market, OptimizerSettings()
    )

    # The weights in the warehouse are a valid portfolio of the round's problem ...
    meta = wh.read_round("meta_model", 1).set_index("id").reindex(inputs.ids)
    w = meta["weight"].to_numpy()
    assert check_constraints(w, spec, tol=1e-7) == []
    assert np.maximum(w, 0).sum() == pytest.approx(1.0) and w.sum() == pytest.approx(0.0, abs=1e-9)
    # ... whose metadata says how it binds and what it earned (R = w . centred target).
    md = metadata(result, "meta_portfolio")
    assert md["status"] == "optimal" and md["kkt_residual"] <= 1e-10
    assert md["active_position_caps"] > 0 and md["active_exposure_limits"] > 0
    assert md["free_positions"] > 0 and md["exposure_constraints"] == spec.n_exposures
    target = wh.read_round("resolved", 1).set_index("id")["target"].reindex(inputs.ids)
    centred = (target - target.mean()).fillna(0.0).to_numpy()
    assert md["realized_R_target"] == pytest.approx(float(w @ centred), abs=1e-12)
    checks = {c.check_name: c for c in result.get_asset_check_evaluations()}
    assert checks["meta_portfolio_constraints"].passed

    # tc_scores: one row per valid prediction submission, staked or not, as in the metadata.
    tc = wh.read_round("tc_scores", 1).set_index("model_id")
    assert set(tc.index) == set(inputs.predictions.columns)
    assert tc["tc"].notna().all() and (tc["tc_std"] > 0).any()
    stake = inputs.stakes["stake"].reindex(tc.index).fillna(0.0)
    zero_stake = list(stake.index[stake == 0])
    assert zero_stake and (tc.loc[zero_stake, "tc"] != 0).any()
    md = metadata(result, "tc_scores")
    assert md["engine"] == "fast" and md["models"] == len(tc)
    # 100 bags: those used, plus any skipped (no kept stake) or untradable, within the limit.
    assert md["bags"] + md["skipped_bags"] + md["untradable_bags"] == 100
    assert md["untradable_bags"] <= 10 and (tc["bags"] == md["bags"]).all()
    assert md["split_half_stability"] > 0.9 and md["corr_with_unbagged_gradient"] > 0.8
    assert md["meta_portfolio_R"] == pytest.approx(
        metadata(result, "meta_portfolio")["realized_R_target"]
    )
    assert checks["tc_scores_finite"].passed

    # The planted duplicates (same predictions as another model, other stake) get the same TC.
    planted = pd.read_csv(small_source / "rounds" / "1" / "planted.csv")
    dups = planted[planted["kind"] == "duplicate"]
    pairs = list(zip(dups["duplicate_of"], dups["model_id"], strict=True))
    assert pairs and all(stake[a] != stake[b] for a, b in pairs)
    for a, b in pairs:
        assert tc.loc[b, "tc"] == pytest.approx(tc.loc[a, "tc"], rel=1e-9)

    # TC is affine in the ranks: TC_j = P_j . g - c with g and c from the warehouse.
    g = wh.read_round("tc_vectors", 1).set_index("id")["g"].reindex(inputs.ids)
    (scale,) = wh.read_round("tc_scale", 1).itertuples()
    p = prediction_matrix(inputs.predictions.reindex(inputs.ids).to_numpy(dtype=np.float64))
    affine = pd.Series(p.T @ g.to_numpy() - scale.c, index=inputs.predictions.columns)
    np.testing.assert_allclose(affine.reindex(tc.index), tc["tc"], rtol=1e-9, atol=1e-12)
    # The metadata shows figures rounded to 6 significant digits.
    assert scale.kappa == pytest.approx(md["scale_kappa"], rel=1e-5) and scale.bags == md["bags"]
    assert 0.3 < scale.tc_std_over_corr_std < 3.0
    assert md["tc_std_over_corr_std"] == pytest.approx(scale.tc_std_over_corr_std, rel=1e-5)


def test_a_universe_too_small_for_the_caps_fails_the_round_clearly(tmp_path, instance):
    """300 stocks at max position 0.01: the optimum would hold stocks both long and short, so
    the meta portfolio fails with the reason and the fix; no weight and no TC is written."""
    small = SyntheticSettings(stocks=300, features=12, models=30, seed=5)
    source = make_source(tmp_path / "source", [1], small)
    defs, paths = platform(source, tmp_path)
    result = run_contribution(defs, instance, 1)
    assert not result.success
    message = failure(result, "meta_portfolio")
    assert "round 1" in message and "both long and short" in message
    assert "lower gamma or raise max_position" in message
    wh = Warehouse(paths.warehouse)
    assert wh.read_round("meta_model", 1)["weight"].isna().all()
    assert "tc_scores" not in wh.table_names() or wh.read_round("tc_scores", 1).empty


def test_a_solver_that_does_not_converge_fails_tc_naming_round_and_bag(
    small_source, tmp_path, instance
):
    """TC solves held to an unreachable tolerance: retried, then the round fails naming the
    round, the bag and the status; a previous TC of the round stays as it was."""
    defs, paths = platform(small_source, tmp_path)
    assert run_job(defs, instance, 2).success
    before = Warehouse(paths.warehouse).read_round("tc_scores", 2)
    config = {"ops": {"tc_scores": {"config": {"kkt_tol": 1e-300, "max_newton_iter": 2}}}}
    result = run_contribution(defs, instance, 2, config)
    assert not result.success
    message = failure(result, "tc_scores")
    assert "round 2" in message and "max_iterations" in message
    assert "cold restart" in message
    after = Warehouse(paths.warehouse).read_round("tc_scores", 2)
    assert len(before) > 0
    assert (
        after.sort_values("model_id")
        .reset_index(drop=True)
        .equals(before.sort_values("model_id").reset_index(drop=True))
    )
