"""A real PostgreSQL for tests: a private cluster on a free loopback port, stopped on exit.

`postgres_cluster(tmp_dir)` runs the Debian `postgresql` package's own binaries (`initdb`,
`pg_ctl`): it creates a cluster in a new directory under `tmp_dir`, starts it on 127.0.0.1 with
its socket in that directory, and yields a `PostgresCluster` to connect to. The superuser is
`postgres` with a random password, and only password (scram) logins are accepted, as in
production. `initdb` refuses to run as root, so when the tests run as root (CI) every server
command runs as the `postgres` system user (`runuser`) and the cluster directory is owned by
it; `tmp_dir` must then be one the `postgres` user can enter (a directory made under /tmp with
`postgres_dir()`; pytest's own `tmp_path` is private to root).
"""

import glob
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg2
from psycopg2 import sql

SYSTEM_USER = "postgres"


def postgres_bindir() -> Path | None:
    """The directory of `initdb`, `pg_ctl` and `postgres`: PATH first, then Debian's newest."""
    on_path = shutil.which("pg_ctl")
    if on_path and Path(on_path).with_name("initdb").exists():
        return Path(on_path).parent
    candidates = [Path(p).parent for p in glob.glob("/usr/lib/postgresql/*/bin/postgres")]
    candidates.sort(key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0)
    return candidates[-1] if candidates else None


def _as_root() -> bool:
    return os.geteuid() == 0


def postgres_dir(prefix: str = "tc-pg-") -> Path:
    """A new temporary directory under the system temp dir that the cluster's user can enter."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o711)
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class PostgresCluster:
    """A running cluster: where it listens and who may log in."""

    host: str
    port: int
    user: str
    password: str
    socket_dir: Path

    def url(self, dbname: str = "postgres") -> str:
        """A postgresql:// URL of database `dbname` on this cluster, password included."""
        return f"postgresql://{self.user}:{self.password}@{self.host}:{self.port}/{dbname}"

    def connect(self, dbname: str = "postgres"):
        """A psycopg2 connection (autocommit) to database `dbname`."""
        conn = psycopg2.connect(self.url(dbname))
        conn.autocommit = True
        return conn

    def create_database(self, name: str) -> str:
        """Create database `name` (empty) and return its URL."""
        conn = self.connect()
        try:
            with conn.cursor() as cur:
                cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        finally:
            conn.close()
        return self.url(name)


def _run(args: list[str], cwd: Path) -> None:
    command = ["runuser", "-u", SYSTEM_USER, "--", *args] if _as_root() else args
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(
            f"{Path(args[0]).name} failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}"
        )


@contextmanager
def postgres_cluster(tmp_dir: Path | str) -> Iterator[PostgresCluster]:
    """Start a private PostgreSQL cluster under `tmp_dir` on a free loopback port; stop it after.

    Raises RuntimeError when no PostgreSQL binaries are installed or the server does not start
    (the server's log is in the message).
    """
    bindir = postgres_bindir()
    if bindir is None:
        raise RuntimeError("no PostgreSQL server binaries (initdb, pg_ctl) found")
    root = Path(tempfile.mkdtemp(prefix="cluster-", dir=tmp_dir))
    data, log = root / "data", root / "server.log"
    password = secrets.token_hex(16)
    started = False
    try:
        pwfile = root / "pwfile"
        pwfile.write_text(password + "\n")
        if _as_root():
            shutil.chown(root, SYSTEM_USER, SYSTEM_USER)
            shutil.chown(pwfile, SYSTEM_USER, SYSTEM_USER)
        root.chmod(0o700)
        _run(
            [
                str(bindir / "initdb"),
                "-D", str(data),
                "-U", SYSTEM_USER,
                f"--pwfile={pwfile}",
                "--auth=scram-sha-256",
                "-E", "UTF8",
                "--locale=C",
                "--no-sync",
            ],
            cwd=root,
        )  # fmt: skip
        pwfile.unlink()
        error: Exception | None = None
        for _ in range(3):  # a free port can be taken by someone else before the server binds it
            port = _free_port()
            options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
            try:
                _run(
                    [str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options,
                     "-w", "-t", "60", "start"],
                    cwd=root,
                )  # fmt: skip
                started = True
                break
            except RuntimeError as exc:
                error = exc
        if not started:
            server_log = log.read_text() if log.exists() else ""
            raise RuntimeError(f"PostgreSQL did not start: {error}\n{server_log[-2000:]}")
        yield PostgresCluster("127.0.0.1", port, SYSTEM_USER, password, root)
    finally:
        if started:
            _run([str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"], cwd=root)
        shutil.rmtree(root, ignore_errors=True)
