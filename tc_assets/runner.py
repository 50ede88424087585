"""Run rounds through the Dagster definitions from the command line (`tc-platform run`).

Each round is one run of the `score_round` job on a persistent Dagster instance, created as the
UI creates one (the code location's origin and job snapshot, see `CodeLocation`) and executed
in this process: the runs, their logs and materializations show in `make dev` afterwards under
the job, in the timeline and the partitions, and re-execute from there. The same Definitions
as the UI's are used: nothing is scored by a side path.

The terminal gets one line per finished step (with its time), every warning, every failed
check and, per round, what failed and why. Dagster's full debug log, dbt's output and library
warnings go to a log file instead (and, as for any run, to the run's logs in the UI).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import dagster as dg
from dagster._core.code_pointer import ModuleCodePointer
from dagster._core.definitions.reconstruct import ReconstructableJob, ReconstructableRepository
from dagster._core.errors import DagsterExecutionInterruptedError
from dagster._core.execution.api import execute_run
from dagster._core.remote_origin import (
    ManagedGrpcPythonEnvCodeLocationOrigin,
    RemoteRepositoryOrigin,
)
from dagster._core.storage.dagster_run import DagsterRun, DagsterRunStatus
from dagster._core.storage.tags import MAX_RETRIES_TAG, PARTITION_NAME_TAG
from dagster._core.types.loadable_target_origin import LoadableTargetOrigin
from dagster._core.utils import make_new_run_id

from tc_assets.defs.automation.state import run_tags
from tc_assets.defs.definitions import (
    CODE_LOCATION,
    DEFINITIONS_ATTRIBUTE,
    DEFINITIONS_MODULE,
    REPOSITORY_NAME,
    SCORE_ROUND_JOB,
    PlatformPaths,
)
from tc_assets.defs.env import environment
from tc_assets.defs.liveness import (
    PoolWatch,
    RunGuardSettings,
    free_finished_holders,
    interrupt_thread,
    process_tag,
    reap_dead_runs,
)
from tc_assets.defs.partitions import ROUNDS_PARTITIONS_NAME, set_writer_slots
from tc_assets.defs.progress import PROGRESS_LOGGER, echo_to, error_message
from tc_assets.defs.resources import RoundSourceResource
from tc_assets.io import lake
from tc_assets.io.source import SourceError

INSTANCE_CONFIG = Path(__file__).resolve().parent / "dagster.yaml"


@dataclass
class RoundOutcome:
    """What happened to one round's run."""

    round: int
    success: bool
    run_id: str
    seconds: float
    failures: list[tuple[str, str]] = field(default_factory=list)  # (step, message)
    skipped: list[str] = field(default_factory=list)
    stopped: str | None = None  # why no further round ran: a signal's name, or a pool give-up


class _Stop:
    """Ctrl-C, SIGTERM or a pool give-up: the run in progress ends, no further round starts.

    Runs execute in a worker thread, so that the signals reach these handlers in the main
    thread rather than Dagster's (which, in the main thread, would act on them only inside a
    step). A signal marks the run in progress canceling (so it ends CANCELED) and interrupts
    its thread; between runs it stops the loop at once."""

    def __init__(self, instance: dg.DagsterInstance) -> None:
        self.instance = instance
        self.run_id: str | None = None
        self.worker: threading.Thread | None = None
        self.reason: str | None = None
        self.gave_up: str | None = None

    def give_up(self, message: str) -> None:
        self.gave_up = message

    def handler(self, signum: int, _frame: object) -> None:
        self.reason = signal.Signals(signum).name
        worker = self.worker
        if worker is None or not worker.is_alive():
            raise DagsterExecutionInterruptedError(self.reason)
        run = self.instance.get_run_by_id(self.run_id) if self.run_id else None
        if run is not None and not run.is_finished:
            self.instance.report_run_canceling(run, f"{self.reason} received: canceling the run")
        interrupt_thread(worker.ident)

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """SIGINT and SIGTERM handled as above in the block (main thread only)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        saved = {s: signal.signal(s, self.handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in saved.items():
                signal.signal(s, h)

    def execute(self, run: Callable[[], dg.JobExecutionResult]) -> dg.JobExecutionResult:
        """`run()` in a worker thread, the main thread free for the signal handlers."""
        box: dict[str, object] = {}

        def work() -> None:
            try:
                box["result"] = run()
            except BaseException as exc:  # noqa: BLE001  (re-raised in the caller's thread)
                box["error"] = exc

        self.worker = threading.Thread(target=work, name="tc-run")
        self.worker.start()
        try:
            while self.worker.is_alive():
                self.worker.join(0.2)
        finally:
            self.worker = None
        if "error" in box:
            raise box["error"]  # type: ignore[misc]
        return box["result"]  # type: ignore[return-value]


def parse_rounds(spec: str) -> list[int]:
    """'301-305', '301', or '301,303,310-312' -> sorted unique round numbers."""
    rounds: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise ValueError(f"bad round range {part!r}: expected A, A-B or a comma list")
        a, b = int(m.group(1)), int(m.group(2) or m.group(1))
        if b < a:
            raise ValueError(f"bad round range {part!r}: end before start")
        rounds.update(range(a, b + 1))
    if not rounds or min(rounds) < 1:
        raise ValueError("round numbers start at 1")
    return sorted(rounds)


def ensure_dagster_home(default: Path) -> Path:
    """Use $DAGSTER_HOME, or `default`; give it the project's dagster.yaml if it has none."""
    home = Path(os.environ.get("DAGSTER_HOME") or default).expanduser().resolve()
    home.mkdir(parents=True, exist_ok=True)
    if INSTANCE_CONFIG.exists() and not (home / "dagster.yaml").exists():
        shutil.copy(INSTANCE_CONFIG, home / "dagster.yaml")
    os.environ["DAGSTER_HOME"] = str(home)
    return home


@contextlib.contextmanager
def _captured(log: TextIO | None) -> Iterator[None]:
    """Send stdout and stderr (Dagster's console log, dbt, warnings) to `log` in the block."""
    if log is None:
        yield
        return
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        yield


def _failed_checks(events: Sequence[dg.DagsterEvent]) -> dict[str, str]:
    """Step key of each failed ERROR check -> its description (why a blocking check failed)."""
    out: dict[str, str] = {}
    for event in events:
        if event.event_type != dg.DagsterEventType.ASSET_CHECK_EVALUATION:
            continue
        check = event.event_specific_data
        if not check.passed and check.severity == dg.AssetCheckSeverity.ERROR:
            out[event.step_key or "?"] = f"check {check.check_name}: {check.description}"
    return out


def _run_events(instance: dg.DagsterInstance, run_id: str) -> list[dg.DagsterEvent]:
    """The Dagster events of a run, from the instance's event log."""
    return [
        entry.dagster_event
        for entry in instance.all_logs(run_id)
        if entry.dagster_event is not None
    ]


class CodeLocation:
    """The platform's code location as the UI loads it (workspace.yaml), for runs that the
    command line executes in its own process.

    A run created here carries the location's origin (so the UI lists it under the job, in the
    timeline and the partitions, and re-executes it without a version warning) and the job
    snapshot of the same Definitions, built from the environment as the UI builds them
    (TC_SOURCE, TC_WAREHOUSE, TC_STORAGE and, for a lake, TC_LAKE_DATA_PATH are set to the
    run's paths while the location is open).
    """

    def __init__(self, paths: PlatformPaths, instance: dg.DagsterInstance) -> None:
        self.paths = paths
        self.instance = instance
        target = LoadableTargetOrigin(
            executable_path=sys.executable,
            module_name=DEFINITIONS_MODULE,
            attribute=DEFINITIONS_ATTRIBUTE,
            working_directory=os.getcwd(),
        )
        origin = ManagedGrpcPythonEnvCodeLocationOrigin(target, location_name=CODE_LOCATION)
        self.repository_origin = RemoteRepositoryOrigin(origin, REPOSITORY_NAME)
        pointer = ModuleCodePointer(DEFINITIONS_MODULE, DEFINITIONS_ATTRIBUTE, os.getcwd())
        self.repository = ReconstructableRepository(pointer, executable_path=sys.executable)

    def environment(self) -> contextlib.AbstractContextManager[None]:
        """The paths as the code location reads them (PlatformPaths.from_env)."""
        p = self.paths
        values = {"TC_SOURCE": p.source, "TC_WAREHOUSE": p.warehouse, "TC_STORAGE": p.storage}
        if p.lake_data:
            values[lake.DATA_PATH_ENV] = p.lake_data
        return environment(values)

    def create_run(
        self,
        job_name: str,
        partition: str,
        run_config: Mapping[str, Any],
        tags: Mapping[str, str],
        run_id: str | None = None,
    ) -> tuple[ReconstructableJob, DagsterRun]:
        """A run of `job_name` for `partition`, created on the instance as the UI creates one
        (not started: `execute_run` runs it)."""
        # Dagster keeps the last job definition per pointer (lru_cache); it was built from the
        # paths of the location opened before this one, so it is built again from these.
        ReconstructableJob.get_definition.cache_clear()
        ReconstructableJob.get_repository_definition.cache_clear()
        job = self.repository.get_reconstructable_job(job_name)
        job_def = job.get_definition()
        run = self.instance.create_run_for_job(
            job_def,
            run_id=run_id,
            run_config=run_config,
            tags={**job_def.run_tags, **tags, PARTITION_NAME_TAG: partition},
            status=DagsterRunStatus.NOT_STARTED,
            remote_job_origin=self.repository_origin.get_job_origin(job_name),
            job_code_origin=job.get_python_origin(),
        )
        return job, run


def run_rounds(
    paths: PlatformPaths,
    rounds: Sequence[int] | None = None,
    instance: dg.DagsterInstance | None = None,
    echo: Callable[[str], None] = print,
    log: TextIO | None = None,
    guard: RunGuardSettings | None = None,
) -> list[RoundOutcome]:
    """Add the rounds' partitions and run the score_round job for each, in order.

    Each run is created against the code location (see `CodeLocation`) and executed in this
    process. Every round runs even if an earlier one failed; the outcomes say which failed and
    why.
    Progress goes to `echo`; with `log`, stdout and stderr of the runs (Dagster's debug log,
    dbt's output) are written there instead of the terminal.

    Before each round, runs whose process is gone are marked failed and their pool slots freed.
    A step waiting for the writers' pool says so and gives up after `guard.pool_wait_s`.
    Ctrl-C or SIGTERM cancels the run in progress and starts no further round; so does a
    give-up (the last outcome's `stopped` says why). The instance's writers' pool gets the
    backend's limit (partitions.set_writer_slots: more than 1 on a lake).
    """
    guard = guard or RunGuardSettings()
    out = sys.stdout

    def say(line: str) -> None:  # to the terminal even while the run's output is captured
        with contextlib.redirect_stdout(out):
            echo(line)

    run_config = {"loggers": {PROGRESS_LOGGER: {}, "console": {"config": {"log_level": "DEBUG"}}}}
    instance = instance or dg.DagsterInstance.get()
    set_writer_slots(instance, paths.warehouse)
    source = RoundSourceResource.for_uri(paths.source).open()
    if not paths.source.startswith("s3://") and not Path(paths.source).is_dir():
        raise ValueError(f"source {paths.source} is not a folder")
    available = source.round_numbers()
    if rounds is None:
        rounds = available
        if not rounds:
            raise ValueError(f"no rounds found under {paths.source}/rounds/")
    missing = sorted(set(rounds) - set(available))
    if missing:  # checked before any partition is added: no partition for a round that is not
        raise ValueError(
            f"round(s) {', '.join(map(str, missing))} not found under {paths.source}/rounds/"
        )
    keys = [str(r) for r in rounds]
    existing = set(instance.get_dynamic_partitions(ROUNDS_PARTITIONS_NAME))
    new = [k for k in keys if k not in existing]
    if new:
        instance.add_dynamic_partitions(ROUNDS_PARTITIONS_NAME, new)
    outcomes: list[RoundOutcome] = []
    stop = _Stop(instance)
    location = CodeLocation(paths, instance)
    with stop.installed(), location.environment(), echo_to(say):
        for key in keys:
            if stop.reason or stop.gave_up:
                break
            try:
                outcomes.append(
                    _run_round(location, key, source, run_config, stop, guard, say, echo, log)
                )
            except DagsterExecutionInterruptedError:  # a signal between two runs
                break
    if stop.reason or stop.gave_up:
        left = keys[len(outcomes) :]
        why = f"{stop.reason} received" if stop.reason else "gave up waiting for the pool"
        if outcomes:
            outcomes[-1].stopped = stop.reason or "pool"
        echo(f"stopped ({why}); rounds not started: {', '.join(left) or 'none'}")
    return outcomes


def _run_round(
    location: CodeLocation,
    key: str,
    source,
    run_config: dict,
    stop: _Stop,
    guard: RunGuardSettings,
    say: Callable[[str], None],
    echo: Callable[[str], None],
    log: TextIO | None,
) -> RoundOutcome:
    """One round's run, watched (pool waits, signals); its outcome, echoed."""
    instance = location.instance
    for run_id in reap_dead_runs(instance):
        echo(f"run {run_id}: its process is gone; marked failed, its pool slots freed")
    for run_id in free_finished_holders(instance):
        echo(f"run {run_id}: finished; the pool slots it still held are freed")
    echo(f"round {key}: running {SCORE_ROUND_JOB} ...")
    start = time.perf_counter()
    # A run started here is run again from here: the daemon's run retries leave it alone.
    run_id = make_new_run_id()
    tags = {"source": "cli", MAX_RETRIES_TAG: "0", **process_tag(run_id)}
    # What the run reads, so that the daemon's changes sensor does not score it again; a
    # file that cannot be read is the run's to report.
    with contextlib.suppress(SourceError):
        tags |= run_tags(source, int(key))
    stop.run_id = run_id

    def execute() -> dg.JobExecutionResult:
        with PoolWatch(
            instance,
            run_id,
            lambda m: say(f"  {m}"),
            stop.give_up,
            guard,
            run_thread=threading.get_ident(),
        ):
            job, run = location.create_run(SCORE_ROUND_JOB, key, run_config, tags, run_id)
            return execute_run(job, run, instance)

    with _captured(log):
        try:
            result = stop.execute(execute)
        except DagsterExecutionInterruptedError:
            result = None  # interrupted before Dagster's own handling began
    stop.run_id = None
    if result is None:
        return RoundOutcome(
            round=int(key),
            success=False,
            run_id=run_id,
            seconds=time.perf_counter() - start,
            failures=[("?", stop.gave_up or f"{stop.reason}: canceled")],
        )
    events = _run_events(instance, run_id)
    checks = _failed_checks(events)
    outcome = RoundOutcome(
        round=int(key),
        success=result.success,
        run_id=run_id,
        seconds=time.perf_counter() - start,
        failures=[
            (e.step_key or "?", checks.get(e.step_key or "?") or error_message(e))
            for e in events
            if e.event_type == dg.DagsterEventType.STEP_FAILURE
        ],
        skipped=[
            e.step_key or "?" for e in events if e.event_type == dg.DagsterEventType.STEP_SKIPPED
        ],
    )
    if stop.gave_up:
        outcome.failures = [(step, stop.gave_up) for step, _ in outcome.failures] or [
            ("?", stop.gave_up)
        ]
    if outcome.success:
        note = (
            f", skipped (awaiting resolution): {', '.join(outcome.skipped)}"
            if outcome.skipped
            else ""
        )
        echo(f"round {key}: ok in {outcome.seconds:.1f}s{note}")
    elif stop.reason:
        echo(f"round {key}: canceled ({stop.reason}) after {outcome.seconds:.1f}s (run {run_id})")
    else:
        failed = ", ".join(step for step, _ in outcome.failures)
        echo(
            f"round {key}: FAILED in {outcome.seconds:.1f}s (run {run_id}) at {failed}"
            + (f"; not run: {', '.join(outcome.skipped)}" if outcome.skipped else "")
        )
    return outcome
