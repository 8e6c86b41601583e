"""Input vs output embeddings: is a token's row of the output matrix its "true" embedding?

The input matrix (`token_embd`) maps a token id to the vector that enters layer 0; the output matrix
(`output`, or `token_embd` again when the model ties them) scores every token against the last
hidden state. This module compares the two by cosine similarity: a token's nearest neighbours in
each, and over the whole vocabulary cos(input_i, output_i) and how much the neighbour lists overlap.

Everything streams the packed GGUF rows: at most `chunk` rows of a matrix are dequantized to
float32 at a time (QuantizedLinear.rows), never the whole matrix.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from gguflm.model import Model
from gguflm.quants import QuantizedLinear

CHUNK_ROWS = 2048


class Rows:
    """The rows of a packed (n_vocab, n_embd) matrix, each times `gain` (n_embd,) when given."""

    def __init__(self, matrix: QuantizedLinear, gain: torch.Tensor | None = None) -> None:
        self.matrix = matrix
        self.gain = gain
        self.n = matrix.out_features

    def take(self, ids: torch.Tensor) -> torch.Tensor:
        """(len(ids), n_embd) float32, dequantized from the packed bytes."""
        r = self.matrix.rows(ids)
        return r * self.gain if self.gain is not None else r

    def block(self, start: int, stop: int) -> torch.Tensor:
        return self.take(torch.arange(start, stop))


@dataclass
class Matrices:
    """A model's input rows and output rows, both as vectors of the residual stream.

    The logit of token i is <g * h / rms(h), W_out[i]> = <h / rms(h), g * W_out[i]>, g the final
    norm's gain: the direction that token i's logit reads from the last hidden state is g * W_out[i].
    `raw` compares the stored rows instead (identical when the model ties them)."""

    inp: Rows  # token_embd rows: what enters layer 0 (Gemma's sqrt(n_embd) scale changes no cosine)
    out: Rows  # output rows (token_embd when tied), times the final norm's gain unless raw
    tied: bool

    @classmethod
    def of(cls, model: Model, raw: bool = False) -> Matrices:
        t = model.transformer
        gain = None if raw else t.output_norm.float()
        return cls(Rows(t.tok_embd), Rows(t.output, gain), t.output is t.tok_embd)

    @property
    def n_vocab(self) -> int:
        return self.inp.n


def _chunks(n: int, chunk: int) -> list[tuple[int, int]]:
    return [(s, min(s + chunk, n)) for s in range(0, n, chunk)]


def row_norms(m: Rows, chunk: int = CHUNK_ROWS) -> torch.Tensor:
    """(n_vocab,) float32 L2 norms of every row."""
    return torch.cat([m.block(s, e).norm(dim=-1) for s, e in _chunks(m.n, chunk)])


def nearest(
    m: Rows,
    queries: torch.Tensor,
    k: int,
    norms: torch.Tensor | None = None,
    exclude: torch.Tensor | None = None,
    chunk: int = CHUNK_ROWS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k rows of m closest in cosine to each query: (ids (Q, k), cosines (Q, k)), best first.

    queries (Q, n_embd); exclude (Q,): a row id each query may not return (itself)."""
    norms = row_norms(m, chunk) if norms is None else norms
    q = torch.nn.functional.normalize(queries.float(), dim=-1)  # (Q, n_embd)
    best_cos = torch.full((len(q), k), -2.0)
    best_ids = torch.zeros((len(q), k), dtype=torch.long)
    for s, e in _chunks(m.n, chunk):
        cos = (q @ m.block(s, e).T) / norms[s:e].clamp_min(1e-12)  # (Q, e - s)
        if exclude is not None:
            inside = (exclude >= s) & (exclude < e)
            cos[inside.nonzero()[:, 0], exclude[inside] - s] = -2.0
        merged_cos = torch.cat((best_cos, cos), dim=1)
        merged_ids = torch.cat((best_ids, torch.arange(s, e).expand(len(q), -1)), dim=1)
        best_cos, pick = merged_cos.topk(k, dim=1)
        best_ids = merged_ids.gather(1, pick)
    return best_ids, best_cos


def token_neighbours(
    mats: Matrices, token: int, k: int, chunk: int = CHUNK_ROWS
) -> dict[str, list[tuple[int, float]]]:
    """A token's k nearest other tokens in the input and in the output matrix."""
    if not 0 <= token < mats.n_vocab:
        raise ValueError(f"token id {token} is out of range [0, {mats.n_vocab})")
    result = {}
    ids = torch.tensor([token])
    for name, m in (("input", mats.inp), ("output", mats.out)):
        found, cos = nearest(m, m.take(ids), k, exclude=ids, chunk=chunk)
        result[name] = [(int(i), float(c)) for i, c in zip(found[0], cos[0], strict=True)]
    return result


@dataclass
class VocabComparison:
    """The whole vocabulary (or every `stride`-th token) of a model's two matrices."""

    tied: bool
    cos_in_out: np.ndarray  # (n_vocab,) cos(input_i, output_i)
    overlap: np.ndarray  # (n_sampled,) |N_in(i) ∩ N_out(i)| / k for the sampled tokens
    sampled: np.ndarray  # (n_sampled,) their ids
    k: int
    chunk_bytes: int  # the largest float32 block held at once


def compare(mats: Matrices, k: int = 10, sample: int = 0, chunk: int = CHUNK_ROWS) -> VocabComparison:
    """cos(input_i, output_i) for every token; neighbour overlap for `sample` evenly spaced tokens
    (0: all of them; each query block streams both matrices once)."""
    n = mats.n_vocab
    n_embd = mats.inp.matrix.in_features
    cos = torch.cat(
        [
            torch.nn.functional.cosine_similarity(mats.inp.block(s, e), mats.out.block(s, e), dim=-1)
            for s, e in _chunks(n, chunk)
        ]
    )
    picked = torch.arange(n) if sample <= 0 or sample >= n else torch.linspace(0, n - 1, sample).long()
    norms_in, norms_out = row_norms(mats.inp, chunk), row_norms(mats.out, chunk)
    overlaps = []
    for s, e in _chunks(len(picked), chunk):
        ids = picked[s:e]
        n_in, _ = nearest(mats.inp, mats.inp.take(ids), k, norms_in, exclude=ids, chunk=chunk)
        n_out, _ = nearest(mats.out, mats.out.take(ids), k, norms_out, exclude=ids, chunk=chunk)
        same = (n_in[:, :, None] == n_out[:, None, :]).any(-1).sum(-1)  # (Q,)
        overlaps.append(same.float() / k)
    # the cosine block (chunk x chunk) and its merge with the best so far, dequantized chunks
    chunk_bytes = 4 * (2 * chunk * chunk + 3 * chunk * n_embd)
    return VocabComparison(
        mats.tied, cos.numpy(), torch.cat(overlaps).numpy(), picked.numpy(), k, chunk_bytes
    )
