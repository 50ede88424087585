"""Compact run progress for the command line: a Dagster logger of the code location.

The logger is part of the Definitions (so a run that `tc-platform run` starts has the same job
snapshot as the UI's) and is created only for runs whose config names it. It prints one line
per finished or failed step, every failed check and the assets' own messages (not Dagster's
debug events) through the function set by `echo_to` (the terminal by default).
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable, Iterator

import dagster as dg

PROGRESS_LOGGER = "progress"

# dagster-dbt narrates every dbt node and test: that stays in the log file and the UI; the
# step's line and its failures still show.
CHATTY_STEPS = frozenset({"dbt_metrics"})


def _stdout(line: str) -> None:
    print(line, file=sys.__stdout__, flush=True)


_echo: Callable[[str], None] = _stdout


@contextlib.contextmanager
def echo_to(echo: Callable[[str], None]) -> Iterator[None]:
    """Send the progress lines of runs in this process to `echo` within the block."""
    global _echo
    saved, _echo = _echo, echo
    try:
        yield
    finally:
        _echo = saved


def error_message(event: dg.DagsterEvent) -> str:
    """A failed step's own message: a `dg.Failure`'s description, else the innermost error of
    the user code (not Dagster's wrapping errors)."""
    error = getattr(event.event_specific_data, "error", None)
    if error is None:
        return event.message or "failed"
    while error.cause is not None and "dagster._core.errors" in (error.cls_name or ""):
        error = error.cause
    msg = error.message.strip()
    if error.cls_name == "Failure":
        msg = msg.split(": ", 1)[-1]  # "dagster._core.definitions.events.Failure: <ours>"
    return msg


class ProgressHandler(logging.Handler):
    """Echoes finished and failed steps, failed checks and the assets' own messages."""

    def __init__(self, chatty: frozenset[str] = CHATTY_STEPS) -> None:
        super().__init__(level=logging.DEBUG)
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
                _echo(f"  {step}: {message}")
            return
        kind = event.event_type
        if kind == dg.DagsterEventType.STEP_SUCCESS:
            seconds = event.event_specific_data.duration_ms / 1000.0
            _echo(f"  {step:<48} ok {seconds:6.1f}s")
        elif kind == dg.DagsterEventType.STEP_FAILURE:
            _echo(f"  {step:<48} FAILED: {error_message(event)}")
        elif kind == dg.DagsterEventType.ASSET_CHECK_EVALUATION:
            check = event.event_specific_data
            if not check.passed:
                _echo(
                    f"  check {check.check_name} on {check.asset_key.to_user_string()} did not "
                    f"pass ({check.severity.value}): {check.description}"
                )


def _create(_: dg.InitLoggerContext) -> logging.Logger:
    logger = logging.Logger("tc_platform_progress", level=logging.DEBUG)
    logger.addHandler(ProgressHandler())
    return logger


progress_logger = dg.LoggerDefinition(
    _create, description="One line per finished step, failed checks (tc-platform run)."
)
