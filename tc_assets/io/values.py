"""How the assets' values are stored between steps: a float64 matrix as raw columns, anything
else as a pickle.

A DataFrame of float64 values with string labels (the ids x models predictions, the models x
features exposures) is written once as its raw column-major values after a small header with
its labels, and read back without a copy: from a local file through a read-only memory map, so
each step that reads the predictions shares the page cache instead of unpickling 200 MB; from
bytes (S3) by viewing them. Its size on disk is the float64 size of the matrix plus the labels.
Other values (Series, dicts, mixed frames) are pickled.

    [MAGIC][header length: 8 bytes little-endian][JSON header][padding to 64][float64 values]
"""

from __future__ import annotations

import json
import mmap
import os
import pickle
import tempfile
from pathlib import Path
from typing import IO, Any

import numpy as np
import pandas as pd

MAGIC = b"TCMATRIX1\n"
_ALIGN = 64


def is_matrix(obj: object) -> bool:
    """Whether `obj` is stored as a matrix: a DataFrame with one float64 block and string labels."""
    return (
        isinstance(obj, pd.DataFrame)
        and not obj.attrs
        and obj.shape[1] > 0
        and all(dtype == np.float64 for dtype in obj.dtypes)
        and all(
            isinstance(axis, pd.Index)
            and not isinstance(axis, pd.MultiIndex)
            and axis.inferred_type in ("string", "empty")
            for axis in (obj.index, obj.columns)
        )
    )


def _header(frame: pd.DataFrame) -> bytes:
    head = {
        "shape": list(frame.shape),
        "index": list(map(str, frame.index)),
        "columns": list(map(str, frame.columns)),
        "index_name": frame.index.name,
        "columns_name": frame.columns.name,
        "index_dtype": str(frame.index.dtype),
        "columns_dtype": str(frame.columns.dtype),
    }
    return json.dumps(head).encode()


def write_value(obj: object, file: IO[bytes]) -> None:
    """Write `obj` to a binary file: the matrix layout when `is_matrix`, else a pickle."""
    if not is_matrix(obj):
        pickle.dump(obj, file, pickle.HIGHEST_PROTOCOL)
        return
    assert isinstance(obj, pd.DataFrame)
    head = _header(obj)
    start = len(MAGIC) + 8 + len(head)
    pad = -start % _ALIGN
    file.write(MAGIC + len(head).to_bytes(8, "little") + head + b"\0" * pad)
    values = obj.to_numpy(dtype=np.float64, copy=False)
    # Column by column: one contiguous model at a time, whatever the frame's memory layout.
    for j in range(values.shape[1]):
        file.write(np.ascontiguousarray(values[:, j]).data)


def read_value(buffer: Any) -> object:
    """A value from the bytes `write_value` wrote (bytes, a memoryview or a memory map).

    A matrix is a read-only view of `buffer`, which it keeps alive; a pickle is unpickled."""
    view = memoryview(buffer)
    if bytes(view[: len(MAGIC)]) != MAGIC:
        return pickle.loads(view)
    n = int.from_bytes(view[len(MAGIC) : len(MAGIC) + 8], "little")
    start = len(MAGIC) + 8
    head = json.loads(bytes(view[start : start + n]))
    offset = start + n + (-(start + n) % _ALIGN)
    rows, cols = head["shape"]
    values = np.frombuffer(buffer, dtype=np.float64, count=rows * cols, offset=offset)
    index = pd.Index(head["index"], dtype=head["index_dtype"], name=head["index_name"])
    columns = pd.Index(head["columns"], dtype=head["columns_dtype"], name=head["columns_name"])
    return pd.DataFrame(
        values.reshape((rows, cols), order="F"), index=index, columns=columns, copy=False
    )


def save(obj: object, path: str | os.PathLike) -> None:
    """Write `obj` to a local file atomically: a reader never sees it half-written, and a
    memory map of the previous version stays valid (the new file replaces it by rename)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        with os.fdopen(fd, "wb") as file:
            write_value(obj, file)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load(path: str | os.PathLike) -> object:
    """Read a value `save` wrote; a matrix is memory-mapped, not read."""
    with open(path, "rb") as file:
        if file.read(len(MAGIC)) != MAGIC:
            file.seek(0)
            return pickle.load(file)
        mapped = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
    return read_value(mapped)
