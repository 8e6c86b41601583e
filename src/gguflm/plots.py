"""PNG figures of the tools (lens, vocab, early exit, training's loss curves): matplotlib on its Agg
backend, so they are written without a display. Imported only by the commands that draw."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

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


class LossHistory(Protocol):
    """What a loss curve needs of a run (gguflm.train.loop.History)."""

    train: list[float]  # loss of each step
    val: list[tuple[int, float]]  # (step, validation loss)


def smoothed(values: Sequence[float], weight: float = 0.95) -> list[float]:
    """Exponential moving average, bias-corrected (the first points are not pulled towards 0)."""
    out, avg = [], 0.0
    for i, v in enumerate(values):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight ** (i + 1)))
    return out


def loss_curves(
    path: str | Path,
    runs: dict[str, LossHistory],
    unigram_entropy: float | None = None,
    title: str = "",
) -> Path:
    """Training loss (raw and smoothed) and validation loss per step, one colour per run label."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, (label, h) in enumerate(runs.items()):
        color, name = f"C{i}", f"{label} " if label else ""
        steps = range(1, len(h.train) + 1)
        ax.plot(steps, h.train, color=color, alpha=0.25, linewidth=0.8)
        ax.plot(steps, smoothed(h.train), color=color, label=f"{name}train (smoothed)")
        if h.val:
            vs, vl = zip(*h.val, strict=True)
            ax.plot(vs, vl, "o--", color=color, markersize=3, label=f"{name}validation")
    if unigram_entropy is not None:
        ax.axhline(unigram_entropy, color="gray", linestyle=":", label="unigram entropy")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)
    return Path(path)
