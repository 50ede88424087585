"""Every plot of the platform (matplotlib, Agg, no pyplot state), and the one way a plot
reaches the user: saved as a small PNG (72 dpi) beside the warehouse and attached to the
materialization as a markdown image (a data URI, which the Dagster UI's markdown renderer
allows), with its path and a one-line numeric summary that is always visible.

matplotlib is imported by the functions that draw, so that loading the definitions does not.
"""

from __future__ import annotations

import base64
import io
import math
from pathlib import Path
from typing import TYPE_CHECKING

import dagster as dg
import numpy as np
import pandas as pd

from tc_assets.scoring.proxy_model import INTERACTION_TERM, ProxyResult

if TYPE_CHECKING:
    from matplotlib.figure import Figure

PNG_DPI = 72


def png_bytes(fig: Figure) -> bytes:
    """The figure as PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight", dpi=PNG_DPI)
    return buf.getvalue()


def plot_metadata(
    fig: Figure, path: Path, key: str, alt: str, summary: str
) -> dict[str, dg.MetadataValue]:
    """Save the figure as PNG at `path`; metadata `key` (the image), `<key>_summary` (what it
    shows, in one line of figures) and `<key>_path`."""
    png = png_bytes(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png)
    image = f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode()})"
    return {
        f"{key}_summary": dg.MetadataValue.text(summary),
        key: dg.MetadataValue.md(image),
        f"{key}_path": dg.MetadataValue.path(str(path)),
    }


def capacity_summary(table: pd.DataFrame) -> str:
    """One line: how many portfolios, the largest capacity and whose, how many never pay."""
    caps = table.set_index("model_id")["capacity_usd"]
    paying = caps[(caps > 0) & np.isfinite(caps)]
    best = (
        f"largest capacity ${paying.max() / 1e6:,.1f}M ({paying.idxmax()})"
        if len(paying)
        else "none pays"
    )
    return f"{len(caps)} portfolios; {best}; {len(caps) - len(paying)} never pay"


def importance_summary(result: ProxyResult) -> str:
    """One line: the top term and its share, the fit's held-out R^2, the rows."""
    imp = result.importance
    return (
        f"top term {imp.index[0]} ({imp['share'].iloc[0]:.0%} of importance, monotonicity "
        f"{imp['monotonicity'].iloc[0]:+.2f}); held-out R² {result.held_out_r2:.3f}; "
        f"{result.rows} model-rounds"
    )


def shapes_summary(result: ProxyResult, terms: list[str]) -> str:
    """One line: each plotted term's monotonicity."""
    mono = result.importance["monotonicity"]
    return "monotonicity: " + ", ".join(f"{t} {mono[t]:+.2f}" for t in terms)


# --- portfolio-weight submissions -----------------------------------------------------------


def capacity_figure(curves: pd.DataFrame, table: pd.DataFrame, fund_lmv: float, r: int) -> Figure:
    """Dollar return against long market value, one line per portfolio, peaks and break-evens
    marked; the y range is set by the peaks so that the fall past them stays readable."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 5.5), dpi=100)
    ax = fig.add_subplot()
    caps = table.set_index("model_id")
    top, right = 0.0, 0.0
    for model, c in curves.groupby("model_id", sort=True):
        lmv = c["long_market_value_usd"].to_numpy() / 1e6
        d = c["dollar_return_usd"].to_numpy() / 1e6
        row = caps.loc[model]
        peak, even = row["capacity_usd"] / 1e6, row["breakeven_usd"] / 1e6
        label = f"{model}: peak at ${peak:,.1f}M" if peak > 0 else f"{model}: never pays"
        (line,) = ax.plot(lmv, d, label=label, lw=1.5)
        if 0 < peak < np.inf:
            best = row["peak_dollar_return_usd"] / 1e6
            top, right = max(top, best), max(right, even)
            ax.plot([peak], [best], "o", color=line.get_color())
            ax.plot([even], [0.0], "x", color=line.get_color())
    ax.axhline(0.0, color="black", lw=0.8)
    ax.axvline(
        fund_lmv / 1e6, color="grey", ls="--", lw=1, label=f"fund LMV ${fund_lmv / 1e6:,.0f}M"
    )
    ax.set_xscale("log")
    if top > 0:
        ax.set_ylim(-1.5 * top, 1.25 * top)
        ax.set_xlim(right=min(curves["long_market_value_usd"].max() / 1e6, 10 * right))
    ax.set_xlabel("long market value invested ($M, log scale)")
    ax.set_ylabel("dollar return of the round after costs ($M)")
    ax.set_title(f"Round {r}: capacity of portfolio submissions (o peak, x break-even)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    return fig


# --- TC attribution ----------------------------------------------------------------------------


def attribution_figure(parts: pd.DataFrame) -> Figure:
    """Each model's raw signal split into what reaches the portfolio, what the exposure limits
    and budget rows remove, and what sits on positions at a bound; its TC marked."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 0.3 * len(parts) + 1.5), dpi=80)
    ax = fig.add_subplot()
    y = np.arange(len(parts))
    left_pos, left_neg = np.zeros(len(parts)), np.zeros(len(parts))
    for name, color in (
        ("reaches", "tab:green"),
        ("exposure_budget", "tab:orange"),
        ("bounds", "tab:grey"),
    ):
        v = parts[name].to_numpy()
        left = np.where(v >= 0, left_pos, left_neg)
        ax.barh(y, v, left=left, color=color, label=name.replace("_", " and "))
        left_pos, left_neg = left_pos + np.maximum(v, 0), left_neg + np.minimum(v, 0)
    ax.plot(parts["tc"], y, "k|", markersize=12, label="TC (reaches - c)")
    ax.set_yticks(y, parts.index, fontsize=7)
    ax.invert_yaxis()
    ax.axvline(0.0, color="black", lw=0.8)
    ax.set_xlabel("share of the raw signal (target units scaled like TC)")
    ax.set_title("Where each model's signal goes (20 largest stakes)")
    ax.legend(fontsize=7, loc="lower right")
    return fig


# --- the TC proxy model ---------------------------------------------------------------------


def _label(term: str, result: ProxyResult) -> str:
    """A term's input, as the x-axis label of its shape function."""
    if term != INTERACTION_TERM:
        return term
    mf, me = result.interaction_center
    if mf == 0 and me == 0:
        return "fnc_v3 x exposure_dissimilarity"
    return f"(fnc_v3 - {mf:.3g}) x (exposure_dissimilarity - {me:.3g})"


def importance_figure(result: ProxyResult) -> Figure:
    """Horizontal bars of term importance, coloured by monotonicity (blue +1, red -1)."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    imp = result.importance.iloc[::-1]
    fig = Figure(figsize=(8.5, 0.45 * len(imp) + 2.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    cmap, norm = colormaps["RdBu"], Normalize(-1.0, 1.0)
    mono = imp["monotonicity"].to_numpy()
    colors = [cmap(norm(m)) if np.isfinite(m) else "lightgrey" for m in mono]
    bars = ax.barh(imp.index, imp["importance"], color=colors, edgecolor="black", lw=0.5)
    for bar, share, m in zip(bars, imp["share"], mono, strict=True):
        rho = f", monotonicity {m:+.2f}" if np.isfinite(m) else ""
        ax.annotate(
            f" {share:.0%}{rho}",
            (bar.get_width(), bar.get_y() + bar.get_height() / 2),
            va="center",
            fontsize=8,
        )
    ax.set_xlim(0, imp["importance"].max() * 1.6 if len(imp) else 1)
    ax.set_xlabel("importance: mean |contribution to predicted TC| over the window's rows")
    ax.set_ylabel("term")
    rounds = result.rounds
    ax.set_title(
        f"What explains TC, rounds {rounds[0]}-{rounds[-1]} ({result.rows} model-rounds): "
        f"held-out R² {result.held_out_r2:.2f}",
        fontsize=10,
    )
    fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, label="monotonicity (Spearman)")
    fig.tight_layout()
    return fig


def shapes_figure(result: ProxyResult, terms: list[str]) -> Figure:
    """One panel per term: its contribution to predicted TC against its input (steps over the
    EBM's bins), with the distribution of the fitted rows underneath."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cols = min(2, len(terms))
    nrows = math.ceil(len(terms) / cols)
    fig = Figure(figsize=(5.2 * cols, 3.6 * nrows + 0.6), dpi=100)
    FigureCanvasAgg(fig)
    for k, term in enumerate(terms):
        ax = fig.add_subplot(nrows, cols, k + 1)
        s = result.shapes[result.shapes["term"] == term]
        edges = np.append(s["lower"].to_numpy(), s["upper"].to_numpy()[-1])
        ax.stairs(s["contribution"].to_numpy(), edges, baseline=None, color="tab:blue", lw=1.5)
        ax.axhline(0.0, color="black", lw=0.6)
        rug = ax.twinx()
        rug.hist(s["x"], bins=30, weights=s["weight"], color="grey", alpha=0.25)
        rug.set_yticks([])
        rug.set_ylim(top=rug.get_ylim()[1] * 4)  # keep the histogram in the bottom quarter
        row = result.importance.loc[term]
        ax.set_title(
            f"{term}: importance {row['importance']:.4f}, monotonicity {row['monotonicity']:+.2f}",
            fontsize=9,
        )
        ax.set_xlabel(_label(term, result), fontsize=8)
        ax.set_ylabel("contribution to predicted TC")
        ax.set_zorder(rug.get_zorder() + 1)
        ax.patch.set_visible(False)
    rounds = result.rounds
    fig.suptitle(f"TC proxy shape functions, rounds {rounds[0]}-{rounds[-1]}", fontsize=11)
    fig.tight_layout()
    return fig
