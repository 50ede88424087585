"""The automation's settings: the tournament's calendar and how often the daemon looks."""

import os
from collections.abc import Mapping
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import dagster as dg
from pydantic import BaseModel, Field, field_validator


class AutomationSettings(BaseModel, frozen=True):
    """The tournament's calendar and how often the daemon looks at the source.

    `from_env` reads each field from ``TC_<FIELD>`` (e.g. ``TC_ROUND_CLOSE_CRON``), so the
    code location picks them up from the environment of `dagster dev` or the daemon.
    """

    round_close_cron: str = Field(
        "0 13 * * 2-6",
        description="When rounds close, as a cron string in `round_timezone`; the close "
        "schedule's cadence. Default: Tuesday to Saturday at 13:00 (rounds open at 12:00).",
    )
    round_timezone: str = Field("UTC", description="IANA time zone of `round_close_cron`.")
    close_lookback_hours: float = Field(
        168.0,
        gt=0,
        description="How far back a schedule tick looks for closed rounds not ingested since "
        "they closed (a week covers the weekend gap and a missed tick or two).",
    )
    new_round_interval_s: int = Field(
        30, ge=1, description="Seconds between two looks of the new-round sensor."
    )
    round_changes_interval_s: int = Field(
        60, ge=1, description="Seconds between two looks of the round-changes sensor."
    )
    window_refresh_interval_s: int = Field(
        60,
        ge=1,
        description="Seconds between two looks of the window-refresh sensor, which scores "
        "again the windowed results of later rounds when a round is scored again.",
    )
    dead_runs_interval_s: int = Field(
        30,
        ge=1,
        description="Seconds between two looks of the dead-runs sensor, which fails runs whose "
        "process is gone and frees their pool slots.",
    )
    score_delay_s: float = Field(
        600.0,
        ge=0,
        description="Seconds after a round's close_time before the changes sensor scores it, "
        "so that the close schedule's re-ingestion goes first.",
    )
    hash_budget_s: float = Field(
        20.0,
        gt=0,
        description="Seconds one changes-sensor tick may spend hashing changed files; rounds "
        "left over are hashed on the next tick (a tick must end well within a minute).",
    )
    running_by_default: bool = Field(
        True,
        description="Start the schedule and sensors as soon as the code loads (no click in "
        "the UI); a status set in the UI overrides this.",
    )

    @field_validator("round_timezone")
    @classmethod
    def _known_timezone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown time zone {value!r}") from exc
        return value

    @property
    def sensor_status(self) -> dg.DefaultSensorStatus:
        """The sensors' status until one is set in the UI."""
        running = self.running_by_default
        return dg.DefaultSensorStatus.RUNNING if running else dg.DefaultSensorStatus.STOPPED

    @property
    def schedule_status(self) -> dg.DefaultScheduleStatus:
        """The schedule's status until one is set in the UI."""
        running = self.running_by_default
        return dg.DefaultScheduleStatus.RUNNING if running else dg.DefaultScheduleStatus.STOPPED

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> "AutomationSettings":
        """Settings from ``TC_<FIELD NAME IN CAPITALS>`` variables; defaults for the rest."""
        values = {
            name: environ[f"TC_{name.upper()}"]
            for name in cls.model_fields
            if environ.get(f"TC_{name.upper()}", "") != ""
        }
        return cls.model_validate(values)
