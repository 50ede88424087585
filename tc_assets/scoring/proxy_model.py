"""The TC proxy model: which familiar per-round metrics explain True Contribution.

An Explainable Boosting Machine (interpret's ``ExplainableBoostingRegressor``: a generalized
additive model whose terms are boosted shallow trees over binned inputs, bagged) predicts a
model's ``tc`` in a round from its metrics of the same round, pooled over a window of resolved
rounds::

    tc ~ b + f(corr) + f(mmc) + f(fnc_v3) + f(fnc_v3_tb200) + f(exposure_dissimilarity)
           + f(max_feature_exposure) + f(fnc_v3_x_exposure_dissimilarity)

The last term is the explicit interaction of the published analysis. By default it is the
product of the two inputs *centred* on their means over the rows the model is fitted on,
``(fnc_v3 - m_f) (exposure_dissimilarity - m_e)``: a pure interaction. The raw product
``fnc_v3 * exposure_dissimilarity`` is nearly a copy of ``fnc_v3`` (dissimilarity is close
to 1 for most models; correlation ~0.95 on generated data), and boosting splits one effect
evenly between two collinear terms, so ``fnc_v3``'s importance would be halved between them.

What is reported, per term:

* importance: mean |f(x)| over the rows the model was fitted on (interpret's ``avg_weight``),
  in TC units, and its share of the sum over terms;
* shape function: f on each bin of the term's input (edges, midpoint ``x``, rows in the bin);
* monotonicity: Spearman correlation between the input and f(input) over those rows, i.e. of
  the shape function against its input with bins weighted by their rows: +1 increasing,
  -1 decreasing, near 0 not monotone. A good proxy is important and monotonic.

And for the model: held-out R^2, ``1 - SSE / SST`` (SST about the held-out mean; 0 is no
better than a constant, negative worse) of a model fitted on the window's earlier rounds and
evaluated on its last ``held_out_rounds``. The importances and shapes come from a refit on
every round of the window (``refit_on_window``), with the same settings.

The window is the last ``window_rounds`` rounds up to ``window_end`` with at least one
complete row (finite tc and metrics; rows with a missing value are dropped and counted).
Fewer than ``min_rounds`` such rounds raise ``InsufficientRoundsError``. Results are identical
for a fixed ``seed`` (the EBM's ``random_state``; ``n_jobs`` changes speed, not results).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, model_validator

from tc_assets.scoring.metrics import MODEL_METRICS

if TYPE_CHECKING:  # interpret (and scikit-learn) load with the first fit, not the definitions
    from interpret.glassbox import ExplainableBoostingRegressor

__all__ = [
    "INPUT_COLUMNS",
    "INTERACTION_TERM",
    "METRIC_TERMS",
    "TERMS",
    "InsufficientRoundsError",
    "ProxyResult",
    "ProxySettings",
    "fit_tc_proxy",
    "proxy_terms",
    "select_window",
]

METRIC_TERMS: tuple[str, ...] = MODEL_METRICS
"""The per-round metrics the proxy reads (``model_metrics`` columns, contract order)."""
INTERACTION_TERM = "fnc_v3_x_exposure_dissimilarity"
TERMS: tuple[str, ...] = (*METRIC_TERMS, INTERACTION_TERM)
"""The model's main terms, in fitting order."""
INPUT_COLUMNS: tuple[str, ...] = ("round", "model_id", "tc", *METRIC_TERMS)
"""Columns of the long input frame: one row per (round, model)."""


class InsufficientRoundsError(ValueError):
    """Fewer usable rounds than the proxy needs; the message names what was found."""


class ProxySettings(BaseModel):
    """Window, evaluation split and EBM parameters of the TC proxy model.

    EBM defaults are interpret 0.7's except ``outer_bags`` (8, not 14: 45% less time,
    importances within 1% of 14 bags' on generated data), ``interactions`` (0: the
    interaction the analysis reads is an explicit term) and ``n_jobs`` (1: no worker
    processes for a fit of seconds).
    """

    model_config = ConfigDict(frozen=True)

    window_rounds: int = Field(
        default=20, ge=2, description="Rounds in the window: the last ones up to its end."
    )
    held_out_rounds: int = Field(
        default=4,
        ge=1,
        description="Last rounds of the window held out to measure R^2 of a model fitted on "
        "the earlier ones.",
    )
    min_rounds: int = Field(
        default=8,
        ge=3,
        description="Fewest usable rounds to fit at all (must leave >= 2 training rounds "
        "after the held-out ones); fewer raise InsufficientRoundsError.",
    )
    refit_on_window: bool = Field(
        default=True,
        description="Importances and shapes from a refit on every round of the window "
        "(False: from the model fitted on the earlier rounds, half the time).",
    )
    center_interaction: bool = Field(
        default=True,
        description="Interaction term = (fnc_v3 - mean)(exposure_dissimilarity - mean), means "
        "over the fitted rows: a pure interaction that does not split fnc_v3's importance "
        "with a near copy of it. False: the raw product.",
    )
    seed: int = Field(default=0, ge=0, description="The EBM's random_state.")
    interactions: int = Field(
        default=0,
        ge=0,
        description="Automatic pairwise terms the EBM may add (reported with importance, no "
        "monotonicity or shape). 0: main terms only; on generated data 3 pairs took 3.5x the "
        "time and did not raise held-out R^2.",
    )
    outer_bags: int = Field(
        default=8, ge=1, description="Bagged models averaged into each term (interpret: 14)."
    )
    learning_rate: float = Field(default=0.04, gt=0, description="Boosting step size.")
    max_bins: int = Field(default=1024, ge=3, description="Most bins per input.")
    max_rounds: int = Field(default=50_000, ge=1, description="Most boosting rounds per bag.")
    early_stopping_rounds: int = Field(
        default=100,
        ge=0,
        description="Stop a bag after this many rounds without improvement on its validation "
        "rows (0: never).",
    )
    smoothing_rounds: int = Field(
        default=500,
        ge=0,
        description="Initial rounds that split at random: smoother shape functions.",
    )
    min_samples_leaf: int = Field(default=4, ge=1, description="Fewest rows in a tree leaf.")
    validation_size: float = Field(
        default=0.15,
        ge=0.0,
        lt=1.0,
        description="Share of the training rows each bag holds out for early stopping.",
    )
    n_jobs: int = Field(
        default=1,
        description="Processes for the bags (joblib; -1 all cores). Results do not depend on it.",
    )

    @model_validator(mode="after")
    def _check(self) -> ProxySettings:
        if self.min_rounds < self.held_out_rounds + 2:
            raise ValueError(
                f"min_rounds ({self.min_rounds}) must be >= held_out_rounds + 2 "
                f"({self.held_out_rounds + 2}): at least 2 rounds to train on"
            )
        if self.window_rounds < self.min_rounds:
            raise ValueError(
                f"window_rounds ({self.window_rounds}) must be >= min_rounds ({self.min_rounds})"
            )
        return self

    def regressor(self) -> ExplainableBoostingRegressor:
        """An unfitted EBM with these parameters."""
        from interpret.glassbox import ExplainableBoostingRegressor

        return ExplainableBoostingRegressor(
            interactions=self.interactions,
            outer_bags=self.outer_bags,
            learning_rate=self.learning_rate,
            max_bins=self.max_bins,
            max_rounds=self.max_rounds,
            early_stopping_rounds=self.early_stopping_rounds,
            smoothing_rounds=self.smoothing_rounds,
            min_samples_leaf=self.min_samples_leaf,
            validation_size=self.validation_size,
            n_jobs=self.n_jobs,
            random_state=self.seed,
        )


@dataclass(frozen=True)
class ProxyResult:
    """A fitted TC proxy over one window.

    Attributes:
        window_end: the window's last round.
        rounds: the window's rounds, ascending; train_rounds / held_out_rounds split them.
        rows: complete rows in the window; rows_dropped: rows with a missing tc or metric.
        models: distinct model ids among the rows.
        importance: one row per term (index ``term``), by importance descending: importance,
            share, monotonicity (NaN for pair terms and terms that contribute nothing), kind
            ('main' or 'pair').
        shapes: main terms' shape functions, long: term, bin, lower, upper, x (midpoint),
            contribution, weight (fitted rows in the bin).
        held_out_r2: R^2 on the held-out rounds of the model fitted on the earlier ones;
            held_out_corr: Pearson correlation of its predictions with tc there.
        fit_r2: in-sample R^2 of the explained model.
        interaction_center: (m_f, m_e) subtracted from fnc_v3 and exposure_dissimilarity in
            the explained model's interaction term ((0, 0) when not centred).
        intercept: the explained model's constant b.
        held_out: the held-out rows: round, model_id, tc, predicted.
        settings: the settings used.
    """

    window_end: int
    rounds: tuple[int, ...]
    train_rounds: tuple[int, ...]
    held_out_rounds: tuple[int, ...]
    rows: int
    rows_dropped: int
    models: int
    importance: pd.DataFrame
    shapes: pd.DataFrame
    held_out_r2: float
    held_out_corr: float
    fit_r2: float
    interaction_center: tuple[float, float]
    intercept: float
    held_out: pd.DataFrame
    settings: ProxySettings

    def top_terms(self, k: int) -> list[str]:
        """The k most important main terms (the ones with a shape function)."""
        main = self.importance[self.importance["kind"] == "main"]
        return list(main.index[:k])


# --- inputs ---------------------------------------------------------------------------------


def _complete(frame: pd.DataFrame) -> pd.DataFrame:
    """Checked copy of the input with only rows whose tc and metrics are all finite."""
    if not isinstance(frame, pd.DataFrame):
        raise TypeError(f"the proxy's input must be a DataFrame, got {type(frame).__name__}")
    missing = [c for c in INPUT_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"the proxy's input lacks columns {missing}")
    data = frame[list(INPUT_COLUMNS)].copy()
    values = ["tc", *METRIC_TERMS]
    try:
        data[values] = data[values].astype(np.float64)
        data["round"] = data["round"].astype(np.int64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"round, tc and the metrics must be numeric: {exc}") from None
    if data.duplicated(["round", "model_id"]).any():
        dup = data.loc[data.duplicated(["round", "model_id"]), ["round", "model_id"]].iloc[0]
        raise ValueError(f"duplicate row for round {dup['round']}, model {dup['model_id']}")
    ok = np.isfinite(data[values].to_numpy()).all(axis=1)
    return data[ok]


def select_window(
    frame: pd.DataFrame, settings: ProxySettings, window_end: int | None = None
) -> tuple[pd.DataFrame, int]:
    """The window's complete rows (sorted by round, model_id) and the rows dropped from it.

    The window is the last ``window_rounds`` rounds <= ``window_end`` (default: the latest)
    having a complete row. Raises InsufficientRoundsError with fewer than ``min_rounds``, or
    when ``window_end`` itself has no complete row.
    """
    data = _complete(frame)
    all_rounds = pd.to_numeric(frame["round"], errors="coerce")
    usable = np.unique(data["round"].to_numpy())
    end = int(usable.max()) if window_end is None and usable.size else window_end
    if end is not None and end not in usable:
        raise InsufficientRoundsError(
            f"round {end} has no model with tc and every metric, so no window can end there "
            f"(rounds with complete rows: {_span(usable)})"
        )
    up_to = usable[usable <= end] if end is not None else usable
    if up_to.size < settings.min_rounds:
        where = "in the input" if end is None else f"up to round {end}"
        raise InsufficientRoundsError(
            f"the TC proxy needs >= {settings.min_rounds} resolved rounds with tc and every "
            f"metric {where}, found {up_to.size} ({_span(up_to)}); wait for more rounds to "
            "resolve or lower min_rounds"
        )
    rounds = up_to[-settings.window_rounds :]
    window = data[data["round"].isin(rounds)].sort_values(["round", "model_id"])
    in_rounds = all_rounds.between(rounds[0], rounds[-1]).sum()
    return window.reset_index(drop=True), int(in_rounds - len(window))


def _span(rounds: np.ndarray) -> str:
    if rounds.size == 0:
        return "none"
    if rounds.size <= 6:
        return ", ".join(str(int(r)) for r in rounds)
    return f"{int(rounds[0])}..{int(rounds[-1])}"


def proxy_terms(frame: pd.DataFrame, center: tuple[float, float] = (0.0, 0.0)) -> pd.DataFrame:
    """The EBM's inputs: the metric columns and the interaction term, in ``TERMS`` order.

    ``center`` = (m_f, m_e): the term is (fnc_v3 - m_f) * (exposure_dissimilarity - m_e).
    """
    x = frame[list(METRIC_TERMS)].astype(np.float64).reset_index(drop=True)
    x[INTERACTION_TERM] = (x["fnc_v3"] - center[0]) * (x["exposure_dissimilarity"] - center[1])
    return x


# --- fitting --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Fit:
    model: ExplainableBoostingRegressor
    center: tuple[float, float]


def _fit(rows: pd.DataFrame, settings: ProxySettings) -> _Fit:
    center = (
        (float(rows["fnc_v3"].mean()), float(rows["exposure_dissimilarity"].mean()))
        if settings.center_interaction
        else (0.0, 0.0)
    )
    model = settings.regressor()
    model.fit(proxy_terms(rows, center), rows["tc"].to_numpy())
    return _Fit(model, center)


def _predict(fit: _Fit, rows: pd.DataFrame) -> np.ndarray:
    return fit.model.predict(proxy_terms(rows, fit.center))


def _r2(y: np.ndarray, yhat: np.ndarray) -> float:
    sst = float(((y - y.mean()) ** 2).sum())
    return float("nan") if sst == 0 else 1.0 - float(((y - yhat) ** 2).sum()) / sst


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    if a.size < 2 or a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def _monotonicity(x: np.ndarray, contribution: np.ndarray) -> float:
    """Spearman of a term's contribution against its input over the rows (NaN if constant)."""
    if np.ptp(contribution) == 0 or np.ptp(x) == 0:
        return float("nan")
    from scipy.stats import spearmanr

    return float(spearmanr(x, contribution).statistic)


def _explain(fit: _Fit, rows: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(importance table, long shape table) of a fitted model on the rows it was fitted on."""
    ebm = fit.model
    x = proxy_terms(rows, fit.center)
    contributions = ebm.eval_terms(x)  # (rows, terms): each term's f(x), intercept excluded
    importances = ebm.term_importances("avg_weight")
    records, shapes = [], []
    for i, (name, features) in enumerate(zip(ebm.term_names_, ebm.term_features_, strict=True)):
        main = len(features) == 1
        records.append(
            {
                "term": name,
                "importance": float(importances[i]),
                "monotonicity": (
                    _monotonicity(x[name].to_numpy(), contributions[:, i]) if main else math.nan
                ),
                "kind": "main" if main else "pair",
            }
        )
        if main:
            shapes.append(_shape(ebm, i, features[0], name))
    table = pd.DataFrame.from_records(records).set_index("term")
    total = table["importance"].sum()
    table.insert(1, "share", table["importance"] / total if total > 0 else math.nan)
    table = table.sort_values("importance", ascending=False, kind="stable")
    return table, pd.concat(shapes, ignore_index=True)


def _shape(ebm: ExplainableBoostingRegressor, term: int, feature: int, name: str) -> pd.DataFrame:
    """Bins of a main term: edges, midpoint, score, fitted rows. term_scores_[term] holds the
    missing-value bin, one score per bin of the cuts, then the unseen-value bin."""
    cuts = np.asarray(ebm.bins_[feature][0], dtype=np.float64)
    lo, hi = (float(v) for v in ebm.feature_bounds_[feature])
    edges = np.concatenate(([lo], cuts, [hi]))
    scores = np.asarray(ebm.term_scores_[term], dtype=np.float64)[1 : cuts.size + 2]
    weights = np.asarray(ebm.bin_weights_[term], dtype=np.float64)[1 : cuts.size + 2]
    return pd.DataFrame(
        {
            "term": name,
            "bin": np.arange(cuts.size + 1),
            "lower": edges[:-1],
            "upper": edges[1:],
            "x": (edges[:-1] + edges[1:]) / 2,
            "contribution": scores,
            "weight": weights,
        }
    )


def fit_tc_proxy(
    frame: pd.DataFrame, settings: ProxySettings | None = None, window_end: int | None = None
) -> ProxyResult:
    """Fit the TC proxy over the window ending at ``window_end`` (default: the latest round).

    Args:
        frame: long, one row per (round, model): ``INPUT_COLUMNS`` (round, model_id, tc and
            the ``model_metrics`` columns); other columns are ignored, rounds outside the
            window too.
        settings: window, split and EBM parameters.
        window_end: the window's last round; it must have complete rows.

    Raises:
        InsufficientRoundsError: fewer than ``min_rounds`` usable rounds up to ``window_end``.
        ValueError: missing columns, non-numeric values, duplicate (round, model_id) rows.
    """
    settings = settings or ProxySettings()
    rows, dropped = select_window(frame, settings, window_end)
    rounds = tuple(int(r) for r in np.unique(rows["round"]))
    train_rounds = rounds[: -settings.held_out_rounds]
    test_rounds = rounds[-settings.held_out_rounds :]
    train = rows[rows["round"].isin(train_rounds)]
    test = rows[rows["round"].isin(test_rounds)]
    with warnings.catch_warnings():
        # interpret warns about missing values in its own visualizations: there are none.
        warnings.filterwarnings("ignore", message="Missing values detected", category=UserWarning)
        evaluated = _fit(train, settings)
        predicted = _predict(evaluated, test)
        explained = _fit(rows, settings) if settings.refit_on_window else evaluated
        fitted = rows if settings.refit_on_window else train
        importance, shapes = _explain(explained, fitted)
        fit_r2 = _r2(fitted["tc"].to_numpy(), _predict(explained, fitted))
    y = test["tc"].to_numpy()
    return ProxyResult(
        window_end=rounds[-1],
        rounds=rounds,
        train_rounds=train_rounds,
        held_out_rounds=test_rounds,
        rows=len(rows),
        rows_dropped=dropped,
        models=int(rows["model_id"].nunique()),
        importance=importance,
        shapes=shapes,
        held_out_r2=_r2(y, predicted),
        held_out_corr=_pearson(y, predicted),
        fit_r2=fit_r2,
        interaction_center=explained.center,
        intercept=float(np.asarray(explained.model.intercept_).ravel()[0]),
        held_out=pd.DataFrame(
            {
                "round": test["round"].to_numpy(),
                "model_id": test["model_id"].to_numpy(),
                "tc": y,
                "predicted": predicted,
            }
        ),
        settings=settings,
    )
