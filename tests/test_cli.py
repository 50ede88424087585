"""The command line per the contract: generate, run (exit status, failing step and why)."""

import os
import subprocess
import sys

import pandas as pd
import pytest

from tc_assets.io.warehouse import Warehouse
from tc_assets.runner import parse_rounds


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tc_assets.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=600,
    )


def test_parse_rounds():
    assert parse_rounds("3-5") == [3, 4, 5]
    assert parse_rounds("7") == [7]
    assert parse_rounds("1,4-5,4") == [1, 4, 5]
    for bad in ("5-3", "a-b", "0", ""):
        with pytest.raises(ValueError):
            parse_rounds(bad)


def test_generate_then_run_and_a_failing_round_exits_non_zero(tmp_path):
    env = {"TC_HOME": str(tmp_path / "home"), "DAGSTER_HOME": str(tmp_path / "dagster_home")}
    source, warehouse = tmp_path / "src", tmp_path / "wh.duckdb"
    gen = cli(
        "generate",
        "--out",
        str(source),
        "--rounds",
        "1-2",
        "--stocks",
        "800",
        "--features",
        "12",
        "--models",
        "40",
        "--seed",
        "3",
        env=env,
    )
    assert gen.returncode == 0, gen.stderr
    assert sorted(p.name for p in (source / "rounds").iterdir()) == ["1", "2"]

    # Break round 2's stakes file: round 1 still succeeds, the command exits non-zero and says why.
    stakes = pd.read_csv(source / "rounds/2/stakes.csv", dtype={"model_id": str})
    stakes.loc[1, "stake"] = -1
    stakes.to_csv(source / "rounds/2/stakes.csv", index=False)
    run = cli("run", "--source", str(source), "--warehouse", str(warehouse), env=env)
    out = run.stdout + run.stderr
    assert run.returncode == 1, out
    assert "round 1: ok" in out
    assert "round 2: FAILED" in out and "round_inputs" in out and "line 3:" in out
    wh = Warehouse(warehouse)
    assert wh.partitions("rounds") == [1]
    # The runs were recorded on the persistent instance that `make dev` shows.
    assert (tmp_path / "dagster_home" / "dagster.yaml").exists()
    assert any((tmp_path / "dagster_home").rglob("*.db"))


def test_run_reports_a_missing_source_clearly(tmp_path):
    env = {"TC_HOME": str(tmp_path / "home"), "DAGSTER_HOME": str(tmp_path / "dagster_home")}
    run = cli(
        "run",
        "--source",
        str(tmp_path / "nope"),
        "--warehouse",
        str(tmp_path / "w.duckdb"),
        env=env,
    )
    assert run.returncode == 2
    assert "nope is not a folder" in run.stderr


def test_bucket_per_return_is_estimated_from_the_warehouse_history(tmp_path, capsys):
    """The estimate behind PortfolioPayoutSettings.bucket_per_return: on generated rounds it is
    the default (10) within 5%; a round resolved with targets only is left out."""
    from tc_assets.cli import main
    from tc_assets.scoring.portfolio_weights import (
        PortfolioPayoutSettings,
        estimate_bucket_per_return,
    )
    from tests.conftest import SMALL, make_source

    source = make_source(tmp_path / "src", [1, 2, 3], SMALL)
    path = str(tmp_path / "wh.duckdb")
    wh = Warehouse(path)
    frames = []
    for r in (1, 2, 3):
        frame = pd.read_parquet(source / "rounds" / str(r) / "resolved.parquet")
        wh.write_round(r, {"resolved": frame})
        frames.append(frame.assign(round=r))
    wh.write_round(4, {"resolved": frames[0][["id", "target"]].assign(**{"return": None})})
    want = estimate_bucket_per_return(pd.concat(frames)).slope
    assert want == pytest.approx(PortfolioPayoutSettings().bucket_per_return, rel=0.05)

    assert main(["bucket-per-return", "--warehouse", path]) == 0
    out = capsys.readouterr().out
    assert f"bucket_per_return = {want:.4f}" in out and "over 3 round(s)" in out
    assert "config: {bucket_per_return: " in out
    assert main(["bucket-per-return", "--warehouse", path, "--rounds", "2"]) == 0
    assert "over 1 round(s)" in capsys.readouterr().out
    assert main(["bucket-per-return", "--warehouse", str(tmp_path / "none.duckdb")]) == 2
    assert "no warehouse at" in capsys.readouterr().err


def test_a_missing_source_or_round_is_a_usage_error_that_adds_no_partition(
    small_source, tmp_path, monkeypatch
):
    import dagster as dg

    from tc_assets.cli import main
    from tc_assets.defs.partitions import ROUNDS_PARTITIONS_NAME

    home = tmp_path / "dagster_home"
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.setenv("TC_HOME", str(tmp_path / "tc"))
    wh = str(tmp_path / "wh.duckdb")
    nowhere = str(tmp_path / "nowhere")
    assert main(["run", "--source", nowhere, "--warehouse", wh]) == 2
    assert main(["run", "--source", nowhere, "--warehouse", wh, "--rounds", "1"]) == 2
    assert main(["run", "--source", str(small_source), "--warehouse", wh, "--rounds", "7"]) == 2
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert instance.get_dynamic_partitions(ROUNDS_PARTITIONS_NAME) == []
