"""The DuckDB warehouse: one file, round-partitioned tables, idempotent writes.

Writing a partition (a round) deletes that partition's rows and inserts the new ones in ONE
transaction, for every table given, so a re-run never duplicates or loses rows and a failure
midway leaves the previous rows intact. DuckDB allows one writing process per file: every
Dagster asset that writes shares one concurrency pool (limit 1), and a connection that finds the
file locked by another process waits and retries instead of failing at once.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa

from tc_assets.io.tables import TABLES, Table, table

Frame = pd.DataFrame | pa.Table


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


class Warehouse:
    """A DuckDB file holding the platform's tables."""

    def __init__(self, path: str | Path, lock_timeout_s: float = 300.0) -> None:
        self.path = Path(path).expanduser().resolve()
        self.lock_timeout_s = lock_timeout_s

    # Connections -------------------------------------------------------------------------

    @contextmanager
    def connect(self, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
        """A short-lived connection; waits while another process holds the file's lock."""
        if read_only and not self.path.exists():
            raise WarehouseError(f"warehouse {self.path} does not exist yet (nothing written)")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        start = time.monotonic()
        delay = 0.05
        while True:
            try:
                con = duckdb.connect(str(self.path), read_only=read_only)
                break
            except duckdb.IOException as exc:
                waited = time.monotonic() - start
                if "lock" not in str(exc).lower():
                    raise WarehouseError(f"cannot open {self.path}: {exc}") from exc
                if waited > self.lock_timeout_s:
                    raise WarehouseLocked(lock_wait_message(self.path, waited, str(exc))) from exc
                time.sleep(delay)
                delay = min(delay * 2, 2.0)
            except duckdb.Error as exc:  # not a DuckDB file, a newer format, ...
                raise WarehouseError(f"cannot open {self.path}: {exc}") from exc
        try:
            yield con
        finally:
            con.close()

    # Schema ------------------------------------------------------------------------------

    def _ensure(self, con: duckdb.DuckDBPyConnection, spec: Table) -> None:
        cols = ", ".join(f"{_quote(c)} {t}" for c, t in spec.columns)
        con.execute(f"CREATE TABLE IF NOT EXISTS {_quote(spec.name)} ({cols})")
        existing = {
            r[0]
            for r in con.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_name = ?",
                [spec.name],
            ).fetchall()
        }
        # Columns added to the contract later are added to older warehouses, never dropped.
        for c, t in spec.columns:
            if c not in existing:
                con.execute(f"ALTER TABLE {_quote(spec.name)} ADD COLUMN {_quote(c)} {t}")

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
        counts: dict[str, int] = {}
        with self.connect() as con:
            for name in prepared:
                self._ensure(con, table(name))
            con.execute("BEGIN TRANSACTION")
            try:
                for name, data in prepared.items():
                    spec = table(name)
                    self._delete(con, spec, key)
                    self._insert(con, spec, data)
                    counts[name] = data.num_rows
                con.execute("COMMIT")
            except BaseException as exc:
                con.execute("ROLLBACK")
                if isinstance(exc, duckdb.Error):
                    raise WarehouseError(
                        f"writing {spec.partition}={key} of {name} failed, nothing written: {exc}"
                    ) from exc
                raise
        return counts

    def clear_partition(self, key: int, names: Sequence[str]) -> None:
        """Delete the rows of partition `key` from each named table, in one transaction (for a
        result that no longer exists, e.g. a window now too short to fit)."""
        present = set(self.table_names())
        specs = [table(name) for name in names if name in present]
        if not specs:
            return
        with self.connect() as con:
            con.execute("BEGIN TRANSACTION")
            try:
                for spec in specs:
                    self._delete(con, spec, key)
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise

    def update_columns(
        self, name: str, key: int, frame: Frame, on: tuple[str, ...], columns: tuple[str, ...]
    ) -> int:
        """Set `columns` of existing rows of partition `key`, matched on `on`; one transaction.

        For a table filled by two assets (e.g. meta_model's swmm, then its optimized weight).
        Rows of the partition that `frame` does not match get NULL in `columns`.
        """
        spec = table(name)
        data = self._prepare(spec, key, frame, subset=(spec.partition, *on, *columns))
        with self.connect() as con:
            self._ensure(con, spec)
            con.execute("BEGIN TRANSACTION")
            try:
                con.register("_update_frame", data)
                sets = ", ".join(f"{_quote(c)} = u.{_quote(c)}" for c in columns)
                match = " AND ".join(f"t.{_quote(c)} = u.{_quote(c)}" for c in on)
                nulls = ", ".join(f"{_quote(c)} = NULL" for c in columns)
                con.execute(
                    f"UPDATE {_quote(name)} SET {nulls} WHERE {_quote(spec.partition)} = ?", [key]
                )
                con.execute(
                    f"UPDATE {_quote(name)} AS t SET {sets} FROM _update_frame AS u "
                    f"WHERE t.{_quote(spec.partition)} = ? AND {match}",
                    [key],
                )
                con.unregister("_update_frame")
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise
        return data.num_rows

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
        if not self.path.exists():
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
