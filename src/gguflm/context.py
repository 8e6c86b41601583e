"""Context: llama.cpp's llama_context. `decode` checks a batch, splits it into micro-batches, places
them in the KV cache and runs the transformer; outputs (logits, embeddings, pooled embeddings) are
read afterwards by batch index or sequence id.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch

from gguflm.batch import Batch
from gguflm.kv_cache import KVCache
from gguflm.model import Model
from gguflm.models import SequenceGroup, UBatch

log = logging.getLogger("gguflm")

POOLING_TYPES = ("none", "mean", "cls", "last", "rank")

DECODE_OK = 0
DECODE_NO_SLOT = 1  # the KV cache has no room for the batch; the cache is unchanged
DECODE_INVALID = -1  # the batch is invalid; the cache is unchanged


def normalize(vec: torch.Tensor | np.ndarray | list[float], embd_normalize: int = 2) -> np.ndarray:
    """llama.cpp's common_embd_normalize: -1 none, 0 max-abs scaled to int16, 1 taxicab, 2 euclidean, p>2 p-norm.

    The sum is accumulated in double and the scale applied in float, as llama.cpp does.
    """
    x = np.asarray(vec.detach().cpu() if isinstance(vec, torch.Tensor) else vec, dtype=np.float32)
    x64 = x.astype(np.float64)
    if embd_normalize < 0:
        total = 1.0
    elif embd_normalize == 0:
        total = float(np.abs(x64).max(initial=0.0)) / 32760.0
    elif embd_normalize == 2:
        total = math.sqrt(float((x64 * x64).sum()))
    else:
        total = float((np.abs(x64) ** embd_normalize).sum()) ** (1.0 / embd_normalize)
    scale = np.float32(1.0 / total) if total > 0.0 else np.float32(0.0)
    return x * scale


def _seq_keys(seq: np.ndarray) -> np.ndarray | None:
    """(n, n_seq_max) bool -> (n,) uint64, one bit per sequence; None past 64 sequences."""
    if seq.shape[1] > 64:
        return None
    packed = np.zeros((len(seq), 8), dtype=np.uint8)
    packed[:, : (seq.shape[1] + 7) // 8] = np.packbits(seq, axis=1, bitorder="little")
    return packed.view(np.uint64).reshape(-1)


def _is_causal(mask: np.ndarray) -> bool:
    """A square lower-triangular mask: attention can skip it and mask causally (a fresh prefill)."""
    n_rows, n_cols = mask.shape
    return n_rows > 1 and n_rows == n_cols and np.array_equal(mask, np.tri(n_rows, dtype=bool))


class Context:
    """Decoding state over one model: the KV cache and the outputs of the last decode.

    On the int4 fallback (no native kernels), a context for several sequences (n_seq_max > 1) gives
    the model a bf16 copy of its output matrix (QuantizedLinear.keep_dense_copy), kept for every later
    context: parallel decoding runs 16 rows at a time through it.
    """

    def __init__(
        self,
        model: Model,
        n_ctx: int = 4096,
        n_batch: int = 2048,
        n_ubatch: int = 512,
        n_seq_max: int = 1,
        embeddings: bool = False,
        pooling: str = "none",
        kv_dtype: torch.dtype | None = None,
        exit_layer: int | None = None,
    ) -> None:
        """exit_layer L: every decode runs only layers 0..L-1, then the final norm and the output head
        (early exit: a smaller, less accurate model; the KV cache holds those L layers only).
        kv_dtype: the cache's; by default float16 where the native kernels run (llama.cpp's default cache
        type: half the bytes a decode step's attention reads), else float32 (reference mode, torch)."""
        if pooling not in POOLING_TYPES:
            raise ValueError(f"unknown pooling {pooling!r} (expected one of {', '.join(POOLING_TYPES)})")
        if pooling == "rank":
            raise ValueError(
                f"pooling 'rank' needs a classification head (cls.output.weight); {model.path.name} has none"
            )
        if min(n_ctx, n_batch, n_ubatch, n_seq_max) <= 0:
            raise ValueError("n_ctx, n_batch, n_ubatch and n_seq_max must be positive")
        if n_ctx > model.args.n_ctx_train:
            log.warning(
                "n_ctx %d is larger than the model was trained for (%d)", n_ctx, model.args.n_ctx_train
            )
        n_layer = model.args.n_layer
        if exit_layer is not None and not 1 <= exit_layer <= n_layer:
            raise ValueError(
                f"exit layer {exit_layer} is out of range: {model.path.name} has layers 1..{n_layer}"
            )
        self.model = model
        self.exit_layer = exit_layer
        self.n_ctx = n_ctx
        self.n_batch = n_batch
        self.n_ubatch = min(n_ubatch, n_batch)
        self.n_seq_max = n_seq_max
        self.embeddings_enabled = embeddings
        self.pooling = pooling if embeddings else "none"
        if n_seq_max > 1 and self.pooling == "none":  # logits of a row per sequence and step: many rows
            model.transformer.output.keep_dense_copy()  # on the model, for every context: +2 bytes/weight
        args = model.args
        # llama.cpp's LongRoPE choice: long factors when a sequence may outgrow the original context
        self.long_context = n_ctx // n_seq_max > args.n_ctx_orig
        self.kv = KVCache(
            n_layer=exit_layer or args.n_layer,
            n_ctx=n_ctx,
            n_head_kv=args.n_head_kv,
            head_dim=args.head_dim,
            n_seq_max=n_seq_max,
            shift_keys=self._shift_keys,
            dtype=kv_dtype or (torch.float16 if model.transformer.kernels is not None else torch.float32),
            device=model.transformer.device,
        )
        self._out_row = np.zeros(0, dtype=np.int64)  # batch index -> output row, -1 when not an output
        self._hidden: torch.Tensor | None = None  # (n_out, n_embd)
        self._logits: torch.Tensor | None = None  # (n_out, n_vocab)
        self._pooled: dict[int, torch.Tensor] = {}
        self.n_decoded = 0  # tokens decoded over the context's life, for callers that count work

    def _shift_keys(self, layer: int, k: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return self.model.transformer.shift_keys(layer, k, delta, self.long_context)

    # ---- decode -------------------------------------------------------------------------------

    def decode(self, batch: Batch) -> int:
        """0 ok, 1 no KV slot for the batch, -1 invalid batch; on 1 and -1 the cache is unchanged."""
        checked = self._check(batch)
        if checked is None:
            return DECODE_INVALID
        pos, seq, output = checked
        n = batch.n_tokens
        cells = self.kv.find_slots(n)
        if cells is None:
            log.warning(
                "decode: no KV cache slot for %d tokens (%d of %d cells used)", n, self.kv.n_used, self.n_ctx
            )
            return DECODE_NO_SLOT
        state = self.kv.snapshot()
        # inference mode skips autograd's bookkeeping on every op: decode 14.7 -> 13.1 ms per token
        with torch.inference_mode():
            try:
                hidden = self._run(batch, pos, seq, output, cells)
            except BaseException:
                self.kv.restore(state)
                raise
            self._store_outputs(hidden, pos, seq, output)
        self.n_decoded += n
        return DECODE_OK

    def _check(self, batch: Batch) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """Validate the batch and fill its defaults: (pos (n,), seq (n, n_seq_max) bool, output (n,) bool)."""
        args = self.model.args
        if (batch.tokens is None) == (batch.embd is None):
            log.error("decode: a batch needs exactly one of tokens and embeddings")
            return None
        n = batch.n_tokens
        if n == 0:
            log.error("decode: n_tokens == 0")
            return None
        if n > self.n_batch:
            log.error("decode: n_tokens = %d > n_batch = %d", n, self.n_batch)
            return None
        if batch.tokens is not None:
            bad = (batch.tokens < 0) | (batch.tokens >= args.n_vocab)
            if bad.any():
                i = int(bad.int().argmax())
                log.error("decode: invalid token[%d] = %d", i, int(batch.tokens[i]))
                return None
        elif batch.embd is not None and (batch.embd.dim() != 2 or batch.embd.shape[1] != args.n_embd):
            log.error(
                "decode: embeddings have shape %s, expected (n_tokens, %d)",
                tuple(batch.embd.shape),
                args.n_embd,
            )
            return None
        for name, field in (("pos", batch.pos), ("seq_ids", batch.seq_ids), ("output", batch.output)):
            if field is not None and len(field) != n:
                log.error("decode: %s has %d entries for %d tokens", name, len(field), n)
                return None
        seq = np.zeros((n, self.n_seq_max), dtype=bool)
        for i, ids in enumerate(batch.seq_ids or [[0]] * n):
            if not ids:
                log.error("decode: token %d belongs to no sequence", i)
                return None
            for s in ids:
                if not 0 <= s < self.n_seq_max:
                    log.error("decode: invalid seq_id[%d] = %d >= n_seq_max = %d", i, s, self.n_seq_max)
                    return None
                seq[i, s] = True
        last_cached = {s: self.kv.seq_pos_max(s) for s in np.flatnonzero(seq.any(axis=0)).tolist()}
        if batch.pos is None:
            pos = np.empty(n, dtype=np.int64)
            next_pos = {s: p + 1 for s, p in last_cached.items()}
            first_seq = seq.argmax(axis=1)
            for i in range(n):
                pos[i] = next_pos[int(first_seq[i])]
                for s in np.flatnonzero(seq[i]).tolist():
                    next_pos[s] = int(pos[i]) + 1
        else:
            pos = np.asarray(batch.pos, dtype=np.int64)
            if (pos < 0).any():
                log.error("decode: negative position %d", int(pos.min()))
                return None
        for s, last in last_cached.items():
            p = np.sort(pos[seq[:, s]])
            if last >= 0 and p[0] != last + 1:
                log.error(
                    "decode: sequence %d continues at position %d, but its last cached position is %d "
                    "(positions must stay consecutive: %d)",
                    s,
                    int(p[0]),
                    last,
                    last + 1,
                )
                return None
            if len(p) > 1 and (np.diff(p) != 1).any():
                log.error("decode: the positions of sequence %d in the batch are not consecutive", s)
                return None
        if batch.output is not None and not (self.embeddings_enabled and self.pooling != "none"):
            output = np.asarray(batch.output, dtype=bool)
        elif self.embeddings_enabled:
            output = np.ones(n, dtype=bool)
        else:
            output = np.zeros(n, dtype=bool)
            output[-1] = True
        return pos, seq, output

    def _run(
        self, batch: Batch, pos: np.ndarray, seq: np.ndarray, output: np.ndarray, cells: np.ndarray
    ) -> torch.Tensor:
        """Decode micro-batches of at most n_ubatch tokens; returns (n_out, n_embd) hidden states."""
        transformer = self.model.transformer
        device = transformer.device
        windows = self.model.args.windows
        outs: list[torch.Tensor] = []
        n = batch.n_tokens
        for start in range(0, n, self.n_ubatch):
            sl = slice(start, min(start + self.n_ubatch, n))
            self.kv.occupy(cells[sl], pos[sl], seq[sl])
            n_kv = self.kv.n_span()
            mask = self.kv.attention_mask(pos[sl], seq[sl], n_kv)
            # a layer kind (global, or a sliding window) each: (T, n_kv) bool
            masks = {w: self.kv.window_mask(mask, pos[sl], w) if w else mask for w in windows}
            if batch.tokens is not None:
                x = transformer.embed(batch.tokens[sl])
            else:
                assert batch.embd is not None
                x = batch.embd[sl].to(device=device, dtype=torch.float32)
            out_rows = np.flatnonzero(output[sl])
            groups = self._sequence_groups(seq[sl], masks, n_kv)
            ub = UBatch(
                pos=torch.from_numpy(pos[sl]).to(device),
                cells=torch.from_numpy(cells[sl]).to(device),
                kv=self.kv,
                n_kv=n_kv,
                # a fresh prefill's mask is plain causal (None): the kernel skips the masked blocks
                masks={
                    w: None if _is_causal(m) else torch.from_numpy(m).to(device) for w, m in masks.items()
                },
                out_rows=torch.from_numpy(out_rows).to(device),
                groups=groups,
                from_tokens=batch.tokens is not None,
                long_context=self.long_context,
                n_layer_run=self.exit_layer or 0,
            )
            outs.append(transformer.forward(x, ub))
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    def _sequence_groups(
        self, seq: np.ndarray, masks: dict[int, np.ndarray], n_kv: int
    ) -> list[SequenceGroup] | None:
        """Each sequence set's rows, its cells in position order and its masks over them (one per layer
        kind), sets of the same shape stacked into one group: attention then sees what it sees when
        the set is decoded alone from an empty cache. None when the micro-batch holds one set that owns
        cells 0..n_kv-1 in position order already (the common case: one sequence)."""
        span_seq, span_pos = self.kv.seq[:n_kv], self.kv.pos[:n_kv]
        if (seq == seq[0]).all():  # one set: np.unique would take 0.13 ms per decode to say so
            sets, which = seq[:1], np.zeros(len(seq), dtype=np.int64)
        elif (keys := _seq_keys(seq)) is not None and len(np.unique(keys)) == len(seq):
            return self._one_row_sets(seq, keys, masks, span_seq, span_pos)
        else:
            sets, which = np.unique(seq, axis=0, return_inverse=True)
        if len(sets) == 1 and (span_seq & sets[0]).any(axis=1).all() and (np.diff(span_pos) > 0).all():
            return None
        which = which.reshape(-1)
        by_shape: dict[tuple, list[tuple[np.ndarray, np.ndarray, dict[int, np.ndarray | None]]]] = {}
        for g, members in enumerate(sets):
            rows = np.flatnonzero(which == g)
            cells = np.flatnonzero((span_seq & members).any(axis=1) & (span_pos >= 0))
            cells = cells[np.argsort(span_pos[cells], kind="stable")]
            subs = {w: m[np.ix_(rows, cells)] for w, m in masks.items()}
            sub_masks = {w: None if _is_causal(m) else m for w, m in subs.items()}
            causal = tuple(m is None for m in sub_masks.values())
            by_shape.setdefault((len(rows), len(cells), causal), []).append((rows, cells, sub_masks))
        device = self.model.transformer.device

        def stacked(parts: list[np.ndarray]) -> torch.Tensor:
            return torch.from_numpy(np.stack(parts)).to(device)

        groups = []
        for members in by_shape.values():
            first = members[0][2]
            group_masks = {
                w: None if first[w] is None else stacked([m[w] for _, _, m in members])  # type: ignore[misc]
                for w in masks
            }
            groups.append(
                SequenceGroup(
                    stacked([r for r, _, _ in members]), stacked([c for _, c, _ in members]), group_masks
                )
            )
        return groups

    def _one_row_sets(
        self,
        seq: np.ndarray,
        keys: np.ndarray,
        masks: dict[int, np.ndarray],
        span_seq: np.ndarray,
        span_pos: np.ndarray,
    ) -> list[SequenceGroup]:
        """_sequence_groups where every row is a set of its own (parallel decoding): every set's cells at
        once, not a loop of numpy calls per set (16 sequences: 0.75 ms per decode)."""
        span_keys = _seq_keys(span_seq)
        assert span_keys is not None
        member = ((keys[:, None] & span_keys[None, :]) != 0) & (span_pos >= 0)  # (T, n_kv)
        row, cell = np.nonzero(member)  # each row's cells in cell order
        cell = cell[np.lexsort((span_pos[cell], row))]  # then in position order (ties: cell order)
        counts = np.bincount(row, minlength=len(seq))
        starts = np.cumsum(counts) - counts
        device = self.model.transformer.device
        groups = []
        for n_cells in np.unique(counts).tolist():  # sets of the same size stacked
            rows = np.flatnonzero(counts == n_cells)  # (B,)
            cells = cell[starts[rows, None] + np.arange(n_cells)]  # (B, C)
            group_masks: dict[int, torch.Tensor | None] = {
                w: torch.from_numpy(m[rows[:, None], cells][:, None, :]).to(device) for w, m in masks.items()
            }  # (B, 1, C): one row is never _is_causal
            groups.append(
                SequenceGroup(
                    torch.from_numpy(rows[:, None]).to(device),
                    torch.from_numpy(cells).to(device),
                    group_masks,
                )
            )
        return groups

    def _store_outputs(
        self, hidden: torch.Tensor, pos: np.ndarray, seq: np.ndarray, output: np.ndarray
    ) -> None:
        out_idx = np.flatnonzero(output)
        self._out_row = np.full(len(output), -1, dtype=np.int64)
        self._out_row[out_idx] = np.arange(len(out_idx))
        self._hidden = hidden
        self._pooled = {}
        if self.pooling == "none":
            self._logits = self.model.transformer.logits(hidden) if len(out_idx) else None
            return
        self._logits = None
        for s in np.flatnonzero(seq.any(axis=0)).tolist():
            rows = np.flatnonzero(seq[:, s])  # every token is an output when pooling
            if self.pooling == "mean":
                self._pooled[s] = hidden[rows].mean(dim=0)
            elif self.pooling == "cls":
                self._pooled[s] = hidden[rows[np.argmin(pos[rows])]]
            else:  # last
                self._pooled[s] = hidden[rows[np.argmax(pos[rows])]]

    # ---- outputs ------------------------------------------------------------------------------

    def _row(self, i: int) -> int:
        n = len(self._out_row)
        if i == -1:
            rows = self._out_row[self._out_row >= 0]
            if not rows.size:
                raise ValueError("the last batch produced no outputs")
            return int(rows[-1])
        if not 0 <= i < n:
            raise IndexError(f"token index {i} is outside the last batch (n_tokens = {n})")
        if self._out_row[i] < 0:
            raise ValueError(f"token {i} of the last batch was not marked for output")
        return int(self._out_row[i])

    def logits(self, i: int = -1) -> torch.Tensor:
        """(n_vocab,) logits of token i of the last batch; -1: the last output.

        Made under torch.inference_mode, so read-only outside it: clone() a copy to change in place."""
        if self._logits is None:
            raise ValueError("no logits: nothing decoded yet, or the context pools embeddings")
        return self._logits[self._row(i)]

    def all_logits(self) -> torch.Tensor:
        """(n_out, n_vocab) logits of every output of the last batch, in batch order."""
        if self._logits is None:
            raise ValueError("no logits: nothing decoded yet, or the context pools embeddings")
        return self._logits

    def embeddings(self, i: int = -1) -> torch.Tensor:
        """(n_embd,) output embedding (final-normed hidden state) of token i of the last batch."""
        if not self.embeddings_enabled:
            raise ValueError("embeddings are off: create the Context with embeddings=True")
        if self.pooling != "none":
            raise ValueError(f"the context pools embeddings ({self.pooling}): use embeddings_seq(seq_id)")
        assert self._hidden is not None
        return self._hidden[self._row(i)]

    def embeddings_seq(self, seq_id: int) -> torch.Tensor:
        """(n_embd,) pooled embedding of a sequence of the last batch."""
        if not self.embeddings_enabled or self.pooling == "none":
            raise ValueError(
                "no pooled embeddings: create the Context with embeddings=True and a pooling type"
            )
        if seq_id not in self._pooled:
            raise ValueError(f"sequence {seq_id} was not in the last batch")
        return self._pooled[seq_id]
