"""Round sources: where rounds come from. A local folder or an S3 prefix.

A source only reads bytes and lists names; parsing and validation live in `ingest.py` and
`contract.py`, so both kinds of source are read by exactly the same code. Paths are built
only from fixed file names and from names that already passed the contract's patterns.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from tc_assets.io.contract import (
    EXAMPLE_FILE,
    FEATURES_FILE,
    LIVE_FILE,
    MARKET_FILE,
    PORTFOLIOS_DIR,
    PREDICTIONS_DIR,
    RESOLVED_FILE,
    ROUND_DIR_PATTERN,
    ROUND_FILE,
    STAKES_FILE,
    SUBMISSION_SUFFIXES,
)

# Files of rounds/<R>/ that ingestion reads (plus submissions and the root's features.json).
ROUND_INPUT_FILES = frozenset(
    {ROUND_FILE, LIVE_FILE, EXAMPLE_FILE, MARKET_FILE, STAKES_FILE, RESOLVED_FILE}
)


class SourceError(OSError):
    """A file of the round source cannot be read (missing, unreadable, unreachable)."""


class SourceUnavailable(SourceError):
    """The source could not be reached (throttling, a server error, a broken connection) even
    after the client's retries: nothing is known about the file, so nothing may be concluded
    from it. The round's step fails and is retried later, and no submission is rejected."""


class RoundSource(ABC):
    """Read-only access to a round source laid out as in the contract."""

    @property
    @abstractmethod
    def uri(self) -> str:
        """Where the source is, for messages and metadata."""

    @abstractmethod
    def read_bytes(self, rel: str) -> bytes:
        """The content of the file at `rel` (a '/'-separated path under the root)."""

    @abstractmethod
    def exists(self, rel: str) -> bool:
        """Whether a file exists at `rel`."""

    @abstractmethod
    def list_names(self, rel_dir: str) -> list[str]:
        """Names of the files and folders directly inside `rel_dir` (sorted; [] if absent)."""

    @abstractmethod
    def stamps(self, rel_dir: str) -> dict[str, str]:
        """A change stamp of every file under `rel_dir`, keyed by its path from the root.

        Cheap (listings and stats, no reads): a stamp that did not change means the file did
        not; a changed stamp means the file must be hashed to know whether its content did.
        """

    @abstractmethod
    def file_stamp(self, rel: str) -> str | None:
        """The change stamp of one file, None when it does not exist."""

    def fingerprint(self, rel: str) -> str:
        """A content hash of the file, used to detect changed inputs (not its timestamp)."""
        return hashlib.sha256(self.read_bytes(rel)).hexdigest()

    def content_hash(self, rel: str, stamp: str) -> str:
        """The content hash of a file whose change stamp is `stamp` (read and hashed here)."""
        return self.fingerprint(rel)

    def content_hashes(self, stamps: Mapping[str, str]) -> dict[str, str]:
        """Content hash by path of every file of `stamps`."""
        return {rel: self.content_hash(rel, stamp) for rel, stamp in stamps.items()}

    def round_stamps(self, round_number: int) -> dict[str, str]:
        """A change stamp for every file of the round that ingestion reads, keyed by path."""
        base = self.round_path(round_number)
        stamps = self.stamps(base)
        features = self.file_stamp(FEATURES_FILE)
        if features is not None:
            stamps[FEATURES_FILE] = features
        return {rel: s for rel, s in stamps.items() if is_round_input(rel, base)}

    # Helpers shared by every kind of source.

    def round_numbers(self) -> list[int]:
        """Rounds with a folder under rounds/ whose name is a round number (others ignored)."""
        return sorted(int(n) for n in self.list_names("rounds") if ROUND_DIR_PATTERN.fullmatch(n))

    def round_path(self, round_number: int, name: str = "") -> str:
        base = f"rounds/{int(round_number)}"
        return f"{base}/{name}" if name else base

    def read_json(self, rel: str) -> Any:
        try:
            return json.loads(self.read_bytes(rel))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SourceError(f"{self.uri}/{rel}: not valid JSON ({exc})") from exc

    def read_table(self, rel: str) -> pd.DataFrame:
        """A .csv or .parquet file as a DataFrame; `id` and `model_id` always read as strings."""
        return self.read_arrow(rel).to_pandas()

    def read_arrow(self, rel: str) -> pa.Table:
        """A .csv or .parquet file as an Arrow table (what `read_table` converts to pandas)."""
        data = self.read_bytes(rel)
        suffix = rel.rsplit(".", 1)[-1].lower()
        try:
            if suffix == "parquet":
                # ParquetFile.read, unlike read_table, keeps a repeated column name, which the
                # contract then rejects with its own rule instead of a parse error.
                table = pq.ParquetFile(io.BytesIO(data)).read()
            elif suffix == "csv":
                table = pacsv.read_csv(
                    io.BytesIO(data),
                    convert_options=pacsv.ConvertOptions(
                        column_types={"id": pa.string(), "model_id": pa.string()},
                        # Only an empty field is missing: "NA", "null" or "nan" are valid ids
                        # and model ids (a float column still reads "nan" as NaN).
                        null_values=[""],
                        strings_can_be_null=True,
                    ),
                )
            else:
                raise SourceError(f"{self.uri}/{rel}: unsupported file type")
        except (pa.ArrowInvalid, pa.ArrowTypeError, OSError) as exc:
            raise SourceError(f"{self.uri}/{rel}: cannot be parsed ({exc})") from exc
        return table

    def feature_sets(self) -> Any:
        return self.read_json(FEATURES_FILE)

    def round_info(self, round_number: int) -> Any:
        return self.read_json(self.round_path(round_number, ROUND_FILE))


class LocalRoundSource(RoundSource):
    """A round source in a local folder."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().resolve()

    @property
    def uri(self) -> str:
        return str(self.root)

    def _path(self, rel: str) -> Path:
        path = (self.root / rel).resolve()
        if self.root not in path.parents and path != self.root:
            raise SourceError(f"{rel!r} is outside the source root")
        return path

    def read_bytes(self, rel: str) -> bytes:
        try:
            return self._path(rel).read_bytes()
        except OSError as exc:
            raise SourceError(f"{self.uri}/{rel}: {exc.strerror or exc}") from exc

    def exists(self, rel: str) -> bool:
        return self._path(rel).is_file()

    def list_names(self, rel_dir: str) -> list[str]:
        path = self._path(rel_dir)
        if not path.is_dir():
            return []
        return sorted(p.name for p in path.iterdir())

    def file_stamp(self, rel: str) -> str | None:
        """size:mtime:ctime:inode. Any write changes ctime (which, unlike mtime, cannot be set
        back), and a file replaced by a rename gets a new inode: a rewrite never keeps it."""
        try:
            st = self._path(rel).stat()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise SourceError(f"{self.uri}/{rel}: {exc.strerror or exc}") from exc
        return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}"

    def stamps(self, rel_dir: str) -> dict[str, str]:
        """The stamps of the files in `rel_dir` and in its sub-folders (one level down)."""
        out: dict[str, str] = {}
        try:
            with os.scandir(self._path(rel_dir)) as entries:
                for entry in entries:
                    if entry.is_dir():
                        with os.scandir(entry.path) as inner:
                            names = [f"{entry.name}/{sub.name}" for sub in inner if sub.is_file()]
                    else:
                        names = [entry.name] if entry.is_file() else []
                    for name in names:
                        stamp = self.file_stamp(f"{rel_dir}/{name}")
                        if stamp is not None:  # vanished meanwhile: stamps say what is there
                            out[f"{rel_dir}/{name}"] = stamp
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise SourceError(f"{self.uri}/{rel_dir}: {exc.strerror or exc}") from exc
        return out


def is_round_input(rel: str, base: str) -> bool:
    """Whether ingestion reads the file at `rel` (a path from the source's root) for the round
    whose folder is `base`."""
    if rel == FEATURES_FILE:
        return True
    if not rel.startswith(base + "/"):
        return False
    parts = rel[len(base) + 1 :].split("/")
    if len(parts) == 1:
        return parts[0] in ROUND_INPUT_FILES
    return (
        len(parts) == 2
        and parts[0] in (PREDICTIONS_DIR, PORTFOLIOS_DIR)
        and parts[1].endswith(SUBMISSION_SUFFIXES)
    )


def digest(items: Mapping[str, str]) -> str:
    """One short hash of a mapping of paths to stamps or hashes (order-free)."""
    h = hashlib.sha256()
    for rel in sorted(items):
        h.update(f"{rel}\t{items[rel]}\n".encode())
    return h.hexdigest()[:32]
