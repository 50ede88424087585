"""The platform's Definitions, composed from each area's own.

Each area module (ingest, metrics, contribution, payouts, proxy, reporting) builds its own
`dg.Definitions` (assets, checks, area resources); `jobs.py` the two round jobs;
`automation/` the close schedule and the sensors. `build_definitions` merges them with
`dg.Definitions.merge` and adds the shared resources bound to the platform's paths.
`defs` (loaded by workspace.yaml and `dagster dev`) is built lazily, on load, with its paths
from the environment; `tc-platform run` builds the same Definitions with its own paths.
Importing this module builds nothing (the dbt assets need a manifest, see reporting.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import dagster as dg

from tc_assets.defs import (
    automation,
    contribution,
    ingest,
    jobs,
    metrics,
    payouts,
    proxy,
    reporting,
)
from tc_assets.defs.automation import AutomationSettings
from tc_assets.defs.jobs import INGEST_ROUND_JOB, SCORE_ROUND_JOB
from tc_assets.defs.liveness import dead_runs_sensor, guarded_in_process_executor
from tc_assets.defs.progress import PROGRESS_LOGGER, progress_logger
from tc_assets.defs.resources import RoundSourceResource, WarehouseResource, value_storage
from tc_assets.io import lake
from tc_assets.io.warehouse import backend_of

__all__ = [
    "CODE_LOCATION",
    "DEFINITIONS_ATTRIBUTE",
    "DEFINITIONS_MODULE",
    "INGEST_ROUND_JOB",
    "REPOSITORY_NAME",
    "SCORE_ROUND_JOB",
    "PlatformPaths",
    "area_definitions",
    "build_definitions",
    "defs",
]

# The code location as workspace.yaml names it: `tc-platform run` attaches its runs to it.
CODE_LOCATION = "tc_platform"
DEFINITIONS_MODULE = "tc_assets.defs.definitions"
DEFINITIONS_ATTRIBUTE = "defs"
REPOSITORY_NAME = "__repository__"  # the repository Dagster makes of a Definitions object


@dataclass(frozen=True)
class PlatformPaths:
    """Where the platform reads rounds and writes results.

    `warehouse` is a DuckDB file path or a DuckLake catalog (`ducklake:...`, see
    io/lake.py) whose data goes to `lake_data`; `files` holds plots and reports.
    """

    source: str
    warehouse: str
    storage: str
    lake_data: str | None = None
    files: str = ""

    @classmethod
    def from_env(cls) -> PlatformPaths:
        """TC_SOURCE, TC_WAREHOUSE (a file, or `ducklake:...` with TC_LAKE_DATA_PATH),
        TC_STORAGE, defaulting under TC_HOME (./.tc_platform)."""
        home = tc_home()
        return cls.create(
            source=os.environ.get("TC_SOURCE", str(home / "demo" / "source")),
            warehouse=os.environ.get("TC_WAREHOUSE", str(home / "demo" / "warehouse.duckdb")),
            storage=os.environ.get("TC_STORAGE"),
            lake_data=os.environ.get(lake.DATA_PATH_ENV),
        )

    @classmethod
    def create(
        cls,
        source: str,
        warehouse: str,
        storage: str | None = None,
        lake_data: str | None = None,
    ) -> PlatformPaths:
        """Absolute paths (S3 URIs as given). Asset values and plots go beside the DuckDB file,
        or under $TC_HOME/lake for a lake; asset values elsewhere when `storage` is given."""
        src = source if source.startswith("s3://") else str(Path(source).expanduser().resolve())
        if lake.is_lake(warehouse):
            if not lake_data:
                raise ValueError(
                    f"the lake warehouse needs a data path: set {lake.DATA_PATH_ENV} "
                    "(s3://bucket/prefix/ or a directory)"
                )
            wh, files = warehouse, tc_home() / "lake"
            if not lake_data.startswith("s3://"):
                lake_data = str(Path(lake_data).expanduser().resolve())
        else:
            path = Path(warehouse).expanduser().resolve()
            wh, files, lake_data = str(path), path.parent, None
        if storage and storage.startswith("s3://"):
            store = storage
        else:
            store = str(Path(storage).expanduser().resolve() if storage else files / "storage")
        return cls(source=src, warehouse=wh, storage=store, lake_data=lake_data, files=str(files))

    @property
    def backend(self) -> str:
        """`duckdb` or `ducklake`."""
        return backend_of(self.warehouse)

    def describe_warehouse(self) -> str:
        """The warehouse for a log line (a lake's catalog without its password)."""
        if self.lake_data:
            return f"{lake.redact(self.warehouse)} (data {self.lake_data})"
        return self.warehouse


def tc_home() -> Path:
    """$TC_HOME (default ./.tc_platform): local state of the command line and the demo."""
    return Path(os.environ.get("TC_HOME", ".tc_platform")).expanduser().resolve()


def area_definitions() -> dg.Definitions:
    """Every area's assets, checks and area resources (all partitioned by round)."""
    return dg.Definitions.merge(
        ingest.defs,
        metrics.defs,
        contribution.defs,
        payouts.defs,
        proxy.defs,
        reporting.build_defs(),
    )


def build_definitions(
    paths: PlatformPaths,
    automation_settings: AutomationSettings | None = None,
) -> dg.Definitions:
    """The platform's Definitions with resources bound to `paths`.

    Loggers: Dagster's defaults and the command line's compact `progress` logger, which only a
    run whose config names it creates. The automation's settings default to the TC_*
    environment variables. Runs execute in process (one process per run: far less start-up on
    a small machine); the warehouse pool is honoured all the same, and a step's wait for it is
    reported and bounded (liveness.py); the dead-runs sensor fails runs whose process is gone
    and frees their slots.
    """
    settings = automation_settings or AutomationSettings.from_env()
    areas = area_definitions()
    round_keys = [key for asset in areas.assets or [] for key in asset.keys]
    shared = dg.Definitions(
        executor=guarded_in_process_executor,
        sensors=[dead_runs_sensor(settings.dead_runs_interval_s)],
        loggers={**dg.default_loggers(), PROGRESS_LOGGER: progress_logger},
        resources={
            "round_source": RoundSourceResource.for_uri(paths.source),
            "warehouse": WarehouseResource(
                path=paths.warehouse,
                data_path=paths.lake_data,
                files_dir=paths.files if paths.lake_data else None,
            ),
            "io_manager": value_storage(paths.storage),
        },
    )
    return dg.Definitions.merge(
        areas, jobs.defs, automation.build_defs(round_keys, settings), shared
    )


@dg.definitions
def defs() -> dg.Definitions:
    """The code location of workspace.yaml and `dagster dev`, paths from the environment."""
    return build_definitions(PlatformPaths.from_env())
