"""Run configuration of the ingestion assets (typed, with documented defaults)."""

from __future__ import annotations

import dagster as dg
from pydantic import Field


class IngestConfig(dg.Config):
    """How a round is read and which payout elections are accepted."""

    allowed_corr_multipliers: list[float] = Field(
        default=[0.0, 0.5, 1.0, 2.0],
        description="CORR multiplier elections accepted in stakes.csv; any other fails the round.",
    )
    allowed_tc_multipliers: list[float] = Field(
        default=[0.0, 0.5, 1.0, 2.0, 3.0],
        description="TC multiplier elections accepted in stakes.csv; any other fails the round.",
    )
    read_workers: int = Field(
        default=8, ge=1, description="Threads reading submission files in parallel."
    )
