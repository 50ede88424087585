"""Compare two warehouses table by table (every schema), leaving out timing columns.

Used to check that a change to how rounds are computed leaves what they produce unchanged:
score the same generated rounds with the code before and after, then

    .venv/bin/python benchmarks/compare_warehouses.py BEFORE.duckdb AFTER.duckdb

Rows are compared as sets (sorted on every column); floats must be equal, not close. Exits 1
when any table differs.
"""

from __future__ import annotations

import argparse
import sys
import warnings

import duckdb
import pandas as pd

# When a row was written, and how long a step took: different on every run.
TIMING_COLUMNS = frozenset({"ingested_at", "seconds", "ms_per_bag", "written_at"})


def tables(con: duckdb.DuckDBPyConnection) -> list[str]:
    rows = con.execute(
        "SELECT table_schema, table_name FROM information_schema.tables "
        "WHERE table_type = 'BASE TABLE' ORDER BY 1, 2"
    ).fetchall()
    return [f'"{schema}"."{name}"' for schema, name in rows]


def content(con: duckdb.DuckDBPyConnection, name: str) -> pd.DataFrame:
    with warnings.catch_warnings():  # duckdb's own use of a deprecated pandas keyword
        warnings.simplefilter("ignore")
        frame = con.execute(f"SELECT * FROM {name}").df()
    frame = frame.drop(columns=[c for c in frame.columns if c in TIMING_COLUMNS])
    return frame.sort_values(list(frame.columns)).reset_index(drop=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("before")
    ap.add_argument("after")
    args = ap.parse_args()
    with (
        duckdb.connect(args.before, read_only=True) as a,
        duckdb.connect(args.after, read_only=True) as b,
    ):
        names_a, names_b = tables(a), tables(b)
        if names_a != names_b:
            print(f"different tables: {sorted(set(names_a) ^ set(names_b))}")
        same = names_a == names_b
        for name in sorted(set(names_a) & set(names_b)):
            x, y = content(a, name), content(b, name)
            equal = list(x.columns) == list(y.columns) and x.equals(y)
            same &= equal
            print(f"{'same' if equal else 'DIFFERENT':<10} {name} ({len(x)} rows)")
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
