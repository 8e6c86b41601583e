"""The generation loop every caller shares: decode the prompt, then sample and decode one token at a time."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from gguflm.batch import Batch
from gguflm.context import DECODE_OK, Context, normalize
from gguflm.model import Model


class DecodeError(RuntimeError):
    """Context.decode refused a batch; the status says why (1: no KV room, -1: invalid batch)."""

    def __init__(self, status: int, what: str) -> None:
        reason = "the context is full" if status == 1 else "the batch is invalid"
        super().__init__(f"decode failed for {what} ({reason}, status {status})")
        self.status = status


def decode_tokens(ctx: Context, tokens: list[int], seq_id: int = 0) -> None:
    """Decode tokens for one sequence in batches of n_batch, continuing its cached positions."""
    if not tokens:
        raise ValueError("nothing to decode: the token list is empty")
    for start in range(0, len(tokens), ctx.n_batch):
        chunk = tokens[start : start + ctx.n_batch]
        output = [start + i == len(tokens) - 1 for i in range(len(chunk))]
        status = ctx.decode(Batch.from_tokens(chunk, seq_ids=[[seq_id]] * len(chunk), output=output))
        if status != DECODE_OK:
            raise DecodeError(status, f"{len(chunk)} prompt tokens")


def generate(
    ctx: Context,
    prompt: list[int],
    n_predict: int,
    sample: Callable[[torch.Tensor], int],
    seq_id: int = 0,
    stop_at_eog: bool = True,
) -> Iterator[int]:
    """Yield up to n_predict new tokens (n_predict < 0: until end of generation or a full context)."""
    n_prompt = len(prompt)
    if n_prompt >= ctx.n_ctx:
        raise ValueError(f"the prompt has {n_prompt} tokens, the context holds {ctx.n_ctx}")
    decode_tokens(ctx, prompt, seq_id)
    tokenizer = ctx.model.tokenizer
    n = 0
    while n_predict < 0 or n < n_predict:
        token = sample(ctx.logits(-1))
        if stop_at_eog and tokenizer.is_eog(token):
            return
        yield token
        n += 1
        if n == n_predict or ctx.kv.seq_pos_max(seq_id) + 1 >= ctx.n_ctx:
            return
        status = ctx.decode(Batch.from_tokens([token], seq_ids=[[seq_id]]))
        if status != DECODE_OK:
            raise DecodeError(status, "a generated token")


def embed(model: Model, prompts: list[list[int]], pooling: str, embd_normalize: int = 2) -> list[list[float]]:
    """Embeddings of tokenized prompts, like llama-embedding: one vector per prompt when pooling,
    one per token with pooling "none"; each normalized with llama.cpp's common_embd_normalize."""
    n_ctx = max(len(p) for p in prompts)
    ctx = Context(model, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, embeddings=True, pooling=pooling)
    vectors: list[list[float]] = []
    for tokens in prompts:
        ctx.kv.clear()
        status = ctx.decode(Batch.from_tokens(tokens))
        if status != DECODE_OK:
            raise DecodeError(status, "an embedding prompt")
        if pooling == "none":
            rows = [ctx.embeddings(i) for i in range(len(tokens))]
        else:
            rows = [ctx.embeddings_seq(0)]
        vectors.extend(normalize(r, embd_normalize).tolist() for r in rows)
    return vectors
