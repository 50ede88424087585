"""Read and validate one round from a round source (the input contract, io/contract.py).

`ingest_round` either returns every valid part of the round, with each rejected submission
recorded and its reason, or raises `RoundInputError` when a required input (round.json,
live.parquet, example predictions, stakes.csv) is bad: then nothing of the round may be written.
Files other than those the contract names are ignored.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from tc_assets.io import contract as c
from tc_assets.io.source import RoundSource, SourceError, SourceUnavailable

Progress = Callable[[str, int, int], None]


@dataclass
class RoundInputs:
    """One round's validated inputs. Ids are sorted; matrices are aligned on `ids`."""

    round: int
    info: dict
    feature_sets: dict[str, list[str]]
    live: pd.DataFrame  # index id; era + every feature of `all`
    example: pd.Series  # index id
    market: pd.Series | None  # adv_usd by id, None when the round has no market.parquet
    stakes: pd.DataFrame  # index model_id; stake, corr_multiplier, tc_multiplier
    predictions: pd.DataFrame  # ids x models; NaN where a model did not submit an id
    portfolios: pd.DataFrame  # ids x models; 0 where a model holds nothing
    submissions: pd.DataFrame  # model_id, kind, rows, foreign_ids_dropped, ids_used, coverage
    rejections: pd.DataFrame  # model_id, kind, rule, reason
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def ids(self) -> pd.Index:
        return self.live.index

    @property
    def medium(self) -> list[str]:
        return self.feature_sets["medium"]


REJECTION_COLUMNS = ["model_id", "kind", "rule", "reason"]
SUBMISSION_COLUMNS = ["model_id", "kind", "rows", "foreign_ids_dropped", "ids_used", "coverage"]


def _submission_files(
    source: RoundSource, round_number: int, folder: str
) -> tuple[dict[str, str], list[tuple[str, str, str]]]:
    """Map model_id -> file path for a submission folder; names breaking the rules are rejected.

    Returns (files, rejections) with rejections as (model_id, rule, reason). Suffixes match
    case-insensitively (`.CSV` is a CSV file). A name that is not a valid model id is recorded
    under the whole name, quoted (so it can never equal an accepted model id), and never used
    as a path.
    """
    rel_dir = source.round_path(round_number, folder)
    files: dict[str, list[str]] = {}
    rejections: list[tuple[str, str, str]] = []
    for name in source.list_names(rel_dir):
        stem, dot, suffix = name.rpartition(".")
        if not dot or f".{suffix.lower()}" not in c.SUBMISSION_SUFFIXES:
            continue  # not a submission file (README, .DS_Store, ...): ignored like any extra file
        if not c.is_valid_model_id(stem):
            rejections.append(
                (
                    repr(stem),
                    c.Rule.INVALID_MODEL_ID,
                    f"file name {name[:80]!r} is not a valid model id "
                    f"(allowed: {c.MODEL_ID_PATTERN.pattern})",
                )
            )
            continue
        files.setdefault(stem, []).append(f"{rel_dir}/{name}")
    unique: dict[str, str] = {}
    for model_id, paths in files.items():
        if len(paths) > 1:
            names = sorted(p.rsplit("/", 1)[1] for p in paths)
            rejections.append(
                (
                    model_id,
                    c.Rule.DUPLICATE_SUBMISSION,
                    f"more than one file for the model: {names}",
                )
            )
        else:
            unique[model_id] = paths[0]
    return unique, rejections


@dataclass(frozen=True)
class _Kind:
    """How one submission folder is read: its value column, the contract's validator, the value
    of a cell a model did not submit, and whether the screen checks [0, 1] and spread (predictions)
    or the portfolio sums."""

    name: str
    folder: str
    column: str
    validate: Callable[[pd.DataFrame, pd.Index], c.Accepted | c.Rejection]
    fill: float


PREDICTION = _Kind("prediction", c.PREDICTIONS_DIR, "prediction", c.validate_predictions, np.nan)
PORTFOLIO = _Kind("portfolio", c.PORTFOLIOS_DIR, "weight", c.validate_portfolio, 0.0)
_SCREENED_VALUES = (pa.float64(), pa.float32(), pa.int64(), pa.int32())


@dataclass
class _Submissions:
    """What a folder's files gave: the aligned matrix (ids x accepted models), the accepted
    files' counts, the rejections as (model_id, rule, reason)."""

    wide: pd.DataFrame
    rows: list[dict]
    rejected: list[tuple[str, str, str]]


def _screenable(table: pa.Table, column: str) -> bool:
    """Whether a table has the plain shape the vectorized screen handles: unique column names,
    string ids and numeric values without nulls, no pandas index stored in the file. Any other
    table is judged by the contract's validator on its pandas form, as `read_table` gives it."""
    names = table.schema.names
    if len(set(names)) != len(names) or "id" not in names or column not in names:
        return False
    meta = table.schema.pandas_metadata
    if meta and any(not isinstance(i, dict) for i in meta.get("index_columns", [])):
        return False
    ids, values = table.column("id"), table.column(column)
    return (
        ids.type in (pa.string(), pa.large_string())
        and values.type in _SCREENED_VALUES
        and ids.null_count == 0
        and values.null_count == 0
    )


def _screen(
    tables: list[pa.Table], kind: _Kind, live: pa.Array, n_live: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Every table's rows at once: one hash lookup of all ids in the round's ids.

    Returns (passed per table, rows per table, in-round rows per table, live position per
    row or -1, value per row). A table passes only when the contract's validator would accept
    it: unique ids, finite values, and, over the ids of the round, values in [0, 1] that are
    not all equal and cover at least MIN_COVERAGE (predictions), or sums within half the
    tolerance (portfolios: a summation order may differ in the last bits; a file nearer the
    bound is left to the validator).
    """
    k = len(tables)
    lengths = np.array([t.num_rows for t in tables], dtype=np.int64)
    ids = pa.chunked_array(
        [chunk for t in tables for chunk in t.column("id").cast(pa.string()).chunks],
        type=pa.string(),
    )
    values = np.concatenate(
        [t.column(kind.column).cast(pa.float64()).to_numpy() for t in tables]
        or [np.empty(0, np.float64)]
    )
    pos = pc.index_in(ids, value_set=live).fill_null(-1).to_numpy().astype(np.int64)
    table_of = np.repeat(np.arange(k), lengths)
    inside = pos >= 0
    n_in = np.bincount(table_of[inside], minlength=k)
    ok = np.bincount(table_of, weights=~np.isfinite(values), minlength=k) == 0
    seen = np.zeros(k * n_live, dtype=bool)  # (table, position) pairs: duplicates in the round
    seen[table_of[inside] * n_live + pos[inside]] = True
    ok &= seen.reshape(k, n_live).sum(axis=1) == n_in
    if not inside.all():  # ids not in the round must be unique too
        out = pa.table({"t": table_of[~inside], "id": ids.filter(pa.array(~inside))})
        counts = out.group_by(["t", "id"]).aggregate([([], "count_all")])
        repeated = pc.greater(counts.column("count_all"), 1)
        ok[np.unique(counts.column("t").filter(repeated).to_numpy())] = False
    t_in, v_in = table_of[inside], values[inside]
    if kind.name == PREDICTION.name:
        outside = (v_in < 0) | (v_in > 1)
        ok &= np.bincount(t_in, weights=outside, minlength=k) == 0
        ok &= np.array([n / n_live >= c.MIN_COVERAGE for n in n_in.tolist()], dtype=bool)
        lo, hi = np.zeros(k), np.zeros(k)  # tables with no id in the round fail coverage
        some = n_in > 0
        firsts = (np.cumsum(n_in) - n_in)[some]  # each table's rows are contiguous
        if firsts.size:
            lo[some] = np.minimum.reduceat(v_in, firsts)
            hi[some] = np.maximum.reduceat(v_in, firsts)
        ok &= lo < hi
    else:
        half = c.PORTFOLIO_TOLERANCE / 2
        total = np.bincount(t_in, weights=v_in, minlength=k)
        longs = np.bincount(t_in, weights=np.where(v_in > 0, v_in, 0.0), minlength=k)
        ok &= (np.abs(total) <= half) & (np.abs(longs - 1.0) <= half)
    return ok, lengths, n_in, pos, values


def _read_submissions(
    source: RoundSource,
    files: dict[str, str],
    kind: _Kind,
    live_ids: pd.Index,
    progress: Progress | None,
    workers: int,
) -> _Submissions:
    """Read, validate and align every submission file of a folder, a tenth of them at a time.

    Files are parsed in a thread pool; each tenth is then screened as a whole (`_screen`) and
    its accepted values scattered into the ids x models matrix with one indexed assignment.
    Files the screen does not pass (bad files, unusual types) get the contract's validator on
    the pandas table `read_table` gives: every rejection and its reason come from it.
    """
    names = sorted(files)
    n_live = len(live_ids)
    live = pa.array(live_ids.to_numpy(dtype=object), pa.string())
    out = np.full((n_live, len(names)), kind.fill, dtype=np.float64, order="F")
    flat = out.reshape(-1, order="F")  # a view: column j starts at j * n_live
    verdicts: dict[str, c.Accepted | c.Rejection | tuple[int, int]] = {}

    def read(model_id: str) -> pa.Table | c.Rejection:
        try:
            return source.read_arrow(files[model_id])
        except SourceUnavailable:
            raise  # the file may be fine: fail the round (retried), never reject the model
        except SourceError as exc:
            return c.Rejection(c.Rule.UNREADABLE, str(exc).split(": ", 1)[-1][:500])

    step = max(1, len(names) // 10)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for first in range(0, len(names), step):
            batch = names[first : first + step]
            read_back = list(pool.map(read, batch))
            plain = [
                i
                for i, t in enumerate(read_back)
                if isinstance(t, pa.Table) and _screenable(t, kind.column)
            ]
            ok, lengths, n_in, pos, values = _screen(
                [read_back[i] for i in plain], kind, live, n_live
            )
            starts = np.concatenate([[0], np.cumsum(lengths)])
            for j, i in enumerate(plain):
                if ok[j]:
                    rows = slice(starts[j], starts[j + 1])
                    p = pos[rows]
                    keep = p >= 0
                    flat[(first + i) * n_live + p[keep]] = values[rows][keep]
                    verdicts[batch[i]] = (int(lengths[j]), int(n_in[j]))
            for i, (model_id, table) in enumerate(zip(batch, read_back, strict=True)):
                if model_id in verdicts:
                    continue
                if isinstance(table, c.Rejection):
                    verdicts[model_id] = table
                    continue
                result = kind.validate(table.to_pandas(), live_ids)
                verdicts[model_id] = result
                if isinstance(result, c.Accepted):
                    column = out[:, first + i]
                    column[live_ids.get_indexer(result.values.index)] = result.values.to_numpy()
            if progress is not None:
                progress(kind.name, min(first + step, len(names)), len(names))
    return _assemble(names, verdicts, out, live_ids, kind)


def _assemble(
    names: list[str],
    verdicts: dict[str, c.Accepted | c.Rejection | tuple[int, int]],
    out: np.ndarray,
    live_ids: pd.Index,
    kind: _Kind,
) -> _Submissions:
    """Keep the accepted files' columns (moved left in place, in model order) and count them."""
    n_live = len(live_ids)
    rows: list[dict] = []
    rejected: list[tuple[str, str, str]] = []
    accepted: list[str] = []
    for j, model_id in enumerate(names):
        verdict = verdicts[model_id]
        if isinstance(verdict, c.Rejection):
            rejected.append((model_id, verdict.rule, verdict.reason))
            continue
        if isinstance(verdict, c.Accepted):
            n_rows, n_in, foreign = verdict.rows, len(verdict.values), verdict.foreign_ids
        else:
            (n_rows, n_in), foreign = verdict, verdict[0] - verdict[1]
        if len(accepted) != j:
            out[:, len(accepted)] = out[:, j]
        accepted.append(model_id)
        rows.append(
            dict(
                model_id=model_id,
                kind=kind.name,
                rows=n_rows,
                foreign_ids_dropped=foreign,
                ids_used=n_in,
                coverage=n_in / n_live,
            )
        )
    wide = pd.DataFrame(
        out[:, : len(accepted)],
        index=live_ids,
        columns=pd.Index(accepted, name="model_id"),
        copy=False,
    )
    return _Submissions(wide=wide, rows=rows, rejected=rejected)


@contextmanager
def _round_errors(r: int) -> Iterator[None]:
    """A required file of round r that cannot be read or breaks the contract becomes a
    RoundInputError naming the round; an unreachable source stays SourceUnavailable."""
    try:
        yield
    except SourceUnavailable:
        raise
    except (SourceError, c.RoundInputError) as exc:
        raise c.RoundInputError(f"round {r}: {exc}", getattr(exc, "rows", None)) from exc


def ingest_round(
    source: RoundSource,
    round_number: int,
    allowed_corr_multipliers: tuple[float, ...] | None = None,
    allowed_tc_multipliers: tuple[float, ...] | None = None,
    progress: Progress | None = None,
    workers: int = 8,
) -> RoundInputs:
    """Read, validate and assemble one round.

    Raises RoundInputError on a bad required input (the round cannot be ingested as it is) and
    SourceUnavailable when the source cannot be reached (try again later).
    """
    t0 = time.perf_counter()
    r = int(round_number)
    with _round_errors(r):
        info = c.validate_round_info(source.round_info(r), r)
        feature_sets = c.validate_feature_sets(source.feature_sets())
        live = c.validate_live(
            source.read_table(source.round_path(r, c.LIVE_FILE)), feature_sets["all"]
        )
        ids = live.index
        example = c.validate_example(source.read_table(source.round_path(r, c.EXAMPLE_FILE)), ids)
        market = None
        if source.exists(source.round_path(r, c.MARKET_FILE)):
            market = c.validate_market(source.read_table(source.round_path(r, c.MARKET_FILE)), ids)
        stakes = c.validate_stakes(
            source.read_table(source.round_path(r, c.STAKES_FILE)),
            allowed_corr_multipliers,
            allowed_tc_multipliers,
        )
    t_required = time.perf_counter()

    rejections: list[dict] = []
    submissions: list[dict] = []
    wide: dict[str, pd.DataFrame] = {}
    for kind in (PREDICTION, PORTFOLIO):
        files, bad_names = _submission_files(source, r, kind.folder)
        read = _read_submissions(source, files, kind, ids, progress, workers)
        rejections += [
            dict(model_id=m, kind=kind.name, rule=rule, reason=reason)
            for m, rule, reason in bad_names + read.rejected
        ]
        submissions += read.rows
        wide[kind.name] = read.wide
    t_done = time.perf_counter()
    return RoundInputs(
        round=r,
        info=info,
        feature_sets=feature_sets,
        live=live,
        example=example,
        market=market,
        stakes=stakes,
        predictions=wide["prediction"],
        portfolios=wide["portfolio"],
        submissions=pd.DataFrame(submissions, columns=SUBMISSION_COLUMNS),
        rejections=pd.DataFrame(rejections, columns=REJECTION_COLUMNS)
        .sort_values(["kind", "model_id"])
        .reset_index(drop=True),
        timings={"required_s": t_required - t0, "submissions_s": t_done - t_required},
    )


def load_resolved(source: RoundSource, round_number: int, ids: pd.Index) -> pd.DataFrame | None:
    """The round's targets (and returns, when published) by id, or None while resolved.parquet
    has not arrived."""
    rel = source.round_path(round_number, c.RESOLVED_FILE)
    if not source.exists(rel):
        return None
    with _round_errors(round_number):
        return c.validate_resolved(source.read_table(rel), ids)


# Warehouse rows ----------------------------------------------------------------------------


def long_matrix(wide: pd.DataFrame, value_name: str, skip: float | None = None) -> pa.Table:
    """An ids x models matrix as (model_id, id, value) rows, NaN (or `skip`) cells left out.

    Builds dictionary-encoded Arrow columns directly: at full size (5,000 x 5,000) this avoids
    25 million Python strings.
    """
    values = wide.to_numpy().T  # models x ids
    keep = ~np.isnan(values) if skip is None else values != skip
    model_idx, id_idx = np.nonzero(keep)
    return pa.table(
        {
            "model_id": pa.DictionaryArray.from_arrays(
                pa.array(model_idx.astype(np.int32)), pa.array(list(map(str, wide.columns)))
            ),
            "id": pa.DictionaryArray.from_arrays(
                pa.array(id_idx.astype(np.int32)), pa.array(list(map(str, wide.index)))
            ),
            value_name: pa.array(values[keep]),
        }
    )


def warehouse_tables(inputs: RoundInputs, source_uri: str) -> dict[str, pd.DataFrame | pa.Table]:
    """The ingestion tables of one round, ready for one `Warehouse.write_round` call."""
    ids = inputs.ids
    submitted = set(inputs.predictions.columns) | set(inputs.portfolios.columns)
    stakes = inputs.stakes.reset_index()
    stakes["submitted"] = stakes["model_id"].isin(submitted)
    info = inputs.info
    rounds = pd.DataFrame(
        [
            {
                "open_time": info["open_time"],
                "close_time": info["close_time"],
                "resolve_time": info["resolve_time"],
                "stake_threshold": info["stake_threshold"],
                "clip": info["clip"],
                "n_ids": len(ids),
                "n_prediction_models": inputs.predictions.shape[1],
                "n_portfolio_models": inputs.portfolios.shape[1],
                "n_rejected": len(inputs.rejections),
                "source": source_uri,
                "ingested_at": pd.Timestamp.now(tz="UTC"),
            }
        ]
    )
    tables: dict[str, pd.DataFrame | pa.Table] = {
        "rounds": rounds,
        "universe": pd.DataFrame({"id": ids.to_numpy(), "era": inputs.live["era"].to_numpy()}),
        "example_predictions": pd.DataFrame(
            {"id": inputs.example.index.to_numpy(), "prediction": inputs.example.to_numpy()}
        ),
        "market": pd.DataFrame(
            {"id": inputs.market.index.to_numpy(), "adv_usd": inputs.market.to_numpy()}
            if inputs.market is not None
            else {"id": pd.Series([], dtype=str), "adv_usd": pd.Series([], dtype=float)}
        ),
        "stakes": stakes,
        "predictions": long_matrix(inputs.predictions, "prediction"),
        "portfolios": long_matrix(inputs.portfolios, "weight", skip=0.0),
        "submissions": inputs.submissions,
        "submission_rejections": inputs.rejections,
    }
    return tables


def stored_resolved(rows: pd.DataFrame) -> pd.DataFrame:
    """The resolved frame as `load_resolved` gave it, from the round's stored `resolved` rows
    (the inverse of `resolved_table`): a `return` column only when the round published one."""
    ret = c.RETURN_COLUMN
    columns = {"target": rows["target"].to_numpy(dtype=np.float64)}
    if rows[ret].notna().any():
        columns[ret] = rows[ret].to_numpy(dtype=np.float64)
    index = pd.Index(rows["id"].to_numpy(dtype=object), name="id")
    return pd.DataFrame(columns, index=index).sort_index()


def resolved_table(resolved: pd.DataFrame) -> pd.DataFrame:
    """The `resolved` rows; `return` is NULL for a round resolved with targets only."""
    ret = c.RETURN_COLUMN
    return pd.DataFrame(
        {
            "id": resolved.index.to_numpy(),
            "target": resolved["target"].to_numpy(),
            ret: resolved[ret].to_numpy() if ret in resolved.columns else np.nan,
        }
    )
