"""The round partitions shared by every round-scoped asset, job, schedule and sensor, and the
decorator, partition key and failure every round asset uses."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import dagster as dg
import pandas as pd

from tc_assets.defs.metadata import metadata_table

ROUNDS_PARTITIONS_NAME = "rounds"

# Keys are round numbers in decimal, no padding ("301"), added as rounds appear in the source.
rounds_partitions = dg.DynamicPartitionsDefinition(name=ROUNDS_PARTITIONS_NAME)

# Every asset that opens the DuckDB file for writing runs in this pool; its limit is 1
# (dagster.yaml), so steps of parallel partitions never contend for DuckDB's single-writer lock.
WAREHOUSE_POOL = "duckdb_writers"

# An asset of round R that also reads earlier rounds' rows (a window of rounds ending at R)
# carries this tag and records its window under WINDOW_METADATA_KEY: the window-refresh sensor
# runs it again when a round of its window is scored again after it.
WINDOW_TAG_KEY = "tc/window"
WINDOW_TAGS = {WINDOW_TAG_KEY: "earlier-rounds"}
WINDOW_METADATA_KEY = "window"


def window_label(rounds: Sequence[int]) -> str:
    """The window's metadata value: "first-last", empty when no round is in it."""
    return f"{min(rounds)}-{max(rounds)}" if len(rounds) else ""


def window_first(label: str | None) -> int | None:
    """The first round of a window_label, None when unknown or empty."""
    first, sep, _ = (label or "").partition("-")
    return int(first) if sep and first.isdigit() else None


def round_asset(
    *, group: str, kinds: set[str], **kwargs: Any
) -> Callable[[Callable[..., Any]], dg.AssetsDefinition]:
    """`dg.asset` for an asset of one round that writes the warehouse: partitioned by round,
    in the writers' pool, in `group` with `kinds`; other `dg.asset` arguments pass through."""
    return dg.asset(
        partitions_def=rounds_partitions,
        group_name=group,
        pool=WAREHOUSE_POOL,
        kinds=kinds,
        **kwargs,
    )


def round_of(context: dg.AssetExecutionContext | dg.AssetCheckExecutionContext) -> int:
    """The round number of the partition being materialized."""
    return int(context.partition_key)


def round_failure(r: int, error: Exception | str, **metadata: Any) -> dg.Failure:
    """A failure of round r's step that retrying cannot mend (a bad input, a problem without a
    solution): its message in the UI and the CLI, no retry. Raise it `from None`: the cause is
    not a bug, its stack trace would only bury the message. The offending rows of a file
    (`RoundInputError.rows`) go to the metadata as a table."""
    rows = getattr(error, "rows", None)
    if rows:
        metadata["bad_rows"] = metadata_table(pd.DataFrame(rows), max_rows=50)
    return dg.Failure(
        description=str(error), metadata={"round": r, **metadata}, allow_retries=False
    )
