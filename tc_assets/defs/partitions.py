"""The round partitions shared by every round-scoped asset, job, schedule and sensor, and the
decorator, partition key and failure every round asset uses."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import dagster as dg
import pandas as pd

from tc_assets.defs.metadata import metadata_table
from tc_assets.io import lake

ROUNDS_PARTITIONS_NAME = "rounds"

# Keys are round numbers in decimal, no padding ("301"), added as rounds appear in the source.
rounds_partitions = dg.DynamicPartitionsDefinition(name=ROUNDS_PARTITIONS_NAME)

# Every asset that writes the warehouse runs in this pool. On the DuckDB file its limit is 1
# (dagster.yaml), so steps of parallel partitions never contend for DuckDB's single-writer lock;
# on a lake it is raised to TC_WAREHOUSE_WRITERS (default LAKE_WRITERS) and rounds write at once.
WAREHOUSE_POOL = "duckdb_writers"
WRITERS_ENV = "TC_WAREHOUSE_WRITERS"
LAKE_WRITERS = 4


def writer_slots(warehouse: str) -> int:
    """The writers' pool limit for a warehouse location: 1 for a DuckDB file or a lake whose
    catalog is a DuckDB file (one process at a time, whatever the environment says);
    TC_WAREHOUSE_WRITERS (default 4) for a lake on a PostgreSQL catalog."""
    if not (lake.is_lake(warehouse) and lake.many_writers(warehouse)):
        return 1
    value = os.environ.get(WRITERS_ENV, str(LAKE_WRITERS))
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{WRITERS_ENV} must be a positive integer, got {value!r}")
    return int(value)


def set_writer_slots(instance: dg.DagsterInstance, warehouse: str) -> int:
    """Give the instance's writers' pool the limit of `warehouse`; returns it. On the DuckDB
    file the instance's limit is left as configured unless an earlier lake run raised it."""
    slots = writer_slots(warehouse)
    storage = instance.event_log_storage
    if slots > 1 or storage.get_concurrency_info(WAREHOUSE_POOL).slot_count > 1:
        storage.set_concurrency_slots(WAREHOUSE_POOL, slots)
    return slots


# An asset of round R that also reads earlier rounds' rows (a window of rounds ending at R)
# carries this tag and records its window under WINDOW_METADATA_KEY: the window-refresh sensor
# runs it again when a round of its window is scored again after it.
WINDOW_TAG_KEY = "tc/window"
WINDOW_TAGS = {WINDOW_TAG_KEY: "earlier-rounds"}
WINDOW_METADATA_KEY = "window"


def window_label(rounds: Sequence[int], size: int) -> str:
    """The window's metadata value: "first-last" when it holds its full `size` rounds (the last
    `size` rounds with data up to its end); "up to last" when it holds fewer, as an earlier
    round that gains data later joins it; empty when no round is in it."""
    if not len(rounds):
        return ""
    if len(rounds) < size:
        return f"up to {max(rounds)}"
    return f"{min(rounds)}-{max(rounds)}"


def window_first(label: str | None) -> int | None:
    """The first round of a full window's label; None (every earlier round may belong to it)
    for a window not full, an empty one, or none recorded."""
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
