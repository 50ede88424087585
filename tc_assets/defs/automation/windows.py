"""`window_refresh_sensor`: score again each windowed result whose window holds a round that
was scored again after it.

`sharpe_contribution` and `tc_proxy_model` of round R also read earlier rounds' rows: a window
of rounds ending at R (such assets carry WINDOW_TAGS and record their window in their metadata).
When a round K of that window is scored again (its inputs or its resolution changed), R's result
still holds K's old rows. Dagster's event log numbers every materialization in order (storage
ids), so for each windowed asset the sensor compares the id of its latest materialization of R
with those of its parents (the assets whose tables its window reads) in the rounds of R's window
(every round up to R when the window is not full or not recorded: an earlier round that gains
data later joins it). A round waits while a run of it or of an
earlier round is queued or in progress: that run may change its window again, and one refresh
after it covers both. For each stale round it requests one run
of the stale windowed assets and of everything downstream of them in the round (the marts that
read them). A run key names the newest parent materialization, so each refresh is requested
once: a refresh that fails is not retried in a loop.
"""

from collections.abc import Callable, Iterable, Mapping

import dagster as dg
from dagster._core.definitions.assets.graph.base_asset_graph import BaseAssetGraph

from tc_assets.defs.automation.runs import rounds_in_flight
from tc_assets.defs.automation.settings import AutomationSettings
from tc_assets.defs.automation.state import REASON_WINDOW, TAG_REASON
from tc_assets.defs.jobs import SCORE_ROUND_JOB
from tc_assets.defs.partitions import WINDOW_METADATA_KEY, WINDOW_TAGS, window_first

MATERIALIZATION = dg.DagsterEventType.ASSET_MATERIALIZATION


def stale_rounds(
    results: Mapping[str, int],
    parents: Mapping[str, int],
    first_round: Callable[[str], int | None],
) -> dict[str, int]:
    """Rounds whose windowed result is older than a parent's materialization in its window.

    `results`: round -> storage id of the result's latest materialization; `parents`: round ->
    the newest storage id among the result's parents in that round; `first_round(R)`: the first
    round of R's window (None: every round up to R). Returns round -> the newest parent id
    that makes it stale. `first_round` is asked only about rounds that may be stale.
    """
    by_round = sorted((int(k), v) for k, v in parents.items())
    out: dict[str, int] = {}
    for key, result_id in results.items():
        r = int(key)
        newer = [(k, v) for k, v in by_round if k <= r and v > result_id]
        if not newer:
            continue
        first = first_round(key)
        newest = max((v for k, v in newer if first is None or k >= first), default=None)
        if newest is not None:
            out[key] = newest
    return out


def settled(results: Mapping[str, int], busy: Iterable[str]) -> dict[str, int]:
    """The results no queued or running run can make stale: those of rounds before the first
    round in flight (a run of round K changes the windows of K and of every later round)."""
    first_busy = min((int(r) for r in busy), default=None)
    return {r: i for r, i in results.items() if first_busy is None or int(r) < first_busy}


def _window_first(instance: dg.DagsterInstance, key: dg.AssetKey, partition: str) -> int | None:
    """The first round of the window recorded by the result's latest materialization."""
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=key, asset_partitions=[partition]), limit=1
    ).records
    if not records or records[0].asset_materialization is None:
        return None
    value = records[0].asset_materialization.metadata.get(WINDOW_METADATA_KEY)
    return window_first(getattr(value, "value", None))


def _newest_by_round(instance: dg.DagsterInstance, keys: Iterable[dg.AssetKey]) -> dict[str, int]:
    """Round -> the newest materialization storage id among `keys` in that round."""
    out: dict[str, int] = {}
    for key in keys:
        for partition, storage_id in instance.get_latest_storage_id_by_partition(
            key, MATERIALIZATION
        ).items():
            out[partition] = max(out.get(partition, 0), storage_id)
    return out


def windowed_assets(graph: BaseAssetGraph) -> list[dg.AssetKey]:
    """The assets that read a window of earlier rounds (tagged WINDOW_TAGS)."""
    return sorted(
        key
        for key in graph.get_all_asset_keys()
        if WINDOW_TAGS.items() <= graph.get(key).tags.items()
    )


def refresh_requests(instance: dg.DagsterInstance, graph: BaseAssetGraph) -> list[dg.RunRequest]:
    """One run request per round with a stale windowed result (see the module's docstring)."""
    busy = rounds_in_flight(instance)
    stale: dict[str, tuple[set[dg.AssetKey], int]] = {}
    for key in windowed_assets(graph):
        results = instance.get_latest_storage_id_by_partition(key, MATERIALIZATION)
        parents = _newest_by_round(instance, graph.get(key).parent_keys)
        found = stale_rounds(
            settled(results, busy),
            parents,
            lambda partition, key=key: _window_first(instance, key, partition),
        )
        for r, newest in found.items():
            keys, seen = stale.get(r, (set(), 0))
            stale[r] = (keys | {key}, max(seen, newest))
    requests = []
    for r in sorted(stale, key=int):
        keys, newest = stale[r]
        selection = dg.AssetSelection.assets(*keys).downstream().resolve(graph)
        requests.append(
            dg.RunRequest(
                partition_key=r,
                run_key=f"window-{r}-{newest}",
                asset_selection=sorted(selection),
                tags={TAG_REASON: REASON_WINDOW},
            )
        )
    return requests


def build_window_sensor(settings: AutomationSettings) -> dg.SensorDefinition:
    """The sensor, polling every `window_refresh_interval_s`."""

    @dg.sensor(
        name="window_refresh_sensor",
        job_name=SCORE_ROUND_JOB,
        minimum_interval_seconds=settings.window_refresh_interval_s,
        default_status=settings.sensor_status,
        description="Scores again each windowed result (Sharpe contribution, TC proxy) whose "
        "window holds a round that was scored again after it.",
    )
    def window_refresh_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult:
        graph = context.repository_def.asset_graph
        requests = refresh_requests(context.instance, graph)
        for req in requests:
            context.log.info(
                f"round {req.partition_key}: {len(req.asset_selection or [])} assets, "
                "a round of their window was scored again after them"
            )
        skip = None if requests else "every windowed result is newer than the rounds it reads"
        return dg.SensorResult(run_requests=requests, skip_reason=skip)

    return window_refresh_sensor
