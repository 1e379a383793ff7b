"""PNG figures: image grids (pixels, no axes) and matplotlib plots (scatter, curves).

matplotlib is used through `matplotlib.figure.Figure` only (no pyplot): no global state,
no GUI backend, safe in a headless process.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from torch import Tensor

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DPI = 100


def save_grid(images: Tensor, path: Path, nrow: int) -> Path:
    """Save images (N, C, H, W) in [0, 1] as one PNG grid with `nrow` images per row.

    Small images (8x8 digits) are enlarged by an integer factor, as in TensorBoard.
    """
    from PIL import Image

    from vaekit.loggers.grid import image_grid  # one rule for grids, here and in TensorBoard

    grid = image_grid(images, nrow=nrow)  # (3, H', W') in [0, 1]
    pixels = grid.mul(255).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def save_scatter(points: np.ndarray, labels: np.ndarray, path: Path, title: str) -> Path:
    """Scatter plot of points (N, 2) coloured by integer labels (N,), with a legend."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.5, 6), dpi=DPI)
    axes = figure.add_subplot()
    classes = np.unique(labels)
    colours = _colours(len(classes))
    for colour, label in zip(colours, classes, strict=True):
        chosen = labels == label
        axes.scatter(points[chosen, 0], points[chosen, 1], s=8, alpha=0.7, color=colour, label=str(label))
    axes.set_xlabel("z[0] (posterior mean)")
    axes.set_ylabel("z[1] (posterior mean)")
    axes.set_title(literal(title), fontsize=10)
    axes.legend(title="label", loc="center left", bbox_to_anchor=(1.0, 0.5), markerscale=2, frameon=False)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    return _save(figure, path)


def save_curves(
    curves: dict[str, list[tuple[int, float, float]]], path: Path, title: str, ylabel: str
) -> Path:
    """Line plot of (step, mean, standard error) curves, one colour per name, with a band of
    +- one standard error where it is finite; a note when there are none."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(9, 5.5), dpi=DPI)
    axes = figure.add_subplot()
    colours = _colours(len(curves))
    for colour, (name, points) in zip(colours, curves.items(), strict=True):
        steps, means, sems = (
            (np.asarray(column) for column in zip(*points, strict=True)) if points else ((),) * 3
        )
        marker = "." if len(points) < 30 else None
        axes.plot(steps, means, color=colour, label=literal(shortened(name)), marker=marker)
        if len(points) and np.isfinite(sems).any():
            axes.fill_between(steps, means - sems, means + sems, color=colour, alpha=0.25, linewidth=0)
    if not any(curves.values()):
        axes.text(0.5, 0.5, "no validation curves found", ha="center", va="center", transform=axes.transAxes)
    axes.set_xlabel("epoch")
    axes.set_ylabel(ylabel)
    axes.set_title(title, fontsize=10)
    axes.grid(alpha=0.3)
    if any(curves.values()):
        axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    figure.tight_layout()
    return _save(figure, path)


def save_histograms(
    panels: dict[str, tuple[np.ndarray, np.ndarray]], names: tuple[str, str], path: Path, title: str
) -> Path:
    """One panel per score: overlaid histograms (shared bins, densities) of its two samples,
    panels = {panel title: (first sample (N,), second sample (M,))}, labelled by `names`;
    non-finite values are left out of the plot (and counted in the legend)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(4.5 * len(panels), 4), dpi=DPI)
    colours = _colours(2)
    for index, (panel, samples) in enumerate(panels.items()):
        axes = figure.add_subplot(1, len(panels), index + 1)
        finite = [np.asarray(sample, dtype=np.float64) for sample in samples]
        finite = [sample[np.isfinite(sample)] for sample in finite]
        pooled = np.concatenate(finite)
        bins = np.histogram_bin_edges(pooled, bins=40) if pooled.size else 10
        for colour, name, sample, values in zip(colours, names, samples, finite, strict=True):
            dropped = len(sample) - len(values)
            label = literal(shortened(name, 30)) + (f" ({dropped} non-finite)" if dropped else "")
            axes.hist(values, bins=bins, density=True, alpha=0.55, color=colour, label=label)
        axes.set_title(literal(panel), fontsize=10)
        axes.set_ylabel("density")
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8, frameon=False)
    figure.suptitle(literal(title), fontsize=10)
    figure.tight_layout()
    return _save(figure, path)


LEGEND_WIDTH = 40  # characters of a legend label


def shortened(label: str, width: int = LEGEND_WIDTH) -> str:
    """A legend label of at most `width` characters: the end of a long one (run names differ
    at their ends), after an ellipsis. The legend sits beside the axes, which it must not crowd out."""
    return label if len(label) <= width else "…" + label[-(width - 1) :]


def literal(text: str) -> str:
    """Text that matplotlib shows as written: '$' would start math mode (a run folder named
    'run_$x$' would be typeset, and an unbalanced one fails to draw)."""
    return text.replace("$", r"\$")


def _colours(n: int) -> list[tuple[float, ...]]:
    """n distinguishable colours: tab10, then tab20, then a continuous map."""
    from matplotlib import colormaps

    if n <= 10:
        return [colormaps["tab10"](i) for i in range(n)]
    if n <= 20:
        return [colormaps["tab20"](i) for i in range(n)]
    return [colormaps["viridis"](i / max(n - 1, 1)) for i in range(n)]


def _save(figure: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    return path
