"""The KV cache: llama.cpp's unified cache, a set of cells over preallocated K/V tensors.

A cell holds one position and the set of sequences that share it. Sequences are ids, not separate
caches; the attention mask of a micro-batch is built from the cells, so any mix of sequences can
share a forward pass.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

# shift_keys(layer, k (n, n_head_kv, head_dim), delta (n,)) -> rotated k: re-applies the layer's RoPE
# for a position change.
KeyShifter = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class CacheState:
    """A copy of the cell bookkeeping, to restore the cache when a decode fails half-way."""

    pos: np.ndarray
    seq: np.ndarray


class KVCache:
    """Cells (position, sequence set) over K/V tensors of shape (n_layer, n_ctx, n_head_kv, head_dim)."""

    def __init__(
        self,
        *,
        n_layer: int,
        n_ctx: int,
        n_head_kv: int,
        head_dim: int,
        n_seq_max: int,
        shift_keys: KeyShifter,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        self.n_ctx = n_ctx
        self.n_seq_max = n_seq_max
        self._shift_keys = shift_keys
        # empty, not zeros: pages are committed as cells get written, so a 4096-cell cache costs memory
        # only for what is used. Attention reads cells [0, n_span) only, and every one of those has been
        # written (slots are taken lowest first), so no uninitialized value is ever read.
        # (n_layer, n_ctx, n_head_kv, head_dim): a cell's heads are one contiguous row, so writing and
        # gathering cells (parallel sequences) copies whole rows: 5x faster than a head-major layout
        shape = (n_layer, n_ctx, n_head_kv, head_dim)
        try:
            self.k = torch.empty(shape, dtype=dtype, device=device)
            self.v = torch.empty(shape, dtype=dtype, device=device)
        except (RuntimeError, MemoryError) as e:  # torch reports a failed allocation as RuntimeError
            size = 2 * torch.Size(shape).numel() * torch.empty(0, dtype=dtype).element_size()
            raise MemoryError(
                f"cannot allocate a KV cache of {n_ctx} cells ({size / 2**30:.1f} GiB): use a smaller context"
            ) from e
        # each layer's (k, v) views, (n_ctx, n_head_kv, head_dim): indexed once, not per decode step
        self.layers = list(zip(self.k.unbind(0), self.v.unbind(0), strict=True))
        self.pos = np.full(n_ctx, -1, dtype=np.int64)  # -1: empty cell
        self.seq = np.zeros((n_ctx, n_seq_max), dtype=bool)  # seq[c, s]: cell c belongs to sequence s

    # ---- bookkeeping used by Context.decode -------------------------------------------------

    @property
    def n_used(self) -> int:
        return int((self.pos >= 0).sum())

    def n_span(self) -> int:
        """Cells [0, n_span) contain every occupied cell: attention only needs to look at those."""
        used = np.flatnonzero(self.pos >= 0)
        return int(used[-1]) + 1 if used.size else 0

    def find_slots(self, n_tokens: int) -> np.ndarray | None:
        """The lowest free cells for n_tokens new tokens, or None when the cache is full."""
        free = np.flatnonzero(self.pos < 0)
        if free.size < n_tokens:
            return None
        return free[:n_tokens]

    def occupy(self, cells: np.ndarray, pos: np.ndarray, seq: np.ndarray) -> None:
        """Claim cells for tokens at positions pos (n,) belonging to the sequences in seq (n, n_seq_max)."""
        self.pos[cells] = pos
        self.seq[cells] = seq

    def snapshot(self) -> CacheState:
        return CacheState(self.pos.copy(), self.seq.copy())

    def restore(self, state: CacheState) -> None:
        self.pos[:] = state.pos
        self.seq[:] = state.seq

    def attention_mask(self, pos: np.ndarray, seq: np.ndarray, n_kv: int) -> np.ndarray:
        """(n_tokens, n_kv) bool: token i sees cell c when they share a sequence and c is not in i's future."""
        shared = (seq.astype(np.uint8) @ self.seq[:n_kv].T.astype(np.uint8)) > 0
        return shared & (self.pos[None, :n_kv] <= pos[:, None]) & (self.pos[None, :n_kv] >= 0)

    def window_mask(self, mask: np.ndarray, pos: np.ndarray, window: int) -> np.ndarray:
        """mask (n_tokens, n_kv) narrowed to a sliding window: token at p sees cells at p0 > p - window
        (llama.cpp's is_masked_swa, LLAMA_SWA_TYPE_STANDARD)."""
        n_kv = mask.shape[1]
        return mask & (pos[:, None] - self.pos[None, :n_kv] < window)

    # ---- sequence operations (llama.cpp's llama_memory_seq_*) ---------------------------------

    def _select(self, seq_id: int, p0: int, p1: int) -> np.ndarray:
        """Cells of seq_id (any sequence when seq_id < 0) with position in [p0, p1); p < 0 means open."""
        self._check_seq(seq_id, allow_any=True)
        lo = 0 if p0 < 0 else p0
        hi = np.iinfo(np.int64).max if p1 < 0 else p1
        in_range = (self.pos >= lo) & (self.pos < hi)
        member = (self.pos >= 0) if seq_id < 0 else self.seq[:, seq_id]
        return in_range & member

    def _check_seq(self, seq_id: int, allow_any: bool = False) -> None:
        if seq_id >= self.n_seq_max or (seq_id < 0 and not allow_any):
            raise ValueError(f"sequence id {seq_id} is outside [0, {self.n_seq_max})")

    def _free_orphans(self) -> None:
        self.pos[~self.seq.any(axis=1)] = -1

    def clear(self) -> None:
        self.pos[:] = -1
        self.seq[:] = False

    def seq_rm(self, seq_id: int, p0: int = -1, p1: int = -1) -> bool:
        """Remove seq_id (every sequence if < 0) from cells with position in [p0, p1)."""
        sel = self._select(seq_id, p0, p1)
        if seq_id < 0:
            self.seq[sel] = False
        else:
            self.seq[sel, seq_id] = False
        self._free_orphans()
        return True

    def seq_cp(self, src: int, dst: int, p0: int = -1, p1: int = -1) -> None:
        """Make dst share src's cells in [p0, p1): no K/V is copied, the cells gain a sequence."""
        self._check_seq(src)
        self._check_seq(dst)
        if src == dst:
            return
        self.seq[self._select(src, p0, p1), dst] = True

    def seq_keep(self, seq_id: int) -> None:
        """Drop every sequence but seq_id."""
        self._check_seq(seq_id)
        keep = self.seq[:, seq_id].copy()
        self.seq[:] = False
        self.seq[keep, seq_id] = True
        self._free_orphans()

    def seq_add(self, seq_id: int, p0: int, p1: int, delta: int) -> None:
        """Shift positions in [p0, p1) by delta and re-rotate the cached keys (llama.cpp's K-shift)."""
        if delta == 0:
            return
        sel = self._select(seq_id, p0, p1)
        self._move(np.flatnonzero(sel), self.pos[sel] + delta)

    def seq_div(self, seq_id: int, p0: int, p1: int, d: int) -> None:
        """Divide positions in [p0, p1) by d (integer division), re-rotating keys; for self-extend."""
        if d <= 0:
            raise ValueError(f"seq_div needs a positive divisor, got {d}")
        if d == 1:
            return
        sel = self._select(seq_id, p0, p1)
        self._move(np.flatnonzero(sel), self.pos[sel] // d)

    def _move(self, cells: np.ndarray, new_pos: np.ndarray) -> None:
        if cells.size == 0:
            return
        delta = torch.from_numpy(new_pos - self.pos[cells]).to(self.k.device)
        idx = torch.from_numpy(cells).to(self.k.device)
        for layer in range(self.k.shape[0]):
            rotated = self._shift_keys(layer, self.k[layer, idx], delta)  # (n, n_head_kv, head_dim)
            self.k[layer, idx] = rotated.to(self.k.dtype)
        self.pos[cells] = new_pos
        gone = cells[new_pos < 0]  # llama.cpp frees cells shifted below position 0
        self.pos[gone] = -1
        self.seq[gone] = False

    def seq_pos_min(self, seq_id: int) -> int:
        self._check_seq(seq_id)
        p = self.pos.min(initial=np.iinfo(np.int64).max, where=self.seq[:, seq_id])
        return -1 if p == np.iinfo(np.int64).max else int(p)

    def seq_pos_max(self, seq_id: int) -> int:
        self._check_seq(seq_id)
        return int(self.pos.max(initial=-1, where=self.seq[:, seq_id]))
