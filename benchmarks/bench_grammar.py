"""Per-token cost of grammar masking against one decode step of SmolLM2 (target: <= 20%).

Usage: python benchmarks/bench_grammar.py [--model PATH] [--tokens N]

For each grammar, SmolLM2 generates greedily under the constraint; every step times the grammar
work (bitmask fill + unpack + apply to the logits, then accepting the token) and, separately,
`ctx.decode` of the one new token. A second pass drives the matcher with random logits for many
more steps (long strings, deep JSON), where the mask is hardest to compute.

Why llguidance rather than xgrammar (measured on this 2-core machine, SmolLM2's 49152 tokens):
- install: llguidance 1.9.1 is one 3 MB wheel (7.7 MB installed) with no dependencies;
  xgrammar 0.2.8 requires torch, transformers, pydantic, apache-tvm-ffi and triton (~1 GB on
  disk, triton alone 999 MB), and transformers is only a test dependency here.
- per-token mask fill: both far under a millisecond (llguidance 0.02-0.25 ms, xgrammar
  0.002-0.013 ms with random logits); the apply step is ours for llguidance (numpy unpack +
  where, ~0.05-0.1 ms; llguidance's own torch.compile'd apply took ~10 ms on CPU).
  Either is ~1-2% of a 10-20 ms decode step, so speed does not decide it.
- GBNF: both (llguidance translates GBNF to its Lark dialect); JSON Schema: both, llguidance
  with bounded-whitespace options; malformed input: both give a message naming the problem.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from gguflm import Batch, Context, Model
from gguflm.chat import ChatTemplate
from gguflm.cli import default_model_path
from gguflm.grammar import Grammar, tokenizer_info

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}

GRAMMARS = {
    "gbnf choice": (Grammar.from_gbnf('root ::= "red" | "green" | "blue"'), "Name a colour of the sky."),
    "gbnf arithmetic": (
        Grammar.from_gbnf(
            'root ::= expr\nexpr ::= term (("+" | "-") term)*\nterm ::= num | "(" expr ")"\nnum ::= [0-9]+'
        ),
        "Write a long arithmetic expression.",
    ),
    "json schema": (Grammar.from_json_schema(SCHEMA), "Describe a person called Ann, 31, as JSON."),
    "json object": (Grammar.json_object(), "Describe the planets of the solar system as a JSON object."),
}


def ms(seconds: list[float]) -> float:
    return statistics.median(seconds) * 1e3


def run_model(model: Model, n_tokens: int) -> float:
    """Constrained greedy generation; prints grammar vs decode times, returns the decode median."""
    tok = model.tokenizer
    template = ChatTemplate.from_metadata(model.file.metadata)
    all_decode: list[float] = []
    print(
        f"{'grammar':<16} {'steps':>5} {'fill ms':>7} {'apply ms':>8} {'accept ms':>9} {'decode ms':>9} {'ratio':>6}"
    )
    for name, (grammar, question) in GRAMMARS.items():
        prompt = template.render([{"role": "user", "content": question}], add_generation_prompt=True)
        ids = tok.encode(prompt, add_special=True, parse_special=True)
        ctx = Context(model, n_ctx=len(ids) + n_tokens + 8)
        assert ctx.decode(Batch.from_tokens(ids)) == 0
        matcher = grammar.matcher(tok)
        fill_t: list[float] = []
        apply_t: list[float] = []
        accept_t: list[float] = []
        decode_t: list[float] = []
        out: list[int] = []
        for _ in range(n_tokens):
            logits = ctx.logits(-1)
            t0 = time.perf_counter()
            matcher.allowed()  # bitmask fill + unpack; mask_logits reuses it
            t1 = time.perf_counter()
            masked = matcher.mask_logits(logits)
            t2 = time.perf_counter()
            token = int(torch.argmax(masked))
            t3 = time.perf_counter()
            matcher.accept(token)
            accept_t.append(time.perf_counter() - t3)
            fill_t.append(t1 - t0)
            apply_t.append(t2 - t1)
            if token in tok.eog_ids:
                break
            out.append(token)
            t0 = time.perf_counter()
            assert ctx.decode(Batch.from_tokens([token])) == 0
            decode_t.append(time.perf_counter() - t0)
        all_decode += decode_t
        grammar_ms = ms(fill_t) + ms(apply_t) + ms(accept_t)
        decode_ms = ms(decode_t) if decode_t else float("nan")
        print(
            f"{name:<16} {len(fill_t):>5} {ms(fill_t):>7.3f} {ms(apply_t):>8.3f} {ms(accept_t):>9.3f} {decode_ms:>9.2f} "
            f"{grammar_ms / decode_ms:>6.1%}   {tok.decode(out)[:60]!r}"
        )
    return ms(all_decode)


def run_random(model: Model, steps: int, decode_ms: float) -> None:
    """Random logits: the matcher wanders into long strings and deep nesting."""
    tok = model.tokenizer
    gen = torch.Generator().manual_seed(0)
    print(f"\nrandom logits, {steps} steps each (mask = fill + unpack + apply; max = worst step)")
    for name, (grammar, _) in GRAMMARS.items():
        matcher = grammar.matcher(tok)
        times: list[float] = []
        for _ in range(steps):
            logits = torch.randn(tok.n_vocab, generator=gen)
            t0 = time.perf_counter()
            token = int(torch.argmax(matcher.mask_logits(logits)))
            matcher.accept(token)
            times.append(time.perf_counter() - t0)
            if matcher.is_finished() or token in tok.eog_ids:
                matcher.reset()
        worst = max(times) * 1e3
        print(
            f"{name:<16} median {ms(times):.3f} ms ({ms(times) / decode_ms:.1%} of decode), max {worst:.2f} ms"
        )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="GGUF file (default: SmolLM2-135M)")
    ap.add_argument("--tokens", type=int, default=48, help="max tokens per constrained generation")
    ap.add_argument("--random-steps", type=int, default=500)
    args = ap.parse_args()
    path = args.model or default_model_path()
    model = Model.load(path)
    t0 = time.perf_counter()
    tokenizer_info(model.tokenizer)
    print(
        f"vocabulary mapped for llguidance in {(time.perf_counter() - t0) * 1e3:.0f} ms (once per tokenizer)"
    )
    decode_ms = run_model(model, args.tokens)
    print(f"\ndecode step (1 token, median): {decode_ms:.2f} ms")
    run_random(model, args.random_steps, decode_ms)
    return 0


if __name__ == "__main__":
    sys.exit(main())
