"""The command line's code location: each run is built from its own paths."""

from tc_assets.defs.definitions import SCORE_ROUND_JOB, PlatformPaths
from tc_assets.defs.partitions import ROUNDS_PARTITIONS_NAME
from tc_assets.runner import CodeLocation


def _warehouse_of_run(paths: PlatformPaths, instance) -> str:
    location = CodeLocation(paths, instance)
    with location.environment():
        job, _ = location.create_run(SCORE_ROUND_JOB, "1", {}, {})
        return job.get_definition().resource_defs["warehouse"].config_schema.default_value["path"]


def test_a_second_location_in_the_same_process_runs_on_its_own_paths(tmp_path, instance):
    """Dagster caches the last job definition per code pointer; a location opened later (a
    second `run_rounds` in one process) must not run on the paths of the one before."""
    first = PlatformPaths.create(str(tmp_path / "a"), str(tmp_path / "a" / "wh.duckdb"))
    second = PlatformPaths.create(str(tmp_path / "b"), str(tmp_path / "b" / "wh.duckdb"))
    instance.add_dynamic_partitions(ROUNDS_PARTITIONS_NAME, ["1"])
    assert _warehouse_of_run(first, instance) == first.warehouse
    assert _warehouse_of_run(second, instance) == second.warehouse
