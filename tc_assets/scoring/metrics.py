"""Per-model proxy metrics of one round, vectorized over models (DATA_CONTRACT.md §2).

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

from tc_assets.scoring.neutralize import FeatureSpan, design_matrix, group_columns_by_mask
from tc_assets.scoring.transforms import key_table, rank_keys

TARGET_METRICS = ("corr", "mmc", "fnc_v3", "fnc_v3_tb200")
FEATURE_METRICS = ("max_feature_exposure", "exposure_dissimilarity")
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
        description="Models processed per block: working memory is about 80 bytes x ids x "
        "block_models, independent of the number of models.",
    )


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


def _pearson_rows(x: np.ndarray, yc: np.ndarray) -> np.ndarray:
    """Pearson correlation of each row of ``x`` with the centred vector ``yc`` (NaN if constant)."""
    xc = x - x.mean(axis=1, keepdims=True)
    den = np.sqrt(np.einsum("ij,ij->i", xc, xc) * (yc @ yc))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (xc @ yc) / den
    r[den == 0] = np.nan
    return np.clip(r, -1.0, 1.0)


def _pearson_pairs(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson correlation of ``x[i]`` with ``y[i]`` for each row i."""
    xc = x - x.mean(axis=1, keepdims=True)
    yc = y - y.mean(axis=1, keepdims=True)
    den = np.sqrt(np.einsum("ij,ij->i", xc, xc) * np.einsum("ij,ij->i", yc, yc))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.einsum("ij,ij->i", xc, yc) / den
    r[den == 0] = np.nan
    return np.clip(r, -1.0, 1.0)


def top_bottom_positions(keys: np.ndarray, order: np.ndarray, k: int) -> np.ndarray:
    """Positions numerai's ``filter_sort_top_bottom`` keeps in each row: (rows x 2k).

    numerai takes the first and last k of ``np.argsort(values, kind="stable")``. Given any
    argsort ``order`` and the tie-group ``keys`` of ``rank_keys``, that is ``order``'s first and
    last k, except where a tie group straddles a cut: there the stable sort keeps the group's
    lowest positions at the bottom cut and its highest at the top cut.
    """
    n = keys.shape[1]
    if n < 2 * k:
        raise ValueError(f"top_bottom={k} needs >= {2 * k} values per row, got {n}")
    sel = np.concatenate([order[:, :k], order[:, n - k :]], axis=1)
    cut = np.take_along_axis(keys, order[:, [k - 1, k, n - k - 1, n - k]], axis=1)
    for r in np.flatnonzero((cut[:, 0] == cut[:, 1]) | (cut[:, 2] == cut[:, 3])):
        kr = keys[r]
        below, tied = np.flatnonzero(kr < cut[r, 0]), np.flatnonzero(kr == cut[r, 0])
        above, tied_top = np.flatnonzero(kr > cut[r, 3]), np.flatnonzero(kr == cut[r, 3])
        bottom = np.concatenate([below, tied[: k - below.size]])
        top = np.concatenate([above, tied_top[tied_top.size - (k - above.size) :]])
        sel[r] = np.concatenate([bottom, top])
    return sel


def _gaussian_rank_vector(v: np.ndarray) -> np.ndarray:
    keys, counts, _ = rank_keys(v[None, :])
    return key_table(int(counts[0]), "gaussian")[keys[0]]


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
    SWMM; must cover every id with a target). Models with no id in the target get NaN.
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

    tt = t[t_ids]
    tc = tt - tt.mean()  # numerai_corr centres the whole target, then raises it to 1.5
    t_pow = np.sign(tc) * np.abs(tc) ** 1.5
    span_t = FeatureSpan.fit(design_matrix(f[t_ids]))
    covered = ~np.isnan(x)  # (models x ids)
    if t_ids.size < covered.shape[1]:
        covered = covered[:, t_ids]
    out = np.full((x.shape[0], len(TARGET_METRICS)), np.nan)
    for rows, cols in group_columns_by_mask(covered.T):
        if rows.size >= 2:
            out[cols] = _target_group(x, t_ids[rows], rows, cols, tt, t_pow, mm, span_t, cfg)
    return pd.DataFrame(
        out, index=pd.Index(predictions.columns, name="model_id"), columns=list(TARGET_METRICS)
    )


def _target_group(
    x: np.ndarray,
    ids: np.ndarray,
    rows: np.ndarray,
    cols: np.ndarray,
    tt: np.ndarray,
    t_pow: np.ndarray,
    mm: np.ndarray,
    span_t: FeatureSpan,
    cfg: MetricsSettings,
) -> np.ndarray:
    """Target metrics of models ``cols`` sharing coverage ``ids`` (= target-domain ``rows``)."""
    n = rows.size
    gauss, gauss_pow = key_table(n, "gaussian"), key_table(n, "gaussian_pow15")
    span = span_t.restrict(rows)
    tp = t_pow[rows] - t_pow[rows].mean()
    # correlation_contribution: targets x4 when in [0, 1], centred over the model's ids;
    # the meta model re-ranked over the model's ids.
    t4 = tt[rows] * 4 if np.all((tt[rows] >= 0) & (tt[rows] <= 1)) else tt[rows]
    t4 = t4 - t4.mean()
    gm = _gaussian_rank_vector(mm[ids])
    gm_t4, gm_gm = gm @ t4, gm @ gm
    tb = cfg.top_bottom
    res = np.full((cols.size, len(TARGET_METRICS)), np.nan)
    full = n == x.shape[1]
    for c0 in range(0, cols.size, cfg.block_models):
        c = cols[c0 : c0 + cfg.block_models]
        xb = x[c] if full else x[np.ix_(c, ids)]
        keys, _, _ = rank_keys(xb)
        constant = keys.min(axis=1) == keys.max(axis=1)  # numerai: zero std -> NaN fnc
        g = gauss[keys]
        r = res[c0 : c0 + c.size]
        r[:, 0] = _pearson_rows(gauss_pow[keys], tp)
        r[:, 1] = (g @ t4 - (g @ gm) * (gm_t4 / gm_gm)) / n
        neutral = span.residual(g.T).T  # (block x ids), C-contiguous
        del g
        keys, _, order = rank_keys(neutral, return_order=True)
        del neutral
        pw = gauss_pow[keys]
        r[:, 2] = _pearson_rows(pw, tp)
        if n >= 2 * tb:
            sel = top_bottom_positions(keys, order, tb)
            r[:, 3] = _pearson_pairs(np.take_along_axis(pw, sel, axis=1), tp[sel])
        r[constant, 2:] = np.nan
    return res


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
    return pd.DataFrame(
        _exposures(x, f, cfg.block_models),
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
    example predictions, which may lack ids). ``exposures``: models x features.
    """
    exposures = feature_exposures(predictions, features, settings)
    ex = _aligned(example, predictions.index, "example")
    if np.count_nonzero(~np.isnan(ex)) < 2:
        raise ValueError("example has fewer than 2 predictions")
    f = _feature_matrix(features, predictions.index)
    e = np.nan_to_num(_exposures(ex[None, :], f, 1)[0])
    u = exposures.to_numpy()
    ee = e @ e
    with np.errstate(invalid="ignore", divide="ignore"):
        dissimilarity = 1.0 - np.nan_to_num(u) @ e / ee if ee > 0 else np.full(u.shape[0], np.nan)
    absu = np.abs(u)
    has = ~np.all(np.isnan(absu), axis=1)
    max_exposure = np.full(u.shape[0], np.nan)
    max_exposure[has] = np.nanmax(absu[has], axis=1)
    per_model = pd.DataFrame(
        {"max_feature_exposure": max_exposure, "exposure_dissimilarity": dissimilarity},
        index=exposures.index,
    )
    return per_model, exposures


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
