"""Per-model proxy metrics of one round, vectorized over models (the `model_metrics` table).

Each value equals what ``numerai_tools.scoring`` returns for that model's own series, i.e. the
non-NaN ids of its column (``D``), intersected with the ids that have a target (``D_t``) for
target metrics:

* ``corr``          ``numerai_corr(pred[D_t], target)``
* ``mmc``           ``correlation_contribution(pred[D_t], meta_model, target)``
* ``fnc_v3``        ``feature_neutral_corr(pred[D_t], features.loc[D_t], target)``
* ``fnc_v3_tb200``  the same with ``top_bottom=200`` (stable-argsort top/bottom selection)
* ``exposure``      per feature: Pearson(pred[D], feature[D]), as ``max_feature_correlation``
* ``max_feature_exposure``    max |exposure|
* ``exposure_dissimilarity``  ``1 - U.E / E.E``, U and E the exposure vectors of the model
  and of the example predictions (a feature with an undefined exposure counts as 0).

``target`` is passed whole, so numerai's centring uses the mean over every id with a target.
Feature-only metrics need no target (round close); target metrics are a separate call.

How: ranks are integer keys (see ``transforms``), so each rank/gaussianize/power step is a
table lookup; one SVD of ``[features, 1]`` per round neutralizes every model (``neutralize``);
models run in blocks of ``block_models`` columns so memory stays bounded. fnc skips numerai's
variance normalization, which a rank ignores.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from tc_assets.scoring.neutralize import BLAS_THREADS_HELP, Neutralizer, limit_blas_threads
from tc_assets.scoring.transforms import keys_to_values, rank_keys

TARGET_METRICS = ("corr", "mmc", "fnc_v3", "fnc_v3_tb200")
MODEL_METRICS = (*TARGET_METRICS, "exposure_dissimilarity", "max_feature_exposure")
"""Metric columns of the warehouse's ``model_metrics`` table, in contract order."""

# A feature counts as constant over a model's ids when its variance there is below this share
# of n * max(feature^2): far below any real variance, far above rounding of a constant.
_CONSTANT_FEATURE_RTOL = 1e-12


class MetricsSettings(BaseModel):
    """Parameters of the per-model metrics."""

    model_config = ConfigDict(frozen=True)

    top_bottom: int = Field(
        200,
        ge=1,
        description="Top and bottom ids kept by fnc_v3_tb200 (numerai's top_bottom); a model "
        "with fewer than 2 * top_bottom scored ids gets NaN.",
    )
    block_models: int = Field(
        256,
        ge=1,
        description="Models processed per block: working memory is about 100 bytes x ids x "
        "block_models, independent of the number of models.",
    )
    blas_threads: int | None = Field(1, ge=1, description=BLAS_THREADS_HELP)


# --- input checks -------------------------------------------------------------------------


def _prediction_matrix(predictions: pd.DataFrame) -> np.ndarray:
    """(models x ids) float64 rows of a checked predictions frame (NaN = not submitted)."""
    if not isinstance(predictions, pd.DataFrame):
        raise TypeError(f"predictions must be a DataFrame, got {type(predictions).__name__}")
    if predictions.shape[0] < 2 or predictions.shape[1] == 0:
        raise ValueError(
            f"predictions must have >= 2 ids and >= 1 model, got shape {predictions.shape}"
        )
    if not predictions.index.is_unique or not predictions.index.is_monotonic_increasing:
        raise ValueError("predictions index (ids) must be unique and sorted")
    if not predictions.columns.is_unique:
        raise ValueError("predictions columns (model ids) must be unique")
    try:
        x = predictions.to_numpy(dtype=np.float64).T
    except (TypeError, ValueError) as e:
        raise ValueError(f"predictions must be numeric: {e}") from None
    if np.isinf(x).any():
        raise ValueError("predictions contain infinite values")
    empty = np.count_nonzero(~np.isnan(x), axis=1) < 2
    if empty.any():
        raise ValueError(
            f"models with fewer than 2 predictions: {list(predictions.columns[empty][:5])}"
        )
    return x


def _feature_matrix(features: pd.DataFrame, index: pd.Index) -> np.ndarray:
    if not isinstance(features, pd.DataFrame):
        raise TypeError(f"features must be a DataFrame, got {type(features).__name__}")
    if features.shape[1] == 0:
        raise ValueError("features has no columns")
    if not features.index.equals(index):
        raise ValueError("features index must equal the predictions index (same ids, same order)")
    f = features.to_numpy(dtype=np.float64)
    if not np.all(np.isfinite(f)):
        raise ValueError("features contain NaN or infinite values")
    return f


def _aligned(s: pd.Series, index: pd.Index, name: str) -> np.ndarray:
    """Values of ``s`` on ``index`` (NaN where absent); ids outside ``index`` are an error."""
    if not isinstance(s, pd.Series):
        raise TypeError(f"{name} must be a Series, got {type(s).__name__}")
    if not s.index.is_unique:
        raise ValueError(f"{name} has duplicate ids")
    foreign = s.index.difference(index)
    if len(foreign):
        raise ValueError(
            f"{name} has {len(foreign)} ids not in the predictions index, e.g. {list(foreign[:3])}"
        )
    v = s.reindex(index).to_numpy(dtype=np.float64)
    if np.isinf(v).any():
        raise ValueError(f"{name} contains infinite values")
    return v


# --- vectorized pieces ------------------------------------------------------------------------


def _pearson_rows(x: np.ndarray, y: np.ndarray, covered: np.ndarray | None = None) -> np.ndarray:
    """Pearson correlation of each row of ``x`` with ``y`` over that row's ``covered`` ids
    (None: all); ``x`` must be 0 outside them. NaN where either side is constant."""
    y = y - y.mean()  # the per-row means below are then small: no cancellation
    if covered is None:
        xc = x - x.mean(axis=1, keepdims=True)
        num, syy = xc @ y, np.full(x.shape[0], y @ y)
    else:
        m = covered.astype(np.float64)
        n = m.sum(axis=1)
        xc = np.where(covered, x - (x.sum(axis=1) / n)[:, None], 0.0)
        y_mean = (m @ y) / n
        num = xc @ y - y_mean * xc.sum(axis=1)
        syy = m @ (y * y) - n * y_mean**2
    den = np.sqrt(np.einsum("ij,ij->i", xc, xc) * syy)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = num / den
    r[~(den > 0)] = np.nan
    return np.clip(r, -1.0, 1.0)


def _pearson_pairs(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson correlation of ``x[i]`` with ``y[i]`` for each row i."""
    xc = x - x.mean(axis=1, keepdims=True)
    yc = y - y.mean(axis=1, keepdims=True)
    den = np.sqrt(np.einsum("ij,ij->i", xc, xc) * np.einsum("ij,ij->i", yc, yc))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.einsum("ij,ij->i", xc, yc) / den
    r[~(den > 0)] = np.nan
    return np.clip(r, -1.0, 1.0)


def top_bottom_positions(
    keys: np.ndarray, order: np.ndarray, k: int, counts: np.ndarray | None = None
) -> np.ndarray:
    """Positions numerai's ``filter_sort_top_bottom`` keeps in each row: (rows x 2k).

    ``keys``, ``counts``, ``order``: ``rank_keys`` output (NaN entries: key 0, sorted last).
    numerai takes the first and last k of ``np.argsort(values, kind="stable")``. That is
    ``order``'s first and last k non-NaN positions, except where a tie group straddles a cut:
    there the stable sort keeps the group's lowest positions at the bottom cut and its highest
    at the top cut.
    """
    c = np.full(keys.shape[0], keys.shape[1]) if counts is None else np.asarray(counts)
    if c.size and c.min() < 2 * k:
        raise ValueError(f"top_bottom={k} needs >= {2 * k} values per row, got {c.min()}")
    top = np.take_along_axis(order, (c - k)[:, None] + np.arange(k), axis=1)
    sel = np.concatenate([order[:, :k], top], axis=1)
    at = np.stack([np.full_like(c, k - 1), np.full_like(c, k), c - k - 1, c - k], axis=1)
    cut = np.take_along_axis(keys, np.take_along_axis(order, at, axis=1), axis=1)
    for r in np.flatnonzero((cut[:, 0] == cut[:, 1]) | (cut[:, 2] == cut[:, 3])):
        kr = keys[r]
        below = np.flatnonzero((kr > 0) & (kr < cut[r, 0]))
        tied = np.flatnonzero(kr == cut[r, 0])
        above, tied_top = np.flatnonzero(kr > cut[r, 3]), np.flatnonzero(kr == cut[r, 3])
        bottom = np.concatenate([below, tied[: k - below.size]])
        top_r = np.concatenate([above, tied_top[tied_top.size - (k - above.size) :]])
        sel[r] = np.concatenate([bottom, top_r])
    return sel


# --- target metrics ---------------------------------------------------------------------------


def target_metrics(
    predictions: pd.DataFrame,
    features: pd.DataFrame,
    target: pd.Series,
    meta_model: pd.Series,
    settings: MetricsSettings | None = None,
) -> pd.DataFrame:
    """corr, mmc, fnc_v3 and fnc_v3_tb200 of every model (index: model_id).

    ``predictions`` (ids x models, NaN = not submitted, index sorted), ``features`` (same index,
    the medium set), ``target`` (ids with a target; NaN or absent = none), ``meta_model`` (the
    SWMM; must cover every id with a target). Models with fewer than 2 ids in the target get
    NaN; fnc_v3_tb200 is NaN for models with fewer than 2 * top_bottom.
    """
    cfg = settings or MetricsSettings()
    x = _prediction_matrix(predictions)
    f = _feature_matrix(features, predictions.index)
    t = _aligned(target, predictions.index, "target")
    mm = _aligned(meta_model, predictions.index, "meta_model")
    t_ids = np.flatnonzero(~np.isnan(t))
    if t_ids.size < 2:
        raise ValueError("target has fewer than 2 ids with a value")
    if np.isnan(mm[t_ids]).any():
        raise ValueError("meta_model must have a value for every id with a target")
    with limit_blas_threads(cfg.blas_threads):
        out = _TargetScorer(f[t_ids], t[t_ids], mm[t_ids], cfg).score(x, t_ids)
    return pd.DataFrame(
        out, index=pd.Index(predictions.columns, name="model_id"), columns=list(TARGET_METRICS)
    )


class _TargetScorer:
    """Round-level pieces of the target metrics (over the ids with a target), then blocks."""

    def __init__(self, f: np.ndarray, tt: np.ndarray, mm: np.ndarray, cfg: MetricsSettings):
        self.cfg, self.tt, self.mm = cfg, tt, mm
        tc = tt - tt.mean()  # numerai_corr centres the whole target, then raises it to 1.5
        self.t_pow = np.sign(tc) * np.abs(tc) ** 1.5
        # correlation_contribution multiplies targets in [0, 1] by 4 (checked per model).
        self.outside01 = (tt < 0) | (tt > 1)
        self.neutralizer = Neutralizer(f)
        self.tables: dict[tuple[int, str], np.ndarray] = {}
        self.gm = self._values(*rank_keys(mm[None, :])[:2], "gaussian")[0]

    def _values(self, keys: np.ndarray, counts: np.ndarray, fn: str) -> np.ndarray:
        return keys_to_values(keys, counts, fn, fill=0.0, cache=self.tables)

    def score(self, x: np.ndarray, t_ids: np.ndarray) -> np.ndarray:
        """(models x 4) metrics of the rows of ``x`` (models x all ids)."""
        covered = ~np.isnan(x)
        if t_ids.size < x.shape[1]:
            covered = covered[:, t_ids]
        counts = covered.sum(axis=1)
        full = counts == t_ids.size
        # Full-coverage models first: their blocks skip every per-row mask.
        order = np.concatenate([np.flatnonzero(full), np.flatnonzero(~full & (counts >= 2))])
        out = np.full((x.shape[0], len(TARGET_METRICS)), np.nan)
        b = self.cfg.block_models
        for c0 in range(0, order.size, b):
            c = order[c0 : c0 + b]
            xb = x[c] if t_ids.size == x.shape[1] else x[np.ix_(c, t_ids)]
            out[c] = self._block(xb)
        return out

    def _block(self, xb: np.ndarray) -> np.ndarray:
        """Metrics of a block of models (rows of ``xb`` over the target ids, NaN = absent)."""
        k = self.cfg.top_bottom
        res = np.full((xb.shape[0], len(TARGET_METRICS)), np.nan)
        keys, n, _ = rank_keys(xb)
        covered = None if n.min() == xb.shape[1] else keys > 0
        g = self._values(keys, n, "gaussian")  # 0 where not covered
        res[:, 0] = _pearson_rows(self._values(keys, n, "gaussian_pow15"), self.t_pow, covered)
        res[:, 1] = self._mmc(g, n, covered)
        # fnc_v3: neutralize the gaussianized ranks, then numerai_corr of the residuals.
        neutral = self.neutralizer.residual_rows(np.where(keys > 0, g, np.nan))
        del g
        keys, n2, order = rank_keys(neutral, return_order=True)
        del neutral
        pw = self._values(keys, n2, "gaussian_pow15")
        res[:, 2] = _pearson_rows(pw, self.t_pow, None if covered is None else keys > 0)
        ok = n2 >= 2 * k  # n2 = 0 for constant predictions (NaN residuals)
        if ok.any():
            sel = top_bottom_positions(keys[ok], order[ok], k, n2[ok])
            tb = _pearson_pairs(np.take_along_axis(pw[ok], sel, axis=1), self.t_pow[sel])
            res[ok, 3] = tb
        res[n2 == 0, 2:] = np.nan
        return res

    def _mmc(self, g: np.ndarray, n: np.ndarray, covered: np.ndarray | None) -> np.ndarray:
        """correlation_contribution: t4c . (g - m (g.m)/(m.m)) / n with the meta model m
        re-ranked and the target centred over each model's ids."""
        tt = self.tt
        if covered is None:
            m, t_mean = self.gm, np.full(g.shape[0], tt.mean())
            gm, mm_ = g @ m, np.full(g.shape[0], m @ m)
            mt = np.full(g.shape[0], m @ tt - t_mean[0] * m.sum())
            factor = np.full(g.shape[0], 1.0 if self.outside01.any() else 4.0)
        else:
            mkeys, mn, _ = rank_keys(np.where(covered, self.mm, np.nan))
            m = self._values(mkeys, mn, "gaussian")
            cov = covered.astype(np.float64)
            t_mean = (cov @ tt) / n
            gm, mm_ = np.einsum("ij,ij->i", g, m), np.einsum("ij,ij->i", m, m)
            mt = m @ tt - t_mean * m.sum(axis=1)
            factor = np.where(cov @ self.outside01 > 0, 1.0, 4.0)
        gt = g @ tt - t_mean * g.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return factor * (gt - gm * mt / mm_) / n


# --- feature metrics --------------------------------------------------------------------------


def _exposures(x: np.ndarray, f: np.ndarray, block: int) -> np.ndarray:
    """(models x features) Pearson of each row of ``x`` (NaN = absent) with each feature column,
    over that row's ids. One matmul per block; models with partial coverage get the feature
    moments over their ids from two more matmuls against their coverage mask."""
    n = f.shape[0]
    fc = f - f.mean(axis=0)
    fc2 = fc * fc
    f_scale = _CONSTANT_FEATURE_RTOL * np.max(f * f, axis=0)
    var_full = fc2.sum(axis=0)
    out = np.empty((x.shape[0], f.shape[1]))
    for c0 in range(0, x.shape[0], block):
        xb = x[c0 : c0 + block]
        covered = ~np.isnan(xb)
        cnt = covered.sum(axis=1)
        xc = np.where(covered, xb - np.nanmean(xb, axis=1, keepdims=True), 0.0)
        num = xc @ fc
        var_f = np.broadcast_to(var_full, num.shape).copy()
        part = np.flatnonzero(cnt < n)
        if part.size:
            m = covered[part].astype(np.float64)
            sf, sff = m @ fc, m @ fc2
            cp = cnt[part, None]
            var_f[part] = sff - sf * sf / cp
            num[part] -= xc[part].sum(axis=1, keepdims=True) * sf / cp
        flat = np.nanmax(xb, axis=1) == np.nanmin(xb, axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            e = num / np.sqrt(np.einsum("ij,ij->i", xc, xc)[:, None] * var_f)
        e[var_f <= f_scale * cnt[:, None]] = np.nan  # feature constant over the model's ids
        e[flat] = np.nan
        out[c0 : c0 + block] = np.clip(e, -1.0, 1.0)
    return out


def feature_exposures(
    predictions: pd.DataFrame, features: pd.DataFrame, settings: MetricsSettings | None = None
) -> pd.DataFrame:
    """Pearson correlation of each model's raw predictions with each feature, over the ids the
    model submitted (models x features; NaN where the feature is constant on those ids)."""
    cfg = settings or MetricsSettings()
    x = _prediction_matrix(predictions)
    f = _feature_matrix(features, predictions.index)
    with limit_blas_threads(cfg.blas_threads):
        e = _exposures(x, f, cfg.block_models)
    return _exposure_frame(e, predictions, features)


def _exposure_frame(
    e: np.ndarray, predictions: pd.DataFrame, features: pd.DataFrame
) -> pd.DataFrame:
    return pd.DataFrame(
        e,
        index=pd.Index(predictions.columns, name="model_id"),
        columns=pd.Index(features.columns, name="feature"),
    )


def feature_metrics(
    predictions: pd.DataFrame,
    features: pd.DataFrame,
    example: pd.Series,
    settings: MetricsSettings | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Target-free metrics: ``(per_model, exposures)``.

    ``per_model`` (index model_id): max_feature_exposure, exposure_dissimilarity (against the
    example predictions, which may lack ids), max_exposure_feature (the feature behind
    max_feature_exposure); all NaN/None for a model without any defined exposure.
    ``exposures``: models x features.
    """
    cfg = settings or MetricsSettings()
    x = _prediction_matrix(predictions)
    f = _feature_matrix(features, predictions.index)
    ex = _aligned(example, predictions.index, "example")
    if np.count_nonzero(~np.isnan(ex)) < 2:
        raise ValueError("example has fewer than 2 predictions")
    with limit_blas_threads(cfg.blas_threads):
        u = _exposures(x, f, cfg.block_models)
        e = np.nan_to_num(_exposures(ex[None, :], f, 1)[0])  # undefined exposure counts as 0
    ee = e @ e
    absu = np.abs(u)
    has = ~np.all(np.isnan(absu), axis=1)  # False: no exposure is defined (constant predictions)
    with np.errstate(invalid="ignore", divide="ignore"):
        dissimilarity = 1.0 - np.nan_to_num(u) @ e / ee if ee > 0 else np.full(u.shape[0], np.nan)
    dissimilarity[~has] = np.nan
    max_exposure = np.full(u.shape[0], np.nan)
    max_exposure[has] = np.nanmax(absu[has], axis=1)
    most_exposed = np.full(u.shape[0], None, dtype=object)
    most_exposed[has] = features.columns.to_numpy()[np.nanargmax(absu[has], axis=1)]
    per_model = pd.DataFrame(
        {
            "max_feature_exposure": max_exposure,
            "exposure_dissimilarity": dissimilarity,
            "max_exposure_feature": most_exposed,
        },
        index=pd.Index(predictions.columns, name="model_id"),
    )
    return per_model, _exposure_frame(u, predictions, features)


def exposures_long(exposures: pd.DataFrame) -> pd.DataFrame:
    """models x features -> long table ``(model_id, feature, exposure)``, NaN rows kept."""
    m, k = exposures.shape
    return pd.DataFrame(
        {
            "model_id": np.repeat(exposures.index.to_numpy(), k),
            "feature": np.tile(exposures.columns.to_numpy(), m),
            "exposure": exposures.to_numpy(dtype=np.float64).ravel(),
        }
    )
