"""`new_round_sensor`: a new round in the source gets its partition and one ingestion run.

A new ``rounds/<R>/round.json`` whose round.json is valid and whose required files are present
gets its partition and one ``ingest_round`` run. The cursor lists the rounds already handled,
so a restarted daemon neither misses nor repeats one. A malformed, unreadable or incomplete
round is reported in the tick (log and skip reason) and looked at again next tick; it never
blocks the others.
"""

import json
from dataclasses import dataclass, field

import dagster as dg

from tc_assets.defs.automation.runs import RoundTargets
from tc_assets.defs.automation.settings import AutomationSettings
from tc_assets.defs.automation.state import (
    REASON_NEW_ROUND,
    TAG_INPUT_STAMP,
    TAG_REASON,
    input_stamp,
)
from tc_assets.defs.jobs import INGEST_ROUND_JOB
from tc_assets.defs.partitions import ROUNDS_PARTITIONS_NAME, rounds_partitions
from tc_assets.defs.resources import RoundSourceResource
from tc_assets.io import contract as c
from tc_assets.io.source import RoundSource, SourceError

REQUIRED_FILES = (c.LIVE_FILE, c.EXAMPLE_FILE, c.STAKES_FILE)


def round_problem(source: RoundSource, round_number: int) -> str | None:
    """Why the round cannot be ingested yet (unreadable, malformed, incomplete), or None."""
    rel = source.round_path(round_number, c.ROUND_FILE)
    try:
        if not source.exists(rel):
            return f"waiting for {c.ROUND_FILE}"
        c.validate_round_info(source.round_info(round_number), round_number)
        missing = [
            name
            for name in REQUIRED_FILES
            if not source.exists(source.round_path(round_number, name))
        ]
        if not source.exists(c.FEATURES_FILE):
            missing.append(f"{c.FEATURES_FILE} at the source's root")
    except SourceError as exc:
        return f"unreadable: {exc}"
    except c.RoundInputError as exc:
        return f"malformed: {exc}"
    return f"incomplete: waiting for {', '.join(missing)}" if missing else None


@dataclass
class _Tick:
    """What one evaluation found: requests, partitions to add, rounds adopted, problems."""

    known: set[int]
    requests: list[dg.RunRequest] = field(default_factory=list)
    added: list[str] = field(default_factory=list)
    adopted: list[int] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def _consider(
    context: dg.SensorEvaluationContext,
    source: RoundSource,
    r: int,
    tick: _Tick,
    partitions: set[str],
    ingested: set[str],
) -> None:
    """Add round r's partition and ingestion request to `tick`, or the reason it must wait."""
    problem = round_problem(source, r)
    if problem is not None:
        tick.problems.append(f"rounds/{r}: {problem}")
        context.log.warning(f"{source.uri}/rounds/{r} skipped for now, {problem}")
        return
    key = str(r)
    try:
        stamp = input_stamp(source, r)
    except SourceError as exc:
        tick.problems.append(f"rounds/{r}: unreadable: {exc}")
        return
    tick.known.add(r)
    if key not in partitions:
        tick.added.append(key)
    if key in ingested:  # e.g. by `tc-platform run` before the sensor ran: nothing to do
        tick.adopted.append(r)
        return
    tick.requests.append(
        dg.RunRequest(
            partition_key=key,
            # Run keys are remembered by Dagster for good: the files' stamp in the key lets
            # a round whose cursor entry was lost (a cursor reset) be ingested again.
            run_key=f"new-round-{key}-{stamp[:12]}",
            tags={TAG_REASON: REASON_NEW_ROUND, TAG_INPUT_STAMP: stamp},
        )
    )


def new_rounds(
    context: dg.SensorEvaluationContext, source: RoundSource, targets: RoundTargets
) -> dg.SensorResult:
    """The new-round sensor's evaluation: partitions and ingestion runs for new rounds."""
    tick = _Tick(known=set(json.loads(context.cursor)["rounds"]) if context.cursor else set())
    candidates = [r for r in source.round_numbers() if r not in tick.known]
    if not candidates:
        return dg.SensorResult(
            skip_reason=f"no new round in {source.uri} ({len(tick.known)} known)",
            cursor=context.cursor,
        )
    instance = context.instance
    partitions = set(instance.get_dynamic_partitions(ROUNDS_PARTITIONS_NAME))
    ingested = instance.get_materialized_partitions(targets.marker)
    for r in candidates:
        _consider(context, source, r, tick, partitions, ingested)
    if tick.requests:
        context.log.info(f"new rounds: {', '.join(r.partition_key or '' for r in tick.requests)}")
    if tick.adopted:
        context.log.info(f"rounds already ingested, now tracked: {tick.adopted}")
    skip = None
    if not tick.requests:
        skip = "; ".join(tick.problems) or f"rounds {tick.adopted} were already ingested"
    add = [rounds_partitions.build_add_request(tick.added)] if tick.added else []
    return dg.SensorResult(
        run_requests=tick.requests,
        skip_reason=skip,
        cursor=json.dumps({"rounds": sorted(tick.known)}),
        dynamic_partitions_requests=add,
    )


def build_new_round_sensor(
    targets: RoundTargets, settings: AutomationSettings
) -> dg.SensorDefinition:
    """The sensor, polling every `new_round_interval_s`."""

    @dg.sensor(
        name="new_round_sensor",
        job_name=INGEST_ROUND_JOB,
        minimum_interval_seconds=settings.new_round_interval_s,
        default_status=settings.sensor_status,
        description="Adds the partition of each new rounds/<R>/round.json in the source and "
        "ingests the round.",
    )
    def new_round_sensor(
        context: dg.SensorEvaluationContext, round_source: RoundSourceResource
    ) -> dg.SensorResult:
        return new_rounds(context, round_source.open(), targets)

    return new_round_sensor
