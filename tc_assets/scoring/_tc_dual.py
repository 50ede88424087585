"""Fast exact solver of the meta portfolio problem: a batched dual Newton method in torch.

The problem (see `optimizer.py`) has a separable objective and few coupling rows (two budgets
and k exposure limits), so its dual lives in k + 2 variables (nu_l, nu_s, lam) and, given them,
the primal is a closed-form clip:

    l = clip((x - nu_l - E lam) / gamma, 0, u),    s = clip((-x - nu_s + E lam) / gamma, 0, u).

The dual function to minimize is

    G(nu, lam) = nu_l + nu_s + e'|lam| + sum_i psi_i(x_i - nu_l - (E lam)_i)
                                       + sum_i psi_i(-x_i - nu_s + (E lam)_i),
    psi_i(a) = max_{0 <= z <= u_i} (a z - gamma z^2 / 2)        (C^1, piecewise quadratic).

For fixed lam the budget prices nu are found exactly (a sorted piecewise-linear root), so every
iterate has sum(l) = sum(s) = 1 and the method works on the reduced dual G~(lam) = min_nu G. Its
generalized Hessian is the within-side-centred Gram matrix of the free rows of E divided by gamma
(the Schur complement of the budget rows), and its non-smooth term e'|lam| is handled orthant-wise:
an orthant-wise semismooth Newton step on the binding limits with an Armijo line search on G~,
a proximal-gradient step as the fallback. G~ is piecewise quadratic, so once the binding limits
and the free positions are identified one full step lands on the solution (to rounding).

At the solution, with F the free positions (0 < z < u) and K the binding limits (lam != 0), the
implicit function theorem on the KKT system gives

    dz_F / dc_F = (1 / gamma) Pi,   Pi = projection onto {d : 1'd_l = 0, 1'd_s = 0, A_K' d = 0},

(c = (x, -x) the linear coefficients, A_K the binding exposure rows with the sign of each side),
so a vector-Jacobian product costs one |K| x |K| solve per bag: `vjp`.

Everything is batched over rows of X (bags) and runs on any torch device in float64.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from tc_assets.scoring.optimizer import PortfolioSolution, PortfolioSolveError, PortfolioSpec

OPTIMAL = "optimal"
INFEASIBLE = "infeasible"
MAX_ITERATIONS = "max_iterations"
NOT_FINITE = "not_finite"


def resolve_device(device: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; anything else is passed to torch."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@dataclass
class DualBatch:
    """Solutions for a batch of signals (rows). Tensors live on the solver's device."""

    x: torch.Tensor  # (B, n) signals
    lam: torch.Tensor  # (B, k) exposure multipliers
    nu_l: torch.Tensor  # (B,)
    nu_s: torch.Tensor  # (B,)
    long: torch.Tensor  # (B, n)
    short: torch.Tensor  # (B, n)
    a_long: torch.Tensor  # (B, n) x - nu_l - E lam: position i is free iff 0 < a < gamma u
    a_short: torch.Tensor  # (B, n)
    kkt: torch.Tensor  # (B,) KKT residual (max |pseudo-gradient| of the reduced dual)
    dual_value: torch.Tensor  # (B,) G at the solution = the primal optimum
    iterations: torch.Tensor  # (B,) Newton iterations
    status: list[str] = field(default_factory=list)

    @property
    def weights(self) -> torch.Tensor:
        return self.long - self.short

    def solution(self, i: int, spec: PortfolioSpec) -> PortfolioSolution:
        """Row i as a `PortfolioSolution` (numpy, with counts and checks)."""
        from tc_assets.scoring.optimizer import check_constraints

        long = self.long[i].cpu().numpy()
        short = self.short[i].cpu().numpy()
        w = long - short
        x = self.x[i].cpu().numpy()
        caps = spec.caps
        objective = float(x @ w - spec.gamma / 2.0 * (long @ long + short @ short))
        violations = check_constraints(w, spec, tol=0.0)
        at_cap = int(np.sum((long >= caps) & (caps > 0)) + np.sum((short >= caps) & (caps > 0)))
        gu = spec.gamma * caps
        a_l, a_s = self.a_long[i].cpu().numpy(), self.a_short[i].cpu().numpy()
        free = int(np.sum((a_l > 0) & (a_l < gu)) + np.sum((a_s > 0) & (a_s < gu)))
        lam = self.lam[i].cpu().numpy()
        return PortfolioSolution(
            weights=w,
            long=long,
            short=short,
            status=self.status[i],
            objective=objective,
            iterations=int(self.iterations[i]),
            kkt_residual=float(self.kkt[i]),
            active_caps=at_cap,
            active_exposures=int(np.count_nonzero(lam)),
            free_positions=free,
            held_long=int(np.count_nonzero(long)),
            held_short=int(np.count_nonzero(short)),
            max_violation=max((v.amount for v in violations), default=0.0),
            long_short_overlap=float(np.max(np.minimum(long, short), initial=0.0)),
            exposure_multipliers=lam,
            budget_multipliers=(float(self.nu_l[i]), float(self.nu_s[i])),
        )


class DualNewtonSolver:
    """Solves the spec's problem for batches of signals; differentiates the solutions.

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
        self.E = torch.as_tensor(spec.exposures, **dd)  # (n, k)
        self.Et = self.E.T.contiguous()  # (k, n)
        self.e = torch.as_tensor(spec.limits, **dd)  # (k,)
        self.u = torch.as_tensor(spec.caps, **dd)  # (n,)
        self.gamma = float(spec.gamma)
        self.gu = self.gamma * self.u
        self.kkt_tol = kkt_tol
        self.max_iter = max_iter
        self.feasible = float(spec.caps.sum()) >= 1.0 - 1e-12
        self._lipschitz: float | None = None
        n = spec.n_stocks
        inv = 1.0 / self.gamma
        self._slope_steps = torch.cat([torch.full((n,), -inv, **dd), torch.full((n,), inv, **dd)])

    # ---- primal recovery ------------------------------------------------------------------

    def _budget_price(self, a: torch.Tensor) -> torch.Tensor:
        """nu (B,) with sum_i clip((a_i - nu) / gamma, 0, u_i) = 1, exactly.

        f(nu) is continuous, piecewise linear and non-increasing with breakpoints a - gamma u
        (a position leaves its cap) and a (it reaches 0): sort them, walk f, interpolate on the
        crossing segment, then recompute nu from that segment's free set in one sum.
        """
        bp = torch.cat([a - self.gu, a], dim=1)
        bp, order = torch.sort(bp, dim=1)
        slope = torch.cumsum(self._slope_steps[order], dim=1)
        steps = slope[:, :-1] * (bp[:, 1:] - bp[:, :-1])
        f = torch.cat([torch.zeros_like(bp[:, :1]), torch.cumsum(steps, dim=1)], dim=1)
        f = f + self.u.sum()
        k = ((f >= 1.0).sum(dim=1) - 1).clamp(0, bp.shape[1] - 2)[:, None]
        lo, hi = bp.gather(1, k), bp.gather(1, k + 1)
        fk, sk = f.gather(1, k), slope.gather(1, k)
        nu = torch.where(sk < 0, lo + (fk - 1.0) / (-sk).clamp_min(1e-300), lo)
        # Polish: on the segment the free set is fixed and nu has a closed form.
        free = (a > nu) & (a < nu + self.gu)
        capped = a >= nu + self.gu
        count = free.sum(dim=1, keepdim=True)
        exact = (
            (a * free).sum(1, keepdim=True)
            + self.gamma * ((self.u * capped).sum(1, keepdim=True) - 1.0)
        ) / count.clamp_min(1)
        nu = torch.where(count > 0, torch.minimum(torch.maximum(exact, lo), hi), nu)
        return nu[:, 0]

    def _psi(self, a: torch.Tensor) -> torch.Tensor:
        """sum_i psi_i(a_i) per row."""
        g = self.gamma
        z = torch.minimum(a.clamp_min(0.0), self.gu)
        # a z - g z^2 / 2 with z = clip(a / g, 0, u): a^2/(2g) inside, a u - g u^2/2 at the cap.
        return (a * z - 0.5 * z * z).sum(dim=1) / g

    def _evaluate(self, x: torch.Tensor, lam: torch.Tensor) -> dict[str, torch.Tensor]:
        q = lam @ self.Et
        a_l, a_s = x - q, q - x
        nu_l, nu_s = self._budget_price(a_l), self._budget_price(a_s)
        a_l = a_l - nu_l[:, None]
        a_s = a_s - nu_s[:, None]
        inv = 1.0 / self.gamma
        long = torch.minimum((a_l * inv).clamp_min(0.0), self.u)
        short = torch.minimum((a_s * inv).clamp_min(0.0), self.u)
        r = (long - short) @ self.E
        value = nu_l + nu_s + lam.abs() @ self.e + self._psi(a_l) + self._psi(a_s)
        g = -r
        e = self.e
        pg = torch.where(
            lam > 0,
            g + e,
            torch.where(
                lam < 0,
                g - e,
                torch.where(g + e < 0, g + e, torch.where(g - e > 0, g - e, torch.zeros_like(g))),
            ),
        )
        return {
            "lam": lam,
            "nu_l": nu_l,
            "nu_s": nu_s,
            "a_l": a_l,
            "a_s": a_s,
            "long": long,
            "short": short,
            "value": value,
            "g": g,
            "pg": pg,
            "kkt": pg.abs().amax(dim=1) if pg.shape[1] else torch.zeros_like(nu_l),
        }

    # ---- Newton systems --------------------------------------------------------------------

    def _centred_rows(
        self, a_l: torch.Tensor, a_s: torch.Tensor, cols: torch.Tensor
    ) -> torch.Tensor:
        """A_K: free rows of E[:, cols], centred within each side, short rows negated."""
        gu = self.gu
        fl = (a_l > 0) & (a_l < gu)
        fs = (a_s > 0) & (a_s < gu)
        parts = []
        for mask, sign in ((fl, 1.0), (fs, -1.0)):
            if bool(mask.any()):
                rows = self.E[mask][:, cols]
                parts.append(sign * (rows - rows.mean(dim=0, keepdim=True)))
        if not parts:
            return self.E.new_zeros((0, int(cols.numel())))
        return torch.cat(parts, dim=0)

    @staticmethod
    def _psd_solve(s: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
        """Solve S d = rhs for symmetric PSD S: Cholesky, else pseudo-inverse (null space 0)."""
        n = s.shape[0]
        if n == 0:
            return rhs.clone()
        r2 = rhs.reshape(n, -1)
        chol, info = torch.linalg.cholesky_ex(s)
        if int(info) == 0:
            d = torch.cholesky_solve(r2, chol)
            if bool(torch.isfinite(d).all()):
                return d.reshape(rhs.shape)
        vals, vecs = torch.linalg.eigh(s)
        keep = vals > vals.abs().max().clamp_min(1e-300) * n * 1e-13
        inv = torch.where(keep, 1.0 / torch.where(keep, vals, torch.ones_like(vals)), 0.0)
        return (vecs @ (inv[:, None] * (vecs.T @ r2))).reshape(rhs.shape)

    def _newton_direction(self, st: dict[str, torch.Tensor], i: int) -> torch.Tensor:
        """Orthant-wise Newton direction for row i (zeros outside the working set)."""
        lam, pg = st["lam"][i], st["pg"][i]
        sigma = torch.where(lam != 0, torch.sign(lam), -torch.sign(pg))
        work = sigma != 0
        d = torch.zeros_like(lam)
        for _ in range(lam.shape[0] + 1):
            cols = torch.nonzero(work).flatten()
            if cols.numel() == 0:
                return d
            a = self._centred_rows(st["a_l"][i], st["a_s"][i], cols)
            s = a.T @ a / self.gamma
            dk = self._psd_solve(s, -pg[cols])
            # A limit entering the working set must move into its orthant; drop those that do
            # not and re-solve, so that small steps stay inside the orthant (a descent path).
            wrong = (lam[cols] == 0) & (dk * sigma[cols] <= 0)
            if not bool(wrong.any()):
                d[cols] = dk
                return d
            work[cols[wrong]] = False
        return d

    # ---- solve ------------------------------------------------------------------------------

    def _lipschitz_constant(self) -> float:
        if self._lipschitz is None:
            norm = (
                torch.linalg.matrix_norm(self.E, ord=2)
                if self.E.shape[1]
                else self.E.new_tensor(0.0)
            )
            self._lipschitz = 2.0 * float(norm) ** 2 / self.gamma + 1e-300
        return self._lipschitz

    def solve(
        self,
        x: torch.Tensor,
        lam0: torch.Tensor | None = None,
        max_iter: int | None = None,
    ) -> DualBatch:
        """Solve for every row of x (B, n); lam0 (B, k) or (k,) warm start (default 0)."""
        max_iter = self.max_iter if max_iter is None else max_iter
        x = torch.as_tensor(x, dtype=torch.float64, device=self.device)
        b, k = x.shape[0], self.e.shape[0]
        lam = (
            x.new_zeros((b, k))
            if lam0 is None
            else torch.as_tensor(lam0, dtype=torch.float64, device=self.device).expand(b, k).clone()
        )
        iterations = torch.zeros(b, dtype=torch.int64)
        if not self.feasible:
            st = self._evaluate(x, lam)
            return self._batch(x, st, iterations, [INFEASIBLE] * b)
        st = self._evaluate(x, lam)
        active = torch.nonzero(st["kkt"] > self.kkt_tol).flatten().cpu()
        for _ in range(max_iter):
            if active.numel() == 0:
                break
            sub = {key: val[active.to(self.device)] for key, val in st.items()}
            xa = x[active.to(self.device)]
            d = torch.stack([self._newton_direction(sub, j) for j in range(active.numel())])
            new = self._line_search(xa, sub, d)
            idx = active.to(self.device)
            for key in st:
                st[key][idx] = new[key]
            iterations[active] += 1
            active = active[(new["kkt"] > self.kkt_tol).cpu()]
        status = [OPTIMAL] * b
        bad = ~torch.isfinite(st["kkt"]) | ~torch.isfinite(st["long"]).all(dim=1)
        for j in range(b):
            if bool(bad[j]):
                status[j] = NOT_FINITE
            elif float(st["kkt"][j]) > self.kkt_tol:
                status[j] = MAX_ITERATIONS
        return self._batch(x, st, iterations, status)

    def _line_search(
        self, x: torch.Tensor, st: dict[str, torch.Tensor], d: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Armijo backtracking along the orthant-projected Newton path; prox-gradient fallback."""
        lam, pg, value = st["lam"], st["pg"], st["value"]
        sigma = torch.where(lam != 0, torch.sign(lam), -torch.sign(pg))
        alpha = torch.ones_like(value)
        result = {key: val.clone() for key, val in st.items()}
        pending = torch.ones_like(value, dtype=torch.bool)
        slack = 1e-12 * value.abs().clamp_min(1.0)
        for _ in range(40):
            idx = torch.nonzero(pending).flatten()
            if idx.numel() == 0:
                break
            trial = lam[idx] + alpha[idx, None] * d[idx]
            trial = torch.where(torch.sign(trial) * sigma[idx] < 0, 0.0, trial)
            new = self._evaluate(x[idx], trial)
            decrease = (pg[idx] * (trial - lam[idx])).sum(dim=1)
            ok = new["value"] <= value[idx] + 1e-4 * decrease + slack[idx]
            ok &= torch.isfinite(new["value"])
            acc = idx[ok]
            for key in result:
                result[key][acc] = new[key][ok]
            pending[acc] = False
            alpha[idx[~ok]] *= 0.5
        idx = torch.nonzero(pending).flatten()
        if idx.numel():  # proximal gradient step: always a descent step for convex G~
            step = 1.0 / self._lipschitz_constant()
            z = lam[idx] - step * st["g"][idx]
            trial = torch.sign(z) * (z.abs() - step * self.e).clamp_min(0.0)
            new = self._evaluate(x[idx], trial)
            for key in result:
                result[key][idx] = new[key]
        return result

    def _batch(
        self, x: torch.Tensor, st: dict[str, torch.Tensor], it: torch.Tensor, status: list[str]
    ) -> DualBatch:
        return DualBatch(
            x=x,
            lam=st["lam"],
            nu_l=st["nu_l"],
            nu_s=st["nu_s"],
            long=st["long"],
            short=st["short"],
            a_long=st["a_l"],
            a_short=st["a_s"],
            kkt=st["kkt"],
            dual_value=st["value"],
            iterations=it,
            status=status,
        )

    def solve_or_raise(
        self,
        x: np.ndarray | torch.Tensor,
        *,
        label: str,
        lam0: torch.Tensor | None = None,
        bag_ids: list[int] | None = None,
    ) -> DualBatch:
        """`solve`, then a cold restart with 4x the iterations for rows that failed; raises
        `PortfolioSolveError` naming the round, the bag (bag_ids[row], None: the meta
        portfolio) and the status when a row still fails. No partial result is returned."""
        batch = self.solve(torch.as_tensor(x, dtype=torch.float64, device=self.device), lam0)
        failed = [i for i, s in enumerate(batch.status) if s != OPTIMAL]
        if failed:
            idx = torch.tensor(failed, device=self.device)
            retry = self.solve(batch.x[idx], None, max_iter=4 * self.max_iter)
            for j, i in enumerate(failed):
                if retry.status[j] != OPTIMAL:
                    bag = None if bag_ids is None else bag_ids[i]
                    raise PortfolioSolveError(
                        label, bag, retry.status[j], f"KKT residual {float(retry.kkt[j]):.3g}"
                    )
            for name in (
                "lam",
                "nu_l",
                "nu_s",
                "long",
                "short",
                "a_long",
                "a_short",
                "kkt",
                "dual_value",
            ):
                getattr(batch, name)[idx] = getattr(retry, name)
            batch.iterations[torch.tensor(failed)] += retry.iterations
            for i in failed:
                batch.status[i] = OPTIMAL
        return batch

    # ---- derivatives ------------------------------------------------------------------------

    def vjp(self, batch: DualBatch, grad_w: torch.Tensor) -> torch.Tensor:
        """(dw*/dx)^T g for every row: g (B, n) or (n,) the gradient of a loss w.r.t. w.

        dz_F/dc_F = Pi / gamma (Pi the projection off the budget and binding-exposure rows on
        the free positions), w = l - s and c = (x, -x), so (dw/dx)^T g = v_l - v_s with
        v = Pi (g_F on free longs, -g_F on free shorts) / gamma.
        """
        b, n = batch.x.shape
        g = torch.as_tensor(grad_w, dtype=torch.float64, device=self.device).expand(b, n)
        out = torch.zeros((b, n), dtype=torch.float64, device=self.device)
        gu = self.gu
        for i in range(b):
            fl = (batch.a_long[i] > 0) & (batch.a_long[i] < gu)
            fs = (batch.a_short[i] > 0) & (batch.a_short[i] < gu)
            gl, gs = g[i][fl], -g[i][fs]
            rhs = torch.cat(
                [gl - gl.mean() if gl.numel() else gl, gs - gs.mean() if gs.numel() else gs]
            )
            cols = torch.nonzero(batch.lam[i]).flatten()
            if cols.numel():
                a = self._centred_rows(batch.a_long[i], batch.a_short[i], cols)
                mu = self._psd_solve(a.T @ a, a.T @ rhs)
                rhs = rhs - a @ mu
            v = rhs / self.gamma
            nl = int(fl.sum())
            out[i, fl] += v[:nl]
            out[i, fs] -= v[nl:]
        return out

    def jacobian_trace(self, batch: DualBatch, i: int = 0) -> float:
        """tr(dw*/dx) at row i: the optimizer's total gain from signal to weights.

        = (|F| - #non-empty free sides - rank A_K + 2 sum_{both sides free} a_l' S^+ a_s) / gamma,
        the last term only for stocks held long and short at once (never when the split is exact).
        """
        gu = self.gu
        fl = (batch.a_long[i] > 0) & (batch.a_long[i] < gu)
        fs = (batch.a_short[i] > 0) & (batch.a_short[i] < gu)
        nl, ns = int(fl.sum()), int(fs.sum())
        trace = float(nl + ns - (nl > 0) - (ns > 0))
        cols = torch.nonzero(batch.lam[i]).flatten()
        if cols.numel() and nl + ns:
            a = self._centred_rows(batch.a_long[i], batch.a_short[i], cols)
            s = a.T @ a
            vals = torch.linalg.eigvalsh(s)
            rank = int((vals > vals.abs().max().clamp_min(1e-300) * s.shape[0] * 1e-13).sum())
            trace -= rank
            both = fl & fs
            if bool(both.any()):
                pos_l = torch.cumsum(fl.long(), 0)[both] - 1
                pos_s = nl + torch.cumsum(fs.long(), 0)[both] - 1
                al, as_ = a[pos_l], a[pos_s]
                trace += 2.0 * float((al * self._psd_solve(s, as_.T).T).sum())
        return max(trace, 0.0) / self.gamma


__all__ = ["DualBatch", "DualNewtonSolver", "resolve_device"]
