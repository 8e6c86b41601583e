"""One entry point over the quantizers: rows of floats -> rows of GGUF blocks (ggml_quantize_chunk)."""

from __future__ import annotations

from collections.abc import Callable

import gguf
import torch

from gguflm.quantize import kquants, legacy

QT = gguf.GGMLQuantizationType

_LEGACY: dict[QT, Callable[[torch.Tensor, torch.Tensor | None, int], torch.Tensor]] = {
    QT.Q4_0: legacy.quantize_q4_0,
    QT.Q4_1: legacy.quantize_q4_1,
    QT.Q5_0: legacy.quantize_q5_0,
    QT.Q5_1: legacy.quantize_q5_1,
    QT.Q8_0: legacy.quantize_q8_0,
}
_K: dict[QT, Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]] = {
    QT.Q2_K: kquants.quantize_q2_k,
    QT.Q3_K: kquants.quantize_q3_k,
    QT.Q4_K: kquants.quantize_q4_k,
    QT.Q5_K: kquants.quantize_q5_k,
    QT.Q6_K: kquants.quantize_q6_k,
}
WRITABLE: tuple[QT, ...] = (QT.F32, QT.F16, QT.BF16, *_LEGACY, *_K)


def quantize_rows(rows: torch.Tensor, qtype: QT, imatrix: torch.Tensor | None = None) -> torch.Tensor:
    """(R, n) float32 -> (R, row bytes) uint8 in `qtype`. imatrix: (n,) mean squared activations of
    the n input columns; it weights the search as llama.cpp's `quantize_*_impl` do (not Q8_0, floats)."""
    qtype = QT(qtype)
    if rows.dim() != 2:
        raise ValueError(f"quantize_rows wants (rows, columns), got shape {tuple(rows.shape)}")
    n_rows, n = rows.shape
    rows = rows.to(torch.float32).contiguous()
    if qtype == QT.F32:
        return rows.view(torch.uint8)
    if qtype in (QT.F16, QT.BF16):
        dtype = torch.float16 if qtype == QT.F16 else torch.bfloat16
        return rows.to(dtype).view(torch.uint8)
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    if n % block:
        raise ValueError(f"row length {n} is not a multiple of the {qtype.name} block size {block}")
    if imatrix is not None and imatrix.numel() != n:
        raise ValueError(f"imatrix has {imatrix.numel()} values for rows of {n}")
    qw = imatrix.to(torch.float32).reshape(n) if imatrix is not None else None
    if qtype in _LEGACY:
        out = _LEGACY[qtype](rows.view(-1, block), qw, n)
    elif qtype in _K:
        qk = qw.view(1, n).expand(n_rows, n).reshape(-1, block) if qw is not None else None
        out = _K[qtype](rows.view(-1, block), qk)
    else:
        raise ValueError(f"gguflm cannot quantize to {qtype.name}")
    return out.reshape(n_rows, -1)
