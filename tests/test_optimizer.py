"""The meta portfolio optimizer: one spec, two solvers (cvxpy/Clarabel and the dual Newton
solver) that must agree; its derivatives against finite differences; its checks and errors."""

from __future__ import annotations

import json
from pathlib import Path

import cvxpy as cp
import numpy as np
import pandas as pd
import pytest
import torch

from tc_assets.io.synthetic import SyntheticSettings, generate_source
from tc_assets.scoring._tc_dual import DualNewtonSolver
from tc_assets.scoring.meta_model import prediction_matrix, stake_weighted_meta_model
from tc_assets.scoring.optimizer import (
    OptimizerSettings,
    PortfolioSolveError,
    PortfolioSpec,
    build_cvxpy_problem,
    build_spec,
    check_constraints,
    solve_portfolio,
)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """The solver's tensors are small: one thread is fastest, especially on a busy CI box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def random_problem(
    seed: int, n: int = 300, k: int = 12, gamma: float = 5.0, with_adv: bool = True
) -> tuple[np.ndarray, PortfolioSpec]:
    """A signal partly explained by the features (so exposure limits bind) and a spec."""
    rng = np.random.default_rng(seed)
    features = rng.integers(0, 5, (n, k)).astype(float)
    adv = np.exp(rng.normal(np.log(2e7), 1.5, n)) if with_adv else None
    settings = OptimizerSettings(gamma=gamma, max_position=0.02, exposure_limit=0.1)
    spec = build_spec(features, adv, settings)
    x = spec.exposures[:, :3] @ np.array([0.2, -0.12, 0.08]) + 0.5 * rng.standard_normal(n)
    return x, spec


def clarabel_weights(x: np.ndarray, spec: PortfolioSpec) -> tuple[np.ndarray, float]:
    prob = build_cvxpy_problem(spec)
    prob.signal.value = x
    prob.problem.solve(solver=cp.CLARABEL, tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12)
    assert prob.problem.status == cp.OPTIMAL
    return prob.long.value - prob.short.value, float(prob.problem.value)


def test_spec_standardizes_features_and_combines_caps() -> None:
    rng = np.random.default_rng(0)
    features = rng.integers(0, 5, (200, 5)).astype(float)
    features[:, 2] = 3.0  # constant: carries no exposure, dropped
    adv = np.full(200, 5e7)
    adv[:10] = 1e6  # 0.1 * 1e6 / 1e8 = 0.001 < max_position
    adv[10] = np.nan  # unknown liquidity: not held
    spec = build_spec(features, adv, OptimizerSettings(max_position=0.01))
    assert spec.n_exposures == 4
    np.testing.assert_allclose(spec.exposures.mean(axis=0), 0.0, atol=1e-12)
    np.testing.assert_allclose(spec.exposures.std(axis=0), 1.0, rtol=1e-12)
    f3 = features[:, 3]
    np.testing.assert_allclose(spec.exposures[:, 2], (f3 - f3.mean()) / f3.std())
    np.testing.assert_allclose(spec.caps[:10], 0.001)
    assert spec.caps[10] == 0.0
    np.testing.assert_allclose(spec.caps[11:], 0.01)
    np.testing.assert_allclose(spec.limits, 0.1)
    assert np.all(build_spec(features, None).caps == OptimizerSettings().max_position)
    with pytest.raises(ValueError, match="adv_usd must be > 0"):
        build_spec(features, np.zeros(200))


def test_cvxpy_problem_is_dpp_in_the_signal() -> None:
    _, spec = random_problem(0, n=50, k=4)
    prob = build_cvxpy_problem(spec)
    assert prob.problem.is_dpp()
    assert prob.problem.parameters() == [prob.signal]


@pytest.mark.parametrize(
    ("seed", "gamma", "with_adv"), [(1, 1.0, True), (2, 5.0, False), (3, 20.0, True)]
)
def test_dual_newton_matches_clarabel(seed: int, gamma: float, with_adv: bool) -> None:
    x, spec = random_problem(seed, gamma=gamma, with_adv=with_adv)
    sol = solve_portfolio(x, spec, label="7")
    w_ref, obj_ref = clarabel_weights(x, spec)
    assert sol.status == "optimal"
    np.testing.assert_allclose(sol.weights, w_ref, atol=1e-7)
    assert sol.objective == pytest.approx(obj_ref, rel=1e-9)
    assert sol.kkt_residual <= 1e-10
    assert check_constraints(sol.weights, spec, tol=1e-10) == []
    # The defaults of this fixture make every kind of constraint bind.
    assert sol.active_caps > 0
    assert sol.active_exposures > 0
    assert sol.free_positions > 0
    assert sol.long_short_overlap == 0.0
    assert np.isclose(sol.long.sum(), 1.0, atol=1e-12)
    assert np.isclose(sol.short.sum(), 1.0, atol=1e-12)


def test_batched_solves_equal_single_solves() -> None:
    x, spec = random_problem(4)
    rng = np.random.default_rng(4)
    xs = x[None, :] + 0.3 * rng.standard_normal((5, x.size))
    solver = DualNewtonSolver(spec, device="cpu")
    batch = solver.solve_or_raise(xs, label="1")
    for i in range(5):
        single = solve_portfolio(xs[i], spec)
        np.testing.assert_allclose(batch.weights[i].numpy(), single.weights, atol=1e-12)


def test_vjp_matches_central_differences() -> None:
    x, spec = random_problem(5, gamma=3.0)
    rng = np.random.default_rng(5)
    t = rng.standard_normal(x.size)
    solver = DualNewtonSolver(spec, device="cpu")
    at = solver.solve_or_raise(x[None, :], label="fd")
    v = solver.vjp(at, torch.as_tensor(t))[0].numpy()
    h = 1e-6
    for _ in range(4):
        d = rng.standard_normal(x.size)
        plus = solver.solve_or_raise((x + h * d)[None, :], label="fd", lam0=at.lam)
        minus = solver.solve_or_raise((x - h * d)[None, :], label="fd", lam0=at.lam)
        fd = float((plus.weights - minus.weights)[0].numpy() @ t) / (2 * h)
        assert v @ d == pytest.approx(fd, rel=1e-6, abs=1e-8)


def test_jacobian_trace_matches_finite_differences() -> None:
    x, spec = random_problem(6, n=80, k=5, gamma=2.0, with_adv=False)
    solver = DualNewtonSolver(spec, device="cpu")
    at = solver.solve_or_raise(x[None, :], label="tr")
    h = 1e-6
    bumps = np.eye(x.size) * h
    plus = solver.solve_or_raise(x[None, :] + bumps, label="tr", lam0=at.lam).weights.numpy()
    minus = solver.solve_or_raise(x[None, :] - bumps, label="tr", lam0=at.lam).weights.numpy()
    jac = (plus - minus).T / (2 * h)  # column i: dw/dx_i
    assert solver.jacobian_trace(at) == pytest.approx(np.trace(jac), rel=1e-6)
    np.testing.assert_allclose(jac, jac.T, atol=1e-6)  # the gradient of a convex value


def test_check_constraints_names_each_violation() -> None:
    _, spec = random_problem(7, n=100, k=4, with_adv=False)
    w = np.zeros(100)
    w[:50], w[50:] = 1 / 50, -1 / 50
    assert {v.constraint for v in check_constraints(w, spec, tol=1e-9)} <= {"exposure"}
    bad = w.copy()
    bad[0] = 0.5  # too large and longs no longer sum to 1
    names = {v.constraint: v for v in check_constraints(bad, spec, tol=1e-9)}
    assert names["position_cap"].index == 0
    assert names["position_cap"].amount == pytest.approx(0.5 - 0.02)
    assert names["long_sum"].amount == pytest.approx(0.5 - 1 / 50)
    assert "short_sum" not in names
    assert check_constraints(np.full(100, np.nan), spec)[0].constraint == "finite"


def test_infeasible_spec_fails_naming_round_and_status() -> None:
    x, spec = random_problem(8, n=40, k=3, with_adv=False)
    tight = PortfolioSpec(spec.gamma, np.full(40, 0.02), spec.exposures, spec.limits)  # sum 0.8
    with pytest.raises(PortfolioSolveError, match=r"round 301, meta portfolio.*'infeasible'") as e:
        solve_portfolio(x, tight, label="301")
    assert (e.value.label, e.value.bag, e.value.status) == ("301", None, "infeasible")


def test_non_convergence_is_retried_then_names_the_bag() -> None:
    x, spec = random_problem(12, n=200, gamma=3.0)
    rng = np.random.default_rng(12)
    xs = x[None, :] + 0.5 * rng.standard_normal((2, x.size))
    needed = int(DualNewtonSolver(spec, device="cpu").solve(xs).iterations.max())
    assert needed > 4  # a cold start needs more than the starved retry's 4 x 1 iterations
    starved = DualNewtonSolver(spec, device="cpu", max_iter=1)
    with pytest.raises(PortfolioSolveError, match=r"round 12, bag 1\d: .*'max_iterations'") as e:
        starved.solve_or_raise(xs, label="12", bag_ids=[10, 11])
    assert e.value.bag in (10, 11) and e.value.status == "max_iterations"
    # Too few iterations for the first attempt, enough for the retry (4 x max_iter): exact.
    patient = DualNewtonSolver(spec, device="cpu", max_iter=needed // 4 + 2)
    assert patient.solve(xs).status != ["optimal"] * 2
    batch = patient.solve_or_raise(xs, label="12")
    assert batch.status == ["optimal"] * 2 and float(batch.kkt.max()) <= 1e-10


@pytest.fixture(scope="module")
def generated_round(tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    """Round 1 of the generator's default size; read with pandas (ingestion stands in)."""
    root = tmp_path_factory.mktemp("opt_source")
    generate_source(root, [1], SyntheticSettings())
    d = Path(root) / "rounds" / "1"
    medium = json.loads((Path(root) / "features.json").read_text())["feature_sets"]["medium"]
    live = pd.read_parquet(d / "live.parquet").set_index("id")
    stakes = pd.read_csv(d / "stakes.csv").set_index("model_id")["stake"]
    files = sorted((d / "predictions").glob("*.csv"))
    raw = pd.DataFrame(
        {f.stem: pd.read_csv(f).set_index("id")["prediction"] for f in files}
    ).reindex(live.index)
    p = prediction_matrix(raw.to_numpy())
    adv = pd.read_parquet(d / "market.parquet").set_index("id")["adv_usd"].reindex(live.index)
    return {
        "x": stake_weighted_meta_model(p, stakes.reindex(raw.columns).to_numpy(float)),
        "features": live[medium].to_numpy(float),
        "adv": adv.to_numpy(),
    }


def test_default_settings_bind_caps_and_exposures_on_generated_data(
    generated_round: dict[str, np.ndarray],
) -> None:
    spec = build_spec(generated_round["features"], generated_round["adv"])
    sol = solve_portfolio(generated_round["x"], spec, label="1")
    settings = OptimizerSettings()
    at_max = np.sum(np.isclose(np.abs(sol.weights), settings.max_position, rtol=0, atol=1e-15))
    liquidity = (spec.caps < settings.max_position) & (np.abs(sol.weights) >= spec.caps)
    print(
        f"default optimizer on generated round 1: {sol.active_caps} positions at a cap "
        f"({at_max} at max_position, {int(liquidity.sum())} at their liquidity cap), "
        f"{sol.active_exposures}/{spec.n_exposures} exposure limits binding, "
        f"{sol.free_positions} free, {sol.held_long} long / {sol.held_short} short, "
        f"{sol.iterations} Newton iterations"
    )
    assert sol.status == "optimal" and sol.kkt_residual <= 1e-10
    assert at_max > 0 and liquidity.sum() > 0
    assert sol.active_exposures > 0
    assert sol.free_positions > 100
    assert sol.long_short_overlap == 0.0  # the l/s split is exact at the defaults
    assert check_constraints(sol.weights, spec, tol=1e-10) == []
