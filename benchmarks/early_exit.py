"""Early exit, measured: perplexity, prefill and decode speed when only the first L layers run.

    python benchmarks/early_exit.py [-m MODEL] [--layers 4,8,...] [--chunks 8] [-t 1] [--png FILE]

For each L: `Context(exit_layer=L)` (as `gguflm perplexity --exit-layer L` and `gguflm bench
--exit-layer L`): perplexity on GPL-3 with `-c 512` over the first `--chunks` chunks (the same for
every L), prefill t/s of `-p` random tokens and decode t/s of `-n` tokens after a 16-token prompt,
each the best of `-r` passes that time every L in turn (on a shared machine the best run is the least
disturbed one, and load from elsewhere falls on every L alike).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from gguflm import Context, Model
from gguflm.bench import TG_PROMPT, _tokens, time_generation, time_prefill
from gguflm.cpu import describe
from gguflm.paths import default_model_path
from gguflm.perplexity import perplexity

GPL3 = Path("/usr/share/common-licenses/GPL-3")


def default_layers(n_layer: int) -> list[int]:
    """Every 4th layer and the last three."""
    return sorted({*range(4, n_layer + 1, 4), *range(max(1, n_layer - 2), n_layer + 1)})


def measure_ppl(model: Model, layer: int, tokens: list[int], chunks: int) -> tuple[float, float]:
    n_ctx = 512
    ctx = Context(model, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, exit_layer=layer)
    bos = model.tokenizer.bos_id if model.tokenizer.add_bos else None
    *_, last = perplexity(ctx, tokens[: chunks * n_ctx], n_ctx, bos)
    return last.final()


def measure_speed(
    model: Model, layers: list[int], args: argparse.Namespace
) -> tuple[dict[int, float], dict[int, float]]:
    """Best prefill and decode seconds per exit layer over `repetitions` passes, each pass timing every
    layer once in turn: a burst of load from elsewhere falls on all layers alike, not on one."""
    pp_tokens = _tokens(model, args.n_prompt, 0)
    prompt = _tokens(model, TG_PROMPT, 1)
    contexts = {
        layer: Context(model, n_ctx=512, n_batch=512, n_ubatch=512, exit_layer=layer) for layer in layers
    }
    pp: dict[int, float] = {}
    tg: dict[int, float] = {}
    for ctx in contexts.values():  # warm-up
        time_prefill(ctx, pp_tokens)
        time_generation(ctx, prompt, 4)
    for _ in range(args.repetitions):
        for layer, ctx in contexts.items():
            pp[layer] = min(pp.get(layer, float("inf")), time_prefill(ctx, pp_tokens))
            tg[layer] = min(tg.get(layer, float("inf")), time_generation(ctx, prompt, args.n_gen))
    return pp, tg


def number(x: float) -> str:
    return f"{x:.2f}" if x < 1e4 else f"{x:.2g}"


def table(rows: list[dict[str, float]]) -> str:
    """Markdown; the x columns are ratios to the last row (the full model when it is the last)."""
    full = rows[-1]
    lines = [
        f"| exit layer L | PPL | decode t/s | prefill t/s | decode vs L={full['layer']} | prefill vs L={full['layer']} |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['layer']} | {number(r['ppl'])} ± {number(r['ppl_err'])} | {r['tg_tps']:.1f} | "
            f"{r['pp_tps']:.1f} | {r['tg_tps'] / full['tg_tps']:.2f} | {r['pp_tps'] / full['pp_tps']:.2f} |"
        )
    return "\n".join(lines)


def plot(path: str, model: Model, rows: list[dict[str, float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = [r["layer"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    ax.plot(layers, [r["ppl"] for r in rows], marker="o", color="C3", label="perplexity (log scale)")
    ax.set_yscale("log")
    ax.set_xlabel(f"exit layer L (of {model.args.n_layer})")
    ax.set_ylabel("perplexity, GPL-3, -c 512")
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(layers, [r["tg_tps"] for r in rows], marker="s", color="C0", label="decode t/s")
    ax2.plot(layers, [r["pp_tps"] for r in rows], marker="^", color="C2", label="prefill t/s")
    ax2.set_ylabel("tokens / s")
    h1, n1 = ax.get_legend_handles_labels()
    h2, n2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, n1 + n2, fontsize=8, loc="upper center")
    ax.set_title(f"early exit, {model.path.name}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-m", "--model", default=None)
    p.add_argument("--layers", default="", help="comma-separated exit layers (default: every 4th, last 3)")
    p.add_argument("--chunks", type=int, default=8, help="perplexity over the first N chunks of 512")
    p.add_argument("-p", "--n-prompt", type=int, default=256)
    p.add_argument("-n", "--n-gen", type=int, default=32)
    p.add_argument("-r", "--repetitions", type=int, default=3)
    p.add_argument("-t", "--threads", type=int, default=1)
    p.add_argument("-f", "--file", default=str(GPL3))
    p.add_argument("--png", default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = Model.load(args.model or default_model_path())
    n_layer = model.args.n_layer
    layers = [int(x) for x in args.layers.split(",")] if args.layers else default_layers(n_layer)
    tokens = model.tokenizer.encode(Path(args.file).read_text(), add_special=True)
    pp, tg = measure_speed(model, layers, args)
    rows = []
    for layer in layers:
        ppl, err = measure_ppl(model, layer, tokens, args.chunks)
        rows.append(
            {
                "layer": layer,
                "ppl": ppl,
                "ppl_err": err,
                "pp_tps": args.n_prompt / pp[layer],
                "tg_tps": args.n_gen / tg[layer],
            }
        )
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(f"{model.path.name}, {n_layer} layers; {describe()}, {args.threads} thread(s)")
    print(
        f"perplexity: {Path(args.file).name}, -c 512, first {args.chunks} chunks; pp{args.n_prompt}, tg{args.n_gen}"
    )
    print()
    print(table(rows))
    if args.png:
        plot(args.png, model, rows)
    if args.json:
        Path(args.json).write_text(json.dumps({"model": model.path.name, "cpu": describe(), "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
