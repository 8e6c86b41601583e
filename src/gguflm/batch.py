"""Batch: what `Context.decode` takes, after llama.cpp's `llama_batch`.

A batch carries token ids *or* embedding vectors, plus per token: a position, the sequences it belongs
to and whether its output (logits / embedding) is wanted. Missing fields are filled by decode
(`pos=None`: continue each sequence; `seq_ids=None`: sequence 0; `output=None`: last token only, or
every token when the context computes embeddings). Checking happens in decode, which answers -1 for
an invalid batch, as llama_decode does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class Batch:
    tokens: torch.Tensor | None = None  # (n,) int64 token ids
    embd: torch.Tensor | None = None  # (n, n_embd) float input embeddings
    pos: list[int] | None = None  # (n,) positions
    seq_ids: list[list[int]] | None = None  # per token, the sequences it belongs to
    output: list[bool] | None = None  # per token, whether its output is wanted

    @classmethod
    def from_tokens(
        cls,
        tokens: Sequence[int] | torch.Tensor,
        pos: Sequence[int] | None = None,
        seq_ids: Sequence[Sequence[int] | int] | None = None,
        output: Sequence[bool] | None = None,
    ) -> Batch:
        ids = torch.as_tensor(tokens, dtype=torch.long).reshape(-1)
        return cls(tokens=ids, pos=_ints(pos), seq_ids=_seq_lists(seq_ids), output=_bools(output))

    @classmethod
    def from_embeddings(
        cls,
        embd: torch.Tensor,
        pos: Sequence[int] | None = None,
        seq_ids: Sequence[Sequence[int] | int] | None = None,
        output: Sequence[bool] | None = None,
    ) -> Batch:
        vectors = torch.as_tensor(embd)
        return cls(embd=vectors, pos=_ints(pos), seq_ids=_seq_lists(seq_ids), output=_bools(output))

    @property
    def n_tokens(self) -> int:
        if self.tokens is not None:
            return int(self.tokens.shape[0])
        if self.embd is not None:
            return int(self.embd.shape[0]) if self.embd.dim() >= 1 else 0
        return 0


def _ints(values: Sequence[int] | None) -> list[int] | None:
    return None if values is None else [int(v) for v in values]


def _bools(values: Sequence[bool] | None) -> list[bool] | None:
    return None if values is None else [bool(v) for v in values]


def _seq_lists(values: Sequence[Sequence[int] | int] | None) -> list[list[int]] | None:
    if values is None:
        return None
    return [[int(v)] if isinstance(v, int) else [int(s) for s in v] for v in values]
