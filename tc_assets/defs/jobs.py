"""The two round jobs: `score_round` (every round asset) and `ingest_round` (the inputs)."""

import dagster as dg

from tc_assets.defs.ingest import CHECKS as INGESTION_CHECKS
from tc_assets.defs.ingest import GROUP as INGESTION_GROUP
from tc_assets.defs.partitions import rounds_partitions

SCORE_ROUND_JOB = "score_round"
INGEST_ROUND_JOB = "ingest_round"

score_round = dg.define_asset_job(
    SCORE_ROUND_JOB,
    selection=dg.AssetSelection.all(),
    partitions_def=rounds_partitions,
    description="Ingest and score one round: every round-partitioned asset.",
)
# The inputs and the ingestion's own checks, without dbt's tests of the ingested tables (checks
# of these assets too): those run once per round, in the scoring run's dbt build, so an
# ingestion does not start dbt.
ingest_round = dg.define_asset_job(
    INGEST_ROUND_JOB,
    selection=dg.AssetSelection.groups(INGESTION_GROUP).without_checks()
    | dg.AssetSelection.checks(*INGESTION_CHECKS),
    partitions_def=rounds_partitions,
    description="Read, validate and warehouse one round's inputs, with the ingestion checks.",
)

defs = dg.Definitions(jobs=[score_round, ingest_round])
