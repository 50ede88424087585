"""The assets' values on S3 (`resources.S3RoundStorage`): dagster-aws's storage in the format
of `io/values.py`. A module of its own, so that dagster-aws is imported only where it is used."""

from __future__ import annotations

import io
from typing import Any

import dagster as dg
from dagster_aws.s3.io_manager import PickledObjectS3IOManager
from upath import UPath

from tc_assets.defs.resources import never_produced
from tc_assets.io import values


class S3RoundValues(PickledObjectS3IOManager):
    """dagster-aws's per-asset-partition storage on S3, in the format of `io/values.py` (a
    float64 matrix as raw columns viewed in the downloaded bytes, anything else pickled); a
    missing value is a clear error."""

    def dump_to_path(self, context: dg.OutputContext, obj: Any, path: UPath) -> None:
        buffer = io.BytesIO()
        values.write_value(obj, buffer)
        buffer.seek(0)
        self.s3.upload_fileobj(buffer, self.bucket, path.as_posix())

    def load_from_path(self, context: dg.InputContext, path: UPath) -> Any:
        try:
            body = self.s3.get_object(Bucket=self.bucket, Key=path.as_posix())["Body"].read()
        except self.s3.exceptions.NoSuchKey:
            raise FileNotFoundError(f"{self._uri_for_path(path)} not found") from None
        return values.read_value(body)

    def load_input(self, context: dg.InputContext) -> object:
        try:
            return super().load_input(context)
        except FileNotFoundError:
            raise never_produced(context) from None
