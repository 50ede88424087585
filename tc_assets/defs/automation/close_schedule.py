"""`round_close_schedule`: at each round close, ingest the rounds that just closed.

It fires on the close cadence (default Tuesday to Saturday, 13:00 UTC) and re-ingests each
round that closed within the look-back and has not been ingested since it closed: submissions
are final only at close.
"""

from datetime import UTC, datetime, timedelta

import dagster as dg

from tc_assets.defs.automation.runs import (
    RoundTargets,
    last_ingestion,
    run_created,
    unfinished_runs,
)
from tc_assets.defs.automation.settings import AutomationSettings
from tc_assets.defs.automation.state import (
    REASON_ROUND_CLOSED,
    TAG_INPUT_STAMP,
    TAG_REASON,
    close_time,
    input_stamp,
)
from tc_assets.defs.jobs import INGEST_ROUND_JOB
from tc_assets.defs.partitions import ROUNDS_PARTITIONS_NAME
from tc_assets.defs.resources import RoundSourceResource
from tc_assets.io.source import RoundSource


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _closed_in_window(
    source: RoundSource, window_start: float, tick_ts: float, notes: list[str]
) -> list[tuple[int, float]]:
    """(round, close time) of the rounds that closed in (window_start, tick_ts], oldest first.

    Rounds are read newest first and the scan stops at the first round that closed before the
    window; rounds still open or without a readable round.json are noted.
    """
    closed: list[tuple[int, float]] = []
    for r in sorted(source.round_numbers(), reverse=True):
        close = close_time(source, r)
        if close is None:
            notes.append(f"round {r}: round.json unreadable or malformed")
            continue
        if close > tick_ts:
            notes.append(f"round {r} closes at {_iso(close)}")
            continue
        if close <= window_start:
            break
        closed.append((r, close))
    return sorted(closed)


def _needs_ingestion(
    instance: dg.DagsterInstance,
    targets: RoundTargets,
    r: int,
    close: float,
    running: dg.DagsterRun | None,
    notes: list[str],
) -> bool:
    """Whether no ingestion of round r started after its close (else why, in `notes`)."""
    if running is not None and run_created(instance, running.run_id) > close:
        notes.append(f"round {r}: run {running.run_id[:8]} started after close is in progress")
        return False
    done = last_ingestion(instance, targets, str(r))
    if done is not None and (done.start_time or done.create_timestamp.timestamp()) > close:
        notes.append(f"round {r}: ingested after its close by run {done.dagster_run.run_id[:8]}")
        return False
    return True


def closed_rounds(
    context: dg.ScheduleEvaluationContext,
    source: RoundSource,
    targets: RoundTargets,
    settings: AutomationSettings,
) -> list[dg.RunRequest] | dg.SkipReason:
    """The close schedule's evaluation: ingestion runs for rounds that just closed.

    A round is due when it closed within `close_lookback_hours` before the tick and no
    ingestion of it started after its close.
    """
    tick_ts = (context.scheduled_execution_time or datetime.now(UTC)).timestamp()
    window_start = tick_ts - timedelta(hours=settings.close_lookback_hours).total_seconds()
    notes: list[str] = []
    closed = _closed_in_window(source, window_start, tick_ts, notes)
    window = f"between {_iso(window_start)} and {_iso(tick_ts)}"
    if not closed:
        return dg.SkipReason(
            f"no round closed {window}" + (f" ({'; '.join(notes)})" if notes else "")
        )
    instance = context.instance
    busy = unfinished_runs(instance)
    requests: list[dg.RunRequest] = []
    for r, close in closed:
        key = str(r)
        if not _needs_ingestion(instance, targets, r, close, busy.get(key), notes):
            continue
        if not instance.has_dynamic_partition(ROUNDS_PARTITIONS_NAME, key):
            instance.add_dynamic_partitions(ROUNDS_PARTITIONS_NAME, [key])
        tags = {TAG_REASON: REASON_ROUND_CLOSED, TAG_INPUT_STAMP: input_stamp(source, r)}
        requests.append(dg.RunRequest(partition_key=key, run_key=f"close-{key}", tags=tags))
    if not requests:
        return dg.SkipReason(f"rounds closed {window} need no ingestion: {'; '.join(notes)}")
    return requests


def build_close_schedule(
    targets: RoundTargets, settings: AutomationSettings
) -> dg.ScheduleDefinition:
    """The schedule on `round_close_cron` in `round_timezone`."""

    @dg.schedule(
        name="round_close_schedule",
        cron_schedule=settings.round_close_cron,
        execution_timezone=settings.round_timezone,
        job_name=INGEST_ROUND_JOB,
        default_status=settings.schedule_status,
        description=f"At each round close ({settings.round_close_cron}, "
        f"{settings.round_timezone}), ingest the rounds that just closed with their final "
        "submissions.",
    )
    def round_close_schedule(
        context: dg.ScheduleEvaluationContext, round_source: RoundSourceResource
    ):
        return closed_rounds(context, round_source.open(), targets, settings)

    return round_close_schedule
