"""A killed run does not block the platform; waits for the writers' pool say so and give up;
Ctrl-C and SIGTERM stop `tc-platform run` promptly; dbt dies with the run that started it."""

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import dagster as dg
import pytest
from dagster._core.utils import make_new_run_id

from tc_assets.defs.definitions import PlatformPaths
from tc_assets.defs.liveness import (
    TAG_PROCESS,
    TAG_PROCESS_RUN,
    PoolWatch,
    RunGuardSettings,
    dead_runs_sensor,
    process_gone,
    process_tag,
    reap_dead_runs,
)
from tc_assets.defs.partitions import WAREHOUSE_POOL
from tc_assets.io.synthetic import SyntheticSettings, generate_source
from tc_assets.runner import INSTANCE_CONFIG, run_rounds
from tests.test_e2e_daemon import alive, descendants

pytestmark = pytest.mark.timeout(600)

TINY = SyntheticSettings(stocks=600, features=12, models=30, seed=11)


def wait_for(condition: Callable[[], object], timeout: float, what: str) -> object:
    """Poll `condition` until it is truthy; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


@pytest.fixture
def home(tmp_path) -> Path:
    """A Dagster home with the project's instance configuration (pool of 1)."""
    path = tmp_path / "dagster_home"
    path.mkdir()
    (path / "dagster.yaml").write_text(INSTANCE_CONFIG.read_text())
    return path


def cli(args: list[str], tmp_path: Path, home: Path) -> subprocess.Popen:
    env = {**os.environ, "TC_HOME": str(tmp_path / "tc"), "DAGSTER_HOME": str(home)}
    return subprocess.Popen(
        [sys.executable, "-m", "tc_assets.cli", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def dbt_children(pid: int) -> list[int]:
    out = []
    for child in descendants(pid):
        try:
            cmd = (Path("/proc") / str(child) / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(part.endswith(b"dbt") for part in cmd) and b"build" in cmd:
            out.append(child)
    return out


def runs(instance: dg.DagsterInstance) -> list[dg.DagsterRun]:
    return list(instance.get_runs())


def dead_tag() -> str:
    """A tc/process tag of this host naming a process that has exited."""
    child = subprocess.Popen(["true"])
    child.wait()
    return f"{process_tag('any')[TAG_PROCESS].rsplit('/', 2)[0]}/{child.pid}/1"


def test_a_retry_is_not_reaped_for_its_parents_dead_process(home):
    """A retry inherits its parent's tags, the dead process's among them: until it records
    its own process it is not taken for dead."""
    with dg.DagsterInstance.from_config(str(home)) as instance:
        parent = make_new_run_id()
        inherited = {TAG_PROCESS: dead_tag(), TAG_PROCESS_RUN: parent}
        retry = dg.DagsterRun(
            job_name="retry", run_id=make_new_run_id(), status=dg.DagsterRunStatus.STARTED
        )
        instance.add_run(retry._replace(tags=inherited))
        assert reap_dead_runs(instance) == []
        instance.add_run_tags(retry.run_id, {TAG_PROCESS_RUN: retry.run_id})  # its own, dead
        assert reap_dead_runs(instance) == [retry.run_id]


def test_process_tag_names_this_process_and_a_dead_one():
    assert not process_gone(process_tag("any")[TAG_PROCESS])
    assert process_gone(dead_tag())
    assert not process_gone(None)
    assert not process_gone("other-host/1/1")  # another machine's process cannot be checked


def test_run_killed_mid_dbt_then_next_run_on_the_same_home_completes(tmp_path, home):
    source = tmp_path / "source"
    generate_source(source, [1], TINY)
    warehouse = tmp_path / "wh.duckdb"
    args = ["run", "--source", str(source), "--warehouse", str(warehouse)]

    first = cli(args, tmp_path, home)
    dbt = wait_for(lambda: dbt_children(first.pid), 300, "the first run's dbt build")
    os.kill(first.pid, signal.SIGKILL)
    first.wait(timeout=30)
    # dbt dies with the run that started it instead of writing on as an orphan.
    wait_for(lambda: not any(alive(p) for p in dbt), 30, "the orphaned dbt to exit")

    with dg.DagsterInstance.from_config(str(home)) as instance:
        (killed,) = runs(instance)
        assert killed.status == dg.DagsterRunStatus.STARTED  # nobody reported its end
        held = instance.event_log_storage.get_concurrency_info(WAREHOUSE_POOL).claimed_slots
        assert [s.run_id for s in held] == [killed.run_id]

    second = cli(args, tmp_path, home)
    out, _ = second.communicate(timeout=400)
    assert second.returncode == 0, out
    assert f"run {killed.run_id}: its process is gone; marked failed" in out
    assert "1 of 1 rounds succeeded" in out
    with dg.DagsterInstance.from_config(str(home)) as instance:
        statuses = {r.run_id: r.status for r in runs(instance)}
        assert statuses[killed.run_id] == dg.DagsterRunStatus.FAILURE
        assert sorted(s.value for s in statuses.values()) == ["FAILURE", "SUCCESS"]
        assert not instance.event_log_storage.get_concurrency_info(WAREHOUSE_POOL).claimed_slots


def _holder(instance: dg.DagsterInstance, tag: str) -> str:
    """A STARTED run of the process `tag` names, holding the writers' pool slot."""
    run_id = make_new_run_id()
    run = dg.DagsterRun(
        job_name="holder",
        run_id=run_id,
        status=dg.DagsterRunStatus.STARTED,
        tags={TAG_PROCESS: tag, TAG_PROCESS_RUN: run_id},
    )
    instance.add_run(run)
    instance.event_log_storage.initialize_concurrency_limit_to_default(WAREHOUSE_POOL)
    claim = instance.event_log_storage.claim_concurrency_slot(WAREHOUSE_POOL, run.run_id, "step")
    assert claim.is_claimed
    return run.run_id


def test_wait_for_the_pool_is_reported_and_gives_up_naming_the_blocking_run(tmp_path, home):
    source = tmp_path / "source"
    generate_source(source, [1, 2], TINY)
    paths = PlatformPaths.create(str(source), str(tmp_path / "wh.duckdb"))
    lines: list[str] = []
    with dg.DagsterInstance.from_config(str(home)) as instance:
        holder = _holder(instance, process_tag("any")[TAG_PROCESS])  # this process: alive
        outcomes = run_rounds(
            paths,
            [1, 2],
            instance=instance,
            echo=lines.append,
            guard=RunGuardSettings(pool_wait_s=3),
        )
        text = "\n".join(lines)
        assert "is waiting for a slot of pool duckdb_writers since" in text
        assert f"held by run {holder} (started" in text
        (outcome,) = outcomes  # round 2 is not started: it would wait for the same run
        assert not outcome.success and outcome.stopped == "pool"
        assert any(f"tc-platform unblock {holder}" in m for _, m in outcome.failures)
        assert "rounds not started: 2" in text
        assert instance.get_run_by_id(outcome.run_id).status == dg.DagsterRunStatus.FAILURE
        # Its own pending claim is gone; the holder's slot is untouched.
        info = instance.event_log_storage.get_concurrency_info(WAREHOUSE_POOL)
        assert [s.run_id for s in info.claimed_slots] == [holder]
        assert not [p for p in info.pending_steps if p.run_id == outcome.run_id]


def test_a_waiting_step_reaps_a_dead_holder_and_goes_on(home):
    notes: list[str] = []
    with dg.DagsterInstance.from_config(str(home)) as instance:
        holder = _holder(instance, dead_tag())
        waiter = make_new_run_id()
        assert not instance.event_log_storage.claim_concurrency_slot(
            WAREHOUSE_POOL, waiter, "writer"
        ).is_claimed
        watch = PoolWatch(instance, waiter, notes.append, notes.append, RunGuardSettings())
        assert not watch.check()
        assert instance.get_run_by_id(holder).status == dg.DagsterRunStatus.FAILURE
        assert instance.event_log_storage.claim_concurrency_slot(
            WAREHOUSE_POOL, waiter, "writer"
        ).is_claimed
        assert reap_dead_runs(instance) == []


@pytest.mark.parametrize("freed_by", ["a waiting step", "the dead-runs sensor"])
def test_a_slot_assigned_to_a_run_that_died_waiting_is_freed(home, freed_by):
    """A run killed while its step was queued for the pool may be assigned the next free slot
    after Dagster marked it failed: nobody claims that slot. A waiting step and the dead-runs
    sensor both free it."""
    with dg.DagsterInstance.from_config(str(home)) as instance:
        storage = instance.event_log_storage
        first = _holder(instance, dead_tag())
        died = make_new_run_id()
        instance.add_run(
            dg.DagsterRun(job_name="died", run_id=died, status=dg.DagsterRunStatus.STARTED)
        )
        assert not storage.claim_concurrency_slot(WAREHOUSE_POOL, died, "writer").is_claimed
        storage.free_concurrency_slots_for_run(first)  # the slot goes to `died`'s queued step
        (pending,) = storage.get_concurrency_info(WAREHOUSE_POOL).pending_steps
        assert pending.run_id == died and pending.assigned_timestamp is not None
        instance.report_run_failed(instance.get_run_by_id(died), "killed while waiting")
        waiter = make_new_run_id()
        assert not storage.claim_concurrency_slot(WAREHOUSE_POOL, waiter, "writer").is_claimed
        if freed_by == "a waiting step":
            assert not PoolWatch(instance, waiter, print, print, RunGuardSettings()).check()
        else:
            dead_runs_sensor(30)(dg.build_sensor_context(instance=instance))
        assert storage.claim_concurrency_slot(WAREHOUSE_POOL, waiter, "writer").is_claimed


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_cancels_the_run_and_starts_no_further_round(tmp_path, home, signum):
    source = tmp_path / "source"
    generate_source(source, [1, 2], TINY)
    proc = cli(
        ["run", "--source", str(source), "--warehouse", str(tmp_path / "wh.duckdb")],
        tmp_path,
        home,
    )
    with dg.DagsterInstance.from_config(str(home)) as instance:

        def reading_inputs() -> bool:
            started = (r for r in runs(instance) if r.status == dg.DagsterRunStatus.STARTED)
            return any(
                e.step_key == "round_inputs"
                for r in started
                for e in instance.all_logs(r.run_id, of_type=dg.DagsterEventType.STEP_START)
            )

        # Signalled in the step that reads the source, which Dagster would retry, not cancel,
        # if it carried a retry policy.
        wait_for(reading_inputs, 300, "round 1's run to read its inputs")
        os.kill(proc.pid, signum)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 130, out
        assert "rounds not started: 2" in out
        (run,) = runs(instance)
        assert run.status == dg.DagsterRunStatus.CANCELED
        assert not instance.event_log_storage.get_concurrency_info(WAREHOUSE_POOL).claimed_slots
