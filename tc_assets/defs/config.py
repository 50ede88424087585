"""Every run configuration of the platform's assets and checks, typed, with documented defaults.

A config that carries settings of `scoring/` subclasses them, so its fields, defaults and
descriptions are written once; an asset gets the scoring settings by one route,
`settings_of(config, Settings)`, whatever else the config holds.
"""

from __future__ import annotations

from typing import TypeVar

import dagster as dg
from pydantic import BaseModel, Field

from tc_assets.io.contract import MIN_COVERAGE
from tc_assets.scoring.contribution import TCSettings
from tc_assets.scoring.metrics import MetricsSettings
from tc_assets.scoring.portfolio_weights import PortfolioPayoutSettings
from tc_assets.scoring.proxy_model import ProxySettings

S = TypeVar("S", bound=BaseModel)


def settings_of(config: BaseModel, kind: type[S]) -> S:
    """The `kind` settings held by a run config or resource: its fields of `kind`, validated."""
    return kind.model_validate(config.model_dump(include=set(kind.model_fields)))


class IngestConfig(dg.Config):
    """How a round is read and which payout elections are accepted (`round_inputs`)."""

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


class IngestionCheckConfig(dg.Config):
    """Thresholds of the ingestion checks (the contract's hard rules are enforced at ingestion)."""

    min_staked_share: float = Field(
        default=0.5,
        ge=0.0,
        le=1.0,
        description="Warn when models with a valid prediction hold less than this share of "
        "the round's stake (the meta model then speaks for few stakers).",
    )
    max_rejected_share: float = Field(
        default=0.25,
        ge=0.0,
        le=1.0,
        description="Warn when more than this share of the round's submission files is "
        "rejected (a broken upload or a changed format upstream).",
    )
    min_resolved_share: float = Field(
        default=0.95,
        ge=0.0,
        le=1.0,
        description="Warn when resolved.parquet resolves less than this share of live ids "
        f"(below {MIN_COVERAGE:.0%} ingestion refuses the file).",
    )


class MetricsConfig(dg.Config, MetricsSettings):
    """Run configuration of the metrics assets (see MetricsSettings for each field)."""


class TCConfig(dg.Config, TCSettings):
    """How TC is computed (see TCSettings for each field and its default)."""


class PortfolioPayoutConfig(dg.Config, PortfolioPayoutSettings):
    """Constants of the portfolio-weight payout design (defaults documented per field)."""


class SharpeContributionConfig(dg.Config):
    """The window of rounds the Sharpe contribution is computed over."""

    window_rounds: int = Field(
        default=20, ge=2, description="Resolved rounds, ending at this one, in the window."
    )
    min_rounds: int = Field(
        default=3,
        ge=2,
        description="Rounds a model must have submitted within the window to get a Sharpe.",
    )


class ProxyConfig(dg.Config, ProxySettings):
    """Run configuration of `tc_proxy_model` (see ProxySettings for the model's fields)."""

    fail_when_short: bool = Field(
        default=False,
        description="Fail the step when fewer than min_rounds rounds are available (default: "
        "log why and do not materialize, so that the round's job succeeds).",
    )
    plot_terms: int = Field(
        default=4, ge=1, le=7, description="Top terms whose shape functions are plotted."
    )


class DbtBuildConfig(dg.Config):
    """How a round's dbt build runs (set in the launchpad for one run)."""

    full_refresh: bool = Field(
        default=False,
        description="Rebuild every round of the selected marts from scratch (`dbt build "
        "--full-refresh`): needed after a mart's columns change, and to bring model_reputation "
        "up to date after earlier rounds were re-scored.",
    )
