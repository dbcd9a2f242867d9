"""The plot of the headline figures: each figure's speed against anomalib, per run."""

from __future__ import annotations

import pathlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

from benchmarks.headlines import HEADLINES, ratio

if TYPE_CHECKING:
    from benchmarks.publish import Run

_COLORS = ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860"]


def plot(runs: Sequence[Run], path: pathlib.Path) -> bool:
    """Draws the speed ratios against anomalib to ``path``; False without matplotlib.

    One bar group per headline figure (grouped by case), one bar per run, on a log
    scale with a line at 1.0 (as fast as anomalib).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return False
    headlines = [h for h in HEADLINES if any(ratio(h, run) for run in runs)]
    n, k = len(headlines), max(len(runs), 1)
    fig, ax = plt.subplots(figsize=(9.5, 1.2 + 0.32 * n * k + 0.25 * n), dpi=110)
    height = 0.8 / k
    values = [[ratio(h, run) for h in headlines] for run in runs]
    finite = [v for row in values for v in row if v]
    lo = min(finite + [1.0]) / 1.6
    hi = max(finite + [1.0]) * 1.6
    for j, (run, row) in enumerate(zip(runs, values, strict=True)):
        ys = [i + (j - (k - 1) / 2) * height for i in range(n)]
        color = _COLORS[j % len(_COLORS)]
        label = f"{run.name} ({run.device}, {run.date})"
        # Bars start at 1.0, as fast as anomalib: right of it jaxnorm is faster, left slower.
        ax.barh(
            [y for y, v in zip(ys, row, strict=True) if v],
            [v - 1.0 for v in row if v],
            height=height * 0.92,
            left=1.0,
            color=color,
            label=label,
        )
        for y, v in zip(ys, row, strict=True):
            if not v:
                ax.text(1.03, y, "not in this run", va="center", fontsize=7, color="0.45")
            elif v >= 1:
                ax.text(v * 1.03, y, f"{v:.2f}x", va="center", ha="left", fontsize=8)
            else:
                ax.text(v / 1.03, y, f"{v:.2f}x", va="center", ha="right", fontsize=8)
    # One shaded band per case, so that a case's figures read as one group.
    start = 0
    for i in range(1, n + 1):
        if i == n or headlines[i].case != headlines[start].case:
            if len({h.case for h in headlines[:start]}) % 2 == 0:
                ax.axhspan(start - 0.5, i - 0.5, color="0.93", zorder=0)
            start = i
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_xscale("log")
    ax.set_xlim(lo, hi)
    ticks = [t for t in (1 / 16, 1 / 8, 1 / 4, 1 / 2, 1, 2, 4, 8, 16, 32, 64) if lo <= t <= hi]
    ax.set_xticks(ticks)
    ax.set_xticklabels([f"{t:g}x" for t in ticks])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_ylim(n - 0.5, -0.5)
    ax.set_yticks(range(n))
    ax.set_yticklabels([f"{h.label}  [{h.case}]" for h in headlines], fontsize=9)
    ax.set_xlabel("anomalib time / jaxnorm time (log scale; > 1: jaxnorm is faster)")
    # The title heads the legend above the axes, where neither can cover a bar or a label.
    ax.legend(
        title="Speed against anomalib (0.7's eager torch code; 2.7's PostProcessor), best blocks",
        title_fontsize=11,
        loc="lower center",
        bbox_to_anchor=(0.5, 1.0),
        fontsize=8,
        frameon=False,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return True
