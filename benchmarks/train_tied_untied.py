"""Tied against untied embeddings: the same data, seed and settings, trained twice with `gguflm train`'s
library; one PNG with both loss curves, and a JSON line per run (final validation loss, loss spikes,
largest gradient norm, training tokens/s).

    python benchmarks/train_tied_untied.py --out /tmp/tied_untied --steps 800 --lr 1e-3 -t 1

`--only tied` / `--only untied` runs one of the two (two processes on two cores); each run leaves its
history as JSON in --out, and the PNG shows every run found there.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import asdict
from pathlib import Path

import torch

from gguflm.plots import loss_curves, smoothed
from gguflm.train.config import TrainConfig
from gguflm.train.loop import History
from gguflm.train.run import train

LICENSES = sorted(
    p for p in Path("/usr/share/common-licenses").iterdir() if p.is_file() and not p.is_symlink()
)


def spikes(h: History, factor: float = 1.1) -> int:
    """Steps whose loss is more than `factor` times the smoothed loss before it (after warm-up)."""
    trend = smoothed(h.train)
    return sum(1 for i in range(20, len(h.train)) if h.train[i] > factor * trend[i - 1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("tied_untied"))
    ap.add_argument("--data", nargs="+", default=[str(p) for p in LICENSES])
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-embd", type=int, default=128)
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-ff", type=int, default=352)
    ap.add_argument("--vocab-size", type=int, default=2048)
    ap.add_argument("--ctx", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("-t", "--threads", type=int, default=None)
    ap.add_argument("--only", choices=["tied", "untied"], help="run one of the two")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    a.out.mkdir(parents=True, exist_ok=True)
    entropy = 0.0
    for label in [a.only] if a.only else ["tied", "untied"]:
        tied = label == "tied"
        config = TrainConfig(
            vocab_size=a.vocab_size, n_embd=a.n_embd, n_layer=a.n_layer, n_head=4, n_head_kv=2, n_ff=a.n_ff,
            ctx=a.ctx, tie_embeddings=tied, steps=a.steps, batch=a.batch, lr=a.lr, seed=a.seed, eval_every=50,
        )  # fmt: skip
        t0 = time.perf_counter()
        result = train(a.data, a.out / f"{label}.gguf", config, progress=False, plot=False)
        h = result.history
        entropy = result.unigram_entropy
        (a.out / f"{label}.json").write_text(json.dumps(asdict(h) | {"unigram_entropy": entropy}))
        print(
            json.dumps(
                {
                    "run": label,
                    "config": asdict(config),
                    "seconds": round(time.perf_counter() - t0, 1),
                    "tokens_per_s": round(statistics.median(h.tokens_per_s)),
                    "final_val": round(h.val[-1][1], 4),
                    "best_val": round(min(v for _, v in h.val), 4),
                    "unigram_entropy": round(entropy, 4),
                    "loss_spikes_over_10pct": spikes(h),
                    "max_grad_norm_after_warmup": round(max(h.grad_norm[config.warmup_steps :]), 3),
                    "threads": torch.get_num_threads(),
                }
            ),
            flush=True,
        )
    histories = {}
    for label in ("tied", "untied"):
        if (a.out / f"{label}.json").exists():
            saved = json.loads((a.out / f"{label}.json").read_text())
            entropy = saved.pop("unigram_entropy")
            histories[label] = History(**saved)
    png = loss_curves(a.out / "tied_untied.png", histories, entropy, title=f"tied vs untied, lr {a.lr}")
    print(png)


if __name__ == "__main__":
    main()
