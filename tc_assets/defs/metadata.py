"""Small helpers that turn results into Dagster metadata a user reads in the UI."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import dagster as dg
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
