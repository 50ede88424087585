"""Screenshots of the Dagster UI over the demo, for the README (`make screenshots`).

Starts dagster-webserver on a free loopback port over $TC_HOME (the demo's instance and
warehouse, workspace.yaml), waits for it, and has headless Chromium (Debian's `chromium`)
render each page to docs/img/<name>.png. Run `make demo` first.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "docs" / "img"
ROUND = os.environ.get("TC_SCREENSHOT_ROUND", "8")
# name -> path of the UI page
PAGES = {
    "lineage": "/asset-groups",
    "tc_scores": f"/assets/tc_scores?view=events&partition={ROUND}",
    "payouts": f"/assets/payouts?view=events&partition={ROUND}",
    "automation": "/automation",
}
ONLY = os.environ.get("TC_SCREENSHOTS", "")  # comma list of page names (default: all)
SIZE = "1400,1400"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if found := shutil.which(name):
            return found
    sys.exit("screenshots: no chromium found (Debian: apt-get install -y chromium)")


def wait_for(url: str, proc: subprocess.Popen, timeout: float = 600.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"screenshots: the webserver exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except OSError:
            time.sleep(1)
    sys.exit(f"screenshots: {url} did not answer within {timeout:.0f}s")


def shoot(browser: str, url: str, path: Path, profile: Path) -> None:
    subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            f"--window-size={SIZE}",
            "--virtual-time-budget=20000",
            f"--screenshot={path}",
            url,
        ],
        check=True,
        capture_output=True,
        timeout=600,
    )


def main() -> int:
    home = Path(os.environ.get("TC_HOME", REPO / ".tc_platform")).resolve()
    dagster_home = Path(os.environ.get("DAGSTER_HOME", home / "dagster_home")).resolve()
    if not (home / "demo" / "warehouse.duckdb").exists():
        sys.exit(f"screenshots: no demo under {home}; run `make demo` first")
    browser = chromium()
    port = free_port()
    env = {**os.environ, "TC_HOME": str(home), "DAGSTER_HOME": str(dagster_home)}
    webserver = Path(sys.executable).parent / "dagster-webserver"
    command = [str(webserver), "-w", str(REPO / "workspace.yaml"), "-h", "127.0.0.1"]
    proc = subprocess.Popen(
        [*command, "-p", str(port)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(f"{base}/server_info", proc)
        # The UI's one-time "join the community" dialog would cover the first page.
        request = urllib.request.Request(
            f"{base}/graphql",
            data=json.dumps({"query": "mutation { setNuxSeen }"}).encode(),
            headers={"Content-Type": "application/json"},
        )
        urllib.request.urlopen(request, timeout=60).close()
        OUT.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as profile:
            for name, page in PAGES.items():
                if ONLY and name not in ONLY.split(","):
                    continue
                path = OUT / f"{name}.png"
                shoot(browser, base + page, path, Path(profile))
                print(f"wrote {path.relative_to(REPO)} ({path.stat().st_size // 1024} KiB)")
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
