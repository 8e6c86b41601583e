"""Reading GGUF files on the `gguf` package, with checks that name the file and the problem.

Tensors stay memory-mapped: `TensorInfo.data` is a zero-copy uint8 view of the file's bytes.
"""

from __future__ import annotations

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


def _field_value(field: Any) -> Any:
    value = field.contents()
    if isinstance(value, np.generic):
        return value.item()
    return value


class GGUFFile:
    """A GGUF file opened for reading: `metadata` (key -> Python value) and `tensors` (name -> TensorInfo)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise GGUFError(f"{self.path}: no such file")
        _check_header(self.path)
        try:
            reader = gguf.GGUFReader(self.path, "c")  # copy-on-write: torch wants writable arrays; nothing is copied
        except (ValueError, IndexError, struct.error, OverflowError, KeyError, TypeError) as e:
            raise GGUFError(f"{self.path}: corrupt or truncated GGUF file ({type(e).__name__}: {e})") from e
        file_size = self.path.stat().st_size
        self.metadata: dict[str, Any] = {}
        for key, field in reader.fields.items():
            if key.startswith("GGUF."):
                continue
            try:
                self.metadata[key] = _field_value(field)
            except (ValueError, IndexError, TypeError) as e:
                raise GGUFError(f"{self.path}: metadata key {key!r} cannot be read ({e})") from e
        self.tensors: dict[str, TensorInfo] = {}
        for t in reader.tensors:
            self.tensors[t.name] = self._tensor_info(t, file_size)
        self._reader = reader  # keeps the memory map alive

    def _tensor_info(self, t: Any, file_size: int) -> TensorInfo:
        try:
            qtype = gguf.GGMLQuantizationType(int(t.tensor_type))
        except ValueError as e:
            raise GGUFError(f"{self.path}: tensor {t.name!r} has unknown type {int(t.tensor_type)}") from e
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        if shape and shape[-1] % block:
            raise GGUFError(f"{self.path}: tensor {t.name!r} row length {shape[-1]} is not a multiple of {block}")
        n_elements = int(np.prod(shape)) if shape else 1
        n_bytes = n_elements // block * type_size
        if t.data_offset + n_bytes > file_size:
            raise GGUFError(
                f"{self.path}: tensor {t.name!r} ends at byte {t.data_offset + n_bytes}, "
                f"past the end of the file ({file_size} bytes): the file is truncated"
            )
        raw = np.asarray(t.data).reshape(-1).view(np.uint8)
        if raw.size != n_bytes:
            raise GGUFError(f"{self.path}: tensor {t.name!r} has {raw.size} bytes, expected {n_bytes}")
        return TensorInfo(t.name, qtype, shape, torch.from_numpy(raw))

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
