"""The round's Neutralizer (what the metrics run) against ``numerai_tools.scoring.neutralize``,
column by column."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from numerai_tools import scoring as ns
from threadpoolctl import threadpool_limits

from tc_assets.scoring.neutralize import FeatureSpan, Neutralizer, design_matrix, group_rows_by_mask
from tc_assets.scoring.transforms import gaussian_rank

TOL = 1e-12


def make_round(
    n: int = 500, k: int = 15, m: int = 9, seed: int = 0
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Gaussianized predictions (with ties, partial coverage, a constant and a duplicate model)
    and integer features 0..4."""
    rng = np.random.default_rng(seed)
    ids = pd.Index([f"id{i:05d}" for i in range(n)])
    features = pd.DataFrame(
        rng.integers(0, 5, (n, k)).astype(float), index=ids, columns=[f"f{i}" for i in range(k)]
    )
    raw = np.round(rng.random((n, m)), 2)
    raw[:, 0] = np.round(features.iloc[:, :3].sum(axis=1) / 12 + 0.1 * rng.random(n), 3)
    raw[rng.random(n) < 0.1, 3] = np.nan  # partial coverage, two different masks
    raw[rng.random(n) < 0.15, 4] = np.nan
    raw[:, 5] = raw[:, 4]  # same mask as model 4
    raw[:, 6] = 0.5  # constant
    preds = pd.DataFrame(gaussian_rank(raw), index=ids, columns=[f"m{j}" for j in range(m)])
    return preds, features


def neutralize(
    preds: pd.DataFrame, features: pd.DataFrame, proportion: float = 1.0
) -> pd.DataFrame:
    """Every model (column) of `preds` neutralized by one Neutralizer of the round."""
    with threadpool_limits(limits=1, user_api="blas"):
        rows = Neutralizer(features.to_numpy()).residual_rows(preds.to_numpy().T, proportion)
    return pd.DataFrame(rows.T, index=preds.index, columns=preds.columns)


def numerai_columns(
    preds: pd.DataFrame, features: pd.DataFrame, proportion: float
) -> dict[str, pd.Series]:
    """numerai-tools neutralize on each column's own (non-NaN) ids."""
    out = {}
    with threadpool_limits(limits=1, user_api="blas"):
        for c in preds.columns:
            s = preds[c].dropna()
            out[c] = ns.neutralize(s.to_frame(), features.loc[s.index], proportion).iloc[:, 0]
    return out


def assert_matches_numerai(
    got: pd.DataFrame, preds: pd.DataFrame, features: pd.DataFrame, proportion: float = 1.0
) -> None:
    for c, ref in numerai_columns(preds, features, proportion).items():
        mine = got[c]
        assert mine[preds[c].isna()].isna().all(), c  # ids not submitted stay NaN
        mine = mine[preds[c].notna()]
        assert (mine.isna() == ref.isna()).all(), c
        if ref.notna().any():
            assert np.max(np.abs(mine - ref)) <= TOL, c


@pytest.mark.parametrize("proportion", [1.0, 0.5, 0.0])
def test_matches_numerai_per_model_with_partial_coverage(proportion: float) -> None:
    preds, features = make_round()
    got = neutralize(preds, features, proportion)
    assert got.index.equals(preds.index) and got.columns.equals(preds.columns)
    assert_matches_numerai(got, preds, features, proportion)


def test_constant_column_is_nan() -> None:
    preds, features = make_round()
    got = neutralize(preds, features)
    assert got["m6"].isna().all()
    assert got.drop(columns="m6").notna().sum().min() > 0


def test_rank_deficient_features_follow_lstsq_rcond() -> None:
    preds, features = make_round(seed=1)
    features["dup"] = features["f0"]
    features["lin"] = 2 * features["f1"] - features["f2"] + 1  # in span of [f, 1]
    span = FeatureSpan.fit(design_matrix(features.to_numpy()))
    assert not span.full_rank and span.basis.shape[1] == features.shape[1] + 1 - 2
    assert_matches_numerai(neutralize(preds, features), preds, features)


def test_partial_mask_uses_cholesky_path_when_well_conditioned() -> None:
    preds, features = make_round(seed=2)
    span = FeatureSpan.fit(design_matrix(features.to_numpy()))
    rows = np.flatnonzero(preds["m3"].notna().to_numpy())
    sub = span.restrict(rows)
    assert sub.chol is not None  # restricted from the round's SVD, no new factorization
    y = preds["m3"].dropna().to_numpy()[:, None]
    with threadpool_limits(limits=1, user_api="blas"):
        a = design_matrix(features.to_numpy()[rows])
        expected = a @ np.linalg.lstsq(a, y, rcond=1e-6)[0]
    assert np.max(np.abs(sub.project(y) - expected)) <= TOL


def test_partial_mask_that_makes_features_collinear_falls_back_to_svd() -> None:
    """f0 varies only on the ids model m3 skipped: on m3's ids it is constant, so [f, 1] loses
    rank there, and lstsq's cutoff must apply to that subset."""
    preds, features = make_round(seed=3)
    skipped = preds["m3"].isna().to_numpy()
    features.loc[~skipped, "f0"] = 2.0
    features.loc[skipped, "f0"] = np.where(np.arange(skipped.sum()) % 2, 0.0, 4.0)
    span = FeatureSpan.fit(design_matrix(features.to_numpy()))
    assert span.full_rank
    sub = span.restrict(np.flatnonzero(~skipped))
    assert sub.chol is None and not sub.full_rank
    assert_matches_numerai(neutralize(preds, features), preds, features)


def test_identical_ids_get_identical_values_as_numerai() -> None:
    """Same features and prediction -> bitwise equal neutral values (numerai's A @ coef)."""
    preds, features = make_round(n=600, seed=4)
    preds.iloc[300:400] = preds.iloc[0:100].to_numpy()
    features.iloc[300:400] = features.iloc[0:100].to_numpy()
    got = neutralize(preds, features)
    for c in ("m1", "m2", "m7"):
        assert np.array_equal(got[c].iloc[300:400].to_numpy(), got[c].iloc[0:100].to_numpy())


def test_row_layouts_agree() -> None:
    preds, features = make_round(seed=5)
    y = preds.to_numpy().T
    neutralizer = Neutralizer(features.to_numpy())
    a = neutralizer.residual_rows(np.ascontiguousarray(y))
    b = neutralizer.residual_rows(np.asfortranarray(y))
    assert np.array_equal(np.isnan(a), np.isnan(b))
    assert np.nanmax(np.abs(a - b)) <= TOL


def test_group_rows_by_mask() -> None:
    mask = np.ones((5, 6), dtype=bool)
    mask[1, [0, 2]] = False
    mask[3, [0, 2]] = False
    mask[4, 5] = False
    assert [list(g) for g in group_rows_by_mask(mask)] == [[0, 2], [1, 3], [4]]


def test_bad_shapes_raise() -> None:
    preds, features = make_round(n=60, k=3)
    neutralizer = Neutralizer(features.to_numpy())
    with pytest.raises(ValueError, match="shape"):
        neutralizer.residual_rows(preds.to_numpy())  # ids x models, not models x ids
    with pytest.raises(ValueError, match="2-d"):
        Neutralizer(features["f0"].to_numpy())
