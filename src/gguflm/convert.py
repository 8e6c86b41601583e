"""`gguflm convert`: a Hugging Face checkpoint directory to a GGUF file, as llama.cpp's
convert_hf_to_gguf.py writes it for the families gguflm runs.

Reads config.json, the *.safetensors shards and the tokenizer files (see `gguflm.convert_vocab`).
Tensors are renamed with gguf-py's table (`gguf.get_tensor_name_map`) and changed where llama.cpp's
converter changes them:

- llama (Llama 2/3, Mistral, SmolLM): q/k rows permuted from Hugging Face's rotate-half order to the
  interleaved pairs of llama.cpp's normal RoPE; Llama 3.1 rope scaling becomes `rope_freqs.weight`.
- gemma3 (Gemma3ForCausalLM): 1 added to every `*norm.weight` (Gemma's RMSNorm scales by 1 + w);
  the embedding keeps only the rows of real tokens.
- phi3: q/k/v and gate/up are already fused in the checkpoint (attn_qkv, ffn_up); LongRoPE factors
  become `rope_factors_long/short.weight`.
- qwen2 / qwen3: names only (their RoPE is NEOX, no permutation).

Types: 1-D tensors, norms and biases are F32; the other matrices take --outtype; a Q8_0 matrix whose
rows are not a multiple of 32 falls back to F16, as llama.cpp's converter does.

Memory: the output is written in two passes. The plan (names, shapes, types, byte sizes) comes from
the safetensors headers alone, so the GGUF header goes out first; then each tensor is read from its
memory-mapped shard, converted, written and dropped. Peak memory is about one tensor, not the model.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as QType
from gguf import LlamaFileType

from gguflm.convert_config import (
    GEMMA3_DEFAULTS,
    HF_ARCHITECTURES,
    Family,
    Param,
    family_of,
    phi3_attn_factor,
    phi3_rope_dims,
    read_config,
    rope_parameters,
    with_config_defaults,
    write_hyperparameters,
)
from gguflm.convert_vocab import ConvertError, Vocab, load_vocab

log = logging.getLogger(__name__)

__all__ = ["HF_ARCHITECTURES", "OUTTYPES", "ConvertError", "ConvertResult", "convert"]

# --outtype -> (general.file_type, the type of weight matrices)
OUTTYPES: dict[str, tuple[LlamaFileType, QType]] = {
    "f32": (LlamaFileType.ALL_F32, QType.F32),
    "f16": (LlamaFileType.MOSTLY_F16, QType.F16),
    "bf16": (LlamaFileType.MOSTLY_BF16, QType.BF16),
    "q8_0": (LlamaFileType.MOSTLY_Q8_0, QType.Q8_0),
}
_SKIPPED_SUFFIXES = (".attention.masked_bias", ".attention.bias", ".rotary_emb.inv_freq")


@dataclass
class PlannedTensor:
    """One output tensor: known before any weight is read; `load` reads and converts it."""

    name: str
    shape: tuple[int, ...]  # numpy order (rows last-but-one, row length last)
    load: Callable[[], torch.Tensor]
    source_dtype: str = "F32"  # safetensors' name of the checkpoint's type
    qtype: QType = QType.F32

    @property
    def nbytes(self) -> int:
        block, type_size = gguf.GGML_QUANT_SIZES[self.qtype]
        return math.prod(self.shape[:-1]) * (self.shape[-1] // block) * type_size


@dataclass
class ConvertResult:
    path: Path
    arch: str
    outtype: str
    n_tensors: int
    n_params: int
    n_bytes: int
    seconds: float
    tensor_types: dict[str, int] = field(default_factory=dict)  # type name -> count


# ---- reading the checkpoint ------------------------------------------------------------------


def _shards(model_dir: Path) -> list[Path]:
    """model.safetensors, or the shards the index names (sorted, as llama.cpp reads them)."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ConvertError(f"{index}: no 'weight_map'")
        parts = sorted(set(weight_map.values()))
        missing = [p for p in parts if not (model_dir / p).is_file()]
        if missing:
            raise ConvertError(f"{model_dir}: missing shard(s) {', '.join(missing)}")
        return [model_dir / p for p in parts]
    parts = sorted(model_dir.glob("*.safetensors"))
    if not parts:
        found = "pytorch_model.bin" if list(model_dir.glob("pytorch_model*.bin")) else "no weights"
        raise ConvertError(f"{model_dir}: no *.safetensors files ({found}); gguflm reads safetensors only")
    return parts


# ---- tensors ----------------------------------------------------------------------------------


def _permute_rope_rows(x: torch.Tensor, n_head: int) -> torch.Tensor:
    """Per head, rows [first half; second half] (HF's rotate-half RoPE) -> pairs (x0, x_half, x1, ...),
    the interleaved order llama.cpp's normal RoPE rotates. Works on weights and biases."""
    return x.reshape(n_head, 2, x.shape[0] // n_head // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


def _extra_tensors(fam: Family, p: Param, rope: dict[str, Any]) -> Iterator[tuple[str, torch.Tensor]]:
    """Tensors llama.cpp's converter computes from config.json (RoPE frequency factors)."""
    full = rope.get("full_attention", rope)
    if fam.arch == gguf.MODEL_ARCH.LLAMA and str(full.get("rope_type", "")).lower() == "llama3":
        base = full.get("rope_theta", 10000.0)
        dim = p.config.get("head_dim") or p.find("hidden_size") // p.find("num_attention_heads")
        freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        factor = full.get("factor", 8.0)
        low, high = full.get("low_freq_factor", 1.0), full.get("high_freq_factor", 4.0)
        n_ctx_orig = full.get("original_max_position_embeddings", 8192)
        factors = []
        for freq in freqs.tolist():  # per rotated pair: by how much its frequency is divided
            wavelen = 2 * math.pi / freq
            if wavelen < n_ctx_orig / high:
                factors.append(1.0)
            elif wavelen > n_ctx_orig / low:
                factors.append(factor)
            else:
                smooth = (n_ctx_orig / wavelen - low) / (high - low)
                factors.append(1 / ((1 - smooth) / factor + smooth))
        yield gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", torch.tensor(factors)
    if fam.phi3 and rope.get("long_factor"):
        long, short = rope["long_factor"], rope.get("short_factor")
        n_rot = phi3_rope_dims(p, rope)
        if short is None or len(long) != len(short) or len(long) != n_rot // 2:
            raise ConvertError(f"{p.source}: rope long_factor / short_factor must have {n_rot // 2} entries")
        yield gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FACTORS_LONG] + ".weight", torch.tensor(long)
        yield gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT] + ".weight", torch.tensor(short)


def tensor_type(name: str, shape: tuple[int, ...], weight_type: QType) -> QType:
    """llama.cpp's converter rule: 1-D tensors, norms and non-weights F32; the rest `weight_type`,
    falling back to F16 where a quantized type's block does not divide the row."""
    if len(shape) <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight"):
        return QType.F32
    block, _ = gguf.GGML_QUANT_SIZES[weight_type]
    if shape[-1] % block:
        log.warning(
            "%s: rows of %d are not a multiple of %s's block, written as F16",
            name,
            shape[-1],
            weight_type.name,
        )
        return QType.F16
    return weight_type


def _to_numpy(x: torch.Tensor, qtype: QType) -> np.ndarray:
    """The bytes (or floats) GGUFWriter writes for a tensor of type `qtype`."""
    data = x.numpy()
    if qtype == QType.F16 and data.dtype == np.float16:
        return data
    return gguf.quants.quantize(data.astype(np.float32, copy=False), qtype)


def _plan(model_dir: Path, fam: Family, p: Param, rope: dict[str, Any], n_vocab: int) -> list[PlannedTensor]:
    """Every output tensor with its name and shape, from the safetensors headers (types set later)."""
    from safetensors import safe_open

    n_layer = p.find("num_hidden_layers", "n_layer", "num_layers")
    names = gguf.get_tensor_name_map(fam.arch, n_layer)
    n_head = p.find("num_attention_heads", "n_head")
    n_head_kv = p.find("num_key_value_heads", default=n_head)
    plan: list[PlannedTensor] = []

    for name, value in _extra_tensors(fam, p, rope):
        plan.append(PlannedTensor(name, tuple(value.shape), lambda v=value: v))

    for shard in _shards(model_dir):
        try:
            with safe_open(shard, framework="pt") as f:
                entries = [
                    (k, tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()
                ]
        except Exception as e:  # safetensors raises its own SafetensorError
            raise ConvertError(f"{shard}: not a readable safetensors file ({e})") from e
        for hf_name, shape, dtype in entries:
            if hf_name.endswith(_SKIPPED_SUFFIXES):
                continue
            new_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if new_name is None:
                raise ConvertError(f"{shard.name}: cannot map tensor {hf_name!r} to a {fam.name} GGUF name")
            permute = 0
            if fam.permute_qk and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
                permute = n_head
            elif fam.permute_qk and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
                permute = n_head_kv
            shift = fam.norm_shift if hf_name.endswith("norm.weight") else 0.0
            rows = None
            if fam.arch == gguf.MODEL_ARCH.GEMMA3 and "embed_tokens.weight" in hf_name and shape[0] > n_vocab:
                rows, shape = n_vocab, (n_vocab, *shape[1:])  # drop rows past the real vocabulary

            def load(shard: Path = shard, hf_name: str = hf_name, permute: int = permute, shift: float = shift,
                     rows: int | None = rows) -> torch.Tensor:  # fmt: skip
                with safe_open(shard, framework="pt") as f:
                    x = f.get_tensor(hf_name)
                if x.dtype not in (torch.float16, torch.float32):  # bf16 and others: via F32, as llama.cpp
                    x = x.to(torch.float32)
                if rows is not None:
                    x = x[:rows]
                if permute:
                    x = _permute_rope_rows(x, permute)
                if shift:
                    x = x + shift
                return x

            plan.append(PlannedTensor(new_name, shape, load, dtype))
    seen: set[str] = set()
    for t in plan:
        if t.name in seen:
            raise ConvertError(f"{model_dir}: two checkpoint tensors map to {t.name}")
        seen.add(t.name)
    return plan


# ---- the conversion --------------------------------------------------------------------------


def _auto_outtype(plan: list[PlannedTensor]) -> str:
    """llama.cpp's --outtype auto: the type of the first matrix if it is bf16 or f16, else f16."""
    first = next((t.source_dtype for t in plan if len(t.shape) >= 2), "F16")
    return "bf16" if first == "BF16" else "f16"


def convert(
    model_dir: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    outtype: str = "auto",
    *,
    progress: Callable[[int, int, str], None] | None = None,
) -> ConvertResult:
    """Convert the checkpoint in `model_dir` to `out_path` (written as out_path + '.part', then moved).

    `outtype` is one of OUTTYPES or "auto" (llama.cpp's: bf16 when the checkpoint is bf16, else f16).
    `progress(i, n, tensor_name)` is called before each tensor is written. Raises ConvertError (a
    ValueError) naming what is wrong with the directory.
    """
    t0 = time.perf_counter()
    model_dir, out_path = Path(model_dir), Path(out_path)
    config = read_config(model_dir)
    fam = family_of(config, model_dir)
    config = with_config_defaults(fam, config)
    rope = rope_parameters(config)
    if fam.arch == gguf.MODEL_ARCH.GEMMA3:
        config = GEMMA3_DEFAULTS | {k: v for k, v in config.items() if v is not None}
        full = rope.setdefault("full_attention", rope) if "full_attention" in rope else rope
        full.setdefault("rope_theta", 1_000_000.0)
    p = Param(config, model_dir / "config.json")
    n_layer = p.find("num_hidden_layers", "n_layer", "num_layers")

    vocab = load_vocab(model_dir, config.get("vocab_size"), prefer_spm=fam.prefer_spm, phi3=fam.phi3)
    if fam.arch == gguf.MODEL_ARCH.LLAMA and config.get("vocab_size") == 49152:
        vocab.extra["add_bos"] = False  # llama.cpp's rule for "granite small models" (SmolLM too)

    plan = _plan(model_dir, fam, p, rope, len(vocab.tokens))
    if outtype == "auto":
        outtype = _auto_outtype(plan)
    if outtype not in OUTTYPES:
        raise ConvertError(f"--outtype must be one of {', '.join(OUTTYPES)} or auto, not {outtype!r}")
    ftype, weight_type = OUTTYPES[outtype]
    for t in plan:
        t.qtype = tensor_type(t.name, t.shape, weight_type)

    writer = gguf.GGUFWriter(None, fam.name)
    _write_metadata(writer, model_dir, fam, p, rope, n_layer, ftype, vocab, plan)
    for t in plan:  # the tensor table first (from the plan), the data after, one tensor at a time
        writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.qtype)

    partial = out_path.with_name(out_path.name + ".part")
    try:
        writer.write_header_to_file(partial)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for i, t in enumerate(plan):
            if progress is not None:
                progress(i, len(plan), t.name)
            data = _to_numpy(t.load(), t.qtype)
            if data.nbytes != t.nbytes:
                raise ConvertError(f"{t.name}: {data.nbytes} bytes, the plan said {t.nbytes}")
            writer.write_tensor_data(data)
            del data
        writer.close()
        os.replace(partial, out_path)
    except BaseException:
        writer.close()
        partial.unlink(missing_ok=True)
        raise
    counts: dict[str, int] = {}
    for t in plan:
        counts[t.qtype.name] = counts.get(t.qtype.name, 0) + 1
    return ConvertResult(
        path=out_path,
        arch=fam.name,
        outtype=outtype,
        n_tensors=len(plan),
        n_params=sum(math.prod(t.shape) for t in plan),
        n_bytes=out_path.stat().st_size,
        seconds=time.perf_counter() - t0,
        tensor_types=counts,
    )


def _write_metadata(
    w: gguf.GGUFWriter,
    model_dir: Path,
    fam: Family,
    p: Param,
    rope: dict[str, Any],
    n_layer: int,
    ftype: LlamaFileType,
    vocab: Vocab,
    plan: list[PlannedTensor],
) -> None:
    """general.* (gguf-py's Metadata, from the model card and directory name, as llama.cpp), the
    family's hyper-parameters, then the tokenizer."""
    n_params = sum(math.prod(t.shape) for t in plan)
    meta = gguf.Metadata.load(None, model_dir, None, n_params)
    if meta.name is None:
        meta.name = model_dir.name
    if meta.size_label is None and n_params > 0:
        meta.size_label = gguf.size_label(n_params, n_params, 0, 0)
    w.add_type(gguf.GGUFType.MODEL)
    meta.set_gguf_meta_model(w)
    write_hyperparameters(w, fam, p, rope, n_layer, ftype)
    if fam.phi3 and (attn_factor := phi3_attn_factor(p, rope)) is not None:
        w.add_rope_scaling_attn_factors(attn_factor)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if fam.arch == gguf.MODEL_ARCH.LLAMA:
        tokenizer_config = model_dir / "tokenizer_config.json"
        if tokenizer_config.is_file():
            add_prefix = json.loads(tokenizer_config.read_text(encoding="utf-8")).get("add_prefix_space")
            if add_prefix is not None:
                w.add_add_space_prefix(add_prefix)
    if fam.arch == gguf.MODEL_ARCH.GEMMA3 and vocab.model == "llama":
        vocab.add_space_prefix = False
    vocab.add_to(w)
    if "add_bos" in vocab.extra:
        w.add_add_bos_token(vocab.extra["add_bos"])
