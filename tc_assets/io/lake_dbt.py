"""A dbt-duckdb plugin that prepares dbt's connection for the lake (tc_assets/dbt_metrics/profiles.yml,
target `lake`): the DuckDB extensions and the S3 secret, exactly as the platform's own
connections get them (lake.configure), before dbt-duckdb attaches the lake."""

from __future__ import annotations

import os

from dbt.adapters.duckdb.plugins import BasePlugin
from duckdb import DuckDBPyConnection

from tc_assets.io import lake


class Plugin(BasePlugin):
    """Loaded by dbt-duckdb from the profile's `plugins: [{module: tc_assets.io.lake_dbt}]`."""

    def configure_connection(self, conn: DuckDBPyConnection) -> None:
        lake.configure(conn, os.environ.get(lake.DATA_PATH_ENV))
