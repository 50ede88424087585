"""Asset checks: the ingestion checks on generated rounds, and the check helpers on frames made
by hand (the other areas' checks are tested with their assets)."""

import dagster as dg
import pandas as pd
import pytest

from tc_assets.defs.checks import check_finite, check_within
from tc_assets.defs.jobs import INGEST_ROUND_JOB
from tc_assets.io.synthetic import SyntheticSettings, generate_source
from tests.conftest import platform, run_job

TINY = SyntheticSettings(stocks=300, features=12, models=30, seed=11)


def _checks(result: dg.ExecuteInProcessResult) -> dict[str, dg.AssetCheckEvaluation]:
    """The run's Python checks (dbt's source tests run as checks too, named source_*)."""
    return {
        e.check_name: e
        for e in result.get_asset_check_evaluations()
        if not e.check_name.startswith("source_")
    }


def test_ingestion_checks_report_coverage_and_rejections(tmp_path, instance):
    root = tmp_path / "source"
    generate_source(root, [1], TINY.model_copy(update={"with_bad_inputs": True}))
    defs, _ = platform(root, tmp_path)
    result = run_job(defs, instance, 1, job=INGEST_ROUND_JOB)
    assert result.success
    checks = _checks(result)
    assert checks.keys() == {"predictions_coverage", "submission_rejections", "resolved_coverage"}

    planted = pd.read_csv(root / "rounds/1/planted.csv", dtype=str).fillna("")
    rejected = planted["expected_rule"].ne("") & planted["expected_rule"].ne("foreign_ids_dropped")
    files = [f for d in ("predictions", "portfolios") for f in (root / "rounds/1" / d).iterdir()]
    rej = checks["submission_rejections"]
    assert rej.metadata["rejected"].value == rejected.sum()
    assert rej.metadata["accepted"].value == len(files) - rejected.sum()
    share = rejected.sum() / len(files)
    assert rej.passed == (share <= 0.25) and rej.severity == dg.AssetCheckSeverity.WARN

    cov = checks["predictions_coverage"]
    accepted_predictions = len(list((root / "rounds/1/predictions").iterdir())) - sum(
        rejected & planted["submits"].eq("predictions")
    )
    assert cov.passed and cov.metadata["models"].value == accepted_predictions
    assert cov.metadata["min_coverage"].value >= 0.8
    live = pd.read_parquet(root / "rounds/1/live.parquet")["id"]
    resolved = pd.read_parquet(root / "rounds/1/resolved.parquet")["id"]
    res = checks["resolved_coverage"]
    assert res.metadata["share"].value == pytest.approx(resolved.isin(live).sum() / len(live))


def test_predictions_without_stake_fail_the_run(tmp_path, instance):
    root = tmp_path / "source"
    generate_source(root, [1], TINY)
    stakes = pd.read_csv(root / "rounds/1/stakes.csv")
    stakes["stake"] = 0.0
    stakes.to_csv(root / "rounds/1/stakes.csv", index=False)
    defs, _ = platform(root, tmp_path)
    result = run_job(defs, instance, 1, job=INGEST_ROUND_JOB)
    assert not result.success
    cov = _checks(result)["predictions_coverage"]
    assert not cov.passed and cov.severity == dg.AssetCheckSeverity.ERROR
    assert "no stake" in cov.description


def test_check_helpers_against_hand_made_frames():
    frame = pd.DataFrame({"corr": [0.1, float("nan"), 0.2], "tc": [0.0, 1.0, float("inf")]})
    bad = check_finite(frame)
    assert not bad.passed and bad.metadata["bad_rows"].value == 2
    assert bad.metadata["bad_by_column"].value == {"corr": 1, "tc": 1}
    assert check_finite(frame.iloc[[0]]).passed
    assert check_finite(frame, ["corr"]).metadata["bad_rows"].value == 1

    payout = pd.Series([0.05, -0.05, 0.0500001, -0.2, float("nan")], name="payout_factor")
    within = check_within(payout, -0.05, 0.05, tol=1e-6)
    assert not within.passed and within.metadata["outside"].value == 2  # -0.2 and NaN
    assert within.metadata["worst_excess"].value == pytest.approx(0.15)
    assert check_within(payout.iloc[:3], -0.05, 0.05, tol=1e-6).passed
    assert not check_within(payout.iloc[:3], -0.05, 0.05).passed
