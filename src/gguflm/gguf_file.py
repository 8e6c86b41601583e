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


_SCALAR_SIZES = {
    0: 1,
    1: 1,
    2: 2,
    3: 2,
    4: 4,
    5: 4,
    6: 4,
    7: 1,
    10: 8,
    11: 8,
    12: 8,
}  # GGUFValueType -> bytes
_STRING, _ARRAY = 8, 9


def _diagnose(path: Path) -> str | None:
    """Walk the header with plain struct reads to say precisely what is wrong, or None if nothing is.

    gguf's reader fails on bad tensor infos with numpy errors ("cannot reshape array ...") or not at
    all (misaligned offsets), so this names the tensor, the problem and the numbers.
    """
    data = np.memmap(path, mode="r")
    size = len(data)
    pos = 0

    def take(fmt: str) -> Any:
        nonlocal pos
        n = struct.calcsize(fmt)
        if pos + n > size:
            raise EOFError
        value = struct.unpack_from(fmt, data, pos)
        pos += n
        return value if len(value) > 1 else value[0]

    def skip_string() -> str:
        nonlocal pos
        n = take("<Q")
        if pos + n > size:
            raise EOFError
        text = bytes(data[pos : pos + n]).decode("utf-8", errors="replace")
        pos += n
        return text

    def skip_value(vtype: int) -> Any:
        nonlocal pos
        if vtype == _STRING:
            return skip_string()
        if vtype == _ARRAY:
            item_type, count = take("<I"), take("<Q")
            if item_type in _SCALAR_SIZES:
                pos += _SCALAR_SIZES[item_type] * count
                if pos > size:
                    raise EOFError
            else:
                for _ in range(count):
                    skip_value(item_type)
            return None
        if vtype not in _SCALAR_SIZES:
            raise ValueError(f"unknown metadata value type {vtype}")
        fmt = {
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
        return take(fmt[vtype])

    try:
        take("<4sI")
        n_tensors, n_kv = take("<QQ")
        alignment = 32
        for _ in range(n_kv):
            key = skip_string()
            vtype = take("<I")
            try:
                value = skip_value(vtype)
            except ValueError as e:
                return f"metadata key {key!r}: {e}"
            if key == "general.alignment" and isinstance(value, int) and value > 0:
                alignment = value
        infos = []
        for _ in range(n_tensors):
            name = skip_string()
            n_dims = take("<I")
            if n_dims > 4:
                return f"tensor {name!r} has {n_dims} dimensions (at most 4)"
            dims = [take("<Q") for _ in range(n_dims)]
            infos.append((name, dims, take("<I"), take("<Q")))
    except EOFError:
        return f"truncated in the header, at byte {pos} of {size}"
    data_start = -(-pos // alignment) * alignment
    for name, dims, type_id, offset in infos:
        try:
            qtype = gguf.GGMLQuantizationType(type_id)
        except ValueError:
            return f"tensor {name!r} has unknown type {type_id}"
        if offset % alignment:
            return f"tensor {name!r} offset {offset} is not a multiple of the alignment {alignment}"
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        n_elements = int(np.prod(dims, dtype=object)) if dims else 1
        end = data_start + offset + n_elements // block * type_size
        if end > size:
            return f"tensor {name!r} data ends at byte {end}, past the end of the file ({size} bytes): truncated file or bad offset"
    return None


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
            reader = gguf.GGUFReader(
                self.path, "c"
            )  # copy-on-write: torch wants writable arrays; nothing is copied
        except (ValueError, IndexError, struct.error, OverflowError, KeyError, TypeError) as e:
            problem = _diagnose(self.path) or f"corrupt or truncated GGUF file ({type(e).__name__}: {e})"
            raise GGUFError(f"{self.path}: {problem}") from e
        for t in reader.tensors:  # gguf's reader accepts these; llama.cpp does not
            if (t.data_offset - reader.data_offset) % reader.alignment:
                raise GGUFError(
                    f"{self.path}: tensor {t.name!r} offset {t.data_offset - reader.data_offset} "
                    f"is not a multiple of the alignment {reader.alignment}"
                )
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
            raise GGUFError(
                f"{self.path}: tensor {t.name!r} row length {shape[-1]} is not a multiple of {block}"
            )
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
