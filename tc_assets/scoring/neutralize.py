"""Neutralization of a whole (ids x models) matrix to a feature set, one factorization per round.

``numerai_tools.scoring.neutralize(df, neutralizers, proportion)`` subtracts ``proportion`` times
the least-squares fit of each column on ``A = [neutralizers, 1]`` (``np.linalg.lstsq`` with
``rcond=1e-6``: singular values ``<= 1e-6 * s_max`` count as zero), and returns NaN for columns
with zero standard deviation. That fit is the orthogonal projection onto the span of ``A``'s
left singular vectors with the kept singular values, so one SVD of ``A`` serves every model.

A model that did not submit every id is neutralized over its own ids (numerai-tools called on
its own series), i.e. against ``A`` restricted to those rows. For a partial mask ``S`` with
basis ``U`` of the full span, ``span(A_S) = span(U_S)`` when ``A`` has full rank, and the
projection is ``U_S C^-1 U_S^T`` with ``C = U_S^T U_S = I - U_D^T U_D`` (``D`` the dropped
rows): a Cholesky of a small, well-conditioned ``p x p`` matrix per distinct mask instead of a
new SVD, and the products with ``U`` and ``A`` stay batched over all models of a block. When the condition bound
``cond(A_S) <= cond(A) * sqrt(cond(C))`` cannot exclude a rank cut by ``rcond``, the mask gets
its own SVD, so the lstsq semantics hold on every input.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
from scipy.linalg import blas, cho_solve, lapack
from threadpoolctl import ThreadpoolController

RCOND = 1e-6
"""Relative singular-value cutoff of ``numerai_tools.scoring.neutralize`` (its lstsq rcond)."""

# A restricted span uses the Cholesky path only while its condition bound stays this far
# (x10) below 1 / rcond, so no singular value of A_S can be near lstsq's cutoff.
_FAST_PATH_MARGIN = 0.1

BLAS_THREADS_HELP = (
    "BLAS threads while this runs (None: leave the library default). 1 by default: these "
    "products are small or many, and a multi-threaded OpenBLAS on a busy 2-core box (other "
    "processes, parallel Dagster steps) ran them 3-20x slower in our measurements."
)
_controller: ThreadpoolController | None = None


def limit_blas_threads(threads: int | None) -> contextlib.AbstractContextManager[object]:
    """Context that limits BLAS threads of this process (None: no change). Process-global
    while active, as any BLAS thread setting is."""
    global _controller
    if threads is None:
        return contextlib.nullcontext()
    if _controller is None:
        _controller = ThreadpoolController()
    return _controller.limit(limits=threads, user_api="blas")


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
    A restricted span keeps its parent's arrays and the row subset ``rows``: ``y`` is
    zero-filled to the parent's rows, so nothing of size ids x features is copied per mask.
    """

    design: np.ndarray  # (N, p) = [features, 1] on the rows of the fitted (parent) span
    basis: np.ndarray  # (N, r)
    coef_map: np.ndarray  # (p, r)
    rows: np.ndarray | None  # this span's rows among the N, None = all of them
    chol: np.ndarray | None  # lower Cholesky factor of the gram over ``rows``, None = identity
    cond: float  # condition number of the design on ``rows`` (kept values), or an upper bound
    rcond: float
    full_rank: bool  # every singular value of the design on ``rows`` kept

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
        basis = np.ascontiguousarray(u[:, :r])
        return cls(a, basis, vt[:r].T / s[:r], None, None, cond, rcond, r == a.shape[1])

    @property
    def n_rows(self) -> int:
        return self.design.shape[0] if self.rows is None else self.rows.size

    def restrict(self, rows: np.ndarray) -> FeatureSpan:
        """The span of the design over a subset of this span's rows (bool mask or sorted
        indices): a Cholesky of ``I - U_D^T U_D`` when provably far from lstsq's cutoff,
        else a new SVD of the design on those rows."""
        idx = np.flatnonzero(rows) if np.asarray(rows).dtype == bool else np.asarray(rows)
        if idx.size == self.n_rows:
            return self
        if self.rows is None and self.full_rank and idx.size >= self.design.shape[1]:
            drop = np.ones(self.n_rows, dtype=bool)
            drop[idx] = False
            # gram = U_S^T U_S = I - U_D^T U_D (lower triangle; syrk: half a matmul's flops)
            ud = np.asfortranarray(self.basis[drop])
            r = ud.shape[1]
            gram = blas.dsyrk(-1.0, ud, beta=1.0, c=np.eye(r, order="F"), trans=1, lower=1)
            chol, info = lapack.dpotrf(gram, lower=1, clean=1)
            if info == 0:
                low = np.abs(gram)  # lower triangle; the strict upper is still 0 (from I)
                anorm = float((low.sum(axis=0) + low.sum(axis=1) - np.diag(low)).max())
                rc, info = lapack.dpocon(chol, anorm, uplo="L")
                # cond(A_S) <= cond(A) sqrt(cond2(gram)), cond2 <= cond1 ~ 1/rc (x10 margin
                # for the estimate).
                if info == 0 and rc > 0:
                    bound = self.cond * np.sqrt(10.0 / rc)
                    if bound < _FAST_PATH_MARGIN / self.rcond:
                        return FeatureSpan(
                            self.design, self.basis, self.coef_map, idx, chol, bound,
                            self.rcond, True,
                        )  # fmt: skip
        own = self.design if self.rows is None else self.design[self.rows]
        return FeatureSpan.fit(own[idx], self.rcond)

    def project(self, y: np.ndarray) -> np.ndarray:
        """Least-squares fit of each column of ``y`` (n_rows x m) on the design; keeps y's
        memory layout (column-major in, column-major out)."""
        if y.ndim != 2 or y.shape[0] != self.n_rows:
            raise ValueError(f"y must have shape ({self.n_rows}, m), got {y.shape}")
        if y.flags.f_contiguous and not y.flags.c_contiguous:
            return self._project_rows(y.T).T  # row-major products on y.T, no copy of y
        return self._project_rows(np.ascontiguousarray(y.T)).T.copy()

    def _project_rows(self, yt: np.ndarray) -> np.ndarray:
        """Fits of the rows of ``yt`` (m x n_rows), as (m x n_rows)."""
        if self.rows is not None:
            full = np.zeros((yt.shape[0], self.design.shape[0]))
            full[:, self.rows] = yt
            yt = full
        z = yt @ self.basis
        if self.chol is not None:
            z = cho_solve((self.chol, True), z.T).T
        fit = (z @ self.coef_map.T) @ self.design.T
        return fit if self.rows is None else fit[:, self.rows]

    def residual(self, y: np.ndarray, proportion: float = 1.0) -> np.ndarray:
        """``y - proportion * project(y)`` (no zero-std handling; see ``Neutralizer.residual_rows``)."""
        fit = self.project(y)
        fit *= proportion
        return np.subtract(y, fit, out=fit)


def group_rows_by_mask(mask: np.ndarray) -> list[np.ndarray]:
    """Indices of the rows of a (models x ids) bool mask, grouped by identical row."""
    m = np.asarray(mask, dtype=bool)
    if m.ndim != 2:
        raise ValueError(f"mask must be 2-d, got shape {m.shape}")
    groups: dict[bytes, list[int]] = {}
    for j, row in enumerate(np.packbits(m, axis=1)):
        groups.setdefault(row.tobytes(), []).append(j)
    return [np.asarray(g, dtype=np.intp) for g in groups.values()]


class Neutralizer:
    """Residuals of models on ``[features, 1]``, each over its own ids, for one round.

    One SVD of the design at construction; ``residual_rows`` then neutralizes a block of models
    (rows) with two matmuls for the whole block, plus, per distinct partial coverage mask in the
    block, a Cholesky of ``I - U_D^T U_D`` (or an SVD when that is not provably safe). Each row
    equals ``numerai_tools.scoring.neutralize`` on that model's own ids.
    """

    def __init__(self, features: np.ndarray, rcond: float = RCOND) -> None:
        self.span = FeatureSpan.fit(design_matrix(features), rcond)

    @property
    def n_ids(self) -> int:
        return self.span.n_rows

    def residual_rows(self, y: np.ndarray, proportion: float = 1.0) -> np.ndarray:
        """``y`` (models x ids, NaN = id not submitted) minus ``proportion`` times its
        least-squares fit over its own ids; NaN where ``y`` is NaN and for constant rows."""
        y = np.asarray(y, dtype=np.float64)
        if y.ndim != 2 or y.shape[1] != self.n_ids:
            raise ValueError(f"y must have shape (models, {self.n_ids}), got {y.shape}")
        sp = self.span
        covered = ~np.isnan(y)
        y0 = np.where(covered, y, 0.0)
        z = y0 @ sp.basis  # = U_S^T y over each row's ids S, since y0 is 0 elsewhere
        refits: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        partial = np.flatnonzero(~covered.all(axis=1))
        for group in group_rows_by_mask(covered[partial]):
            rows = partial[group]
            ids = np.flatnonzero(covered[rows[0]])
            if ids.size == 0:
                continue
            sub = sp.restrict(ids)
            if sub.chol is not None:
                z[rows] = cho_solve((sub.chol, True), z[rows].T).T
            else:  # its own SVD; the fit is computed now, the restricted span dropped
                refits.append((rows, ids, sub.project(np.asfortranarray(y[np.ix_(rows, ids)].T)).T))
        fit = (z @ sp.coef_map.T) @ sp.design.T
        for rows, ids, f in refits:
            fit[np.ix_(rows, ids)] = f
        fit *= proportion
        res = np.subtract(y0, fit, out=fit)
        res[~covered] = np.nan
        with np.errstate(all="ignore"):
            constant = np.nanmax(y, axis=1) == np.nanmin(y, axis=1)  # zero std, as numerai
        res[constant] = np.nan
        return res
