"""Small helpers that turn results into Dagster metadata a user reads in the UI."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import dagster as dg
import numpy as np
import pandas as pd


def markdown_table(df: pd.DataFrame, max_rows: int = 20, floatfmt: str = ".4f") -> dg.MetadataValue:
    """A DataFrame as a markdown table (first `max_rows` rows), for the asset's metadata."""
    if df.empty:
        return dg.MetadataValue.md("_(none)_")
    shown = df.head(max_rows)
    text = shown.to_markdown(index=False, floatfmt=floatfmt)
    if len(df) > max_rows:
        text += f"\n\n_... and {len(df) - max_rows} more rows_"
    return dg.MetadataValue.md(text)


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
    """A dict as a two-column markdown table."""
    frame = pd.DataFrame({"": list(values), "value": [str(v) for v in values.values()]})
    return dg.MetadataValue.md(frame.to_markdown(index=False))


def scalars(values: Mapping[str, Any]) -> dict[str, Any]:
    """The finite numbers and booleans of a row as metadata values (the rest left out)."""
    out: dict[str, Any] = {}
    for k, v in values.items():
        if isinstance(v, bool | np.bool_):
            out[k] = dg.MetadataValue.bool(bool(v))
        elif isinstance(v, int | np.integer):
            out[k] = dg.MetadataValue.int(int(v))
        elif isinstance(v, float | np.floating) and np.isfinite(v):
            out[k] = dg.MetadataValue.float(float(v))
    return out
