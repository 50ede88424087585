"""The package works outside the repository: a wheel installed into a fresh virtual
environment runs the demo from an empty folder (dbt project shipped inside, manifest parsed on
first use into the user's cache)."""

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

REPO = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: int = 600):
    out = subprocess.run(
        [str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert out.returncode == 0, f"{cmd}\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
    return out


def test_a_wheel_in_a_fresh_venv_runs_the_demo_from_an_empty_folder(tmp_path):
    # Built from a copy: the build leaves build/ and *.egg-info beside the sources.
    tree = tmp_path / "tree"
    ignore = shutil.ignore_patterns("__pycache__", "target", "logs")
    shutil.copytree(REPO / "tc_assets", tree / "tc_assets", ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, tree / name)
    wheels = tmp_path / "wheels"
    pip = ["-m", "pip", "--disable-pip-version-check"]
    _run(
        [
            sys.executable,
            *pip,
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            wheels,
            tree,
        ],
        tmp_path,
    )
    (wheel,) = wheels.glob("tc_platform-*.whl")
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", venv], cwd=tmp_path)
    python = venv / "bin" / "python"
    clean = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path / "home")}  # no PYTHONPATH
    _run([python, *pip, "install", "--no-deps", "--no-index", "-q", wheel], tmp_path, clean)
    # The dependencies are the ones installed here (no network): the venv sees this
    # environment's site-packages after its own, without its .pth files (so not this checkout).
    own = Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}))
    (own / "shared_dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")

    empty = tmp_path / "empty"
    empty.mkdir()
    env = {
        "HOME": str(tmp_path / "home"),
        "PATH": f"{venv / 'bin'}:{Path(sys.executable).parent}:/usr/bin:/bin",
        "DBT_SEND_ANONYMOUS_USAGE_STATS": "false",
    }
    where = _run([python, "-c", "import tc_assets; print(tc_assets.__file__)"], empty, env)
    assert Path(where.stdout.strip()).is_relative_to(venv)
    demo = _run([venv / "bin" / "tc-platform", "demo", "--rounds", "1-2"], empty, env, 1500)
    assert "2/2 rounds succeeded" in demo.stdout, demo.stdout
    home = empty / ".tc_platform"
    assert (home / "demo" / "warehouse.duckdb").exists()
    last = demo.stdout.strip().splitlines()[-1]
    assert f"dagster dev -w {home / 'workspace.yaml'}" in last and "http://127.0.0.1:3000" in last
    assert f"DAGSTER_HOME={home / 'dagster_home'}" in last
    assert "location_name: tc_platform" in (home / "workspace.yaml").read_text()
    assert list((tmp_path / "home" / ".cache" / "tc-platform" / "dbt").glob("*/manifest.json"))
    assert not list(venv.rglob("dbt_metrics/target"))
    assert os.listdir(empty) == [".tc_platform"]
