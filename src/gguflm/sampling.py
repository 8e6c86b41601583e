"""Choosing the next token: a chain of small `logits -> logits` stages, then greedy or a seeded draw.

Defaults follow llama.cpp's common sampler: top-k 40, top-p 0.95, min-p 0.05, temperature 0.8.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NEG_INF = float("-inf")


def top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits; k <= 0 keeps all."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k).values[-1]
    return logits.masked_fill(logits < kth, NEG_INF)


def top_p(logits: torch.Tensor, p: float, min_keep: int = 1) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probabilities sum to at least p."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True)
    cum = sorted_logits.softmax(-1).cumsum(-1)
    # a token is kept when the mass before it is still below p
    drop = (cum - sorted_logits.softmax(-1)) >= p
    drop[:min_keep] = False
    out = logits.clone()
    out[order[drop]] = NEG_INF
    return out


def min_p(logits: torch.Tensor, p: float, min_keep: int = 1) -> torch.Tensor:
    """Drop tokens whose probability is below p times the most likely token's."""
    if p <= 0.0:
        return logits
    threshold = logits.max() + torch.log(torch.tensor(p, dtype=logits.dtype))
    keep = logits >= threshold
    if int(keep.sum()) < min_keep:
        return logits
    return logits.masked_fill(~keep, NEG_INF)


def temperature(logits: torch.Tensor, t: float) -> torch.Tensor:
    return logits / t


@dataclass
class SamplerParams:
    temp: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    seed: int = 0xFFFFFFFF  # llama.cpp's LLAMA_DEFAULT_SEED: a random seed


class Sampler:
    """A sampler chain with its own random generator, so a seed fixes the output of one sequence."""

    def __init__(self, params: SamplerParams | None = None) -> None:
        self.params = params or SamplerParams()
        self.generator = torch.Generator()
        seed = self.params.seed
        if seed == 0xFFFFFFFF:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)

    def __call__(self, logits: torch.Tensor) -> int:
        """(n_vocab,) logits -> the chosen token id."""
        p = self.params
        logits = logits.detach().float().cpu()
        if p.temp <= 0.0:
            return int(torch.argmax(logits))
        logits = top_k(logits, p.top_k)
        logits = top_p(logits, p.top_p)
        logits = min_p(logits, p.min_p)
        probs = temperature(logits, p.temp).softmax(-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))
