"""Column-wise transforms shared by every score: tie-kept rank and gaussianization.

They follow `numerai_tools.scoring` exactly (`tie_kept_rank`, `gaussian`) but work on a whole
(stocks x models) matrix at once and accept NaN for ids a model did not submit: a NaN stays NaN
and is left out of that column's ranking, as numerai-tools does for a single model's series.

Ranks are computed as integer *keys*: for an entry whose tie group occupies the 0-based sorted
positions ``start..end`` of its column, ``key = start + end + 1``, so the centred percentile rank
``(average_rank - 0.5) / count`` is exactly ``key / (2 * count)`` (the same correctly rounded
double pandas produces). NaN entries get key 0. Keys make gaussianization a table lookup
(``ndtri`` is evaluated once per possible key, not once per entry) and carry the tie structure
that top/bottom selections need.
"""

from __future__ import annotations

import numpy as np
from scipy.special import ndtri

# Rows (models) ranked per block: a block's sort buffers stay in cache.
_RANK_BLOCK_ROWS = 64


def rank_keys(
    rows: np.ndarray, *, return_order: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Tie-kept rank keys of each ROW of ``rows`` (models x ids), NaN = not ranked.

    Returns ``(keys, counts, order)``: ``keys`` int32 of the same shape (``key / (2 * count)``
    is the centred rank, 0 marks NaN), ``counts`` int64 per row (non-NaN entries), and, when
    ``return_order``, the int64 ``argsort`` of each row (NaN last; ties in arbitrary order).
    One SIMD argsort per row, then a linear pass for tie groups only in rows that have ties.
    """
    a = np.asarray(rows, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"rank_keys expects a 2-d array, got shape {a.shape}")
    m, n = a.shape
    if n >= 2**30:
        raise ValueError("rank_keys supports fewer than 2**30 entries per row")
    keys = np.empty((m, n), dtype=np.int32)
    counts = np.empty(m, dtype=np.int64)
    orders = np.empty((m, n), dtype=np.int64) if return_order else None
    pos = np.arange(n, dtype=np.int32)
    odd = 2 * pos + 1  # key of an untied entry at sorted position p: p + p + 1
    for i0 in range(0, m, _RANK_BLOCK_ROWS):
        block = np.ascontiguousarray(a[i0 : i0 + _RANK_BLOCK_ROWS])
        order = np.argsort(block, axis=1)
        flat = order + (np.arange(block.shape[0]) * n)[:, None]  # flat gathers beat *_along_axis
        srt = block.ravel().take(flat)
        nan_count = np.count_nonzero(np.isnan(srt), axis=1)  # NaN sort last
        # new[:, p]: sorted position p starts a tie group (NaN != NaN: each NaN is alone).
        new = np.ones(srt.shape, dtype=bool)
        np.not_equal(srt[:, 1:], srt[:, :-1], out=new[:, 1:])
        ksorted = np.empty(srt.shape, dtype=np.int32)
        for r in range(block.shape[0]):
            nr = new[r]
            if nr.all():
                ksorted[r] = odd
            else:
                start = np.maximum.accumulate(np.where(nr, pos, 0))
                # A tie group ends where the next one starts, or at the last position.
                group_end = np.where(np.append(nr[1:], True), pos, n)
                end = np.minimum.accumulate(group_end[::-1])[::-1]
                np.add(start, end, out=ksorted[r])
                ksorted[r] += 1
            if nan_count[r]:
                ksorted[r, n - nan_count[r] :] = 0
        keys[i0 : i0 + _RANK_BLOCK_ROWS].ravel()[flat] = ksorted
        counts[i0 : i0 + _RANK_BLOCK_ROWS] = n - nan_count
        if orders is not None:
            orders[i0 : i0 + _RANK_BLOCK_ROWS] = order
    return keys, counts, orders


_KEY_FUNCTIONS = ("rank", "gaussian", "gaussian_pow15")


def _from_ranks(r: np.ndarray, fn: str) -> np.ndarray:
    """The centred rank ``r`` through ``fn`` (the same operations for tables and direct use)."""
    if fn == "rank":
        return r
    g = ndtri(r)
    if fn == "gaussian":
        return g
    if fn == "gaussian_pow15":
        return np.sign(g) * np.abs(g) ** 1.5
    raise ValueError(f"unknown key function {fn!r}, expected one of {_KEY_FUNCTIONS}")


def key_table(count: int, fn: str = "rank") -> np.ndarray:
    """Value of every possible key (index 0..2*count-1) for rows with ``count`` entries.

    ``fn``: "rank" gives ``key / (2 count)``; "gaussian" its normal quantile (numerai's
    ``gaussian(tie_kept_rank(.))``); "gaussian_pow15" the signed 1.5 power of that
    (numerai's ``tie_kept_rank__gaussianize__pow_1_5``). Index 0 (NaN key) maps to NaN.
    """
    if count < 1:
        raise ValueError("count must be >= 1")
    table = _from_ranks(np.arange(2 * count, dtype=np.float64) / (2 * count), fn)
    table[0] = np.nan
    return table


def keys_to_values(
    keys: np.ndarray,
    counts: np.ndarray,
    fn: str = "rank",
    fill: float = np.nan,
    cache: dict[tuple[int, str], np.ndarray] | None = None,
) -> np.ndarray:
    """Map ``rank_keys`` output to values: ``fn`` of ``key / (2 count)``, ``fill`` for key 0.

    Rows sharing a count use one lookup table (``key_table``; ``cache`` keeps tables across
    calls); a row with a count of its own is evaluated directly, which is cheaper than its
    table. Both give bitwise the same values.
    """

    def table(count: int) -> np.ndarray:
        key = (max(count, 1), fn)
        t = cache.get(key) if cache is not None else None
        if t is None:
            t = key_table(*key)
            if cache is not None:
                cache[key] = t
        if not (np.isnan(fill) and np.isnan(t[0])):
            t = t.copy()
            t[0] = fill
        return t

    counts = np.asarray(counts)
    uniq, inverse, size = np.unique(counts, return_inverse=True, return_counts=True)
    if len(uniq) == 1:
        return table(int(uniq[0]))[keys]  # fancy indexing: the fastest gather
    out = np.empty(keys.shape, dtype=np.float64)
    shared = np.flatnonzero(size[inverse] > 1)
    if shared.size:  # one gather from the stacked tables, each row offset to its own table
        used = np.flatnonzero(size > 1)
        tables = [table(int(uniq[u])) for u in used]
        starts = np.zeros(uniq.size, dtype=np.int64)
        starts[used] = np.cumsum([0] + [t.size for t in tables[:-1]])
        out[shared] = np.concatenate(tables)[keys[shared] + starts[inverse[shared]][:, None]]
    single = np.flatnonzero(size[inverse] == 1)
    if single.size:
        k = keys[single]
        with np.errstate(invalid="ignore", divide="ignore"):
            v = _from_ranks(k / (2 * counts[single])[:, None], fn)
        v[k == 0] = fill
        out[single] = v
    return out


def _column_transform(x: np.ndarray, fn: str, fill: float = np.nan) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    squeeze = a.ndim == 1
    # Work on rows (models x ids): a DataFrame's values are column-major, so .T is free.
    rows = a[None, :] if squeeze else a.T
    out = np.empty(rows.shape, dtype=np.float64)
    step = 8 * _RANK_BLOCK_ROWS  # bounds the int32 key buffer; reused blocks avoid page faults
    for i0 in range(0, rows.shape[0], step):
        keys, counts, _ = rank_keys(rows[i0 : i0 + step])
        out[i0 : i0 + step] = keys_to_values(keys, counts, fn, fill)
    return out[0] if squeeze else out.T


def tie_kept_rank(x: np.ndarray) -> np.ndarray:
    """Percentile rank of each column, ties averaged, centred: (rank - 0.5) / count.

    Equals ``numerai_tools.scoring.tie_kept_rank`` column by column; NaN entries stay NaN and
    do not count.
    """
    return _column_transform(x, "rank")


def gaussianize(ranks: np.ndarray) -> np.ndarray:
    """Normal quantile of percentile ranks in (0, 1): ``numerai_tools.scoring.gaussian``."""
    return ndtri(ranks)


def gaussian_rank(x: np.ndarray, fill: float = np.nan) -> np.ndarray:
    """Tie-kept rank then gaussianize each column; NaN entries become ``fill`` (NaN by
    default). Bitwise equal to ``gaussianize(tie_kept_rank(x))`` but via a per-count lookup
    table."""
    return _column_transform(x, "gaussian", fill)
