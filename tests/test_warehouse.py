"""The warehouse replaces exactly one round per write, atomically, and waits for locks."""

import multiprocessing as mp
from pathlib import Path

import duckdb
import pandas as pd
import pytest

from tc_assets.io.warehouse import Warehouse, WarehouseError


def _preds(round_number: int, models: list[str], n: int = 5, base: float = 0.0) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {"model_id": m, "id": f"id{i}", "prediction": base + i / 10}
            for m in models
            for i in range(n)
        ]
    )


def _dump(wh: Warehouse, table: str) -> pd.DataFrame:
    return wh.query(f"SELECT * FROM {table} ORDER BY round, model_id, id").reset_index(drop=True)


def test_write_replaces_exactly_one_round(tmp_path):
    wh = Warehouse(tmp_path / "w.duckdb")
    wh.write_round(1, {"predictions": _preds(1, ["a", "b"])})
    wh.write_round(2, {"predictions": _preds(2, ["a"])})
    wh.write_round(1, {"predictions": _preds(1, ["c"], n=3, base=0.5)})
    out = _dump(wh, "predictions")
    assert sorted(out.loc[out["round"] == 1, "model_id"].unique()) == ["c"]
    assert len(out[out["round"] == 1]) == 3
    assert len(out[out["round"] == 2]) == 5  # round 2 untouched
    assert wh.partitions("predictions") == [1, 2]


def test_rewriting_a_round_is_idempotent(tmp_path):
    wh = Warehouse(tmp_path / "w.duckdb")
    tables = {
        "predictions": _preds(7, ["a", "b"]),
        "stakes": pd.DataFrame(
            {
                "model_id": ["a", "b"],
                "stake": [1.0, 2.0],
                "corr_multiplier": [1.0, 0.5],
                "tc_multiplier": [2.0, 0.0],
                "submitted": [True, True],
            }
        ),
    }
    wh.write_round(7, tables)
    first = {t: _dump(wh, t) if t == "predictions" else wh.read_round(t, 7) for t in tables}
    wh.write_round(7, tables)
    second = {t: _dump(wh, t) if t == "predictions" else wh.read_round(t, 7) for t in tables}
    for t in tables:
        pd.testing.assert_frame_equal(first[t], second[t])


def test_failure_between_delete_and_insert_keeps_previous_rows(tmp_path, monkeypatch):
    wh = Warehouse(tmp_path / "w.duckdb")
    wh.write_round(
        3,
        {
            "predictions": _preds(3, ["a", "b"]),
            "universe": pd.DataFrame({"id": ["id0", "id1"], "era": ["3", "3"]}),
        },
    )
    before_p, before_u = _dump(wh, "predictions"), wh.read_round("universe", 3)

    calls = {"n": 0}
    original = Warehouse._insert

    def failing_insert(con, spec, data):
        # The first table's delete and insert succeed, then the second insert fails after its
        # delete: the transaction must roll back both tables.
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("injected failure after delete")
        original(con, spec, data)

    monkeypatch.setattr(Warehouse, "_insert", staticmethod(failing_insert))
    with pytest.raises(RuntimeError, match="injected"):
        wh.write_round(
            3,
            {
                "predictions": _preds(3, ["z"]),
                "universe": pd.DataFrame({"id": ["x"], "era": ["3"]}),
            },
        )
    monkeypatch.setattr(Warehouse, "_insert", staticmethod(original))
    pd.testing.assert_frame_equal(_dump(wh, "predictions"), before_p)
    pd.testing.assert_frame_equal(wh.read_round("universe", 3), before_u)


def test_schema_violations_are_rejected_before_writing(tmp_path):
    wh = Warehouse(tmp_path / "w.duckdb")
    wh.write_round(1, {"predictions": _preds(1, ["a"])})
    with pytest.raises(WarehouseError, match="not in the table's schema"):
        wh.write_round(1, {"predictions": _preds(1, ["b"]).assign(extra=1)})
    with pytest.raises(WarehouseError, match="missing columns"):
        wh.write_round(1, {"predictions": _preds(1, ["b"]).drop(columns="prediction")})
    with pytest.raises(WarehouseError, match="in a write of round=1"):
        wh.write_round(1, {"predictions": _preds(1, ["b"]).assign(round=2)})
    with pytest.raises(KeyError, match="unknown warehouse table"):
        wh.write_round(1, {"no_such_table": _preds(1, ["b"])})
    assert sorted(_dump(wh, "predictions")["model_id"].unique()) == ["a"]


def test_update_columns_fills_one_column_of_a_round(tmp_path):
    wh = Warehouse(tmp_path / "w.duckdb")
    wh.write_round(
        1,
        {
            "meta_model": pd.DataFrame(
                {"id": ["a", "b", "c"], "swmm": [0.1, 0.2, 0.3], "weight": [None, None, None]}
            )
        },
    )
    wh.write_round(2, {"meta_model": pd.DataFrame({"id": ["a"], "swmm": [9.0], "weight": [5.0]})})
    wh.update_columns(
        "meta_model",
        1,
        pd.DataFrame({"id": ["a", "b"], "weight": [0.5, -0.5]}),
        on=("id",),
        columns=("weight",),
    )
    r1 = wh.read_round("meta_model", 1)
    assert r1["swmm"].tolist() == [0.1, 0.2, 0.3]
    assert r1["weight"].tolist()[:2] == [0.5, -0.5] and pd.isna(r1["weight"].iloc[2])
    assert wh.read_round("meta_model", 2)["weight"].tolist() == [5.0]


def _hold_lock(path: str, ready, release) -> None:
    con = duckdb.connect(path)
    con.execute("CREATE TABLE IF NOT EXISTS hold (x INTEGER)")
    ready.set()
    release.wait(30)
    con.close()


def test_a_writer_waits_for_another_process_lock(tmp_path):
    path = str(tmp_path / "w.duckdb")
    ctx = mp.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(path, ready, release))
    holder.start()
    try:
        assert ready.wait(60)
        with pytest.raises(WarehouseError, match="lock"):
            Warehouse(path, lock_timeout_s=0.5).write_round(1, {"predictions": _preds(1, ["a"])})
        release.set()
        Warehouse(path, lock_timeout_s=60).write_round(1, {"predictions": _preds(1, ["a"])})
    finally:
        release.set()
        holder.join(30)
    assert len(Warehouse(path).read_round("predictions", 1)) == 5


def test_dbt_waits_for_the_lock_as_the_python_steps_do(small_source, tmp_path):
    """One wait (WarehouseResource.lock_timeout_s) and one message for a warehouse held open
    by another process, dbt's step included."""
    import subprocess
    import sys
    import time

    import dagster as dg

    from tc_assets.defs.definitions import SCORE_ROUND_JOB
    from tests.conftest import platform

    defs, paths = platform(small_source, tmp_path)
    Path(paths.warehouse).parent.mkdir(parents=True, exist_ok=True)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import duckdb, sys, time; c = duckdb.connect(sys.argv[1]); print('held', flush=True);"
            " time.sleep(120)",
            paths.warehouse,
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        dbt_keys = [k for k in defs.resolve_all_asset_keys() if k.path[0] in ("reporting",)]
        start = time.monotonic()
        with dg.instance_for_test() as instance:
            instance.add_dynamic_partitions("rounds", ["1"])
            result = defs.resolve_job_def(SCORE_ROUND_JOB).execute_in_process(
                instance=instance,
                partition_key="1",
                asset_selection=dbt_keys,
                raise_on_error=False,
                run_config={
                    "resources": {
                        "warehouse": {"config": {"path": paths.warehouse, "lock_timeout_s": 2.0}}
                    }
                },
            )
        seconds = time.monotonic() - start
    finally:
        holder.kill()
        holder.wait()
    assert not result.success
    (failure,) = [e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE]
    message = failure.event_specific_data.error.message
    assert "stayed locked by another process" in message and "lock_timeout_s" in message
    assert seconds < 60  # not dbt's own 63 s
