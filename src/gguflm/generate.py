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


def embed(
    model: Model, prompts: list[list[int]], pooling: str, embd_normalize: int = 2, n_batch: int = 2048
) -> list[list[float]]:
    """Embeddings of tokenized prompts, like llama-embedding: one vector per prompt when pooling,
    one per token with pooling "none"; each normalized with llama.cpp's common_embd_normalize.

    Prompts are packed in order into batches of up to n_batch tokens, a sequence each, as
    llama-embedding does: one forward per batch instead of one per prompt (64 short texts: 4x).
    Pooling "none" packs at most 512 tokens a batch: every token is an output, logits included.
    """
    if pooling == "none":
        n_batch = min(n_batch, 512)
    n_batch = max(n_batch, *map(len, prompts))
    batches: list[list[list[int]]] = []
    n_tokens = 0
    for tokens in prompts:
        if batches and n_tokens + len(tokens) <= n_batch:
            batches[-1].append(tokens)
            n_tokens += len(tokens)
        else:
            batches.append([tokens])
            n_tokens = len(tokens)
    ctx = Context(
        model,
        n_ctx=n_batch,
        n_batch=n_batch,
        n_ubatch=n_batch,
        n_seq_max=max(map(len, batches)),
        embeddings=True,
        pooling=pooling,
    )
    vectors: list[list[float]] = []
    for members in batches:
        ctx.kv.clear()
        batch = Batch.from_tokens(
            [t for tokens in members for t in tokens],
            pos=[p for tokens in members for p in range(len(tokens))],
            seq_ids=[[s] for s, tokens in enumerate(members) for _ in tokens],
        )
        status = ctx.decode(batch)
        if status != DECODE_OK:
            raise DecodeError(status, "an embedding batch")
        if pooling == "none":
            rows = [ctx.embeddings(i) for i in range(batch.n_tokens)]
        else:
            rows = [ctx.embeddings_seq(s) for s in range(len(members))]
        vectors.extend(normalize(r, embd_normalize).tolist() for r in rows)
    return vectors
