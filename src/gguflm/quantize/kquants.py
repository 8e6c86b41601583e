"""The K-quants Q2_K .. Q6_K: llama.cpp's quantizers (ggml-quants.c), vectorized over super-blocks.

`x` is (nb, 256) float32, one super-block per row. Without an importance matrix each function is
`quantize_row_*_ref` (make_qkx2_quants, make_q3_quants, make_qx_quants); with `qw` (the imatrix
values of the super-block's 256 columns, (nb, 256)) the weighted `quantize_row_*_impl`
(make_qkx3_quants, make_qp_quants for the sub-block scales).
"""

from __future__ import annotations

import torch

from gguflm.quantize.legacy import f16_bytes
from gguflm.quantize.search import (
    GROUP_MAX_EPS,
    f16_round,
    first_absmax,
    make_q3_quants,
    make_qkx_quants,
    make_qp_quants,
    make_qx_quants,
    nearest_int,
    rdiv,
    seq_sum,
    sqrtf,
)

QK_K = 256


def _pack_2bit(codes: torch.Tensor) -> torch.Tensor:
    """(nb, 256) codes 0..3 -> (nb, 64): byte 32h + l holds elements 128h + l + 32s at bits 2s."""
    c = codes.to(torch.uint8).view(-1, 2, 4, 32)
    return (c[:, :, 0] | (c[:, :, 1] << 2) | (c[:, :, 2] << 4) | (c[:, :, 3] << 6)).view(-1, 64)


def _pack_nibbles_k(codes: torch.Tensor) -> torch.Tensor:
    """(nb, 256) codes 0..15 -> (nb, 128): byte 32h + l holds element 64h + l low, 64h + l + 32 high."""
    c = codes.to(torch.uint8).view(-1, 4, 2, 32)
    return (c[:, :, 0] | (c[:, :, 1] << 4)).view(-1, 128)


def _pack_high_bits(bits: torch.Tensor) -> torch.Tensor:
    """(nb, 256) 0/1 -> (nb, 32): bit j of byte l is element 32 j + l (Q3_K's hmask, Q5_K's qh)."""
    b = bits.to(torch.uint8).view(-1, 8, 32)
    return (b << torch.arange(8, dtype=torch.uint8).view(1, 8, 1)).sum(dim=1, dtype=torch.uint8)


def _pack_scales_k4(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """Q4_K/Q5_K: 8 six-bit (scale, min) pairs -> 12 bytes (get_scale_min_k4's layout)."""
    ls, lm = ls.to(torch.uint8), lm.to(torch.uint8)
    low = torch.cat([ls[:, :4], lm[:, :4]], dim=1)  # bytes 0..7: 6 bits each ...
    low = low | (torch.cat([ls[:, 4:], lm[:, 4:]], dim=1) >> 4) << 6  # ... + the top of scales 4..7
    mixed = (ls[:, 4:] & 0x0F) | ((lm[:, 4:] & 0x0F) << 4)  # bytes 8..11
    return torch.cat([low, mixed], dim=1)


def _pack_scales_q3(ls: torch.Tensor) -> torch.Tensor:
    """Q3_K: 16 six-bit scales (already offset by 32) -> 12 bytes."""
    ls = ls.to(torch.uint8)
    low = (ls[:, :8] & 0x0F) | ((ls[:, 8:] & 0x0F) << 4)  # (nb, 8)
    top = (ls >> 4).view(-1, 4, 4)  # [j // 4, j % 4]
    high = top[:, 0] | (top[:, 1] << 2) | (top[:, 2] << 4) | (top[:, 3] << 6)  # (nb, 4)
    return torch.cat([low, high], dim=1)


def _requantize(
    x: torch.Tensor, codes: torch.Tensor, d: torch.Tensor, lo: int, hi: int, offset: torch.Tensor | None
) -> torch.Tensor:
    """Codes again from the stored (f16, integer) sub-block scales d (nb, S): where d == 0 the search's
    codes stay. offset: the sub-block's min to add first, or None for symmetric formats."""
    nb, n_sub = d.shape
    xs = x.view(nb, n_sub, -1)
    num = xs + offset.unsqueeze(-1) if offset is not None else xs
    safe = torch.where(d == 0, torch.ones_like(d), d)
    fresh = nearest_int(num / safe.unsqueeze(-1)).clamp_(lo, hi) - lo
    return torch.where((d == 0).unsqueeze(-1), codes.view(nb, n_sub, -1), fresh).view(nb, QK_K)


def _super_sigma2(x: torch.Tensor, factor: int) -> torch.Tensor:
    """factor * sum(x^2) / 256 per super-block (nb, 1), summed in order."""
    return (factor * seq_sum(x * x) / QK_K).unsqueeze(-1)


def _max_positive(v: torch.Tensor) -> torch.Tensor:
    """The loop `if (v > m) m = v` from m = 0: the largest value, or 0."""
    m = v.max(dim=-1).values
    return torch.where(m > 0, m, 0.0)  # +0, never the -0 a flat group's -min can be


def _k4_scales(
    scales: torch.Tensor, mins: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K ref: 6-bit sub-block scales and mins against the largest -> (ls, lm, d, dmin)."""
    max_scale, max_min = _max_positive(scales), _max_positive(mins)

    def six_bits(v: torch.Tensor, vmax: torch.Tensor) -> torch.Tensor:
        inv = torch.where(vmax > 0, rdiv(63.0, torch.where(vmax > 0, vmax, 1.0)), 0.0)
        return (nearest_int(inv.unsqueeze(-1) * v) & 0xFF).clamp_(max=63)  # uint8_t, then MIN(63, .)

    return six_bits(scales, max_scale), six_bits(mins, max_min), max_scale / 63, max_min / 63


def _k4_sub_blocks(
    x: torch.Tensor, nmax: int, qw: torch.Tensor | None, ref_search: tuple[float, float, int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K: codes and the packed (ls, lm, d, dmin) of 8 sub-blocks of 32."""
    nb = x.shape[0]
    xs = x.view(nb * 8, 32)
    if qw is None:
        sum_x2 = seq_sum(xs * xs)
        av_x = sqrtf(sum_x2 / 32).unsqueeze(-1)
        weights = av_x + xs.abs()
        rmin, rdelta, nstep = ref_search
        scales, mins, codes = make_qkx_quants(nmax, xs, weights, rmin, rdelta, nstep, False)
        ls, lm, d, dmin = _k4_scales(scales.view(nb, 8), mins.view(nb, 8))
    else:
        sigma2 = _super_sigma2(x, 2)
        weights = (qw * sqrtf(sigma2 + x * x)).view(nb * 8, 32)
        sw = seq_sum(weights).view(nb, 8)
        scales, mins, codes = make_qkx_quants(nmax, xs, weights, -0.9, 0.05, 36, False)
        d, ls = make_qp_quants(63, scales.view(nb, 8), sw)
        dmin, lm = make_qp_quants(63, mins.view(nb, 8), sw)
        ls, lm = ls.clamp(max=63), lm.clamp(max=63)
    return codes.view(nb, QK_K), ls, lm, d, dmin, weights


def _k4_codes(
    x: torch.Tensor,
    codes: torch.Tensor,
    ls: torch.Tensor,
    lm: torch.Tensor,
    d: torch.Tensor,
    dmin: torch.Tensor,
    nmax: int,
) -> torch.Tensor:
    d_sub = f16_round(d).unsqueeze(-1) * ls.float()  # (nb, 8)
    m_sub = f16_round(dmin).unsqueeze(-1) * lm.float()
    return _requantize(x, codes, d_sub, 0, nmax, m_sub)


def quantize_q4_k(x: torch.Tensor, qw: torch.Tensor | None = None) -> torch.Tensor:
    codes, ls, lm, d, dmin, _ = _k4_sub_blocks(x, 15, qw, (-1.0, 0.1, 20))
    codes = _k4_codes(x, codes, ls, lm, d, dmin, 15)
    return torch.cat([f16_bytes(d), f16_bytes(dmin), _pack_scales_k4(ls, lm), _pack_nibbles_k(codes)], dim=1)


def quantize_q5_k(x: torch.Tensor, qw: torch.Tensor | None = None) -> torch.Tensor:
    codes, ls, lm, d, dmin, _ = _k4_sub_blocks(x, 31, qw, (-0.5, 0.1, 15))
    codes = _k4_codes(x, codes, ls, lm, d, dmin, 31)
    return torch.cat(
        [
            f16_bytes(d),
            f16_bytes(dmin),
            _pack_scales_k4(ls, lm),
            _pack_high_bits(codes >> 4),
            _pack_nibbles_k(codes & 0x0F),
        ],
        dim=1,
    )


def quantize_q2_k(x: torch.Tensor, qw: torch.Tensor | None = None) -> torch.Tensor:
    nb = x.shape[0]
    xs = x.view(nb * 16, 16)
    if qw is None:
        scales, mins, codes = make_qkx_quants(3, xs, xs.abs(), -0.5, 0.1, 15, True)
        scales, mins = scales.view(nb, 16), mins.view(nb, 16)
        max_scale, max_min = _max_positive(scales), _max_positive(mins)
        has_s, has_m = max_scale > 0, max_min > 0
        ls = torch.where(
            has_s.unsqueeze(-1),
            nearest_int(rdiv(15.0, torch.where(has_s, max_scale, 1.0)).unsqueeze(-1) * scales),
            0,
        )
        lm = torch.where(
            has_m.unsqueeze(-1),
            nearest_int(rdiv(15.0, torch.where(has_m, max_min, 1.0)).unsqueeze(-1) * mins),
            0,
        )
        d = torch.where(has_s, max_scale / 15, 0.0)
        dmin = torch.where(has_m, max_min / 15, 0.0)
    else:
        sigma2 = _super_sigma2(x, 1)
        weights = (qw * sqrtf(sigma2 + x * x)).view(nb * 16, 16)
        sw = seq_sum(weights).view(nb, 16)
        scales, mins, codes = make_qkx_quants(3, xs, weights, -0.9, 0.05, 36, False)
        d, ls = make_qp_quants(15, scales.view(nb, 16), sw)
        dmin, lm = make_qp_quants(15, mins.view(nb, 16), sw)
    packed = (ls | (lm << 4)) & 0xFF  # one byte per sub-block: scale low nibble, min high nibble
    d_sub = f16_round(d).unsqueeze(-1) * (packed & 0x0F).float()
    m_sub = f16_round(dmin).unsqueeze(-1) * (packed >> 4).float()
    codes = _requantize(x, codes.view(nb, QK_K), d_sub, 0, 3, m_sub)
    return torch.cat([packed.to(torch.uint8), _pack_2bit(codes), f16_bytes(d), f16_bytes(dmin)], dim=1)


def quantize_q3_k(x: torch.Tensor, qw: torch.Tensor | None = None) -> torch.Tensor:
    nb = x.shape[0]
    xs = x.view(nb * 16, 16)
    if qw is None:
        scales, codes = make_q3_quants(4, xs)
        scales = scales.view(nb, 16)
        _, max_scale = first_absmax(scales)
        has = max_scale != 0
        iscale = rdiv(-32.0, torch.where(has, max_scale, 1.0))
        ls = torch.where(
            has.unsqueeze(-1), nearest_int(iscale.unsqueeze(-1) * scales).clamp_(-32, 31) + 32, 0
        )
        d = torch.where(has, rdiv(1.0, iscale), 0.0)
    else:
        sigma2 = _super_sigma2(x, 2)
        weights = (qw * sqrtf(sigma2 + x * x)).view(nb * 16, 16)
        sw = seq_sum(weights).view(nb, 16)
        scales, codes = make_qx_quants(4, xs, 1, weights)
        d, ls = make_qx_quants(32, scales.view(nb, 16), 1, sw)
    d_sub = f16_round(d).unsqueeze(-1) * (ls - 32).float()
    codes = _requantize(x, codes.view(nb, QK_K), d_sub, -4, 3, None)
    return torch.cat(
        [_pack_high_bits(codes >> 2), _pack_2bit(codes & 3), _pack_scales_q3(ls), f16_bytes(d)], dim=1
    )


def quantize_q6_k(x: torch.Tensor, qw: torch.Tensor | None = None) -> torch.Tensor:
    nb = x.shape[0]
    xs = x.view(nb * 16, 16)
    scales, codes = make_qx_quants(32, xs, 1, qw.reshape(nb * 16, 16) if qw is not None else None)
    scales = scales.view(nb, 16)
    amax, max_scale = first_absmax(scales)
    zero = amax < GROUP_MAX_EPS
    iscale = rdiv(-128.0, torch.where(zero, 1.0, max_scale))
    d = torch.where(zero, 0.0, rdiv(1.0, iscale))
    sc = nearest_int(iscale.unsqueeze(-1) * scales).clamp_(max=127)
    sc = torch.where(zero.unsqueeze(-1), 0, sc)
    d_sub = f16_round(d).unsqueeze(-1) * sc.float()
    codes = _requantize(x, codes.view(nb, QK_K), d_sub, -32, 31, None)
    codes = torch.where(zero.unsqueeze(-1), 0, codes)  # llama.cpp zeroes the whole block
    c = codes.to(torch.uint8).view(nb, 2, 4, 32)  # [half, quarter, l]: element 128 h + 32 q + l
    ql = torch.cat(
        [c[:, :, 0] & 0x0F | (c[:, :, 2] & 0x0F) << 4, c[:, :, 1] & 0x0F | (c[:, :, 3] & 0x0F) << 4], dim=2
    )
    qh = (c[:, :, 0] >> 4) | ((c[:, :, 1] >> 4) << 2) | ((c[:, :, 2] >> 4) << 4) | ((c[:, :, 3] >> 4) << 6)
    return torch.cat(
        [ql.reshape(nb, 128), qh.reshape(nb, 64), sc.to(torch.int8).view(torch.uint8), f16_bytes(d)], dim=1
    )
