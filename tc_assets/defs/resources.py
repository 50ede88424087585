"""Resources: the round source, the warehouse (DuckDB file or DuckLake) and the values' storage,
configured once per deployment."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import Field
from upath import UPath

from tc_assets.io import values
from tc_assets.io.s3_source import (
    DEFAULT_MAX_ATTEMPTS,
    ENDPOINT_ENV,
    S3RoundSource,
)
from tc_assets.io.source import LocalRoundSource, RoundSource
from tc_assets.io.warehouse import Warehouse, backend_of


class WarehouseResource(dg.ConfigurableResource):
    """Where every round-partitioned table is written: a DuckDB file (one writer at a time) or
    a DuckLake (catalog in PostgreSQL, Parquet data on S3 or a folder; many writers)."""

    path: str = Field(
        description="The DuckDB file (created on first write), or a DuckLake catalog: "
        "`ducklake:postgres:<libpq string or postgresql:// URL>` (many machines), "
        "`ducklake:<file>.ducklake` (one process)."
    )
    data_path: str | None = Field(
        default=None,
        description="The lake's data folder, s3://bucket/prefix/ or a directory (DuckLake only).",
    )
    files_dir: str | None = Field(
        default=None,
        description="Folder for plots and reports; default: beside the DuckDB file (required "
        "for a lake).",
    )
    lock_timeout_s: float = Field(
        default=300.0,
        description="How long a connection waits for another process's lock on the file.",
    )
    conflict_retries: int = Field(
        default=10,
        description="How many times a lake write that conflicted with another writer's commit "
        "is run again before it fails.",
    )

    def get(self) -> Warehouse:
        return Warehouse(
            self.path,
            lock_timeout_s=self.lock_timeout_s,
            data_path=self.data_path,
            conflict_retries=self.conflict_retries,
        )

    @property
    def backend(self) -> str:
        """`duckdb` or `ducklake`."""
        return backend_of(self.path)

    @property
    def directory(self) -> Path:
        """The folder where plots and reports are saved (beside the DuckDB file by default)."""
        if self.files_dir:
            return Path(self.files_dir).expanduser().resolve()
        if self.backend == "ducklake":
            raise ValueError("a lake warehouse needs files_dir (a folder for plots and reports)")
        return Path(self.path).expanduser().resolve().parent


class S3ClientResource(dg.ConfigurableResource):
    """S3 client settings with no credential field: boto3 reads credentials and region from the
    environment only (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, a role), so no
    secret can be typed into a run's config, where Dagster would store it in plain text."""

    endpoint_url: str | None = Field(
        default=None, description=f"An S3-compatible endpoint (unset: AWS); see {ENDPOINT_ENV}."
    )
    max_attempts: int = Field(
        default=DEFAULT_MAX_ATTEMPTS,
        ge=1,
        description="Retries per request in botocore's standard retry mode.",
    )

    def get_client(self) -> Any:
        """A boto3 S3 client in a new session, so credentials are read from the environment
        now (not cached by boto3's default session from an earlier client)."""
        import boto3
        from botocore.config import Config

        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint_url or os.environ.get(ENDPOINT_ENV) or None,
            config=Config(retries={"max_attempts": self.max_attempts, "mode": "standard"}),
        )


def s3_from_env() -> S3ClientResource:
    """The S3 client settings: endpoint from TC_S3_ENDPOINT_URL (unset: AWS), retries in
    botocore's standard mode; credentials from the environment only."""
    return S3ClientResource(endpoint_url=os.environ.get(ENDPOINT_ENV) or None)


class RoundSourceResource(dg.ConfigurableResource):
    """Where rounds are read from: a local folder or an s3://bucket/prefix URI."""

    uri: str = Field(
        description="Local folder or s3://bucket/prefix holding features.json and rounds/."
    )
    s3: S3ClientResource = Field(
        description="S3 client settings, used when `uri` is s3://; see s3_from_env."
    )

    @classmethod
    def for_uri(cls, uri: str) -> RoundSourceResource:
        """The resource for `uri` with S3 settings from the environment."""
        return cls(uri=uri, s3=s3_from_env())

    def open(self) -> RoundSource:
        if self.uri.startswith("s3://"):
            return S3RoundSource.from_uri(self.uri, client=self.s3.get_client())
        return LocalRoundSource(self.uri)


def never_produced(context: dg.InputContext) -> dg.Failure:
    """The failure for loading a value that was never stored: which asset, which round, why."""
    key = context.asset_key.to_user_string() if context.has_asset_key else "?"
    part = context.asset_partition_key if context.has_asset_partitions else None
    where = f" of round {part}" if part is not None else ""
    hint = (
        " The round is awaiting resolution: `resolved` produces nothing until "
        f"rounds/{part}/resolved.parquet arrives (the changes sensor then scores it)."
        if key == "resolved"
        else f" Materialize `{key}`{where} first (or the whole score_round job)."
    )
    return dg.Failure(
        description=f"`{key}`{where} has not been materialized, so it cannot be read.{hint}",
        allow_retries=False,
    )


class _RoundValues(dg.UPathIOManager):
    """One file per asset and partition under `base_dir` (`<asset>/<round>`) in the format of
    `io/values.py` (a float64 matrix memory-mapped, anything else pickled), written atomically;
    a missing upstream value is a clear error."""

    extension = ""

    def __init__(self, base_dir: str) -> None:
        super().__init__(base_path=UPath(base_dir))

    def dump_to_path(self, context: dg.OutputContext, obj: Any, path: UPath) -> None:
        values.save(obj, path.path)

    def load_from_path(self, context: dg.InputContext, path: UPath) -> Any:
        return values.load(path.path)

    def load_input(self, context: dg.InputContext) -> object:
        try:
            return super().load_input(context)
        except FileNotFoundError:
            raise never_produced(context) from None


class RoundStorage(dg.FilesystemIOManager):
    """Where the assets' values live between steps and runs: one file per asset and round
    under `base_dir`. Loading a value that was never produced (an asset materialized alone
    before its inputs, or before the round resolved) fails with a message, not a stack trace."""

    def create_io_manager(self, context: dg.InitResourceContext) -> dg.UPathIOManager:
        base_dir = self.base_dir or context.instance.storage_directory()
        return _RoundValues(base_dir=base_dir)


class S3RoundStorage(dg.ConfigurableIOManagerFactory):
    """The assets' values on S3, for runs in separate containers or machines (deploy/): one
    object per asset and round at s3://`s3_bucket`/`s3_prefix`/<asset>/<round>, in the format of
    RoundStorage's files. A value never produced fails as RoundStorage's."""

    s3_bucket: str = Field(description="Bucket of the values (it must exist).")
    s3_prefix: str = Field(default="", description="Key prefix inside the bucket.")
    s3: S3ClientResource = Field(description="S3 client settings; see s3_from_env.")

    def create_io_manager(self, context: dg.InitResourceContext) -> dg.UPathIOManager:
        from tc_assets.defs.s3_values import S3RoundValues  # dagster-aws: only where S3 is used

        return S3RoundValues(
            s3_bucket=self.s3_bucket, s3_session=self.s3.get_client(), s3_prefix=self.s3_prefix
        )


def value_storage(location: str) -> RoundStorage | S3RoundStorage:
    """The values' storage for `location`: a local folder, or s3://bucket/prefix (TC_STORAGE)."""
    if location.startswith("s3://"):
        bucket, _, prefix = location.removeprefix("s3://").partition("/")
        if not bucket:
            raise ValueError(f"value storage {location!r} names no bucket (s3://bucket/prefix)")
        return S3RoundStorage(s3_bucket=bucket, s3_prefix=prefix.strip("/"), s3=s3_from_env())
    return RoundStorage(base_dir=location)
