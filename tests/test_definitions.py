"""The shape of the platform's Definitions: a readable snapshot of what the code location holds."""

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

import tc_assets
from tc_assets.defs.definitions import INGEST_ROUND_JOB, PlatformPaths, build_definitions

PYTHON_ASSETS = {
    "ingestion": [
        "example_predictions",
        "market",
        "portfolios",
        "predictions",
        "resolved",
        "round_info",
        "stakes",
        "universe",
    ],
    "metrics": ["feature_exposures", "meta_model", "model_metrics"],
    "contribution": ["meta_portfolio", "tc_scores"],
    "payouts": ["payouts", "portfolio_scores", "sharpe_contribution"],
    "proxy": ["tc_proxy_model"],
}
DBT_ASSETS = [
    "reporting/model_reputation",
    "reporting/portfolio_leaderboard",
    "reporting/round_leaderboard",
    "reporting/round_summary",
    "staging/stg_meta_portfolio_returns",
    "staging/stg_model_metrics",
    "staging/stg_payout_summary",
    "staging/stg_payouts",
    "staging/stg_portfolio_scores",
    "staging/stg_rounds",
    "staging/stg_sharpe_contribution",
    "staging/stg_stakes",
    "staging/stg_submission_rejections",
    "staging/stg_submissions",
    "staging/stg_tc_scores",
]
MAX_FUNCTION_LINES = 40  # from `def` to the last line, decorators not counted
PYTHON_CHECKS = [
    "meta_portfolio:meta_portfolio_constraints",
    "model_metrics:model_metrics_finite",
    "payouts:payouts_within_clip",
    "portfolio_scores:portfolio_payouts_within_clip",
    "predictions:predictions_coverage",
    "predictions:submission_rejections",
    "resolved:resolved_coverage",
    "tc_scores:tc_scores_finite",
]


@pytest.fixture(scope="module")
def defs(tmp_path_factory) -> dg.Definitions:
    tmp = tmp_path_factory.mktemp("defs")
    return build_definitions(PlatformPaths.create(str(tmp / "src"), str(tmp / "w.duckdb")))


def test_assets_by_group(defs):
    groups: dict[str, list[str]] = {}
    for spec in defs.resolve_all_asset_specs():
        groups.setdefault(spec.group_name, []).append(spec.key.to_user_string())
    assert {g: sorted(keys) for g, keys in groups.items()} == {
        **PYTHON_ASSETS,
        "reporting": DBT_ASSETS,
    }


def test_every_asset_is_partitioned_by_round(defs):
    graph = defs.resolve_asset_graph()
    for key in graph.get_all_asset_keys():
        assert graph.get(key).partitions_def.name == "rounds", key


def test_asset_checks(defs):
    graph = defs.resolve_asset_graph()
    checks = sorted(f"{k.asset_key.to_user_string()}:{k.name}" for k in graph.asset_check_keys)
    on_python = [c for c in checks if not c.startswith(("staging/", "reporting/"))]
    python = [c for c in on_python if ":source_" not in c]
    assert python == PYTHON_CHECKS
    # Every dbt test on a model is an asset check of that model (not_null, unique, ranges...).
    assert len(checks) - len(on_python) >= 20
    # Every dbt test on a source is a check of the Python asset that writes the table; they
    # do not block, so the dbt build stays one step of the round's job.
    sources = [c for c in on_python if ":source_" in c]
    assert {c.split(":")[0] for c in sources} >= {"payouts", "tc_scores", "stakes", "round_info"}
    dbt = defs.resolve_assets_def(dg.AssetKey(["reporting", "round_leaderboard"]))
    assert not any(
        spec.blocking
        for spec in dbt.check_specs
        if spec.asset_key in graph.get_all_asset_keys()
        and spec.asset_key.path[0] not in ("staging", "reporting")
    )
    job = defs.resolve_job_def("score_round")
    assert [n for n in job.graph.node_dict if n.startswith("dbt_metrics")] == ["dbt_metrics"]


def test_jobs_schedules_and_sensors(defs):
    repo = defs.get_repository_def()
    assert sorted(j for j in repo.job_names if not j.startswith("__")) == [
        INGEST_ROUND_JOB,
        "score_round",
    ]
    assert [s.name for s in repo.schedule_defs] == ["round_close_schedule"]
    assert sorted(s.name for s in repo.sensor_defs) == [
        "dead_runs_sensor",
        "new_round_sensor",
        "round_changes_sensor",
        "window_refresh_sensor",
    ]
    assert repo.get_schedule_def("round_close_schedule").job_name == INGEST_ROUND_JOB
    assert repo.get_sensor_def("round_changes_sensor").job_name == "score_round"
    assert repo.get_sensor_def("window_refresh_sensor").job_name == "score_round"
    assert repo.get_sensor_def("new_round_sensor").job_name == INGEST_ROUND_JOB


def test_round_jobs_select_their_assets(defs):
    score = defs.resolve_job_def("score_round").asset_layer.selected_asset_keys
    ingest = defs.resolve_job_def(INGEST_ROUND_JOB).asset_layer.selected_asset_keys
    assert score == defs.resolve_asset_graph().get_all_asset_keys()
    assert sorted(k.to_user_string() for k in ingest) == PYTHON_ASSETS["ingestion"]
    # The ingestion's own checks only: dbt's tests of the ingested tables wait for the scoring
    # run's build, so an ingestion does not start dbt.
    ingest_job = defs.resolve_job_def(INGEST_ROUND_JOB)
    checks = ingest_job.asset_layer.asset_graph.asset_check_keys
    assert sorted(c.name for c in checks) == [
        "predictions_coverage",
        "resolved_coverage",
        "submission_rejections",
    ]
    assert "dbt_metrics" not in {n.name for n in ingest_job.graph.node_defs}


def test_resources(defs):
    assert sorted(defs.resources) == ["dbt", "io_manager", "optimizer", "round_source", "warehouse"]


# Loaded only by the steps that use them: every process that loads the definitions (each run,
# the code server, `tc-platform run`) would otherwise pay about 7 s of imports.
HEAVY_MODULES = ("torch", "cvxpy", "matplotlib", "interpret", "sklearn", "dagster_aws", "boto3")


def test_import_needs_no_dbt_manifest_and_loading_parses_it(tmp_path):
    """Importing the definitions module builds nothing; loading the Definitions where the dbt
    project was never parsed parses it into the user's cache (not into the package), and
    imports none of the heavy libraries only some steps use."""
    package = Path(tc_assets.__file__).parent
    shutil.copytree(
        package, tmp_path / "tc_assets", ignore=shutil.ignore_patterns("__pycache__", "target")
    )
    code = (
        "import tc_assets.defs.definitions as d, tc_assets.defs.reporting as r\n"
        "assert not r.dbt_project.manifest_path.exists()\n"
        "defs = d.build_definitions(d.PlatformPaths.create('s', 'w.duckdb'))\n"
        "print(len(defs.resolve_job_def('score_round').asset_layer.selected_asset_keys))\n"
        "print(r.dbt_project.manifest_path)\n"
        "import sys\n"
        f"print(','.join(m for m in {HEAVY_MODULES!r} if m in sys.modules) or '-')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path / "home")},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr
    count, manifest, heavy = out.stdout.split()
    assert int(count) > 20
    assert heavy == "-", f"loading the definitions imported {heavy}"
    assert Path(manifest).is_relative_to(tmp_path / "home" / ".cache" / "tc-platform")
    assert not (tmp_path / "tc_assets" / "dbt_metrics" / "target").exists()


def test_functions_in_defs_are_short():
    """Thin assets: every function of tc_assets/defs/ (asset bodies included) fits in 40 lines;
    computation belongs in scoring/, reading and writing in io/, plots in defs/plots.py."""
    defs_dir = Path(tc_assets.__file__).parent / "defs"
    long = []
    for path in sorted(defs_dir.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(defs_dir)}:{node.lineno} {node.name} {lines}")
    assert not long, long
