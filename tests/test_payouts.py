"""Classic payouts: every formula (README, Payouts) against hand-computed small examples, and the
multiplier elections checked at ingestion."""

from dataclasses import fields

import numpy as np
import pandas as pd
import pytest

from tc_assets.io.contract import RoundInputError, validate_stakes
from tc_assets.io.ingest import ingest_round
from tc_assets.io.source import LocalRoundSource
from tc_assets.io.synthetic import MIN_MODELS, SyntheticSettings, generate_source
from tc_assets.io.tables import table
from tc_assets.scoring import portfolio_weights as pw
from tc_assets.scoring.payouts import (
    NO_VALID_SUBMISSION,
    PAYOUT_COLUMNS,
    PORTFOLIO_ONLY,
    PayoutRules,
    PayoutSummary,
    classic_payouts,
    clipped_payout,
    payout_factor,
    stake_score,
)

ALLOWED_CORR = (0.0, 0.5, 1.0, 2.0)
ALLOWED_TC = (0.0, 0.5, 1.0, 2.0, 3.0)


def test_payout_factor_is_one_up_to_the_threshold_then_threshold_over_total():
    assert payout_factor(36_000.0, 72_000.0) == 1.0
    assert payout_factor(72_000.0, 72_000.0) == 1.0
    assert payout_factor(144_000.0, 72_000.0) == 0.5
    assert payout_factor(96_000.0, 72_000.0) == pytest.approx(0.75)
    assert payout_factor(0.0, 72_000.0) == 1.0  # nothing staked: nothing to scale
    with pytest.raises(ValueError):
        payout_factor(-1.0, 72_000.0)


def test_score_is_the_multiplier_weighted_sum_and_a_zero_multiplier_drops_its_metric():
    # 0.5 * 0.02 + 2 * 0.01 = 0.03
    assert stake_score(0.02, 0.01, 0.5, 2.0) == pytest.approx(0.03)
    # tc unknown but not elected: corr alone; elected and unknown: not scorable.
    assert stake_score(0.02, np.nan, 1.0, 0.0) == pytest.approx(0.02)
    assert np.isnan(stake_score(0.02, np.nan, 1.0, 1.0))
    got = stake_score(
        np.array([0.02, -0.04]), np.array([0.01, -0.03]), np.array([1.0, 0.5]), np.array([2, 3])
    )
    np.testing.assert_allclose(got, [0.04, -0.11])


def test_clipping_bounds_each_payout_to_the_clip_share_of_the_stake():
    stake = np.array([1000.0, 1000.0, 1000.0, 0.0])
    score = np.array([0.08, 0.2, -0.3, 0.5])
    # factor 0.5: 0.04 -> 40; 0.1 -> clipped to 0.05 -> 50; -0.15 -> -50; zero stake pays zero.
    np.testing.assert_allclose(clipped_payout(stake, score, 0.5, 0.05), [40.0, 50.0, -50.0, 0.0])


def _round():
    """A round by hand: a and b paid, c zero stake, d no submission, e portfolio only,
    f elects tc but has none, g submits predictions without a stake row."""
    stakes = pd.DataFrame(
        {
            "stake": [100_000.0, 20_000.0, 0.0, 50_000.0, 24_000.0, 0.0],
            "corr_multiplier": [1.0, 0.5, 2.0, 1.0, 1.0, 1.0],
            "tc_multiplier": [2.0, 3.0, 0.0, 1.0, 1.0, 1.0],
        },
        index=pd.Index(list("abcdef"), name="model_id"),
    )
    scores = pd.DataFrame(
        {"corr": [0.02, -0.04, 0.05, 0.01, 0.03], "tc": [0.01, -0.03, np.nan, np.nan, 0.02]},
        index=pd.Index(list("abcfg"), name="model_id"),
    )
    return stakes, scores


def test_classic_payouts_of_a_hand_computed_round():
    stakes, scores = _round()
    out = classic_payouts(stakes, scores, portfolio_models=["e"], rules=PayoutRules())
    # Valid staked: a, b, c, e, f (d has no submission) -> S = 144000 -> factor 72000/S = 0.5.
    # a: 1 * 0.02 + 2 * 0.01 = 0.04 -> 0.5 * 0.04 = 0.02 -> 100000 * 0.02 = 2000
    # b: 0.5 * -0.04 + 3 * -0.03 = -0.11 -> -0.055 -> clipped -0.05 -> -1000
    # c: stake 0 -> 0 (tc unknown but not elected; its score is beyond the clip, but a zero
    #    stake is not counted as clipped)
    t = out.table.set_index("model_id")
    assert list(t.index) == ["a", "b", "c"]
    np.testing.assert_allclose(t["payout_factor"], 0.5)
    np.testing.assert_allclose(t["score"], [0.04, -0.11, 0.10])
    np.testing.assert_allclose(t["payout"], [2000.0, -1000.0, 0.0])
    assert list(t["clipped"]) == [False, True, False]
    assert t.loc["a", "corr_multiplier"] == 1.0 and t.loc["b", "tc_multiplier"] == 3.0

    reasons = out.unpaid.set_index("model_id")["reason"]
    assert reasons["d"] == NO_VALID_SUBMISSION
    assert reasons["e"] == PORTFOLIO_ONLY
    assert "missing" in reasons["f"]
    s = out.summary
    assert (s.stake_rows, s.staked_models, s.valid_staked_models) == (6, 4, 3)
    assert s.valid_stake == 144_000.0 and s.total_stake == 194_000.0
    assert s.payout_factor == 0.5
    assert (s.payout_rows, s.models_paid) == (3, 2)
    assert (s.no_valid_submission, s.staked_no_valid_submission) == (1, 1)
    assert (s.portfolio_only, s.unscored, s.submitted_without_stake_row) == (1, 1, 1)
    assert s.total_payout == pytest.approx(1000.0)
    assert (s.total_gains, s.total_losses, s.clipped) == (2000.0, -1000.0, 1)


def test_the_round_clip_and_threshold_come_from_round_info():
    stakes, scores = _round()
    rules = PayoutRules.from_round_info({"stake_threshold": 288_000.0, "clip": 0.1})
    t = classic_payouts(stakes, scores, ["e"], rules).table.set_index("model_id")
    # S = 144000 < 288000 -> factor 1; b: -0.11 -> clipped at -0.1 -> -2000.
    np.testing.assert_allclose(t["payout"], [4000.0, -2000.0, 0.0])
    assert PayoutRules.from_round_info({}) == PayoutRules(stake_threshold=72_000.0, clip=0.05)


def test_every_payout_lies_within_the_clip_bound_on_random_scores():
    rng = np.random.default_rng(0)
    n = 500
    stakes = pd.DataFrame(
        {
            "stake": rng.lognormal(7, 2, n),
            "corr_multiplier": rng.choice(ALLOWED_CORR, n),
            "tc_multiplier": rng.choice(ALLOWED_TC, n),
        },
        index=pd.Index([f"m{i}" for i in range(n)], name="model_id"),
    )
    scores = pd.DataFrame(
        {"corr": rng.normal(0, 0.05, n), "tc": rng.normal(0, 0.05, n)}, index=stakes.index
    )
    out = classic_payouts(stakes, scores, rules=PayoutRules(stake_threshold=1e4, clip=0.05))
    t = out.table
    assert len(t) == n
    assert np.all(np.abs(t["payout"]) <= 0.05 * t["stake"] * (1 + 1e-12))
    expected = t["stake"] * np.clip(
        t["payout_factor"] * (t["corr_multiplier"] * t["corr"] + t["tc_multiplier"] * t["tc"]),
        -0.05,
        0.05,
    )
    np.testing.assert_allclose(t["payout"], expected, rtol=1e-12, atol=1e-9)
    assert out.summary.payout_factor == pytest.approx(1e4 / stakes["stake"].sum())


# --- multiplier elections are validated at ingestion ----------------------------------------


def test_an_election_outside_the_allowed_sets_names_its_row():
    df = pd.DataFrame(
        {
            "model_id": ["a", "b", "c"],
            "stake": [1.0, 2.0, 3.0],
            "corr_multiplier": [1.0, 1.5, 0.5],
            "tc_multiplier": [3.0, 1.0, 4.0],
        }
    )
    with pytest.raises(RoundInputError) as err:
        validate_stakes(df, ALLOWED_CORR, ALLOWED_TC)
    msg = str(err.value)
    assert "2 bad row(s)" in msg
    assert "line 3: corr_multiplier 1.5 is not an allowed election" in msg
    assert "line 4: tc_multiplier 4 is not an allowed election" in msg
    assert "line 2" not in msg
    ok = validate_stakes(df.iloc[[0]], ALLOWED_CORR, ALLOWED_TC)
    assert ok.loc["a", "tc_multiplier"] == 3.0


def test_a_bad_election_fails_the_rounds_ingestion(tmp_path):
    settings = SyntheticSettings(stocks=200, features=8, models=MIN_MODELS, signal_features=4)
    generate_source(tmp_path, [1], settings)
    path = tmp_path / "rounds" / "1" / "stakes.csv"
    stakes = pd.read_csv(path)
    source = LocalRoundSource(tmp_path)
    assert ingest_round(source, 1, ALLOWED_CORR, ALLOWED_TC).stakes.shape[0] == len(stakes)
    bad_model = stakes.loc[4, "model_id"]
    stakes.loc[4, "tc_multiplier"] = 2.5
    stakes.to_csv(path, index=False)
    with pytest.raises(RoundInputError) as err:
        ingest_round(source, 1, ALLOWED_CORR, ALLOWED_TC)
    msg = str(err.value)
    assert msg.startswith("round 1: stakes.csv has 1 bad row(s)")
    assert "line 6: tc_multiplier 2.5 is not an allowed election [0.0, 0.5, 1.0, 2.0, 3.0]" in msg
    # Without allowed sets (no payout rules) the same file is only checked for >= 0.
    assert bad_model in ingest_round(source, 1).stakes.index


def test_warehouse_tables_carry_exactly_the_scoring_columns():
    expected = {
        "payouts": PAYOUT_COLUMNS,
        "payout_summary": [f.name for f in fields(PayoutSummary)],
        "portfolio_scores": pw.PORTFOLIO_SCORE_COLUMNS,
        "meta_portfolio_returns": pw.META_COLUMNS,
        "capacity_curves": pw.CAPACITY_COLUMNS,
        "sharpe_contribution": pw.SHARPE_COLUMNS,
    }
    for name, columns in expected.items():
        assert table(name).column_names == ["round", *columns], name
    contract = (
        "round model_id stake corr tc corr_multiplier tc_multiplier payout_factor score payout"
    )
    assert set(contract.split()) <= set(table("payouts").column_names)
    contract = "round model_id pb pr mb mr transaction_cost pp scenario"
    assert set(contract.split()) <= set(table("portfolio_scores").column_names)
