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
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import dagster as dg

from tc_assets.defs.automation.state import run_tags
from tc_assets.defs.definitions import SCORE_ROUND_JOB, PlatformPaths, build_definitions
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
) -> list[RoundOutcome]:
    """Add the rounds' partitions and run the score_round job for each, in order.

    Every round runs even if an earlier one failed; the outcomes say which failed and why.
    Progress goes to `echo`; with `log`, stdout and stderr of the runs (Dagster's debug log,
    dbt's output) are written there instead of the terminal.
    """
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
    if rounds is None:
        rounds = source.round_numbers()
        if not rounds:
            raise ValueError(f"no rounds found under {paths.source}/rounds/")
    keys = [str(r) for r in rounds]
    existing = set(instance.get_dynamic_partitions(ROUNDS_PARTITIONS_NAME))
    new = [k for k in keys if k not in existing]
    if new:
        instance.add_dynamic_partitions(ROUNDS_PARTITIONS_NAME, new)
    outcomes = []
    for key in keys:
        echo(f"round {key}: running {SCORE_ROUND_JOB} ...")
        start = time.perf_counter()
        tags = {"source": "cli"}
        # What the run reads, so that the daemon's changes sensor does not score it again; a
        # file that cannot be read is the run's to report.
        with contextlib.suppress(SourceError):
            tags |= run_tags(source, int(key))
        with _captured(log):
            result = job.execute_in_process(
                run_config=run_config,
                instance=instance,
                partition_key=key,
                raise_on_error=False,
                tags=tags,
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
        if outcome.success:
            note = (
                f", skipped (awaiting resolution): {', '.join(outcome.skipped)}"
                if outcome.skipped
                else ""
            )
            echo(f"round {key}: ok in {outcome.seconds:.1f}s{note}")
        else:
            failed = ", ".join(step for step, _ in outcome.failures)
            echo(
                f"round {key}: FAILED in {outcome.seconds:.1f}s (run {result.run_id}) at {failed}"
                + (f"; not run: {', '.join(outcome.skipped)}" if outcome.skipped else "")
            )
        outcomes.append(outcome)
    return outcomes
