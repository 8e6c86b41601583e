"""PNG figures of the inspection tools (lens, vocab, early exit): matplotlib on its Agg backend, so
they are written without a display. Imported only by the commands that draw."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np


def _save(fig: plt.Figure, path: str | Path) -> None:
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=90)
    except OSError as e:
        raise ValueError(f"cannot write {path}: {e.strerror}") from e
    finally:
        plt.close(fig)


def lens_heatmap(
    path: str | Path,
    probs: np.ndarray,
    labels: Sequence[Sequence[str]],
    layers: Sequence[int],
    inputs: Sequence[str],
    title: str,
) -> None:
    """probs (n_layers, n_pos): each cell the layer's top-1 probability, labelled with its token."""
    n_layers, n_pos = probs.shape
    fig, ax = plt.subplots(figsize=(1.0 + 0.95 * n_pos, 1.0 + 0.32 * n_layers))
    image = ax.imshow(probs, aspect="auto", origin="lower", cmap="Blues", vmin=0.0, vmax=1.0)
    for li in range(n_layers):
        for pos in range(n_pos):
            colour = "white" if probs[li, pos] > 0.6 else "black"
            ax.text(pos, li, labels[li][pos], ha="center", va="center", fontsize=7, color=colour)
    ax.set_xticks(range(n_pos), list(inputs), rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(n_layers), ["emb" if layer == 0 else str(layer) for layer in layers], fontsize=7)
    ax.set_xlabel("input token (the cell predicts the next one)")
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.03, label="top-1 probability")
    _save(fig, path)


def lines(
    path: str | Path,
    x: Sequence[float],
    series: dict[str, Sequence[float]],
    xlabel: str,
    title: str,
    right: dict[str, Sequence[float]] | None = None,
    yscale: str = "linear",
) -> None:
    """Line plot of series over x; `right` series share a second y axis. yscale for the left axis
    ("symlog": logarithmic above 0.1 and linear down to 0, for series that reach 0)."""
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    ax.set_yscale(yscale, **({"linthresh": 0.1} if yscale == "symlog" else {}))
    for name, ys in series.items():
        ax.plot(x, ys, marker="o", markersize=3, label=name)
    ax.set_xlabel(xlabel)
    ax.grid(alpha=0.3)
    handles, names = ax.get_legend_handles_labels()
    if right:
        ax2 = ax.twinx()
        for k, (name, ys) in enumerate(right.items()):
            ax2.plot(x, ys, marker="s", markersize=3, linestyle="--", color=f"C{len(series) + k}", label=name)
        h2, n2 = ax2.get_legend_handles_labels()
        handles, names = handles + h2, names + n2
    ax.legend(handles, names, fontsize=8, loc="best")
    ax.set_title(title, fontsize=9)
    _save(fig, path)


def histogram(path: str | Path, values: np.ndarray, xlabel: str, title: str, bins: int = 60) -> None:
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    ax.hist(values, bins=bins, color="C0")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("tokens")
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=9)
    _save(fig, path)
