"""Loss curves as a PNG (matplotlib's Agg backend: no display needed)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from gguflm.train.loop import History


def smoothed(values: Sequence[float], weight: float = 0.95) -> list[float]:
    """Exponential moving average, bias-corrected (the first points are not pulled towards 0)."""
    out, avg = [], 0.0
    for i, v in enumerate(values):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight ** (i + 1)))
    return out


def plot_losses(
    histories: History | dict[str, History],
    path: str | os.PathLike[str],
    unigram_entropy: float | None = None,
    title: str = "",
) -> Path:
    """Training loss (raw and smoothed) and validation loss per step; several runs by label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = histories if isinstance(histories, dict) else {"": histories}
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    for i, (label, h) in enumerate(runs.items()):
        color = f"C{i}"
        steps = range(1, len(h.train) + 1)
        name = f"{label} " if label else ""
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
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
