"""The asset values' storage format (io/values.py): matrices raw and memory-mapped, the rest
pickled, every write atomic."""

import io
import mmap

import numpy as np
import pandas as pd
import pytest

from tc_assets.io import values


def _matrix(n: int = 50, m: int = 7) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    data = rng.uniform(size=(n, m))
    data[rng.uniform(size=(n, m)) < 0.1] = np.nan  # ids a model did not submit
    return pd.DataFrame(
        data,
        index=pd.Index([f"n{i:04d}" for i in range(n)], name="id"),
        columns=pd.Index([f"model_{j}" for j in range(m)], name="model_id"),
    )


def test_a_matrix_file_is_its_float64_values_and_labels_and_loads_without_a_copy(tmp_path):
    frame = _matrix(400, 30)
    path = tmp_path / "predictions" / "1"
    values.save(frame, path)
    assert path.read_bytes().startswith(values.MAGIC)
    labels = sum(len(s) + 4 for s in [*frame.index, *frame.columns])
    assert path.stat().st_size <= frame.size * 8 + labels + 1024
    loaded = values.load(path)
    pd.testing.assert_frame_equal(loaded, frame)
    array = loaded.to_numpy()
    assert not array.flags.writeable
    base = array
    while isinstance(base, np.ndarray):
        base = base.base
    assert isinstance(base, memoryview) and isinstance(base.obj, mmap.mmap)  # not a copy


def test_bytes_round_trip_for_a_store_without_files():
    frame = _matrix()
    buffer = io.BytesIO()
    values.write_value(frame, buffer)
    pd.testing.assert_frame_equal(values.read_value(buffer.getvalue()), frame)


@pytest.mark.parametrize(
    "value",
    [
        pd.Series([1.0, 2.0], index=["a", "b"], name="swmm"),
        {"round": 1, "feature_sets": {"medium": ["f1"]}},
        None,
        pd.DataFrame({"era": ["1", "2"], "f1": [0, 4]}, index=pd.Index(["a", "b"], name="id")),
        pd.DataFrame({"x": [1.0, 2.0]}),  # a RangeIndex: not string labels
    ],
)
def test_other_values_are_pickled(tmp_path, value):
    values.save(value, tmp_path / "v")
    assert not (tmp_path / "v").read_bytes().startswith(values.MAGIC)
    loaded = values.load(tmp_path / "v")
    if isinstance(value, pd.Series | pd.DataFrame):
        assert value.equals(loaded)
    else:
        assert loaded == value


def test_rewriting_a_value_leaves_a_loaded_copy_intact(tmp_path):
    path = tmp_path / "v"
    first = _matrix()
    values.save(first, path)
    loaded = values.load(path)
    values.save(_matrix() * 0.5, path)  # a re-run replaces the file while a step reads it
    pd.testing.assert_frame_equal(loaded, first)
    assert [p.name for p in tmp_path.iterdir()] == ["v"]  # no temporary file left behind
