"""The S3 round source against a real S3 server (moto's server mode on 127.0.0.1).

Rounds are generated locally and uploaded with boto3; the platform reads them through the
S3ClientResource with its endpoint and credentials from the environment.
"""

import hashlib
from pathlib import Path

import pandas as pd
import pytest

from tc_assets.defs.resources import RoundSourceResource, S3ClientResource
from tc_assets.io.ingest import ingest_round
from tc_assets.io.s3_source import S3RoundSource
from tc_assets.io.source import LocalRoundSource, SourceError, SourceUnavailable
from tc_assets.io.synthetic import SyntheticSettings, generate_source
from tc_assets.io.warehouse import Warehouse
from tests.conftest import platform, run_job
from tests.s3server import CREDENTIALS, FaultyProxy, client, moto_s3, s3_env, upload

TINY = SyntheticSettings(stocks=300, features=12, models=30, seed=3, with_bad_inputs=True)
BUCKET = "rounds"
PREFIX = "tournament"


@pytest.fixture(scope="module")
def local_source(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("s3src")
    generate_source(root, [1, 2], TINY)
    return root


@pytest.fixture(scope="module")
def endpoint(local_source) -> str:
    """A moto server holding the local source under s3://rounds/tournament."""
    with moto_s3() as url:
        s3 = client(url)
        s3.create_bucket(Bucket=BUCKET)
        upload(s3, local_source, BUCKET, PREFIX)
        yield url


@pytest.fixture
def s3_environment(endpoint, monkeypatch) -> str:
    for key, value in s3_env(endpoint).items():
        monkeypatch.setenv(key, value)
    return f"s3://{BUCKET}/{PREFIX}"


def _source(uri: str) -> S3RoundSource:
    source = RoundSourceResource.for_uri(uri).open()
    assert isinstance(source, S3RoundSource)
    return source


def test_s3_source_reads_the_same_layout_as_the_local_folder(s3_environment, local_source):
    s3, local = _source(s3_environment), LocalRoundSource(local_source)
    assert s3.round_numbers() == local.round_numbers() == [1, 2]
    for rel in ["rounds/1", "rounds/1/predictions", "rounds/2/portfolios", "rounds/9", ""]:
        assert s3.list_names(rel) == local.list_names(rel), rel
    for rel in ["features.json", "rounds/1/round.json", "rounds/2/stakes.csv"]:
        assert s3.read_bytes(rel) == local.read_bytes(rel)
        # An ETag of a single-part upload is the MD5 of the content.
        assert s3.fingerprint(rel) == hashlib.md5(local.read_bytes(rel)).hexdigest()
    assert s3.exists("rounds/1/live.parquet") and not s3.exists("rounds/1/nothing.csv")
    etags = s3.stamps("rounds/1")
    files = [p for p in (local_source / "rounds" / "1").rglob("*") if p.is_file()]
    assert sorted(etags) == sorted(p.relative_to(local_source).as_posix() for p in files)
    pd.testing.assert_frame_equal(
        s3.read_table("rounds/1/stakes.csv"), local.read_table("rounds/1/stakes.csv")
    )
    with pytest.raises(SourceError, match="NoSuchKey"):
        s3.read_bytes("rounds/1/missing.parquet")
    # Outside Dagster (tc-platform run lists rounds this way) the same environment applies.
    assert RoundSourceResource.for_uri(s3_environment).open().round_numbers() == [1, 2]


def _warehouse_rows(path: str) -> dict[str, pd.DataFrame]:
    wh = Warehouse(path)
    out = {}
    for name in wh.table_names():
        df = wh.query(f'SELECT * FROM "{name}"').drop(
            columns=["ingested_at", "source"], errors="ignore"
        )
        out[name] = df.sort_values(list(df.columns)).reset_index(drop=True)
    return out


def test_ingestion_from_s3_writes_the_same_rows_as_from_the_folder(
    s3_environment, local_source, instance, tmp_path
):
    results = {}
    for name, uri in [("s3", s3_environment), ("local", str(local_source))]:
        defs, paths = platform(uri, tmp_path / name)
        assert run_job(defs, instance, 1, job="ingest_round").success
        results[name] = _warehouse_rows(paths.warehouse)
        assert Warehouse(paths.warehouse).query("SELECT DISTINCT source FROM rounds")[
            "source"
        ].tolist() == [uri]
    assert results["s3"].keys() == results["local"].keys()
    assert {"predictions", "stakes", "submission_rejections", "resolved"} <= set(results["s3"])
    for table, rows in results["local"].items():
        assert len(rows), table
        pd.testing.assert_frame_equal(results["s3"][table], rows, obj=table)


def test_credentials_come_only_from_the_environment(s3_environment, monkeypatch):
    assert _source(s3_environment).round_numbers() == [1, 2]
    resource = RoundSourceResource.for_uri(s3_environment)
    assert not {"aws_access_key_id", "aws_secret_access_key"} & set(type(resource.s3).model_fields)
    for key in CREDENTIALS:
        if key != "AWS_DEFAULT_REGION":
            monkeypatch.delenv(key)
    with pytest.raises(SourceError, match="credentials"):
        _source(s3_environment).round_numbers()


def test_transient_errors_are_retried(endpoint, local_source, monkeypatch):
    """503 SlowDown answers are retried by the client; a body cut short is read again."""
    expected = (local_source / "rounds/1/stakes.csv").read_bytes()
    with FaultyProxy(endpoint) as proxy:
        for key, value in s3_env(proxy.endpoint).items():
            monkeypatch.setenv(key, value)
        # Two retries keep botocore's backoff (random, doubling from ~1 s) short in a test.
        s3 = S3ClientResource(endpoint_url=proxy.endpoint, max_attempts=2)
        source = RoundSourceResource(uri=f"s3://{BUCKET}/{PREFIX}", s3=s3).open()
        assert isinstance(source, S3RoundSource)
        source.retry_delay_s = 0.01

        proxy.fail(2)
        before = proxy.requests
        assert source.round_numbers() == [1, 2]
        assert proxy.requests - before == 3  # two 503s, then the answer

        proxy.truncate(2)
        before = proxy.requests
        assert source.read_bytes("rounds/1/stakes.csv") == expected
        assert proxy.requests - before == 3

        source.read_attempts = 1
        proxy.truncate(1)
        with pytest.raises(SourceError, match="after 1 attempts"):
            source.read_bytes("rounds/1/stakes.csv")

        # Past the client's attempts the error surfaces, naming the file.
        proxy.fail(100)
        before = proxy.requests
        with pytest.raises(SourceUnavailable, match="stakes.csv: SlowDown"):
            source.read_bytes("rounds/1/stakes.csv")
        assert proxy.requests - before == 3
        proxy.fail(0)

        # A refusal is an answer, not an outage: a plain SourceError.
        proxy.deny("stakes.csv")
        with pytest.raises(SourceError, match="AccessDenied") as denied:
            source.read_bytes("rounds/1/stakes.csv")
        assert not isinstance(denied.value, SourceUnavailable)
        proxy.deny("")


def test_an_unreachable_submission_fails_the_round_instead_of_rejecting_it(
    endpoint, local_source, monkeypatch
):
    """S3 keeps answering 503 for the prediction files: ingestion raises SourceUnavailable
    (the step asks Dagster for a retry) instead of rejecting models as unreadable."""
    with FaultyProxy(endpoint) as proxy:
        for key, value in s3_env(proxy.endpoint).items():
            monkeypatch.setenv(key, value)
        s3 = S3ClientResource(endpoint_url=proxy.endpoint, max_attempts=1)
        source = RoundSourceResource(uri=f"s3://{BUCKET}/{PREFIX}", s3=s3).open()
        source.retry_delay_s = 0.01
        proxy.unavailable("/predictions/")
        with pytest.raises(SourceUnavailable, match="predictions"):
            ingest_round(source, 1, workers=2)
        proxy.unavailable("")
        assert len(ingest_round(source, 1, workers=2).predictions.columns) > 0


def test_client_retry_settings_come_from_the_s3_resource(s3_environment):
    resource = RoundSourceResource.for_uri(s3_environment)
    s3_client = _source(s3_environment).client
    assert s3_client.meta.endpoint_url == resource.s3.endpoint_url
    retries = s3_client.meta.config.retries
    assert retries["mode"] == "standard"
    assert resource.s3.max_attempts >= 5
    assert retries["total_max_attempts"] == resource.s3.max_attempts + 1  # retries + first try
