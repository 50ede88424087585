"""A real S3-compatible server for tests: moto's server mode on 127.0.0.1, plus a faulty proxy.

`moto_s3()` starts moto's threaded server on a free loopback port and yields its endpoint;
`s3_env()` is the environment a client needs for it (credentials from the environment only,
as in production). `FaultyProxy` sits between a client and the server and answers the first
requests it is told to with S3's 503 SlowDown, or cuts a response body short, so retries are
tested against real HTTP.
"""

import http.client
import logging
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import boto3
from moto.server import ThreadedMotoServer

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
# Keep boto3 from finding anything but the environment: no config files, no instance metadata.
ISOLATION = {
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    "AWS_EC2_METADATA_DISABLED": "true",
}


@contextmanager
def moto_s3() -> Iterator[str]:
    """moto's S3 server on 127.0.0.1 (a free port) for the duration; yields the endpoint URL."""
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def fresh_bucket(s3, bucket: str) -> None:
    """Create `bucket`, emptied: moto keeps its buckets in process-wide memory, so a bucket of
    the same name from an earlier server in this process would still hold its objects."""
    s3.create_bucket(Bucket=bucket)
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            s3.delete_object(Bucket=bucket, Key=obj["Key"])


def s3_env(endpoint: str) -> dict[str, str]:
    """Environment for a client of `endpoint`: the platform's endpoint variable and credentials."""
    return {**ISOLATION, **CREDENTIALS, "TC_S3_ENDPOINT_URL": endpoint}


def client(endpoint: str):
    """A plain boto3 client of the test server (the uploader's side, not the platform's)."""
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        region_name=CREDENTIALS["AWS_DEFAULT_REGION"],
    )


def upload(
    s3,
    folder: Path,
    bucket: str,
    prefix: str,
    include: Callable[[str], bool] = lambda rel: True,
    last: Sequence[str] = ("round.json",),
) -> list[str]:
    """Upload every file under `folder` to s3://bucket/prefix/<relative path>.

    Files whose name is in `last` go up after the others: a round's round.json is what marks
    it complete. Returns the uploaded relative paths.
    """
    rels = sorted(
        (p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()),
        key=lambda rel: (rel.rsplit("/", 1)[-1] in last, rel),
    )
    done = []
    for rel in rels:
        if include(rel):
            s3.put_object(Bucket=bucket, Key=f"{prefix}/{rel}", Body=(folder / rel).read_bytes())
            done.append(rel)
    return done


class FaultyProxy:
    """An HTTP proxy to `target` that fails requests on purpose.

    `fail(n)`: the next n requests get 503 SlowDown (botocore retries those).
    `truncate(n)`: the next n GET responses with a body send half of it, then close.
    `deny(text)`: every request whose path contains `text` gets 403 AccessDenied ('' lifts it).
    `unavailable(text)`: every request whose path contains `text` gets 503 SlowDown ('' lifts it).
    `requests` counts what reached the proxy.
    """

    def __init__(self, target: str) -> None:
        self.target = target.removeprefix("http://")
        self.requests = 0
        self._fail = 0
        self._truncate = 0
        self._deny = ""
        self._unavailable = ""
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _handle(self) -> None:
                with proxy._lock:
                    proxy.requests += 1
                    fail = proxy._fail > 0
                    proxy._fail -= fail
                    cut = self.command == "GET" and proxy._truncate > 0
                    proxy._truncate -= cut
                    deny = bool(proxy._deny) and proxy._deny in self.path
                fail = fail or (bool(proxy._unavailable) and proxy._unavailable in self.path)
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                if fail or deny:
                    code, status = ("SlowDown", 503) if fail else ("AccessDenied", 403)
                    payload = f"<Error><Code>{code}</Code><Message>test</Message></Error>".encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(payload)
                    return
                conn = http.client.HTTPConnection(proxy.target, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
                conn.request(self.command, self.path, body=body, headers=headers)
                response = conn.getresponse()
                data = response.read()
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                if cut and len(data) > 1:
                    self.send_header("Connection", "close")
                    self.end_headers()
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def fail(self, n: int) -> None:
        with self._lock:
            self._fail = n

    def deny(self, text: str) -> None:
        with self._lock:
            self._deny = text

    def unavailable(self, text: str) -> None:
        with self._lock:
            self._unavailable = text

    def truncate(self, n: int) -> None:
        with self._lock:
            self._truncate = n

    def __enter__(self) -> "FaultyProxy":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
