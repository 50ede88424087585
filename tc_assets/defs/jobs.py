"""The two round jobs: `score_round` (every round asset) and `ingest_round` (the inputs)."""

import dagster as dg

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
ingest_round = dg.define_asset_job(
    INGEST_ROUND_JOB,
    selection=dg.AssetSelection.groups(INGESTION_GROUP),
    partitions_def=rounds_partitions,
    description="Read, validate and warehouse one round's inputs.",
)

defs = dg.Definitions(jobs=[score_round, ingest_round])
