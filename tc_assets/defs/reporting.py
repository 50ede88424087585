"""Reporting: the dbt project `dbt_metrics/` as Dagster assets, one `dbt build` per round.

Analysts own the SQL (staging views, the marts `round_leaderboard`, `model_reputation`,
`round_summary`, `portfolio_leaderboard`, and their tests); this module only wires it in:

* the assets come from the dbt manifest, which is built, not committed (`make dbt-manifest`,
  i.e. `dbt parse`; `dagster dev` re-parses on load). They are built when the Definitions are
  (`build_defs`, cached), not at import: without a manifest, building them fails with the
  command to run;
* each dbt source declares, in `meta.dagster.asset_key`, the Python asset that writes its table,
  so the dbt models are drawn downstream of the Python assets and run after them in the same
  `score_round` run (skipped with them while the round awaits resolution);
* a run of round R is `dbt build` with TC_DBT_ROUND=R (by hand: `--vars '{"round": R}'`):
  incremental marts delete and re-insert round R only (config `full_refresh`: every round),
  and every dbt test runs (a failing test fails the step; tests on models are asset checks).
  The round is not a `--vars` and dbt's parse of the project is kept beside the warehouse
  (`dbt/partial_parse.msgpack`), so a round's build does not parse the whole project again. dbt writes the file of the `warehouse`
  resource (passed in TC_WAREHOUSE, which profiles.yml reads), inside the writers' pool, so it
  never meets a Python writer.
"""

import hashlib
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from functools import cache
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

from tc_assets.defs.config import DbtBuildConfig
from tc_assets.defs.metadata import markdown_table, scalars
from tc_assets.defs.partitions import WAREHOUSE_POOL, round_of, rounds_partitions
from tc_assets.defs.resources import WarehouseResource
from tc_assets.io import queries
from tc_assets.io.warehouse import WarehouseError

GROUP = "reporting"
DBT_PROJECT_DIR = Path(__file__).resolve().parents[2] / "dbt_metrics"
WAREHOUSE_ENV = "TC_WAREHOUSE"  # read by dbt_metrics/profiles.yml
ROUND_ENV = "TC_DBT_ROUND"  # the round a build rebuilds (dbt_metrics/macros/run_round.sql)
PARTIAL_PARSE = "partial_parse.msgpack"
# dbt's parse of the project for one warehouse, kept beside it between rounds' builds.
PARTIAL_PARSE_CACHE = f"dbt/{PARTIAL_PARSE}"
MANIFEST_COMMAND = "make dbt-manifest  (or: cd dbt_metrics && dbt parse)"

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
    written by `payouts`)."""

    def __init__(self) -> None:
        super().__init__(DagsterDbtTranslatorSettings(enable_duplicate_source_asset_keys=True))

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


def _newest_source_mtime(project_dir: Path) -> float:
    """Latest modification time of the project's own files (not target/ or logs/)."""
    skip = {project_dir / "target", project_dir / "logs", project_dir / "dbt_packages"}
    times = [
        p.stat().st_mtime
        for p in project_dir.rglob("*")
        if p.suffix in {".sql", ".yml", ".yaml"} and not any(d in p.parents for d in skip)
    ]
    return max(times, default=0.0)


def manifest_is_current(project: DbtProject) -> bool:
    """Whether the manifest exists and is newer than every file of the project."""
    path = project.manifest_path
    return path.exists() and path.stat().st_mtime >= _newest_source_mtime(project.project_dir)


def load_manifest(project: DbtProject) -> Path:
    """The project's manifest.json: a clear error when missing, a warning when older than the
    project's files (models edited since the last `dbt parse`)."""
    path = project.manifest_path
    if not path.exists():
        raise ReportingSetupError(
            f"dbt manifest {path} not found. It is built from the dbt project, not committed: "
            f"run `{MANIFEST_COMMAND}` (make demo, make test and make dev do it)."
        )
    if path.stat().st_mtime < _newest_source_mtime(project.project_dir):
        warnings.warn(
            f"dbt manifest {path} is older than the dbt project's files; run "
            f"`{MANIFEST_COMMAND}` to pick up the changes",
            stacklevel=2,
        )
    return path


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


dbt_project = DbtProject(project_dir=DBT_PROJECT_DIR, profiles_dir=DBT_PROJECT_DIR)
dbt_cli = DbtCliResource(
    project_dir=dbt_project, dbt_executable=guarded_dbt_executable(dbt_executable())
)


@contextmanager
def _environment(values: Mapping[str, str]) -> Iterator[None]:
    """Set environment variables for the block (a subprocess started in it inherits them)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


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
            out[uid]["top"] = markdown_table(top, max_rows=10)
        elif name == "round_summary":
            # One number per field, so the UI plots each across rounds.
            row = queries.relation_round(wh, _relation(node), r)
            if len(row):
                out[uid].update(scalars(row.iloc[0].to_dict()))
    return out


def _reuse_parse(warehouse: Path, target: Path) -> Path:
    """Give this build the parse kept for `warehouse` (if any); returns where it is kept."""
    cache = warehouse.parent / PARTIAL_PARSE_CACHE
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
    path = Path(warehouse.path).expanduser().resolve()
    # This invocation's artifacts (run_results.json, dbt.log): kept only if the build fails.
    target = Path(tempfile.mkdtemp(prefix=f"dbt_metrics_round_{r}_"))
    parsed = _reuse_parse(path, target)
    args = ["build", *(["--full-refresh"] if config.full_refresh else [])]
    wait_for_lock(warehouse)  # dbt's own connect retries then only cover a moment
    # No colour codes in dbt's output: it ends up in failure messages, logs and the terminal.
    with _environment({WAREHOUSE_ENV: str(path), ROUND_ENV: str(r), "DBT_USE_COLORS": "false"}):
        invocation = dbt.cli(args, context=context, raise_on_error=False, target_path=target)
    events = list(invocation.stream())
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


@cache
def build_defs() -> dg.Definitions:
    """The dbt models and their tests as assets and checks of the `reporting` group, with the
    `dbt` resource. Built on first call from the manifest (see `load_manifest`); under
    `dagster dev` the project is parsed again first, so edited models show on reload."""
    if os.environ.get("DAGSTER_IS_DEV_CLI"):
        dbt_cli.cli(["parse", "--quiet"], target_path=dbt_project.target_path).wait()

    @dbt_assets(
        manifest=load_manifest(dbt_project),
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
