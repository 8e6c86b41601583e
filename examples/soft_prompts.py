"""Embedding input as research: what does the model make of vectors no token produces?

    python examples/soft_prompts.py [-m MODEL]

1. Mix two tokens' input embeddings: in "The capital of France is", the row of " France" becomes
   (1 - a) E[" France"] + a E[" Germany"]. Which capital does the model name, how sure is it, and at
   which layer does the lens first show the answer on top?
2. Perturb every input row by Gaussian noise of a given size relative to the row's norm: how far
   can a soft prompt move from the token rows before the prediction changes?

Everything goes through `Batch.from_embeddings` and `gguflm.lens` (docs/embeddings.md shows the output;
tests/test_soft_prompts.py runs these functions).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from gguflm import Model
from gguflm.lens import decode_with_lens
from gguflm.paths import default_model_path

PROMPT = "The capital of {} is"


@dataclass
class Reading:
    """What the model predicts after the last input vector."""

    top1: int
    probs: dict[int, float]  # the probabilities of the tokens asked about
    first_on_top: dict[int, int | None]  # per asked token: the first layer whose lens puts it on top
    logprobs: torch.Tensor  # (n_vocab,) final log-probabilities


def single_token(model: Model, text: str) -> int:
    ids = model.tokenizer.encode(text, add_special=False)
    if len(ids) != 1:
        raise ValueError(f"{text!r} is {len(ids)} tokens")
    return ids[0]


def read(model: Model, tokens: list[int], rows: torch.Tensor, asked: list[int]) -> Reading:
    """Decode the vectors `rows` (n, n_embd) (named by `tokens`) under a lens over every layer."""
    n_layer = model.args.n_layer
    lens = decode_with_lens(model, tokens, range(n_layer + 1), embeddings=rows)
    last = slice(-1, None)  # the last position only
    logprobs = torch.log_softmax(lens.logits(n_layer, last)[0], dim=-1)
    tops = [int(lens.logits(layer, last).argmax()) for layer in range(n_layer + 1)]
    return Reading(
        top1=int(logprobs.argmax()),
        probs={t: float(logprobs[t].exp()) for t in asked},
        first_on_top={t: next((layer for layer, top in enumerate(tops) if top == t), None) for t in asked},
        logprobs=logprobs,
    )


def mixed(model: Model, a: float, first: str = " France", second: str = " Germany") -> torch.Tensor:
    """The prompt's input rows with `first`'s row replaced by (1 - a) E[first] + a E[second]."""
    tokens = model.tokenizer.encode(PROMPT.format(first.strip()))
    rows = model.token_embeddings(tokens).clone()  # (n, n_embd)
    i = tokens.index(single_token(model, first))
    e1, e2 = model.token_embeddings([single_token(model, first), single_token(model, second)])
    rows[i] = (1 - a) * e1 + a * e2
    return rows


def perturbed(rows: torch.Tensor, size: float, seed: int = 0) -> torch.Tensor:
    """rows plus Gaussian noise whose norm is `size` times each row's norm."""
    noise = torch.randn(rows.shape, generator=torch.Generator().manual_seed(seed))
    noise = noise / noise.norm(dim=-1, keepdim=True) * rows.norm(dim=-1, keepdim=True)
    return rows + size * noise


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-m", "--model", default=None)
    args = p.parse_args()
    model = Model.load(args.model or default_model_path())
    tok = model.tokenizer
    tokens = tok.encode(PROMPT.format("France"))
    paris, berlin = single_token(model, " Paris"), single_token(model, " Berlin")
    print(f"{model.path.name}: {PROMPT.format('X')!r}, X = (1 - a) E[' France'] + a E[' Germany']\n")
    print("| a | top-1 | p(Paris) | p(Berlin) | first layer with Paris / Berlin on top |")
    print("| ---: | --- | ---: | ---: | --- |")
    for a in (0.0, 0.25, 0.4, 0.5, 0.6, 0.75, 1.0):
        r = read(model, tokens, mixed(model, a), [paris, berlin])
        print(
            f"| {a:.2f} | {tok.piece(r.top1)!r} | {r.probs[paris]:.3f} | {r.probs[berlin]:.3f} | "
            f"{r.first_on_top[paris]} / {r.first_on_top[berlin]} |"
        )
    clean = read(model, tokens, model.token_embeddings(tokens), [paris])
    print("\nnoise on every row, relative to the row's norm (seed 0):\n")
    print("| noise | top-1 | p(top-1) | p(Paris) | KL(clean || noisy) |")
    print("| ---: | --- | ---: | ---: | ---: |")
    for size in (0.0, 0.1, 0.3, 0.5, 1.0, 2.0):
        r = read(model, tokens, perturbed(model.token_embeddings(tokens), size), [paris])
        kl = float((clean.logprobs.exp() * (clean.logprobs - r.logprobs)).sum())
        print(
            f"| {size:.1f} | {tok.piece(r.top1)!r} | {float(r.logprobs[r.top1].exp()):.3f} | "
            f"{r.probs[paris]:.3f} | {kl:.3f} |"
        )


if __name__ == "__main__":
    main()
