"""Automation: rounds are found, ingested and scored by the Dagster daemon, nobody clicking.

Four instigators, each with one job, so that a round never gets two runs for one cause:
`new_round_sensor` (new_round.py), `round_close_schedule` (close_schedule.py),
`round_changes_sensor` (changes.py) and `window_refresh_sensor` (windows.py). `state.py` says what a round's files are and names them in
run tags (the command line uses it too), `runs.py` what Dagster knows of a round, and
`settings.py` holds the calendar and polling settings, read from ``TC_*`` variables.
"""

from collections.abc import Iterable

import dagster as dg

from tc_assets.defs.automation.changes import ChangesCursor, build_changes_sensor, changed_rounds
from tc_assets.defs.automation.close_schedule import build_close_schedule, closed_rounds
from tc_assets.defs.automation.new_round import build_new_round_sensor, new_rounds, round_problem
from tc_assets.defs.automation.runs import RoundTargets
from tc_assets.defs.automation.settings import AutomationSettings
from tc_assets.defs.automation.state import (
    PARTITION_TAG,
    REASON_INGESTED,
    REASON_INPUTS_CHANGED,
    REASON_NEW_ROUND,
    REASON_RESOLVED,
    REASON_ROUND_CLOSED,
    REASON_WINDOW,
    TAG_INPUT_STAMP,
    TAG_INPUTS,
    TAG_REASON,
    TAG_RESOLVED,
    RoundState,
    input_stamp,
    run_tags,
)
from tc_assets.defs.automation.windows import (
    build_window_sensor,
    refresh_requests,
    settled,
    stale_rounds,
)

__all__ = [
    "PARTITION_TAG",
    "REASON_INGESTED",
    "REASON_INPUTS_CHANGED",
    "REASON_NEW_ROUND",
    "REASON_RESOLVED",
    "REASON_ROUND_CLOSED",
    "REASON_WINDOW",
    "TAG_INPUTS",
    "TAG_INPUT_STAMP",
    "TAG_REASON",
    "TAG_RESOLVED",
    "AutomationSettings",
    "ChangesCursor",
    "RoundState",
    "RoundTargets",
    "build_defs",
    "changed_rounds",
    "closed_rounds",
    "input_stamp",
    "new_rounds",
    "refresh_requests",
    "round_problem",
    "run_tags",
    "settled",
    "stale_rounds",
]


def build_defs(
    round_keys: Iterable[dg.AssetKey], settings: AutomationSettings | None = None
) -> dg.Definitions:
    """The close schedule and the three sensors, requesting the given round assets' keys;
    settings default to the TC_* environment variables."""
    settings = settings or AutomationSettings.from_env()
    targets = RoundTargets.from_keys(round_keys)
    return dg.Definitions(
        schedules=[build_close_schedule(targets, settings)],
        sensors=[
            build_new_round_sensor(targets, settings),
            build_changes_sensor(targets, settings),
            build_window_sensor(settings),
        ],
    )
