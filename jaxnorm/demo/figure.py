"""The demo's figure: a few test images, their masks, and raw and normalized maps."""

from __future__ import annotations

import os

import numpy as np

from jaxnorm.demo.data import DEFECT_NAMES, NORMAL


def pick_examples(scores: np.ndarray, kinds: np.ndarray, limit: int = 5) -> list[int]:
    """Test images worth a look, normal ones first.

    The cleanest and the most suspicious normal image, a typical scratch and a typical
    spot (median score of their kind), and the anomaly that scored lowest.
    """
    normal = np.flatnonzero(kinds == NORMAL)
    anomalous = np.flatnonzero(kinds != NORMAL)
    picks: list[int] = []
    if normal.size:
        picks += [normal[np.argmin(scores[normal])], normal[np.argmax(scores[normal])]]
    for kind in sorted(k for k in DEFECT_NAMES if k != NORMAL):
        idx = np.flatnonzero(kinds == kind)
        if idx.size:
            picks.append(idx[np.argsort(scores[idx])[idx.size // 2]])
    if anomalous.size:
        picks.append(anomalous[np.argmin(scores[anomalous])])
    return list(dict.fromkeys(int(i) for i in picks))[:limit]


def save_figure(
    path: str | os.PathLike,
    *,
    images: np.ndarray,
    masks: np.ndarray,
    kinds: np.ndarray,
    raw_maps: np.ndarray,
    norm_maps: np.ndarray,
    raw_scores: np.ndarray,
    norm_scores: np.ndarray,
    stats: dict[str, float],
) -> list[int]:
    """Draws a grid: input, ground truth, raw map, normalized map with its 0.5 contour.

    Args:
      path: where to write the PNG.
      images, masks, kinds: the test split, ``(N, H, W)``, ``(N, H, W)`` and ``(N,)``.
      raw_maps, norm_maps: ``(N, H, W)`` anomaly maps before and after normalization.
      raw_scores, norm_scores: ``(N,)`` image scores before and after normalization.
      stats: ``min``, ``max``, ``image_threshold`` and ``pixel_threshold`` (raw units).

    Returns:
      The indices of the test images shown.
    """
    # A bare Figure renders to files without pyplot: no display, and no change to the
    # backend of a caller who uses pyplot (e.g. main() run from a notebook).
    from matplotlib.colors import PowerNorm
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    rows = pick_examples(raw_scores, kinds)
    fig = Figure(figsize=(12.5, 2.9 * len(rows) + 0.9), layout="constrained")
    axes = fig.subplots(len(rows), 4, squeeze=False)
    # Raw maps share the validation range (the one normalization maps onto [0, 1]), on a
    # square-root scale so that the faint structure of normal images stays visible. The
    # normalized maps use a diverging map centred on the 0.5 decision threshold.
    raw_norm = PowerNorm(0.5, vmin=stats["min"], vmax=stats["max"])
    threshold_color, truth_color = "black", "#00b000"
    raw_im = norm_im = None
    for r, i in enumerate(rows):
        ax_in, ax_gt, ax_raw, ax_norm = axes[r]
        truth = DEFECT_NAMES[int(kinds[i])]
        ax_in.imshow(images[i], cmap="gray", vmin=0, vmax=1)
        ax_in.set_title(f"test image #{i}: {truth}", fontsize=10)
        ax_gt.imshow(masks[i], cmap="gray", vmin=0, vmax=1)
        ax_gt.set_title(
            f"ground truth: {int(masks[i].sum())} defect px"
            if masks[i].any()
            else "ground truth: no defect",
            fontsize=10,
        )
        raw_im = ax_raw.imshow(raw_maps[i], cmap="inferno", norm=raw_norm)
        ax_raw.set_title(
            f"raw map, score {raw_scores[i]:.4g}\n(image threshold {stats['image_threshold']:.4g})",
            fontsize=10,
        )
        norm_im = ax_norm.imshow(norm_maps[i], cmap="coolwarm", vmin=0, vmax=1)
        if norm_maps[i].max() >= 0.5 > norm_maps[i].min():
            ax_norm.contour(norm_maps[i], levels=[0.5], colors=threshold_color, linewidths=1.3)
        if masks[i].any():
            ax_norm.contour(
                masks[i].astype(float),
                levels=[0.5],
                colors=truth_color,
                linewidths=1.1,
                linestyles="dashed",
            )
        verdict = "anomalous" if norm_scores[i] >= 0.5 else "normal"
        right = verdict == ("normal" if kinds[i] == NORMAL else "anomalous")
        ax_norm.set_title(
            f"normalized map; image score {norm_scores[i]:.3f}\n-> {verdict} "
            f"({'correct' if right else 'WRONG'})",
            fontsize=10,
            color="black" if right else "crimson",
        )
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.colorbar(raw_im, ax=axes[:, 2], shrink=0.6, label="squared error (raw, sqrt scale)")
    cbar = fig.colorbar(norm_im, ax=axes[:, 3], shrink=0.6, label="normalized score")
    cbar.ax.axhline(0.5, color=threshold_color, linewidth=1.5)
    fig.legend(
        handles=[
            Line2D([], [], color=threshold_color, label="normalized map = 0.5 (pixel threshold)"),
            Line2D([], [], color=truth_color, linestyle="dashed", label="ground-truth outline"),
        ],
        loc="outside lower center",
        fontsize=9,
        ncol=2,
        frameon=False,
    )
    fig.suptitle(
        "jaxnorm: min-max normalization puts each threshold at 0.5\n"
        f"validation min {stats['min']:.4g}, max {stats['max']:.4g}; raw thresholds: image "
        f"{stats['image_threshold']:.4g} (scores), pixel {stats['pixel_threshold']:.4g} (maps)",
        fontsize=11,
    )
    fig.savefig(path, dpi=100)
    return rows
