"""The 32-element formats Q4_0, Q4_1, Q5_0, Q5_1, Q8_0: llama.cpp's quantizers, vectorized over blocks.

Without an importance matrix these are ggml-quants.c's `quantize_row_*_ref` (and gguf-py's numpy
ports of them); with one, the `quantize_row_*_impl` weighted searches.
"""

from __future__ import annotations

import torch

from gguflm.quantize.search import make_qkx_quants, make_qx_quants, rdiv, seq_sum, sqrtf

QK = 32


def f16_bytes(v: torch.Tensor) -> torch.Tensor:
    """(nb,) float32 -> (nb, 2) uint8: the f16 value, little-endian, as GGML_FP32_TO_FP16 stores it."""
    return v.to(torch.float16).contiguous().view(torch.uint8).view(-1, 2)


def nibbles(codes: torch.Tensor) -> torch.Tensor:
    """(nb, 32) codes -> (nb, 16) bytes: element j in the low nibble of byte j, j + 16 in the high."""
    c = codes.to(torch.uint8)
    return (c[:, :16] & 0x0F) | ((c[:, 16:] & 0x0F) << 4)


def high_bits(codes: torch.Tensor) -> torch.Tensor:
    """(nb, 32) 5-bit codes -> (nb, 4) bytes: bit 4 of element j at bit j of a little-endian uint32."""
    bits = ((codes.to(torch.int64) >> 4) & 1).view(-1, 4, 8)
    return (bits << torch.arange(8)).sum(dim=-1).to(torch.uint8)


def _inverse(d: torch.Tensor) -> torch.Tensor:
    """`d ? 1.0f/d : 0.0f`."""
    safe = torch.where(d == 0, torch.ones_like(d), d)
    return torch.where(d == 0, 0.0, rdiv(1.0, safe))


def _absmax_signed(x: torch.Tensor) -> torch.Tensor:
    """The element of largest |x|, the first one (llama.cpp's `if (amax < fabsf(v))`)."""
    idx = x.abs().argmax(dim=-1, keepdim=True)
    return x.gather(-1, idx).squeeze(-1)


def _row_weights(x: torch.Tensor, qw: torch.Tensor, n_per_row: int) -> torch.Tensor:
    """qw * sqrt(sigma2 + x^2), sigma2 the row's mean square: the weights of the legacy `_impl`s."""
    rows = x.view(-1, n_per_row)
    sigma2 = seq_sum(rows * rows) / n_per_row  # (n_rows,)
    w = qw.view(1, n_per_row) * sqrtf(sigma2.unsqueeze(-1) + rows * rows)
    return w.view(-1, QK)


def quantize_q4_0(x: torch.Tensor, qw: torch.Tensor | None = None, n_per_row: int = QK) -> torch.Tensor:
    if qw is not None:
        d, codes = make_qx_quants(8, x, 1, _row_weights(x, qw, n_per_row))
        return torch.cat([f16_bytes(d), nibbles(codes)], dim=1)
    d = _absmax_signed(x) / -8
    codes = torch.trunc(x * _inverse(d).unsqueeze(-1) + 8.5).clamp_(0, 15)
    return torch.cat([f16_bytes(d), nibbles(codes)], dim=1)


def quantize_q4_1(x: torch.Tensor, qw: torch.Tensor | None = None, n_per_row: int = QK) -> torch.Tensor:
    if qw is not None:
        d, neg_min, codes = make_qkx_quants(15, x, _row_weights(x, qw, n_per_row), -0.9, 0.05, 36, False)
        return torch.cat([f16_bytes(d), f16_bytes(-neg_min), nibbles(codes)], dim=1)
    lo, hi = x.min(dim=-1).values, x.max(dim=-1).values
    d = (hi - lo) / 15
    codes = torch.trunc((x - lo.unsqueeze(-1)) * _inverse(d).unsqueeze(-1) + 0.5).clamp_(0, 15)
    return torch.cat([f16_bytes(d), f16_bytes(lo), nibbles(codes)], dim=1)


def quantize_q5_0(x: torch.Tensor, qw: torch.Tensor | None = None, n_per_row: int = QK) -> torch.Tensor:
    if qw is not None:
        d, codes = make_qx_quants(16, x, 1, _row_weights(x, qw, n_per_row))
    else:
        d = _absmax_signed(x) / -16
        codes = torch.trunc(x * _inverse(d).unsqueeze(-1) + 16.5).clamp_(0, 31)
    return torch.cat([f16_bytes(d), high_bits(codes), nibbles(codes)], dim=1)


def quantize_q5_1(x: torch.Tensor, qw: torch.Tensor | None = None, n_per_row: int = QK) -> torch.Tensor:
    if qw is not None:
        d, neg_min, codes = make_qkx_quants(31, x, _row_weights(x, qw, n_per_row), -0.9, 0.05, 36, False)
        lo = -neg_min
    else:
        lo, hi = x.min(dim=-1).values, x.max(dim=-1).values
        d = (hi - lo) / 31
        codes = torch.trunc((x - lo.unsqueeze(-1)) * _inverse(d).unsqueeze(-1) + 0.5).clamp_(0, 31)
    return torch.cat([f16_bytes(d), f16_bytes(lo), high_bits(codes), nibbles(codes)], dim=1)


def roundf(v: torch.Tensor) -> torch.Tensor:
    """C's roundf: halves away from zero (torch.round takes them to even)."""
    r = torch.trunc(v)
    return r + torch.where((v - r).abs() >= 0.5, torch.sign(v), 0.0)


def quantize_q8_0(x: torch.Tensor, qw: torch.Tensor | None = None, n_per_row: int = QK) -> torch.Tensor:
    """Q8_0 ignores the importance matrix, as llama.cpp's quantize_q8_0 does."""
    d = x.abs().max(dim=-1).values / 127
    q = roundf(x * _inverse(d).unsqueeze(-1)).to(torch.int8).view(torch.uint8)
    return torch.cat([f16_bytes(d), q], dim=1)
