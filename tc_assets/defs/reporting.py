"""Reporting: the dbt project `dbt_metrics/` as Dagster assets, one `dbt build` per round.

Analysts own the SQL (staging views, the marts `round_leaderboard`, `model_reputation`,
`round_summary`, `portfolio_leaderboard`, and their tests); this module only wires it in:

* the project ships inside the package (`tc_assets/dbt_metrics/`); its manifest is parsed on
  first use into a user-writable cache, one folder per version of the project's files
  (`prepare_manifest`), so an installed package works anywhere and an edited model is picked
  up on the next load. The assets are built when the Definitions are (`build_defs`, cached),
  not at import;
* each dbt source declares, in `meta.dagster.asset_key`, the Python asset that writes its table,
  so the dbt models are drawn downstream of the Python assets and run after them in the same
  `score_round` run (skipped with them while the round awaits resolution);
* a run of round R is `dbt build` with TC_DBT_ROUND=R (by hand: `--vars '{"round": R}'`):
  incremental marts delete and re-insert round R only (config `full_refresh`: every round),
  and every dbt test runs (a failing test fails the step; tests on models are checks of the
  models, tests on sources checks of the Python assets that write them).
  The round is not a `--vars` and dbt's parse of the project is kept beside the warehouse
  (`dbt/partial_parse.msgpack`), so a round's build does not parse the whole project again. dbt writes the file of the `warehouse`
  resource (passed in TC_WAREHOUSE, which profiles.yml reads), inside the writers' pool, so it
  never meets a Python writer. On a lake (target `lake` of profiles.yml, catalog and data path
  in TC_WAREHOUSE and TC_LAKE_DATA_PATH), builds of several rounds take turns under a lock in
  the catalog's database; a build whose commit still conflicted is run again, up to the
  resource's conflict_retries.
"""

import contextlib
import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from functools import cache, cached_property
from pathlib import Path
from typing import Any

import dagster as dg
from dagster_dbt import (
    DagsterDbtTranslator,
    DagsterDbtTranslatorSettings,
    DbtCliResource,
    DbtProject,
    dbt_assets,
)
from packaging import version

from tc_assets.defs.config import DbtBuildConfig
from tc_assets.defs.env import environment
from tc_assets.defs.metadata import metadata_table, scalars
from tc_assets.defs.partitions import WAREHOUSE_POOL, round_of, rounds_partitions
from tc_assets.defs.resources import WarehouseResource
from tc_assets.io import lake, queries
from tc_assets.io.warehouse import WarehouseError

GROUP = "reporting"
# The dbt project ships inside the package; its manifest is parsed on first use.
DBT_PROJECT_DIR = Path(__file__).resolve().parents[1] / "dbt_metrics"
DBT_CACHE_ENV = "TC_DBT_CACHE"
WAREHOUSE_ENV = "TC_WAREHOUSE"  # read by dbt_metrics/profiles.yml
ROUND_ENV = "TC_DBT_ROUND"  # the round a build rebuilds (dbt_metrics/macros/run_round.sql)
PARTIAL_PARSE = "partial_parse.msgpack"
# dbt's parse of the project for one warehouse, kept beside it between rounds' builds.
PARTIAL_PARSE_CACHE = f"dbt/{PARTIAL_PARSE}"
DBT_SCHEMAS = {"staging", "reporting"}  # the first part of a dbt model's asset key
_NOT_PROJECT = {"target", "logs", "dbt_packages"}

# What the UI shows of a mart's round: columns, and the ranking column to sort by.
PREVIEWS: dict[str, tuple[str, str]] = {
    "round_leaderboard": ("model_id, stake, corr, mmc, fnc_v3, tc, payout, tc_rank", "payout_rank"),
    "model_reputation": (
        "model_id, window_rounds, corr_mean, tc_mean, fnc_v3_mean, payout_return_mean, tc_rounds",
        "tc_rank",
    ),
    "portfolio_leaderboard": (
        "model_id, stake, pp, scenario, marginal_return, payout, sharpe_contribution",
        "pp_rank",
    ),
}


class ReportingSetupError(RuntimeError):
    """The dbt project cannot be turned into assets (no manifest, a source without a key)."""


class ReportingTranslator(DagsterDbtTranslator):
    """dbt sources keyed as the Python assets that write their tables; models keyed
    `<schema>/<name>` (e.g. `reporting/round_leaderboard`, `staging/stg_payouts`), all in the
    `reporting` group. Several sources may name one asset (payouts and payout_summary are both
    written by `payouts`). Source tests are asset checks of the Python asset they test."""

    def __init__(self) -> None:
        super().__init__(
            DagsterDbtTranslatorSettings(
                enable_duplicate_source_asset_keys=True, enable_source_tests_as_checks=True
            )
        )

    def get_asset_key(self, dbt_resource_props: Mapping[str, Any]) -> dg.AssetKey:
        if dbt_resource_props["resource_type"] == "source":
            meta = dbt_resource_props.get("config", {}).get("meta") or {}
            if not meta.get("dagster", {}).get("asset_key"):
                raise ReportingSetupError(
                    f"dbt source {dbt_resource_props['source_name']}."
                    f"{dbt_resource_props['name']} has no `meta: {{dagster: {{asset_key: [...]}}}}`"
                    " naming the Python asset that writes it (dbt_metrics/models/sources.yml)"
                )
        return super().get_asset_key(dbt_resource_props)

    def get_group_name(self, dbt_resource_props: Mapping[str, Any]) -> str | None:
        return GROUP

    def get_asset_check_spec(
        self,
        asset_spec: dg.AssetSpec,
        manifest: Mapping[str, Any],
        unique_id: str,
        project: DbtProject | None,
    ) -> dg.AssetCheckSpec | None:
        """dbt's check of a test; a source test's check does not block: blocking would order
        the dbt step before the Python assets downstream of the tested table, which the dbt
        models read, and split the build into several. A failing test fails the dbt step
        (and the run) all the same."""
        spec = super().get_asset_check_spec(asset_spec, manifest, unique_id, project)
        if spec is None or asset_spec.key.path[0] in DBT_SCHEMAS:
            return spec
        return spec._replace(blocking=False)


def project_fingerprint(project_dir: Path) -> str:
    """A hash of the project's own files (names and contents; not target/ or logs/)."""
    digest = hashlib.sha256()
    for p in sorted(project_dir.rglob("*")):
        rel = p.relative_to(project_dir)
        if p.suffix in {".sql", ".yml", ".yaml"} and rel.parts[0] not in _NOT_PROJECT:
            digest.update(str(rel).encode() + b"\0" + p.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def manifest_dir(project_dir: Path) -> Path:
    """Where the manifest of this version of the project is parsed to: user-writable
    ($TC_DBT_CACHE, default ~/.cache/tc-platform/dbt), one folder per project fingerprint, so
    an edited project is parsed again and an installed package never writes into itself."""
    cache = os.environ.get(DBT_CACHE_ENV) or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "tc-platform", "dbt"
    )
    return Path(cache).expanduser().resolve() / project_fingerprint(project_dir)


def dbt_executable() -> str:
    """The dbt installed beside this interpreter (the venv's, activated or not), else PATH's."""
    local = Path(sys.executable).parent / "dbt"
    return str(local) if local.exists() else (shutil.which("dbt") or "dbt")


_GUARD = """#!{python}
# Runs dbt so that it dies with the process that started it: a run killed with SIGKILL
# leaves no dbt behind writing the warehouse (Linux PR_SET_PDEATHSIG, kept across exec).
import ctypes, os, signal, sys
parent = os.getppid()
ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)
if os.getppid() != parent:
    sys.exit("dbt not started: the process that launched it has already exited")
os.execv({dbt!r}, [{dbt!r}, *sys.argv[1:]])
"""


def guarded_dbt_executable(dbt: str) -> str:
    """`dbt` wrapped so that it dies with its parent (Linux); `dbt` itself elsewhere.

    The wrapper is a small script written once per interpreter and dbt under the temp folder
    (dagster-dbt takes an executable path, not a function to run before exec)."""
    if not sys.platform.startswith("linux") or shutil.which(dbt) is None:
        return dbt
    text = _GUARD.format(python=sys.executable, dbt=shutil.which(dbt))
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    path = Path(tempfile.gettempdir()) / f"tc-platform-{os.getuid()}" / f"dbt-{digest}"
    if not path.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(text)
        tmp.chmod(0o755)
        tmp.replace(path)  # atomic: a concurrent import sees the whole file or none
    return str(path)


def prepare_manifest(project: DbtProject) -> Path:
    """The project's manifest.json, parsed on first use (`dbt parse`, no database needed).

    dbt writes into a fresh folder beside the manifest, which is then moved into place in one
    step: processes loading the Definitions at once (webserver, daemon) each read a whole file.
    """
    path = project.manifest_path
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="parse-", dir=path.parent))
    try:
        proc = subprocess.run(
            [dbt_executable(), "parse", "--quiet", "--target-path", str(scratch)]
            + [
                "--project-dir",
                str(project.project_dir),
                "--profiles-dir",
                str(project.profiles_dir),
            ],
            env={
                **os.environ,
                "DBT_SEND_ANONYMOUS_USAGE_STATS": "false",
                "DBT_LOG_PATH": str(scratch),
            },
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0 or not (scratch / "manifest.json").exists():
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
            raise ReportingSetupError(f"dbt parse of {project.project_dir} failed:\n{tail}")
        os.replace(scratch / "manifest.json", path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return path


dbt_project = DbtProject(
    project_dir=DBT_PROJECT_DIR,
    profiles_dir=DBT_PROJECT_DIR,
    target_path=manifest_dir(DBT_PROJECT_DIR),
)


class RoundDbtCliResource(DbtCliResource):
    """dagster-dbt's CLI resource without two costs per build that this project has no use for
    (about 4 s of every round's dbt step): a `dbt --version` subprocess, which would tell the
    version of the dbt-core installed beside this interpreter, and a dbt adapter opened in
    process, which dagster-dbt uses only to fetch column metadata and row counts (the step reads
    the rows it reports itself, once dbt has exited)."""

    @cached_property
    def _cli_version(self) -> version.Version:
        return version.parse(importlib.metadata.version("dbt-core"))

    def _initialize_dbt_core_adapter(self, args: Sequence[str]) -> None:
        return None


dbt_cli = RoundDbtCliResource(
    project_dir=dbt_project, dbt_executable=guarded_dbt_executable(dbt_executable())
)


def _relation(node: Mapping[str, Any]) -> str:
    """`schema.alias` of a dbt model: resolved in the connected file whatever its name."""
    return f'"{node["schema"]}"."{node["alias"]}"'


def _round_metadata(
    warehouse: WarehouseResource, r: int, nodes: Mapping[str, Mapping[str, Any]]
) -> dict[str, dict[str, Any]]:
    """Per dbt unique_id: the model's rows of round r and, for the marts, their top rows."""
    if not nodes:
        return {}
    wh = warehouse.get()
    counts = queries.relation_round_counts(wh, {uid: _relation(n) for uid, n in nodes.items()}, r)
    out: dict[str, dict[str, Any]] = {}
    for uid, node in nodes.items():
        out[uid] = {"round": r, "round_rows": int(counts.get(uid, 0))}
        name = node["name"]
        if name in PREVIEWS:
            top = queries.relation_top(wh, _relation(node), *PREVIEWS[name], r)
            out[uid]["top"] = metadata_table(top, max_rows=10)
        elif name == "round_summary":
            # One number per field, so the UI plots each across rounds.
            row = queries.relation_round(wh, _relation(node), r)
            if len(row):
                out[uid].update(scalars(row.iloc[0].to_dict()))
    return out


def _reuse_parse(directory: Path, target: Path) -> Path:
    """Give this build the parse kept in the warehouse's `directory` (if any); returns where it
    is kept."""
    cache = directory / PARTIAL_PARSE_CACHE
    if cache.exists():
        shutil.copy(cache, target / PARTIAL_PARSE)
    return cache


def _keep_parse(produced: Path, cache: Path) -> None:
    """Keep the parse dbt just made for the next round's build of this warehouse. The round is
    passed in ROUND_ENV, not `--vars`, and the warehouse path stays the same, so the next build
    reuses it (a changed var or profile would make dbt parse the whole project again)."""
    if not produced.exists():
        return
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(f".{cache.name}.{os.getpid()}")
    shutil.copy(produced, tmp)
    os.replace(tmp, cache)


def _unique_id(event: Any) -> str | None:
    """The dbt unique_id of a model's Output event, None for any other event."""
    if isinstance(event, dg.Output) and "unique_id" in event.metadata:
        return str(event.metadata["unique_id"].value)
    return None


FAILING_ROWS_SHOWN = 5


def wait_for_lock(warehouse: WarehouseResource) -> None:
    """Wait, as the Python steps do, until no other process holds the warehouse's lock (the same
    lock_timeout_s); a Failure with their message when it stays locked past it."""
    try:
        with warehouse.get().connect():
            pass
    except WarehouseError as exc:
        raise dg.Failure(description=str(exc), allow_retries=False) from exc


def _described(event: Any, warehouse: WarehouseResource, invocation: Any) -> Any:
    """A failed dbt test's check with its description (`_failed_test`); other events as they are."""
    if isinstance(event, dg.AssetCheckResult) and not event.passed:
        return event._replace(description=_failed_test(warehouse, invocation, event))
    return event


def _failed_test(warehouse: WarehouseResource, invocation: Any, check: dg.AssetCheckResult) -> str:
    """A failed dbt test in words: its name, how many rows fail it and the first of them (read
    with the test's compiled SQL once dbt has exited)."""
    uid = str(check.metadata["unique_id"].value) if "unique_id" in check.metadata else ""
    count = check.metadata.get("dagster_dbt/failed_row_count")
    name = uid.split(".")[2] if uid.count(".") >= 2 else check.check_name
    text = f"dbt test {name} failed" + (f": {count.value} failing row(s)" if count else "")
    results = invocation.get_artifact("run_results.json").get("results", [])
    sql = next((r.get("compiled_code") for r in results if r.get("unique_id") == uid), None)
    if sql:
        try:
            rows = warehouse.get().query(
                f"select * from ({sql}) as failing limit {FAILING_ROWS_SHOWN}"
            )
        except Exception as exc:  # the rows are a courtesy: the count and name stand anyway
            return f"{text} (failing rows not readable: {exc})"
        if len(rows):
            text += "; first rows:\n" + rows.to_string(index=False)
    return text


def _build_round(
    context: dg.AssetExecutionContext,
    config: DbtBuildConfig,
    dbt: DbtCliResource,
    warehouse: WarehouseResource,
) -> Iterator[Any]:
    """The body of `dbt_metrics`: `dbt build` of the selected models and their tests for the
    round (ROUND_ENV), or of every round with `full_refresh`.

    Events are collected while dbt runs and yielded when it exits: the warehouse file is dbt's
    until then, and each model's materialization carries its rows of the round (and the top of
    each mart), read afterwards.
    """
    r = round_of(context)
    # This invocation's artifacts (run_results.json, dbt.log): kept only if the build fails.
    target = Path(tempfile.mkdtemp(prefix=f"dbt_metrics_round_{r}_"))
    parsed = _reuse_parse(warehouse.directory, target)
    args = ["build", *(["--full-refresh"] if config.full_refresh else [])]
    wait_for_lock(warehouse)  # dbt's own connect retries then only cover a moment
    invocation, events = _invoke(context, dbt, warehouse, r, args, target)
    error = invocation.get_error()
    _keep_parse(target / PARTIAL_PARSE, parsed)
    built = {
        uid: invocation.manifest["nodes"][uid]
        for uid in (_unique_id(e) for e in events)
        if uid is not None
    }
    extra = _round_metadata(warehouse, r, built)
    for event in events:
        uid = _unique_id(event)
        event = _described(event, warehouse, invocation)
        yield event.with_metadata({**event.metadata, **extra[uid]}) if uid in extra else event
    if error is not None:
        raise error
    shutil.rmtree(target, ignore_errors=True)


def _dbt_env(warehouse: WarehouseResource, r: int) -> tuple[dict[str, str], list[str]]:
    """The environment and extra arguments of a build of round r: the DuckDB file's absolute
    path, or the lake's catalog and data path with the profile's `lake` target. No colour codes
    in dbt's output: it ends up in failure messages, logs and the terminal."""
    env = {ROUND_ENV: str(r), "DBT_USE_COLORS": "false"}
    if warehouse.backend == "ducklake":
        env |= {WAREHOUSE_ENV: warehouse.path, lake.DATA_PATH_ENV: warehouse.data_path or ""}
        return env, ["--target", "lake"]
    return env | {WAREHOUSE_ENV: str(Path(warehouse.path).expanduser().resolve())}, []


def _invoke(
    context: dg.AssetExecutionContext,
    dbt: DbtCliResource,
    warehouse: WarehouseResource,
    r: int,
    args: list[str],
    target: Path,
) -> tuple[Any, list[Any]]:
    """Run dbt until it exits; returns the invocation and its events. On a lake, a build whose
    commit conflicted with another writer is run again, up to the resource's conflict_retries
    (every model replaces its round, so a second build leaves exactly one round's rows)."""
    env, extra = _dbt_env(warehouse, r)
    for attempt in range(warehouse.conflict_retries + 1):
        with _one_build_at_a_time(warehouse):
            with environment(env):
                invocation = dbt.cli(
                    [*args, *extra], context=context, raise_on_error=False, target_path=target
                )
            events = list(invocation.stream())
        if invocation.get_error() is None or not _conflicted(target):
            break
        if attempt < warehouse.conflict_retries:
            context.log.warning(
                f"dbt build of round {r} conflicted with another writer of the lake; building "
                f"again ({attempt + 1} of {warehouse.conflict_retries})"
            )
    return invocation, events


def _one_build_at_a_time(warehouse: WarehouseResource) -> contextlib.AbstractContextManager:
    """On a lake, dbt builds of different rounds replace the same staging views and write the
    same marts, so two at once conflict at nearly every commit: they take turns, under a lock
    held in the lake's catalog database across processes and machines. The Python writers,
    which write other tables, go on meanwhile. On the file, the writers' pool already does it."""
    if warehouse.backend != "ducklake":
        return contextlib.nullcontext()
    return lake.exclusive(warehouse.path, "tc_platform.dbt_build")


def _conflicted(target: Path) -> bool:
    """Whether a dbt invocation failed because a lake commit conflicted with another writer."""
    results = target / "run_results.json"
    if not results.exists():
        return False
    return any(
        result.get("status") == "error"
        and lake.CONFLICT_MARKER in str(result.get("message") or "").lower()
        for result in json.loads(results.read_text()).get("results", [])
    )


@cache
def build_defs() -> dg.Definitions:
    """The dbt models and their tests as assets and checks of the `reporting` group, with the
    `dbt` resource. Built on first call from the manifest (see `prepare_manifest`)."""

    @dbt_assets(
        manifest=prepare_manifest(dbt_project),
        project=dbt_project,
        dagster_dbt_translator=ReportingTranslator(),
        partitions_def=rounds_partitions,
        pool=WAREHOUSE_POOL,
        name="dbt_metrics",
    )
    def dbt_metrics(
        context: dg.AssetExecutionContext,
        config: DbtBuildConfig,
        dbt: DbtCliResource,
        warehouse: WarehouseResource,
    ) -> Iterator[Any]:
        """`dbt build` of the selected models and their tests for the round (TC_DBT_ROUND),
        or of every round with `full_refresh`."""
        yield from _build_round(context, config, dbt, warehouse)

    return dg.Definitions(assets=[dbt_metrics], resources={"dbt": dbt_cli})
