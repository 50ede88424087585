"""Where asset values live between steps and runs: the local folder or S3 (TC_STORAGE)."""

import dagster as dg
import pytest

from tc_assets.defs.definitions import INGEST_ROUND_JOB, PlatformPaths
from tc_assets.defs.resources import RoundStorage, S3RoundStorage, value_storage
from tc_assets.io import values
from tests.conftest import platform, run_job
from tests.s3server import client


def test_storage_location_selects_the_store(tmp_path):
    local = value_storage(str(tmp_path / "values"))
    assert isinstance(local, RoundStorage) and local.base_dir == str(tmp_path / "values")
    s3 = value_storage("s3://bucket/some/prefix/")
    assert isinstance(s3, S3RoundStorage)
    assert (s3.s3_bucket, s3.s3_prefix) == ("bucket", "some/prefix")
    with pytest.raises(ValueError, match="names no bucket"):
        value_storage("s3:///prefix")
    paths = PlatformPaths.create(str(tmp_path), str(tmp_path / "w.duckdb"), "s3://b/values")
    assert paths.storage == "s3://b/values"
    assert PlatformPaths.create(str(tmp_path), str(tmp_path / "w.duckdb")).storage == str(
        tmp_path / "storage"
    )


def test_values_are_written_to_and_read_from_the_s3_store(
    small_source, tmp_path, s3_endpoint, monkeypatch
):
    """Every round value lands in the bucket, none on local disk, and a later run reads them."""
    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "TC_S3_ENDPOINT_URL": s3_endpoint,
    }.items():
        monkeypatch.setenv(key, value)
    s3 = client(s3_endpoint)
    s3.create_bucket(Bucket="values-store")
    defs, paths = platform(small_source, tmp_path, "s3://values-store/prod")
    with dg.instance_for_test() as instance:
        assert run_job(defs, instance, 1, INGEST_ROUND_JOB).success
        keys = {o["Key"] for o in s3.list_objects_v2(Bucket="values-store")["Contents"]}
        for asset in ("stakes", "predictions", "universe", "round_info"):
            assert f"prod/{asset}/1" in keys, sorted(keys)
        assert not (tmp_path / "wh" / "storage").exists()
        # The predictions matrix is stored as its raw float64 values, as in the local store.
        body = s3.get_object(Bucket="values-store", Key="prod/predictions/1")["Body"].read()
        matrix = values.read_value(body)
        assert body.startswith(values.MAGIC) and len(body) < matrix.size * 8 + 100_000
        # A run of the downstream assets alone reads the stored inputs back from S3.
        alone = defs.resolve_job_def("score_round").execute_in_process(
            instance=instance,
            partition_key="1",
            asset_selection=[dg.AssetKey("meta_model")],
            raise_on_error=False,
        )
        assert alone.success
        keys = {o["Key"] for o in s3.list_objects_v2(Bucket="values-store")["Contents"]}
        assert "prod/meta_model/1" in keys
