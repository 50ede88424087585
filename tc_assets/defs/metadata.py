"""Small helpers that turn results into Dagster metadata a user reads in the UI."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import dagster as dg
import numpy as np
import pandas as pd

from tc_assets.io import tables


def plain(value: Any) -> Any:
    """A value as the UI should print it: Python scalars, floats to 6 significant digits
    (80178.78, not 80178.77999999997), NaN as None."""
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, int | np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        return float(f"{value:.6g}") if np.isfinite(value) else None
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return None
    return str(value)


def _column_type(dtype: Any) -> str:
    if pd.api.types.is_bool_dtype(dtype):
        return "bool"
    if pd.api.types.is_integer_dtype(dtype):
        return "int"
    if pd.api.types.is_float_dtype(dtype):
        return "float"
    return "string"


def metadata_table(df: pd.DataFrame, max_rows: int = 20) -> dg.MetadataValue:
    """A DataFrame's first `max_rows` rows as a table (always shown in the UI, unlike long
    markdown), figures rounded (see `plain`)."""
    shown = df.head(max_rows)
    schema = dg.TableSchema(
        columns=[dg.TableColumn(str(c), _column_type(t)) for c, t in shown.dtypes.items()]
    )
    records = [
        dg.TableRecord({str(c): plain(v) for c, v in row.items()})
        for row in shown.to_dict("records")
    ]
    return dg.MetadataValue.table(records, schema=schema)


def rounded(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """Metadata with its bare floats rounded for reading (see `plain`)."""
    return {k: plain(v) if isinstance(v, float | np.floating) else v for k, v in metadata.items()}


def warehouse_table(name: str, rows: int) -> dict[str, Any]:
    """The standard keys of an asset that writes warehouse table `name`: its name, the rows
    written for the partition and its columns (io/tables.py)."""
    spec = tables.table(name)
    columns = [dg.TableColumn(c, t.lower()) for c, t in spec.columns]
    return {
        "dagster/table_name": f"warehouse.main.{name}",
        "dagster/row_count": dg.MetadataValue.int(int(rows)),
        "dagster/column_schema": dg.TableSchema(columns=columns),
    }


@contextmanager
def timer() -> Iterator[dict[str, float]]:
    """Measure a block: `with timer() as t: ...; t["seconds"]`."""
    out: dict[str, float] = {}
    start = time.perf_counter()
    try:
        yield out
    finally:
        out["seconds"] = round(time.perf_counter() - start, 3)


def key_values(values: Mapping[str, Any]) -> dg.MetadataValue:
    """A dict as a two-column table."""
    frame = pd.DataFrame({"name": list(values), "value": [str(plain(v)) for v in values.values()]})
    return metadata_table(frame, max_rows=len(frame))


def scalars(values: Mapping[str, Any]) -> dict[str, Any]:
    """The finite numbers and booleans of a row as metadata values (the rest left out)."""
    out: dict[str, Any] = {}
    for k, v in values.items():
        if isinstance(v, bool | np.bool_):
            out[k] = dg.MetadataValue.bool(bool(v))
        elif isinstance(v, int | np.integer):
            out[k] = dg.MetadataValue.int(int(v))
        elif isinstance(v, float | np.floating) and np.isfinite(v):
            out[k] = dg.MetadataValue.float(plain(v))
    return out
