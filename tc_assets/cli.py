"""`tc-platform`: generate synthetic rounds, run rounds through Dagster, or run the demo."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

# The lake's data folder (tc_assets/io/lake.py DATA_PATH_ENV; not imported here, to keep the
# command's start light).
LAKE_DATA_ENV = "TC_LAKE_DATA_PATH"
# Eight rounds: enough for the TC proxy model's first window (ProxySettings.min_rounds).
DEMO_ROUNDS = "1-8"
UI_PORT = 3000


def _home() -> Path:
    return Path(os.environ.get("TC_HOME", ".tc_platform")).expanduser().resolve()


def _log_file(command: str) -> Path:
    """A new log file for this invocation's runs under $TC_HOME/logs."""
    folder = _home() / "logs"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"


def ui_command(home: Path, dagster_home: Path) -> str:
    """The command that opens the Dagster UI over what the CLI wrote under `home`: a
    workspace file naming the code location the CLI's runs are attached to is written there."""
    from tc_assets.defs.definitions import CODE_LOCATION, DEFINITIONS_ATTRIBUTE, DEFINITIONS_MODULE

    workspace = home / "workspace.yaml"
    workspace.write_text(
        "load_from:\n  - python_module:\n"
        f"      module_name: {DEFINITIONS_MODULE}\n"
        f"      attribute: {DEFINITIONS_ATTRIBUTE}\n"
        f"      location_name: {CODE_LOCATION}\n"
    )
    return (
        f"TC_HOME={shlex.quote(str(home))} DAGSTER_HOME={shlex.quote(str(dagster_home))} "
        f"dagster dev -w {shlex.quote(str(workspace))} -h 127.0.0.1 -p {UI_PORT}"
    )


def cmd_generate(args: argparse.Namespace) -> int:
    from tc_assets.io.synthetic import SyntheticSettings, generate_source
    from tc_assets.runner import parse_rounds

    settings = SyntheticSettings(
        stocks=args.stocks,
        features=args.features,
        models=args.models,
        seed=args.seed,
        with_bad_inputs=args.with_bad_inputs,
        file_format=args.format,
    )
    rounds = parse_rounds(args.rounds)
    summary = generate_source(args.out, rounds, settings)
    print(
        f"wrote rounds {rounds[0]}-{rounds[-1]} to {Path(args.out).resolve()} "
        f"({settings.stocks} stocks, {settings.features} medium features, {settings.models} models) "
        f"in {summary.get('seconds', 0):.1f}s"
    )
    return 0


def _exit_code(outcomes: list) -> int:
    """130 after Ctrl-C or SIGTERM, 1 when a round failed, else 0."""
    if any(o.stopped not in (None, "pool") for o in outcomes):
        return 130
    return 1 if any(not o.success for o in outcomes) else 0


def cmd_run(args: argparse.Namespace) -> int:
    from tc_assets.defs.definitions import PlatformPaths
    from tc_assets.defs.liveness import RunGuardSettings
    from tc_assets.runner import ensure_dagster_home, parse_rounds, run_rounds

    guard = RunGuardSettings(**({"pool_wait_s": args.pool_wait} if args.pool_wait else {}))
    home = ensure_dagster_home(_home() / "dagster_home")
    print(f"DAGSTER_HOME={home}")
    if not args.warehouse:
        raise ValueError("no warehouse: give --warehouse or set TC_WAREHOUSE")
    paths = PlatformPaths.create(args.source, args.warehouse, lake_data=args.lake_data)
    rounds = parse_rounds(args.rounds) if args.rounds else None
    log_path = _log_file("run")
    with log_path.open("w") as log:
        outcomes = run_rounds(paths, rounds, log=log, guard=guard)
    failed = [o for o in outcomes if not o.success]
    print(
        f"{len(outcomes) - len(failed)} of {len(outcomes)} rounds succeeded; "
        f"warehouse: {paths.describe_warehouse()}; full log: {log_path}"
    )
    return _exit_code(outcomes)


def cmd_unblock(args: argparse.Namespace) -> int:
    import dagster as dg

    from tc_assets.defs.liveness import free_finished_holders, reap_dead_runs, release_run
    from tc_assets.runner import ensure_dagster_home

    ensure_dagster_home(_home() / "dagster_home")
    with dg.DagsterInstance.get() as instance:
        for run_id in reap_dead_runs(instance):
            print(f"run {run_id}: its process is gone; marked failed, its pool slots freed")
        for run_id in free_finished_holders(instance):
            print(f"run {run_id}: finished; the pool slots it still held are freed")
        for run_id in args.run_ids:
            if instance.get_run_by_id(run_id) is None:
                raise ValueError(f"no run {run_id} in {instance.root_directory}")
            changed = release_run(
                instance, run_id, "Marked failed by `tc-platform unblock`; pool slots freed."
            )
            state = "marked failed and its" if changed else "already finished; its"
            print(f"run {run_id}: {state} pool slots freed")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from tc_assets.defs.definitions import PlatformPaths
    from tc_assets.io.synthetic import SyntheticSettings, generate_source
    from tc_assets.reports import print_demo_report
    from tc_assets.runner import ensure_dagster_home, parse_rounds, run_rounds

    start = time.perf_counter()
    demo = _home() / "demo"
    source = demo / "source"
    rounds = parse_rounds(args.rounds)
    settings = SyntheticSettings(seed=args.seed, with_bad_inputs=True)
    print(f"generating rounds {args.rounds} into {source} ...")
    generate_source(source, rounds, settings)
    home = ensure_dagster_home(_home() / "dagster_home")
    paths = PlatformPaths.create(str(source), str(demo / "warehouse.duckdb"))
    log_path = _log_file("demo")
    print(
        f"running {len(rounds)} rounds through Dagster (DAGSTER_HOME={home}; "
        f"full log: {log_path}) ..."
    )
    with log_path.open("w") as log:
        outcomes = run_rounds(paths, rounds, log=log)
    if any(o.stopped for o in outcomes):
        return _exit_code(outcomes)
    print()
    print_demo_report(paths.warehouse, rounds)
    failed = [o for o in outcomes if not o.success]
    print(
        f"\ndemo finished in {time.perf_counter() - start:.0f}s: "
        f"{len(outcomes) - len(failed)}/{len(outcomes)} rounds succeeded. "
        f"See the runs in the Dagster UI: {ui_command(_home(), home)} "
        f"then open http://127.0.0.1:{UI_PORT}"
    )
    return _exit_code(outcomes)


def cmd_bucket_per_return(args: argparse.Namespace) -> int:
    from tc_assets.io.warehouse import Warehouse
    from tc_assets.runner import parse_rounds
    from tc_assets.scoring.portfolio_weights import estimate_bucket_per_return

    path = Path(args.warehouse)
    if not path.is_file():
        raise ValueError(f"no warehouse at {path}")
    wh = Warehouse(path)
    if "resolved" not in wh.table_names():
        raise ValueError(f"{path} has no resolved rounds")
    history = wh.query('SELECT round, target, "return" FROM resolved WHERE "return" IS NOT NULL')
    if args.rounds:
        history = history[history["round"].isin(parse_rounds(args.rounds))]
    est = estimate_bucket_per_return(history)
    slopes = ", ".join(f"{r}: {v:.3f}" for r, v in est.per_round.items())
    print(
        f"bucket_per_return = {est.slope:.4f} (pooled within-round slope of target on return "
        f"over {len(est.per_round)} round(s), {est.rows} ids)\nper round: {slopes}\n"
        "set it in the portfolio_scores config: "
        f"ops: {{portfolio_scores: {{config: {{bucket_per_return: {est.slope:.4g}}}}}}}"
    )
    return 0


def cmd_score_candidate(args: argparse.Namespace) -> int:
    import json

    from tc_assets.candidates import score_candidate
    from tc_assets.runner import parse_rounds

    scores = score_candidate(
        args.warehouse, parse_rounds(args.rounds), args.predictions, args.source
    )
    for row in scores.rejections.itertuples():
        print(f"round {row.round}: {row.candidate} rejected ({row.rule}): {row.reason}")
    if len(scores.rounds):
        print(scores.rounds.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
        print()
        print(scores.summary.T.to_string(float_format=lambda v: f"{v:.4f}"))
    else:
        print("no candidate scored in those rounds")
    if args.json:
        doc = {
            "rounds": scores.rounds.to_dict("records"),
            "summary": scores.summary.reset_index().to_dict("records"),
            "rejections": scores.rejections.to_dict("records"),
        }
        Path(args.json).write_text(json.dumps(doc, indent=2, default=float))
    return 0 if len(scores.rounds) else 1


def cmd_copy_to_lake(args: argparse.Namespace) -> int:
    from tc_assets.io.lake import is_lake, redact
    from tc_assets.io.warehouse import Warehouse, WarehouseError

    if not args.target or not is_lake(args.target):
        raise ValueError("--to must be a DuckLake catalog (ducklake:...), or set TC_WAREHOUSE")
    try:
        counts = Warehouse(args.target, data_path=args.lake_data).copy_from_file(args.source)
    except WarehouseError as exc:
        print(f"tc-platform copy-to-lake: error: {exc}", file=sys.stderr)
        return 1
    for name, rows in counts.items():
        print(f"  {name:<36} {rows:>12,} rows")
    print(
        f"copied {len(counts)} tables from {Path(args.source).resolve()} into "
        f"{redact(args.target)} (data {args.lake_data}); dbt's staging views are made by the "
        "next round's build"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tc-platform", description="Score a stock-prediction tournament round by round."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="write a synthetic round source")
    g.add_argument("--out", required=True, help="folder to write features.json and rounds/ into")
    g.add_argument("--rounds", required=True, help="round range, e.g. 1-5")
    g.add_argument("--stocks", type=int, default=1500, help="live ids per round (default 1500)")
    g.add_argument(
        "--features", type=int, default=60, help="size of the medium feature set (default 60)"
    )
    g.add_argument("--models", type=int, default=40, help="submitting models (default 40)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument(
        "--with-bad-inputs",
        action="store_true",
        help="add one submission breaking each rejection rule of the contract",
    )
    g.add_argument("--format", choices=["csv", "parquet"], default="csv", help="submission files")
    g.set_defaults(func=cmd_generate)

    r = sub.add_parser("run", help="ingest and score rounds through the Dagster definitions")
    r.add_argument("--source", required=True, help="round source: a folder or s3://bucket/prefix")
    r.add_argument(
        "--warehouse",
        default=os.environ.get("TC_WAREHOUSE"),
        help="DuckDB file to write, or a DuckLake catalog ducklake:postgres:<dsn> "
        "(default: $TC_WAREHOUSE)",
    )
    r.add_argument(
        "--lake-data",
        default=os.environ.get(LAKE_DATA_ENV),
        help=f"the lake's data folder, s3://bucket/prefix/ or a directory (default: ${LAKE_DATA_ENV})",
    )
    r.add_argument("--rounds", help="round range, e.g. 301-305 (default: every round in source)")
    r.add_argument(
        "--pool-wait",
        type=float,
        metavar="SECONDS",
        help="give up when a step waits longer than this for the warehouse writers' pool, "
        "naming the run that holds it (default: RunGuardSettings.pool_wait_s, 1800)",
    )
    r.set_defaults(func=cmd_run)

    k = sub.add_parser(
        "bucket-per-return",
        help="estimate the portfolio payouts' bucket_per_return from resolved history",
    )
    k.add_argument("--warehouse", required=True, help="DuckDB file with resolved rounds")
    k.add_argument("--rounds", help="round range to estimate from (default: every round)")
    k.set_defaults(func=cmd_bucket_per_return)

    u = sub.add_parser(
        "unblock",
        help="mark failed every run whose process is gone, and the runs given; free their "
        "pool slots",
    )
    u.add_argument("run_ids", nargs="*", metavar="RUN_ID", help="runs to mark failed")
    u.set_defaults(func=cmd_unblock)

    s = sub.add_parser(
        "score-candidate",
        help="exact TC, CORR, MMC, FNCv3 and max feature exposure of candidate signals over "
        "scored rounds",
    )
    s.add_argument("--warehouse", required=True, help="DuckDB file of scored rounds")
    s.add_argument("--rounds", required=True, help="round range, e.g. 1-8")
    s.add_argument(
        "--predictions",
        required=True,
        help="a file (id, prediction; or id and one column per candidate), a folder of "
        "<round>.csv|parquet, or a folder of such folders (one candidate each)",
    )
    s.add_argument("--source", help="round source for the features (default: each round's own)")
    s.add_argument("--json", help="also write the tables to this JSON file")
    s.set_defaults(func=cmd_score_candidate)

    c = sub.add_parser("copy-to-lake", help="copy a DuckDB warehouse file into an empty lake")
    c.add_argument("--from", dest="source", required=True, help="the DuckDB warehouse file")
    c.add_argument(
        "--to",
        dest="target",
        default=os.environ.get("TC_WAREHOUSE"),
        help="the lake's catalog, ducklake:postgres:<dsn> (default: $TC_WAREHOUSE)",
    )
    c.add_argument(
        "--lake-data",
        default=os.environ.get(LAKE_DATA_ENV),
        help=f"the lake's data folder (default: ${LAKE_DATA_ENV})",
    )
    c.set_defaults(func=cmd_copy_to_lake)

    d = sub.add_parser("demo", help="generate rounds, run them, print the results")
    d.add_argument("--rounds", default=DEMO_ROUNDS, help=f"default {DEMO_ROUNDS}")
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError) as exc:
        print(f"tc-platform {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
