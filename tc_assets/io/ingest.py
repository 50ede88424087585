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


def _read_submissions(
    source: RoundSource,
    files: dict[str, str],
    validate: Callable[[pd.DataFrame, pd.Index], c.Accepted | c.Rejection],
    live_ids: pd.Index,
    kind: str,
    progress: Progress | None,
    workers: int,
) -> tuple[dict[str, c.Accepted], list[tuple[str, str, str]]]:
    def one(model_id: str) -> tuple[str, c.Accepted | c.Rejection]:
        try:
            df = source.read_table(files[model_id])
        except SourceUnavailable:
            raise  # the file may be fine: fail the round (retried), never reject the model
        except SourceError as exc:
            return model_id, c.Rejection(c.Rule.UNREADABLE, str(exc).split(": ", 1)[-1][:500])
        return model_id, validate(df, live_ids)

    accepted: dict[str, c.Accepted] = {}
    rejected: list[tuple[str, str, str]] = []
    names = sorted(files)
    step = max(1, len(names) // 10)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for i, (model_id, result) in enumerate(pool.map(one, names), start=1):
            if isinstance(result, c.Rejection):
                rejected.append((model_id, result.rule, result.reason))
            else:
                accepted[model_id] = result
            if progress is not None and (i % step == 0 or i == len(names)):
                progress(kind, i, len(names))
    return accepted, rejected


def _wide(accepted: dict[str, c.Accepted], ids: pd.Index, fill: float) -> pd.DataFrame:
    """Stack accepted series into an ids x models matrix without a pandas concat per model."""
    models = sorted(accepted)
    out = np.full((len(ids), len(models)), fill, dtype=np.float64)
    for j, model_id in enumerate(models):
        values = accepted[model_id].values
        out[ids.get_indexer(values.index), j] = values.to_numpy()
    return pd.DataFrame(out, index=ids, columns=pd.Index(models, name="model_id"))


@contextmanager
def _round_errors(r: int) -> Iterator[None]:
    """A required file of round r that cannot be read or breaks the contract becomes a
    RoundInputError naming the round; an unreachable source stays SourceUnavailable."""
    try:
        yield
    except SourceUnavailable:
        raise
    except (SourceError, c.RoundInputError) as exc:
        raise c.RoundInputError(f"round {r}: {exc}") from exc


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
    for kind, folder, validate, fill in (
        ("prediction", c.PREDICTIONS_DIR, c.validate_predictions, np.nan),
        ("portfolio", c.PORTFOLIOS_DIR, c.validate_portfolio, 0.0),
    ):
        files, bad_names = _submission_files(source, r, folder)
        accepted, rejected = _read_submissions(
            source, files, validate, ids, kind, progress, workers
        )
        rejections += [
            dict(model_id=m, kind=kind, rule=rule, reason=reason)
            for m, rule, reason in bad_names + rejected
        ]
        submissions += [
            dict(
                model_id=m,
                kind=kind,
                rows=a.rows,
                foreign_ids_dropped=a.foreign_ids,
                ids_used=len(a.values),
                coverage=len(a.values) / len(ids),
            )
            for m, a in sorted(accepted.items())
        ]
        wide[kind] = _wide(accepted, ids, fill)
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
