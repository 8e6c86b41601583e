"""`gguflm train`: the command-line half of gguflm.train (the library never imports this module)."""

from __future__ import annotations

import argparse
import sys

from gguflm.train.config import OUTTYPES, TrainConfig

_DEFAULTS = TrainConfig()


def cmd_train(args: argparse.Namespace) -> int:
    from gguflm.train.run import train

    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be at least 1, got {args.steps}")
    config = (
        None
        if args.resume
        else TrainConfig(
            vocab_size=args.vocab_size,
            n_embd=args.n_embd,
            n_layer=args.n_layer,
            n_head=args.n_head,
            n_head_kv=args.n_head_kv,
            n_ff=args.n_ff,
            ctx=args.ctx,
            tie_embeddings=args.tie_embeddings,
            steps=args.steps or _DEFAULTS.steps,
            batch=args.batch,
            lr=args.lr,
            warmup=args.warmup,
            seed=args.seed,
            eval_every=args.eval_every,
            bf16=args.bf16,
        )
    )
    result = train(
        args.data,
        args.out,
        config,
        resume=args.resume,
        steps=args.steps,
        checkpoint=args.checkpoint,
        outtype=args.outtype,
        device=args.device,
        save_every=args.save_every,
        log=lambda line: print(line, file=sys.stderr),
    )
    h = result.history
    if not result.finished:
        print(
            f"stopped at step {result.trainer.step}: checkpoint {result.checkpoint} "
            f"(go on with --resume {result.checkpoint})",
            file=sys.stderr,
        )
        return 130
    mean_rate = sum(h.tokens_per_s) / max(1, len(h.tokens_per_s))
    val = f"{h.val[-1][1]:.4f}" if h.val else "n/a"
    print(
        f"wrote {result.gguf} ({args.outtype}); loss curve {result.plot}; checkpoint {result.checkpoint}\n"
        f"validation loss {val} nats/token (unigram entropy of the text {result.unigram_entropy:.4f}); "
        f"{mean_rate:.0f} training tokens/s"
    )
    return 0


def add_train_parser(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser], common_parent: argparse.ArgumentParser
) -> argparse.ArgumentParser:
    """Register `train` on the `gguflm` command's subparsers."""
    d = _DEFAULTS
    p = subparsers.add_parser(
        "train",
        parents=[common_parent],
        help="train a small llama on a text file and write it as GGUF",
        description="Train a byte-level BPE tokenizer and a llama model on text files; write a GGUF "
        "file that gguflm and llama.cpp run, a loss-curve PNG beside it, and checkpoints.",
    )
    p.add_argument("--data", nargs="+", required=True, metavar="FILE", help="UTF-8 text file(s)")
    p.add_argument("--out", default="model.gguf", help="GGUF file to write (the PNG and .ckpt go beside it)")
    p.add_argument("--vocab-size", type=int, default=d.vocab_size, help="most BPE tokens")
    p.add_argument("--n-embd", type=int, default=d.n_embd)
    p.add_argument("--n-layer", type=int, default=d.n_layer)
    p.add_argument("--n-head", type=int, default=d.n_head)
    p.add_argument("--n-head-kv", type=int, default=d.n_head_kv)
    p.add_argument("--n-ff", type=int, default=d.n_ff)
    p.add_argument("--ctx", type=int, default=d.ctx, help="training context (tokens per sequence)")
    p.add_argument(
        "--tie-embeddings",
        action=argparse.BooleanOptionalAction,
        default=d.tie_embeddings,
        help="output head shares the token embedding matrix",
    )
    p.add_argument("--steps", type=int, default=None, help=f"optimizer steps (default {d.steps})")
    p.add_argument("--batch", type=int, default=d.batch, help="sequences per step")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (AdamW)")
    p.add_argument(
        "--warmup", type=int, default=d.warmup, help="warm-up steps (-1: 5%% of steps, at most 200)"
    )
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--eval-every", type=int, default=d.eval_every, help="validation loss every N steps")
    p.add_argument(
        "--save-every", type=int, default=500, help="checkpoint every N steps (0: only at the end)"
    )
    p.add_argument("--checkpoint", help="checkpoint file (default: --out with suffix .ckpt)")
    p.add_argument(
        "--resume", metavar="CKPT", help="go on from a checkpoint (its settings; --steps may extend the run)"
    )
    p.add_argument("--outtype", choices=list(OUTTYPES), default="f32", help="matrix type in the GGUF")
    p.add_argument("--bf16", choices=["auto", "on", "off"], default=d.bf16, help="bf16 autocast")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("-t", "--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.set_defaults(func=cmd_train)
    return p
