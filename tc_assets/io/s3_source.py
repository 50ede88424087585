"""A round source under an S3 prefix, read with a boto3 client (same layout as a local folder).

Transient errors are retried at two levels: the client's own retry handler (botocore "standard"
mode: throttling, 5xx, connection errors on the request) and, here, a re-read of an object whose
body stream broke off midway, which botocore does not retry. Credentials never pass through this
module: boto3 finds them in the environment (AWS_ACCESS_KEY_ID, AWS_PROFILE, an instance role).
"""

from __future__ import annotations

import time
from typing import Any

from tc_assets.io.source import RoundSource, SourceError, SourceUnavailable

# An S3-compatible endpoint (MinIO, a local moto server); unset means AWS itself.
ENDPOINT_ENV = "TC_S3_ENDPOINT_URL"
# Error codes of S3 answers that say "try again later", not "this file is bad or absent".
TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestTimeout",
        "RequestTimeTooSkewed",
        "InternalError",
        "ServiceUnavailable",
        "500",
        "502",
        "503",
        "504",
    }
)
# Retries per request by botocore's retry handler (S3ClientResource.max_attempts; botocore makes
# at most this many + 1 attempts, backing off exponentially with jitter, capped at 20 s).
DEFAULT_MAX_ATTEMPTS = 8


class S3RoundSource(RoundSource):
    """Rounds under `s3://bucket/prefix`; the client is built by the caller (S3ClientResource)."""

    def __init__(
        self,
        client: Any,
        bucket: str,
        prefix: str = "",
        read_attempts: int = 4,
        retry_delay_s: float = 0.2,
    ) -> None:
        self.client = client
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.read_attempts = max(1, read_attempts)
        self.retry_delay_s = retry_delay_s

    @classmethod
    def from_uri(cls, uri: str, client: Any) -> S3RoundSource:
        """Parse `s3://bucket/prefix`; `client` is a boto3 S3 client (`RoundSourceResource`
        builds it from the environment, through dagster-aws' S3Resource)."""
        if not uri.startswith("s3://"):
            raise ValueError(f"not an s3:// URI: {uri!r}")
        bucket, _, prefix = uri[len("s3://") :].partition("/")
        if not bucket:
            raise ValueError(f"no bucket in {uri!r}")
        return cls(client, bucket, prefix)

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def _key(self, rel: str) -> str:
        rel = rel.strip("/")
        return "/".join(part for part in (self.prefix, rel) if part)

    def _dir_prefix(self, rel_dir: str) -> str:
        """The key prefix of a folder, ending in '/' (or '' for the root of a bucket)."""
        key = self._key(rel_dir)
        return f"{key}/" if key else ""

    def read_bytes(self, rel: str) -> bytes:
        """The object's content; a body stream that breaks off is read again (with backoff)."""
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            ConnectionError,
            HTTPClientError,
            IncompleteReadError,
        )

        transient = (HTTPClientError, ConnectionError, IncompleteReadError)
        for attempt in range(self.read_attempts):
            try:
                response = self.client.get_object(Bucket=self.bucket, Key=self._key(rel))
                return response["Body"].read()
            except ClientError as exc:
                raise _client_error(f"{self.uri}/{rel}", exc) from exc
            except transient as exc:
                if attempt + 1 == self.read_attempts:
                    raise SourceUnavailable(
                        f"{self.uri}/{rel}: {exc} (after {self.read_attempts} attempts)"
                    ) from exc
                time.sleep(self.retry_delay_s * 2**attempt)
            except BotoCoreError as exc:  # no credentials, a bad setting
                raise _botocore_error(f"{self.uri}/{rel}", exc) from exc
        raise AssertionError("unreachable")

    def exists(self, rel: str) -> bool:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(rel))
            return True
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise _client_error(f"{self.uri}/{rel}", exc) from exc
        except BotoCoreError as exc:
            raise _botocore_error(f"{self.uri}/{rel}", exc) from exc

    def _list(self, prefix: str, delimiter: bool) -> list[dict[str, Any]]:
        """Every page of a listing under `prefix` (with '/' as delimiter when asked)."""
        from botocore.exceptions import BotoCoreError, ClientError

        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix}
        if delimiter:
            kwargs["Delimiter"] = "/"
        where = f"{self.uri}: cannot list {prefix!r}"
        try:
            return list(self.client.get_paginator("list_objects_v2").paginate(**kwargs))
        except ClientError as exc:
            raise _client_error(where, exc) from exc
        except BotoCoreError as exc:
            raise _botocore_error(where, exc) from exc

    def list_names(self, rel_dir: str) -> list[str]:
        prefix = self._dir_prefix(rel_dir)
        names: set[str] = set()
        for page in self._list(prefix, delimiter=True):
            for item in page.get("Contents", []):
                names.add(item["Key"][len(prefix) :])
            for common in page.get("CommonPrefixes", []):
                names.add(common["Prefix"][len(prefix) :].rstrip("/"))
        return sorted(n for n in names if n)

    def stamps(self, rel_dir: str) -> dict[str, str]:
        """ETag (itself a content hash) of every object under `rel_dir`, at any depth, keyed by
        its path from the root.

        One paginated listing (1,000 objects a request), no object read: how the automation
        notices changed files without downloading them.
        """
        prefix = self._dir_prefix(rel_dir)
        root = self._dir_prefix("")
        return {
            item["Key"][len(root) :]: str(item["ETag"]).strip('"')
            for page in self._list(prefix, delimiter=False)
            for item in page.get("Contents", [])
            if not item["Key"].endswith("/")
        }

    def fingerprint(self, rel: str) -> str:
        """The object's ETag (a content hash for single-part uploads) without downloading it."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self._key(rel))
        except ClientError as exc:
            raise _client_error(f"{self.uri}/{rel}", exc) from exc
        except BotoCoreError as exc:
            raise _botocore_error(f"{self.uri}/{rel}", exc) from exc
        return str(head["ETag"]).strip('"')

    def file_stamp(self, rel: str) -> str | None:
        """The object's ETag, None when there is no such object."""
        return self.fingerprint(rel) if self.exists(rel) else None

    def content_hash(self, rel: str, stamp: str) -> str:
        """The ETag is the content hash: nothing to read."""
        return stamp


# What to fix when S3 refuses for a reason of the deployment's settings, not of the file.
CREDENTIALS_HINT = (
    "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, or give the process a role) "
    "in the environment of the command or the Dagster code location"
)
SETTING_HINTS = {
    "NoSuchBucket": "the bucket does not exist: check the source URI (--source or TC_SOURCE) "
    f"and the endpoint ({ENDPOINT_ENV})",
    "AccessDenied": f"access denied: {CREDENTIALS_HINT}, for credentials allowed to read it",
    "InvalidAccessKeyId": f"the access key is not known: {CREDENTIALS_HINT}",
    "SignatureDoesNotMatch": f"the secret key does not match the access key: {CREDENTIALS_HINT}",
}


def _client_error(where: str, exc: Any) -> SourceError:
    """A botocore ClientError as a SourceError: SourceUnavailable when S3 says 'later'; a
    refusal caused by the settings (bucket, credentials) names the setting to fix."""
    error = exc.response.get("Error", {})
    code = str(error.get("Code", ""))
    status = str(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
    if code in SETTING_HINTS:
        return SourceError(f"{where}: {code}: {SETTING_HINTS[code]}")
    kind = SourceUnavailable if code in TRANSIENT_CODES or status.startswith("5") else SourceError
    return kind(f"{where}: {code or exc}")


def _botocore_error(where: str, exc: Exception) -> SourceError:
    """A botocore error without an S3 answer: unreachable endpoint or broken connection are
    SourceUnavailable; a client-side problem (no credentials, a bad setting) is not."""
    from botocore.exceptions import ConnectionError, HTTPClientError, NoCredentialsError

    if isinstance(exc, NoCredentialsError):
        return SourceError(f"{where}: no AWS credentials found: {CREDENTIALS_HINT}")
    transient = isinstance(exc, ConnectionError | HTTPClientError)
    return (SourceUnavailable if transient else SourceError)(f"{where}: {exc}")
