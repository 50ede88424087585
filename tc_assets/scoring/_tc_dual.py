"""Fast exact solver of the meta portfolio problem: a batched dual Newton method in torch.

The problem (see `optimizer.py`) has a separable objective and few coupling rows (two budgets
and k exposure limits), so its dual lives in k + 2 variables (nu_l, nu_s, lam) and, given them,
the primal is a closed-form clip:

    l = clip((x - nu_l - E lam) / gamma, 0, u),    s = clip((-x - nu_s + E lam) / gamma, 0, u).

The dual function to minimize is

    G(nu, lam) = nu_l + nu_s + e'|lam| + sum_i psi_i(x_i - nu_l - (E lam)_i)
                                       + sum_i psi_i(-x_i - nu_s + (E lam)_i),
    psi_i(a) = max_{0 <= z <= u_i} (a z - gamma z^2 / 2)        (C^1, piecewise quadratic).

For fixed lam the budget prices nu are found exactly (the piecewise linear budget equation is
solved on its sorted breakpoints, or by closed-form Newton steps from a warm guess), so every iterate has
sum(l) = sum(s) = 1 and the method works on the reduced dual G~(lam) = min_nu G. Its gradient
is -E'w (plus e sign(lam)); its generalized Hessian is S / gamma with S the Gram matrix of the
free positions' rows of E, centred within each side (the Schur complement of the budget rows).
The non-smooth e'|lam| is handled orthant-wise: a Newton step on the binding limits and those
about to bind, Levenberg-Marquardt regularized in proportion to the residual (G~ is locally
linear where few positions are free), an Armijo line search on G~ along the orthant-projected
path, a proximal-gradient step as the fallback. G~ is piecewise quadratic, so once the binding
limits and free positions are identified a step lands on the solution; a last unregularized
step polishes it to rounding. Convergence: every KKT residual (budgets, exposure feasibility,
multiplier signs, complementary slackness) below kkt_tol; box and stationarity hold by
construction. Typical cost on generated rounds: 4-7 iterations from a warm start.

At the solution, with F the free positions (0 < z < u) and K the binding limits (lam != 0),
the implicit function theorem on the KKT system gives

    dz_F / dc_F = Pi / gamma,   Pi = projection off {1_long, 1_short, A_K}   on R^F,

with c = (x, -x) the linear coefficients and A_K the binding exposure columns (E on free longs,
-E on free shorts). A vector-Jacobian product therefore costs one |K| x |K| solve: `vjp`.

Everything is batched over rows of x (bags): the variable-size free sets and working sets are
padded into (bags, rows, columns) blocks, so the work is a few large tensor ops per iteration
on any torch device, float64.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields

import numpy as np
import torch

from tc_assets.scoring.optimizer import (
    PortfolioSolution,
    PortfolioSolveError,
    PortfolioSpec,
    check_constraints,
)

__all__ = ["DualBatch", "DualNewtonSolver", "resolve_device", "torch_threads"]

OPTIMAL = "optimal"
INFEASIBLE = "infeasible"
MAX_ITERATIONS = "max_iterations"
NOT_FINITE = "not_finite"

_BLOCK_BYTES = 64 * 2**20  # memory of one padded (bags, rows, columns) block


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Temporarily set torch's CPU thread count (None: leave it)."""
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def resolve_device(device: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; anything else is passed to torch."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@dataclass
class _State:
    """Dual iterate of a batch and everything derived from it (tensors with a leading B)."""

    lam: torch.Tensor  # (B, k)
    nu_l: torch.Tensor  # (B,)
    nu_s: torch.Tensor  # (B,)
    a_l: torch.Tensor  # (B, n) x - nu_l - E lam: long i free iff 0 < a < gamma u
    a_s: torch.Tensor  # (B, n)
    long: torch.Tensor  # (B, n)
    short: torch.Tensor  # (B, n)
    grad: torch.Tensor  # (B, k) gradient of the smooth part: -E'w
    pg: torch.Tensor  # (B, k) pseudo-gradient of G~ (0 at the solution)
    value: torch.Tensor  # (B,) G~
    kkt: torch.Tensor  # (B,) max(|pg|, budget errors)

    def take(self, idx: torch.Tensor) -> _State:
        return _State(**{f.name: getattr(self, f.name)[idx] for f in fields(self)})

    def put(self, idx: torch.Tensor, other: _State, rows: torch.Tensor | None = None) -> None:
        for f in fields(self):
            src = getattr(other, f.name)
            getattr(self, f.name)[idx] = src if rows is None else src[rows]


@dataclass
class DualBatch:
    """Solutions for a batch of signals (rows), on the solver's device."""

    x: torch.Tensor  # (B, n) signals
    state: _State
    iterations: torch.Tensor  # (B,) Newton iterations (cpu int64)
    status: list[str]

    @property
    def lam(self) -> torch.Tensor:
        return self.state.lam

    @property
    def kkt(self) -> torch.Tensor:
        return self.state.kkt

    @property
    def weights(self) -> torch.Tensor:
        return self.state.long - self.state.short

    def solution(self, i: int, spec: PortfolioSpec) -> PortfolioSolution:
        """Row i as a `PortfolioSolution` (numpy, with counts and checks)."""
        st = self.state
        long, short = st.long[i].cpu().numpy(), st.short[i].cpu().numpy()
        w = long - short
        x = self.x[i].cpu().numpy()
        caps = spec.caps
        gu = spec.gamma * caps
        a_l, a_s = st.a_l[i].cpu().numpy(), st.a_s[i].cpu().numpy()
        lam = st.lam[i].cpu().numpy()
        violations = check_constraints(w, spec, tol=0.0)
        return PortfolioSolution(
            weights=w,
            long=long,
            short=short,
            status=self.status[i],
            objective=float(x @ w - spec.gamma / 2.0 * (long @ long + short @ short)),
            iterations=int(self.iterations[i]),
            kkt_residual=float(st.kkt[i]),
            active_caps=int(np.sum((a_l >= gu) & (caps > 0)) + np.sum((a_s >= gu) & (caps > 0))),
            active_exposures=int(np.count_nonzero(lam)),
            free_positions=int(np.sum((a_l > 0) & (a_l < gu)) + np.sum((a_s > 0) & (a_s < gu))),
            held_long=int(np.count_nonzero(long)),
            held_short=int(np.count_nonzero(short)),
            max_violation=max((v.amount for v in violations), default=0.0),
            long_short_overlap=float(np.max(np.minimum(long, short), initial=0.0)),
            exposure_multipliers=lam,
            budget_multipliers=(float(st.nu_l[i]), float(st.nu_s[i])),
        )


def _pad_true(mask: torch.Tensor, fill: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Column indices of the True entries of each row, left-aligned and padded with `fill`."""
    counts = mask.sum(dim=1)
    width = int(counts.max()) if mask.shape[0] else 0
    idx = torch.full((mask.shape[0], width), fill, dtype=torch.long, device=mask.device)
    b, j = torch.nonzero(mask, as_tuple=True)
    pos = (torch.cumsum(mask, dim=1) - 1)[b, j]
    idx[b, pos] = j
    valid = torch.arange(width, device=mask.device)[None, :] < counts[:, None]
    return idx, valid


@dataclass
class _Rows:
    """Padded free positions of a batch: stock index, side sign (+1 long, -1 short), validity."""

    stock: torch.Tensor  # (B, R) in [0, n]; n = padding (a zero row of E)
    sign: torch.Tensor  # (B, R) float
    valid: torch.Tensor  # (B, R) bool
    long: torch.Tensor  # (B, R) bool: a valid long row


class DualNewtonSolver:
    """Solves the spec's problem for batches of signals and differentiates the solutions.

    Args:
        spec: the round's problem data.
        device: torch device ("auto": cuda when available).
        kkt_tol: convergence when every KKT residual is below this (absolute; budgets and
            exposures are O(0.1), so 1e-10 is ~1e-9 relative).
        max_iter: Newton iterations per solve before the retry.
    """

    def __init__(
        self,
        spec: PortfolioSpec,
        device: str | torch.device = "auto",
        kkt_tol: float = 1e-10,
        max_iter: int = 200,
    ) -> None:
        self.spec = spec
        self.device = resolve_device(device) if isinstance(device, str) else device
        dd = {"dtype": torch.float64, "device": self.device}
        n, k = spec.n_stocks, spec.n_exposures
        self.n, self.k = n, k
        self.E = torch.as_tensor(spec.exposures, **dd)  # (n, k)
        self.Et = self.E.T.contiguous()  # (k, n)
        # E with a zero row (padding stock n) and a zero column (padding limit k).
        self.E_pad = torch.zeros((n + 1, k + 1), **dd)
        self.E_pad[:n, :k] = self.E
        self.e = torch.as_tensor(spec.limits, **dd)
        self.e_scale = max(float(spec.limits.mean()) if k else 1.0, 1e-3)
        self.u = torch.as_tensor(spec.caps, **dd)
        self.gamma = float(spec.gamma)
        self.gu = self.gamma * self.u
        self.kkt_tol = kkt_tol
        self.max_iter = max_iter
        self.feasible = float(spec.caps.sum()) >= 1.0 - 1e-12
        self._lipschitz: float | None = None

    # ---- primal recovery --------------------------------------------------------------------

    def _budget_price(self, a: torch.Tensor, guess: torch.Tensor | None) -> torch.Tensor:
        """nu (B,) with f(nu) = sum_i clip((a_i - nu) / gamma, 0, u_i) = 1, exactly.

        f is continuous, piecewise linear and non-increasing. From a warm guess, up to three
        Newton steps (each the closed-form root of f's piece at the current nu) usually land
        on the root; rows that do not are solved by walking f's sorted breakpoints.
        """
        if guess is None:
            return self._budget_price_sorted(a)
        nu = guess.clone()
        done = torch.zeros_like(nu, dtype=torch.bool)
        for _ in range(3):
            d = a - nu[:, None]
            free = (d > 0) & (d < self.gu)
            ucap = (self.u * (d >= self.gu)).sum(dim=1)
            nfree = free.sum(dim=1)
            f = (d * free).sum(dim=1) / self.gamma + ucap
            done = (f - 1.0).abs() <= 1e-13
            if bool(done.all()):
                return nu
            cand = ((a * free).sum(dim=1) + self.gamma * (ucap - 1.0)) / nfree.clamp_min(1)
            nu = torch.where(done | (nfree == 0), nu, cand)
        rest = torch.nonzero(~done).flatten()
        nu[rest] = self._budget_price_sorted(a[rest])
        return nu

    def _budget_price_sorted(self, a: torch.Tensor) -> torch.Tensor:
        """The root of f by its breakpoints a - gamma u (a position leaves its cap as nu
        rises) and a (it reaches 0): sort them, accumulate f from f(min) = sum(u), interpolate
        on the segment that crosses 1, then recompute nu from that segment's free set."""
        b, n = a.shape
        if b == 0:
            return a.new_zeros(0)
        inv = 1.0 / self.gamma
        bp = torch.cat([a - self.gu, a], dim=1)
        steps = torch.cat([a.new_full((n,), -inv), a.new_full((n,), inv)])
        bp, order = torch.sort(bp, dim=1)
        slope = torch.cumsum(steps[order], dim=1)  # f's slope right of each breakpoint
        rise = torch.cumsum(slope[:, :-1] * (bp[:, 1:] - bp[:, :-1]), dim=1)
        f = torch.cat([a.new_zeros((b, 1)), rise], dim=1) + self.u.sum()
        k = ((f >= 1.0).sum(dim=1, keepdim=True) - 1).clamp(0, 2 * n - 2)
        lo, hi = bp.gather(1, k), bp.gather(1, k + 1)
        fk, sk = f.gather(1, k), slope.gather(1, k)
        nu = torch.where(sk < 0, lo + (fk - 1.0) / (-sk).clamp_min(1e-300), lo)
        d = a - nu
        free = (d > 0) & (d < self.gu)
        count = free.sum(dim=1, keepdim=True)
        ucap = (self.u * (d >= self.gu)).sum(dim=1, keepdim=True)
        exact = ((a * free).sum(dim=1, keepdim=True) + self.gamma * (ucap - 1.0)) / count.clamp_min(
            1
        )
        nu = torch.where(count > 0, torch.minimum(torch.maximum(exact, lo), hi), nu)
        return nu[:, 0]

    def _psi(self, a: torch.Tensor) -> torch.Tensor:
        """sum_i psi_i(a_i) per row: a^2/(2 gamma) inside, a u - gamma u^2 / 2 at the cap."""
        z = torch.minimum(a.clamp_min(0.0), self.gu)
        return (a * z - 0.5 * z * z).sum(dim=1) / self.gamma

    def _evaluate(
        self,
        x: torch.Tensor,
        lam: torch.Tensor,
        nu_guess: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> _State:
        """Exact budget prices, primal, value and pseudo-gradient at lam."""
        q = lam @ self.Et
        a_l, a_s = x - q, q - x
        nu_l = self._budget_price(a_l, None if nu_guess is None else nu_guess[0])
        nu_s = self._budget_price(a_s, None if nu_guess is None else nu_guess[1])
        a_l = a_l - nu_l[:, None]
        a_s = a_s - nu_s[:, None]
        inv = 1.0 / self.gamma
        long = torch.minimum((a_l * inv).clamp_min(0.0), self.u)
        short = torch.minimum((a_s * inv).clamp_min(0.0), self.u)
        grad = -((long - short) @ self.E)
        value = nu_l + nu_s + lam.abs() @ self.e + self._psi(a_l) + self._psi(a_s)
        e = self.e
        zero = torch.zeros_like(grad)
        at_zero = torch.where(grad + e < 0, grad + e, torch.where(grad - e > 0, grad - e, zero))
        pg = torch.where(lam > 0, grad + e, torch.where(lam < 0, grad - e, at_zero))
        budget = torch.maximum((long.sum(dim=1) - 1.0).abs(), (short.sum(dim=1) - 1.0).abs())
        kkt = torch.maximum(pg.abs().amax(dim=1), budget) if self.k else budget
        return _State(lam, nu_l, nu_s, a_l, a_s, long, short, grad, pg, value, kkt)

    # ---- padded blocks ----------------------------------------------------------------------

    def _rows(self, a_l: torch.Tensor, a_s: torch.Tensor) -> _Rows:
        """The free positions of each row, longs then shorts, padded."""
        free = torch.cat([(a_l > 0) & (a_l < self.gu), (a_s > 0) & (a_s < self.gu)], dim=1)
        idx, valid = _pad_true(free, 2 * self.n)
        is_long = valid & (idx < self.n)
        stock = torch.where(valid, idx % self.n if self.n else idx, self.n)
        sign = torch.where(is_long, 1.0, -1.0).to(torch.float64)
        return _Rows(stock=stock, sign=sign, valid=valid, long=is_long)

    def _block(self, rows: _Rows, cols: torch.Tensor, wvalid: torch.Tensor) -> torch.Tensor:
        """(B, R, W) A_K: E[free stock, working limit], centred within each side, short rows
        negated, padding rows and columns zero."""
        a = self.E_pad[rows.stock[:, :, None], cols[:, None, :]]
        short = rows.valid & ~rows.long
        for side in (rows.long, short):
            w = side.to(a.dtype)[:, :, None]
            mean = (a * w).sum(dim=1, keepdim=True) / w.sum(dim=1, keepdim=True).clamp_min(1.0)
            a = a - mean * w
        a = a * (rows.sign * rows.valid)[:, :, None]
        return a * wvalid[:, None, :]

    def _chunks(self, b: int, r: int, w: int) -> list[slice]:
        per = max(1, _BLOCK_BYTES // max(1, 8 * r * max(w, 1)))
        return [slice(i, min(i + per, b)) for i in range(0, b, per)]

    @staticmethod
    def _psd_solve(s: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
        """Solve S d = rhs for a batch of symmetric PSD S (B, W, W), rhs (B, W): Cholesky,
        else (singular) the pseudo-inverse, i.e. the minimum-norm solution."""
        if s.shape[-1] == 0:
            return rhs.clone()
        chol, info = torch.linalg.cholesky_ex(s)
        d = torch.cholesky_solve(rhs[:, :, None], chol)[:, :, 0]
        bad = (info != 0) | ~torch.isfinite(d).all(dim=1)
        if bool(bad.any()):
            vals, vecs = torch.linalg.eigh(s[bad])
            w = s.shape[-1]
            cut = vals.abs().amax(dim=1, keepdim=True).clamp_min(1e-300) * w * 1e-13
            inv = torch.where(vals > cut, 1.0 / torch.where(vals > cut, vals, 1.0), 0.0)
            proj = torch.einsum("bij,bj->bi", vecs.transpose(1, 2), rhs[bad])
            d[bad] = torch.einsum("bij,bj->bi", vecs, inv * proj)
        return d

    def _solve_block(
        self,
        rows: _Rows,
        cols: torch.Tensor,
        wvalid: torch.Tensor,
        rhs: torch.Tensor,
        reg: torch.Tensor,
    ) -> torch.Tensor:
        """Solve (A_K' A_K / gamma + mu I) d = rhs on each row's working set (padding: d = 0),
        mu = reg * (mean diagonal of A_K' A_K / gamma, at least 1 / gamma)."""
        out = torch.zeros_like(rhs)
        b, r, w = rows.stock.shape[0], rows.stock.shape[1], cols.shape[1]
        for sl in self._chunks(b, r, w):
            sub = _Rows(rows.stock[sl], rows.sign[sl], rows.valid[sl], rows.long[sl])
            a = self._block(sub, cols[sl], wvalid[sl])
            s = a.transpose(1, 2) @ a / self.gamma
            diag = torch.diagonal(s, dim1=1, dim2=2)
            scale = diag.sum(dim=1) / wvalid[sl].sum(dim=1).clamp_min(1)
            mu = reg[sl] * scale.clamp_min(1.0 / self.gamma)
            s = s + torch.diag_embed(torch.where(wvalid[sl], mu[:, None], 1.0))
            out[sl] = self._psd_solve(s, rhs[sl] * wvalid[sl])
        return out * wvalid

    def _newton_direction(self, st: _State, regularize: bool = True) -> torch.Tensor:
        """Orthant-wise regularized Newton direction (B, k) on the binding and entering limits.

        A limit at 0 enters the working set when its pseudo-gradient is non-zero; entering
        limits whose Newton step points out of their orthant are dropped and the system
        re-solved, so that small steps stay inside the orthant (a descent path for G~).
        The Levenberg-Marquardt term mu = 1e-2 min(1, |pg| / mean(e)) * curvature keeps the
        step finite where G~ is locally linear (few free positions: a singular Hessian) and
        vanishes with the residual, so the final steps are Newton steps (fast local
        convergence; the last step exact to ~1e-2 |pg|^2).
        """
        lam, pg = st.lam, st.pg
        sigma = torch.where(lam != 0, torch.sign(lam), -torch.sign(pg))
        work = sigma != 0
        rows = self._rows(st.a_l, st.a_s)
        d = torch.zeros_like(lam)
        todo = torch.arange(lam.shape[0], device=lam.device)
        pad = torch.zeros((lam.shape[0], 1), dtype=lam.dtype, device=lam.device)
        pg_pad, lam_pad, sig_pad = (torch.cat([v, pad], dim=1) for v in (pg, lam, sigma))
        reg = 1e-2 * (st.kkt / self.e_scale).clamp(max=1.0) * float(regularize)
        for _ in range(self.k + 1):
            if todo.numel() == 0:
                break
            cols, wvalid = _pad_true(work[todo], self.k)
            sub = _Rows(rows.stock[todo], rows.sign[todo], rows.valid[todo], rows.long[todo])
            dk = self._solve_block(sub, cols, wvalid, -pg_pad[todo].gather(1, cols), reg[todo])
            entering = wvalid & (lam_pad[todo].gather(1, cols) == 0)
            wrong = entering & (dk * sig_pad[todo].gather(1, cols) <= 0)
            redo = wrong.any(dim=1)
            done = todo[~redo]
            dd = torch.zeros((done.numel(), self.k + 1), dtype=d.dtype, device=d.device)
            dd.scatter_(1, cols[~redo], dk[~redo])
            d[done] = dd[:, : self.k]
            for i in torch.nonzero(redo).flatten().tolist():
                work[todo[i], cols[i][wrong[i]]] = False
            todo = todo[redo]
        return d

    # ---- solve ------------------------------------------------------------------------------

    def _lipschitz_constant(self) -> float:
        """2 |E|_2^2 / gamma bounds the Lipschitz constant of G~'s smooth part's gradient."""
        if self._lipschitz is None:
            norm = float(torch.linalg.matrix_norm(self.E, ord=2)) if self.k else 0.0
            self._lipschitz = 2.0 * norm**2 / self.gamma + 1e-300
        return self._lipschitz

    def _line_search(self, x: torch.Tensor, st: _State, d: torch.Tensor) -> _State:
        """Armijo backtracking along the orthant-projected Newton path; bags where it fails
        take a proximal-gradient step instead (always a descent step for convex G~)."""
        lam = st.lam
        sigma = torch.where(lam != 0, torch.sign(lam), -torch.sign(st.pg))
        alpha = torch.ones_like(st.value)
        result = st.take(torch.arange(lam.shape[0], device=lam.device))
        pending = torch.ones_like(st.value, dtype=torch.bool)
        slack = 1e-13 * st.value.abs().clamp_min(1.0)
        for _ in range(30):
            idx = torch.nonzero(pending).flatten()
            if idx.numel() == 0:
                break
            trial = lam[idx] + alpha[idx, None] * d[idx]
            trial = torch.where(torch.sign(trial) * sigma[idx] < 0, 0.0, trial)
            new = self._evaluate(x[idx], trial, (st.nu_l[idx], st.nu_s[idx]))
            step = trial - lam[idx]
            decrease = (st.pg[idx] * step).sum(dim=1)
            moved = (step.abs() > 1e-15 * (lam[idx].abs() + 1e-3)).any(dim=1)
            ok = new.value <= st.value[idx] + 1e-4 * decrease + slack[idx]
            ok &= torch.isfinite(new.value) & moved
            result.put(idx[ok], new, ok)
            pending[idx[ok]] = False
            alpha[idx[~ok]] *= 0.5
        idx = torch.nonzero(pending).flatten()
        if idx.numel():
            step = 1.0 / self._lipschitz_constant()
            z = lam[idx] - step * st.grad[idx]
            trial = torch.sign(z) * (z.abs() - step * self.e).clamp_min(0.0)
            result.put(idx, self._evaluate(x[idx], trial, (st.nu_l[idx], st.nu_s[idx])))
        return result

    def solve(
        self, x: torch.Tensor, lam0: torch.Tensor | None = None, max_iter: int | None = None
    ) -> DualBatch:
        """Solve for every row of x (B, n); lam0 (B, k) or (1, k) warm start (default 0)."""
        max_iter = self.max_iter if max_iter is None else max_iter
        x = torch.as_tensor(x, dtype=torch.float64, device=self.device)
        b = x.shape[0]
        lam = x.new_zeros((b, self.k))
        if lam0 is not None:
            lam = lam + torch.as_tensor(lam0, dtype=torch.float64, device=self.device)
        iterations = torch.zeros(b, dtype=torch.int64)
        st = self._evaluate(x, lam)
        if not self.feasible:
            return DualBatch(x, st, iterations, [INFEASIBLE] * b)
        active = torch.nonzero(st.kkt > self.kkt_tol).flatten()
        for _ in range(max_iter):
            if active.numel() == 0:
                break
            sub = st.take(active)
            new = self._line_search(x[active], sub, self._newton_direction(sub))
            st.put(active, new)
            iterations[active.cpu()] += 1
            active = active[new.kkt > self.kkt_tol]
        # Polish: one unregularized Newton step on the identified active sets lands on the
        # solution to rounding; kept where it lowers the residual.
        done = torch.nonzero(st.kkt <= self.kkt_tol).flatten()
        if done.numel():
            sub = st.take(done)
            d = self._newton_direction(sub, regularize=False)
            sigma = torch.where(sub.lam != 0, torch.sign(sub.lam), -torch.sign(sub.pg))
            trial = sub.lam + d
            trial = torch.where(torch.sign(trial) * sigma < 0, 0.0, trial)
            new = self._evaluate(x[done], trial, (sub.nu_l, sub.nu_s))
            better = new.kkt < sub.kkt
            st.put(done[better], new, better)
        bad = ~(torch.isfinite(st.kkt) & torch.isfinite(st.long).all(dim=1))
        status = [
            NOT_FINITE
            if bool(bad[i])
            else MAX_ITERATIONS
            if float(st.kkt[i]) > self.kkt_tol
            else OPTIMAL
            for i in range(b)
        ]
        return DualBatch(x, st, iterations, status)

    def solve_or_raise(
        self,
        x: np.ndarray | torch.Tensor,
        *,
        label: str,
        lam0: torch.Tensor | None = None,
        bag_ids: list[int] | None = None,
    ) -> DualBatch:
        """`solve`, then a cold restart with 4x the iterations for rows that failed; raises
        `PortfolioSolveError` naming the round (label), the bag (bag_ids[row]; None: the meta
        portfolio) and the status when a row still fails. No partial result is returned."""
        x = np.array(x, dtype=np.float64) if isinstance(x, np.ndarray) else x  # writable copy
        batch = self.solve(torch.as_tensor(x, dtype=torch.float64, device=self.device), lam0)
        failed = [i for i, s in enumerate(batch.status) if s != OPTIMAL]
        if not failed:
            return batch
        idx = torch.tensor(failed, device=self.device)
        retry = self.solve(batch.x[idx], None, max_iter=4 * self.max_iter)
        for j, i in enumerate(failed):
            if retry.status[j] != OPTIMAL:
                bag = None if bag_ids is None else bag_ids[i]
                detail = f"KKT residual {float(retry.kkt[j]):.3g} > {self.kkt_tol:g}"
                raise PortfolioSolveError(
                    label,
                    bag,
                    retry.status[j],
                    detail,
                    retry=f"a cold restart with {4 * self.max_iter} iterations",
                )
        batch.state.put(idx, retry.state)
        batch.iterations[idx.cpu()] += retry.iterations
        for i in failed:
            batch.status[i] = OPTIMAL
        return batch

    # ---- derivatives ------------------------------------------------------------------------

    def vjp(self, batch: DualBatch, grad_w: torch.Tensor) -> torch.Tensor:
        """(dw*/dx)' g for every row: g (B, n) or (n,) the gradient of a loss w.r.t. w.

        With v = Pi (g on free longs, -g on free shorts) / gamma, (dw/dx)' g = v_l - v_s.
        """
        st = batch.state
        b = st.lam.shape[0]
        g = torch.as_tensor(grad_w, dtype=torch.float64, device=self.device).expand(b, self.n)
        rows = self._rows(st.a_l, st.a_s)
        cols, wvalid = _pad_true(st.lam != 0, self.k)
        g_pad = torch.cat([g, g.new_zeros((b, 1))], dim=1)
        out = g.new_zeros((b, self.n + 1))
        r, w = rows.stock.shape[1], cols.shape[1]
        for sl in self._chunks(b, r, w):
            sub = _Rows(rows.stock[sl], rows.sign[sl], rows.valid[sl], rows.long[sl])
            h = g_pad[sl].gather(1, sub.stock) * sub.sign
            for side in (sub.long, sub.valid & ~sub.long):
                ws = side.to(h.dtype)
                h = h - ws * (h * ws).sum(dim=1, keepdim=True) / ws.sum(1, keepdim=True).clamp_min(
                    1
                )
            h = h * sub.valid
            if w:
                a = self._block(sub, cols[sl], wvalid[sl])
                s = a.transpose(1, 2) @ a
                s = s + torch.diag_embed((~wvalid[sl]).to(s.dtype))
                mu = self._psd_solve(s, torch.einsum("brw,br->bw", a, h))
                h = h - torch.einsum("brw,bw->br", a, mu)
            out[sl].scatter_add_(1, sub.stock, h * sub.sign / self.gamma)
        return out[:, : self.n]

    def bound(self, batch: DualBatch) -> torch.Tensor:
        """(B, n) True where a stock is free on neither side: at 0, at its cap, or capped at 0."""
        st = batch.state
        free_l = (st.a_l > 0) & (st.a_l < self.gu)
        free_s = (st.a_s > 0) & (st.a_s < self.gu)
        return ~(free_l | free_s)

    def jacobian_trace(self, batch: DualBatch, i: int = 0) -> float:
        """tr(dw*/dx) at row i: the optimizer's total gain from signal to weights,

        (|F| - #non-empty free sides - rank A_K + 2 sum_{i long and short} a_il' S^+ a_is) / gamma,
        the last sum only over stocks free on both sides (none when the l/s split is exact).
        """
        st = batch.state.take(torch.tensor([i], device=self.device))
        rows = self._rows(st.a_l, st.a_s)
        nl = int(rows.long.sum())
        ns = int((rows.valid & ~rows.long).sum())
        trace = float(nl + ns - (nl > 0) - (ns > 0))
        cols, wvalid = _pad_true(st.lam != 0, self.k)
        if cols.shape[1] and nl + ns:
            a = self._block(rows, cols, wvalid)[0]
            s = a.T @ a
            vals = torch.linalg.eigvalsh(s)
            trace -= int((vals > vals.abs().max().clamp_min(1e-300) * s.shape[0] * 1e-13).sum())
            stock = rows.stock[0]
            both = torch.isin(stock[:nl], stock[nl : nl + ns])
            if bool(both.any()):
                pos_s = nl + torch.searchsorted(stock[nl : nl + ns], stock[:nl][both])
                al, as_ = a[:nl][both], a[pos_s]
                sol = self._psd_solve(s.expand(as_.shape[0], -1, -1).contiguous(), as_)
                trace += 2.0 * float((al * sol).sum())
        return max(trace, 0.0) / self.gamma
