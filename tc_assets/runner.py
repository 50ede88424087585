"""Run rounds through the Dagster definitions from the command line (`tc-platform run`).

Each round is one run of the `score_round` job on a persistent Dagster instance, so the runs,
their logs and materializations show in `make dev` afterwards. The same Definitions object as
the UI's is used: nothing is scored by a side path.

The terminal gets one line per finished step (with its time), every warning, every failed
check and, per round, what failed and why. Dagster's full debug log, dbt's output and library
warnings go to a log file instead (and, as for any run, to the run's logs in the UI).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import dagster as dg
from dagster._core.errors import DagsterExecutionInterruptedError
from dagster._core.storage.tags import MAX_RETRIES_TAG
from dagster._core.utils import make_new_run_id

from tc_assets.defs.automation.state import run_tags
from tc_assets.defs.definitions import SCORE_ROUND_JOB, PlatformPaths, build_definitions
from tc_assets.defs.liveness import (
    PoolWatch,
    RunGuardSettings,
    free_finished_holders,
    interrupt_thread,
    process_tag,
    reap_dead_runs,
)
from tc_assets.defs.partitions import ROUNDS_PARTITIONS_NAME
from tc_assets.defs.resources import RoundSourceResource
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

    def execute(self, run: Callable[[], dg.ExecuteInProcessResult]) -> dg.ExecuteInProcessResult:
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


class _ProgressHandler(logging.Handler):
    """Echoes what an operator watching a run needs: finished and failed steps, failed checks,
    and the assets' own messages (not Dagster's debug events)."""

    def __init__(self, echo: Callable[[str], None], chatty: frozenset[str] = frozenset()) -> None:
        super().__init__(level=logging.DEBUG)
        self.echo = echo
        self.chatty = chatty  # steps whose own messages are echoed from ERROR up only

    def emit(self, record: logging.LogRecord) -> None:
        meta = getattr(record, "dagster_meta", None) or {}
        step = meta.get("step_key") or ""
        event = meta.get("dagster_event")
        if event is None:
            message = str(meta.get("orig_message", record.getMessage()))
            # The engine's "Dependencies for step ... Not executing." lines are left out (the
            # failed step is named already); anything else logged in a step is the asset's.
            level = logging.ERROR if step in self.chatty else logging.INFO
            if record.levelno >= level and step and not message.startswith("Dependencies"):
                self.echo(f"  {step}: {message}")
            return
        kind = event.event_type
        if kind == dg.DagsterEventType.STEP_SUCCESS:
            seconds = event.event_specific_data.duration_ms / 1000.0
            self.echo(f"  {step:<48} ok {seconds:6.1f}s")
        elif kind == dg.DagsterEventType.STEP_FAILURE:
            self.echo(f"  {step:<48} FAILED: {_error_message(event)}")
        elif kind == dg.DagsterEventType.ASSET_CHECK_EVALUATION:
            check = event.event_specific_data
            if not check.passed:
                self.echo(
                    f"  check {check.check_name} on {check.asset_key.to_user_string()} did not "
                    f"pass ({check.severity.value}): {check.description}"
                )


# dagster-dbt narrates every dbt node and test (and warns about each source test it logs as an
# observation): that stays in the log file and the UI; the step's line and failures still show.
CHATTY_STEPS = frozenset({"dbt_metrics"})


def progress_logger(echo: Callable[[str], None]) -> dg.LoggerDefinition:
    """A Dagster logger that prints compact progress through `echo` (see _ProgressHandler)."""

    def create(_: dg.InitLoggerContext) -> logging.Logger:
        logger = logging.Logger("tc_platform_progress", level=logging.DEBUG)
        logger.addHandler(_ProgressHandler(echo, CHATTY_STEPS))
        return logger

    return dg.LoggerDefinition(create, description="Compact progress for tc-platform run.")


@contextlib.contextmanager
def _captured(log: TextIO | None) -> Iterator[None]:
    """Send stdout and stderr (Dagster's console log, dbt, warnings) to `log` in the block."""
    if log is None:
        yield
        return
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        yield


def _error_message(event: dg.DagsterEvent) -> str:
    error = getattr(event.event_specific_data, "error", None)
    if error is None:
        return event.message or "failed"
    # A dagster.Failure carries our readable description; show it rather than a stack trace.
    while error.cause is not None and "dagster._core.errors" in (error.cls_name or ""):
        error = error.cause
    msg = error.message.strip()
    if error.cls_name == "Failure":
        msg = msg.split(": ", 1)[-1]  # "dagster._core.definitions.events.Failure: <ours>"
    return msg


def _failed_checks(result: dg.ExecuteInProcessResult) -> dict[str, str]:
    """Step key of each failed ERROR check -> its description (why a blocking check failed)."""
    out: dict[str, str] = {}
    for event in result.all_events:
        if event.event_type != dg.DagsterEventType.ASSET_CHECK_EVALUATION:
            continue
        check = event.event_specific_data
        if not check.passed and check.severity == dg.AssetCheckSeverity.ERROR:
            out[event.step_key or "?"] = f"check {check.check_name}: {check.description}"
    return out


def run_rounds(
    paths: PlatformPaths,
    rounds: Sequence[int] | None = None,
    instance: dg.DagsterInstance | None = None,
    echo: Callable[[str], None] = print,
    log: TextIO | None = None,
    guard: RunGuardSettings | None = None,
) -> list[RoundOutcome]:
    """Add the rounds' partitions and run the score_round job for each, in order.

    Every round runs even if an earlier one failed; the outcomes say which failed and why.
    Progress goes to `echo`; with `log`, stdout and stderr of the runs (Dagster's debug log,
    dbt's output) are written there instead of the terminal.

    Before each round, runs whose process is gone are marked failed and their pool slots freed.
    A step waiting for the writers' pool says so and gives up after `guard.pool_wait_s`.
    Ctrl-C or SIGTERM cancels the run in progress and starts no further round; so does a
    give-up (the last outcome's `stopped` says why).
    """
    guard = guard or RunGuardSettings()
    out = sys.stdout

    def say(line: str) -> None:  # to the terminal even while the run's output is captured
        with contextlib.redirect_stdout(out):
            echo(line)

    loggers = {**dg.default_loggers(), "progress": progress_logger(say)}
    defs = build_definitions(paths, loggers=loggers)
    job = defs.resolve_job_def(SCORE_ROUND_JOB)
    run_config = {"loggers": {"progress": {}, "console": {"config": {"log_level": "DEBUG"}}}}
    instance = instance or dg.DagsterInstance.get()
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
    with stop.installed():
        for key in keys:
            if stop.reason or stop.gave_up:
                break
            try:
                outcomes.append(
                    _run_round(job, key, instance, source, run_config, stop, guard, say, echo, log)
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
    job: dg.JobDefinition,
    key: str,
    instance: dg.DagsterInstance,
    source,
    run_config: dict,
    stop: _Stop,
    guard: RunGuardSettings,
    say: Callable[[str], None],
    echo: Callable[[str], None],
    log: TextIO | None,
) -> RoundOutcome:
    """One round's run, watched (pool waits, signals); its outcome, echoed."""
    for run_id in reap_dead_runs(instance):
        echo(f"run {run_id}: its process is gone; marked failed, its pool slots freed")
    for run_id in free_finished_holders(instance):
        echo(f"run {run_id}: finished; the pool slots it still held are freed")
    echo(f"round {key}: running {SCORE_ROUND_JOB} ...")
    start = time.perf_counter()
    # A run started here is run again from here: the daemon's run retries leave it alone.
    tags = {"source": "cli", MAX_RETRIES_TAG: "0", **process_tag()}
    # What the run reads, so that the daemon's changes sensor does not score it again; a
    # file that cannot be read is the run's to report.
    with contextlib.suppress(SourceError):
        tags |= run_tags(source, int(key))
    run_id = make_new_run_id()
    stop.run_id = run_id

    def execute() -> dg.ExecuteInProcessResult:
        with PoolWatch(
            instance,
            run_id,
            lambda m: say(f"  {m}"),
            stop.give_up,
            guard,
            run_thread=threading.get_ident(),
        ):
            return job.execute_in_process(
                run_config=run_config,
                instance=instance,
                partition_key=key,
                raise_on_error=False,
                tags=tags,
                run_id=run_id,
            )

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
    checks = _failed_checks(result)
    outcome = RoundOutcome(
        round=int(key),
        success=result.success,
        run_id=result.run_id,
        seconds=time.perf_counter() - start,
        failures=[
            (e.step_key or "?", checks.get(e.step_key or "?") or _error_message(e))
            for e in result.all_events
            if e.event_type == dg.DagsterEventType.STEP_FAILURE
        ],
        skipped=[
            e.step_key or "?"
            for e in result.all_events
            if e.event_type == dg.DagsterEventType.STEP_SKIPPED
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
            f"round {key}: FAILED in {outcome.seconds:.1f}s (run {result.run_id}) at {failed}"
            + (f"; not run: {', '.join(outcome.skipped)}" if outcome.skipped else "")
        )
    return outcome
