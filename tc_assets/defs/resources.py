"""Resources: the round source and the DuckDB warehouse, configured once per deployment."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
from pydantic import Field

from tc_assets.io.source import RoundSource, open_source
from tc_assets.io.warehouse import Warehouse


class WarehouseResource(dg.ConfigurableResource):
    """The DuckDB warehouse file every round-partitioned table is written to."""

    path: str = Field(description="Path of the DuckDB file (created on first write).")
    lock_timeout_s: float = Field(
        default=300.0,
        description="How long a connection waits for another process's lock on the file.",
    )

    def get(self) -> Warehouse:
        return Warehouse(self.path, lock_timeout_s=self.lock_timeout_s)

    @property
    def directory(self) -> Path:
        """The folder beside the warehouse file, where plots and reports are saved."""
        return Path(self.path).expanduser().resolve().parent


class RoundSourceResource(dg.ConfigurableResource):
    """Where rounds are read from: a local folder or an s3://bucket/prefix URI."""

    uri: str = Field(
        description="Local folder or s3://bucket/prefix holding features.json and rounds/."
    )

    def open(self) -> RoundSource:
        return open_source(self.uri)
