"""DuckLake: the warehouse's tables in a lake (catalog in PostgreSQL, Parquet data on S3).

A DuckDB connection becomes a lake connection by loading three extensions (`ducklake`,
`postgres`, `httpfs`), creating an S3 secret from the environment when the data lives on S3,
and `ATTACH 'ducklake:<catalog>' AS lake (DATA_PATH '<data path>')`. Every table, query and
transaction of the warehouse then runs unchanged on the lake.

Extensions come from DuckDB's extension repository at first use (the production path), or,
where the machine cannot reach it, from the packaged builds of the `lake` extra
(`duckdb-extension-ducklake`, `-postgres`, `-httpfs`, built for the pinned DuckDB release).

Catalogs: `ducklake:postgres:<libpq string or postgresql:// URL>` for many writers on many
machines; `ducklake:sqlite:<file>` for several processes on one machine; `ducklake:<file>`
(a DuckDB file) for one process.
"""

from __future__ import annotations

import importlib
import os
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import duckdb

LAKE_PREFIX = "ducklake:"
ALIAS = "lake"
DATA_PATH_ENV = "TC_LAKE_DATA_PATH"
S3_ENDPOINT_ENV = "TC_S3_ENDPOINT_URL"
EXTENSIONS = ("httpfs", "postgres", "ducklake")
# DuckLake names a conflict between two writers' snapshots this way; anything else is not one.
CONFLICT_MARKER = "transaction conflict"


class LakeError(RuntimeError):
    """The lake cannot be opened: a missing extension, data path or catalog."""


def is_lake(location: str) -> bool:
    """True when a warehouse location names a DuckLake catalog (`ducklake:...`)."""
    return str(location).startswith(LAKE_PREFIX)


def many_writers(catalog: str) -> bool:
    """Whether processes can share the catalog: a PostgreSQL (or SQLite, MySQL) catalog, yes; a
    DuckDB catalog file (`ducklake:<file>`) is opened by one process at a time."""
    return catalog.removeprefix(LAKE_PREFIX).startswith(("postgres:", "sqlite:", "mysql:"))


@contextmanager
def exclusive(catalog: str, name: str) -> Iterator[None]:
    """Run the block while holding the lock `name` across every process and machine of the lake:
    a PostgreSQL advisory lock in the catalog's database, released when the block ends (or the
    holder dies). Other catalogs are one machine's, whose writers' pool already serializes."""
    dsn = catalog.removeprefix(LAKE_PREFIX)
    if not dsn.startswith("postgres:"):
        yield
        return
    import psycopg2

    conn = psycopg2.connect(dsn.removeprefix("postgres:"))
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SELECT pg_advisory_lock(hashtext(%s))", [name])
        yield
    finally:
        conn.close()


def is_conflict(exc: BaseException) -> bool:
    """True when `exc` is DuckLake refusing a commit because another writer's snapshot changed
    the same thing (a retry of the whole transaction may then succeed)."""
    return isinstance(exc, duckdb.Error) and CONFLICT_MARKER in str(exc).lower()


def redact(location: str) -> str:
    """A catalog string fit for logs and messages: any password replaced by ***."""
    text = str(location)
    parsed = urlparse(text.split(":", 2)[-1]) if "://" in text else None
    if parsed is not None and parsed.password:
        text = text.replace(f":{parsed.password}@", ":***@")
    return " ".join(
        "password=***" if part.lower().startswith("password=") else part for part in text.split(" ")
    )


def packaged_extension(name: str) -> Path | None:
    """The extension file shipped by the `duckdb-extension-<name>` package for this DuckDB
    release, or None when that package is not installed."""
    try:
        module = importlib.import_module(f"duckdb_extension_{name}")
    except ImportError:
        return None
    path = (
        Path(module.__file__).parent
        / "extensions"
        / f"v{duckdb.__version__}"
        / f"{name}.duckdb_extension"
    )
    return path if path.exists() else None


def load_extensions(con: duckdb.DuckDBPyConnection, names: tuple[str, ...] = EXTENSIONS) -> None:
    """Install (once per machine) and load each extension: from the packaged build when the
    `lake` extra is installed, else from DuckDB's extension repository."""
    for name in names:
        installed = con.execute(
            "SELECT count(*) FROM duckdb_extensions() "
            "WHERE installed AND (extension_name = ? OR list_contains(aliases, ?))",
            [name, name],
        ).fetchone()[0]
        if not installed:
            packaged = packaged_extension(name)
            target = f"'{packaged}'" if packaged else name
            try:
                con.execute(f"INSTALL {target}")
            except duckdb.Error as exc:
                raise LakeError(
                    f"cannot install the DuckDB extension {name!r} ({exc}). Either let DuckDB "
                    "reach its extension repository, or install the packaged builds: "
                    "pip install 'tc-platform[lake]'"
                ) from exc
        con.execute(f"LOAD {name}")


def sql_string(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def s3_secret_sql(env: Mapping[str, str] | None = None) -> str:
    """`CREATE SECRET` for DuckDB's S3 client from the same environment boto3 reads.

    Keys from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (/ AWS_SESSION_TOKEN), region from
    AWS_REGION or AWS_DEFAULT_REGION; without keys, AWS's credential chain (a role, a profile).
    TC_S3_ENDPOINT_URL (an S3-compatible server: MinIO, moto) sets the endpoint, path-style
    URLs, and SSL by the URL's scheme.
    """
    env = os.environ if env is None else env
    options: list[str] = ["TYPE s3"]
    key, secret = env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_SECRET_ACCESS_KEY")
    if key and secret:
        options += [f"KEY_ID {sql_string(key)}", f"SECRET {sql_string(secret)}"]
        if env.get("AWS_SESSION_TOKEN"):
            options.append(f"SESSION_TOKEN {sql_string(env['AWS_SESSION_TOKEN'])}")
    else:
        options.append("PROVIDER credential_chain")
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    if region:
        options.append(f"REGION {sql_string(region)}")
    endpoint = env.get(S3_ENDPOINT_ENV)
    if endpoint:
        url = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        options += [
            f"ENDPOINT {sql_string(url.netloc)}",
            "URL_STYLE 'path'",
            f"USE_SSL {'true' if url.scheme == 'https' else 'false'}",
        ]
    return f"CREATE OR REPLACE SECRET tc_lake_s3 ({', '.join(options)})"


def configure(con: duckdb.DuckDBPyConnection, data_path: str | None) -> None:
    """Extensions and, for data on S3, the S3 secret: what a connection needs before ATTACH."""
    load_extensions(con)
    if data_path and data_path.startswith("s3://"):
        con.execute(s3_secret_sql())


def attach_sql(catalog: str, data_path: str | None, read_only: bool = False) -> str:
    """`ATTACH` of the lake as `lake`. The data path is recorded in the catalog when the lake is
    created; later attaches may give it again (it must then be the same) or leave it out."""
    options = []
    if data_path:
        options.append(f"DATA_PATH {sql_string(data_path)}")
    if read_only:
        options.append("READ_ONLY")
    suffix = f" ({', '.join(options)})" if options else ""
    return f"ATTACH IF NOT EXISTS {sql_string(catalog)} AS {ALIAS}{suffix}"


def connect(catalog: str, data_path: str | None, read_only: bool = False):
    """A new in-memory DuckDB connection with the lake attached and selected (`USE lake`)."""
    if not is_lake(catalog):
        raise LakeError(f"{redact(catalog)} is not a DuckLake catalog (ducklake:...)")
    if data_path and not data_path.startswith("s3://"):
        Path(data_path).mkdir(parents=True, exist_ok=True)
    con = duckdb.connect()
    try:
        configure(con, data_path)
        con.execute(attach_sql(catalog, data_path, read_only))
        con.execute(f"USE {ALIAS}")
    except duckdb.Error as exc:
        con.close()
        raise LakeError(f"cannot open the lake {redact(catalog)}: {exc}") from exc
    return con


_shared: dict[tuple[int, str, str | None], duckdb.DuckDBPyConnection] = {}
_shared_lock = threading.Lock()


def cursor(catalog: str, data_path: str | None) -> duckdb.DuckDBPyConnection:
    """A connection to the lake from one in-memory DuckDB kept per process.

    Loading the three extensions takes about a second; the process's DuckDB loads them and
    attaches the lake once, and each caller gets its own cursor of it (its own transactions,
    the latest snapshot of the catalog at each transaction's start). Close it after use. A
    DuckDB catalog file gets a new connection each time instead, so that other processes (dbt)
    can open the file between uses.
    """
    if not many_writers(catalog):
        return connect(catalog, data_path)  # closed after use: the file's lock is released
    key = (os.getpid(), catalog, data_path)
    with _shared_lock:
        base = _shared.get(key)
        if base is None:
            base = _shared[key] = connect(catalog, data_path)
    con = base.cursor()
    con.execute(f"USE {ALIAS}")
    return con
