"""The round partitions shared by every round-scoped asset, job, schedule and sensor."""

from __future__ import annotations

import dagster as dg

ROUNDS_PARTITIONS_NAME = "rounds"

# Keys are round numbers in decimal, no padding ("301"), added as rounds appear in the source.
rounds_partitions = dg.DynamicPartitionsDefinition(name=ROUNDS_PARTITIONS_NAME)

# Every asset that opens the DuckDB file for writing runs in this pool; its limit is 1
# (dagster.yaml), so steps of parallel partitions never contend for DuckDB's single-writer lock.
WAREHOUSE_POOL = "duckdb_writers"


def round_of(context: dg.AssetExecutionContext | dg.AssetCheckExecutionContext) -> int:
    """The round number of the partition being materialized."""
    return int(context.partition_key)
