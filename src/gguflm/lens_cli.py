"""`gguflm lens` and `gguflm vocab`: look inside a model (gguflm.lens, gguflm.vocab), as tables,
JSON and PNG figures."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gguflm.model import Model


def cmd_lens(args: argparse.Namespace) -> int:
    from gguflm.cli import UsageError, load_model, read_text  # late: gguflm.cli imports this module
    from gguflm.lens import format_stats, format_table, lens_prompt, lens_text, parse_layers, shown

    if (args.prompt is None) == (args.file is None):
        raise UsageError("give a prompt with -p (a table of layers x positions) or a text with -f (averages)")
    if args.top_k < 1:
        raise UsageError(f"--top-k must be at least 1, got {args.top_k}")
    model = load_model(args)
    layers = parse_layers(args.layers, model.args.n_layer)
    text = read_text(args)
    tok = model.tokenizer
    if args.prompt is not None:
        tokens = tok.encode(text, add_special=True, parse_special=True)
        if not tokens:
            raise UsageError("the prompt is empty")
        result = lens_prompt(model, tokens, layers, args.top_k)
        if args.png:
            from gguflm.plots import lens_heatmap

            labels = [[shown(tok.piece(int(i)), 9) for i in row[:, 0]] for row in result.top_ids]
            lens_heatmap(
                args.png,
                result.top_probs[:, :, 0].numpy(),
                labels,
                layers,
                [shown(tok.piece(t), 9) for t in tokens],
                f"logit lens, {model.path.name}: top-1 token after each layer",
            )
        print(json.dumps(result.to_json(model)) if args.json else format_table(model, result))
        return 0
    tokens = tok.encode(text, add_special=True, parse_special=False)
    n_ctx = args.ctx_size or 512
    bos = tok.bos_id if tok.add_bos else None
    stats = lens_text(model, tokens, layers, n_ctx, args.chunks, bos)
    if args.png:
        from gguflm.plots import lines

        lines(
            args.png,
            [s.layer for s in stats],
            {
                "KL(final || layer), nats": [s.kl_to_final for s in stats],
                "entropy, nats": [s.entropy for s in stats],
            },
            "layer (0: embeddings)",
            f"logit lens over {stats[0].n_positions} positions, {model.path.name}",
            right={"top-1 = final layer's (fraction)": [s.top1_agreement for s in stats]},
            yscale="symlog",  # the embeddings' KL (~100) would squash the other layers' on a linear axis
        )
    if args.json:
        print(json.dumps({"model": model.path.name, "layers": [vars(s) for s in stats]}))
    else:
        print(format_stats(stats))
    return 0


def _one_token(model: Model, text: str) -> int:
    from gguflm.cli import UsageError

    tok = model.tokenizer
    if text.startswith("#") and text[1:].isdigit():  # "#1234": a token id
        return int(text[1:])
    ids = tok.encode(text, add_special=False, parse_special=True)
    if len(ids) != 1:
        pieces = ", ".join(repr(tok.piece(i)) for i in ids) or "none"
        raise UsageError(f"--token {text!r} is {len(ids)} tokens ({pieces}); give one token, or #ID")
    return ids[0]


def cmd_vocab(args: argparse.Namespace) -> int:
    from gguflm.bench import peak_rss_mb
    from gguflm.cli import UsageError, load_model
    from gguflm.vocab import Matrices, compare, token_neighbours

    if args.neighbours < 1:
        raise UsageError(f"--neighbours must be at least 1, got {args.neighbours}")
    model = load_model(args)
    tok = model.tokenizer
    tokens = [_one_token(model, t) for t in args.token or []]
    mats = Matrices.of(model, raw=args.raw)
    output_name = "output rows" if args.raw else "output rows x final-norm gain"
    report: dict[str, object] = {"model": model.path.name, "tied": mats.tied, "output": output_name}
    if not args.json:
        kind = "tied: one matrix (token_embd)" if mats.tied else "untied: token_embd and output"
        print(f"{model.path.name}: input and output embeddings are {kind}; output side: {output_name}")
    neighbours = []
    for token in tokens:
        found = token_neighbours(mats, token, args.neighbours)
        neighbours.append({"token": token, "piece": tok.piece(token), **found})
        if not args.json:
            print(f"\nnearest to {tok.piece(token)!r} (id {token}), cosine:")
            print(f"{'input embedding':<32} {output_name}")
            for (i, ci), (o, co) in zip(found["input"], found["output"], strict=True):
                left = f"{tok.piece(i)!r} {ci:.3f}"
                print(f"{left:<32} {tok.piece(o)!r} {co:.3f}")
    report["neighbours"] = neighbours
    if not tokens or args.png:
        import numpy as np

        result = compare(mats, args.neighbours, args.sample)
        q = np.percentile(result.cos_in_out, [5, 50, 95])
        summary = {
            "cos_in_out_mean": float(result.cos_in_out.mean()),
            "cos_in_out_p5_p50_p95": [float(v) for v in q],
            "neighbour_overlap_mean": float(result.overlap.mean()),
            "tokens_compared": len(result.sampled),
            "chunk_mb": result.chunk_bytes / 2**20,
            "peak_rss_mb": peak_rss_mb(),
        }
        report["whole_vocabulary"] = summary
        if not args.json:
            print(
                f"\nover {model.n_vocab} tokens: cos(input_i, output_i) mean {summary['cos_in_out_mean']:.3f}, "
                f"5/50/95th percentiles {q[0]:.3f} / {q[1]:.3f} / {q[2]:.3f}\n"
                f"top-{args.neighbours} neighbour lists shared on average "
                f"{100 * summary['neighbour_overlap_mean']:.1f}% ({len(result.sampled)} tokens compared)\n"
                f"memory: float32 blocks of at most {summary['chunk_mb']:.0f} MB at a time; "
                f"process peak RSS {summary['peak_rss_mb']:.0f} MB (model included)"
            )
        if args.png:
            from gguflm.plots import histogram

            histogram(
                args.png,
                result.cos_in_out,
                f"cos(input embedding_i, {output_name}_i)",
                f"{model.path.name} ({'tied' if mats.tied else 'untied'}), {model.n_vocab} tokens\n"
                f"top-{args.neighbours} neighbour overlap {100 * summary['neighbour_overlap_mean']:.0f}% "
                f"({len(result.sampled)} tokens)",
            )
    if args.json:
        print(json.dumps(report))
    return 0


def add_lens_parsers(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser], common_parent: argparse.ArgumentParser
) -> None:
    """Register `lens` and `vocab` on the `gguflm` command's subparsers."""
    from gguflm.cli import add_model_args  # late: gguflm.cli imports this module

    p = subparsers.add_parser(
        "lens", parents=[common_parent], help="what the model predicts after each layer (logit lens)"
    )
    add_model_args(p)
    p.add_argument("-p", "--prompt", help="a prompt: table of layers x positions (and --png heatmap)")
    p.add_argument("-f", "--file", help="a text: per-layer KL, top-1 agreement, entropy (and --png plot)")
    p.add_argument("--top-k", type=int, default=5, help="tokens per cell in --json")
    p.add_argument("--layers", default="all", help="'all' or comma-separated layers, 0 = embeddings")
    p.add_argument("--chunks", type=int, default=0, help="with -f: the first N chunks of -c tokens (0: all)")
    p.add_argument("--png", help="write the heatmap (-p) or the line plot (-f) to this PNG file")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_lens)

    p = subparsers.add_parser(
        "vocab", parents=[common_parent], help="input vs output embeddings: neighbours, cosines"
    )
    add_model_args(p)
    p.add_argument("--token", action="append", help="a token (its text, or #ID); repeat for more")
    p.add_argument("--neighbours", type=int, default=10, help="nearest neighbours per list")
    p.add_argument("--sample", type=int, default=0, help="neighbour overlap over N spaced tokens (0: all)")
    p.add_argument("--raw", action="store_true", help="output rows as stored, not times the final norm gain")
    p.add_argument("--png", help="histogram of cos(input_i, output_i) over the vocabulary")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_vocab)
