"""The stake-weighted meta model (SWMM), defined once for the metrics and the TC work.

P is the (stocks x models) matrix of gaussianized tie-kept ranks of every model with a valid
submission, staked or not; an id a model did not submit scores 0 (the middle of the normal,
i.e. "no view"). The meta model is the stake-weighted average of P's columns:

    x(s) = P s / sum(s)

so it is unchanged when every stake is multiplied by the same constant, and a model with stake
0 contributes nothing to it (but still has a gradient with respect to its stake, see TC).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from tc_assets.scoring.transforms import gaussian_rank


def prediction_matrix(predictions: np.ndarray) -> np.ndarray:
    """Gaussianized tie-kept rank of each column over the ids it covers; missing ids get 0."""
    return gaussian_rank(predictions, fill=0.0)


def stake_weighted_meta_model(p: np.ndarray, stakes: np.ndarray) -> np.ndarray:
    """x = P s / sum(s) over the columns of P; raises if no stake is positive."""
    s = np.asarray(stakes, dtype=np.float64)
    if s.ndim != 1 or s.shape[0] != p.shape[1]:
        raise ValueError(f"stakes has shape {s.shape}, expected ({p.shape[1]},)")
    if not np.all(np.isfinite(s)) or np.any(s < 0):
        raise ValueError("stakes must be finite and >= 0")
    total = s.sum()
    if total <= 0:
        raise ValueError("the meta model needs at least one model with a positive stake")
    return p @ (s / total)


def swmm(predictions: pd.DataFrame, stakes: pd.Series) -> pd.Series:
    """The round's stake-weighted meta model over the ids of ``predictions`` (name "swmm").

    ``predictions``: ids x models, the valid submissions (NaN = id not submitted). ``stakes``:
    stake per model_id. Only models present in both with stake > 0 count; a submission without
    a stake row, or a stake row without a submission, weighs 0. Only those columns are ranked.
    """
    if not isinstance(predictions, pd.DataFrame) or not isinstance(stakes, pd.Series):
        raise TypeError("predictions must be a DataFrame and stakes a Series")
    if not stakes.index.is_unique or not predictions.columns.is_unique:
        raise ValueError("model ids must be unique in predictions and in stakes")
    s = stakes.to_numpy(dtype=np.float64)
    if not np.all(np.isfinite(s)) or np.any(s < 0):
        raise ValueError("stakes must be finite and >= 0")
    staked = stakes[(stakes > 0) & stakes.index.isin(predictions.columns)]
    if staked.empty:
        raise ValueError("the meta model needs a submitted model with a positive stake")
    p = prediction_matrix(predictions[staked.index].to_numpy(dtype=np.float64))
    x = stake_weighted_meta_model(p, staked.to_numpy(dtype=np.float64))
    return pd.Series(x, index=predictions.index, name="swmm")
