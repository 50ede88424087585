"""True Contribution: its invariances, the three engines against each other and against finite
differences, the known flaws of leave-one-out, and the planted truth of generated rounds."""

from __future__ import annotations

import json
from pathlib import Path

import cvxpy as cp
import numpy as np
import pandas as pd
import pytest
from numerai_tools.scoring import numerai_corr
from scipy.stats import rankdata, spearmanr

from tc_assets.io.synthetic import SyntheticSettings, generate_source
from tc_assets.scoring._tc_dual import DualNewtonSolver
from tc_assets.scoring.contribution import TCResult, TCSettings, dropout_masks, true_contribution
from tc_assets.scoring.meta_model import prediction_matrix
from tc_assets.scoring.optimizer import (
    OptimizerSettings,
    PortfolioSolveError,
    PortfolioSpec,
    build_cvxpy_problem,
    build_spec,
)

ONE_PLAIN_BAG = TCSettings(bags=1, dropout=0.0)  # the plain gradient at the given stakes


def small_round(
    seed: int, n: int = 160, k: int = 6, m: int = 10
) -> tuple[np.ndarray, np.ndarray, np.ndarray, PortfolioSpec]:
    """Models = shared signal (varying strength) + a feature tilt + noise; lognormal stakes."""
    rng = np.random.default_rng(seed)
    features = rng.integers(0, 5, (n, k)).astype(float)
    target = rng.choice([0.0, 0.25, 0.5, 0.75, 1.0], n, p=[0.05, 0.2, 0.5, 0.2, 0.05])
    signal = target - 0.5 + 0.3 * rng.standard_normal(n)
    raw = np.stack(
        [
            rng.uniform(0.0, 1.0) * signal
            + rng.uniform(0.0, 0.3) * (features[:, j % k] - 2.0)
            + rng.standard_normal(n)
            for j in range(m)
        ],
        axis=1,
    )
    stakes = rng.lognormal(0.0, 1.0, m)
    adv = np.exp(rng.normal(np.log(2e7), 1.0, n))
    spec = build_spec(features, adv, OptimizerSettings(gamma=10.0, max_position=0.03))
    return prediction_matrix(raw), stakes, target, spec


# --- the method's promises, on the default bagged path (100 bags, dropout 0.5) ----------------

DEFAULT_PATHS = [TCSettings(), TCSettings(antithetic=False)]
PATH_IDS = ["antithetic", "independent"]


@pytest.mark.parametrize("settings", DEFAULT_PATHS, ids=PATH_IDS)
def test_identical_predictions_with_stakes_1_and_1000_get_equal_tc(settings: TCSettings) -> None:
    p, stakes, target, spec = small_round(1)
    p[:, 3] = p[:, 2]
    stakes[2], stakes[3] = 1.0, 1000.0
    res = true_contribution(p, stakes, target, spec, settings, label="1")
    assert res.bags == 100 and abs(res.tc[2]) > 1e-3
    # Their masks differ, and so do the bags where each one's stake is in the meta model.
    assert not np.array_equal(res.masks[:, 2], res.masks[:, 3])
    assert res.tc[3] == pytest.approx(res.tc[2], rel=1e-9)
    np.testing.assert_allclose(res.bag_tc[:, 3], res.bag_tc[:, 2], rtol=1e-9)


@pytest.mark.parametrize("settings", DEFAULT_PATHS, ids=PATH_IDS)
def test_a_zero_stake_copy_gets_the_tc_of_the_staked_model(settings: TCSettings) -> None:
    p, stakes, target, spec = small_round(2)
    p = np.column_stack([p, p[:, 4]])
    stakes = np.append(stakes, 0.0)
    res = true_contribution(p, stakes, target, spec, settings, label="2")
    assert stakes[4] > 0 and abs(res.tc[4]) > 1e-3
    assert res.tc[-1] == pytest.approx(res.tc[4], rel=1e-9)
    # The copy is scored in every bag; adding it changes no bag and no other model's TC.
    assert np.all(res.bag_tc[:, -1] != 0.0)
    without = true_contribution(p[:, :-1], stakes[:-1], target, spec, settings, label="2")
    np.testing.assert_allclose(res.tc[:-1], without.tc, rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("settings", DEFAULT_PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("factor", [1e-3, 1e3])
def test_multiplying_every_stake_leaves_tc_unchanged(settings: TCSettings, factor: float) -> None:
    p, stakes, target, spec = small_round(3)
    one = true_contribution(p, stakes, target, spec, settings)
    scaled = true_contribution(p, factor * stakes, target, spec, settings)
    np.testing.assert_allclose(scaled.tc, one.tc, rtol=1e-9, atol=1e-9 * np.abs(one.tc).max())
    assert scaled.scale == pytest.approx(one.scale, rel=1e-9)


def test_zero_stake_models_get_a_tc_nonzero_when_informative() -> None:
    p, stakes, target, spec = small_round(2)
    ties_broken = target + 1e-6 * np.arange(target.size)
    informative = prediction_matrix(ties_broken[:, None])
    p = np.column_stack([p, informative[:, 0]])
    stakes = np.append(stakes, 0.0)
    res = true_contribution(p, stakes, target, spec, label="2")
    assert res.tc[-1] > 0.1  # pays: it knows the target
    assert res.tc[-1] == res.tc.max()


def test_tc_is_affine_in_the_models_ranks() -> None:
    p, stakes, target, spec = small_round(9)
    res = true_contribution(p, stakes, target, spec, label="9")
    assert res.g is not None
    np.testing.assert_allclose(p.T @ res.g - res.c, res.tc, rtol=1e-9, atol=1e-12)


# --- scale, degenerate rounds, untradable bags ------------------------------------------------


def test_a_target_shaped_deviation_scores_one() -> None:
    """kappa makes a unit-spread deviation equal to the standardized target score 1 (exactly,
    in every bag, for a model whose column is x_b + t / std(t))."""
    p, stakes, target, spec = small_round(10)
    res = true_contribution(p, stakes, target, spec, label="10")
    t = target - target.mean()
    # P_j . g - c for a column equal to x_b + t/std(t) in each bag has mean exactly 1.
    assert res.g is not None
    assert float(t @ res.g) / t.std() == pytest.approx(1.0, rel=1e-9)
    assert 0.0 < res.passthrough <= 1.0


def test_near_linear_programs_get_a_positive_scale_or_fail_clearly() -> None:
    """At a small gamma the problem is nearly a linear program: every position sits at 0 or a
    cap but one per side. At 0.005 the full-stake portfolio passes nothing through (the
    Jacobian's trace is 0, the scale that erased every TC) while the bags do; at 0.003 the trace
    jumps to 1/gamma. The scale is positive in both and TC barely moves between them. At 0.001
    no bag passes anything, every gradient is 0, and the round fails naming the setting: it
    never gets all-zero TC."""
    p, stakes, target, spec = small_round(11)

    def at(gamma: float) -> PortfolioSpec:
        return PortfolioSpec(gamma, spec.caps, spec.exposures, spec.limits)

    def full_trace(s: PortfolioSpec) -> float:
        solver = DualNewtonSolver(s, device="cpu")
        return solver.jacobian_trace(
            solver.solve_or_raise((p @ stakes / stakes.sum())[None, :], label="11")
        )

    assert full_trace(at(5e-3)) == 0.0 and full_trace(at(3e-3)) == pytest.approx(1 / 3e-3)
    five, three = (true_contribution(p, stakes, target, at(g), label="11") for g in (5e-3, 3e-3))
    for res in (five, three):
        assert res.scale > 0 and res.passthrough > 0 and res.tc.std() > 0.01
    assert np.corrcoef(five.tc, three.tc)[0, 1] > 0.99
    assert 0.5 < five.tc.std() / three.tc.std() < 2.0
    with pytest.raises(ValueError, match=r"round 11: TC is undefined.*Raise gamma"):
        true_contribution(p, stakes, target, at(1e-3), label="11")


def test_bags_that_hold_stocks_on_both_sides_are_skipped_then_fail_the_round() -> None:
    """A universe barely large enough for the caps: the full-stake portfolio is tradable but a
    few bags' optima hold stocks long and short. With the default settings they are skipped
    and counted; above max_untradable_bags the round fails."""
    p, stakes, target, spec = small_round(12, n=250, k=4, m=10)
    tight = PortfolioSpec(22.0, np.full(250, 0.01), spec.exposures, spec.limits)
    res = true_contribution(p, stakes, target, tight, label="12")
    bad = len(res.untradable_bags)
    assert res.portfolio.long_short_overlap == 0.0
    assert 0 < bad <= 10, "the fixture must mix tradable and untradable bags"
    assert res.bags == 100 - bad and res.bag_tc.shape[0] == res.bags
    assert not set(res.untradable_bags) & set(res.used_bags.tolist())
    assert np.all(np.isfinite(res.tc))
    with pytest.raises(ValueError, match=rf"round 12: {bad} of 100 TC bags .* both long and short"):
        true_contribution(
            p, stakes, target, tight, TCSettings(max_untradable_bags=(bad - 1) / 100), label="12"
        )


def test_antithetic_pairs_need_an_even_number_of_bags() -> None:
    with pytest.raises(ValueError, match="bags must be even"):
        TCSettings(bags=7)
    assert TCSettings(bags=7, antithetic=False).bags == 7
    assert TCSettings(bags=7, dropout=0.25).bags == 7


# --- engines -----------------------------------------------------------------------------


@pytest.mark.parametrize("settings", DEFAULT_PATHS, ids=PATH_IDS)
def test_fast_and_reference_engines_agree_on_the_default_bags(settings: TCSettings) -> None:
    p, stakes, target, spec = small_round(4, n=120, k=5, m=8)
    stakes[6] = 0.0
    fast = true_contribution(p, stakes, target, spec, settings, label="4")
    ref = true_contribution(
        p, stakes, target, spec, settings.model_copy(update={"engine": "reference"}), label="4"
    )
    np.testing.assert_array_equal(fast.masks, ref.masks)
    assert fast.bags == ref.bags >= 99 and fast.skipped_bags == ref.skipped_bags
    assert fast.untradable_bags == ref.untradable_bags == []
    assert fast.portfolio.active_caps > 0 and fast.portfolio.active_exposures > 0
    assert np.corrcoef(fast.tc, ref.tc)[0, 1] >= 0.999
    assert np.abs(fast.tc - ref.tc).max() <= 1e-3 * np.abs(ref.tc).max()
    assert np.abs(fast.bag_tc - ref.bag_tc).max() <= 1e-3 * np.abs(ref.bag_tc).max()
    assert ref.scale == pytest.approx(fast.scale, rel=1e-4)
    np.testing.assert_allclose(fast.bag_returns, ref.bag_returns, atol=1e-7)
    np.testing.assert_allclose(
        fast.unbagged_tc, ref.unbagged_tc, atol=1e-3 * np.abs(ref.unbagged_tc).max()
    )


def realized_return(
    p: np.ndarray, stakes: np.ndarray, target: np.ndarray, spec: PortfolioSpec
) -> float:
    """R(s) = t . w*(P s / sum s), solved independently by Clarabel at tight tolerances."""
    prob = build_cvxpy_problem(spec)
    prob.signal.value = p @ stakes / stakes.sum()
    prob.problem.solve(solver=cp.CLARABEL, tol_gap_abs=1e-13, tol_gap_rel=1e-13, tol_feas=1e-13)
    assert prob.problem.status == cp.OPTIMAL
    return float((prob.long.value - prob.short.value) @ (target - target.mean()))


def test_reference_gradient_matches_central_differences_of_r() -> None:
    p, stakes, target, spec = small_round(5, n=200, k=5, m=6)
    stakes[4] = 0.0
    ref = true_contribution(
        p, stakes, target, spec, ONE_PLAIN_BAG.model_copy(update={"engine": "reference"})
    )
    total = stakes.sum()
    h = 1e-4 * total
    for j in (0, 2, 4):
        bump = np.zeros_like(stakes)
        bump[j] = h
        fd = (
            realized_return(p, stakes + bump, target, spec)
            - realized_return(p, stakes - bump, target, spec)
        ) / (2 * h)
        assert ref.tc[j] == pytest.approx(total * fd / ref.scale, rel=1e-4, abs=1e-6)


def test_leave_one_out_shows_its_known_flaws() -> None:
    p, stakes, target, spec = small_round(6)
    p[:, 1] = p[:, 0]  # identical signals ...
    stakes[0], stakes[1] = 4.0, 0.4  # ... different stakes
    stakes[5] = 0.0  # an unstaked model
    loo = true_contribution(p, stakes, target, spec, TCSettings(engine="leave_one_out"), label="6")
    grad = true_contribution(p, stakes, target, spec, ONE_PLAIN_BAG, label="6")
    assert loo.tc[5] == 0.0 and abs(grad.tc[5]) > 1e-3
    assert abs(loo.tc[0] - loo.tc[1]) > 0.5 * max(abs(loo.tc[0]), abs(loo.tc[1]))
    assert grad.tc[1] == pytest.approx(grad.tc[0], rel=1e-6)
    # Checked independently: dropping model 0 changes R by exactly its LOO value.
    without = stakes.copy()
    without[0] = 0.0
    dr = realized_return(p, stakes, target, spec) - realized_return(p, without, target, spec)
    assert loo.tc[0] * loo.scale == pytest.approx(dr, abs=1e-7)
    with pytest.raises(ValueError, match="small rounds"):
        true_contribution(
            p, stakes, target, spec, TCSettings(engine="leave_one_out", loo_max_models=3)
        )


# --- bags ----------------------------------------------------------------------------------


def test_dropout_masks_are_seeded_and_antithetic() -> None:
    a = dropout_masks(30, 10, 0.5, seed=1, antithetic=True)
    np.testing.assert_array_equal(a, dropout_masks(30, 10, 0.5, seed=1, antithetic=True))
    np.testing.assert_array_equal(a[1::2], ~a[0::2])
    b = dropout_masks(30, 400, 0.25, seed=2, antithetic=True)  # not 0.5: independent bags
    assert abs(b.mean() - 0.75) < 0.01
    assert not np.array_equal(b[1], ~b[0])


def test_a_bag_without_kept_stake_is_skipped_by_every_engine() -> None:
    p, stakes, target, spec = small_round(7, n=200, k=4, m=5)
    stakes[1:] = 0.0  # one staked model: every bag that drops it has no meta model
    settings = TCSettings(bags=6, seed=4)
    fast = true_contribution(p, stakes, target, spec, settings)
    dropped = [int(b) for b in np.flatnonzero(~fast.masks[:, 0])]
    assert fast.skipped_bags == dropped and fast.bags == 6 - len(dropped) == 3
    ref = true_contribution(
        p, stakes, target, spec, settings.model_copy(update={"engine": "reference"})
    )
    assert ref.skipped_bags == dropped
    np.testing.assert_allclose(fast.tc, ref.tc, atol=1e-3 * np.abs(ref.tc).max())
    # A kept bag's meta model is the full one: every model, the dropped ones included, gets
    # its plain gradient there.
    plain = true_contribution(p, stakes, target, spec, ONE_PLAIN_BAG).tc
    np.testing.assert_allclose(fast.bag_tc, np.tile(plain, (3, 1)), rtol=1e-9, atol=1e-12)


def test_solver_failures_name_round_bag_and_status() -> None:
    p, stakes, target, spec = small_round(8, n=60, k=3, m=4)
    starved = TCSettings(engine="reference", bags=2, reference_max_iters=2)
    with pytest.raises(PortfolioSolveError, match=r"round 88, bag 0: .*status") as err:
        true_contribution(p, stakes, target, spec, starved, label="88")
    assert (err.value.label, err.value.bag) == ("88", 0)
    infeasible = PortfolioSpec(spec.gamma, np.full(60, 0.01), spec.exposures, spec.limits)
    with pytest.raises(PortfolioSolveError, match=r"round 89, meta portfolio.*'infeasible'"):
        true_contribution(p, stakes, target, infeasible, TCSettings(bags=2), label="89")


# --- generated data, default config -----------------------------------------------------------


@pytest.fixture(scope="module")
def generated() -> dict[str, object]:
    """Round 1 at the generator's default size, with stronger signals (0.2, see the README:
    at its default 0.1 the feature/alpha ordering holds on average but not in every round)."""
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="tc_source_"))
    settings = SyntheticSettings(feature_signal_corr=0.2, alpha_signal_corr=0.2)
    generate_source(root, [1], settings)
    d = root / "rounds" / "1"
    live = pd.read_parquet(d / "live.parquet").set_index("id")
    medium = json.loads((root / "features.json").read_text())["feature_sets"]["medium"]
    stakes = pd.read_csv(d / "stakes.csv").set_index("model_id")["stake"]
    kinds = pd.read_csv(d / "planted.csv").set_index("model_id")["kind"]
    raw = pd.DataFrame(
        {
            f.stem: pd.read_csv(f).set_index("id")["prediction"]
            for f in sorted((d / "predictions").glob("*.csv"))
        }
    ).reindex(live.index)
    target = pd.read_parquet(d / "resolved.parquet").set_index("id")["target"].reindex(live.index)
    adv = pd.read_parquet(d / "market.parquet").set_index("id")["adv_usd"].reindex(live.index)
    corr = np.array(
        [numerai_corr(raw[[c]].dropna(), target.rename("target"))[c] for c in raw.columns]
    )
    spec = build_spec(live[medium].to_numpy(float), adv.to_numpy())
    p = prediction_matrix(raw.to_numpy())
    s = stakes.reindex(raw.columns).to_numpy(float)
    runs = [
        true_contribution(p, s, target.to_numpy(), spec, TCSettings(seed=seed), label="1")
        for seed in (0, 1)
    ]
    return {"kinds": kinds.reindex(raw.columns).to_numpy(), "corr": corr, "runs": runs}


def test_perfect_model_tops_tc_and_its_negation_is_last(generated: dict[str, object]) -> None:
    kinds = generated["kinds"]
    for res in generated["runs"]:
        assert kinds[np.argmax(res.tc)] == "perfect"
        assert kinds[np.argmin(res.tc)] == "perfect_negated"


def test_tc_does_not_pay_for_exposure_the_optimizer_removes(generated: dict[str, object]) -> None:
    kinds, corr = generated["kinds"], generated["corr"]
    res: TCResult = generated["runs"][0]
    by_tc, by_corr = rankdata(res.tc) / kinds.size, rankdata(corr) / kinds.size
    exposed, alpha = kinds == "feature_exposed", kinds == "unique_alpha"
    print(
        f"mean rank feature_exposed TC {by_tc[exposed].mean():.2f} vs CORR {by_corr[exposed].mean():.2f}; "
        f"unique_alpha TC {by_tc[alpha].mean():.2f} vs CORR {by_corr[alpha].mean():.2f}"
    )
    assert by_tc[exposed].mean() < by_corr[exposed].mean()
    assert by_tc[alpha].mean() > by_corr[alpha].mean()


def test_bagged_tc_is_stable_and_scaled_like_corr(
    generated: dict[str, object], record_property
) -> None:
    first, second = generated["runs"]
    corr, kinds = generated["corr"], generated["kinds"]
    # The planted perfect model and its negation sit far out (TC ~ +-0.5 against ~0.03):
    # every figure is also given without them, where it is not carried by two points.
    rest = ~np.isin(kinds, ["perfect", "perfect_negated"])
    figures = {}
    for tag, keep in (("", slice(None)), ("_without_perfect_pair", rest)):
        a, b, u = first.tc[keep], second.tc[keep], first.unbagged_tc[keep]
        figures[f"seed_corr{tag}"] = float(np.corrcoef(a, b)[0, 1])
        figures[f"seed_spearman{tag}"] = float(spearmanr(a, b)[0])
        figures[f"unbagged_corr{tag}"] = float(np.corrcoef(a, u)[0, 1])
        figures[f"std_ratio{tag}"] = float(a.std() / corr[keep].std())
    for name, value in figures.items():
        record_property(name, value)
    print(
        f"TC at 100 bags ({first.seconds:.2f} s, {first.time_per_bag_s * 1e3:.1f} ms/bag), "
        f"split-half {first.split_half():.4f}: "
        + ", ".join(f"{name} {value:.4f}" for name, value in figures.items())
    )
    assert figures["seed_corr"] >= 0.99
    assert figures["seed_corr_without_perfect_pair"] >= 0.95
    assert figures["seed_spearman_without_perfect_pair"] >= 0.9
    assert figures["unbagged_corr"] >= 0.9
    assert figures["unbagged_corr_without_perfect_pair"] >= 0.7
    assert 0.5 <= figures["std_ratio"] <= 2.0
    assert 0.5 <= figures["std_ratio_without_perfect_pair"] <= 2.0
    assert first.bags == 100 and first.skipped_bags == []
    assert first.kkt_max <= 1e-10
