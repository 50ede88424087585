"""A round source under an S3 prefix, read with a boto3 client (same layout as a local folder)."""

from __future__ import annotations

from typing import Any

from tc_assets.io.source import RoundSource, SourceError


class S3RoundSource(RoundSource):
    """Rounds under `s3://bucket/prefix`; the client is built by the caller (e.g. S3Resource)."""

    def __init__(self, client: Any, bucket: str, prefix: str = "") -> None:
        self.client = client
        self.bucket = bucket
        self.prefix = prefix.strip("/")

    @classmethod
    def from_uri(cls, uri: str, client: Any = None, **client_kwargs: Any) -> S3RoundSource:
        """Parse `s3://bucket/prefix`; build a boto3 client from the environment if none given."""
        if not uri.startswith("s3://"):
            raise ValueError(f"not an s3:// URI: {uri!r}")
        bucket, _, prefix = uri[len("s3://") :].partition("/")
        if not bucket:
            raise ValueError(f"no bucket in {uri!r}")
        if client is None:
            import boto3

            client = boto3.client("s3", **client_kwargs)
        return cls(client, bucket, prefix)

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def _key(self, rel: str) -> str:
        rel = rel.strip("/")
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def read_bytes(self, rel: str) -> bytes:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(rel))["Body"].read()
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            raise SourceError(f"{self.uri}/{rel}: {code or exc}") from exc
        except BotoCoreError as exc:
            raise SourceError(f"{self.uri}/{rel}: {exc}") from exc

    def exists(self, rel: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(rel))
            return True
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise SourceError(f"{self.uri}/{rel}: {exc}") from exc

    def list_names(self, rel_dir: str) -> list[str]:
        prefix = (
            self._key(rel_dir) + "/"
            if rel_dir.strip("/")
            else (self.prefix + "/" if self.prefix else "")
        )
        names: set[str] = set()
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix, Delimiter="/"):
            for item in page.get("Contents", []):
                names.add(item["Key"][len(prefix) :])
            for common in page.get("CommonPrefixes", []):
                names.add(common["Prefix"][len(prefix) :].rstrip("/"))
        return sorted(n for n in names if n)

    def fingerprint(self, rel: str) -> str:
        """The object's ETag (a content hash for single-part uploads) without downloading it."""
        from botocore.exceptions import ClientError

        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self._key(rel))
        except ClientError as exc:
            raise SourceError(f"{self.uri}/{rel}: {exc}") from exc
        return str(head["ETag"]).strip('"')
