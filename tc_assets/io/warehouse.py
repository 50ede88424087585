"""The warehouse: round-partitioned tables with idempotent writes, on one of two backends.

* `duckdb` (the default): one DuckDB file. DuckDB allows one writing process per file: every
  Dagster asset that writes shares one concurrency pool (limit 1), and a connection that finds
  the file locked by another process waits and retries instead of failing at once.
* `ducklake`: a DuckLake (lake.py): the catalog in PostgreSQL (or SQLite / a DuckDB file on one
  machine), the data as Parquet files on S3 or a local directory. Many processes on many
  machines write at once; each commit is one snapshot.

Writing a partition (a round) deletes that partition's rows and inserts the new ones in ONE
transaction, for every table given, so a re-run never duplicates or loses rows and a failure
midway leaves the previous rows intact. On the lake, two writers whose transactions touch the
same table (one deleting rows the other's snapshot changed) or the same partition conflict at
commit: the loser's transaction is rolled back and run again from the start, up to
`conflict_retries` times, then fails with a message. To make two writers of the same partition
always conflict, even when neither has rows to delete (a round's first write), each write also
replaces a marker view `_partitions."<table>/<key>"`: DuckLake refuses two concurrent
replacements of one view. Writers of different partitions whose rows are new never conflict.
The lake's tables are all created in one transaction, once, before the first write.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa

from tc_assets.io import lake
from tc_assets.io.tables import TABLES, Table, table

Frame = pd.DataFrame | pa.Table
T = TypeVar("T")
log = logging.getLogger(__name__)

BACKENDS = ("duckdb", "ducklake")
MARKER_SCHEMA = "_partitions"


class WarehouseError(RuntimeError):
    """A write or read of the warehouse failed; the message names the table and partition."""


class WarehouseLocked(WarehouseError):
    """Another process held the file's lock for longer than the wait: worth trying later."""


def lock_wait_message(path: str | Path, waited_s: float, detail: str) -> str:
    """What a connection that gave up waiting for the file's lock says (Python steps and dbt)."""
    return (
        f"warehouse {path} stayed locked by another process for {waited_s:.0f}s "
        f"(WarehouseResource.lock_timeout_s); close other connections to it (a notebook, a "
        f"DuckDB shell) or raise the wait. DuckDB said: {detail}"
    )


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def backend_of(location: str | Path) -> str:
    """`ducklake` for a DuckLake catalog (`ducklake:...`), else `duckdb` (a file path)."""
    return "ducklake" if lake.is_lake(str(location)) else "duckdb"


class Warehouse:
    """The platform's tables in a DuckDB file or a DuckLake (chosen by `location`).

    `location` is a DuckDB file path, or a DuckLake catalog `ducklake:postgres:<dsn>`
    (`ducklake:sqlite:<file>`, `ducklake:<file>`) with `data_path` the lake's data folder
    (`s3://bucket/prefix/` or a directory).
    """

    def __init__(
        self,
        location: str | Path,
        lock_timeout_s: float = 300.0,
        data_path: str | None = None,
        conflict_retries: int = 10,
        retry_wait_s: float = 0.2,
    ) -> None:
        self.backend = backend_of(location)
        self.lock_timeout_s = lock_timeout_s
        self.conflict_retries = conflict_retries
        self.retry_wait_s = retry_wait_s
        self._schema_ready = False
        if self.backend == "ducklake":
            if not data_path:
                raise WarehouseError(
                    f"the lake {lake.redact(str(location))} needs a data path "
                    f"(s3://bucket/prefix/ or a directory; {lake.DATA_PATH_ENV})"
                )
            self.location = str(location)
            self.data_path: str | None = data_path
            self.path: Path | None = None
        else:
            self.path = Path(location).expanduser().resolve()
            self.location = str(self.path)
            self.data_path = None

    @property
    def _name(self) -> str:
        """The file's path, or the lake's catalog without its password (for messages)."""
        return lake.redact(self.location) if self.backend == "ducklake" else self.location

    def describe(self) -> str:
        """Where the tables are, fit for a log line (no password)."""
        if self.backend == "ducklake":
            return f"DuckLake {lake.redact(self.location)} (data {self.data_path})"
        return f"DuckDB file {self.path}"

    # Connections -------------------------------------------------------------------------

    @contextmanager
    def connect(self, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
        """A short-lived connection. On the file, waits while another process holds its lock;
        on the lake, an in-memory DuckDB with the lake attached and selected."""
        con = self._connect_lake() if self.backend == "ducklake" else self._connect_file(read_only)
        try:
            yield con
        finally:
            con.close()

    def _connect_file(self, read_only: bool) -> duckdb.DuckDBPyConnection:
        assert self.path is not None
        if read_only and not self.path.exists():
            raise WarehouseError(f"warehouse {self.path} does not exist yet (nothing written)")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        path = str(self.path)
        return self._waiting_for_lock(
            lambda: duckdb.connect(path, read_only=read_only), duckdb.IOException
        )

    def _connect_lake(self) -> duckdb.DuckDBPyConnection:
        # Only a DuckDB catalog file can be locked (by another process).
        return self._waiting_for_lock(
            lambda: lake.cursor(self.location, self.data_path), lake.LakeError
        )

    def _waiting_for_lock(
        self, open_: Callable[[], duckdb.DuckDBPyConnection], error: type[Exception]
    ) -> duckdb.DuckDBPyConnection:
        """`open_()`, retried while it fails on another process's lock, up to lock_timeout_s."""
        start = time.monotonic()
        delay = 0.05
        while True:
            try:
                return open_()
            except error as exc:
                waited = time.monotonic() - start
                if "lock" not in str(exc).lower():
                    raise WarehouseError(f"cannot open {self._name}: {exc}") from exc
                if waited > self.lock_timeout_s:
                    raise WarehouseLocked(lock_wait_message(self._name, waited, str(exc))) from exc
                time.sleep(delay)
                delay = min(delay * 2, 2.0)
            except duckdb.Error as exc:  # not a DuckDB file, a newer format, ...
                raise WarehouseError(f"cannot open {self._name}: {exc}") from exc

    def exists(self) -> bool:
        """Whether anything can have been written yet (the file exists; a lake always may)."""
        return self.backend == "ducklake" or (self.path is not None and self.path.exists())

    # Schema ------------------------------------------------------------------------------

    @staticmethod
    def _columns(con: duckdb.DuckDBPyConnection) -> dict[str, set[str]]:
        """Columns of each table of the connection's current schema."""
        rows = con.execute(
            "SELECT table_name, column_name FROM information_schema.columns "
            "WHERE table_catalog = current_database() AND table_schema = current_schema()"
        ).fetchall()
        out: dict[str, set[str]] = {}
        for name, column in rows:
            out.setdefault(name, set()).add(column)
        return out

    @staticmethod
    def _schema_sql(spec: Table, existing: set[str] | None) -> list[str]:
        """Statements that bring a table to its contract: create it, or add new columns (columns
        added to the contract later are added to older warehouses, never dropped)."""
        if existing is None:
            cols = ", ".join(f"{_quote(c)} {t}" for c, t in spec.columns)
            return [f"CREATE TABLE IF NOT EXISTS {_quote(spec.name)} ({cols})"]
        return [
            f"ALTER TABLE {_quote(spec.name)} ADD COLUMN {_quote(c)} {t}"
            for c, t in spec.columns
            if c not in existing
        ]

    def _ensure(self, con: duckdb.DuckDBPyConnection, names: Sequence[str]) -> None:
        """Create or extend the tables a write needs. The file does it table by table (one
        writer). The lake does every table and the marker schema in one transaction, once: a
        concurrent writer doing the same conflicts, and its retry finds them made."""
        if self.backend == "duckdb":
            existing = self._columns(con)
            for name in names:
                for sql in self._schema_sql(table(name), existing.get(name)):
                    con.execute(sql)
            return
        if self._schema_ready:
            return
        existing = self._columns(con)
        statements = [
            sql
            for spec in TABLES.values()
            for sql in self._schema_sql(spec, existing.get(spec.name))
        ]
        if statements:
            statements.insert(0, f"CREATE SCHEMA IF NOT EXISTS {MARKER_SCHEMA}")

            def create(c: duckdb.DuckDBPyConnection) -> None:
                for sql in statements:
                    c.execute(sql)

            self._in_transaction(con, "creating the lake's tables", create)
        self._schema_ready = True

    # Transactions ------------------------------------------------------------------------

    def _in_transaction(
        self,
        con: duckdb.DuckDBPyConnection,
        what: str,
        work: Callable[[duckdb.DuckDBPyConnection], T],
    ) -> T:
        """Run `work` in one transaction on `con`; on a lake conflict, roll back and run it
        again (with a growing, jittered wait) up to `conflict_retries` times."""
        attempt = 0
        while True:
            con.execute("BEGIN TRANSACTION")
            try:
                result = work(con)
                con.execute("COMMIT")
                return result
            except BaseException as exc:
                # A failed COMMIT has already ended the transaction.
                with contextlib.suppress(duckdb.Error):
                    con.execute("ROLLBACK")
                if not lake.is_conflict(exc):
                    if isinstance(exc, duckdb.Error):
                        raise WarehouseError(f"{what} failed, nothing written: {exc}") from exc
                    raise
                if attempt >= self.conflict_retries:
                    raise WarehouseError(
                        f"{what}: another writer changed the same tables at the same time, "
                        f"{attempt + 1} attempts in a row; nothing written "
                        f"(conflict_retries={self.conflict_retries}): {exc}"
                    ) from exc
                attempt += 1
                wait = self.retry_wait_s * (1.5 ** (attempt - 1)) * (0.5 + random.random())
                log.warning(
                    "%s conflicted with another writer; retrying (%d of %d) in %.2fs",
                    what,
                    attempt,
                    self.conflict_retries,
                    wait,
                )
                time.sleep(wait)

    def _write(
        self,
        what: str,
        names: Sequence[str],
        key: int,
        work: Callable[[duckdb.DuckDBPyConnection], T],
    ) -> T:
        """`work` in one transaction that owns partition `key` of the named tables."""

        def claimed(con: duckdb.DuckDBPyConnection) -> T:
            if self.backend == "ducklake":
                for name in names:
                    marker = f"{MARKER_SCHEMA}.{_quote(f'{name}/{key}')}"
                    con.execute(f"CREATE OR REPLACE VIEW {marker} AS SELECT {int(key)} AS key")
            return work(con)

        with self.connect() as con:
            self._ensure(con, names)
            return self._in_transaction(con, what, claimed)

    # Writes ------------------------------------------------------------------------------

    def write_round(self, round_number: int, tables: Mapping[str, Frame]) -> dict[str, int]:
        """Replace `round_number`'s rows of every given table, all in one transaction."""
        return self.write_partition(int(round_number), tables)

    def write_partition(self, key: int, tables: Mapping[str, Frame]) -> dict[str, int]:
        """Replace the rows whose partition column equals `key` in each table, atomically.

        Returns rows written per table. Each frame must carry exactly the table's columns
        (the partition column may be omitted: it is filled with `key`).
        """
        prepared = {name: self._prepare(table(name), key, df) for name, df in tables.items()}
        first = next(iter(prepared), "")
        what = (
            f"writing {table(first).partition if first else 'round'}={key} of {', '.join(prepared)}"
        )

        def replace(con: duckdb.DuckDBPyConnection) -> dict[str, int]:
            counts: dict[str, int] = {}
            for name, data in prepared.items():
                spec = table(name)
                self._delete(con, spec, key)
                self._insert(con, spec, data)
                counts[name] = data.num_rows
            return counts

        return self._write(what, list(prepared), key, replace)

    def clear_partition(self, key: int, names: Sequence[str]) -> None:
        """Delete the rows of partition `key` from each named table, in one transaction (for a
        result that no longer exists, e.g. a window now too short to fit)."""
        present = set(self.table_names())
        specs = [table(name) for name in names if name in present]
        if not specs:
            return

        def clear(con: duckdb.DuckDBPyConnection) -> None:
            for spec in specs:
                self._delete(con, spec, key)

        self._write(
            f"clearing {key} of {', '.join(s.name for s in specs)}",
            [s.name for s in specs],
            key,
            clear,
        )

    def update_columns(
        self, name: str, key: int, frame: Frame, on: tuple[str, ...], columns: tuple[str, ...]
    ) -> int:
        """Set `columns` of existing rows of partition `key`, matched on `on`; one transaction.

        For a table filled by two assets (e.g. meta_model's swmm, then its optimized weight).
        Rows of the partition that `frame` does not match get NULL in `columns`.
        """
        spec = table(name)
        data = self._prepare(spec, key, frame, subset=(spec.partition, *on, *columns))
        sets = ", ".join(f"{_quote(c)} = u.{_quote(c)}" for c in columns)
        match = " AND ".join(f"t.{_quote(c)} = u.{_quote(c)}" for c in on)
        nulls = ", ".join(f"{_quote(c)} = NULL" for c in columns)

        def update(con: duckdb.DuckDBPyConnection) -> int:
            con.register("_update_frame", data)
            try:
                con.execute(
                    f"UPDATE {_quote(name)} SET {nulls} WHERE {_quote(spec.partition)} = ?", [key]
                )
                con.execute(
                    f"UPDATE {_quote(name)} AS t SET {sets} FROM _update_frame AS u "
                    f"WHERE t.{_quote(spec.partition)} = ? AND {match}",
                    [key],
                )
            finally:
                con.unregister("_update_frame")
            return data.num_rows

        return self._write(f"updating {', '.join(columns)} of {name} {key}", [name], key, update)

    @staticmethod
    def _delete(con: duckdb.DuckDBPyConnection, spec: Table, key: int) -> None:
        con.execute(f"DELETE FROM {_quote(spec.name)} WHERE {_quote(spec.partition)} = ?", [key])

    @staticmethod
    def _insert(con: duckdb.DuckDBPyConnection, spec: Table, data: pa.Table) -> None:
        con.register("_insert_frame", data)
        try:
            cols = ", ".join(_quote(c) for c in data.column_names)
            con.execute(
                f"INSERT INTO {_quote(spec.name)} ({cols}) SELECT {cols} FROM _insert_frame"
            )
        finally:
            con.unregister("_insert_frame")

    @staticmethod
    def _prepare(
        spec: Table, key: int, frame: Frame, subset: tuple[str, ...] | None = None
    ) -> pa.Table:
        data = (
            frame
            if isinstance(frame, pa.Table)
            else pa.Table.from_pandas(frame, preserve_index=False)
        )
        allowed = subset or tuple(spec.column_names)
        extra = [c for c in data.column_names if c not in allowed]
        if extra:
            raise WarehouseError(f"{spec.name}: columns {extra} are not in the table's schema")
        if spec.partition not in data.column_names:
            data = data.append_column(
                spec.partition, pa.array(np.full(data.num_rows, key, dtype=np.int32))
            )
        else:
            values = set(data.column(spec.partition).to_pylist())
            if values - {key}:
                raise WarehouseError(
                    f"{spec.name}: rows for {spec.partition} {sorted(values - {key})[:5]} "
                    f"in a write of {spec.partition}={key}"
                )
        missing = [c for c in allowed if c not in data.column_names]
        if missing:
            raise WarehouseError(f"{spec.name}: missing columns {missing}")
        return data.select(list(allowed))

    # Copy -------------------------------------------------------------------------------

    def copy_from_file(self, source: str | Path) -> dict[str, int]:
        """Copy a DuckDB warehouse file into this lake, in one transaction: every platform table
        (`main`) and the dbt marts (`reporting`); dbt's staging views are made by its next
        build. The lake's tables must be empty (a copy never overwrites rows scored in the
        lake). Returns rows copied per `schema.table`."""
        if self.backend != "ducklake":
            raise WarehouseError("copy_from_file copies into a lake: give a ducklake: location")
        path = Path(source).expanduser().resolve()
        if not path.exists():
            raise WarehouseError(f"no DuckDB warehouse at {path}")
        with self.connect() as con:
            self._ensure(con, list(TABLES))
            con.execute(f"ATTACH {lake.sql_string(str(path))} AS tc_copy_source (READ_ONLY)")
            try:
                found = con.execute(
                    "SELECT table_schema, table_name FROM information_schema.tables "
                    "WHERE table_catalog = 'tc_copy_source' AND table_type = 'BASE TABLE' "
                    "AND table_schema IN ('main', 'reporting') ORDER BY 1, 2"
                ).fetchall()
                occupied = [
                    name
                    for schema, name in found
                    if schema == "main"
                    and name in TABLES
                    and con.execute(f"SELECT count(*) FROM main.{_quote(name)}").fetchone()[0]
                ]
                if occupied:
                    raise WarehouseError(
                        f"the lake already has rows in {', '.join(occupied)}: copy into an "
                        "empty lake"
                    )
                return self._in_transaction(
                    con, f"copying {path} into the lake", lambda c: self._copy(c, found)
                )
            finally:
                con.execute("DETACH tc_copy_source")

    @staticmethod
    def _copy(con: duckdb.DuckDBPyConnection, found: Sequence[tuple[str, str]]) -> dict[str, int]:
        counts: dict[str, int] = {}
        for schema, name in found:
            src = f"tc_copy_source.{_quote(schema)}.{_quote(name)}"
            if schema == "main" and name not in TABLES:
                continue  # not a platform table
            if schema == "main":
                present = {
                    r[0]
                    for r in con.execute(
                        "SELECT column_name FROM information_schema.columns WHERE "
                        "table_catalog = 'tc_copy_source' AND table_schema = 'main' "
                        "AND table_name = ?",
                        [name],
                    ).fetchall()
                }
                cols = ", ".join(_quote(c) for c in table(name).column_names if c in present)
                con.execute(f"INSERT INTO main.{_quote(name)} ({cols}) SELECT {cols} FROM {src}")
            else:
                con.execute(f"CREATE SCHEMA IF NOT EXISTS {_quote(schema)}")
                con.execute(
                    f"CREATE OR REPLACE TABLE {_quote(schema)}.{_quote(name)} AS SELECT * FROM {src}"
                )
            counts[f"{schema}.{name}"] = con.execute(f"SELECT count(*) FROM {src}").fetchone()[0]
        return counts

    # Reads -------------------------------------------------------------------------------

    def query(self, sql: str, params: list[Any] | None = None) -> pd.DataFrame:
        """Run a read-only query and return a DataFrame."""
        with self.connect(read_only=True) as con:
            return con.execute(sql, params or []).df()

    def read_round(self, name: str, round_number: int) -> pd.DataFrame:
        """All rows of one partition of a table (empty if the table does not exist yet)."""
        spec = table(name)
        if name not in self.table_names():
            return pd.DataFrame(columns=spec.column_names)
        return self.query(
            f"SELECT * FROM {_quote(name)} WHERE {_quote(spec.partition)} = ? "
            f"ORDER BY {', '.join(_quote(k) for k in spec.key) or 1}",
            [int(round_number)],
        )

    def table_names(self) -> list[str]:
        """The tables written so far (on the lake: every table, once the first write made them)."""
        if not self.exists():
            return []
        with self.connect(read_only=True) as con:
            return sorted(r[0] for r in con.execute("SHOW TABLES").fetchall())

    def partitions(self, name: str) -> list[int]:
        """The partition keys present in a table."""
        if name not in self.table_names():
            return []
        spec = TABLES[name]
        col = _quote(spec.partition)
        rows = self.query(f"SELECT DISTINCT {col} AS k FROM {_quote(name)} ORDER BY 1")
        return [int(k) for k in rows["k"]]
