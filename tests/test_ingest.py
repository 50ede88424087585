"""Ingestion per the contract, through the real Dagster assets, the real warehouse and generated rounds."""

import json
import shutil

import dagster as dg
import pandas as pd
import pytest

from tc_assets.defs.definitions import INGEST_ROUND_JOB
from tc_assets.io import contract as c
from tc_assets.io.ingest import ingest_round
from tc_assets.io.source import LocalRoundSource
from tc_assets.io.warehouse import Warehouse
from tests.conftest import platform, run_job

INGEST_TABLES = [
    "rounds",
    "universe",
    "example_predictions",
    "market",
    "stakes",
    "predictions",
    "portfolios",
    "submissions",
    "submission_rejections",
]


def planted(source, round_number: int) -> pd.DataFrame:
    return pd.read_csv(source / "rounds" / str(round_number) / "planted.csv", dtype=str).fillna("")


def snapshot(wh: Warehouse) -> dict[str, pd.DataFrame]:
    """Every row of every ingestion table, in a canonical order."""
    out = {}
    for name in wh.table_names():
        df = wh.query(f'SELECT * FROM "{name}"')
        df = df.drop(columns=[c for c in ("ingested_at",) if c in df.columns])
        out[name] = df.sort_values(list(df.columns)).reset_index(drop=True)
    return out


def test_every_rejection_rule_gives_its_reason_and_valid_submissions_are_kept(
    small_source, tmp_path, instance, value_store
):
    defs, paths = platform(small_source, tmp_path, value_store)
    result = run_job(defs, instance, 1, INGEST_ROUND_JOB)
    assert result.success
    wh = Warehouse(paths.warehouse)
    rejections = wh.read_round("submission_rejections", 1)
    truth = planted(small_source, 1)

    bad = truth[(truth["expected_rule"] != "") & (truth["expected_rule"] != "foreign_ids_dropped")]
    got = {(r.model_id, r.rule) for r in rejections.itertuples()}
    for row in bad.itertuples():
        model_id = (
            row.model_id if row.expected_rule != c.Rule.INVALID_MODEL_ID else repr("bad model!")
        )
        assert (model_id, row.expected_rule) in got, f"{row.model_id}: {row.expected_rule} missing"
    assert len(rejections) == len(bad)  # nothing valid was rejected
    assert rejections["reason"].str.len().min() > 10  # a specific, readable reason

    # Every valid submission of the round is there, with all its ids.
    submissions = wh.read_round("submissions", 1)
    good = truth[(truth["expected_rule"].isin(["", "foreign_ids_dropped"]))]
    want_pred = set(good.loc[good["submits"].isin(["predictions", "both"]), "model_id"])
    want_port = set(good.loc[good["submits"].isin(["portfolio", "both"]), "model_id"])
    assert set(submissions.loc[submissions["kind"] == "prediction", "model_id"]) == want_pred
    assert set(submissions.loc[submissions["kind"] == "portfolio", "model_id"]) == want_port
    predictions = wh.read_round("predictions", 1)
    counts = predictions.groupby("model_id").size()
    for model_id in want_pred:
        src = pd.read_csv(
            small_source / "rounds/1/predictions" / f"{model_id}.csv", dtype={"id": str}
        )
        live = set(pd.read_parquet(small_source / "rounds/1/live.parquet")["id"])
        assert counts[model_id] == src["id"].isin(live).sum()

    # Ids not in the round are dropped and counted, not rejected.
    foreign = truth.loc[truth["expected_rule"] == "foreign_ids_dropped", "model_id"].item()
    row = submissions.set_index(["model_id", "kind"]).loc[(foreign, "prediction")]
    assert (
        row["foreign_ids_dropped"] > 0
        and row["rows"] == row["ids_used"] + row["foreign_ids_dropped"]
    )

    # A model with a stake row but no valid submission keeps its row, flagged not submitted.
    stakes = wh.read_round("stakes", 1).set_index("model_id")
    for row in bad.itertuples():
        if (
            row.expected_rule != c.Rule.INVALID_MODEL_ID
            and row.model_id not in want_port | want_pred
        ):
            assert not stakes.loc[row.model_id, "submitted"]
    absent = truth.loc[truth["submits"] == "none", "model_id"]
    assert len(absent) and not stakes.loc[absent, "submitted"].any()

    # The materialization reports accepted and rejected models with reasons.
    mat = instance.get_latest_materialization_event(
        dg.AssetKey("predictions")
    ).asset_materialization
    assert mat.metadata["models_rejected"].value == (bad["submits"] == "predictions").sum()
    shown = mat.metadata["rejections"].value.records
    assert "low_coverage" in {row.data["rule"] for row in shown}


def test_extra_files_in_the_source_are_ignored(fresh_source):
    src = LocalRoundSource(fresh_source)
    before = ingest_round(src, 1)
    (fresh_source / "rounds/1/README.txt").write_text("notes")
    (fresh_source / "rounds/1/predictions/notes.txt").write_text("not a submission")
    (fresh_source / "rounds/1/extra.parquet").write_bytes(b"garbage")
    (fresh_source / "rounds/not_a_round").mkdir()
    (fresh_source / "rounds/not_a_round/round.json").write_text("{")
    after = ingest_round(src, 1)
    assert src.round_numbers() == [1, 2]
    pd.testing.assert_frame_equal(before.predictions, after.predictions)
    pd.testing.assert_frame_equal(before.rejections, after.rejections)


def test_a_bad_stakes_file_fails_the_round_and_changes_nothing(
    fresh_source, tmp_path, instance, value_store
):
    defs, paths = platform(fresh_source, tmp_path, value_store)
    assert run_job(defs, instance, 1, INGEST_ROUND_JOB).success
    assert run_job(defs, instance, 2, INGEST_ROUND_JOB).success
    wh = Warehouse(paths.warehouse)
    before = snapshot(wh)

    stakes_file = fresh_source / "rounds/1/stakes.csv"
    stakes = pd.read_csv(stakes_file, dtype={"model_id": str})
    stakes.loc[0, "stake"] = -5
    stakes.loc[3, "tc_multiplier"] = float("nan")
    stakes.loc[5, "model_id"] = stakes.loc[6, "model_id"]
    stakes.loc[8, "corr_multiplier"] = 7  # not an allowed election
    stakes.to_csv(stakes_file, index=False)

    result = run_job(defs, instance, 1, INGEST_ROUND_JOB)
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE)
    message = failure.event_specific_data.error.message
    for line in (2, 5, 7, 8, 10):  # file lines of the bad rows (header is line 1)
        assert f"line {line}:" in message, message
    assert "not an allowed election" in message and "nothing of this round was written" in message
    after = snapshot(wh)
    assert before.keys() == after.keys()
    for name in before:
        pd.testing.assert_frame_equal(before[name], after[name], obj=name)


def test_running_a_round_twice_gives_identical_tables(
    small_source, tmp_path, instance, value_store
):
    defs, paths = platform(small_source, tmp_path, value_store)
    assert run_job(defs, instance, 2, INGEST_ROUND_JOB).success
    first = snapshot(Warehouse(paths.warehouse))
    assert run_job(defs, instance, 2, INGEST_ROUND_JOB).success
    second = snapshot(Warehouse(paths.warehouse))
    assert set(first) >= set(INGEST_TABLES)
    for name in first:
        pd.testing.assert_frame_equal(first[name], second[name], obj=name)


def test_unresolved_round_is_reported_awaiting_resolution(
    fresh_source, tmp_path, instance, value_store
):
    (fresh_source / "rounds/2/resolved.parquet").unlink()
    defs, paths = platform(fresh_source, tmp_path, value_store)
    result = run_job(defs, instance, 2)
    assert result.success  # not a failure: the target-dependent steps are skipped
    logs = [e.message for e in instance.all_logs(result.run_id) if e.message]
    assert any("awaiting resolution" in m for m in logs)
    wh = Warehouse(paths.warehouse)
    assert wh.read_round("resolved", 2).empty
    assert len(wh.read_round("universe", 2)) > 0
    # What needs no target is computed at close; what needs one is not.
    for table in ("meta_model", "feature_exposures", "exposure_metrics"):
        assert len(wh.read_round(table, 2)) > 0, table
    assert "model_metrics" not in wh.table_names() or wh.read_round("model_metrics", 2).empty

    # Materializing a target-dependent asset on its own says why it cannot run.
    alone = defs.resolve_job_def("score_round").execute_in_process(
        instance=instance,
        partition_key="2",
        asset_selection=[dg.AssetKey("model_metrics")],
        raise_on_error=False,
    )
    assert not alone.success
    (failure,) = [e for e in alone.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE]
    error = failure.step_failure_data.error
    assert error.cls_name == "Failure" and "awaiting resolution" in error.message


def _keep_market_share(root, share: float) -> None:
    path = root / "rounds/1/market.parquet"
    market = pd.read_parquet(path)
    market.iloc[: int(share * len(market))].to_parquet(path)


def _edit_round_json(root, **changes) -> None:
    path = root / "rounds/1/round.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda root: _keep_market_share(root, 0.5), r"market.parquet: has adv_usd for \d+ of"),
        (lambda root: _edit_round_json(root, round=True), "round must be an integer, got True"),
        (lambda root: _edit_round_json(root, round=1.0), "round must be an integer, got 1.0"),
        (
            lambda root: _edit_round_json(
                root, open_time="2026-12-02T12:00:00Z", close_time="2026-12-01T13:00:00Z"
            ),
            "close_time '2026-12-01T13:00:00Z' is not after open_time",
        ),
        (lambda root: (root / "rounds/1/live.parquet").unlink(), "live.parquet"),
        (
            lambda root: (root / "rounds/1/round.json").write_text('{"round": 9}'),
            "missing required key",
        ),
        (
            lambda root: shutil.copy(root / "rounds/2/round.json", root / "rounds/1/round.json"),
            "says round 2",
        ),
        (lambda root: _edit_round_json(root, close_time=None), "close_time None is not"),
        (lambda root: _edit_round_json(root, open_time=""), "open_time '' is not"),
        (lambda root: _edit_round_json(root, payout=[]), "'payout' must be an object"),
        (lambda root: _edit_round_json(root, payout={"clip": True}), "clip must be a number"),
        (lambda root: _edit_round_json(root, payout={"clip": 7}), r"clip must be in \(0, 1\]"),
        (
            lambda root: _edit_round_json(root, payout={"stake_threshold": -1}),
            "stake_threshold must be positive",
        ),
    ],
)
def test_bad_required_inputs_fail_with_a_clear_error(fresh_source, mutate, message):
    mutate(fresh_source)
    with pytest.raises(c.RoundInputError, match=message):
        ingest_round(LocalRoundSource(fresh_source), 1)


def test_model_ids_that_look_like_missing_values_are_kept(fresh_source):
    """'NA', 'null' and 'nan' are valid model ids (contract pattern): read as text, not as
    missing, in stakes.csv and as file names; an id column value 'NA' is an id too."""
    rnd = fresh_source / "rounds/1"
    stakes = pd.read_csv(rnd / "stakes.csv", dtype={"model_id": str}, keep_default_na=False)
    accepted = ingest_round(LocalRoundSource(fresh_source), 1).predictions.columns[0]
    first = rnd / "predictions" / f"{accepted}.csv"
    names = ["NA", "null", "nan"]
    for name in names:
        shutil.copy(first, rnd / "predictions" / f"{name}.csv")
    extra = pd.DataFrame(
        {"model_id": names, "stake": 10.0, "corr_multiplier": 0.5, "tc_multiplier": 1.0}
    )
    pd.concat([stakes, extra]).to_csv(rnd / "stakes.csv", index=False)
    inputs = ingest_round(LocalRoundSource(fresh_source), 1)
    assert set(names) <= set(inputs.predictions.columns) and set(names) <= set(inputs.stakes.index)
    assert (inputs.stakes.loc[names, "stake"] == 10.0).all()


def test_an_empty_prediction_file_is_rejected_for_coverage(fresh_source):
    """A file with the header only covers none of the round's ids: low_coverage, not constant."""
    rnd = fresh_source / "rounds/1"
    model = ingest_round(LocalRoundSource(fresh_source), 1).predictions.columns[0]
    (rnd / "predictions" / f"{model}.csv").write_text("id,prediction\n")
    inputs = ingest_round(LocalRoundSource(fresh_source), 1)
    rejected = inputs.rejections.set_index("model_id")
    assert rejected.loc[model, "rule"] == c.Rule.LOW_COVERAGE
    assert "covers 0 of" in rejected.loc[model, "reason"]


def test_return_is_optional_in_resolved_parquet():
    ids = pd.Index(["a", "b", "c"])
    targets_only = c.validate_resolved(pd.DataFrame({"id": ids, "target": [0.0, 0.5, 1.0]}), ids)
    assert list(targets_only.columns) == ["target"] and len(targets_only) == 3
    both = pd.DataFrame({"id": ids, "target": [0.0, 0.5, 1.0], "return": [-0.01, 0.0, 0.02]})
    assert list(c.validate_resolved(both, ids).columns) == ["target", "return"]
    with pytest.raises(c.RoundInputError, match="return has NaN.*leave the column out"):
        c.validate_resolved(both.assign(**{"return": [0.1, None, 0.2]}), ids)
    with pytest.raises(c.RoundInputError, match=r"missing column\(s\) \['target'\]"):
        c.validate_resolved(both.drop(columns="target"), ids)


def _repeat_column(path, header: list[str]) -> None:
    """Rewrite a .csv or .parquet file with `header` (a repeated name in it) over its columns."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if path.suffix == ".csv":
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
        df = df[[df.columns[0], *df.columns[: len(header) - 1]]]
        df.columns = header
        df.to_csv(path, index=False)
    else:
        table = pq.read_table(path)
        cols = [table.column(0), *[table.column(i) for i in range(len(header) - 1)]]
        pq.write_table(pa.table(cols, names=header), path)


def test_a_submission_with_a_repeated_column_is_rejected_and_the_round_scores(
    fresh_source, tmp_path, instance
):
    rnd = fresh_source / "rounds/1"
    accepted = ingest_round(LocalRoundSource(fresh_source), 1).predictions.columns[:3]
    targets = {
        accepted[0]: ["id", "prediction", "prediction"],
        accepted[1]: ["id", "id", "prediction"],
    }
    for model_id, header in targets.items():
        path = next((rnd / "predictions").glob(f"{model_id}.*"))
        _repeat_column(path, header)
    # The same header in a parquet file.
    path = rnd / "predictions" / f"{accepted[2]}.parquet"
    pd.read_csv(
        next((rnd / "predictions").glob(f"{accepted[2]}.csv")), dtype={"id": str}
    ).to_parquet(path)
    next((rnd / "predictions").glob(f"{accepted[2]}.csv")).unlink()
    _repeat_column(path, ["id", "prediction", "prediction"])

    defs, paths = platform(fresh_source, tmp_path)
    result = run_job(defs, instance, 1)
    assert result.success
    rejected = (
        Warehouse(paths.warehouse).read_round("submission_rejections", 1).set_index("model_id")
    )
    for model_id in accepted[:3]:
        assert rejected.loc[model_id, "rule"] == c.Rule.DUPLICATE_COLUMNS
        assert "appear more than once in the header" in rejected.loc[model_id, "reason"]
    assert "'prediction'" in rejected.loc[accepted[0], "reason"]
    assert "'id'" in rejected.loc[accepted[1], "reason"]


@pytest.mark.parametrize(
    "name", ["stakes.csv", "resolved.parquet", "market.parquet", "live.parquet"]
)
def test_a_required_file_with_a_repeated_column_fails_the_round_at_once(
    fresh_source, tmp_path, instance, name
):
    path = fresh_source / "rounds/1" / name
    if name == "market.parquet" and not path.exists():
        pytest.skip("the generator wrote no market.parquet")
    first = pd.read_parquet(path).columns[0] if path.suffix == ".parquet" else "model_id"
    header = [first, first, *([] if name != "stakes.csv" else [])]
    _repeat_column(path, header)
    defs, _ = platform(fresh_source, tmp_path)
    result = run_job(defs, instance, 1, INGEST_ROUND_JOB)
    assert not result.success
    failures = [e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE]
    retries = [
        e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_UP_FOR_RETRY
    ]
    assert len(failures) == 1 and not retries  # on the first try, no retry
    message = failures[0].event_specific_data.error.message
    assert f"{name}: column(s) ['{first}'] appear more than once in the header" in message


def test_submission_file_names_and_values_at_the_edges_of_the_contract(fresh_source):
    """A 65-character name is rejected under its whole name, quoted (never colliding with the
    accepted model named by its first 64 characters); `.CSV` is a CSV file; boolean values are
    not predictions."""
    folder = fresh_source / "rounds/1/predictions"
    stakes_file = fresh_source / "rounds/1/stakes.csv"
    stakes = pd.read_csv(stakes_file, dtype={"model_id": str}, keep_default_na=False)
    first, second, third = ingest_round(LocalRoundSource(fresh_source), 1).predictions.columns[:3]
    long_ok, long_bad = "m" * 64, "m" * 65
    shutil.copy(folder / f"{first}.csv", folder / f"{long_ok}.csv")
    shutil.copy(folder / f"{first}.csv", folder / f"{long_bad}.csv")
    (folder / f"{second}.csv").rename(folder / f"{second}.CSV")
    booleans = pd.read_csv(folder / f"{third}.csv", dtype={"id": str})
    booleans["prediction"] = booleans["prediction"] > 0.5
    booleans.to_csv(folder / f"{third}.csv", index=False)
    extra = pd.DataFrame(
        {"model_id": [long_ok], "stake": 1.0, "corr_multiplier": 1.0, "tc_multiplier": 1.0}
    )
    pd.concat([stakes, extra]).to_csv(stakes_file, index=False)

    inputs = ingest_round(LocalRoundSource(fresh_source), 1)
    rejected = inputs.rejections.set_index("model_id")
    assert long_ok in inputs.predictions.columns and long_ok not in rejected.index
    assert rejected.loc[repr(long_bad), "rule"] == c.Rule.INVALID_MODEL_ID
    assert second in inputs.predictions.columns  # read from second.CSV
    assert rejected.loc[third, "rule"] == c.Rule.UNREADABLE
    assert "booleans" in rejected.loc[third, "reason"]


def test_a_bad_resolved_file_fails_the_round_before_its_inputs_are_written(
    fresh_source, tmp_path, instance
):
    resolved = fresh_source / "rounds/1/resolved.parquet"
    pd.read_parquet(resolved).assign(target=7.0).to_parquet(resolved)
    defs, paths = platform(fresh_source, tmp_path)
    result = run_job(defs, instance, 1, INGEST_ROUND_JOB)
    assert not result.success
    (failure,) = [e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE]
    assert failure.step_key == "round_inputs"
    assert "resolved.parquet" in failure.event_specific_data.error.message
    wh = Warehouse(paths.warehouse)
    assert all(wh.read_round(name, 1).empty for name in INGEST_TABLES if name in wh.table_names())
