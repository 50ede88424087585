"""The one Definitions object: every area's assets, checks, jobs, schedules and sensors.

Each area module (ingest, metrics, ...) exposes lists named `assets` and optionally
`asset_checks`, `schedules`, `sensors`, and a dict of default `resources`; `build_definitions` gathers them, adds the round job and
binds the resources. The module-level `defs` (loaded by workspace.yaml and `dagster dev`) reads
its paths from the environment; `tc-platform run` builds the same Definitions with its own paths.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import dagster as dg

from tc_assets.defs import checks, contribution, ingest, metrics, payouts, proxy, reporting
from tc_assets.defs.automation import AutomationSettings, build_automation
from tc_assets.defs.partitions import rounds_partitions
from tc_assets.defs.resources import RoundSourceResource, WarehouseResource, value_storage

AREAS: list[ModuleType] = [ingest, checks, metrics, contribution, payouts, proxy, reporting]

SCORE_ROUND_JOB = "score_round"
INGEST_ROUND_JOB = "ingest_round"


@dataclass(frozen=True)
class PlatformPaths:
    """Where the platform reads rounds and writes results."""

    source: str
    warehouse: str
    storage: str

    @classmethod
    def from_env(cls) -> PlatformPaths:
        """TC_SOURCE, TC_WAREHOUSE, TC_STORAGE, defaulting under TC_HOME (./.tc_platform)."""
        home = Path(os.environ.get("TC_HOME", ".tc_platform")).expanduser().resolve()
        return cls.create(
            source=os.environ.get("TC_SOURCE", str(home / "demo" / "source")),
            warehouse=os.environ.get("TC_WAREHOUSE", str(home / "demo" / "warehouse.duckdb")),
            storage=os.environ.get("TC_STORAGE"),
        )

    @classmethod
    def create(cls, source: str, warehouse: str, storage: str | None = None) -> PlatformPaths:
        """Absolute paths (S3 URIs as given); asset values go beside the warehouse unless given."""
        wh = Path(warehouse).expanduser().resolve()
        src = source if source.startswith("s3://") else str(Path(source).expanduser().resolve())
        if storage and storage.startswith("s3://"):
            store = storage
        else:
            store = str(Path(storage).expanduser().resolve() if storage else wh.parent / "storage")
        return cls(source=src, warehouse=str(wh), storage=store)


def _collect(name: str) -> list:
    return [item for area in AREAS for item in getattr(area, name, [])]


def round_assets() -> list[dg.AssetsDefinition]:
    """Assets partitioned by round (the round job's selection)."""
    return [a for a in _collect("assets") if a.partitions_def == rounds_partitions]


def build_definitions(
    paths: PlatformPaths,
    automation: AutomationSettings | None = None,
    loggers: Mapping[str, dg.LoggerDefinition] | None = None,
) -> dg.Definitions:
    """The platform's Definitions with resources bound to `paths`.

    `loggers` replaces Dagster's default console logger (the command line adds its compact
    progress logger this way); the UI and the daemon use the default.

    The close schedule and the sensors (automation.py) target the two round jobs; their
    settings default to the TC_* environment variables. Runs execute in process (one process
    per run: far less start-up on a small machine); the warehouse pool is honoured all the same.
    """
    assets = _collect("assets")
    score_round = dg.define_asset_job(
        SCORE_ROUND_JOB,
        selection=dg.AssetSelection.assets(*round_assets()),
        partitions_def=rounds_partitions,
        description="Ingest and score one round: every round-partitioned asset.",
    )
    ingest_round = dg.define_asset_job(
        INGEST_ROUND_JOB,
        selection=dg.AssetSelection.assets(*ingest.assets),
        partitions_def=rounds_partitions,
        description="Read, validate and warehouse one round's inputs.",
    )
    schedules, sensors = build_automation(ingest_round, score_round, round_assets(), automation)
    return dg.Definitions(
        assets=assets,
        asset_checks=_collect("asset_checks"),
        jobs=[score_round, ingest_round, *_collect("jobs")],
        schedules=[*schedules, *_collect("schedules")],
        sensors=[*sensors, *_collect("sensors")],
        executor=dg.in_process_executor,
        loggers=dict(loggers) if loggers else None,
        resources={
            "round_source": RoundSourceResource.for_uri(paths.source),
            "warehouse": WarehouseResource(path=paths.warehouse),
            "io_manager": value_storage(paths.storage),
            **{key: res for area in AREAS for key, res in getattr(area, "resources", {}).items()},
        },
    )


defs = build_definitions(PlatformPaths.from_env())
