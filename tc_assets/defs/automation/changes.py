"""`round_changes_sensor`: score each closed, ingested round whose inputs changed.

It scores closed, ingested rounds whenever the content of their input files differs from what
they were last scored on: the first scoring after ingestion or a ``resolved.parquet`` that
arrives or changes (every round asset but the ingested inputs), or any other input that changes
(the whole round, ingestion included). Content is compared by hash (sha256 locally, the ETag on
S3); sizes and times only decide when a file must be hashed again. Each round is one run of the
``score_round`` job; many rounds at once are many runs, which the run queue (dagster.yaml)
admits a few at a time. A round with a run in progress is left alone until it ends, and a run
that failed is not retried until its inputs change.
"""

import json
import time
from dataclasses import asdict, dataclass, field

import dagster as dg

from tc_assets.defs.automation.runs import (
    RoundTargets,
    last_ingestion,
    last_run,
    rounds_in_flight,
)
from tc_assets.defs.automation.settings import AutomationSettings
from tc_assets.defs.automation.state import (
    REASON_INGESTED,
    REASON_INPUTS_CHANGED,
    REASON_RESOLVED,
    TAG_INPUT_STAMP,
    TAG_INPUTS,
    TAG_REASON,
    TAG_RESOLVED,
    RoundState,
)
from tc_assets.defs.jobs import SCORE_ROUND_JOB
from tc_assets.defs.partitions import ROUNDS_PARTITIONS_NAME
from tc_assets.defs.resources import RoundSourceResource
from tc_assets.io import contract as c
from tc_assets.io.source import RoundSource, SourceError


@dataclass
class ChangesCursor:
    """The changes sensor's memory: what each round looked like, and what it was scored on."""

    seen: dict[str, RoundState] = field(default_factory=dict)
    # round -> [inputs, resolved, requests so far] as of the last scoring request (or adoption)
    scored: dict[str, list] = field(default_factory=dict)

    @classmethod
    def loads(cls, text: str | None) -> "ChangesCursor":
        if not text:
            return cls()
        doc = json.loads(text)
        return cls(
            seen={k: RoundState(**v) for k, v in doc.get("seen", {}).items()},
            scored=doc.get("scored", {}),
        )

    def dumps(self) -> str:
        return json.dumps(
            {"seen": {k: asdict(v) for k, v in self.seen.items()}, "scored": self.scored},
            separators=(",", ":"),
            sort_keys=True,
        )

    def scored_content(self, key: str) -> tuple[str, str | None] | None:
        entry = self.scored.get(key)
        return (entry[0], entry[1]) if entry else None

    def mark_scored(self, key: str, state: RoundState) -> int:
        """Record the content a run is requested for; return that request's number."""
        count = (self.scored.get(key) or [None, None, 0])[2] + 1
        self.scored[key] = [state.inputs, state.resolved, count]
        return count


@dataclass
class _HashBudget:
    """How much hashing one tick may still do: at least one round, then until the deadline."""

    deadline: float
    hashed: int = 0
    deferred: int = 0

    def allows(self, cached: bool) -> bool:
        if cached:
            return True
        if self.hashed and time.monotonic() > self.deadline:
            self.deferred += 1
            return False
        self.hashed += 1
        return True


def _round_keys(instance: dg.DagsterInstance, notes: list[str]) -> list[str]:
    """The round partitions in round order; keys that are not round numbers are noted."""
    keys = instance.get_dynamic_partitions(ROUNDS_PARTITIONS_NAME)
    strays = [k for k in keys if not c.ROUND_DIR_PATTERN.fullmatch(k)]
    if strays:  # added by hand in the UI: not a round of the source
        notes.append(f"partitions that are not round numbers ignored: {strays}")
    return sorted((k for k in keys if k not in strays), key=int)


def _observe(
    context: dg.SensorEvaluationContext,
    source: RoundSource,
    cursor: ChangesCursor,
    key: str,
    budget: _HashBudget,
    notes: list[str],
) -> RoundState | None:
    """The round's state now (recorded in the cursor), None when it cannot be read this tick."""
    r = int(key)
    previous = cursor.seen.get(key)
    try:
        stamps = source.round_stamps(r)
        if not budget.allows(RoundState.is_cached(previous, source, r, stamps)):
            return None
        state = RoundState.observe(source, r, stamps, previous)
    except SourceError as exc:
        notes.append(f"round {r}: {exc}")
        context.log.warning(f"round {r} not checked: {exc}")
        return None
    cursor.seen[key] = state
    return state


def changed_rounds(
    context: dg.SensorEvaluationContext,
    source: RoundSource,
    targets: RoundTargets,
    settings: AutomationSettings,
    now: float | None = None,
) -> dg.SensorResult:
    """The changes sensor's evaluation: one scoring run per round whose inputs changed."""
    cursor = ChangesCursor.loads(context.cursor)
    instance = context.instance
    now = time.time() if now is None else now
    budget = _HashBudget(deadline=time.monotonic() + settings.hash_budget_s)
    busy = rounds_in_flight(instance)
    requests: list[dg.RunRequest] = []
    notes: list[str] = []
    for key in _round_keys(instance, notes):
        state = None if key in busy else _observe(context, source, cursor, key, budget, notes)
        if state is None or state.close_time is None:
            continue  # busy, unreadable, deferred, or without a valid round.json
        if now < state.close_time + settings.score_delay_s:
            continue  # open, or closed too recently
        request = _scoring_request(instance, targets, cursor, key, state)
        if request is not None:
            requests.append(request)
    if budget.deferred:
        notes.append(f"{budget.deferred} rounds left to hash on the next tick")
        context.log.info(notes[-1])
    for req in requests:
        context.log.info(
            f"round {req.partition_key}: {req.tags[TAG_REASON]} -> "
            + (f"{len(req.asset_selection)} assets" if req.asset_selection else "every asset")
        )
    skip = None if requests else ("; ".join(notes) or "every closed round is scored on its inputs")
    return dg.SensorResult(run_requests=requests, skip_reason=skip, cursor=cursor.dumps())


def _what_to_run(
    instance: dg.DagsterInstance,
    targets: RoundTargets,
    cursor: ChangesCursor,
    key: str,
    state: RoundState,
) -> tuple[str, list[dg.AssetKey] | None] | None:
    """(reason, asset selection or None for the whole job) the round needs now, or None."""
    scored = cursor.scored_content(key)
    ingestion = last_ingestion(instance, targets, key)
    if ingestion is None:
        # Never ingested: the new-round sensor or the schedule ingests it. If its last attempt
        # failed on other files than today's, ingest and score it again now.
        last = last_run(instance, key)
        if last is None or last.tags.get(TAG_INPUT_STAMP) == state.input_stamp:
            return None
        return REASON_INPUTS_CHANGED, None
    run = ingestion.dagster_run
    today = state.tags()
    read_today = all(run.tags.get(k) == today[k] for k in (TAG_INPUTS, TAG_RESOLVED))
    if scored is None and targets.scored_too(run) and read_today:
        # Ingested and scored by one full run on today's files (`tc-platform run` tags them):
        # adopt it. A run that does not say what it read (one launched in the UI) is scored
        # again once, so that no change since is missed.
        cursor.mark_scored(key, state)
        return None
    if scored is not None and scored[0] == state.inputs:  # only resolved.parquet moved
        return REASON_RESOLVED, list(targets.scoring)
    if run.tags.get(TAG_INPUT_STAMP) == state.input_stamp:  # the last ingestion read today's
        return REASON_INGESTED, list(targets.scoring)
    return REASON_INPUTS_CHANGED, None  # re-ingest and score everything


def _scoring_request(
    instance: dg.DagsterInstance,
    targets: RoundTargets,
    cursor: ChangesCursor,
    key: str,
    state: RoundState,
) -> dg.RunRequest | None:
    """The run a closed round needs now that it looks like `state`, or None."""
    if cursor.scored_content(key) == state.content:
        return None
    what = _what_to_run(instance, targets, cursor, key, state)
    if what is None:
        return None
    reason, selection = what
    count = cursor.mark_scored(key, state)
    return dg.RunRequest(
        partition_key=key,
        # Unique per content and request: after a cursor reset (count restarts) a request for
        # content not scored before still gets a new key, so Dagster does not drop it.
        run_key=f"changes-{key}-{count}-{state.inputs[:12]}-{(state.resolved or 'none')[:12]}",
        asset_selection=selection,
        tags={TAG_REASON: reason, **state.tags()},
    )


def build_changes_sensor(
    targets: RoundTargets, settings: AutomationSettings
) -> dg.SensorDefinition:
    """The sensor, polling every `round_changes_interval_s`."""

    @dg.sensor(
        name="round_changes_sensor",
        job_name=SCORE_ROUND_JOB,
        minimum_interval_seconds=settings.round_changes_interval_s,
        default_status=settings.sensor_status,
        description="Scores each closed, ingested round whose input files (resolved.parquet "
        "included) differ by content from what it was last scored on.",
    )
    def round_changes_sensor(
        context: dg.SensorEvaluationContext, round_source: RoundSourceResource
    ) -> dg.SensorResult:
        return changed_rounds(context, round_source.open(), targets, settings)

    return round_changes_sensor
