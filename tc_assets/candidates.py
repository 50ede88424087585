"""Score candidate signals against scored rounds, exactly, without re-running anything.

A candidate entering a round with zero stake changes no bag's meta model or portfolio, so its
TC is `P_cand . g - c` with the round's `tc_vectors` and `tc_scale` (see
`scoring.contribution`): one matrix product for every candidate. Beside TC it gets the round's
CORR, MMC against the round's meta model, FNCv3 and max feature exposure, computed by the same
functions the platform scores submissions with. Candidate files obey the submission contract
(`io.contract.validate_predictions`); a file that breaks it is reported with the contract's rule
and reason.

Where candidates come from (`--predictions PATH`):
* a file (`.csv` or `.parquet`) with `id` and `prediction`: one candidate (named by the file),
  used for every round; with `id` and several other columns: one candidate per column;
* a folder of `<round>.csv|parquet`: one candidate (named by the folder), a file per round;
* a folder of such folders: one candidate per folder.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from tc_assets.defs.resources import RoundSourceResource
from tc_assets.io import contract as c
from tc_assets.io.source import LocalRoundSource, SourceError
from tc_assets.io.warehouse import Warehouse
from tc_assets.scoring.contribution import candidate_tc
from tc_assets.scoring.meta_model import prediction_matrix
from tc_assets.scoring.metrics import feature_exposures, target_metrics

METRICS = ("tc", "corr", "mmc", "fnc_v3", "max_feature_exposure")


class CandidateError(ValueError):
    """Bad candidate input or a round that cannot be scored against (the message says why)."""


@dataclass(frozen=True)
class CandidateScores:
    """What `score_candidate` found.

    Attributes:
        rounds: one row per (round, candidate) scored: the METRICS.
        summary: one row per candidate: mean, std and Sharpe (mean / std) of each metric over
            its rounds.
        rejections: one row per (round, candidate) whose file broke the contract: rule, reason.
    """

    rounds: pd.DataFrame
    summary: pd.DataFrame
    rejections: pd.DataFrame


def candidate_files(path: str | Path) -> dict[str, dict[int | None, Path]]:
    """Candidate name -> {round (None: every round) -> file} from a file or folder layout."""
    path = Path(path)
    if path.is_file():
        return {path.stem: {None: path}}
    if not path.is_dir():
        raise CandidateError(f"{path}: no such file or folder")
    per_round = _round_files(path)
    if per_round:
        return {path.name: per_round}
    found = {d.name: _round_files(d) for d in sorted(path.iterdir()) if d.is_dir()}
    found = {name: files for name, files in found.items() if files}
    if not found:
        raise CandidateError(
            f"{path}: no <round>.csv or <round>.parquet files, in it or in its sub-folders"
        )
    return found


def _round_files(folder: Path) -> dict[int | None, Path]:
    return {
        int(f.stem): f
        for f in sorted(folder.iterdir())
        if f.is_file() and f.stem.isdigit() and f.suffix.lower() in c.SUBMISSION_SUFFIXES
    }


def _read_columns(file: Path, name: str) -> dict[str, pd.DataFrame]:
    """The file's candidates as (id, prediction) frames: its `prediction` column, or one per
    column besides `id` (named `<name>:<column>` when the file holds several)."""
    try:
        df = LocalRoundSource(file.parent).read_table(file.name)
    except SourceError as exc:
        raise CandidateError(str(exc)) from exc
    others = [col for col in df.columns if col != "id"]
    if "prediction" in df.columns or "id" not in df.columns or len(others) <= 1:
        return {name: df}
    return {f"{name}:{col}": df[["id", col]].rename(columns={col: "prediction"}) for col in others}


@dataclass(frozen=True)
class _Round:
    """A scored round as the candidate scorer needs it, aligned on its sorted ids."""

    ids: pd.Index
    g: np.ndarray
    c: float
    target: pd.Series
    meta_model: pd.Series
    medium: pd.DataFrame


def _load_round(wh: Warehouse, r: int, source: str | None) -> _Round:
    scale = wh.read_round("tc_scale", r)
    if scale.empty or scale["c"].isna().all():
        raise CandidateError(f"round {r}: no TC in the warehouse (not resolved or not scored)")
    vectors = wh.read_round("tc_vectors", r).set_index("id").sort_index()
    ids = pd.Index(vectors.index, name="id")
    uri = source or str(wh.read_round("rounds", r)["source"].iloc[0])
    src = RoundSourceResource.for_uri(uri).open()
    feature_sets = c.validate_feature_sets(src.feature_sets())
    live = c.validate_live(src.read_table(src.round_path(r, c.LIVE_FILE)), feature_sets["all"])
    if not live.index.equals(ids):
        raise CandidateError(f"round {r}: the live ids of {uri} differ from the warehouse's")
    return _Round(
        ids=ids,
        g=vectors["g"].to_numpy(dtype=np.float64),
        c=float(scale["c"].iloc[0]),
        target=wh.read_round("resolved", r).set_index("id")["target"].reindex(ids),
        meta_model=wh.read_round("meta_model", r).set_index("id")["swmm"].reindex(ids),
        medium=live[feature_sets["medium"]],
    )


def _score_round(
    rnd: _Round, frames: dict[str, pd.DataFrame], r: int
) -> tuple[pd.DataFrame, list[dict]]:
    """Every accepted candidate's METRICS in one round, and the rejected ones."""
    accepted, rejected = {}, []
    for name, df in frames.items():
        result = c.validate_predictions(df, rnd.ids)
        if isinstance(result, c.Rejection):
            rejected.append(
                {"round": r, "candidate": name, "rule": result.rule, "reason": result.reason}
            )
        else:
            accepted[name] = result.values.reindex(rnd.ids)
    if not accepted:
        return pd.DataFrame(columns=["round", "candidate", *METRICS]), rejected
    preds = pd.DataFrame(accepted, index=rnd.ids)
    metrics = target_metrics(preds, rnd.medium, rnd.target, rnd.meta_model)
    exposure = feature_exposures(preds, rnd.medium).abs().max(axis=1)
    tc = candidate_tc(prediction_matrix(preds.to_numpy(dtype=np.float64)), rnd.g, rnd.c)
    out = pd.DataFrame(
        {
            "round": r,
            "candidate": preds.columns,
            "tc": np.atleast_1d(tc),
            "corr": metrics["corr"].to_numpy(),
            "mmc": metrics["mmc"].to_numpy(),
            "fnc_v3": metrics["fnc_v3"].to_numpy(),
            "max_feature_exposure": exposure.to_numpy(),
        }
    )
    return out, rejected


def summarize(rounds: pd.DataFrame) -> pd.DataFrame:
    """Mean, std and Sharpe (mean / std, NaN with fewer than 2 rounds) of each metric."""
    rows = {}
    for name, group in rounds.groupby("candidate", sort=True):
        row: dict[str, float] = {"rounds": float(len(group))}
        for m in METRICS:
            mean, std = float(group[m].mean()), float(group[m].std(ddof=1))
            sharpe = mean / std if len(group) > 1 and std > 0 else math.nan
            row |= {f"{m}_mean": mean, f"{m}_std": std, f"{m}_sharpe": sharpe}
        rows[name] = row
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("candidate")


def score_candidate(
    warehouse: str | Path,
    rounds: Sequence[int],
    predictions: str | Path,
    source: str | None = None,
) -> CandidateScores:
    """Exact TC, CORR, MMC, FNCv3 and max feature exposure of candidate signals over scored
    rounds of a warehouse (see the module docstring for the layouts of `predictions`).

    source: the round source to read features from (default: the one each round was
    ingested from, as the warehouse's `rounds` table records it).
    """
    files = candidate_files(predictions)
    wh = Warehouse(str(warehouse))
    scored, rejected = [], []
    for r in rounds:
        frames = {}
        for name, by_round in files.items():
            file = by_round.get(r, by_round.get(None))
            if file is not None:
                frames |= _read_columns(file, name)
        if not frames:
            continue
        table, bad = _score_round(_load_round(wh, r, source), frames, r)
        scored.append(table)
        rejected += bad
    table = (
        pd.concat(scored, ignore_index=True)
        if scored
        else pd.DataFrame(columns=["round", "candidate", *METRICS])
    )
    return CandidateScores(
        rounds=table,
        summary=summarize(table) if len(table) else pd.DataFrame(),
        rejections=pd.DataFrame(rejected, columns=["round", "candidate", "rule", "reason"]),
    )
