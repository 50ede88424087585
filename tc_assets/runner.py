"""Run rounds through the Dagster definitions from the command line (`tc-platform run`).

Each round is one run of the `score_round` job on a persistent Dagster instance, so the runs,
their logs and materializations show in `make dev` afterwards. The same Definitions object as
the UI's is used: nothing is scored by a side path.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg

from tc_assets.defs.definitions import SCORE_ROUND_JOB, PlatformPaths, build_definitions
from tc_assets.defs.partitions import ROUNDS_PARTITIONS_NAME
from tc_assets.io.source import open_source

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


def _error_message(event: dg.DagsterEvent) -> str:
    error = getattr(event.event_specific_data, "error", None)
    if error is None:
        return event.message or "failed"
    # A dagster.Failure carries our readable description; show it rather than a stack trace.
    msg = error.message.strip()
    while error.cause is not None and "dagster._core.errors" in (error.cls_name or ""):
        error = error.cause
        msg = error.message.strip()
    return msg


def run_rounds(
    paths: PlatformPaths,
    rounds: Sequence[int] | None = None,
    instance: dg.DagsterInstance | None = None,
    echo: Callable[[str], None] = print,
) -> list[RoundOutcome]:
    """Add the rounds' partitions and run the score_round job for each, in order.

    Every round runs even if an earlier one failed; the outcomes say which failed and why.
    """
    defs = build_definitions(paths)
    job = defs.resolve_job_def(SCORE_ROUND_JOB)
    instance = instance or dg.DagsterInstance.get()
    if rounds is None:
        rounds = open_source(paths.source).round_numbers()
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
        result = job.execute_in_process(
            instance=instance, partition_key=key, raise_on_error=False, tags={"source": "cli"}
        )
        outcome = RoundOutcome(
            round=int(key),
            success=result.success,
            run_id=result.run_id,
            seconds=time.perf_counter() - start,
            failures=[
                (e.step_key or "?", _error_message(e))
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
            echo(f"round {key}: FAILED in {outcome.seconds:.1f}s (run {result.run_id})")
            for step, message in outcome.failures:
                echo(f"  step {step} failed: {message}")
        outcomes.append(outcome)
    return outcomes
