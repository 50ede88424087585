"""What a round's input files are, and the run tags that name them (shared with the CLI).

Every run the automation requests carries tags saying why (``tc/reason``) and which input files
it read (``tc/input_stamp``, ``tc/inputs``, ``tc/resolved``); `tc-platform run` adds the same
tags, so the changes sensor can tell what each run saw. Stamps and content hashes come from the
round source (`io/source.py`): sha256 locally, the ETag on S3.
"""

from collections.abc import Mapping
from dataclasses import dataclass

from tc_assets.io import contract as c
from tc_assets.io.source import RoundSource, SourceError, digest

TAG_REASON = "tc/reason"
TAG_INPUT_STAMP = "tc/input_stamp"
TAG_INPUTS = "tc/inputs"
TAG_RESOLVED = "tc/resolved"
PARTITION_TAG = "dagster/partition"  # set by Dagster on every run of one partition

REASON_NEW_ROUND = "new_round"
REASON_ROUND_CLOSED = "round_closed"
REASON_INGESTED = "ingested"  # ingested, never scored: score it
REASON_RESOLVED = "resolved"  # resolved.parquet arrived or changed
REASON_INPUTS_CHANGED = "inputs_changed"  # an input other than resolved.parquet changed
REASON_WINDOW = "window"  # a round of a windowed result's window was scored again


def close_time(source: RoundSource, round_number: int) -> float | None:
    """close_time of the round (POSIX seconds), None when round.json is missing or invalid."""
    try:
        info = c.validate_round_info(source.round_info(round_number), round_number)
    except (SourceError, c.RoundInputError):
        return None
    return float(info["close_time"].timestamp())


def split_stamps(
    source: RoundSource, round_number: int, stamps: Mapping[str, str]
) -> tuple[dict[str, str], str, str | None]:
    """(stamps of the inputs but resolved.parquet, path of resolved, its stamp or None)."""
    resolved_rel = source.round_path(round_number, c.RESOLVED_FILE)
    inputs = {rel: s for rel, s in stamps.items() if rel != resolved_rel}
    return inputs, resolved_rel, stamps.get(resolved_rel)


@dataclass(frozen=True)
class RoundState:
    """One round's input files as the changes sensor last saw them."""

    input_stamp: str  # digest of the stamps of every input but resolved.parquet
    inputs: str  # digest of the content hashes of the same files
    resolved_stamp: str | None  # stamp of resolved.parquet, None while absent
    resolved: str | None  # content hash of resolved.parquet, None while absent
    close_time: float | None  # from round.json; None when it cannot be read

    @property
    def content(self) -> tuple[str, str | None]:
        return self.inputs, self.resolved

    def tags(self) -> dict[str, str]:
        """The run tags naming these files: their stamp and content hashes."""
        return {
            TAG_INPUT_STAMP: self.input_stamp,
            TAG_INPUTS: self.inputs,
            TAG_RESOLVED: self.resolved or "none",
        }

    @classmethod
    def is_cached(
        cls,
        previous: "RoundState | None",
        source: RoundSource,
        round_number: int,
        stamps: Mapping[str, str],
    ) -> bool:
        """Whether `previous` already holds the content hashes for these stamps (no hashing)."""
        inputs, _, resolved_stamp = split_stamps(source, round_number, stamps)
        return (
            previous is not None
            and previous.input_stamp == digest(inputs)
            and previous.resolved_stamp == resolved_stamp
        )

    @classmethod
    def observe(
        cls,
        source: RoundSource,
        round_number: int,
        stamps: Mapping[str, str],
        previous: "RoundState | None" = None,
    ) -> "RoundState":
        """The round's state, hashing only the parts whose stamps changed since `previous`."""
        inputs, resolved_rel, resolved_stamp = split_stamps(source, round_number, stamps)
        input_stamp = digest(inputs)
        if previous is not None and previous.input_stamp == input_stamp:
            content, close = previous.inputs, previous.close_time
        else:
            content = digest(source.content_hashes(inputs))
            close = close_time(source, round_number)
        if resolved_stamp is None:
            resolved = None
        elif previous is not None and previous.resolved_stamp == resolved_stamp:
            resolved = previous.resolved
        else:
            resolved = source.content_hash(resolved_rel, resolved_stamp)
        return cls(input_stamp, content, resolved_stamp, resolved, close)


def run_tags(source: RoundSource, round_number: int) -> dict[str, str]:
    """Tags naming the files a run of the round reads now (stamp and content hashes): a full
    `score_round` run carrying them (`tc-platform run` adds them) is adopted by the changes
    sensor as scored on exactly these files, instead of being scored again."""
    return RoundState.observe(source, round_number, source.round_stamps(round_number)).tags()


def input_stamp(source: RoundSource, round_number: int) -> str:
    """The `tc/input_stamp` tag of a run that ingests the round now."""
    inputs, _, _ = split_stamps(source, round_number, source.round_stamps(round_number))
    return digest(inputs)
