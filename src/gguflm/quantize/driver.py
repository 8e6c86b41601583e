"""quantize_file: llama-quantize's file-level work (llama_model_quantize_impl).

Metadata is copied from the input byte for byte (so every key keeps its stored type), then
general.quantization_version and general.file_type are set (moved to the end, as gguf_set_val does).
Tensors are written in llama.cpp's order (layer, then name), each padded to the alignment; a tensor
already in its target type is copied, any other is dequantized (gguflm.quants.dequantize) and
quantized a chunk of rows at a time.
"""

from __future__ import annotations

import mmap
import os
import struct
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import gguf
import torch
from tqdm import tqdm

from gguflm.gguf_file import GGUFFile, _HeaderReader
from gguflm.quantize import mix
from gguflm.quantize.imatrix import ImatrixData
from gguflm.quantize.rows import WRITABLE, quantize_rows
from gguflm.quants import dequantize

QT = gguf.GGMLQuantizationType
QUANTIZATION_VERSION = 2  # GGML_QNT_VERSION
CHUNK_ELEMENTS = 1 << 20  # rows quantized per call: about 1M weights (4 MB of floats)
_SPLIT_KEYS = ("split.no", "split.count", "split.tensors.count")


def _raw_kv(path: Path) -> list[tuple[str, bytes]]:
    """Every metadata pair of a GGUF file as (key, its encoded bytes: key, type and value)."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        r = _HeaderReader(buf)
        r.pos = 16
        n_kv = r.scalar("<Q")
        pairs = []
        for _ in range(n_kv):
            start = r.pos
            key = r.string()
            r.value(r.scalar("<I"))
            pairs.append((key, bytes(buf[start : r.pos])))
    return pairs


def _string(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def kv_u32(key: str, value: int) -> bytes:
    return _string(key) + struct.pack("<II", gguf.GGUFValueType.UINT32, value)


def kv_str(key: str, value: str) -> bytes:
    return _string(key) + struct.pack("<I", gguf.GGUFValueType.STRING) + _string(value)


def kv_str_array(key: str, values: list[str]) -> bytes:
    head = struct.pack("<IIQ", gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING, len(values))
    return _string(key) + head + b"".join(_string(v) for v in values)


def _pad(n: int, alignment: int) -> int:
    return -(-n // alignment) * alignment


def write_header(
    f: object, kv: list[bytes], tensors: list[tuple[str, tuple[int, ...], QT, int]], alignment: int
) -> list[int]:
    """GGUF v3 header (tensor shapes in torch order) up to the aligned start of the data; -> offsets."""
    out = [b"GGUF", struct.pack("<IQQ", 3, len(tensors), len(kv)), *kv]
    offsets, offset = [], 0
    for name, shape, qtype, n_bytes in tensors:
        dims = tuple(reversed(shape))  # GGUF's ne[0] is the contiguous dim
        out.append(_string(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, qtype, offset))
        offsets.append(offset)
        offset = _pad(offset + n_bytes, alignment)
    header = b"".join(out)
    f.write(header + bytes(_pad(len(header), alignment) - len(header)))  # type: ignore[attr-defined]
    return offsets


def n_bytes(qtype: QT, shape: tuple[int, ...]) -> int:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    n = 1
    for s in shape:
        n *= s
    return n // block * size


def model_facts(file: GGUFFile) -> mix.ModelFacts:
    arch = str(file.require("general.architecture"))

    def first(v: object) -> int:
        return int(v[0]) if isinstance(v, list) else int(v)  # type: ignore[arg-type, index]

    n_layer = int(file.require(f"{arch}.block_count"))
    n_head = first(file.get(f"{arch}.attention.head_count", 1))
    n_head_kv = first(file.get(f"{arch}.attention.head_count_kv", n_head)) or n_head
    return mix.ModelFacts(
        arch=arch,
        n_layer=n_layer,
        n_gqa=n_head // n_head_kv if n_head_kv else 1,
        n_expert=int(file.get(f"{arch}.expert_count", 0)),
        is_70b=arch == "llama" and n_layer == 80 and n_head != n_head_kv,
    )


@dataclass
class QuantizeReport:
    types: dict[str, QT]
    size_in: int
    size_out: int
    seconds: float
    fallbacks: list[str]


def quantize_file(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    type_name: str,
    *,
    imatrix: ImatrixData | None = None,
    pure: bool = False,
    output_type: QT | None = None,
    token_embd_type: QT | None = None,
    progress: bool = True,
    threads: int | None = None,
) -> QuantizeReport:
    """Write `dst`: `src` quantized to the file type `type_name` (Q4_K_M, Q8_0, ...) as llama-quantize does."""
    t0 = time.perf_counter()
    src, dst = Path(src), Path(dst)
    file = GGUFFile(src)
    if src.resolve() == dst.resolve():
        raise ValueError(f"{dst}: the output must be another file than the input")
    facts = model_facts(file)
    for t in (output_type, token_embd_type):
        if t is not None and t not in WRITABLE:
            raise ValueError(f"gguflm cannot write tensors of type {t.name}")
    infos = [(i.name, i.shape, i.qtype) for i in file.tensors.values()]
    targets, state = mix.plan(
        infos,
        type_name,
        facts,
        has_imatrix=imatrix is not None,
        pure=pure,
        output_type=output_type,
        token_embd_type=token_embd_type,
    )
    for name, qtype in targets:
        if qtype != file.tensors[name].qtype and qtype not in WRITABLE:
            raise ValueError(f"tensor {name}: gguflm cannot quantize to {qtype.name}")
    ftype, _ = mix.FILE_TYPES[type_name]

    dropped = (*_SPLIT_KEYS, "general.quantization_version", "general.file_type")
    kv = [raw for key, raw in _raw_kv(src) if key not in dropped]
    kv += [
        kv_u32("general.quantization_version", QUANTIZATION_VERSION),
        kv_u32("general.file_type", int(ftype)),
    ]
    if imatrix is not None:
        kv.append(kv_str("quantize.imatrix.file", str(imatrix.path)[:127]))
        if imatrix.datasets:
            kv.append(kv_str("quantize.imatrix.dataset", imatrix.datasets[0][:127]))
        kv.append(kv_u32("quantize.imatrix.entries_count", len(imatrix.values)))
        if imatrix.chunk_count > 0:
            kv.append(kv_u32("quantize.imatrix.chunks_count", imatrix.chunk_count))

    alignment = int(file.get("general.alignment", 32))
    layout = [(n, file.tensors[n].shape, t, n_bytes(t, file.tensors[n].shape)) for n, t in targets]
    requantized = sorted(
        {file.tensors[n].qtype.name for n, t in targets if t != file.tensors[n].qtype}
        - {"F32", "F16", "BF16"}
    )
    if requantized:
        print(f"warning: requantizing from {', '.join(requantized)}: quality is lost twice", file=sys.stderr)
    work = sum(n_bytes(QT.F32, s) // 4 for n, s, t, _ in layout if t != file.tensors[n].qtype)
    bar = tqdm(total=work, unit="w", unit_scale=True, disable=not progress, file=sys.stderr, desc="quantize")

    def jobs() -> Iterator[Callable[[], tuple[bytes, int]]]:
        """The file's data in order: copied tensors, quantized chunks, alignment padding."""
        for name, shape, qtype, size in layout:
            info = file.tensors[name]
            if qtype == info.qtype:
                yield partial(lambda d: (d.numpy().tobytes(), 0), info.data)
            else:
                weights = imatrix.for_tensor(name, shape) if imatrix is not None else None
                yield from _chunks(info.data, info.qtype, shape, qtype, weights)
            yield partial(lambda n: (bytes(n), 0), _pad(size, alignment) - size)

    threads = threads or os.cpu_count() or 1
    tmp = dst.with_name(dst.name + ".part")
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with open(tmp, "wb") as f:
            write_header(f, kv, layout, alignment)
            for blob, done in _run_in_order(jobs(), threads):
                f.write(blob)
                bar.update(done)
        tmp.replace(dst)
    finally:
        torch.set_num_threads(torch_threads)
        bar.close()
        tmp.unlink(missing_ok=True)
    if state.fallbacks:
        shown = "; ".join(state.fallbacks[:2]) + ("; ..." if len(state.fallbacks) > 2 else "")
        print(
            f"warning: {len(state.fallbacks)} of {len(layout)} tensor(s) required fallback quantization ({shown})",
            file=sys.stderr,
        )
    size_in = sum(i.n_bytes for i in file.tensors.values())
    return QuantizeReport(
        dict(targets), size_in, sum(s for *_, s in layout), time.perf_counter() - t0, state.fallbacks
    )


def _chunks(
    data: torch.Tensor,
    src_type: QT,
    shape: tuple[int, ...],
    qtype: QT,
    weights: torch.Tensor | None,
) -> Iterator[Callable[[], tuple[bytes, int]]]:
    """One tensor as jobs of about CHUNK_ELEMENTS weights: each dequantizes its rows and quantizes
    them -> (bytes, weights done). weights: (n_mat, n_cols) or None. Chunks never cross from one
    expert's matrix into the next."""
    n_cols = shape[-1]
    n_rows = n_bytes(QT.F32, shape) // 4 // n_cols
    rows_per_matrix = shape[-2] if len(shape) >= 2 else 1
    step = max(1, min(rows_per_matrix, CHUNK_ELEMENTS // n_cols))
    raw = data.view(n_rows, n_bytes(src_type, (n_cols,)))

    def job(start: int, stop: int) -> tuple[bytes, int]:
        rows = dequantize(raw[start:stop].reshape(-1), src_type, (stop - start, n_cols))
        w = weights[start // rows_per_matrix] if weights is not None else None
        return quantize_rows(rows, qtype, w).numpy().tobytes(), rows.numel()

    start = 0
    while start < n_rows:
        stop = min(n_rows, start + step, (start // rows_per_matrix + 1) * rows_per_matrix)
        yield partial(job, start, stop)
        start = stop


def _run_in_order(
    jobs: Iterator[Callable[[], tuple[bytes, int]]], threads: int
) -> Iterator[tuple[bytes, int]]:
    """Results of `jobs` in their order, computed by `threads` threads, a few jobs ahead.

    Each thread runs torch single-threaded: on 2 shared cores, 2 threads of 1 are 5-10x faster than
    torch's own 2-thread ops on these many small element-wise steps (no barrier per op)."""
    if threads <= 1:
        for j in jobs:
            yield j()
        return
    pending: deque[Future[tuple[bytes, int]]] = deque()
    with ThreadPoolExecutor(threads) as pool:
        for j in jobs:
            pending.append(pool.submit(j))
            if len(pending) >= 2 * threads:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
