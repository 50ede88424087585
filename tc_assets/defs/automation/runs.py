"""What Dagster knows of a round: the assets the automation requests, and its runs."""

from collections.abc import Iterable
from dataclasses import dataclass

import dagster as dg

from tc_assets.defs.automation.state import PARTITION_TAG
from tc_assets.defs.ingest import round_inputs
from tc_assets.defs.jobs import INGEST_ROUND_JOB, SCORE_ROUND_JOB

UNFINISHED = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.CANCELING,
]


@dataclass(frozen=True)
class RoundTargets:
    """The jobs and asset keys the automation requests, derived from the round assets."""

    ingest_job: str
    score_job: str
    ingestion: frozenset[dg.AssetKey]  # written by the round_inputs multi-asset
    # Every other round asset, resolved included. A resolution re-runs all of them, not only
    # what depends on targets: a step skipped while the round was unresolved (the dbt models
    # run as one step) may have left assets upstream of the targets unbuilt.
    scoring: tuple[dg.AssetKey, ...]

    @classmethod
    def from_keys(cls, round_keys: Iterable[dg.AssetKey]) -> "RoundTargets":
        """The targets of the two round jobs, given every round asset's key."""
        ingestion = frozenset(round_inputs.keys)
        scoring = tuple(sorted(set(round_keys) - ingestion))
        return cls(INGEST_ROUND_JOB, SCORE_ROUND_JOB, ingestion, scoring)

    @property
    def marker(self) -> dg.AssetKey:
        """The asset whose materialization means 'this round's inputs were ingested'."""
        return min(self.ingestion)

    def scored_too(self, run: dg.DagsterRun) -> bool:
        """Whether `run` (one that ingested a round) also ran every scoring asset."""
        if run.job_name != self.score_job:
            return False
        return not run.asset_selection or set(self.scoring) <= set(run.asset_selection)


def unfinished_runs(instance: dg.DagsterInstance) -> dict[str, dg.DagsterRun]:
    """Runs queued or in progress, by round partition."""
    runs = instance.get_runs(filters=dg.RunsFilter(statuses=UNFINISHED))
    return {run.tags[PARTITION_TAG]: run for run in runs if PARTITION_TAG in run.tags}


def rounds_in_flight(instance: dg.DagsterInstance) -> set[str]:
    """Round partitions with a run queued or in progress."""
    return set(unfinished_runs(instance))


def last_ingestion(
    instance: dg.DagsterInstance, targets: RoundTargets, key: str
) -> dg.RunRecord | None:
    """The run that wrote the round's current ingested inputs, None if never ingested."""
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=targets.marker, asset_partitions=[key]), limit=1
    ).records
    return instance.get_run_record_by_id(records[0].run_id) if records else None


def last_run(instance: dg.DagsterInstance, key: str) -> dg.DagsterRun | None:
    """The latest run of the round's partition, whatever its job and status."""
    runs = instance.get_runs(filters=dg.RunsFilter(tags={PARTITION_TAG: key}), limit=1)
    return runs[0] if runs else None


def run_created(instance: dg.DagsterInstance, run_id: str) -> float:
    """When the run was created (POSIX seconds), 0 when unknown."""
    record = instance.get_run_record_by_id(run_id)
    return record.create_timestamp.timestamp() if record is not None else 0.0
