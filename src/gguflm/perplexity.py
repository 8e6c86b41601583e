"""Perplexity with llama.cpp's protocol (llama-perplexity): chunks of n_ctx tokens, BOS first in each
chunk when the model adds one, each chunk scored on its second half.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from gguflm.batch import Batch
from gguflm.context import DECODE_OK, Context
from gguflm.generate import DecodeError


@dataclass
class ChunkResult:
    index: int
    n_chunks: int
    ppl: float  # running estimate over the chunks so far
    nll: float  # running sums over every scored token so far
    nll2: float
    count: int

    def final(self) -> tuple[float, float]:
        """(PPL, its uncertainty) as llama.cpp prints them in "Final estimate"."""
        mean = self.nll / self.count
        var = self.nll2 / self.count - mean * mean
        ppl = math.exp(mean)
        err = math.sqrt(var / (self.count - 1)) * ppl if var > 0 and self.count > 1 else 0.0
        return ppl, err


def chunk_logits(ctx: Context, tokens: list[int], first: int = 0) -> torch.Tensor:
    """(n - 1 - first, n_vocab) logits of tokens first..n-2 of one chunk (those that predict a token
    of the chunk), decoded from an empty cache; only those rows are computed, as llama-perplexity does."""
    ctx.kv.clear()
    rows = []
    for start in range(0, len(tokens), ctx.n_batch):
        part = tokens[start : start + ctx.n_batch]
        output = [first <= start + i < len(tokens) - 1 for i in range(len(part))]
        status = ctx.decode(Batch.from_tokens(part, output=output))
        if status != DECODE_OK:
            raise DecodeError(status, f"perplexity chunk tokens {start}..{start + len(part)}")
        if any(output):
            rows.append(ctx.all_logits().float())
    return torch.cat(rows)


def chunks(tokens: list[int], n_ctx: int, bos: int | None) -> Iterator[list[int]]:
    for i in range(len(tokens) // n_ctx):
        chunk = tokens[i * n_ctx : (i + 1) * n_ctx]
        if bos is not None:
            chunk = [bos, *chunk[1:]]
        yield chunk


def perplexity(
    ctx: Context,
    tokens: list[int],
    n_ctx: int,
    bos: int | None,
    on_logits: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
    max_chunks: int = -1,
) -> Iterator[ChunkResult]:
    """Yield the running result after each chunk. on_logits(chunk, scored logits, targets) sees each chunk.

    max_chunks: score at most that many chunks (llama-perplexity's --chunks; negative: all of them)."""
    n_chunks = len(tokens) // n_ctx
    if n_chunks == 0:
        raise ValueError(f"need at least {n_ctx} tokens for one chunk of n_ctx = {n_ctx}, got {len(tokens)}")
    if max_chunks == 0:
        raise ValueError("--chunks 0 scores nothing; give a positive number of chunks, or -1 for all")
    if max_chunks > 0:
        n_chunks = min(n_chunks, max_chunks)
    first = n_ctx // 2
    nll = nll2 = 0.0
    count = 0
    for i, chunk in enumerate(itertools.islice(chunks(tokens, n_ctx, bos), n_chunks)):
        logits = chunk_logits(ctx, chunk, first)  # (n_ctx - 1 - first, n_vocab)
        targets = torch.tensor(tokens[i * n_ctx + first + 1 : (i + 1) * n_ctx])
        logprobs = torch.log_softmax(logits.double(), dim=-1).gather(1, targets[:, None])[:, 0]
        nll += float(-logprobs.sum())
        nll2 += float((logprobs * logprobs).sum())
        count += len(targets)
        if on_logits is not None:
            on_logits(i, logits, targets)
        yield ChunkResult(i, n_chunks, math.exp(nll / count), nll, nll2, count)
