"""Importance matrices: llama-imatrix's collection, its two file formats, and reading them back.

For every matrix inside the layers (`blk.*`), the sum over tokens of the squared activations entering
it, per input column, and the number of tokens (llama-imatrix's IMatrixCollector). Formats:
- GGUF (llama.cpp's default): tensors `NAME.in_sum2` (n_cols x n_mat, F32) and `NAME.counts`
  (1 x n_mat), keys general.type = "imatrix", imatrix.datasets, imatrix.chunk_count, imatrix.chunk_size.
- legacy .dat: int32 entry count; per entry int32 name length, name, int32 ncall, int32 n_values,
  n_values float32 (sum / count * ncall); then int32 chunk count, int32 length and the dataset name.
llama-quantize uses sum / count per column (1 where a count is 0).
"""

from __future__ import annotations

import math
import os
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
import torch

from gguflm.gguf_file import GGUFError, GGUFFile

QT = gguf.GGMLQuantizationType
MIN_ROWS = 16  # llama-imatrix skips products of fewer tokens ("why are small batches ignored?")


@dataclass
class ImatrixData:
    """What llama-quantize reads: per weight name the mean squared activation, (n_mat, n_cols)."""

    values: dict[str, torch.Tensor]
    path: Path | None = None
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0

    def for_tensor(self, name: str, shape: tuple[int, ...]) -> torch.Tensor | None:
        """The weights for one tensor, or None where the file has none (llama.cpp: "did not find
        weights"); a size that does not fit is an error except for token_embd, as in llama.cpp."""
        v = self.values.get(name)
        n_cols, n_mat = shape[-1], (shape[0] if len(shape) == 3 else 1)
        if v is None:
            print(f"imatrix: did not find weights for {name}", file=sys.stderr)
            return None
        if v.numel() != n_cols * n_mat:
            if name in ("token_embd.weight", "per_layer_token_embd.weight"):
                return None
            raise ValueError(
                f"imatrix size {v.numel()} is different from tensor size {n_cols * n_mat} for {name}"
            )
        return v.reshape(n_mat, n_cols)


@dataclass
class Collector:
    """Sums of squared activations per weight name, fed by Linear.input_observer."""

    sums: dict[str, torch.Tensor] = field(default_factory=dict)  # (n_cols,) float64
    counts: dict[str, int] = field(default_factory=dict)

    def observe(self, names: tuple[str, ...], x: torch.Tensor) -> None:
        if x.shape[0] < MIN_ROWS:
            return
        sq = x.detach().double().square().sum(dim=0)  # (n_cols,)
        if not bool(torch.isfinite(sq).all()):
            raise ValueError(f"non-finite activations entering {names[0]}")
        for name in names:  # fused q/k/v and gate/up: every part sees the same input
            if not name.startswith("blk."):
                continue
            if name in self.sums:
                self.sums[name] += sq
            else:
                self.sums[name] = sq.clone()
            self.counts[name] = self.counts.get(name, 0) + x.shape[0]

    def attach(self, transformer: object) -> Callable[[], None]:
        """Set this collector on every Linear of the model's layers; returns the function that detaches it."""
        from gguflm.models.base import linears_of

        found = [lin for layer in transformer.layers for lin in linears_of(layer)]  # type: ignore[attr-defined]
        for lin in found:
            lin.input_observer = self.observe

        def detach() -> None:
            for lin in found:
                lin.input_observer = None

        return detach


def write_gguf_imatrix(
    path: str | os.PathLike[str], c: Collector, datasets: list[str], chunk_count: int, chunk_size: int
) -> None:
    """llama-imatrix's save_imatrix: names sorted, raw sums and counts, the keys its loader checks."""
    from gguflm.quantize.driver import kv_str, kv_str_array, kv_u32, write_header

    names = sorted(c.sums)
    kv = [
        kv_str("general.type", "imatrix"),
        kv_str_array("imatrix.datasets", datasets),
        kv_u32("imatrix.chunk_count", chunk_count),
        kv_u32("imatrix.chunk_size", chunk_size),
    ]
    tensors: list[tuple[str, tuple[int, ...], QT, int]] = []
    blobs: list[bytes] = []
    for name in names:
        sums = c.sums[name].float().numpy()
        tensors.append((f"{name}.in_sum2", (1, sums.size), QT.F32, sums.nbytes))
        blobs.append(sums.tobytes())
        tensors.append((f"{name}.counts", (1, 1), QT.F32, 4))
        blobs.append(np.float32(c.counts[name]).tobytes())
    with open(path, "wb") as f:
        write_header(f, kv, tensors, 32)
        for blob in blobs:
            f.write(blob + bytes(-len(blob) % 32))


def write_dat_imatrix(
    path: str | os.PathLike[str], c: Collector, dataset: str, chunk_count: int, chunk_size: int
) -> None:
    """llama-imatrix's save_imatrix_legacy (--output-format dat)."""
    with open(path, "wb") as f:
        f.write(struct.pack("<i", len(c.sums)))
        for name in sorted(c.sums):
            raw = name.encode()
            count = c.counts[name]
            ncall = -(-count // chunk_size)
            values = (c.sums[name] / count * ncall).float().numpy()
            f.write(
                struct.pack("<i", len(raw)) + raw + struct.pack("<ii", ncall, values.size) + values.tobytes()
            )
        ds = dataset.encode()
        f.write(struct.pack("<ii", chunk_count, len(ds)) + ds)


def _read_dat(path: Path) -> ImatrixData:
    data = path.read_bytes()
    pos = 0

    def take(fmt: str) -> tuple[int, ...]:
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(data):
            raise ValueError(f"{path}: truncated imatrix file")
        out = struct.unpack_from(fmt, data, pos)
        pos += size
        return out

    (n_entries,) = take("<i")
    if n_entries < 1:
        raise ValueError(f"{path}: no data in imatrix file")
    values: dict[str, torch.Tensor] = {}
    for _ in range(n_entries):
        (n,) = take("<i")
        name = data[pos : pos + n].decode("utf-8", errors="replace")
        pos += n
        ncall, nval = take("<ii")
        if nval < 1 or pos + 4 * nval > len(data):
            raise ValueError(f"{path}: bad entry {name!r}")
        v = torch.from_numpy(np.frombuffer(data, np.float32, nval, pos).copy())
        pos += 4 * nval
        values[name] = v / ncall if ncall > 0 else v
    datasets, chunks = [], 0
    if pos + 4 <= len(data):
        (chunks,) = take("<i")
        if pos + 4 <= len(data):
            (n,) = take("<i")
            if n > 0:
                datasets.append(data[pos : pos + n].decode("utf-8", errors="replace"))
    return ImatrixData(values, path, datasets, chunks)


def read_imatrix(path: str | os.PathLike[str]) -> ImatrixData:
    """Either format, as llama-quantize's loader reads it (GGUF first, legacy when not GGUF)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such imatrix file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        out = _read_dat(path)
    else:
        try:
            file = GGUFFile(path)
        except GGUFError as e:
            raise ValueError(str(e)) from e
        if not all(
            k in file.metadata for k in ("imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size")
        ):
            raise ValueError(f"{path}: missing imatrix metadata (imatrix.datasets, chunk_count, chunk_size)")
        values = {}
        for tname, info in file.tensors.items():
            if not tname.endswith(".in_sum2"):
                continue
            name = tname[: -len(".in_sum2")]
            counts = file.tensors.get(f"{name}.counts")
            if counts is None or info.qtype != QT.F32 or counts.qtype != QT.F32:
                raise ValueError(f"{path}: mismatched or non-F32 sums and counts for {name}")
            sums = info.data.view(torch.float32).reshape(-1, info.shape[-1]).clone()  # (n_mat, n_cols)
            n = torch.round(counts.data.view(torch.float32).double()).reshape(-1, 1)  # (n_mat, 1)
            mean = torch.where(
                n > 0, sums.double() / n.clamp(min=1), torch.ones_like(sums, dtype=torch.float64)
            )
            values[name] = mean.float().reshape(-1)
        out = ImatrixData(
            values, path, list(file.metadata["imatrix.datasets"]), int(file.metadata["imatrix.chunk_count"])
        )
    if not out.values:
        raise ValueError(f"{path}: no importance matrix entries")
    for name, v in out.values.items():
        if not bool(torch.isfinite(v).all()):
            raise ValueError(f"{path}: imatrix contains non-finite values for {name}")
    return out


def collect(
    model: object, tokens: list[int], n_ctx: int, bos: int | None, n_chunks: int = -1, progress: bool = True
) -> tuple[Collector, int, float]:
    """Run llama-imatrix's protocol: chunks of n_ctx tokens (BOS first), every token an output, all
    layers observed. -> (collector, chunks done, perplexity over each chunk's second half)."""
    from tqdm import tqdm

    from gguflm.batch import Batch
    from gguflm.context import DECODE_OK, Context

    total = len(tokens) // n_ctx
    if total < 1:
        raise ValueError(f"need at least {n_ctx} tokens for one chunk of {n_ctx}, got {len(tokens)}")
    total = total if n_chunks < 0 else min(total, n_chunks)
    ctx = Context(model, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=min(n_ctx, 512))  # type: ignore[arg-type]
    collector = Collector()
    detach = collector.attach(model.transformer)  # type: ignore[attr-defined]
    nll, count = 0.0, 0
    try:
        for i in tqdm(range(total), desc="imatrix", unit="chunk", disable=not progress, file=sys.stderr):
            chunk = tokens[i * n_ctx : (i + 1) * n_ctx]
            if bos is not None:
                chunk = [bos, *chunk[1:]]
            ctx.kv.clear()
            status = ctx.decode(Batch.from_tokens(chunk, output=[True] * len(chunk)))
            if status != DECODE_OK:
                raise RuntimeError(f"decode failed with status {status} on chunk {i}")
            first = n_ctx // 2
            logits = ctx.all_logits().double()[first:-1]  # (n_ctx - 1 - first, n_vocab)
            targets = torch.tensor(tokens[i * n_ctx + first + 1 : (i + 1) * n_ctx])
            nll -= float(torch.log_softmax(logits, dim=-1).gather(1, targets[:, None]).sum())
            count += len(targets)
    finally:
        detach()
    return collector, total, math.exp(nll / count)
