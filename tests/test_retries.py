"""Only transient faults are retried: anything else fails the step at once with its own message."""

import re
import time
from types import SimpleNamespace

import boto3
import dagster as dg
import pytest
from dagster._core.errors import DagsterExecutionInterruptedError

from tc_assets.defs import ingest
from tc_assets.defs.definitions import PlatformPaths
from tc_assets.io.contract import RoundInputError
from tc_assets.io.ingest import ingest_round
from tc_assets.io.s3_source import S3RoundSource
from tc_assets.io.source import SourceError, SourceUnavailable
from tc_assets.runner import run_rounds
from tests.s3server import ISOLATION, client, moto_s3


def test_a_warehouse_path_that_is_not_duckdb_fails_at_once_with_its_message(
    small_source, tmp_path, instance
):
    warehouse = tmp_path / "wh.duckdb"
    warehouse.write_text("this is not a DuckDB file\n")
    paths = PlatformPaths.create(str(small_source), str(warehouse))
    lines: list[str] = []
    start = time.monotonic()
    (outcome,) = run_rounds(paths, [1], instance=instance, echo=lines.append)
    seconds = time.monotonic() - start
    assert not outcome.success
    failures = dict(outcome.failures)  # the steps that failed, in no guaranteed order
    assert "round_inputs" in failures, failures
    message = failures["round_inputs"]
    assert "not a valid DuckDB database file" in message and str(warehouse) in message
    assert "max_retries" not in "\n".join(lines)
    events = instance.all_logs(outcome.run_id)
    assert not [e for e in events if e.dagster_event_type == dg.DagsterEventType.STEP_UP_FOR_RETRY]
    assert seconds < 120  # no retry delays (30 s and more each)


def test_only_a_transient_fault_requests_a_retry():
    """A source or lock fault asks Dagster for a retry; any other error is a Failure without
    one; an interrupt passes through. No retry policy sits on the steps: Dagster would turn an
    interrupt of such a step into a retry, and a canceled run would go on."""
    context = SimpleNamespace(retry_number=0)  # the one field read of a step's context
    for fault in (SourceUnavailable("503 from S3"), ingest.WarehouseLocked("locked")):
        with pytest.raises(dg.RetryRequested) as retry, ingest.only_transient_retried(context, 1):
            raise fault
        assert retry.value.max_retries == ingest.SOURCE_RETRY.max_retries
        assert 0 <= retry.value.seconds_to_wait <= 2 * ingest.SOURCE_RETRY.delay
        assert retry.value.__cause__ is fault
    failure = pytest.raises(dg.Failure, match="round 1: ValueError: bad")
    with failure, ingest.only_transient_retried(context, 1):
        raise ValueError("bad")
    with pytest.raises(DagsterExecutionInterruptedError), ingest.only_transient_retried(context, 1):
        raise DagsterExecutionInterruptedError()
    for asset in (ingest.round_inputs, ingest.resolved):
        assert asset.op.retry_policy is None


def test_a_transient_fault_is_retried_and_the_round_scores(
    small_source, tmp_path, instance, monkeypatch
):
    monkeypatch.setattr(ingest, "SOURCE_RETRY", dg.RetryPolicy(max_retries=3))  # no delay
    calls: list[int] = []

    def flaky_ingest(*args: object, **kwargs: object) -> object:
        calls.append(1)
        if len(calls) == 1:
            raise SourceUnavailable("S3 answered 503 for rounds/1/live.parquet")
        return ingest_round(*args, **kwargs)

    monkeypatch.setattr(ingest, "ingest_round", flaky_ingest)
    paths = PlatformPaths.create(str(small_source), str(tmp_path / "wh.duckdb"))
    (outcome,) = run_rounds(paths, [1], instance=instance, echo=lambda _: None)
    assert outcome.success, outcome.failures
    retried = instance.all_logs(outcome.run_id, of_type=dg.DagsterEventType.STEP_UP_FOR_RETRY)
    assert [e.step_key for e in retried] == ["round_inputs"]
    assert "503" in str(retried[0].dagster_event.event_specific_data.error)


def test_s3_settings_errors_are_clear_and_not_retried(monkeypatch):
    with moto_s3() as endpoint:
        s3 = client(endpoint)
        s3.create_bucket(Bucket="tournament")
        s3.put_object(Bucket="tournament", Key="live/features.json", Body=b"{}")
        for name, value in ISOLATION.items():
            monkeypatch.setenv(name, value)
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
            monkeypatch.delenv(name, raising=False)
        # A new session: boto3's default one keeps credentials an earlier test resolved.
        anonymous = boto3.session.Session().client(
            "s3", endpoint_url=endpoint, region_name="us-east-1"
        )
        with pytest.raises(SourceError, match="no AWS credentials found.*AWS_ACCESS_KEY_ID") as e:
            S3RoundSource(anonymous, "tournament", "live").read_bytes("features.json")
        assert not isinstance(e.value, SourceUnavailable)  # not a fault that retrying cures

        missing = S3RoundSource(s3, "no-such-bucket", "live")
        with pytest.raises(SourceError, match="NoSuchBucket: .*TC_SOURCE") as e:
            missing.read_bytes("features.json")
        assert not isinstance(e.value, SourceUnavailable)
        with pytest.raises(RoundInputError, match="round 1: .*NoSuchBucket"):
            ingest_round(missing, 1)


def _resource_fields(resource: dg.ConfigurableResource, prefix: str) -> list[str]:
    """Every config field of a resource, nested resources included."""
    out = []
    for name in type(resource).model_fields:
        out.append(f"{prefix}.{name}")
        value = getattr(resource, name)
        if isinstance(value, dg.ConfigurableResource):
            out += _resource_fields(value, f"{prefix}.{name}")
    return out


def test_no_credential_can_be_configured_on_a_resource():
    """Credentials come from the environment only: no resource field could hold one (Dagster
    would keep it in plain text in run config and the UI)."""
    from tc_assets.defs.definitions import build_definitions

    defs = build_definitions(PlatformPaths.create("s3://bucket/prefix", "/tmp/unused.duckdb"))
    fields = [
        path
        for key, resource in defs.resources.items()
        if isinstance(resource, dg.ConfigurableResource)
        for path in _resource_fields(resource, key)
    ]
    assert "round_source.s3.endpoint_url" in fields
    assert not [p for p in fields if re.search(r"secret|access_key|session_token|password", p)]
