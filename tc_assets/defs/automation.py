"""Automation: rounds are found, ingested and scored by the Dagster daemon, nobody clicking.

Three instigators, each with one job, so that a round never gets two runs for one cause:

* ``new_round_sensor`` watches ``rounds/<R>/round.json`` in the source. A new round whose
  round.json is valid and whose required files are present gets its partition and one
  ``ingest_round`` run. Its cursor lists the rounds already handled, so a restarted daemon
  neither misses nor repeats one. A malformed, unreadable or incomplete round is reported in
  the tick (log and skip reason) and looked at again next tick; it never blocks the others.
* ``round_close_schedule`` fires on the close cadence (default Tuesday to Saturday, 13:00 UTC)
  and re-ingests each round that closed within the look-back and has not been ingested since
  it closed: submissions are final only at close.
* ``round_changes_sensor`` scores closed, ingested rounds whenever the content of their input
  files differs from what they were last scored on: the first scoring after ingestion or a
  ``resolved.parquet`` that arrives or changes (every round asset but the ingested inputs),
  or any other input that changes (the whole round, ingestion included). Content is compared by hash
  (sha256 locally, the ETag on S3); sizes and times only decide when a file must be hashed
  again. Each round is one run of the ``score_round`` job; many rounds at once are many runs,
  which the run queue (dagster.yaml) admits a few at a time. A round with a run in progress is
  left alone until it ends, and a run that failed is not retried until its inputs change.

Every run they request carries tags saying why (``tc/reason``) and which input files it read
(``tc/input_stamp``); the changes sensor uses the latter to tell whether the last ingestion saw
today's files. Settings come from ``TC_*`` environment variables (``AutomationSettings``).
"""

import hashlib
import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import dagster as dg
from pydantic import BaseModel, Field, field_validator

from tc_assets.defs import ingest
from tc_assets.defs.partitions import ROUNDS_PARTITIONS_NAME, rounds_partitions
from tc_assets.defs.resources import RoundSourceResource
from tc_assets.io import contract as c
from tc_assets.io.s3_source import S3RoundSource
from tc_assets.io.source import LocalRoundSource, RoundSource, SourceError

if TYPE_CHECKING:  # what define_asset_job returns; not exported by dagster
    from dagster._core.definitions.unresolved_asset_job_definition import (
        UnresolvedAssetJobDefinition,
    )

TAG_REASON = "tc/reason"
TAG_INPUT_STAMP = "tc/input_stamp"
TAG_INPUTS = "tc/inputs"
TAG_RESOLVED = "tc/resolved"
PARTITION_TAG = "dagster/partition"  # set by Dagster on every run of one partition

REASON_NEW_ROUND = "new_round"
REASON_ROUND_CLOSED = "round_closed"
REASON_INGESTED = "ingested"  # ingested, never scored: score it
REASON_RESOLVED = "resolved"  # resolved.parquet arrived or changed
REASON_INPUTS_CHANGED = "inputs_changed"  # an input other than resolved.parquet changed

UNFINISHED = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.CANCELING,
]

# Files of rounds/<R>/ that ingestion reads (plus submissions and the root's features.json).
ROUND_INPUT_FILES = frozenset(
    {c.ROUND_FILE, c.LIVE_FILE, c.EXAMPLE_FILE, c.MARKET_FILE, c.STAKES_FILE, c.RESOLVED_FILE}
)
REQUIRED_FILES = (c.LIVE_FILE, c.EXAMPLE_FILE, c.STAKES_FILE)


class AutomationSettings(BaseModel, frozen=True):
    """The tournament's calendar and how often the daemon looks at the source.

    `from_env` reads each field from ``TC_<FIELD>`` (e.g. ``TC_ROUND_CLOSE_CRON``), so the
    code location picks them up from the environment of `dagster dev` or the daemon.
    """

    round_close_cron: str = Field(
        "0 13 * * 2-6",
        description="When rounds close, as a cron string in `round_timezone`; the close "
        "schedule's cadence. Default: Tuesday to Saturday at 13:00 (rounds open at 12:00).",
    )
    round_timezone: str = Field("UTC", description="IANA time zone of `round_close_cron`.")
    close_lookback_hours: float = Field(
        168.0,
        gt=0,
        description="How far back a schedule tick looks for closed rounds not ingested since "
        "they closed (a week covers the weekend gap and a missed tick or two).",
    )
    new_round_interval_s: int = Field(
        30, ge=1, description="Seconds between two looks of the new-round sensor."
    )
    round_changes_interval_s: int = Field(
        60, ge=1, description="Seconds between two looks of the round-changes sensor."
    )
    score_delay_s: float = Field(
        600.0,
        ge=0,
        description="Seconds after a round's close_time before the changes sensor scores it, "
        "so that the close schedule's re-ingestion goes first.",
    )
    hash_budget_s: float = Field(
        20.0,
        gt=0,
        description="Seconds one changes-sensor tick may spend hashing changed files; rounds "
        "left over are hashed on the next tick (a tick must end well within a minute).",
    )
    running_by_default: bool = Field(
        True,
        description="Start the schedule and sensors as soon as the code loads (no click in "
        "the UI); a status set in the UI overrides this.",
    )

    @field_validator("round_timezone")
    @classmethod
    def _known_timezone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown time zone {value!r}") from exc
        return value

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> "AutomationSettings":
        """Settings from ``TC_<FIELD NAME IN CAPITALS>`` variables; defaults for the rest."""
        values = {
            name: environ[f"TC_{name.upper()}"]
            for name in cls.model_fields
            if environ.get(f"TC_{name.upper()}", "") != ""
        }
        return cls.model_validate(values)


# --- what a round's files are ---------------------------------------------------------------


def _digest(items: Mapping[str, str]) -> str:
    h = hashlib.sha256()
    for rel in sorted(items):
        h.update(f"{rel}\t{items[rel]}\n".encode())
    return h.hexdigest()[:32]


def _is_round_input(rel: str, base: str) -> bool:
    """Whether ingestion reads the file at `rel` (a path from the source's root)."""
    if rel == c.FEATURES_FILE:
        return True
    if not rel.startswith(base + "/"):
        return False
    parts = rel[len(base) + 1 :].split("/")
    if len(parts) == 1:
        return parts[0] in ROUND_INPUT_FILES
    return (
        len(parts) == 2
        and parts[0] in (c.PREDICTIONS_DIR, c.PORTFOLIOS_DIR)
        and parts[1].endswith(c.SUBMISSION_SUFFIXES)
    )


def _local_stamps(source: LocalRoundSource, base: str) -> dict[str, str]:
    """size:mtime:ctime:inode of every file under rounds/<R>/ (one level of sub-folders) and
    features.json. Any write changes ctime (which, unlike mtime, cannot be set back), and a
    file replaced by a rename gets a new inode: a rewrite never keeps the stamp."""
    out: dict[str, str] = {}

    def add(path: Path, rel: str) -> None:
        st = path.stat()
        out[rel] = f"{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}"

    try:
        add(source.root / c.FEATURES_FILE, c.FEATURES_FILE)
        with os.scandir(source.root / base) as entries:
            for entry in entries:
                if entry.is_file():
                    add(Path(entry.path), f"{base}/{entry.name}")
                elif entry.is_dir():
                    with os.scandir(entry.path) as inner:
                        for sub in inner:
                            if sub.is_file():
                                add(Path(sub.path), f"{base}/{entry.name}/{sub.name}")
    except FileNotFoundError:
        pass  # a file or the round vanished meanwhile: the stamps say what is there now
    except OSError as exc:
        raise SourceError(f"{source.uri}/{base}: {exc.strerror or exc}") from exc
    return out


def round_stamps(source: RoundSource, round_number: int) -> dict[str, str]:
    """A change stamp for every file of the round that ingestion reads, keyed by path.

    Cheap: listings and stats, no reads. On S3 the stamp is the ETag (itself a content hash);
    locally it is size, modification and change times and inode, so a stamp that did not
    change means the file did not, and a changed stamp means the file must be hashed to know.
    """
    base = source.round_path(round_number)
    if isinstance(source, S3RoundSource):
        stamps = source.etags(base)
        if source.exists(c.FEATURES_FILE):
            stamps[c.FEATURES_FILE] = source.fingerprint(c.FEATURES_FILE)
    elif isinstance(source, LocalRoundSource):
        stamps = _local_stamps(source, base)
    else:
        raise TypeError(f"no change stamps for a {type(source).__name__}")
    return {rel: s for rel, s in stamps.items() if _is_round_input(rel, base)}


def _content_hashes(source: RoundSource, stamps: Mapping[str, str]) -> dict[str, str]:
    """Content hash by path: the ETag on S3 (the stamp itself), a file's sha256 locally."""
    if not isinstance(source, LocalRoundSource):
        return dict(stamps)
    return {rel: source.fingerprint(rel) for rel in stamps}


def _close_time(source: RoundSource, round_number: int) -> float | None:
    """close_time of the round (POSIX seconds), None when round.json is missing or invalid."""
    try:
        info = c.validate_round_info(source.round_info(round_number), round_number)
    except (SourceError, c.RoundInputError):
        return None
    return float(info["close_time"].timestamp())


@dataclass(frozen=True)
class RoundState:
    """One round's input files as the changes sensor last saw them."""

    input_stamp: str  # digest of the stamps of every input but resolved.parquet
    inputs: str  # digest of the content hashes of the same files
    resolved_stamp: str | None  # stamp of resolved.parquet, None while absent
    resolved: str | None  # content hash of resolved.parquet, None while absent
    close_time: float | None  # from round.json; None when it cannot be read

    @property
    def content(self) -> tuple[str, str | None]:
        return self.inputs, self.resolved

    def tags(self) -> dict[str, str]:
        """The run tags naming these files: their stamp and content hashes."""
        return {
            TAG_INPUT_STAMP: self.input_stamp,
            TAG_INPUTS: self.inputs,
            TAG_RESOLVED: self.resolved or "none",
        }

    @staticmethod
    def split(
        source: RoundSource, round_number: int, stamps: Mapping[str, str]
    ) -> tuple[dict[str, str], str, str | None]:
        """(stamps of the inputs but resolved.parquet, path of resolved, its stamp or None)."""
        resolved_rel = source.round_path(round_number, c.RESOLVED_FILE)
        inputs = {rel: s for rel, s in stamps.items() if rel != resolved_rel}
        return inputs, resolved_rel, stamps.get(resolved_rel)

    @classmethod
    def is_cached(
        cls,
        previous: "RoundState | None",
        source: RoundSource,
        round_number: int,
        stamps: Mapping[str, str],
    ) -> bool:
        """Whether `previous` already holds the content hashes for these stamps (no hashing)."""
        inputs, _, resolved_stamp = cls.split(source, round_number, stamps)
        return (
            previous is not None
            and previous.input_stamp == _digest(inputs)
            and previous.resolved_stamp == resolved_stamp
        )

    @classmethod
    def observe(
        cls,
        source: RoundSource,
        round_number: int,
        stamps: Mapping[str, str],
        previous: "RoundState | None" = None,
    ) -> "RoundState":
        """The round's state, hashing only the parts whose stamps changed since `previous`."""
        inputs, resolved_rel, resolved_stamp = cls.split(source, round_number, stamps)
        input_stamp = _digest(inputs)
        if previous is not None and previous.input_stamp == input_stamp:
            content, close = previous.inputs, previous.close_time
        else:
            content = _digest(_content_hashes(source, inputs))
            close = _close_time(source, round_number)
        if resolved_stamp is None:
            resolved = None
        elif previous is not None and previous.resolved_stamp == resolved_stamp:
            resolved = previous.resolved
        else:
            resolved = _content_hashes(source, {resolved_rel: resolved_stamp})[resolved_rel]
        return cls(input_stamp, content, resolved_stamp, resolved, close)


def run_tags(source: RoundSource, round_number: int) -> dict[str, str]:
    """Tags naming the files a run of the round reads now (stamp and content hashes): a full
    `score_round` run carrying them (`tc-platform run` adds them) is adopted by the changes
    sensor as scored on exactly these files, instead of being scored again."""
    return RoundState.observe(source, round_number, round_stamps(source, round_number)).tags()


def input_stamp(source: RoundSource, round_number: int) -> str:
    """The `tc/input_stamp` tag of a run that ingests the round now."""
    inputs, _, _ = RoundState.split(source, round_number, round_stamps(source, round_number))
    return _digest(inputs)


# --- what Dagster knows of a round ----------------------------------------------------------


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
    def from_assets(
        cls, ingest_job: str, score_job: str, round_assets: Sequence[dg.AssetsDefinition]
    ) -> "RoundTargets":
        keys = {k for a in round_assets for k in a.keys}
        ingestion = frozenset(ingest.round_inputs.keys)
        return cls(ingest_job, score_job, ingestion, tuple(sorted(keys - ingestion)))

    @property
    def marker(self) -> dg.AssetKey:
        """The asset whose materialization means 'this round's inputs were ingested'."""
        return min(self.ingestion)

    def scored_too(self, run: dg.DagsterRun) -> bool:
        """Whether `run` (one that ingested a round) also ran every scoring asset."""
        if run.job_name != self.score_job:
            return False
        return not run.asset_selection or set(self.scoring) <= set(run.asset_selection)


def rounds_in_flight(instance: dg.DagsterInstance) -> set[str]:
    """Round partitions with a run queued or in progress."""
    runs = instance.get_runs(filters=dg.RunsFilter(statuses=UNFINISHED))
    return {run.tags[PARTITION_TAG] for run in runs if PARTITION_TAG in run.tags}


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


# --- new rounds -----------------------------------------------------------------------------


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


def _parse_rounds_cursor(cursor: str | None) -> set[int]:
    return set(json.loads(cursor)["rounds"]) if cursor else set()


def new_rounds(
    context: dg.SensorEvaluationContext, source: RoundSource, targets: RoundTargets
) -> dg.SensorResult:
    """The new-round sensor's evaluation: partitions and ingestion runs for new rounds."""
    known = _parse_rounds_cursor(context.cursor)
    candidates = [r for r in source.round_numbers() if r not in known]
    if not candidates:
        return dg.SensorResult(
            skip_reason=f"no new round in {source.uri} ({len(known)} known)", cursor=context.cursor
        )
    instance = context.instance
    partitions = set(instance.get_dynamic_partitions(ROUNDS_PARTITIONS_NAME))
    ingested = instance.get_materialized_partitions(targets.marker)
    requests: list[dg.RunRequest] = []
    added: list[str] = []
    adopted: list[int] = []
    problems: list[str] = []
    for r in candidates:
        problem = round_problem(source, r)
        if problem is not None:
            problems.append(f"rounds/{r}: {problem}")
            context.log.warning(f"{source.uri}/rounds/{r} skipped for now, {problem}")
            continue
        key = str(r)
        try:
            stamp = input_stamp(source, r)
        except SourceError as exc:
            problems.append(f"rounds/{r}: unreadable: {exc}")
            continue
        known.add(r)
        if key not in partitions:
            added.append(key)
        if key in ingested:  # e.g. by `tc-platform run` before the sensor ran: nothing to do
            adopted.append(r)
            continue
        requests.append(
            dg.RunRequest(
                partition_key=key,
                # Run keys are remembered by Dagster for good: the files' stamp in the key lets
                # a round whose cursor entry was lost (a cursor reset) be ingested again.
                run_key=f"new-round-{key}-{stamp[:12]}",
                tags={TAG_REASON: REASON_NEW_ROUND, TAG_INPUT_STAMP: stamp},
            )
        )
    if requests:
        context.log.info(f"new rounds: {', '.join(r.partition_key or '' for r in requests)}")
    if adopted:
        context.log.info(f"rounds already ingested, now tracked: {adopted}")
    skip = None
    if not requests:
        skip = "; ".join(problems) or f"rounds {adopted} were already ingested"
    return dg.SensorResult(
        run_requests=requests,
        skip_reason=skip,
        cursor=json.dumps({"rounds": sorted(known)}),
        dynamic_partitions_requests=[rounds_partitions.build_add_request(added)] if added else [],
    )


# --- the close schedule ---------------------------------------------------------------------


def closed_rounds(
    context: dg.ScheduleEvaluationContext,
    source: RoundSource,
    targets: RoundTargets,
    settings: AutomationSettings,
) -> list[dg.RunRequest] | dg.SkipReason:
    """The close schedule's evaluation: ingestion runs for rounds that just closed.

    A round is due when it closed within `close_lookback_hours` before the tick and no
    ingestion of it started after its close. Rounds are read newest first and the scan stops
    at the first round that closed before the look-back window.
    """
    tick = context.scheduled_execution_time or datetime.now(UTC)
    tick_ts = tick.timestamp()
    window_start = tick_ts - timedelta(hours=settings.close_lookback_hours).total_seconds()
    closed: list[tuple[int, float]] = []
    notes: list[str] = []
    for r in sorted(source.round_numbers(), reverse=True):
        close = _close_time(source, r)
        if close is None:
            notes.append(f"round {r}: round.json unreadable or malformed")
            continue
        if close > tick_ts:
            notes.append(f"round {r} closes at {_iso(close)}")
            continue
        if close <= window_start:
            break
        closed.append((r, close))
    window = f"between {_iso(window_start)} and {_iso(tick_ts)}"
    if not closed:
        return dg.SkipReason(
            f"no round closed {window}" + (f" ({'; '.join(notes)})" if notes else "")
        )

    instance = context.instance
    busy = {
        run.tags.get(PARTITION_TAG): run
        for run in instance.get_runs(filters=dg.RunsFilter(statuses=UNFINISHED))
    }
    requests: list[dg.RunRequest] = []
    for r, close in sorted(closed):
        key = str(r)
        running = busy.get(key)
        if running is not None and _run_created(instance, running.run_id) > close:
            notes.append(f"round {r}: run {running.run_id[:8]} started after close is in progress")
            continue
        done = last_ingestion(instance, targets, key)
        if done is not None and (done.start_time or done.create_timestamp.timestamp()) > close:
            notes.append(
                f"round {r}: ingested after its close by run {done.dagster_run.run_id[:8]}"
            )
            continue
        if not instance.has_dynamic_partition(ROUNDS_PARTITIONS_NAME, key):
            instance.add_dynamic_partitions(ROUNDS_PARTITIONS_NAME, [key])
        requests.append(
            dg.RunRequest(
                partition_key=key,
                run_key=f"close-{key}",
                tags={TAG_REASON: REASON_ROUND_CLOSED, TAG_INPUT_STAMP: input_stamp(source, r)},
            )
        )
    if not requests:
        return dg.SkipReason(f"rounds closed {window} need no ingestion: {'; '.join(notes)}")
    return requests


def _run_created(instance: dg.DagsterInstance, run_id: str) -> float:
    record = instance.get_run_record_by_id(run_id)
    return record.create_timestamp.timestamp() if record is not None else 0.0


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- changed rounds -------------------------------------------------------------------------


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
    deadline = time.monotonic() + settings.hash_budget_s
    busy = rounds_in_flight(instance)
    requests: list[dg.RunRequest] = []
    notes: list[str] = []
    deferred = hashed = 0
    keys = instance.get_dynamic_partitions(ROUNDS_PARTITIONS_NAME)
    strays = [k for k in keys if not c.ROUND_DIR_PATTERN.fullmatch(k)]
    if strays:  # added by hand in the UI: not a round of the source
        notes.append(f"partitions that are not round numbers ignored: {strays}")
    for key in sorted((k for k in keys if k not in strays), key=int):
        if key in busy:
            continue
        r = int(key)
        previous = cursor.seen.get(key)
        try:
            stamps = round_stamps(source, r)
            if not RoundState.is_cached(previous, source, r, stamps):
                if hashed and time.monotonic() > deadline:  # at least one round per tick
                    deferred += 1
                    continue
                hashed += 1
            state = RoundState.observe(source, r, stamps, previous)
        except SourceError as exc:
            notes.append(f"round {r}: {exc}")
            context.log.warning(f"round {r} not checked: {exc}")
            continue
        cursor.seen[key] = state
        if state.close_time is None or now < state.close_time + settings.score_delay_s:
            continue  # open, or closed too recently, or without a valid round.json
        request = _scoring_request(instance, targets, cursor, key, state)
        if request is not None:
            requests.append(request)
    if deferred:
        notes.append(f"{deferred} rounds left to hash on the next tick")
        context.log.info(notes[-1])
    for req in requests:
        context.log.info(
            f"round {req.partition_key}: {req.tags[TAG_REASON]} -> "
            + (f"{len(req.asset_selection)} assets" if req.asset_selection else "every asset")
        )
    skip = None if requests else ("; ".join(notes) or "every closed round is scored on its inputs")
    return dg.SensorResult(run_requests=requests, skip_reason=skip, cursor=cursor.dumps())


def _scoring_request(
    instance: dg.DagsterInstance,
    targets: RoundTargets,
    cursor: ChangesCursor,
    key: str,
    state: RoundState,
) -> dg.RunRequest | None:
    """The run a closed round needs now that it looks like `state`, or None."""
    scored = cursor.scored_content(key)
    if scored == state.content:
        return None
    ingestion = last_ingestion(instance, targets, key)
    if ingestion is None:
        # Never ingested: the new-round sensor or the schedule ingests it. If its last attempt
        # failed on other files than today's, ingest and score it again now.
        last = last_run(instance, key)
        if last is None or last.tags.get(TAG_INPUT_STAMP) == state.input_stamp:
            return None
        reason, selection = REASON_INPUTS_CHANGED, None
    else:
        run = ingestion.dagster_run
        stamp = run.tags.get(TAG_INPUT_STAMP)
        today = state.tags()
        read_today = all(run.tags.get(k) == today[k] for k in (TAG_INPUTS, TAG_RESOLVED))
        if scored is None and targets.scored_too(run) and read_today:
            # Ingested and scored by one full run on today's files (`tc-platform run` tags
            # them): adopt it. A run that does not say what it read (one launched in the UI)
            # is scored again once, so that no change since is missed.
            cursor.mark_scored(key, state)
            return None
        if scored is not None and scored[0] == state.inputs:  # only resolved.parquet moved
            reason, selection = REASON_RESOLVED, list(targets.scoring)
        elif stamp == state.input_stamp:  # the last ingestion read today's files
            reason, selection = REASON_INGESTED, list(targets.scoring)
        else:
            reason, selection = REASON_INPUTS_CHANGED, None  # re-ingest and score everything
    count = cursor.mark_scored(key, state)
    return dg.RunRequest(
        partition_key=key,
        # Unique per content and request: after a cursor reset (count restarts) a request for
        # content not scored before still gets a new key, so Dagster does not drop it.
        run_key=f"changes-{key}-{count}-{state.inputs[:12]}-{(state.resolved or 'none')[:12]}",
        asset_selection=selection,
        tags={TAG_REASON: reason, **state.tags()},
    )


# --- definitions ----------------------------------------------------------------------------


def build_automation(
    ingest_job: "UnresolvedAssetJobDefinition",
    score_job: "UnresolvedAssetJobDefinition",
    round_assets: Sequence[dg.AssetsDefinition],
    settings: AutomationSettings | None = None,
) -> tuple[list[dg.ScheduleDefinition], list[dg.SensorDefinition]]:
    """The close schedule and the two sensors, targeting the given jobs."""
    settings = settings or AutomationSettings.from_env()
    targets = RoundTargets.from_assets(ingest_job.name, score_job.name, round_assets)
    running = settings.running_by_default
    sensor_status = dg.DefaultSensorStatus.RUNNING if running else dg.DefaultSensorStatus.STOPPED
    schedule_status = (
        dg.DefaultScheduleStatus.RUNNING if running else dg.DefaultScheduleStatus.STOPPED
    )

    @dg.schedule(
        name="round_close_schedule",
        cron_schedule=settings.round_close_cron,
        execution_timezone=settings.round_timezone,
        job=ingest_job,
        default_status=schedule_status,
        description=f"At each round close ({settings.round_close_cron}, "
        f"{settings.round_timezone}), ingest the rounds that just closed with their final "
        "submissions.",
    )
    def round_close_schedule(
        context: dg.ScheduleEvaluationContext, round_source: RoundSourceResource
    ):
        return closed_rounds(context, round_source.open(), targets, settings)

    @dg.sensor(
        name="new_round_sensor",
        job=ingest_job,
        minimum_interval_seconds=settings.new_round_interval_s,
        default_status=sensor_status,
        description="Adds the partition of each new rounds/<R>/round.json in the source and "
        "ingests the round.",
    )
    def new_round_sensor(
        context: dg.SensorEvaluationContext, round_source: RoundSourceResource
    ) -> dg.SensorResult:
        return new_rounds(context, round_source.open(), targets)

    @dg.sensor(
        name="round_changes_sensor",
        job=score_job,
        minimum_interval_seconds=settings.round_changes_interval_s,
        default_status=sensor_status,
        description="Scores each closed, ingested round whose input files (resolved.parquet "
        "included) differ by content from what it was last scored on.",
    )
    def round_changes_sensor(
        context: dg.SensorEvaluationContext, round_source: RoundSourceResource
    ) -> dg.SensorResult:
        return changed_rounds(context, round_source.open(), targets, settings)

    return [round_close_schedule], [new_round_sensor, round_changes_sensor]
