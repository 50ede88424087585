"""Runs whose process is gone, and steps waiting for a pool slot.

A run killed with SIGKILL (or by the OOM killer) cannot report its own end: Dagster keeps it
STARTED and keeps the `duckdb_writers` slot its step held, so every later writer step would wait
for it forever. Each run that executes steps therefore records its process in a tag
(``tc/process``: host, pid and the process's start time, so a reused pid is not mistaken for
it). A run in progress whose process no longer exists on this host is *dead*: it is marked
failed and its pool slots are freed (`reap_dead_runs`). `tc-platform run` does this before each
round, a step waiting for a slot does it for the runs holding the slots, and the daemon's
``dead_runs_sensor`` does it on a timer.

`PoolWatch` watches a run while it executes: a step waiting for a slot is reported once (on
what, since when, held by which run), and after ``pool_wait_s`` the run gives up with a message
naming the blocking run and how to clear it (``tc-platform unblock RUN_ID``).
"""

from __future__ import annotations

import ctypes
import os
import socket
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg
from dagster._core.errors import DagsterExecutionInterruptedError
from dagster._core.execution.context.system import PlanOrchestrationContext
from dagster._core.execution.plan.plan import ExecutionPlan
from dagster._core.execution.retries import RetryMode, get_retries_config
from dagster._core.executor.in_process import InProcessExecutor
from dagster._utils.interrupts import check_captured_interrupt
from pydantic import BaseModel, Field

from tc_assets.defs.partitions import WAREHOUSE_POOL

TAG_PROCESS = "tc/process"
# The run the process tag was recorded for: a retry inherits its parent's tags, and the
# parent's process (gone) must not make the retry look dead before it records its own.
TAG_PROCESS_RUN = "tc/process_run"
IN_PROGRESS = [
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.CANCELING,
]


class RunGuardSettings(BaseModel, frozen=True):
    """How long a step waits for a pool slot, and how often the wait is checked."""

    pool_wait_s: float = Field(
        default=1800.0,
        gt=0,
        description="Seconds a step waits for a slot of the writers' pool before its run gives "
        "up, naming the run that holds the slot.",
    )
    poll_s: float = Field(
        default=0.5,
        gt=0,
        description="Seconds between two looks at the pool and at a pending Ctrl-C or SIGTERM.",
    )


def _start_ticks(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux /proc), None when it is gone
    or a zombie; "?" where /proc does not exist (then only the pid is compared)."""
    stat = Path("/proc") / str(pid) / "stat"
    if not Path("/proc/self/stat").exists():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return "?"
    try:
        fields = stat.read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else fields[19]


def process_tag(run_id: str, pid: int | None = None) -> dict[str, str]:
    """The tags of run `run_id` executing in process `pid` (default: this one)."""
    pid = os.getpid() if pid is None else pid
    return {
        TAG_PROCESS: f"{socket.gethostname()}/{pid}/{_start_ticks(pid)}",
        TAG_PROCESS_RUN: run_id,
    }


def recorded_process(run: dg.DagsterRun) -> str | None:
    """The run's ``tc/process`` tag if it was recorded for this run (not inherited)."""
    return run.tags.get(TAG_PROCESS) if run.tags.get(TAG_PROCESS_RUN) == run.run_id else None


def process_gone(tag: str | None) -> bool:
    """Whether the process a ``tc/process`` tag names has exited. False when the tag is absent
    or names another host: only a process of this machine can be checked."""
    if not tag:
        return False
    try:
        host, pid, ticks = tag.rsplit("/", 2)
        number = int(pid)
    except ValueError:
        return False
    if host != socket.gethostname():
        return False
    now = _start_ticks(number)
    return now is None or (ticks != "?" and now != "?" and now != ticks)


def describe_run(instance: dg.DagsterInstance, run_id: str) -> str:
    """`run <id> (<status>, round <R>, process <host/pid>)` for messages."""
    run = instance.get_run_by_id(run_id)
    if run is None:
        return f"run {run_id} (no longer in the instance)"
    parts = [run.status.value.lower()]
    if "dagster/partition" in run.tags:
        parts.append(f"round {run.tags['dagster/partition']}")
    if tag := recorded_process(run):
        host, pid, _ = tag.rsplit("/", 2)
        parts.append(f"pid {pid} on {host}")
    return f"run {run_id} ({', '.join(parts)})"


def release_run(instance: dg.DagsterInstance, run_id: str, reason: str) -> bool:
    """Mark a run in progress failed with `reason` and free every pool slot it holds.

    Returns whether the run was in progress (a finished run only has its slots freed)."""
    run = instance.get_run_by_id(run_id)
    changed = False
    if run is not None and run.status in IN_PROGRESS:
        instance.report_run_failed(run, reason)
        changed = True
    instance.event_log_storage.free_concurrency_slots_for_run(run_id)
    return changed


def reap_dead_runs(instance: dg.DagsterInstance, run_ids: list[str] | None = None) -> list[str]:
    """Fail every run in progress (of `run_ids`, default all) whose process is gone, and free
    its pool slots. Returns the ids of the runs reaped."""
    in_progress = instance.get_runs(dg.RunsFilter(statuses=IN_PROGRESS, run_ids=run_ids or None))
    reaped = []
    for run in in_progress:
        tag = recorded_process(run)
        if process_gone(tag):
            pid = tag.rsplit("/", 2)[1] if tag else "?"
            release_run(
                instance,
                run.run_id,
                f"The run's process (pid {pid}) is gone: killed or crashed while the run was in "
                "progress. Marked failed and its pool slots freed.",
            )
            reaped.append(run.run_id)
    return reaped


def free_finished_holders(
    instance: dg.DagsterInstance, run_ids: list[str] | None = None
) -> list[str]:
    """Free the pool slots still held by finished runs (of `run_ids`, default all), and drop
    their steps still queued for a slot: a run worker that died after Dagster marked its run
    failed never released them, and a slot the pool assigned to such a step is held for good."""
    holders = instance.event_log_storage.get_concurrency_run_ids()
    if run_ids is not None:
        holders &= set(run_ids)
    if not holders:
        return []
    finished = [
        run.run_id
        for run in instance.get_runs(dg.RunsFilter(run_ids=sorted(holders)))
        if run.is_finished
    ]
    for run_id in finished:
        instance.event_log_storage.free_concurrency_slots_for_run(run_id)
    return finished


def interrupt_thread(ident: int | None = None) -> None:
    """Raise DagsterExecutionInterruptedError in thread `ident` (default: the main thread),
    where a run executes, at its next Python instruction.

    Dagster's run execution captures SIGINT and SIGTERM in the main thread and acts on them
    only inside a step: its in-process loop waiting for a pool slot never looks, so a signal
    alone cannot stop a waiting run. This ends the run as Dagster's own interruption does
    (canceled when the run is marked canceling first)."""
    target = threading.main_thread().ident if ident is None else ident
    ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(target), ctypes.py_object(DagsterExecutionInterruptedError)
    )


class PoolWatch:
    """A thread beside a run executing in this process (in thread `run_thread`, default the
    main thread).

    While a step of the run waits for a slot of the writers' pool it reaps dead runs among the
    slot holders, says once what it waits for (`notify`), and after `settings.pool_wait_s`
    calls `notify` and `give_up` with a message naming the blocking run, then interrupts the
    run. A Ctrl-C or SIGTERM that Dagster captured in the main thread while no step was running
    is acted on: the run is interrupted.
    """

    def __init__(
        self,
        instance: dg.DagsterInstance,
        run_id: str,
        notify: Callable[[str], None],
        give_up: Callable[[str], None] = lambda _: None,
        settings: RunGuardSettings | None = None,
        run_thread: int | None = None,
        pool: str = WAREHOUSE_POOL,
    ) -> None:
        self.instance = instance
        self.run_id = run_id
        self.notify = notify
        self.give_up = give_up
        self.run_thread = run_thread
        self.settings = settings or RunGuardSettings()
        self.pool = pool
        self.gave_up: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="tc-pool-watch", daemon=True)
        self._told: set[tuple[str, frozenset[str]]] = set()

    def __enter__(self) -> PoolWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.wait(self.settings.poll_s):
            try:
                if self.run_thread is None and check_captured_interrupt():
                    interrupt_thread()
                    return
                if self.check():
                    self.give_up(self.gave_up or "")
                    interrupt_thread(self.run_thread)
                    return
            except Exception as exc:  # a storage hiccup must not kill the watch or the run
                self.notify(f"pool watch: could not read the pool's state: {exc}")

    def check(self, now: datetime | None = None) -> bool:
        """One look at the pool; True when the run should give up (`gave_up` says why)."""
        info = self.instance.event_log_storage.get_concurrency_info(self.pool)
        waiting = [
            p
            for p in info.pending_steps
            if p.run_id == self.run_id and p.assigned_timestamp is None
        ]
        if not waiting:
            return False
        # A slot is held by a run that claimed it, or to which the pool assigned it for a step
        # not yet started (a run that died waiting keeps its assignment until freed).
        assigned = {p.run_id for p in info.pending_steps if p.assigned_timestamp is not None}
        holders = sorted(({s.run_id for s in info.claimed_slots} | assigned) - {self.run_id})
        if holders and (
            reap_dead_runs(self.instance, holders) or free_finished_holders(self.instance, holders)
        ):
            return False  # their slots are free: the step gets one at its next claim
        now = now or datetime.now(UTC)
        held = self._held_by(info, holders)
        for step in waiting:
            since = step.enqueued_timestamp
            since = since if since.tzinfo else since.replace(tzinfo=UTC)
            waited = (now - since).total_seconds()
            if waited > self.settings.pool_wait_s:
                self.gave_up = (
                    f"step {step.step_key} gave up after waiting {waited:.0f}s (pool_wait_s "
                    f"{self.settings.pool_wait_s:g}) for a slot of pool {self.pool}, held by "
                    f"{held}. {self._remedy(holders)}"
                )
                self.notify(self.gave_up)
                return True
            if (step.step_key, frozenset(holders)) not in self._told:
                self._told.add((step.step_key, frozenset(holders)))
                self.notify(
                    f"step {step.step_key} is waiting for a slot of pool {self.pool} since "
                    f"{since:%Y-%m-%d %H:%M:%S} UTC, held by {held}; it gives up after "
                    f"{self.settings.pool_wait_s:g}s"
                )
        return False

    def _held_by(self, info: object, holders: list[str]) -> str:
        """Which runs hold the pool's slots, at which steps, in words."""
        return (
            ", ".join(
                f"{describe_run(self.instance, r)} at step "
                + ", ".join(s.step_key for s in info.claimed_slots if s.run_id == r)
                for r in holders
            )
            or "nobody (the slot is being handed over)"
        )

    def _remedy(self, holders: list[str]) -> str:
        return (
            f"If that run is stuck, clear it with `tc-platform unblock "
            f"{holders[0] if holders else 'RUN_ID'}` (marks it failed and frees its slots), or "
            f"from the UI: terminate the run, or free its slots under Deployment > Concurrency "
            f"> {self.pool}."
        )


class GuardedInProcessExecutor(InProcessExecutor):
    """Dagster's in-process executor, plus: the run records its process (``tc/process``) and a
    `PoolWatch` reports and bounds its waits for the writers' pool."""

    def __init__(self, retries: RetryMode, settings: RunGuardSettings) -> None:
        super().__init__(retries=retries)
        self.settings = settings

    def execute(
        self, plan_context: PlanOrchestrationContext, execution_plan: ExecutionPlan
    ) -> Iterator[dg.DagsterEvent]:
        instance = plan_context.instance
        run = plan_context.dagster_run
        instance.add_run_tags(run.run_id, process_tag(run.run_id))

        def notify(message: str) -> None:
            instance.report_engine_event(message, run)

        with PoolWatch(instance, run.run_id, notify, settings=self.settings):
            yield from super().execute(plan_context, execution_plan)


@dg.executor(
    name="in_process_guarded",
    config_schema={
        "retries": get_retries_config(),
        "pool_wait_s": dg.Field(
            float,
            is_required=False,
            default_value=RunGuardSettings().pool_wait_s,
            description=RunGuardSettings.model_fields["pool_wait_s"].description,
        ),
    },
)
def guarded_in_process_executor(init_context: dg.InitExecutorContext) -> GuardedInProcessExecutor:
    """Every step in the run's own process (one process per run), waits for the writers' pool
    reported and bounded (`RunGuardSettings`), the run's process recorded for `reap_dead_runs`."""
    config = init_context.executor_config
    return GuardedInProcessExecutor(
        retries=RetryMode.from_config(config["retries"]),
        settings=RunGuardSettings(pool_wait_s=config["pool_wait_s"]),
    )


def dead_runs_sensor(interval_s: int) -> dg.SensorDefinition:
    """A sensor that reaps dead runs and frees slots of finished runs every `interval_s`
    seconds (the daemon's side: a killed run would otherwise count against the run queue and
    hold its pool slots forever)."""

    @dg.sensor(
        name="dead_runs_sensor",
        minimum_interval_seconds=interval_s,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Marks failed each run in progress whose process is gone, and frees the "
        "pool slots (claimed or assigned) of every finished run.",
    )
    def _sensor(context: dg.SensorEvaluationContext) -> dg.SkipReason:
        reaped = reap_dead_runs(context.instance)
        freed = free_finished_holders(context.instance)
        said = [f"reaped {len(reaped)} dead run(s): {', '.join(reaped)}"] if reaped else []
        if freed:
            said.append(f"freed the pool slots of {len(freed)} finished run(s): {', '.join(freed)}")
        return dg.SkipReason("; ".join(said) or "no dead runs")

    return _sensor
