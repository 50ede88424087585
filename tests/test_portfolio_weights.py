"""Portfolio-weight payouts: every formula against hand-computed small examples."""

import math

import numpy as np
import pandas as pd
import pytest

from tc_assets.scoring.portfolio_weights import (
    PortfolioPayoutSettings,
    bucketed_returns,
    capacity,
    capacity_curves,
    check_portfolios,
    estimate_bucket_per_return,
    liquidity_cost,
    liquidity_terms,
    marginal_return,
    meta_lost,
    payout_percentage,
    raw_payout_percentage,
    scenario,
    score_portfolios,
    sharpe_contribution,
    sharpe_ratio,
)

IDS = pd.Index(["s1", "s2", "s3", "s4"], name="id")
# Mean target 0.5: b = target - 0.5 (target units).
RESOLVED = pd.DataFrame(
    {"target": [1.0, 0.75, 0.25, 0.0], "return": [0.03, -0.01, 0.02, -0.04]}, index=IDS
)
B = np.array([0.5, 0.25, -0.25, -0.5])
TARGETS_ONLY = RESOLVED[["target"]]
W = pd.DataFrame({"u": [0.5, 0.5, -0.5, -0.5]}, index=IDS)
META_UP = pd.Series([1.0, 0.0, 0.0, -1.0], index=IDS)  # MR = 0.03 + 0.04 = 0.07
META_DOWN = -META_UP  # MR = -0.07
CONSTANT = PortfolioPayoutSettings(cost_model="constant", t=0.004, t_b=0.002, g=0.1, c=20, c_b=3)


def _score(meta=META_UP, weights=W, settings=CONSTANT, adv=None, stakes=None, resolved=RESOLVED):
    stakes = pd.Series({"u": 1000.0}) if stakes is None else stakes
    return score_portfolios(weights, meta, resolved, stakes, 0.5, 0.05, adv, settings)


def test_bucketed_return_is_the_centred_target():
    b = bucketed_returns(np.array([0, 0.25, 0.5, 0.75, 1.0, 1.0]))
    np.testing.assert_allclose(b, np.array([0, 0.25, 0.5, 0.75, 1.0, 1.0]) - 3.5 / 6)
    np.testing.assert_array_equal(bucketed_returns(RESOLVED["target"].to_numpy()), B)
    np.testing.assert_array_equal(bucketed_returns(np.full(3, 0.5)), 0.0)
    with pytest.raises(ValueError, match="finite"):
        bucketed_returns(np.array([0.5, np.nan]))


def test_pb_is_w_dot_target_whatever_the_returns():
    row = _score().table.iloc[0]
    assert row["pb"] == pytest.approx(W["u"] @ RESOLVED["target"], abs=1e-15)
    for resolved in (RESOLVED.assign(**{"return": RESOLVED["return"] * 10}), TARGETS_ONLY):
        other = _score(resolved=resolved).table.iloc[0]
        for col in ("pb", "mb", "transaction_cost", "pp", "payout"):
            assert other[col] == row[col], col


def test_pb_pr_mb_mr_and_the_constant_cost_model_with_meta_up():
    row = _score().table.iloc[0]
    # PB = 0.5 (b1 + b2) - 0.5 (b3 + b4) = 0.75; PR = 0.5 (0.02) - 0.5 (-0.02) = 0.02
    assert row["pb"] == pytest.approx(0.75)
    assert row["pr"] == pytest.approx(0.02)
    assert row["mb"] == pytest.approx(1.0) and row["mr"] == pytest.approx(0.07)
    assert (row["meta_loss_basis"], row["meta_lost"]) == ("mr", False)
    assert row["transaction_cost"] == 0.002 and row["transaction_cost_raw"] == 0.004
    # MR >= 0: PP = (PB - t_b) / g; PP_raw = c (PR - t) = 20 * 0.016
    assert row["pp"] == pytest.approx((0.75 - 0.002) / 0.1)
    assert row["pp_raw"] == pytest.approx(0.32)
    # payout = stake * clip(0.5 * PP, +-0.05): 0.5 * 0.5
    assert row["payout"] == pytest.approx(1000 * 0.05)
    assert row["cost_model"] == "constant" and np.isnan(row["capacity_usd"])


def test_pp_in_the_meta_lost_branch_is_weighted_by_c_b():
    row = _score(META_DOWN).table.iloc[0]
    assert row["mr"] == pytest.approx(-0.07) and row["mb"] == pytest.approx(-1.0)
    assert (row["meta_loss_basis"], row["meta_lost"]) == ("mr", True)
    assert row["pp"] == pytest.approx(3 * (0.75 - 0.002) / 0.1)
    assert row["pp_raw"] == pytest.approx(3 * 20 * (0.02 - 0.004))
    assert payout_percentage(0.01, 0.002, True, 0.1, 3) == pytest.approx(0.24)
    assert payout_percentage(0.01, 0.002, False, 0.1, 3) == pytest.approx(0.08)
    assert raw_payout_percentage(0.001, 0.003, True, 10, 2) == pytest.approx(-0.04)
    assert raw_payout_percentage(0.001, 0.003, False, 10, 2) == pytest.approx(-0.02)


def test_meta_lost_is_judged_on_mr_with_returns_and_on_mb_without():
    assert meta_lost(0.0, -1.0) == ("mr", False)  # MR decides when it exists
    assert meta_lost(-1e-9, 1.0) == ("mr", True)
    assert meta_lost(float("nan"), -1e-9) == ("mb", True)
    assert meta_lost(float("nan"), 0.0) == ("mb", False)
    with pytest.raises(ValueError, match="neither MR nor MB"):
        meta_lost(float("nan"), float("nan"))
    # A meta portfolio whose MB and MR disagree in sign: MB 0.5 > 0 > MR = -0.01 - 0.02.
    meta = pd.Series([0.0, 1.0, -1.0, 0.0], index=IDS)
    with_returns = _score(meta).table.iloc[0]
    assert with_returns["mb"] == pytest.approx(0.5) and with_returns["mr"] == pytest.approx(-0.03)
    assert (with_returns["meta_loss_basis"], with_returns["meta_lost"]) == ("mr", True)
    assert with_returns["pp"] == pytest.approx(3 * (0.75 - 0.002) / 0.1)  # amplified by c_b
    out = _score(meta, resolved=TARGETS_ONLY)
    row = out.table.iloc[0]
    assert (row["meta_loss_basis"], row["meta_lost"]) == ("mb", False)
    assert row["pp"] == pytest.approx((0.75 - 0.002) / 0.1)  # not amplified
    assert (out.meta.iloc[0]["meta_loss_basis"], out.meta.iloc[0]["meta_lost"]) == ("mb", False)
    lost = _score(META_DOWN, resolved=TARGETS_ONLY).table.iloc[0]  # MB = -1
    assert (lost["meta_loss_basis"], lost["meta_lost"]) == ("mb", True)
    assert lost["pp"] == pytest.approx(3 * (0.75 - 0.002) / 0.1)


def test_a_round_without_returns_is_paid_in_bucket_space():
    s = PortfolioPayoutSettings(
        spread_bps=10, impact_coef=0.01, alpha=1.0, long_market_value_usd=1e6
    )
    adv = pd.Series([1e6, 4e6, 1e6, 16e6], index=IDS)
    out = _score(settings=s, adv=adv, resolved=TARGETS_ONLY)
    full = _score(settings=s, adv=adv).table.iloc[0]
    row = out.table.iloc[0]
    assert not out.has_returns and out.terms is not None
    for col in ("pb", "mb", "transaction_cost", "transaction_cost_raw", "pp", "payout"):
        assert row[col] == full[col], col
    for col in ("pr", "mr", "pp_raw", "marginal_return", "capacity_usd", "breakeven_usd"):
        assert np.isnan(row[col]), col
    assert row["scenario"] is None
    assert np.isnan(out.meta.iloc[0]["net_return"])
    raw = s.model_copy(update={"payout_basis": "raw"})
    with pytest.raises(ValueError, match="payout_basis 'raw'.*no return column"):
        _score(settings=raw, resolved=TARGETS_ONLY)


def test_bucket_per_return_is_the_pooled_within_round_slope():
    rng = np.random.default_rng(3)
    frames = []
    for rnd, level in ((1, 0.0), (2, 0.05), (3, -0.02)):
        x = rng.normal(level, 0.02, 500)  # each round's own level, removed by centring
        t = 0.5 + 8.0 * (x - level) + rng.normal(0, 0.05, 500)
        frames.append(pd.DataFrame({"round": rnd, "target": t, "return": x}))
    frames.append(pd.DataFrame({"round": 4, "target": [0.0, 1.0], "return": np.nan}))
    history = pd.concat(frames, ignore_index=True)
    est = estimate_bucket_per_return(history)
    xs = [f["return"] - f["return"].mean() for f in frames[:3]]
    ts = [f["target"] - f["target"].mean() for f in frames[:3]]
    want = sum((a * b).sum() for a, b in zip(xs, ts, strict=True)) / sum((a * a).sum() for a in xs)
    assert est.slope == pytest.approx(want, rel=1e-12)
    assert est.slope == pytest.approx(8.0, rel=0.05)
    assert list(est.per_round.index) == [1, 2, 3] and est.rows == 1500  # round 4: no returns
    with pytest.raises(ValueError, match="nothing to estimate"):
        estimate_bucket_per_return(history[history["round"] == 4])


def test_payout_uses_the_chosen_basis_and_the_clip():
    raw = CONSTANT.model_copy(update={"payout_basis": "raw", "c": 0.5})
    row = _score(settings=raw, stakes=pd.Series({"u": 200.0})).table.iloc[0]
    # PP_raw = 0.5 (0.02 - 0.004) = 0.008 -> 200 * 0.5 * 0.008 = 0.8 (inside the clip)
    assert row["payout"] == pytest.approx(0.8)
    # A model without a stake row has stake 0 and pays 0.
    assert _score(stakes=pd.Series(dtype=float)).table.iloc[0]["payout"] == 0.0


def test_liquidity_cost_by_hand():
    w = np.array([0.5, 0.5, -0.5, -0.5])
    adv = np.array([1e6, 4e6, 1e6, 16e6])
    # |w| L / adv = 0.5, 0.125, 0.5, 0.03125 at L = 1e6.
    # alpha = 1: 0.5 * (4 * 0.001 + 0.01 * 1.15625) = 0.00778125
    got = liquidity_cost(w, adv, 1e6, spread_bps=10, impact_coef=0.01, alpha=1.0)
    assert got == pytest.approx(0.00778125)
    # alpha = 0.5: sqrt terms 0.5**.5 * 2 + 0.125**.5 + 0.03125**.5
    roots = 2 * math.sqrt(0.5) + math.sqrt(0.125) + math.sqrt(0.03125)
    got = liquidity_cost(w, adv, 1e6, spread_bps=10, impact_coef=0.01, alpha=0.5)
    assert got == pytest.approx(0.5 * (0.004 + 0.01 * roots))


def test_liquidity_cost_equals_the_per_position_definition():
    rng = np.random.default_rng(1)
    n, k, lmv = 300, 4, 5e7
    w = rng.normal(size=(n, k)) * (rng.random((n, k)) < 0.3)
    adv = rng.lognormal(16, 1.5, n)
    got = liquidity_cost(w, adv, lmv, spread_bps=5, impact_coef=0.02, alpha=0.6)
    want = [
        sum(
            abs(w[i, j]) * lmv * (5e-4 + 0.02 * (abs(w[i, j]) * lmv / adv[i]) ** 0.6) / lmv
            for i in range(n)
        )
        for j in range(k)
    ]
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_liquidity_model_in_a_scored_round():
    s = PortfolioPayoutSettings(
        spread_bps=10, impact_coef=0.01, alpha=1.0, long_market_value_usd=1e6, g=0.1
    )
    adv = pd.Series([1e6, 4e6, 1e6, 16e6], index=IDS)
    out = _score(settings=s, adv=adv)
    row = out.table.iloc[0]
    assert row["cost_model"] == "liquidity"
    # Bucketed cost: bucket_per_return (default 10 target units per unit of return) * TC.
    assert row["transaction_cost"] == pytest.approx(10 * 0.00778125)
    assert row["transaction_cost_raw"] == pytest.approx(0.00778125)
    assert row["pp"] == pytest.approx((0.75 - 10 * 0.00778125) / 0.1)
    k3 = _score(settings=s.model_copy(update={"bucket_per_return": 3.0}), adv=adv).table.iloc[0]
    assert k3["transaction_cost"] == pytest.approx(3 * 0.00778125)
    assert k3["pp_raw"] == row["pp_raw"]  # the raw basis does not use the conversion
    # Meta [1, 0, 0, -1]: 1 * (0.001 + 0.01 * 1) + 1 * (0.001 + 0.01 / 16) = 0.0126250
    assert out.meta.iloc[0]["transaction_cost"] == pytest.approx(0.012625)
    assert out.meta.iloc[0]["net_return"] == pytest.approx(0.07 - 0.012625)
    # Blended book v = 0.99 m + 0.01 w = [0.995, 0.005, -0.005, -0.995]:
    # TC(v) = 0.001 * 2 + 0.01 * (0.995^2 / 1 + 0.005^2 / 4 + 0.005^2 / 1 + 0.995^2 / 16)
    tc_v = 0.002 + 0.01 * (0.995**2 + 0.005**2 / 4 + 0.005**2 + 0.995**2 / 16)
    assert tc_v == pytest.approx(0.012519328125)
    # delta = 0.01 (PR - MR) - (TC(v) - TC(m)) = -0.0005 + 0.000105671875 -> MR >= 0: B
    assert row["marginal_return"] == pytest.approx(-0.000394328125)
    assert row["scenario"] == "B"
    # Without market data the round falls back to constant costs.
    assert _score(settings=s, adv=None).table.iloc[0]["cost_model"] == "constant"


def test_same_pb_in_illiquid_names_pays_less_than_in_liquid_names():
    # Stocks come in pairs with the same target and return; one of each pair is illiquid.
    ids = pd.Index([f"{k}{i}" for k in "LI" for i in range(4)], name="id")
    resolved = pd.DataFrame(
        {"target": [1.0, 0.75, 0.25, 0.0] * 2, "return": [0.03, -0.01, 0.02, -0.04] * 2},
        index=ids,
    )
    adv = pd.Series([5e7] * 4 + [5e5] * 4, index=ids)
    w = pd.DataFrame(
        {
            "liquid": [0.5, 0.5, -0.5, -0.5] + [0.0] * 4,
            "illiquid": [0.0] * 4 + [0.5, 0.5, -0.5, -0.5],
        },
        index=ids,
    )
    meta = pd.Series([0.5, 0, 0, -0.5, 0.5, 0, 0, -0.5], index=ids)
    out = score_portfolios(w, meta, resolved, pd.Series(dtype=float), 1.0, 0.05, adv)
    t = out.table.set_index("model_id")
    assert t.loc["liquid", "pb"] == pytest.approx(t.loc["illiquid", "pb"])
    assert t.loc["liquid", "pr"] == pytest.approx(t.loc["illiquid", "pr"])
    assert t.loc["illiquid", "transaction_cost"] > t.loc["liquid", "transaction_cost"]
    assert t.loc["illiquid", "pp"] < t.loc["liquid", "pp"]
    assert t.loc["illiquid", "capacity_usd"] < t.loc["liquid", "capacity_usd"]


def test_adding_to_the_meta_portfolios_crowded_names_is_worth_less():
    # The meta portfolio holds illiquid I0 / I3; "crowded" buys the same names, "elsewhere" the
    # liquid copies with identical returns. The blended book nets orders per stock.
    ids = pd.Index([f"{k}{i}" for k in "LI" for i in range(4)], name="id")
    resolved = pd.DataFrame(
        {"target": [1.0, 0.75, 0.25, 0.0] * 2, "return": [0.03, -0.01, 0.02, -0.04] * 2},
        index=ids,
    )
    adv = pd.Series([5e8] * 4 + [2e6] * 4, index=ids)
    w = pd.DataFrame(
        {"elsewhere": [1.0, 0, 0, -1.0] + [0.0] * 4, "crowded": [0.0] * 4 + [1.0, 0, 0, -1.0]},
        index=ids,
    )
    meta = pd.Series([0.0] * 4 + [1.0, 0, 0, -1.0], index=ids)
    t = score_portfolios(w, meta, resolved, pd.Series(dtype=float), 1.0, 0.05, adv)
    t = t.table.set_index("model_id")
    assert t.loc["crowded", "pr"] == pytest.approx(t.loc["elsewhere", "pr"])
    assert t.loc["crowded", "marginal_return"] < t.loc["elsewhere", "marginal_return"]
    # "crowded" is the meta portfolio itself: moving into it changes nothing.
    assert t.loc["crowded", "marginal_return"] == pytest.approx(0.0, abs=1e-15)


def test_marginal_return_and_scenarios_by_hand():
    f = 0.01
    # Constant costs cancel: delta = f (PR - MR).
    assert marginal_return(0.03, 0.02, f) == pytest.approx(1e-4)
    assert list(scenario(0.02, marginal_return(np.array([0.03, 0.01]), 0.02, f))) == ["A", "B"]
    deltas = marginal_return(np.array([-0.01, 0.01, -0.03]), -0.02, f)
    assert list(scenario(-0.02, deltas)) == ["C", "C", "D"]
    # Ties: MR = 0 counts as making money; delta = 0 is B (meta up) or C (meta down).
    assert list(scenario(0.0, [0.0, 1e-9])) == ["B", "A"]
    assert list(scenario(-1e-9, [0.0])) == ["C"]
    # After costs: the gross edge f (PR - MR) = 1e-4 is less than the blended book's extra cost
    # TC(v) - TC(m) = 0.00411 - 0.004: delta < 0 although PR > MR.
    d = marginal_return(0.03, 0.02, f, blend_cost=0.00411, meta_cost=0.004)
    assert d == pytest.approx(-1e-5) and scenario(0.02, d) == "B"


def test_the_four_scenarios_in_scored_rounds():
    ids = IDS
    w = pd.DataFrame(
        {
            "better": [1.0, 0.0, 0.0, -1.0],  # PR 0.07
            "worse": [0.5, 0.5, -0.5, -0.5],  # PR 0.02
        },
        index=ids,
    )
    # MR = 0.07: "better" matches it (delta 0: B), "worse" made less (B).
    up = _score(META_UP, w).table
    assert list(up["scenario"]) == ["B", "B"]
    meta_low = pd.Series([0.0, 1.0, 0.0, -1.0], index=ids)  # MR = -0.01 + 0.04 = 0.03
    t = _score(meta_low, w).table.set_index("model_id")
    assert (t.loc["better", "scenario"], t.loc["worse", "scenario"]) == ("A", "B")
    np.testing.assert_allclose(t["marginal_return"], [0.01 * 0.04, 0.01 * -0.01])
    meta_mid = pd.Series([0.0, 1.0, -1.0, 0.0], index=ids)  # MR = -0.01 - 0.02 = -0.03
    t = _score(meta_mid, w).table.set_index("model_id")  # MR < 0, both users made money
    assert list(t["scenario"]) == ["C", "C"]
    worst = pd.DataFrame({"bad": [-1.0, 0.0, 0.0, 1.0], "ok": [-1.0, 0.5, 0.5, 0.0]}, index=ids)
    # MR -0.03; PR bad = -0.07 (lost more: D), ok = -0.03 - 0.005 + 0.01 = -0.025 (less: C)
    t = _score(meta_mid, worst).table.set_index("model_id")
    assert (t.loc["bad", "scenario"], t.loc["ok", "scenario"]) == ("D", "C")


def test_invalid_portfolios_are_rejected_with_reasons_and_the_rest_scored():
    w = W.assign(
        long_heavy=[0.6, 0.5, -0.5, -0.5],
        half=[0.25, 0.25, -0.25, -0.25],
        nan=[0.5, np.nan, -0.5, 0.0],
    )
    bad = check_portfolios(w)
    assert set(bad) == {"long_heavy", "half", "nan"}
    assert "sum to 0.1" in bad["long_heavy"]
    assert "positive weights sum to 0.5" in bad["half"]
    assert "NaN" in bad["nan"]
    out = _score(weights=w)
    assert list(out.table["model_id"]) == ["u"]
    assert list(out.rejected["model_id"]) == ["half", "long_heavy", "nan"]
    with pytest.raises(ValueError, match="meta portfolio"):
        _score(meta=META_UP * 2)


def test_unresolved_ids_count_as_zero_return():
    resolved = RESOLVED.drop(index="s4")
    row = _score(resolved=resolved).table.iloc[0]
    # r on resolved ids: 0.03, -0.01, 0.02; s4 counts 0: PR = 0.5 (0.02) - 0.5 (0.02) = 0
    assert row["pr"] == pytest.approx(0.0)
    b = np.array([1.0, 0.75, 0.25]) - 2 / 3  # centred over the resolved ids; s4 counts 0
    assert row["pb"] == pytest.approx(0.5 * (b[0] + b[1]) - 0.5 * b[2])


# --- Sharpe contribution ----------------------------------------------------------------------


def test_sharpe_ratio_by_hand():
    # alternating a, b: mean (a + b) / 2, sample std |a - b| / 2 * sqrt(n / (n - 1))
    x = np.array([0.02, -0.01] * 3)
    assert sharpe_ratio(x) == pytest.approx(0.005 / (0.015 * math.sqrt(1.2)))
    assert np.isnan(sharpe_ratio(np.array([0.1]))) and np.isnan(sharpe_ratio(np.ones(4)))


def test_models_paying_when_the_meta_loses_beat_same_mean_opposite_timing():
    rounds = pd.Index(range(1, 7), name="round")
    meta = pd.Series([0.02, -0.01] * 3, index=rounds)
    marginal = pd.DataFrame(
        {
            "hedge": [-0.001, 0.003] * 3,  # pays when the meta loses
            "momentum": [0.003, -0.001] * 3,  # the same mean, the opposite timing
            "part_time": [np.nan, 0.003, np.nan, 0.003, np.nan, np.nan],
            "rare": [np.nan] * 5 + [0.01],
        },
        index=rounds,
    )
    out = sharpe_contribution(meta, marginal, min_rounds=2).set_index("model_id")
    assert marginal["hedge"].mean() == pytest.approx(marginal["momentum"].mean())
    k = math.sqrt(1.2)
    meta_sharpe = 0.005 / (0.015 * k)
    assert out.loc["hedge", "meta_sharpe"] == pytest.approx(meta_sharpe)
    # Blends: hedge 0.019, -0.007 (mean 0.006, spread 0.013); momentum 0.023, -0.011 (0.017).
    assert out.loc["hedge", "sharpe_contribution"] == pytest.approx(
        0.006 / (0.013 * k) - meta_sharpe
    )
    assert out.loc["momentum", "sharpe_contribution"] == pytest.approx(
        0.006 / (0.017 * k) - meta_sharpe
    )
    assert out.loc["hedge", "sharpe_contribution"] > out.loc["momentum", "sharpe_contribution"]
    assert out.loc["hedge", "corr_with_meta"] == pytest.approx(-1.0)
    assert out.loc["momentum", "corr_with_meta"] == pytest.approx(1.0)
    # Rounds a model skipped count as delta 0 (the fraction stays in the meta portfolio).
    blend = meta + marginal["part_time"].fillna(0.0)
    assert out.loc["part_time", "blended_sharpe"] == pytest.approx(sharpe_ratio(blend))
    assert out.loc["part_time", "rounds_submitted"] == 2
    assert np.isnan(out.loc["rare", "sharpe_contribution"])  # 1 round < min_rounds
    assert list(out.index[:1]) == ["hedge"]  # sorted best first
    with pytest.raises(ValueError, match="without a meta return"):
        sharpe_contribution(meta.iloc[:3], marginal)


# --- capacity -----------------------------------------------------------------------------------


def test_capacity_curve_rises_peaks_and_falls_under_the_liquidity_model():
    s = PortfolioPayoutSettings(capacity_min_usd=1e4, capacity_max_usd=1e11, capacity_points=201)
    rng = np.random.default_rng(3)
    n = 200
    adv = rng.lognormal(16, 1.5, n)
    w = np.zeros((n, 2))
    w[:50, 0], w[50:100, 0] = 1 / 50, -1 / 50  # 100 names
    w[:5, 1], w[5:10, 1] = 0.2, -0.2  # 10 names, same return below
    pr = np.array([0.01, 0.01])
    terms = liquidity_terms(w, adv, s.alpha)
    curves = capacity_curves(["spread", "concentrated"], pr, terms, s)
    cap = capacity(pr, terms, s.spread, s.impact_coef)
    for j, model in enumerate(["spread", "concentrated"]):
        c = curves[curves["model_id"] == model]
        d = c["dollar_return_usd"].to_numpy()
        lmv = c["long_market_value_usd"].to_numpy()
        top = int(np.argmax(d))
        assert 0 < top < len(d) - 1
        assert np.all(np.diff(d[: top + 1]) > 0) and np.all(np.diff(d[top:]) < 0)
        assert d[-1] < 0  # past the break-even it loses money
        # The grid's best point brackets the closed-form peak; D(L0) = 0.
        assert lmv[top - 1] < cap.peak_usd[j] < lmv[top + 1]
        assert cap.breakeven_usd[j] == pytest.approx(2.25 * cap.peak_usd[j])  # (1 + 1/2)^2
        at = liquidity_cost(
            w[:, j], adv, cap.breakeven_usd[j], spread_bps=5, impact_coef=0.01, alpha=0.5
        )
        assert pr[j] - at == pytest.approx(0.0, abs=1e-12)
        best = cap.peak_usd[j] * (
            pr[j]
            - liquidity_cost(
                w[:, j], adv, cap.peak_usd[j], spread_bps=5, impact_coef=0.01, alpha=0.5
            )
        )
        assert cap.peak_dollar_return_usd[j] == pytest.approx(best)
        assert d.max() <= best * (1 + 1e-12)
        want_cost = [
            x * liquidity_cost(w[:, j], adv, x, spread_bps=5, impact_coef=0.01, alpha=0.5)
            for x in lmv
        ]
        np.testing.assert_allclose(c["cost_usd"], want_cost, rtol=1e-12)
        np.testing.assert_allclose(d, lmv * pr[j] - c["cost_usd"], rtol=1e-12, atol=1e-6)
    assert cap.peak_usd[1] < cap.peak_usd[0]  # concentrated stops paying at a smaller size


def test_a_portfolio_whose_return_does_not_cover_the_spread_never_pays():
    w = np.array([0.5, 0.5, -0.5, -0.5])
    terms = liquidity_terms(w, np.full(4, 1e7), 0.5)
    cap = capacity(np.array([0.0009]), terms, 5e-4, 0.01)  # spread cost 2 * 5e-4 = 0.001
    assert cap.peak_usd[0] == 0 and cap.breakeven_usd[0] == 0
    curve = capacity_curves(["x"], np.array([0.0009]), terms)
    assert (curve["dollar_return_usd"] < 0).all()
    no_impact = capacity(np.array([0.01]), terms, 5e-4, 0.0)
    assert np.isinf(no_impact.peak_usd[0])
