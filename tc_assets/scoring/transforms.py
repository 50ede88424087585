"""Column-wise transforms shared by every score: tie-kept rank and gaussianization.

They follow `numerai_tools.scoring` exactly (`tie_kept_rank`, `gaussian`) but work on a whole
(stocks x models) matrix at once and accept NaN for ids a model did not submit: a NaN stays NaN
and is left out of that column's ranking, as numerai-tools does for a single model's series.
"""

from __future__ import annotations

import numpy as np
from scipy.special import ndtri


def tie_kept_rank(x: np.ndarray) -> np.ndarray:
    """Percentile rank of each column, ties averaged, centred: (rank - 0.5) / count.

    Equals ``numerai_tools.scoring.tie_kept_rank`` column by column; NaN entries stay NaN and
    do not count. One argsort for the whole matrix instead of one pandas rank per column.
    """
    a = np.asarray(x, dtype=np.float64)
    squeeze = a.ndim == 1
    # Work on rows (models x stocks), contiguous, which is several times faster to sort.
    a = np.ascontiguousarray(a[None, :] if squeeze else a.T)
    _, n = a.shape
    order = np.argsort(a, axis=1)  # NaN sort last; tie order is irrelevant to average ranks
    s = np.take_along_axis(a, order, axis=1)
    pos = np.arange(n, dtype=np.float64)[None, :]
    # A tie group starts where the sorted value changes; NaN != NaN puts each NaN alone.
    new = np.ones_like(s, dtype=bool)
    new[:, 1:] = s[:, 1:] != s[:, :-1]
    start = np.maximum.accumulate(np.where(new, pos, 0.0), axis=1)
    last = np.ones_like(s, dtype=bool)
    last[:, :-1] = new[:, 1:]
    end = np.minimum.accumulate(np.where(last, pos, float(n))[:, ::-1], axis=1)[:, ::-1]
    count = np.sum(~np.isnan(a), axis=1, keepdims=True).astype(np.float64)
    ranks_sorted = ((start + end) / 2.0 + 0.5) / count
    ranks_sorted[np.isnan(s)] = np.nan
    out = np.empty_like(ranks_sorted)
    np.put_along_axis(out, order, ranks_sorted, axis=1)
    return out[0] if squeeze else out.T


def gaussianize(ranks: np.ndarray) -> np.ndarray:
    """Normal quantile of percentile ranks in (0, 1): ``numerai_tools.scoring.gaussian``."""
    return ndtri(ranks)


def gaussian_rank(x: np.ndarray) -> np.ndarray:
    """Tie-kept rank then gaussianize each column (NaN stays NaN)."""
    return gaussianize(tie_kept_rank(x))
