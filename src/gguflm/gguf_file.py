"""Reading GGUF files, with checks that name the file and the problem.

The header is walked here with `struct` over a memory map, using the `gguf` package's type tables:
`gguf.GGUFReader` builds a numpy view per array element and took 3.3 s on SmolLM2's 98k-string
vocabulary, most of a 3.9 s load; this walk takes ~0.1 s. Tensors stay memory-mapped:
`TensorInfo.data` is a zero-copy uint8 view of the file's bytes.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)


class GGUFError(ValueError):
    """A GGUF file that cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    qtype: gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # torch order: last dim is contiguous (GGUF's ne[0])
    data: torch.Tensor  # uint8, raw block bytes, memory-mapped

    @property
    def n_bytes(self) -> int:
        return int(self.data.numel())


def _check_header(path: Path) -> None:
    """Check magic and version ourselves: gguf's reader fails on these with unclear messages."""
    with open(path, "rb") as f:
        head = f.read(24)
    if len(head) < 24:
        raise GGUFError(f"{path}: truncated header ({len(head)} bytes; a GGUF header has at least 24)")
    if head[:4] != GGUF_MAGIC:
        raise GGUFError(f"{path}: not a GGUF file (magic {head[:4]!r}, expected {GGUF_MAGIC!r})")
    (version,) = struct.unpack("<I", head[4:8])
    if version not in SUPPORTED_VERSIONS:
        if struct.unpack(">I", head[4:8])[0] in SUPPORTED_VERSIONS:
            raise GGUFError(f"{path}: big-endian GGUF files are not supported")
        raise GGUFError(f"{path}: unsupported GGUF version {version} (supported: 2, 3)")


_SCALARS = {  # GGUFValueType -> struct format
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_NUMPY = {
    0: "<u1",
    1: "<i1",
    2: "<u2",
    3: "<i2",
    4: "<u4",
    5: "<i4",
    6: "<f4",
    7: "?",
    10: "<u8",
    11: "<i8",
    12: "<f8",
}
_STRING, _ARRAY = 8, 9
MAX_DIMS = 4


class _Truncated(Exception):
    """The header ends before a field it announces."""


class _HeaderReader:
    """Reads GGUF header fields from a buffer, little-endian, and says where it ran out."""

    def __init__(self, buf: mmap.mmap) -> None:
        self.buf = buf
        self.size = len(buf)
        self.pos = 0

    def scalar(self, fmt: str) -> Any:
        n = struct.calcsize(fmt)
        if self.pos + n > self.size:
            raise _Truncated
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return value

    def string(self) -> str:
        n = self.scalar("<Q")
        if self.pos + n > self.size:
            raise _Truncated
        text = self.buf[self.pos : self.pos + n].decode("utf-8", errors="replace")
        self.pos += n
        return text

    def value(self, vtype: int) -> Any:
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            item_type, count = self.scalar("<I"), self.scalar("<Q")
            if item_type in _NUMPY:
                width = np.dtype(_NUMPY[item_type]).itemsize
                if self.pos + width * count > self.size:
                    raise _Truncated
                values = np.frombuffer(self.buf, _NUMPY[item_type], count, self.pos).tolist()
                self.pos += width * count
                return values
            if count > self.size:  # each item takes at least one byte
                raise _Truncated
            return [self.value(item_type) for _ in range(count)]
        if vtype not in _SCALARS:
            raise ValueError(f"unknown metadata value type {vtype}")
        return self.scalar(_SCALARS[vtype])


class GGUFFile:
    """A GGUF file opened for reading: `metadata` (key -> Python value) and `tensors` (name -> TensorInfo)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            problem = "not a regular file" if self.path.exists() else "no such file"
            raise GGUFError(f"{self.path}: {problem}")
        _check_header(self.path)
        with open(self.path, "rb") as f:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            infos = self._read_header(_HeaderReader(buf))
        finally:
            buf.close()
        # copy-on-write map: torch wants writable arrays; nothing is copied unless written
        self._map = np.memmap(self.path, dtype=np.uint8, mode="c")
        self.tensors: dict[str, TensorInfo] = {}
        for name, qtype, shape, start, n_bytes in infos:
            self.tensors[name] = TensorInfo(
                name, qtype, shape, torch.from_numpy(self._map[start : start + n_bytes])
            )

    def _fail(self, problem: str) -> GGUFError:
        return GGUFError(f"{self.path}: {problem}")

    def _read_header(
        self, r: _HeaderReader
    ) -> list[tuple[str, gguf.GGMLQuantizationType, tuple[int, ...], int, int]]:
        """Fill self.metadata; return (name, type, shape, start byte, byte count) of each tensor."""
        self.metadata: dict[str, Any] = {}
        raw: list[tuple[str, list[int], int, int]] = []
        try:
            r.pos = 8  # magic and version, checked already
            n_tensors, n_kv = r.scalar("<Q"), r.scalar("<Q")
            for _ in range(n_kv):
                key = r.string()
                vtype = r.scalar("<I")
                try:
                    self.metadata[key] = r.value(vtype)
                except ValueError as e:
                    raise self._fail(f"metadata key {key!r}: {e}") from e
            for _ in range(n_tensors):
                name = r.string()
                n_dims = r.scalar("<I")
                if n_dims > MAX_DIMS:
                    raise self._fail(f"tensor {name!r} has {n_dims} dimensions (at most {MAX_DIMS})")
                dims = [r.scalar("<Q") for _ in range(n_dims)]
                raw.append((name, dims, r.scalar("<I"), r.scalar("<Q")))
        except _Truncated:
            raise self._fail(f"truncated in the header, at byte {r.pos} of {r.size}") from None
        alignment = self.metadata.get("general.alignment", 32)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise self._fail(f"general.alignment {alignment!r} is not a power of two")
        data_start = -(-r.pos // alignment) * alignment
        infos = []
        for name, dims, type_id, offset in raw:
            if any(t[0] == name for t in infos):
                raise self._fail(f"duplicate tensor name {name!r}")
            try:
                qtype = gguf.GGMLQuantizationType(type_id)
            except ValueError:
                raise self._fail(f"tensor {name!r} has unknown type {type_id}") from None
            if offset % alignment:
                raise self._fail(
                    f"tensor {name!r} offset {offset} is not a multiple of the alignment {alignment}"
                )
            shape = tuple(reversed(dims))  # torch order: GGUF's ne[0] (the contiguous one) last
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
            if shape and shape[-1] % block:
                raise self._fail(f"tensor {name!r} row length {shape[-1]} is not a multiple of {block}")
            n_elements = math.prod(shape)
            n_bytes = n_elements // block * type_size
            start = data_start + offset
            if start + n_bytes > r.size:
                raise self._fail(
                    f"tensor {name!r} data ends at byte {start + n_bytes}, past the end of the file "
                    f"({r.size} bytes): truncated file or bad offset"
                )
            infos.append((name, qtype, shape, start, n_bytes))
        return infos

    def release_pages(self) -> None:
        """Drop the file's pages from this process's resident memory (they are re-read on demand).

        After weights are repacked into their kernel layouts, the raw bytes are touched only for
        embedding rows and prefill; keeping every page resident would count the file twice in RSS.
        """
        mapping = getattr(self._map, "_mmap", None)
        if mapping is not None and hasattr(mmap, "MADV_DONTNEED"):
            mapping.madvise(mmap.MADV_DONTNEED)

    def release_range(self, data: torch.Tensor) -> None:
        """release_pages() for the whole pages under `data`, a view of this file's tensors: what a big
        matrix's repacking has copied already (QuantizedLinear's `release`). Anything else: no-op."""
        mapping = getattr(self._map, "_mmap", None)
        if mapping is None or not hasattr(mmap, "MADV_DONTNEED") or data.numel() == 0:
            return
        base = self._map.ctypes.data
        start, end = data.data_ptr() - base, data.data_ptr() - base + data.numel() * data.element_size()
        if start < 0 or end > self._map.size:
            return
        page = mmap.PAGESIZE
        first, last = -(-start // page) * page, end // page * page  # whole pages only
        if last > first:
            mapping.madvise(mmap.MADV_DONTNEED, first, last - first)

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def require(self, key: str) -> Any:
        if key not in self.metadata:
            raise GGUFError(f"{self.path}: missing metadata key {key!r}")
        return self.metadata[key]

    def tensor(self, name: str) -> TensorInfo:
        if name not in self.tensors:
            raise GGUFError(f"{self.path}: missing tensor {name!r}")
        return self.tensors[name]
