"""GGML block formats in torch: exact dequantization, and a linear layer that keeps weights packed.

`dequantize` reproduces `gguf.quants.dequantize` bit for bit: the same f16 -> f32 scale conversion and
the same fp32 operations in the same order (no fused multiply-adds), so tests can demand equality.
"""

from __future__ import annotations

import ctypes
import mmap
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import gguf
import torch
import torch.nn.functional as F

from gguflm import kernels
from gguflm.cpu import (
    activation_levels,
    dequantized_prefill,
    has_fast_bf16,
    prefill_dtype,
    use_native_kernels,
)

QT = gguf.GGMLQuantizationType
QK_K = 256  # elements in a K-quant super-block

SUPPORTED_TYPES: tuple[QT, ...] = (
    QT.F32,
    QT.F16,
    QT.BF16,
    QT.Q4_0,
    QT.Q4_1,
    QT.Q5_0,
    QT.Q5_1,
    QT.Q8_0,
    QT.Q2_K,
    QT.Q3_K,
    QT.Q4_K,
    QT.Q5_K,
    QT.Q6_K,
)
FLOAT_TYPES: tuple[QT, ...] = (QT.F32, QT.F16, QT.BF16)


def _check_type(qtype: QT) -> QT:
    """Name the type in the error: callers see tensors by name and need to know which format is missing."""
    try:
        qtype = QT(qtype)
    except ValueError as e:
        raise ValueError(f"unknown GGML quantization type {qtype!r}") from e
    if qtype not in SUPPORTED_TYPES:
        supported = ", ".join(t.name for t in SUPPORTED_TYPES)
        raise ValueError(f"unsupported GGML type {qtype.name} (supported: {supported})")
    return qtype


def row_nbytes(qtype: QT, n: int) -> int:
    """Bytes of one row of `n` elements; rows of a GGUF matrix are whole blocks, back to back."""
    block, type_size = gguf.GGML_QUANT_SIZES[QT(qtype)]
    if n % block:
        raise ValueError(f"row length {n} is not a multiple of the {QT(qtype).name} block size {block}")
    return n // block * type_size


# ---------------------------------------------------------------------------------------------------
# Unpacking: raw block bytes -> integer codes and fp32 scales. Shared by dequantize and the int4 packer.
# ---------------------------------------------------------------------------------------------------


def _view_as(raw: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Bytes (last dim contiguous) reinterpreted as `dtype`, copying only when misaligned for it."""
    try:
        return raw.view(dtype)
    except RuntimeError:
        return raw.clone(memory_format=torch.contiguous_format).view(dtype)


def _f16(blocks: torch.Tensor, off: int) -> torch.Tensor:
    """The f16 field at byte `off` of every block as fp32 (nb, 1); exact, like numpy's astype."""
    return _view_as(blocks[:, off : off + 2], torch.float16).float()  # (nb, 2) bytes -> (nb, 1)


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """(..., n) bytes -> (..., 2n): low nibbles first, then high nibbles (the layout of every 4-bit field)."""
    qs = qs.contiguous()  # bit ops on a strided slice of the blocks are ~3x slower than copy + ops
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


def _bits(b: torch.Tensor, n_planes: int, width: int) -> torch.Tensor:
    """(..., n) bytes -> (..., n_planes, n): field i of byte j at [..., i, j], fields `width` bits wide."""
    b = b.contiguous()  # scalar shifts of contiguous bytes vectorize; broadcast tensor shifts do not
    mask = (1 << width) - 1
    return torch.stack([(b >> (i * width)) & mask for i in range(n_planes)], dim=-2)


def _k_scale_min(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K: 12 bytes of packed 6-bit (scale, min) pairs for 8 sub-blocks -> two (nb, 8) uint8."""
    d = scales[:, 0:4]  # (nb, 4) low 6 bits: scales 0-3; top 2 bits: high bits of scales 4-7
    m = scales[:, 4:8]  # (nb, 4) same for the mins
    md = scales[:, 8:12]  # (nb, 4) low nibble: scales 4-7, high nibble: mins 4-7
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)  # (nb, 8)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)  # (nb, 8)
    return sc, mn


_BYTE_BITS = ((torch.arange(256).unsqueeze(-1) >> torch.arange(8)) & 1).to(torch.uint8)  # (256, 8)


def _q5_codes(qh: torch.Tensor, qs: torch.Tensor) -> torch.Tensor:
    """Q5_0/Q5_1: 4 bytes of high bits (bit i = element i) + 16 nibble bytes -> (nb, 32) uint8 0..31."""
    table = _BYTE_BITS.to(qh.device)  # a lookup: 4x faster than shifting bits out in element order
    high = table.index_select(0, qh.reshape(-1).long()).view(qh.shape[0], 32)  # byte i // 8, bit i % 8
    return _nibbles(qs) | (high << 4)


def _k_high_bits(qh: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Q3_K/Q5_K: 32 bytes; bit j of byte l belongs to element 32*j + l -> (nb, n_groups, 256/n_groups)."""
    return _bits(qh, 8, 1).reshape(qh.shape[0], n_groups, QK_K // n_groups)


# The K-quant unpackers return fp32 scales and uint8 codes laid out (nb, groups, group).


def _unpack_q3_k(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> d (nb, 1) f32, sc (nb, 16) f32 in -32..31, q (nb, 16, 16) uint8 in 0..7 (value is q - 4)."""
    nb = blocks.shape[0]
    hmask, qs, scales = blocks[:, 0:32], blocks[:, 32:96], blocks[:, 96:108]
    d = _f16(blocks, 108)
    low = _bits(scales[:, 0:8], 2, 4).reshape(nb, 16)  # (nb, 16) low 4 bits of each scale
    high = _bits(scales[:, 8:12], 4, 2).reshape(nb, 16)  # (nb, 16) high 2 bits
    sc = (low | (high << 4)).float() - 32.0  # (nb, 16)
    ql = _bits(qs.reshape(nb, 2, 32), 4, 2).reshape(nb, 16, 16)  # (nb, 16, 16) 0..3
    qh = _k_high_bits(hmask, 16)  # (nb, 16, 16) 0/1: a clear bit subtracts 4
    return d, sc, ql | (qh << 2)


def _unpack_q6_k(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> d (nb, 1) f32, sc (nb, 16) f32 (int8 scales), q (nb, 16, 16) uint8 in 0..63 (value is q - 32)."""
    nb = blocks.shape[0]
    ql, qh = blocks[:, 0:128], blocks[:, 128:192]
    sc = blocks[:, 192:208].contiguous().view(torch.int8).float()  # (nb, 16)
    d = _f16(blocks, 208)
    low = _bits(ql.reshape(nb, 2, 64), 2, 4).reshape(nb, 8, 32)  # (nb, 8, 32) 0..15
    high = _bits(qh.reshape(nb, 2, 32), 4, 2).reshape(nb, 8, 32)  # (nb, 8, 32) 0..3
    q = (low | (high << 4)).reshape(nb, 16, 16)
    return d, sc, q


def _unpack_q2_k(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> dl, ml (nb, 16, 1) f32 per-sub-block scale and min, q (nb, 16, 16) uint8 in 0..3."""
    nb = blocks.shape[0]
    scales, qs = blocks[:, 0:16], blocks[:, 16:80]
    d, dmin = _f16(blocks, 80), _f16(blocks, 82)
    dl = (d * (scales & 0x0F).float()).unsqueeze(-1)  # (nb, 16, 1)
    ml = (dmin * (scales >> 4).float()).unsqueeze(-1)  # (nb, 16, 1)
    q = _bits(qs.reshape(nb, 2, 32), 4, 2).reshape(nb, 16, 16)
    return dl, ml, q


def _unpack_q45_k(blocks: torch.Tensor, five: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K -> s, mn (nb, 8, 1) f32 sub-block scale and min, q (nb, 8, 32) uint8."""
    nb = blocks.shape[0]
    d, dmin = _f16(blocks, 0), _f16(blocks, 2)
    sc, mn = _k_scale_min(blocks[:, 4:16])
    s = (d * sc.float()).unsqueeze(-1)  # (nb, 8, 1)
    m = (dmin * mn.float()).unsqueeze(-1)  # (nb, 8, 1)
    qs = blocks[:, 48:176] if five else blocks[:, 16:144]
    q = _nibbles(qs.reshape(nb, 4, 32)).reshape(nb, 8, 32)  # (nb, 8, 32)
    if five:
        q = q | (_k_high_bits(blocks[:, 16:48], 8) << 4)
    return s, m, q


# ---------------------------------------------------------------------------------------------------
# Dequantization: blocks (nb, type_size) uint8 -> (nb, block_size) fp32, in gguf's order of operations.
# ---------------------------------------------------------------------------------------------------


# In-place chains on the fresh fp32 codes: same roundings as gguf's d * q + m, without temporaries.


def _dq_q4_0(b: torch.Tensor) -> torch.Tensor:
    return _nibbles(b[:, 2:18]).float().sub_(8.0).mul_(_f16(b, 0))


def _dq_q4_1(b: torch.Tensor) -> torch.Tensor:
    return _nibbles(b[:, 4:20]).float().mul_(_f16(b, 0)).add_(_f16(b, 2))


def _dq_q5_0(b: torch.Tensor) -> torch.Tensor:
    return _q5_codes(b[:, 2:6], b[:, 6:22]).float().sub_(16.0).mul_(_f16(b, 0))


def _dq_q5_1(b: torch.Tensor) -> torch.Tensor:
    return _q5_codes(b[:, 4:8], b[:, 8:24]).float().mul_(_f16(b, 0)).add_(_f16(b, 2))


def _dq_q8_0(b: torch.Tensor) -> torch.Tensor:
    return b[:, 2:34].view(torch.int8).float().mul_(_f16(b, 0))


def _dq_q2_k(b: torch.Tensor) -> torch.Tensor:
    dl, ml, q = _unpack_q2_k(b)
    return q.float().mul_(dl).sub_(ml).view(b.shape[0], QK_K)


def _dq_q3_k(b: torch.Tensor) -> torch.Tensor:
    d, sc, q = _unpack_q3_k(b)
    return q.float().sub_(4.0).mul_((d * sc).unsqueeze(-1)).view(b.shape[0], QK_K)


def _dq_q4_k(b: torch.Tensor) -> torch.Tensor:
    s, m, q = _unpack_q45_k(b, five=False)
    return q.float().mul_(s).sub_(m).view(b.shape[0], QK_K)


def _dq_q5_k(b: torch.Tensor) -> torch.Tensor:
    s, m, q = _unpack_q45_k(b, five=True)
    return q.float().mul_(s).sub_(m).view(b.shape[0], QK_K)


def _dq_q6_k(b: torch.Tensor) -> torch.Tensor:
    d, sc, q = _unpack_q6_k(b)
    return q.float().sub_(32.0).mul_((d * sc).unsqueeze(-1)).view(b.shape[0], QK_K)


_DEQUANT_BLOCKS: dict[QT, Callable[[torch.Tensor], torch.Tensor]] = {
    QT.Q4_0: _dq_q4_0,
    QT.Q4_1: _dq_q4_1,
    QT.Q5_0: _dq_q5_0,
    QT.Q5_1: _dq_q5_1,
    QT.Q8_0: _dq_q8_0,
    QT.Q2_K: _dq_q2_k,
    QT.Q3_K: _dq_q3_k,
    QT.Q4_K: _dq_q4_k,
    QT.Q5_K: _dq_q5_k,
    QT.Q6_K: _dq_q6_k,
}


def dequantize(data: torch.Tensor, qtype: QT, shape: tuple[int, ...]) -> torch.Tensor:
    """Raw GGUF bytes (flat uint8, never written) -> fp32 tensor of `shape` (torch order, rows last).

    Bit-exact with `gguf.quants.dequantize`, so it is the reference every fast path is checked against.
    """
    qtype = _check_type(qtype)
    shape = tuple(int(s) for s in shape)
    n = 1
    for s in shape:
        n *= s
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    if shape and shape[-1] % block:
        raise ValueError(f"row length {shape[-1]} is not a multiple of the {qtype.name} block size {block}")
    n_bytes = n // block * type_size
    raw = data.reshape(-1)
    if raw.dtype != torch.uint8 or raw.numel() != n_bytes:
        raise ValueError(
            f"{qtype.name} tensor of shape {shape} needs {n_bytes} uint8 bytes, got {raw.numel()} {raw.dtype}"
        )
    if qtype == QT.F32:
        out = _view_as(raw, torch.float32).clone()
    elif qtype == QT.F16:
        out = _view_as(raw, torch.float16).float()
    elif qtype == QT.BF16:
        out = (_view_as(raw, torch.int16).to(torch.int32) << 16).view(torch.float32)
    else:
        out = _DEQUANT_BLOCKS[qtype](raw.view(-1, type_size))
    return out.reshape(shape)


# ---------------------------------------------------------------------------------------------------
# Int4 planes: every block format below as a sum of planes w = (q4 - 8) * s + z, q4 in 0..15, one
# (s, z) per group of `group` elements along a row -- the form torch's int4 CPU kernel computes.
# ---------------------------------------------------------------------------------------------------


class _Plane(NamedTuple):
    q4: torch.Tensor  # (nb, groups, group) integer codes 0..15
    s: torch.Tensor  # (nb, groups) fp32 scale
    z: torch.Tensor  # (nb, groups) fp32 zero: the weight of code 8


def _split5(q: torch.Tensor, s: torch.Tensor, z_low: torch.Tensor) -> list[_Plane]:
    """A 5-bit code q = low + 16 high as two exact planes: (low - 8) s + z_low, and (high + 8 - 8) 16 s."""
    return [_Plane(q & 0x0F, s, z_low), _Plane((q >> 4) + 8, 16 * s, torch.zeros_like(s))]


def _planes(qtype: QT, b: torch.Tensor) -> tuple[int, list[_Plane]]:
    """blocks (nb, type_size) -> (group size 32 or 16, planes) whose sum is the block's weights, exactly."""
    nb = b.shape[0]
    if qtype == QT.Q4_0:
        d = _f16(b, 0)
        return 32, [_Plane(_nibbles(b[:, 2:18]).view(nb, 1, 32), d, torch.zeros_like(d))]
    if qtype == QT.Q4_1:
        d, m = _f16(b, 0), _f16(b, 2)
        return 32, [_Plane(_nibbles(b[:, 4:20]).view(nb, 1, 32), d, m + 8 * d)]
    if qtype == QT.Q5_0:
        d = _f16(b, 0)
        return 32, _split5(_q5_codes(b[:, 2:6], b[:, 6:22]).view(nb, 1, 32), d, -8 * d)
    if qtype == QT.Q5_1:
        d, m = _f16(b, 0), _f16(b, 2)
        return 32, _split5(_q5_codes(b[:, 4:8], b[:, 8:24]).view(nb, 1, 32), d, m + 8 * d)
    if qtype == QT.Q8_0:
        d = _f16(b, 0)
        q = b[:, 2:34].contiguous().view(torch.int8).view(nb, 1, 32)  # (nb, 1, 32) -128..127 = 16 hi + lo
        return 32, [_Plane(q & 0x0F, d, 8 * d), _Plane((q >> 4) + 8, 16 * d, torch.zeros_like(d))]
    if qtype == QT.Q2_K:
        dl, ml, q = _unpack_q2_k(b)
        dl, ml = dl.squeeze(-1), ml.squeeze(-1)  # (nb, 16)
        return 16, [_Plane(q + 6, dl, 2 * dl - ml)]  # z: the weight of q = 2, mid-range, least bf16 error
    if qtype == QT.Q3_K:
        d, sc, q = _unpack_q3_k(b)
        s = d * sc  # (nb, 16)
        return 16, [_Plane(q + 4, s, torch.zeros_like(s))]
    if qtype in (QT.Q4_K, QT.Q5_K):
        s, m, q = _unpack_q45_k(b, five=qtype == QT.Q5_K)
        s, m = s.squeeze(-1), m.squeeze(-1)  # (nb, 8)
        if qtype == QT.Q4_K:
            return 32, [_Plane(q, s, 8 * s - m)]
        return 32, _split5(q, s, 8 * s - m)
    if qtype == QT.Q6_K:
        d, sc, q = _unpack_q6_k(b)
        s = d * sc  # (nb, 16); weight = s (q - 32) = s low + 16 s (high - 2); zeros are exact in bf16
        return 16, [_Plane(q & 0x0F, s, 8 * s), _Plane((q >> 4) + 6, 16 * s, torch.zeros_like(s))]
    raise ValueError(f"no int4 planes for {qtype.name}")


class _Int4Weight(NamedTuple):
    packed: torch.Tensor  # (n_pad, k_packed / 2) uint8, torch's opaque int4 CPU layout
    scales_zeros: torch.Tensor  # (k_packed / 32, n_pad, 2) bf16
    n_planes: int
    padded: bool  # 16-element groups, each padded to 32 with zero activations


def _pack_int4(qtype: QT, parts: Sequence[tuple[torch.Tensor, int]], k: int) -> _Int4Weight:
    """Pack row-major block bytes (parts of rows stacked along the output dim) for the int4 kernel.

    Activations are laid out [plane 0 | plane 1 | ...] along K, each plane padded per 16-group when the
    format's groups are 16 wide, so x' = cat([pad(x)] * n_planes) turns the sum of planes into one matmul.
    """
    _, type_size = gguf.GGML_QUANT_SIZES[qtype]
    row_bytes = row_nbytes(qtype, k)
    n_total = sum(n for _, n in parts)
    n_pad = -(-n_total // 16) * 16  # the packer wants N % 16 == 0; padded rows are sliced off the output
    packed: torch.Tensor | None = None  # (n_pad, k'/2) uint8, allocated once the plane layout is known
    sz: torch.Tensor | None = None  # (n_pad, k'/32, 2) bf16
    pending: list[torch.Tensor] = []  # code rows not packed yet: the packed layout repeats every 64 rows
    done = 0  # rows packed so far
    group, n_planes = 32, 1
    r = 0
    for data, n_rows in parts:
        rows = data.reshape(n_rows, row_bytes)
        for r0 in range(0, n_rows, _PACK_CHUNK_ROWS):  # bounded temporaries: peak memory stays low
            chunk = rows[r0 : r0 + _PACK_CHUNK_ROWS]
            n = chunk.shape[0]
            group, planes = _planes(qtype, chunk.reshape(-1, type_size))
            n_planes = len(planes)
            qs = []
            for p in planes:
                q4 = p.q4.reshape(n, k // group, group).to(torch.uint8)  # (n, groups, group)
                if group == 16:
                    q4 = torch.cat([q4, torch.full_like(q4, 8)], dim=-1)  # (n, groups, 32)
                qs.append(q4.reshape(n, -1))
            codes = torch.cat(qs, dim=-1)  # (n, k') uint8
            s = torch.cat([p.s.reshape(n, -1) for p in planes], dim=-1)  # (n, k'/32)
            z = torch.cat([p.z.reshape(n, -1) for p in planes], dim=-1)  # (n, k'/32)
            if packed is None or sz is None:
                packed = torch.empty(n_pad, codes.shape[1] // 2, dtype=torch.uint8)
                sz = torch.zeros(n_pad, s.shape[1], 2, dtype=torch.bfloat16)
            sz[r : r + n] = torch.stack([s, z], dim=-1)
            r += n
            pending.append(codes)
            if (r - done) % 64 == 0 or r == n_total:
                q = torch.cat(pending) if len(pending) > 1 else pending[0]  # (rows, k') uint8
                if r == n_total and n_pad > n_total:
                    q = torch.cat([q, q.new_full((n_pad - n_total, q.shape[1]), 8)])
                packed[done : done + q.shape[0]] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
                    q.to(torch.int32), 2
                )
                done += q.shape[0]
                pending = []
    assert packed is not None and sz is not None
    return _Int4Weight(
        packed=packed,
        scales_zeros=sz.transpose(0, 1).contiguous(),  # (k'/32, N, 2)
        n_planes=n_planes,
        padded=group == 16,
    )


_PACK_CHUNK_ROWS = 1024  # a multiple of 64
_REPACK_CHUNK_BYTES = 8 << 20  # of a big matrix's file bytes repacked at a time (QuantizedLinear._repacked)
_HUGE_PAGE = 2 << 20


def _huge_page_bytes(n: int) -> torch.Tensor:
    """n uint8 bytes, not yet resident, starting on a 2 MiB boundary and advised to be backed by 2 MiB pages
    where Linux's transparent huge pages allow it ("madvise" mode, a common default); plain memory
    elsewhere. The margin before the boundary is never touched, so it never becomes resident."""
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.empty(n, dtype=torch.uint8)
    area = mmap.mmap(-1, n + _HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    start = ctypes.addressof(ctypes.c_char.from_buffer(area))
    skip = -start % _HUGE_PAGE
    area.madvise(mmap.MADV_HUGEPAGE, skip, n // _HUGE_PAGE * _HUGE_PAGE)  # advice: the kernel may decline
    return torch.frombuffer(area, dtype=torch.uint8, offset=skip, count=n)  # keeps `area` alive


class _WeightPages:
    """Where repacked weights live: handed out one after another from 32 MiB areas of 2 MiB pages. Every
    decode step streams all of them, and with 4 KiB pages it misses the TLB every 4 KiB: Gemma 3 270M's
    178 MB Q8_0 head at one row took 4.7-5.5 ms on 2 threads, 2.8-3.1 ms on 2 MiB pages (AMD EPYC Zen 4).
    Most layer matrices are under 2 MiB, hence the shared areas. An area is freed when the last weight in
    it is; until then the pages of weights freed before stay resident (at most an area per model)."""

    AREA = 32 << 20

    def __init__(self) -> None:
        self._area: torch.Tensor | None = None
        self._used = 0

    def take(self, n: int) -> torch.Tensor:
        """n fresh bytes (flat uint8), 64-byte aligned."""
        if n >= self.AREA // 4:
            return _huge_page_bytes(n)
        if self._area is None or self._used + n > self._area.numel():
            self._area, self._used = _huge_page_bytes(self.AREA), 0
        out = self._area[self._used : self._used + n]
        self._used += -(-n // 64) * 64
        return out


_weight_pages = _WeightPages()


# ---------------------------------------------------------------------------------------------------
# The packed linear layer.
# ---------------------------------------------------------------------------------------------------

MODES = ("fast", "reference")
KERNELS = ("native", "int4", "bf16", "f32", "dequant")
# Rows of a decode step (parallel decode of up to 64 sequences, whose rows then get the result they get
# alone); more: a prefill, which on AMX machines dequantizes weights for bf16 tile products instead of
# running the native kernels (cpu.dequantized_prefill).
NATIVE_MAX_ROWS = 64
ALL_ROWS = 1 << 62  # packed_max_rows when a kernel takes any number of rows
# Formats the fast mode keeps as a bf16 matrix instead of int4 planes: Q6_K's 16-wide groups would need
# four padded planes (2.5 bytes/weight, no faster than bf16 at 2), F16 converts losslessly enough.
_BF16_COPY_TYPES = (QT.BF16, QT.F16, QT.Q6_K)
# Activation rows up to which the int4 kernel beats dequantizing to bf16 + a bf16 (AMX) matmul. The
# kernel's cost grows with M * K' * N (fp32 FMAs per row: ~10 us per row for 576x1536 at one plane,
# ~20 us at two); the other path costs one dequantization (~0.4-1.1 ms for 576x1536) plus a cheap matmul.
# Measured crossovers on 2 cores (benchmarks/bench_quants.py --split --shapes 576x1536): Q4_0/Q4_1 ~68,
# Q4_K ~72, Q5_0/Q5_1 ~42, Q5_K ~48, Q8_0 ~21, Q2_K ~34, Q3_K ~53.
_INT4_MAX_ROWS = {
    QT.Q4_0: 64,
    QT.Q4_1: 64,
    QT.Q4_K: 64,
    QT.Q5_0: 40,
    QT.Q5_1: 40,
    QT.Q5_K: 40,
    QT.Q8_0: 20,
    QT.Q2_K: 32,
    QT.Q3_K: 48,
    QT.Q6_K: 16,  # only with kernel="int4" forced: four padded planes
}
DENSE_ROWS = 16  # activation rows per matmul through a dense copy (keep_dense_copy)
_CHUNK_ELEMENTS = 1 << 20  # rows dequantized at a time: fp32 temporaries stay around 4 MiB


class QuantizedLinear(torch.nn.Module):
    """y = x W^T (+ b) with W kept in its GGUF block format: nothing dequantizes a whole model to float.

    mode="reference": W dequantized exactly to fp32 a chunk of rows at a time on every call, fp32 matmul.
    mode="fast": a kernel per format (attribute `kernel`):
      "native" (default where gguflm.kernels builds, for the formats in kernels.SUPPORTED) the GGUF
              bytes used as they are, activations quantized to 8 bits per block, integer dot products
              (AVX512-VNNI / AVX2), for any number of rows (on AMX machines up to NATIVE_MAX_ROWS,
              above that as "int4" does). Parts (fused q/k/v, gate/up) are copied into one buffer at
              load, 8 rows' blocks side by side: one call, no file pages.
      "int4"  Q4_0/Q4_1/Q4_K as one int4 plane; Q5_0/Q5_1/Q5_K/Q8_0 as two (the 5/8-bit code split into
              nibbles, scales 1 and 16); Q2_K/Q3_K as one plane, each 16-wide group padded to 32. The fallback
              where there are no native kernels (GGUFLM_KERNELS=torch, no compiler). Runs
              torch's int4 CPU kernel (bf16 activations, bf16 scales, fp32 accumulation) for up to
              `packed_max_rows` activation rows (decode); above that (prefill) each call dequantizes
              chunks of rows to bf16 and uses bf16 (AMX) matmuls, or to fp32 and fp32 matmuls where the
              CPU has no bf16 arithmetic (gguflm.cpu). Memory: 0.625 byte/weight for Q4_*,
              1.25 for the others, plus the GGUF bytes (memory-mapped) that rows() and prefill read.
      "bf16"  BF16/F16/Q6_K: a bf16 copy of W (BF16 used in place). Q6_K's 16-wide groups would take
              four padded int4 planes: 2.5 bytes/weight and 1.6x slower than bf16 at M=1.
      "f32"   F32: W used in place; BF16/F16/Q6_K as an fp32 copy where the CPU has no bf16 arithmetic.
    Measured on 2 cores (torch 2.13, AVX512-BF16 + AMX; benchmarks/bench_quants.py), ms per call,
    Q4_1 | Q8_0 fast mode, against dense fp32 F.linear on the dequantized weight:
      M=1    1536x576: 0.033 | 0.061 (fp32 0.031)    49152x576: 0.74 | 1.41 (fp32 2.5)
      M=16   1536x576: 0.17  | 0.35  (fp32 0.15)     49152x576: 5.5  | 11.1 (fp32 9.5)
      M=512  1536x576: 1.19  | 0.96  (fp32 2.5)      49152x576: 86   | 51   (fp32 115)
    The int4 kernel does fp32 FMAs per activation row, so its cost grows with M; bf16 matmuls on AMX
    are ~6x faster than fp32 but need the weights in bf16, which are dequantized per call, not kept.
    """

    def __init__(
        self,
        data: torch.Tensor,
        qtype: QT,
        shape: tuple[int, int],
        mode: str = "fast",
        bias: torch.Tensor | None = None,
        device: torch.device | str | None = None,
        kernel: str | None = None,
        release: Callable[[torch.Tensor], None] | None = None,
    ) -> None:
        """data: the weight's raw GGUF bytes (flat uint8, e.g. memory-mapped; never written), shape:
        (out_features, in_features). kernel forces one of KERNELS (tests, benchmarks); None picks one.
        release(chunk) is called on each chunk of `data` once it is repacked (GGUFFile.release_range): a
        big matrix's file pages then leave resident memory while its copy fills, not after."""
        super().__init__()
        if len(shape) != 2:
            raise ValueError(f"a linear weight is 2-D (out_features, in_features), got shape {tuple(shape)}")
        self._init([(data, int(shape[0]))], qtype, int(shape[1]), mode, bias, device, kernel, release)

    @classmethod
    def concat(
        cls,
        weights: Sequence[tuple[torch.Tensor, QT, tuple[int, ...]]],
        mode: str = "fast",
        bias: torch.Tensor | None = None,
        device: torch.device | str | None = None,
        kernel: str | None = None,
    ) -> QuantizedLinear:
        """One layer from (data, qtype, (out_i, in)) weights stacked along the output dim (fused Q/K/V).

        Rows of a row-major matrix are whole blocks, so the stacked matrix is the parts' bytes in order.
        """
        if not weights:
            raise ValueError("concat needs at least one weight")
        qtype, k = QT(weights[0][1]), int(weights[0][2][-1])
        parts = []
        for data, qt, shape in weights:
            if len(shape) != 2:
                raise ValueError(
                    f"a linear weight is 2-D (out_features, in_features), got shape {tuple(shape)}"
                )
            if QT(qt) != qtype or int(shape[1]) != k:
                raise ValueError(
                    f"concat needs one type and in_features: got {QT(qt).name} {tuple(shape)} "
                    f"after {qtype.name} (*, {k})"
                )
            parts.append((data, int(shape[0])))
        self = cls.__new__(cls)
        torch.nn.Module.__init__(self)
        self._init(parts, qtype, k, mode, bias, device, kernel)
        return self

    def _init(
        self,
        parts: list[tuple[torch.Tensor, int]],
        qtype: QT,
        k: int,
        mode: str,
        bias: torch.Tensor | None,
        device: torch.device | str | None,
        kernel: str | None,
        release: Callable[[torch.Tensor], None] | None = None,
    ) -> None:
        self.qtype = _check_type(qtype)
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r} (expected one of {MODES})")
        self.mode = mode
        self.in_features = k
        self.out_features = sum(n for _, n in parts)
        self.device = torch.device(device) if device is not None else parts[0][0].device
        row_bytes = row_nbytes(self.qtype, k)
        self._row_bytes = row_bytes
        self._parts: list[tuple[torch.Tensor, int]] = []  # raw bytes (never written) and row count
        for data, n in parts:
            raw = data.reshape(-1)
            if raw.dtype != torch.uint8 or raw.numel() != n * row_bytes:
                raise ValueError(
                    f"{self.qtype.name} weight ({n}, {k}) needs {n * row_bytes} uint8 bytes, "
                    f"got {raw.numel()} {raw.dtype}"
                )
            self._parts.append((raw.to(self.device), n))
        if bias is not None:
            if bias.shape != (self.out_features,):
                raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({self.out_features},)")
            bias = bias.to(self.device, torch.float32)
        self.bias = bias
        self._int4: _Int4Weight | None = None
        self._unpack: Callable[..., torch.Tensor] | None = None  # native: the repacked copy -> file bytes
        self.packed_max_rows = 0  # rows up to which the native or int4 kernel runs (then dequantized chunks)
        self._prefill_dtype = prefill_dtype()  # of those dequantized chunks: decided once, by the CPU
        self._weight: torch.Tensor | None = None  # (out, in) bf16 or fp32 for the "bf16"/"f32" kernels
        self._dense_copy: torch.Tensor | None = None  # (out, in) bf16 beside int4: keep_dense_copy
        self.kernel = "dequant" if mode == "reference" else (kernel or self._default_kernel())
        if self.kernel not in KERNELS:
            raise ValueError(f"unknown kernel {self.kernel!r} (expected one of {KERNELS})")
        if self.kernel == "int4":
            if self.device.type != "cpu" or self.qtype in FLOAT_TYPES:
                raise ValueError(f"the int4 kernel needs a quantized type on CPU, not {self.qtype.name}")
            self._int4 = _pack_int4(self.qtype, self._parts, k)
            self.packed_max_rows = _INT4_MAX_ROWS[self.qtype]
        elif self.kernel == "native":
            native = kernels.native() if self.device.type == "cpu" else None
            if native is None or self.qtype not in kernels.SUPPORTED:
                raise ValueError(f"no native kernel for {self.qtype.name} on {self.device} here")
            self.levels = activation_levels()  # 8-bit codes per activation: 1 (llama.cpp's) or 2
            # parts stacked in one buffer (one call, activations quantized once), copied with 8 rows' blocks
            # side by side (kernels/packed.cpp); rows() reads single rows of the file, prefill's chunks
            # come out of the copy (unpack)
            raw = self._parts[0][0] if len(self._parts) == 1 else torch.cat([raw for raw, _ in self._parts])
            self._raw = self._repacked(native, raw, release)
            self._qmatmul = native.qmatmul_packed
            self._unpack = native.unpack
            # every row count through the int8 kernels, but on AMX: there bf16 chunks for prefill
            self.packed_max_rows = NATIVE_MAX_ROWS if dequantized_prefill() else ALL_ROWS
        elif self.kernel in ("bf16", "f32"):
            self._weight = self._dense(torch.bfloat16 if self.kernel == "bf16" else torch.float32)

    def _repacked(
        self, native: kernels.NativeKernels, raw: torch.Tensor, release: Callable[[torch.Tensor], None] | None
    ) -> torch.Tensor:
        """The native kernels' row-interleaved copy of `raw` (all rows' file bytes) in 2 MiB pages
        (_WeightPages), made _REPACK_CHUNK_BYTES of rows at a time (whole pairs of 8-row groups: the
        unit of the layout, see kernels/packed.cpp), each chunk handed to `release` once copied."""
        n, row_bytes, qtype = self.out_features, self._row_bytes, int(self.qtype)
        k = self.in_features
        packed = _weight_pages.take(native.packed_nbytes(qtype, n, k))
        step = n if release is None else max(16, _REPACK_CHUNK_BYTES // row_bytes // 16 * 16)
        for r0 in range(0, n, step):
            r1 = min(n, r0 + step)
            chunk = raw[r0 * row_bytes : r1 * row_bytes]
            start = native.packed_nbytes(qtype, r0, k) if r0 else 0  # r0: whole pairs of groups
            # rows past r1 padded: only in the last chunk
            native.repack_into(
                chunk, qtype, r1 - r0, packed[start : start + native.packed_nbytes(qtype, r1 - r0, k)]
            )
            if release is not None:
                release(chunk)
        return packed

    def _dense(self, dtype: torch.dtype) -> torch.Tensor:
        """W as a dense (out, in) matrix: a view of the file for F32/BF16, else filled a chunk at a time
        (the peak memory is the copy, not twice it)."""
        float_view = {QT.F32: torch.float32, QT.BF16: torch.bfloat16}.get(self.qtype)
        if float_view == dtype and len(self._parts) == 1:
            return _view_as(self._parts[0][0], dtype).view(self.out_features, self.in_features)
        weight = torch.empty(self.out_features, self.in_features, dtype=dtype, device=self.device)
        r = 0
        for w in self._chunks():
            weight[r : r + w.shape[0]] = w
            r += w.shape[0]
        return weight

    def keep_dense_copy(self) -> None:
        """Also keep W as bf16 and use it from now on, DENSE_ROWS rows at a time: the int4 kernel's cost
        grows with the rows (49152x576 at 16 rows: Q4_1 5.4 ms, Q8_0 11.1 ms, bf16 2.1 ms) while a bf16
        matmul's hardly does, for 2 bytes/weight more memory. For the output matrix when sequences
        decode in parallel. Always DENSE_ROWS rows (padded): a row's result then does not depend on how
        many rows share the call (the matmul picks its blocking by the row count), so a sequence gets
        the same logits whatever shares its batch. Not for the native kernels: at 16 rows they are as
        fast as the copy (49152x576 Q8_0 on 2 Zen 4 cores: 40 vs 44 ms per 16-sequence step) and their
        logits stay fp32 (bf16 ones tie)."""
        if self.kernel == "int4" and self._dense_copy is None:
            self._dense_copy = self._dense(torch.bfloat16)

    def _dense_copy_mm(self, x2: torch.Tensor) -> torch.Tensor:
        """(M, in) bf16 -> (M, out) bf16 through the dense copy, DENSE_ROWS padded rows per matmul."""
        assert self._dense_copy is not None
        m = x2.shape[0]
        padded = F.pad(x2, (0, 0, 0, -m % DENSE_ROWS))  # (M', in)
        y = padded.new_empty(padded.shape[0], self.out_features)  # (M', out)
        for r in range(0, padded.shape[0], DENSE_ROWS):
            torch.mm(padded[r : r + DENSE_ROWS], self._dense_copy.t(), out=y[r : r + DENSE_ROWS])
        return y[:m]

    def _default_kernel(self) -> str:
        if self.qtype == QT.F32:
            return "f32"
        if self.device.type != "cpu":
            return "bf16"
        if use_native_kernels() and self.qtype in kernels.SUPPORTED and kernels.native() is not None:
            return "native"
        if self.qtype in _BF16_COPY_TYPES:  # a dense copy: bf16 where the CPU computes in it, else fp32
            return "bf16" if has_fast_bf16() else "f32"
        return "int4"

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, qtype={self.qtype.name}, "
            f"mode={self.mode}, kernel={self.kernel}, bias={self.bias is not None}"
        )

    def _chunks(self) -> Iterator[torch.Tensor]:
        """Consecutive row chunks of W, fp32 (n, in), dequantized exactly; one chunk alive at a time."""
        step = max(16, _CHUNK_ELEMENTS // self.in_features)
        if self._unpack is not None:  # the file's bytes of each chunk, out of the repacked copy
            n = self.out_features
            for r0 in range(0, n, step):
                r1 = min(n, r0 + step)
                raw = self._unpack(self._raw, int(self.qtype), n, r0, r1)
                yield dequantize(raw, self.qtype, (r1 - r0, self.in_features))
            return
        for raw, n in self._parts:
            rows = raw.view(n, self._row_bytes)
            for r0 in range(0, n, step):
                chunk = rows[r0 : r0 + step]
                yield dequantize(chunk, self.qtype, (chunk.shape[0], self.in_features))

    @property
    def act_dtype(self) -> torch.dtype:
        """The activation dtype this layer's kernel computes in: callers hand it that to skip casts."""
        return torch.bfloat16 if self.kernel in ("int4", "bf16") else torch.float32

    def input_dtype(self, m: int) -> torch.dtype:
        """The dtype `mm` computes m rows in: act_dtype, except that many rows through a packed weight
        (prefill) run in bf16 only where the CPU has bf16 arithmetic, else in fp32 (gguflm.cpu); a
        dense bf16 copy (keep_dense_copy) takes bf16."""
        if self._dense_copy is not None:
            return torch.bfloat16
        if self.kernel in ("int4", "native") and m > self.packed_max_rows:
            return self._prefill_dtype
        return self.act_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) float -> (..., out) float32."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.shape[-1]} features, the layer expects {self.in_features}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        y = self.mm(x2.to(self.input_dtype(x2.shape[0]))).float()
        return y.reshape(*lead, self.out_features)

    def mm(self, x2: torch.Tensor) -> torch.Tensor:
        """(M, in) in act_dtype -> (M, out): act_dtype, or float32 when the layer has a bias.

        The lean path of the model's forward: no reshapes or casts beyond what the kernel needs.
        """
        m = x2.shape[0]
        if m == 0:
            y = x2.new_zeros(0, self.out_features)
        elif self._dense_copy is not None:
            y = self._dense_copy_mm(x2)
        elif self.kernel == "native" and m <= self.packed_max_rows:
            y = self._native_mm(x2)
        elif self.kernel == "int4" and m <= self.packed_max_rows:
            y = self._int4_mm(x2)
        elif self._weight is not None:  # "bf16" / "f32": a dense weight
            y = F.linear(x2, self._weight)
        else:  # reference (fp32), or many rows through a packed weight: W a chunk of rows at a time
            dtype = self.input_dtype(m)
            x2 = x2.to(dtype)
            y = x2.new_empty(m, self.out_features, dtype=dtype)  # (M, out)
            r = 0
            for w in self._chunks():  # (n, in) fp32
                torch.mm(x2, w.to(dtype).t(), out=y[:, r : r + w.shape[0]])
                r += w.shape[0]
        if self.bias is not None:
            return y.float() + self.bias
        return y

    def native_run(self) -> tuple[torch.Tensor, list[int]] | None:
        """(repacked weight, [ggml type, output rows, activation levels]): how kernels.decode_layer computes
        `mm`'s products; None where `mm` does not run on the native kernels."""
        if self.kernel != "native":
            return None
        return self._raw, [int(self.qtype), self.out_features, self.levels]

    def _native_mm(self, x2: torch.Tensor) -> torch.Tensor:
        """(M, in) fp32 -> (M, out) fp32 through the native kernels, on the repacked copy."""
        return self._qmatmul(x2.float(), self._raw, int(self.qtype), self.out_features, self.levels)

    def _int4_mm(self, xb: torch.Tensor) -> torch.Tensor:
        """(M, in) bf16 -> (M, out) bf16 through the int4 kernel, activations laid out like the planes."""
        w = self._int4
        assert w is not None
        m, k = xb.shape
        if w.padded:
            xb = F.pad(xb.view(m, k // 16, 16), (0, 16)).view(m, 2 * k)  # (M, 2 in): zeros meet padding
        if w.n_planes > 1:
            xb = xb.repeat(1, w.n_planes)  # (M, planes * K)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(xb, w.packed, 32, w.scales_zeros)  # (M, n_pad) bf16
        return y if y.shape[1] == self.out_features else y[:, : self.out_features]

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Exact fp32 rows W[ids] (n, in), dequantizing only those rows (token embeddings: get_rows)."""
        ids = ids.reshape(-1).to(device=self.device, dtype=torch.long)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.out_features):
            raise IndexError(f"row ids must be in [0, {self.out_features}), got {ids.min()}..{ids.max()}")
        if len(self._parts) == 1:
            sel = self._parts[0][0].view(-1, self._row_bytes).index_select(0, ids)  # (n, row_bytes)
        else:
            sel = torch.empty(ids.numel(), self._row_bytes, dtype=torch.uint8, device=self.device)
            r = 0
            for raw, n in self._parts:
                hit = (ids >= r) & (ids < r + n)
                sel[hit] = raw.view(n, self._row_bytes).index_select(0, ids[hit] - r)
                r += n
        return dequantize(sel, self.qtype, (ids.numel(), self.in_features))
