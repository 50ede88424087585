"""Neutralization of a whole (ids x models) matrix to a feature set, one factorization per round.

``numerai_tools.scoring.neutralize(df, neutralizers, proportion)`` subtracts ``proportion`` times
the least-squares fit of each column on ``A = [neutralizers, 1]`` (``np.linalg.lstsq`` with
``rcond=1e-6``: singular values ``<= 1e-6 * s_max`` count as zero), and returns NaN for columns
with zero standard deviation. That fit is the orthogonal projection onto the span of ``A``'s
left singular vectors with the kept singular values, so one SVD of ``A`` serves every model.

A model that did not submit every id is neutralized over its own ids (numerai-tools called on
its own series), i.e. against ``A`` restricted to those rows. Models are grouped by coverage
mask (nearly all share the full one). For a partial mask ``S`` with basis ``U`` of the full
span, ``span(A_S) = span(U_S)`` when ``A`` has full rank, and the projection is
``U_S C^-1 U_S^T`` with ``C = U_S^T U_S = I - U_D^T U_D`` (``D`` the dropped rows): a Cholesky
of a small, well-conditioned ``p x p`` matrix instead of a new SVD. When the condition bound
``cond(A_S) <= cond(A) * sqrt(cond(C))`` cannot exclude a rank cut by ``rcond``, the mask gets
its own SVD, so the lstsq semantics hold on every input.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field
from scipy.linalg import cho_solve, lapack

RCOND = 1e-6
"""Relative singular-value cutoff of ``numerai_tools.scoring.neutralize`` (its lstsq rcond)."""

# A restricted span uses the Cholesky path only while its condition bound stays this far
# (x100) below 1 / rcond, so no singular value of A_S can be near lstsq's cutoff.
_FAST_PATH_MARGIN = 1e-2

# Models neutralized per matmul block: bounds temporaries to about 3 x 8 bytes x ids x block.
_BLOCK_COLUMNS = 512


class NeutralizationSettings(BaseModel):
    """How predictions are neutralized to the feature set."""

    model_config = ConfigDict(frozen=True)

    proportion: float = Field(
        1.0,
        ge=0.0,
        le=1.0,
        description="Fraction of the least-squares fit on [features, 1] that is subtracted "
        "(1.0 = fully neutral, numerai's default and the one fnc_v3 uses).",
    )
    rcond: float = Field(
        RCOND,
        gt=0.0,
        lt=1.0,
        description="Singular values <= rcond * largest are treated as zero "
        "(numerai_tools.scoring.neutralize uses 1e-6).",
    )


def design_matrix(features: np.ndarray) -> np.ndarray:
    """``[features, 1]`` as float64, the regressors numerai-tools neutralizes against."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2:
        raise ValueError(f"features must be 2-d (ids x features), got shape {f.shape}")
    return np.hstack([f, np.ones((f.shape[0], 1))])


@dataclass(frozen=True, eq=False)
class FeatureSpan:
    """What lstsq(A, ., rcond) fits, for the design ``A`` over some rows.

    ``project(y) = A @ coef`` with ``coef = coef_map @ gram^-1 @ basis.T @ y``: ``basis`` spans
    the fitted space, ``gram = basis.T @ basis`` is the identity for a fitted span (``chol``
    None) and given by its Cholesky factor for a span restricted from a fitted one, and
    ``coef_map = V_r S_r^-1`` maps basis coordinates to regression coefficients. Multiplying
    by ``A`` last, as numerai does, gives identical ids (same row of A and y) identical fits.
    """

    design: np.ndarray  # (n, p) = [features, 1] on this span's rows
    basis: np.ndarray  # (n, r)
    coef_map: np.ndarray  # (p, r)
    chol: np.ndarray | None  # lower Cholesky factor of basis.T @ basis, None if orthonormal
    cond: float  # condition number of ``design`` (kept singular values), or an upper bound
    rcond: float
    full_rank: bool  # every singular value of ``design`` kept

    @classmethod
    def fit(cls, design: np.ndarray, rcond: float = RCOND) -> FeatureSpan:
        """One thin SVD of the design matrix; keeps singular values ``> rcond * s_max``."""
        a = np.asarray(design, dtype=np.float64)
        if a.ndim != 2 or a.shape[0] == 0:
            raise ValueError(f"design must be a non-empty 2-d array, got shape {a.shape}")
        if not np.all(np.isfinite(a)):
            raise ValueError("features contain NaN or infinite values")
        u, s, vt = np.linalg.svd(a, full_matrices=False)
        keep = s > rcond * s[0] if s.size and s[0] > 0 else np.zeros(s.shape, dtype=bool)
        r = int(keep.sum())
        cond = float(s[0] / s[r - 1]) if r else np.inf
        coef_map = vt[:r].T / s[:r]
        return cls(a, np.ascontiguousarray(u[:, :r]), coef_map, None, cond, rcond, r == a.shape[1])

    @property
    def n_rows(self) -> int:
        return self.design.shape[0]

    def restrict(self, rows: np.ndarray) -> FeatureSpan:
        """The span of the design over a subset of rows (bool mask or sorted indices)."""
        idx = np.flatnonzero(rows) if np.asarray(rows).dtype == bool else np.asarray(rows)
        if idx.size == self.n_rows:
            return self
        if self.chol is None and self.full_rank and idx.size >= self.design.shape[1]:
            drop = np.ones(self.n_rows, dtype=bool)
            drop[idx] = False
            ud = self.basis[drop]
            gram = np.eye(self.basis.shape[1]) - ud.T @ ud  # = U_S^T U_S, entries well scaled
            chol, info = lapack.dpotrf(gram, lower=1, clean=1)
            if info == 0:
                anorm = float(np.abs(gram).sum(axis=0).max())
                rc, info = lapack.dpocon(chol, anorm, uplo="L")
                # cond2(gram) <= cond1(gram); the estimate is within a small factor.
                if info == 0 and rc > 0:
                    bound = self.cond * np.sqrt(10.0 / rc)
                    if bound < _FAST_PATH_MARGIN / self.rcond:
                        return FeatureSpan(
                            self.design[idx],
                            self.basis[idx],
                            self.coef_map,
                            chol,
                            bound,
                            self.rcond,
                            True,
                        )
        return FeatureSpan.fit(self.design[idx], self.rcond)

    def project(self, y: np.ndarray) -> np.ndarray:
        """Least-squares fit of each column of ``y`` (n x m) on the design; keeps y's layout."""
        if y.flags.f_contiguous and not y.flags.c_contiguous:
            # Row-major products on y.T give a column-major result without a copy of y.
            z = y.T @ self.basis
            if self.chol is not None:
                z = cho_solve((self.chol, True), z.T).T
            return ((z @ self.coef_map.T) @ self.design.T).T
        z = self.basis.T @ y
        if self.chol is not None:
            z = cho_solve((self.chol, True), z)
        return self.design @ (self.coef_map @ z)

    def residual(self, y: np.ndarray, proportion: float = 1.0) -> np.ndarray:
        """``y - proportion * project(y)`` (no zero-std handling; see ``neutralize_matrix``)."""
        fit = self.project(y)
        fit *= proportion
        return np.subtract(y, fit, out=fit)


def group_columns_by_mask(mask: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Group the columns of a (ids x models) bool coverage mask by identical mask.

    Returns ``[(rows, columns), ...]`` with ``rows`` the sorted row indices a group covers and
    ``columns`` its column indices; the full-coverage group, if any, comes first.
    """
    m = np.asarray(mask, dtype=bool)
    if m.ndim != 2:
        raise ValueError(f"mask must be 2-d, got shape {m.shape}")
    n, k = m.shape
    full = m.all(axis=0)
    groups: list[tuple[np.ndarray, np.ndarray]] = []
    if full.any():
        groups.append((np.arange(n), np.flatnonzero(full)))
    partial = np.flatnonzero(~full)
    if partial.size:
        packed = np.packbits(np.ascontiguousarray(m[:, partial].T), axis=1)
        by_mask: dict[bytes, list[int]] = {}
        for j, row in zip(partial, packed, strict=True):
            by_mask.setdefault(row.tobytes(), []).append(int(j))
        for cols in by_mask.values():
            groups.append((np.flatnonzero(m[:, cols[0]]), np.asarray(cols, dtype=np.intp)))
    return groups


def neutralize_matrix(
    x: np.ndarray,
    features: np.ndarray,
    proportion: float = 1.0,
    rcond: float = RCOND,
) -> np.ndarray:
    """Neutralize every column of ``x`` (ids x models, NaN = not submitted) to ``features``.

    Column j equals ``numerai_tools.scoring.neutralize`` applied to that column's non-NaN ids
    (and the features on those ids); constant columns become NaN. One SVD for the full-coverage
    group, a Cholesky (or, if ill-conditioned, an SVD) per distinct partial mask.
    """
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"x must be 2-d (ids x models), got shape {a.shape}")
    design = design_matrix(features)
    if design.shape[0] != a.shape[0]:
        raise ValueError(f"x has {a.shape[0]} rows but features has {design.shape[0]}")
    if np.isinf(a).any():
        raise ValueError("x contains infinite values")
    out = np.full(a.shape, np.nan, order="F")
    span = FeatureSpan.fit(design, rcond)
    for rows, cols in group_columns_by_mask(~np.isnan(a)):
        if rows.size == 0:
            continue
        sub = span.restrict(rows)
        full = rows.size == a.shape[0]
        for c0 in range(0, cols.size, _BLOCK_COLUMNS):
            c = cols[c0 : c0 + _BLOCK_COLUMNS]
            y = np.asfortranarray(a[:, c] if full else a[np.ix_(rows, c)])
            res = sub.residual(y, proportion)
            res[:, np.max(y, axis=0) == np.min(y, axis=0)] = np.nan  # zero std, as numerai
            if full:
                out[:, c] = res
            else:
                out[np.ix_(rows, c)] = res
    return out


def neutralize(
    predictions: pd.DataFrame,
    features: pd.DataFrame,
    proportion: float = 1.0,
    rcond: float = RCOND,
) -> pd.DataFrame:
    """DataFrame form of ``neutralize_matrix``: same index on both, NaN = not submitted."""
    if not isinstance(predictions, pd.DataFrame) or not isinstance(features, pd.DataFrame):
        raise TypeError("predictions and features must be pandas DataFrames")
    if predictions.shape[0] == 0 or features.shape[1] == 0:
        raise ValueError("predictions must have rows and features must have columns")
    if not predictions.index.equals(features.index):
        raise ValueError("predictions and features must have the same index (ids, same order)")
    if features.isna().to_numpy().any():
        raise ValueError("features contain NaN")
    out = neutralize_matrix(
        predictions.to_numpy(np.float64), features.to_numpy(), proportion, rcond
    )
    return pd.DataFrame(out, index=predictions.index, columns=predictions.columns)
