"""The LLaMA-family transformer, and `Model`: a GGUF file loaded into it with its tokenizer.

embeddings -> N x (RMSNorm, attention with RoPE and grouped KV heads, residual,
                   RMSNorm, SwiGLU, residual) -> RMSNorm -> output
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

from gguflm.config import ModelArgs
from gguflm.gguf_file import GGUFError, GGUFFile, TensorInfo
from gguflm.kv_cache import KVCache
from gguflm.quants import QuantizedLinear, dequantize
from gguflm.tokenizer import Tokenizer

MODES = ("fast", "reference")
PREFILL_ROWS = 64  # micro-batches of at least this many rows count as prefill
log = logging.getLogger("gguflm")


class Rope:
    """Rotary position embedding on adjacent pairs (llama.cpp's "normal" rope), as one complex product.

    NEOX-style models rotate the two halves of a head instead; their q/k weight rows are permuted at
    load (`neox_to_pairs`) so that the same code serves both: q.k is unchanged when q and k are
    permuted alike, and the permuted keys never leave the KV cache.
    """

    def __init__(self, args: ModelArgs, device: torch.device) -> None:
        half = args.rope_dim // 2
        exponent = torch.arange(half, dtype=torch.float64, device=device) * 2 / args.rope_dim
        self.inv_freq = (args.rope_freq_scale / args.rope_freq_base**exponent).float()  # (rope_dim/2,)
        self.rope_dim = args.rope_dim

    def rotation(self, pos: torch.Tensor) -> torch.Tensor:
        """(n,) positions -> (n, 1, rope_dim/2) unit complex numbers e^(i pos theta_j), one per pair."""
        angle = pos.to(torch.float32)[:, None, None] * self.inv_freq
        return torch.polar(torch.ones_like(angle), angle)

    def __call__(self, x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
        """x (n, heads, head_dim) float32 rotated by rotation (n, 1, rope_dim/2)."""
        n, heads, hd = x.shape
        rd = self.rope_dim
        part = x if rd == hd else x[..., :rd]
        pairs = torch.view_as_complex(part.view(n, heads, rd // 2, 2))  # (n, heads, rd/2)
        rotated = torch.view_as_real(pairs * rotation).view(n, heads, rd)
        return rotated if part is x else torch.cat((rotated, x[..., rd:]), dim=-1)


def neox_to_pairs(n_heads: int, head_dim: int, rope_dim: int) -> torch.Tensor:
    """Row order that turns NEOX halves (x_j, x_{j+rd/2}) into adjacent pairs, head by head."""
    half = rope_dim // 2
    within = torch.cat(
        (
            torch.stack((torch.arange(half), torch.arange(half) + half), dim=1).flatten(),
            torch.arange(rope_dim, head_dim),
        )
    )
    return (torch.arange(n_heads)[:, None] * head_dim + within[None, :]).flatten()


class SequenceGroup(NamedTuple):
    """Sequence sets of a micro-batch attended alone (Context._sequence_groups): B sets with R rows and
    C cells each, stacked."""

    rows: torch.Tensor  # (B, R) rows of the micro-batch
    cells: torch.Tensor  # (B, C) KV cells each set's rows may see, in position order
    mask: torch.Tensor | None  # (B, R, C) bool, True = may attend; None: plain causal (R == C)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """q (B, n_head, R, hd), k and v (B, n_head_kv, C, hd), mask (B, R, C) or None (causal)
    -> (B, n_head, R, hd). Each of the B problems gets the arithmetic it gets alone (B = 1)."""
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=None if mask is None else mask[:, None], is_causal=mask is None, enable_gqa=True
    )


@dataclass
class Layer:
    attn_norm: torch.Tensor  # (n_embd,)
    wqkv: QuantizedLinear  # n_embd -> (n_head + 2 n_head_kv) head_dim, Q/K/V fused
    wo: QuantizedLinear  # n_embd -> n_embd
    ffn_norm: torch.Tensor  # (n_embd,)
    w_gate_up: QuantizedLinear  # n_embd -> 2 n_ff, gate and up fused
    w_down: QuantizedLinear  # n_ff -> n_embd


class Transformer:
    """The forward pass over one micro-batch, reading and writing the KV cache through cells."""

    def __init__(self, args: ModelArgs, file: GGUFFile, mode: str, device: torch.device) -> None:
        self.args = args
        self.device = device
        # fast mode runs prefill attention in bf16 (AMX): 3x faster at 512 tokens than fp32
        self.attn_dtype_prefill = torch.bfloat16 if mode == "fast" else torch.float32
        self.rope = Rope(args, device)
        a = args
        hd = a.head_dim

        def tensor(name: str, shape: tuple[int, ...]) -> TensorInfo:
            info = file.tensor(name)
            if info.shape != shape:
                raise GGUFError(f"{file.path}: tensor {name!r} has shape {info.shape}, expected {shape}")
            return info

        def vector(name: str, n: int) -> torch.Tensor:
            info = tensor(name, (n,))
            return dequantize(info.data, info.qtype, info.shape).to(device)

        def linear(
            names: list[tuple[str, int]], n_in: int, biases: bool = False, neox_heads: tuple[int, ...] = ()
        ) -> QuantizedLinear:
            """One fused matrix; the first len(neox_heads) parts get their rows permuted for NEOX rope."""
            parts, bias_parts = [], []
            for j, (n, n_out) in enumerate(names):
                info = tensor(f"{n}.weight", (n_out, n_in))
                data = info.data
                bias = vector(f"{n}.bias", n_out) if biases else None
                if j < len(neox_heads):
                    perm = neox_to_pairs(neox_heads[j], hd, a.rope_dim)
                    data = data.view(n_out, -1)[perm].reshape(-1)
                    bias = bias[perm] if bias is not None else None
                parts.append((data, info.qtype, info.shape))
                bias_parts.append(bias)
            bias = torch.cat(bias_parts) if biases else None  # type: ignore[arg-type]
            return QuantizedLinear.concat(parts, mode=mode, bias=bias, device=device)

        self.tok_embd = linear([("token_embd", a.n_vocab)], a.n_embd)
        self.layers: list[Layer] = []
        for i in range(a.n_layer):
            file.release_pages()  # packing reads every page; keep the peak resident memory down as we go
            p = f"blk.{i}"
            self.layers.append(
                Layer(
                    attn_norm=vector(f"{p}.attn_norm.weight", a.n_embd),
                    wqkv=linear(
                        [
                            (f"{p}.attn_q", a.n_head * hd),
                            (f"{p}.attn_k", a.n_embd_kv),
                            (f"{p}.attn_v", a.n_embd_kv),
                        ],
                        a.n_embd,
                        biases=a.qkv_bias,
                        neox_heads=(a.n_head, a.n_head_kv) if a.rope_type == "neox" else (),
                    ),
                    wo=linear([(f"{p}.attn_output", a.n_embd)], a.n_head * hd),
                    ffn_norm=vector(f"{p}.ffn_norm.weight", a.n_embd),
                    w_gate_up=linear([(f"{p}.ffn_gate", a.n_ff), (f"{p}.ffn_up", a.n_ff)], a.n_embd),
                    w_down=linear([(f"{p}.ffn_down", a.n_embd)], a.n_ff),
                )
            )
        self.output_norm = vector("output_norm.weight", a.n_embd)
        self.output = self.tok_embd if a.tied_output else linear([("output", a.n_vocab)], a.n_embd)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """(n,) token ids -> (n, n_embd) float32 rows of the embedding matrix (llama.cpp's get_rows)."""
        return self.tok_embd.rows(tokens.to(self.device))

    def shift_keys(self, k: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """Cached keys k (n, n_head_kv, head_dim) re-rotated by a position change delta (n,): float32."""
        return self.rope(k.float(), self.rope.rotation(delta))

    def forward(
        self,
        x: torch.Tensor,  # (T, n_embd) input embeddings
        pos: torch.Tensor,  # (T,) positions
        cells: torch.Tensor,  # (T,) KV cells the tokens are written to
        kv: KVCache,
        mask: torch.Tensor | None,  # (T, n_kv) bool, True = may attend; None: causal over cells 0..T-1
        out_rows: torch.Tensor,  # (n_out,) rows of the micro-batch whose output is wanted
        groups: list[SequenceGroup] | None = None,
    ) -> torch.Tensor:
        """Returns (n_out, n_embd): the final-normed hidden states of the requested rows.

        `groups` (Context._sequence_groups), when a micro-batch holds several sequence sets: attention
        then runs for each set alone over its own cells in position order, the very call it gets when
        decoded alone (the kernel's sums depend on where keys sit and on how many there are, masked or
        not), so a sequence samples the same tokens whatever shares its batch.
        """
        a = self.args
        T = x.shape[0]
        n_kv = T if mask is None else mask.shape[1]
        hd, n_qk_heads = a.head_dim, a.n_head + a.n_head_kv
        qk_size = n_qk_heads * hd
        rotation = self.rope.rotation(pos)  # (T, 1, rope_dim/2)
        cache_dtype = kv.k.dtype
        for i, layer in enumerate(self.layers):
            h = F.rms_norm(x, (a.n_embd,), layer.attn_norm, a.norm_eps)
            qkv = layer.wqkv.mm(h.to(layer.wqkv.act_dtype)).float()  # (T, (n_head + 2 n_head_kv) hd)
            qk = self.rope(qkv[:, :qk_size].view(T, n_qk_heads, hd), rotation)  # (T, n_head + n_head_kv, hd)
            v = qkv[:, qk_size:].view(T, a.n_head_kv, hd)  # (T, n_head_kv, hd)
            k_new = qk[:, a.n_head :]  # (T, n_head_kv, hd)
            if cache_dtype != torch.float32:
                k_new, v = k_new.to(cache_dtype), v.to(cache_dtype)
            kv.k[i].index_copy_(0, cells, k_new)
            kv.v[i].index_copy_(0, cells, v)
            q = qk[:, : a.n_head].transpose(0, 1)  # (n_head, T, hd)
            cached_k, cached_v = kv.k[i, :n_kv], kv.v[i, :n_kv]  # (n_kv, n_head_kv, hd)
            if T >= PREFILL_ROWS:
                q = q.to(self.attn_dtype_prefill)
            if cached_k.dtype != q.dtype:
                cached_k, cached_v = cached_k.to(q.dtype), cached_v.to(q.dtype)
            keys, values = cached_k.transpose(0, 1), cached_v.transpose(0, 1)  # (n_head_kv, n_kv, hd)
            if groups is None:
                attn = attend(q[None], keys[None], values[None], None if mask is None else mask[None])[0]
            else:
                attn = torch.empty_like(q)  # (n_head, T, hd)
                for g in groups:
                    (n_sets, n_rows), n_cells = g.rows.shape, g.cells.shape[1]
                    g_rows, g_cells = g.rows.flatten(), g.cells.flatten()
                    # (B, n_head, R, hd) queries, (B, n_head_kv, C, hd) keys and values
                    q_g = q[:, g_rows].view(a.n_head, n_sets, n_rows, hd).transpose(0, 1)
                    # the same strides as the cache's own keys: the same arithmetic as alone
                    k_g = (
                        cached_k.index_select(0, g_cells)
                        .view(n_sets, n_cells, a.n_head_kv, hd)
                        .transpose(1, 2)
                    )
                    v_g = (
                        cached_v.index_select(0, g_cells)
                        .view(n_sets, n_cells, a.n_head_kv, hd)
                        .transpose(1, 2)
                    )
                    out = attend(q_g, k_g, v_g, g.mask)  # (B, n_head, R, hd)
                    attn[:, g_rows] = out.transpose(0, 1).reshape(a.n_head, n_sets * n_rows, hd)
            attn = attn.transpose(0, 1).reshape(T, a.n_head * hd)
            if i == a.n_layer - 1:  # only the requested rows go on (llama.cpp's inp_out_ids)
                attn, x = attn[out_rows], x[out_rows]
            x = x + layer.wo.mm(attn.to(layer.wo.act_dtype))
            h = F.rms_norm(x, (a.n_embd,), layer.ffn_norm, a.norm_eps)
            gate, up = layer.w_gate_up.mm(h.to(layer.w_gate_up.act_dtype)).chunk(2, dim=-1)  # (T, n_ff) each
            x = x + layer.w_down.mm((F.silu(gate) * up).to(layer.w_down.act_dtype))
        return F.rms_norm(x, (a.n_embd,), self.output_norm, a.norm_eps)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """(n, n_embd) normed hidden states -> (n, n_vocab) float32 logits."""
        return self.output(h)


def _return_freed_memory() -> None:
    """Hand the heap freed by weight packing back to the OS (glibc keeps it otherwise)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            log.debug("malloc_trim is not available")


class Model:
    """A GGUF model: metadata, ModelArgs, tokenizer and transformer weights (kept in their GGUF format)."""

    def __init__(
        self, file: GGUFFile, args: ModelArgs, tokenizer: Tokenizer, transformer: Transformer, mode: str
    ) -> None:
        self.mode = mode
        self.file = file
        self.args = args
        self.tokenizer = tokenizer
        self.transformer = transformer

    @classmethod
    def load(
        cls, path: str | os.PathLike[str], *, mode: str = "fast", device: str | torch.device = "cpu"
    ) -> Model:
        """Load a GGUF file. mode "fast" uses packed quantized kernels; "reference" is exact fp32."""
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r} (expected one of {MODES})")
        file = GGUFFile(path)
        args = ModelArgs.from_gguf(file)
        tokenizer = Tokenizer.from_metadata(file.metadata, source=str(file.path))
        if tokenizer.n_vocab != args.n_vocab:
            raise GGUFError(
                f"{file.path}: tokenizer has {tokenizer.n_vocab} tokens, the model {args.n_vocab}"
            )
        transformer = Transformer(args, file, mode, torch.device(device))
        file.release_pages()
        _return_freed_memory()
        return cls(file, args, tokenizer, transformer, mode)

    @property
    def path(self) -> Path:
        return self.file.path

    @property
    def n_vocab(self) -> int:
        return self.args.n_vocab

    @property
    def n_embd(self) -> int:
        return self.args.n_embd

    def token_embeddings(self, tokens: list[int] | torch.Tensor) -> torch.Tensor:
        """(n, n_embd) rows of the input embedding matrix, for Batch.from_embeddings."""
        ids = torch.as_tensor(tokens, dtype=torch.long)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.n_vocab):
            raise ValueError(f"token ids must be in [0, {self.n_vocab})")
        return self.transformer.embed(ids)
