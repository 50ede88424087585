"""The close schedule, the new-round and round-changes sensors, and the ingestion checks.

Sensors and the schedule are evaluated with build_sensor_context / build_schedule_context on a
test instance; what they request is then run in process exactly as the daemon would (partition
added first, the request's tags and asset selection kept), on rounds from the generator, in a
local folder or in a real S3 server (moto, on 127.0.0.1).
"""

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pytest
from dagster._utils.schedules import cron_string_iterator
from pydantic import ValidationError

from tc_assets.defs import automation as a
from tc_assets.defs.definitions import PlatformPaths, build_definitions
from tc_assets.defs.partitions import ROUNDS_PARTITIONS_NAME, window_first, window_label
from tc_assets.defs.resources import RoundSourceResource
from tc_assets.io.synthetic import SyntheticSettings, generate_source
from tc_assets.io.warehouse import Warehouse
from tc_assets.runner import run_rounds
from tests.conftest import run_job
from tests.s3server import FaultyProxy, client, moto_s3, s3_env

TINY = SyntheticSettings(stocks=300, features=12, models=30, seed=11)
BUCKET = "automation"


# --- a round source the test can change, in a folder or in S3 ---------------------------------


class Source:
    """A round source under test: generated rounds are staged locally, then published."""

    def __init__(
        self, staging: Path, root: Path, s3=None, settings: SyntheticSettings = TINY
    ) -> None:
        self.staging, self.root, self.s3, self.settings = staging, root, s3, settings
        self.uri = f"s3://{BUCKET}/{root.name}" if s3 else str(root)

    def publish(self, rounds: list[int], skip: tuple[str, ...] = ()) -> None:
        """Generate `rounds` and publish every file but those whose path ends with `skip`."""
        generate_source(self.staging, rounds, self.settings)
        files = [p for r in rounds for p in (self.staging / "rounds" / str(r)).rglob("*")]
        rels = ["features.json"] + [
            rel
            for rel in sorted(p.relative_to(self.staging).as_posix() for p in files if p.is_file())
            if not rel.endswith(("round.json", *skip))
        ]
        with ThreadPoolExecutor(8) as pool:  # many small uploads: in parallel
            list(pool.map(lambda rel: self.write(rel, (self.staging / rel).read_bytes()), rels))
        for r in rounds:  # round.json last: it marks the round complete
            self.write(
                f"rounds/{r}/round.json", (self.staging / f"rounds/{r}/round.json").read_bytes()
            )

    def write(self, rel: str, data: bytes) -> None:
        if self.s3:
            self.s3.put_object(Bucket=BUCKET, Key=f"{self.root.name}/{rel}", Body=data)
        else:
            path = self.root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)

    def read(self, rel: str) -> bytes:
        if self.s3:
            key = f"{self.root.name}/{rel}"
            return self.s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
        return (self.root / rel).read_bytes()

    def touch(self, rel: str) -> None:
        """Write the same bytes again: a new mtime (local) or a new upload (S3), same content."""
        data = self.read(rel)
        if not self.s3:
            st = (self.root / rel).stat()
            os.utime(self.root / rel, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
        else:
            self.write(rel, data)


@pytest.fixture(scope="module")
def shared_instance() -> Iterator[dg.DagsterInstance]:
    with dg.instance_for_test() as inst:
        yield inst


@pytest.fixture
def instance(shared_instance) -> dg.DagsterInstance:
    """A test instance emptied of runs, events and round partitions (a new one costs seconds)."""
    shared_instance.wipe()
    for key in shared_instance.get_dynamic_partitions(ROUNDS_PARTITIONS_NAME):
        shared_instance.delete_dynamic_partition(ROUNDS_PARTITIONS_NAME, key)
    return shared_instance


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    with moto_s3() as url:
        client(url).create_bucket(Bucket=BUCKET)
        yield url


@pytest.fixture(params=["local", "s3"])
def source(request, tmp_path, monkeypatch) -> Source:
    if request.param == "local":
        return Source(tmp_path / "staging", tmp_path / "source")
    endpoint = request.getfixturevalue("s3_endpoint")
    for key, value in s3_env(endpoint).items():
        monkeypatch.setenv(key, value)
    return Source(tmp_path / "staging", Path(f"src-{uuid.uuid4().hex[:12]}"), client(endpoint))


@pytest.fixture
def local_source(tmp_path) -> Source:
    return Source(tmp_path / "staging", tmp_path / "source")


class Platform:
    """The platform's Definitions over a source, driven the way the daemon drives them."""

    def __init__(
        self,
        source: Source,
        instance: dg.DagsterInstance,
        tmp_path: Path,
        settings: a.AutomationSettings | None = None,
    ) -> None:
        self.paths = PlatformPaths.create(source.uri, str(tmp_path / "wh" / "warehouse.duckdb"))
        self.defs = build_definitions(self.paths, settings or a.AutomationSettings())
        self.instance = instance
        self.cursors: dict[str, str | None] = {}

    def sensor(self, name: str, cursor: str | None | bool = True) -> dg.SensorResult:
        """Evaluate a sensor with its last cursor (True), a given one, or none; keep the cursor."""
        cursor = self.cursors.get(name) if cursor is True else cursor
        with dg.build_sensor_context(
            instance=self.instance,
            cursor=cursor or None,
            definitions=self.defs,
            resources={"round_source": self.defs.resources["round_source"]},
        ) as context:
            result = self.defs.resolve_sensor_def(name)(context)
        assert isinstance(result, dg.SensorResult)
        self.cursors[name] = result.cursor
        for req in result.dynamic_partitions_requests or []:  # as the daemon does
            self.instance.add_dynamic_partitions(req.partitions_def_name, list(req.partition_keys))
        return result

    def schedule(self, when: datetime):
        with dg.build_schedule_context(
            instance=self.instance,
            scheduled_execution_time=when,
            resources={"round_source": self.defs.resources["round_source"]},
        ) as context:
            return self.defs.resolve_schedule_def("round_close_schedule")(context)

    def launch(self, request: dg.RunRequest, job: str) -> dg.ExecuteInProcessResult:
        """Run a request like the daemon: its partition, tags and asset selection."""
        return self.defs.resolve_job_def(job).execute_in_process(
            instance=self.instance,
            partition_key=request.partition_key,
            tags=request.tags,
            asset_selection=request.asset_selection,
            raise_on_error=False,
        )

    @property
    def targets(self) -> a.RoundTargets:
        return a.RoundTargets.from_keys(self.defs.resolve_all_asset_keys())


def summary(result: dg.SensorResult) -> list[tuple[str, str]]:
    return [(r.partition_key or "", r.tags[a.TAG_REASON]) for r in result.run_requests]


# --- new-round sensor -----------------------------------------------------------------------


def test_a_new_round_yields_one_partition_and_one_run_request(source, instance, tmp_path):
    p = Platform(source, instance, tmp_path)
    source.publish([1])
    first = p.sensor("new_round_sensor")
    assert [r.partition_keys for r in first.dynamic_partitions_requests] == [["1"]]
    assert summary(first) == [("1", a.REASON_NEW_ROUND)]
    assert first.run_requests[0].tags[a.TAG_INPUT_STAMP] == a.input_stamp(
        p.defs.resources["round_source"].open(), 1
    )
    assert instance.get_dynamic_partitions(ROUNDS_PARTITIONS_NAME) == ["1"]

    again = p.sensor("new_round_sensor")
    assert again.run_requests == [] and not again.dynamic_partitions_requests
    assert "no new round" in again.skip_reason.skip_message

    source.publish([2])
    second = p.sensor("new_round_sensor")
    assert summary(second) == [("2", a.REASON_NEW_ROUND)]
    assert [r.partition_keys for r in second.dynamic_partitions_requests] == [["2"]]
    # A restarted daemon resumes from the stored cursor: nothing missed, nothing repeated.
    assert p.sensor("new_round_sensor", cursor=second.cursor).run_requests == []
    assert json.loads(second.cursor) == {"rounds": [1, 2]}


def test_bad_round_directories_are_reported_and_skipped(local_source, instance, tmp_path):
    source = local_source
    source.publish([1])
    good = (source.root / "rounds/1/round.json").read_text()
    for r in (3, 4, 6, 7):
        shutil.copytree(source.root / "rounds/1", source.root / f"rounds/{r}")
        (source.root / f"rounds/{r}/round.json").write_text(
            good.replace('"round": 1', f'"round": {r}')
        )
    (source.root / "rounds/3/round.json").write_text("{not json")
    (source.root / "rounds/4/round.json").write_text(good.replace('"round": 1', '"round": 40'))
    (source.root / "rounds/6/stakes.csv").unlink()
    (source.root / "rounds/7/round.json").unlink()
    (source.root / "rounds/notes").mkdir()  # not a round: ignored

    p = Platform(source, instance, tmp_path)
    result = p.sensor("new_round_sensor")
    assert summary(result) == [("1", a.REASON_NEW_ROUND)]
    assert json.loads(result.cursor) == {"rounds": [1]}

    again = p.sensor("new_round_sensor")
    assert again.run_requests == []
    reasons = dict(part.split(": ", 1) for part in again.skip_reason.skip_message.split("; "))
    assert reasons.keys() == {"rounds/3", "rounds/4", "rounds/6", "rounds/7"}
    assert (
        reasons["rounds/3"].startswith("unreadable: ") and "not valid JSON" in reasons["rounds/3"]
    )
    assert reasons["rounds/4"].startswith("malformed: ") and "round 40" in reasons["rounds/4"]
    assert reasons["rounds/6"] == "incomplete: waiting for stakes.csv"
    assert reasons["rounds/7"] == "waiting for round.json"

    (source.root / "rounds/3/round.json").write_text(good.replace('"round": 1', '"round": 3'))
    assert summary(p.sensor("new_round_sensor")) == [("3", a.REASON_NEW_ROUND)]


def test_an_unreadable_round_in_s3_is_reported_and_skipped(
    s3_endpoint, instance, tmp_path, monkeypatch
):
    """Objects of round 2 answer 403 AccessDenied: round 1 goes on, round 2 waits for access."""
    with FaultyProxy(s3_endpoint) as proxy:
        for key, value in s3_env(proxy.endpoint).items():
            monkeypatch.setenv(key, value)
        source = Source(
            tmp_path / "staging", Path(f"src-{uuid.uuid4().hex[:12]}"), client(s3_endpoint)
        )
        source.publish([1, 2])
        p = Platform(source, instance, tmp_path)
        proxy.deny(f"{source.root.name}/rounds/2/")
        assert summary(p.sensor("new_round_sensor")) == [("1", a.REASON_NEW_ROUND)]
        blocked = p.sensor("new_round_sensor")
        assert "rounds/2: unreadable: " in blocked.skip_reason.skip_message
        assert "403" in blocked.skip_reason.skip_message
        proxy.deny("")
        assert summary(p.sensor("new_round_sensor")) == [("2", a.REASON_NEW_ROUND)]


# --- round-changes sensor -------------------------------------------------------------------


def test_changes_sensor_scores_exactly_the_rounds_that_changed(local_source, instance, tmp_path):
    """First scoring after ingestion, a resolved file arriving, then changing, then another
    input changing: each re-requests only its round, with the assets it needs. (The daemon
    running such requests is the end-to-end test's part; here they are checked, not run.)"""
    source = local_source
    p = Platform(source, instance, tmp_path)
    t = p.targets
    source.publish([1, 2], skip=("2/resolved.parquet",))
    for req in p.sensor("new_round_sensor").run_requests:
        assert p.launch(req, "ingest_round").success

    # Nothing is scored before close_time + score_delay_s (round 2 closes a day after round 1).
    rs = p.defs.resources["round_source"].open()
    close = datetime.fromisoformat(json.loads(rs.read_bytes("rounds/1/round.json"))["close_time"])
    delay = a.AutomationSettings(score_delay_s=600)
    for seconds_after_close, due in [(-1, []), (599, []), (601, ["1"])]:
        with dg.build_sensor_context(instance=instance) as context:
            now = close.timestamp() + seconds_after_close
            result = a.changed_rounds(context, rs, t, delay, now=now)
        assert [r.partition_key for r in result.run_requests] == due

    # A tick hashes changed files within its budget (one round at least); the rest wait.
    with dg.build_sensor_context(instance=instance) as context:
        budget = a.AutomationSettings(hash_budget_s=1e-9)
        partial = a.changed_rounds(context, rs, t, budget)
    assert [r.partition_key for r in partial.run_requests] == ["1"]
    assert list(a.ChangesCursor.loads(partial.cursor).seen) == ["1"]  # round 2: next tick

    first = p.sensor("round_changes_sensor")
    assert summary(first) == [("1", a.REASON_INGESTED), ("2", a.REASON_INGESTED)]
    assert all(r.asset_selection == list(t.scoring) for r in first.run_requests)
    assert set(t.scoring).isdisjoint(t.ingestion) and dg.AssetKey("resolved") in t.scoring
    assert first.run_requests[0].tags[a.TAG_RESOLVED] != "none"
    assert first.run_requests[1].tags[a.TAG_RESOLVED] == "none"
    assert p.sensor("round_changes_sensor").run_requests == []

    resolved = (source.staging / "rounds/2/resolved.parquet").read_bytes()
    source.write("rounds/2/resolved.parquet", resolved)
    arrived = p.sensor("round_changes_sensor")
    assert summary(arrived) == [("2", a.REASON_RESOLVED)]
    assert arrived.run_requests[0].asset_selection == list(t.scoring)
    assert p.sensor("round_changes_sensor").run_requests == []

    source.touch("rounds/1/stakes.csv")  # same content, new time: nothing to do
    source.touch("rounds/2/resolved.parquet")
    assert p.sensor("round_changes_sensor").run_requests == []

    frame = pd.read_parquet(source.staging / "rounds/2/resolved.parquet")
    frame.loc[0, "return"] += 0.01
    frame.to_parquet(tmp_path / "changed.parquet", index=False)
    source.write("rounds/2/resolved.parquet", (tmp_path / "changed.parquet").read_bytes())
    assert summary(p.sensor("round_changes_sensor")) == [("2", a.REASON_RESOLVED)]

    # A round with a run in progress is left alone until it ends; the others go on.
    queued = instance.create_run_for_job(
        p.defs.resolve_job_def("score_round"),
        status=dg.DagsterRunStatus.STARTED,
        tags={a.PARTITION_TAG: "2"},
    )
    stakes = source.read("rounds/1/stakes.csv").decode().splitlines()
    model, stake, *rest = stakes[1].split(",")
    stakes[1] = ",".join([model, str(float(stake) + 1000.0), *rest])
    source.write("rounds/1/stakes.csv", ("\n".join(stakes) + "\n").encode())
    source.write("rounds/2/resolved.parquet", resolved)
    changed = p.sensor("round_changes_sensor")
    assert summary(changed) == [("1", a.REASON_INPUTS_CHANGED)]
    assert changed.run_requests[0].asset_selection is None  # re-ingest and score everything
    instance.delete_run(queued.run_id)
    assert summary(p.sensor("round_changes_sensor")) == [("2", a.REASON_RESOLVED)]
    assert p.sensor("round_changes_sensor").run_requests == []


def test_changes_in_s3_are_seen_by_etag_without_downloads(source, tmp_path):
    """The round's state: same content (re-uploaded, touched) -> same state; any change of
    content -> a new state; resolved.parquet tracked on its own."""
    source.publish([1])
    rs = RoundSourceResource.for_uri(source.uri).open()
    state = a.RoundState.observe(rs, 1, rs.round_stamps(1))
    assert state.resolved is not None and state.close_time is not None
    stamps = rs.round_stamps(1)
    assert "features.json" in stamps and "rounds/1/planted.csv" not in stamps
    assert any(rel.startswith("rounds/1/predictions/") for rel in stamps)

    source.touch("rounds/1/live.parquet")
    same = a.RoundState.observe(rs, 1, rs.round_stamps(1), previous=state)
    assert same.content == state.content
    source.write("rounds/1/planted.csv", b"ignored by ingestion, so by the sensor too")
    assert a.RoundState.observe(rs, 1, rs.round_stamps(1), state).content == state.content

    source.write("rounds/1/resolved.parquet", b"other bytes")
    moved = a.RoundState.observe(rs, 1, rs.round_stamps(1), previous=state)
    assert moved.inputs == state.inputs and moved.resolved != state.resolved
    source.write("rounds/1/predictions/model_new.csv", b"id,prediction\n")
    grown = a.RoundState.observe(rs, 1, rs.round_stamps(1), previous=moved)
    assert grown.inputs != state.inputs and grown.input_stamp != state.input_stamp
    # Hashing from scratch agrees with the incremental state.
    assert a.RoundState.observe(rs, 1, rs.round_stamps(1)) == grown


def test_a_rewrite_that_keeps_size_and_mtime_is_still_seen(local_source):
    """Locally the stamp holds ctime and inode too: same-size new bytes with the old mtime put
    back still change the round's state (content hashes are compared, not times)."""
    local_source.publish([1])
    rs = RoundSourceResource.for_uri(local_source.uri).open()
    state = a.RoundState.observe(rs, 1, rs.round_stamps(1))
    path = local_source.root / "rounds/1/stakes.csv"
    st = path.stat()
    data = bytearray(path.read_bytes())
    i = data.rindex(b"1")  # a digit of the last row's tc_multiplier or stake
    data[i : i + 1] = b"2"
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns
    after = a.RoundState.observe(rs, 1, rs.round_stamps(1), previous=state)
    assert after.inputs != state.inputs


def test_rounds_already_scored_by_a_full_run_are_adopted(local_source, instance, tmp_path):
    """A round run by `tc-platform run` before the daemon started is neither re-ingested nor
    re-scored; a later change to it is picked up. A full run that does not say which files it
    read (one launched from the UI) is scored again once."""
    local_source.publish([1, 2], skip=("resolved.parquet",))  # unresolved: shorter full runs
    p = Platform(local_source, instance, tmp_path)
    (outcome,) = run_rounds(p.paths, [1], instance=instance, echo=lambda _: None)
    assert outcome.success
    assert run_job(p.defs, instance, 2, job="score_round").success  # no tags
    assert summary(p.sensor("round_changes_sensor")) == [("2", a.REASON_INPUTS_CHANGED)]
    new = p.sensor("new_round_sensor")
    assert new.run_requests == [] and "already ingested" in new.skip_reason.skip_message
    assert p.sensor("round_changes_sensor").run_requests == []
    local_source.touch("rounds/1/live.parquet")
    assert p.sensor("round_changes_sensor").run_requests == []
    resolved = (local_source.staging / "rounds/1/resolved.parquet").read_bytes()
    local_source.write("rounds/1/resolved.parquet", resolved)
    assert summary(p.sensor("round_changes_sensor")) == [("1", a.REASON_RESOLVED)]


def test_a_failed_ingestion_is_retried_once_its_inputs_change(local_source, instance, tmp_path):
    local_source.publish([1])
    stakes = (local_source.root / "rounds/1/stakes.csv").read_text()
    lines = stakes.splitlines()
    model, stake, *rest = lines[1].split(",")
    bad = "\n".join([lines[0], ",".join([model, "-5", *rest]), *lines[2:]]) + "\n"
    (local_source.root / "rounds/1/stakes.csv").write_text(bad)
    p = Platform(local_source, instance, tmp_path)
    (req,) = p.sensor("new_round_sensor").run_requests
    assert not p.launch(req, "ingest_round").success
    assert p.sensor("round_changes_sensor").run_requests == []  # same files: no retry loop

    (local_source.root / "rounds/1/stakes.csv").write_text(stakes)
    retry = p.sensor("round_changes_sensor")
    assert summary(retry) == [("1", a.REASON_INPUTS_CHANGED)]
    assert retry.run_requests[0].asset_selection is None
    assert p.sensor("round_changes_sensor").run_requests == []


# --- window-refresh sensor -------------------------------------------------------------------


def test_stale_rounds_count_only_parents_inside_the_window_and_newer_than_the_result():
    results = {"3": 30, "4": 40, "5": 50}  # storage ids of the windowed result per round
    parents = {"1": 60, "2": 10, "3": 20, "4": 35, "5": 45, "6": 70}
    windows = {"3": None, "4": 2, "5": 4}  # round 3's window unrecorded: every earlier round
    stale = a.stale_rounds(results, parents, windows.__getitem__)
    # round 3: round 1 re-scored after it; round 4: round 1 is outside its window 2-4 and
    # round 4's own parents precede it; round 5: nothing newer inside 4-5; round 6 is later.
    assert stale == {"3": 60}


def test_a_window_not_full_counts_every_earlier_round():
    # Window of 4 rounds ending at 6: full, rounds before 3 can no longer join it.
    assert window_first(window_label([3, 4, 5, 6], 4)) == 3
    # Only rounds 2 and 6 had data: round 1, resolved later, would join the window.
    assert window_label([2, 6], 4) == "up to 6" and window_first("up to 6") is None
    assert window_label([], 4) == "" and window_first("") is None and window_first(None) is None


def test_results_wait_while_a_run_of_their_round_or_an_earlier_one_is_in_flight():
    results = {"2": 20, "3": 30, "5": 50, "10": 100}
    assert a.settled(results, set()) == results
    # round 4 in flight can still change the windows of rounds 4 and later (10 > 4 as numbers).
    assert a.settled(results, {"4", "12"}) == {"2": 20, "3": 30}
    assert a.settled(results, {"1"}) == {}


def _sharpe(p: Platform, r: int) -> pd.DataFrame:
    """Round r's stored Sharpe contributions, by model."""
    frame = Warehouse(p.paths.warehouse).read_round("sharpe_contribution", r)
    return frame.drop(columns=["round"]).set_index("model_id").sort_index()


def test_windowed_results_of_later_rounds_follow_a_re_scored_round(instance, tmp_path):
    """Round 2's Sharpe contribution reads round 1's returns. After round 1 is scored again on
    corrected returns, the window sensor re-runs round 2's windowed assets (and the marts that
    read them), and round 2's rows equal those of a clean serial run on the corrected data."""
    # Scored rounds: enough stocks for the meta portfolio to be tradable at the default gamma.
    scored = SyntheticSettings(stocks=600, features=12, models=30, seed=5)
    local_source = Source(tmp_path / "staging", tmp_path / "source", settings=scored)
    local_source.publish([1, 2])
    p = Platform(local_source, instance, tmp_path / "daemon")
    windowed = {dg.AssetKey("sharpe_contribution"), dg.AssetKey("tc_proxy_model")}
    assert all(o.success for o in run_rounds(p.paths, [1, 2], instance=instance, echo=print))
    assert p.sensor("window_refresh_sensor").run_requests == []  # scored in order: fresh
    assert p.sensor("round_changes_sensor").run_requests == []  # adopted
    before = _sharpe(p, 2)

    frame = pd.read_parquet(local_source.staging / "rounds/1/resolved.parquet")
    frame["return"] = frame["return"].to_numpy()[::-1]  # a late correction of round 1
    frame.to_parquet(tmp_path / "corrected.parquet", index=False)
    local_source.write("rounds/1/resolved.parquet", (tmp_path / "corrected.parquet").read_bytes())
    (rescore,) = p.sensor("round_changes_sensor").run_requests
    assert (rescore.partition_key, rescore.tags[a.TAG_REASON]) == ("1", a.REASON_RESOLVED)
    assert p.launch(rescore, "score_round").success

    (refresh,) = p.sensor("window_refresh_sensor").run_requests
    assert refresh.partition_key == "2" and refresh.tags[a.TAG_REASON] == a.REASON_WINDOW
    selected = set(refresh.asset_selection or [])
    assert windowed <= selected and dg.AssetKey(["reporting", "portfolio_leaderboard"]) in selected
    assert not selected & {dg.AssetKey("tc_scores"), dg.AssetKey("portfolio_scores")}
    assert p.launch(refresh, "score_round").success
    assert p.sensor("window_refresh_sensor").run_requests == []

    clean = Platform(local_source, instance, tmp_path / "clean")
    for r in (1, 2):
        assert run_job(clean.defs, instance, r).success
    after, expected = _sharpe(p, 2), _sharpe(clean, 2)
    assert not np.allclose(before["meta_sharpe"], expected["meta_sharpe"])  # round 1 matters
    pd.testing.assert_frame_equal(after, expected)


def test_a_resolution_removed_after_scoring_scores_the_round_from_its_stored_targets(
    instance, tmp_path
):
    """resolved.parquet deleted after the round was scored: the changes sensor scores the round
    again from the targets stored then. Every result equals the first scoring, the meta
    portfolio's weights included (none left NULL beside the payouts), and `resolved` records
    that the file is missing."""
    scored = SyntheticSettings(stocks=600, features=12, models=30, seed=5)
    local_source = Source(tmp_path / "staging", tmp_path / "source", settings=scored)
    local_source.publish([1])
    p = Platform(local_source, instance, tmp_path)
    assert all(o.success for o in run_rounds(p.paths, [1], instance=instance, echo=print))
    wh = Warehouse(p.paths.warehouse)
    tables = ("resolved", "meta_model", "tc_scores", "model_metrics", "payouts", "portfolio_scores")
    before = {t: wh.read_round(t, 1) for t in tables}
    assert before["meta_model"]["weight"].notna().all()
    assert p.sensor("round_changes_sensor").run_requests == []

    (local_source.root / "rounds/1/resolved.parquet").unlink()
    (rescore,) = p.sensor("round_changes_sensor").run_requests
    assert rescore.tags[a.TAG_REASON] == a.REASON_RESOLVED
    result = p.launch(rescore, "score_round")
    assert result.success
    for t in tables:
        pd.testing.assert_frame_equal(wh.read_round(t, 1), before[t], check_exact=False, obj=t)
    materialized = {
        e.asset_key: e.step_materialization_data.materialization
        for e in result.all_events
        if e.event_type == dg.DagsterEventType.ASSET_MATERIALIZATION
    }
    assert dg.AssetKey("tc_scores") in materialized
    kept = materialized[dg.AssetKey("resolved")].metadata
    assert kept["source_file"].value == "missing"
    assert kept["kept_rows"].value == len(before["resolved"])


# --- close schedule -------------------------------------------------------------------------


def test_close_schedule_requests_the_round_that_just_closed(local_source, instance, tmp_path):
    local_source.publish([1, 2])  # round 1: 2024-01-02 12:00-13:00 UTC, round 2: the next day
    p = Platform(local_source, instance, tmp_path)
    tue_1230 = datetime(2024, 1, 2, 12, 30, tzinfo=UTC)
    tue_1300 = datetime(2024, 1, 2, 13, tzinfo=UTC)

    before = p.schedule(tue_1230)
    assert isinstance(before, dg.SkipReason) and "no round closed" in before.skip_message
    assert "round 1 closes at 2024-01-02T13:00:00Z" in before.skip_message

    (req,) = p.schedule(tue_1300)
    assert (req.partition_key, req.tags[a.TAG_REASON]) == ("1", a.REASON_ROUND_CLOSED)
    assert instance.get_dynamic_partitions(ROUNDS_PARTITIONS_NAME) == ["1"]  # added by it
    assert p.launch(req, "ingest_round").success

    done = p.schedule(tue_1300)
    assert (
        isinstance(done, dg.SkipReason) and "round 1: ingested after its close" in done.skip_message
    )
    assert [r.partition_key for r in p.schedule(tue_1300 + timedelta(days=1))] == ["2"]
    late = p.schedule(tue_1300 + timedelta(days=30))
    assert isinstance(late, dg.SkipReason) and "no round closed" in late.skip_message


def test_schedule_cadence_and_settings_come_from_the_environment(tmp_path):
    paths = PlatformPaths.create(str(tmp_path), str(tmp_path / "w.duckdb"))
    default = build_definitions(paths, a.AutomationSettings()).resolve_schedule_def(
        "round_close_schedule"
    )
    assert (default.cron_schedule, default.execution_timezone) == ("0 13 * * 2-6", "UTC")
    assert default.default_status == dg.DefaultScheduleStatus.RUNNING
    start = datetime(2024, 1, 1, tzinfo=UTC)
    ticks = cron_string_iterator(start.timestamp(), default.cron_schedule, "UTC")
    expected = [
        datetime(2024, 1, 1, 13, tzinfo=UTC) + timedelta(days=d)
        for d in range(14)
        if (start + timedelta(days=d)).weekday() in (1, 2, 3, 4, 5)  # Tuesday..Saturday
    ]
    assert [next(ticks) for _ in expected] == expected

    env = {"TC_ROUND_CLOSE_CRON": "30 17 * * 1-5", "TC_ROUND_TIMEZONE": "America/New_York"}
    env |= {"TC_NEW_ROUND_INTERVAL_S": "5", "TC_RUNNING_BY_DEFAULT": "false"}
    settings = a.AutomationSettings.from_env(env)
    defs = build_definitions(paths, settings)
    custom = defs.resolve_schedule_def("round_close_schedule")
    assert (custom.cron_schedule, custom.execution_timezone) == env_pair(env)
    assert custom.default_status == dg.DefaultScheduleStatus.STOPPED
    sensor = defs.resolve_sensor_def("new_round_sensor")
    assert sensor.minimum_interval_seconds == 5
    assert sensor.default_status == dg.DefaultSensorStatus.STOPPED
    with pytest.raises(ValidationError):
        a.AutomationSettings.from_env({"TC_ROUND_TIMEZONE": "Mars/Olympus"})


def env_pair(env: dict[str, str]) -> tuple[str, str]:
    return env["TC_ROUND_CLOSE_CRON"], env["TC_ROUND_TIMEZONE"]
