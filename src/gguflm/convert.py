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


@dataclass(frozen=True)
class Family:
    """How llama.cpp's converter treats one Hugging Face architecture."""

    arch: gguf.MODEL_ARCH
    permute_qk: bool = False  # llama: q/k rows to llama.cpp's interleaved RoPE pairs
    norm_shift: float = 0.0  # gemma: added to every *norm.weight
    vocab_size_key: bool = False  # llama: {arch}.vocab_size and rope.dimension_count
    prefer_spm: bool = True  # tokenizer.model over tokenizer.json when both are there
    phi3: bool = False  # Phi-3's own hyper-parameter and vocabulary rules

    @property
    def name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.arch]


_LLAMA = Family(gguf.MODEL_ARCH.LLAMA, permute_qk=True, vocab_size_key=True)
HF_ARCHITECTURES: dict[str, Family] = {
    "LlamaForCausalLM": _LLAMA,
    "MistralForCausalLM": _LLAMA,
    "Qwen2ForCausalLM": Family(gguf.MODEL_ARCH.QWEN2),
    "Qwen3ForCausalLM": Family(gguf.MODEL_ARCH.QWEN3),
    "Gemma3ForCausalLM": Family(gguf.MODEL_ARCH.GEMMA3, norm_shift=1.0),
    "Phi3ForCausalLM": Family(gguf.MODEL_ARCH.PHI3, phi3=True),
}


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


def _read_config(model_dir: Path) -> dict[str, Any]:
    if not model_dir.is_dir():
        raise ConvertError(f"{model_dir}: not a directory (give a Hugging Face checkpoint directory)")
    path = model_dir / "config.json"
    if not path.is_file():
        raise ConvertError(f"{model_dir}: no config.json (not a Hugging Face checkpoint directory)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConvertError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(config, dict):
        raise ConvertError(f"{path}: expected a JSON object")
    if isinstance(config.get("text_config"), dict):  # as llama.cpp: text settings to the top
        config = {**config, **config["text_config"]}
    return config


def _family(config: dict[str, Any], model_dir: Path) -> Family:
    archs = config.get("architectures") or []
    if not archs:
        raise ConvertError(f"{model_dir / 'config.json'}: no 'architectures' entry")
    if archs[0] not in HF_ARCHITECTURES:
        raise ConvertError(
            f"{model_dir}: architecture {archs[0]!r} is not supported "
            f"(supported: {', '.join(sorted(HF_ARCHITECTURES))})"
        )
    return HF_ARCHITECTURES[archs[0]]


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


class _Param:
    """config.json lookups that fail with a message naming the keys."""

    def __init__(self, config: dict[str, Any], source: Path) -> None:
        self.config, self.source = config, source

    def find(self, *keys: str, default: Any = ...) -> Any:
        for key in keys:
            if self.config.get(key) is not None:
                return self.config[key]
        if default is ...:
            raise ConvertError(f"{self.source}: missing {' / '.join(keys)}")
        return default


def _with_config_defaults(fam: Family, config: dict[str, Any]) -> dict[str, Any]:
    """config.json with the values transformers' config class of the family fills in when a key is
    absent. llama.cpp's converter reads the config through transformers' AutoConfig, so an older
    config.json without head_dim or rope_theta still gets these keys written; here without
    importing transformers."""
    defaults: dict[str, Any] = {"rope_theta": 10000.0}
    if fam.arch == gguf.MODEL_ARCH.LLAMA and config.get("hidden_size") and config.get("num_attention_heads"):
        defaults["head_dim"] = config["hidden_size"] // config["num_attention_heads"]
    elif fam.arch == gguf.MODEL_ARCH.QWEN3:
        defaults["head_dim"] = 128
    elif fam.arch == gguf.MODEL_ARCH.GEMMA3:
        defaults = {"rope_theta": 1_000_000.0, "rope_local_base_freq": 10000.0}
    if config.get("rope_parameters") or config.get("rope_scaling"):
        defaults.pop("rope_theta", None)  # the rope dict says it, or its default applies
        defaults.pop("rope_local_base_freq", None)
    return defaults | {k: v for k, v in config.items() if v is not None}


def _rope_parameters(config: dict[str, Any]) -> dict[str, Any]:
    """RoPE settings from `rope_parameters` (transformers 5) or `rope_scaling` plus top-level keys,
    in one dict as llama.cpp's converter collects them."""
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    if "full_attention" in rope or "sliding_attention" in rope:
        return rope
    local = next(
        (config[k] for k in ("local_rope_theta", "rope_local_base_freq", "swa_rope_theta") if k in config),
        None,
    )
    if local is not None:
        rope["sliding_attention"] = {"rope_theta": local}
    if "rope_theta" not in rope and config.get("rope_theta") is not None:
        rope["rope_theta"] = config["rope_theta"]
    if "rope_type" not in rope and rope.get("type") is not None:
        rope["rope_type"] = rope["type"]
    for key in ("partial_rotary_factor", "original_max_position_embeddings"):
        if key not in rope and config.get(key) is not None:
            rope[key] = config[key]
    return rope


# ---- hyper-parameters ---------------------------------------------------------------------


def _write_common(w: gguf.GGUFWriter, p: _Param, rope: dict[str, Any], n_layer: int) -> None:
    """The keys llama.cpp's TextModel writes for every family but Phi-3."""
    w.add_block_count(n_layer)
    w.add_context_length(p.find("max_position_embeddings", "n_ctx", "n_positions"))
    w.add_embedding_length(p.find("hidden_size", "n_embd"))
    w.add_feed_forward_length(p.find("intermediate_size", "n_inner"))
    w.add_head_count(p.find("num_attention_heads", "n_head"))
    if (n_head_kv := p.find("num_key_value_heads", default=None)) is not None:
        w.add_head_count_kv(n_head_kv)
    full = rope.get("full_attention", rope)
    kind, factor = str(full.get("rope_type") or ""), full.get("factor")
    if kind == "linear" and factor is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(factor)
    elif kind == "yarn" and factor is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(factor)
        w.add_rope_scaling_orig_ctx_len(full["original_max_position_embeddings"])
        if (ext := full.get("extrapolation_factor")) is not None:
            w.add_rope_scaling_yarn_ext_factor(ext)
        if (attn := full.get("attention_factor", full.get("attn_factor"))) is not None:
            w.add_rope_scaling_yarn_attn_factor(attn)
        if (fast := full.get("beta_fast")) is not None:
            w.add_rope_scaling_yarn_beta_fast(fast)
        if (slow := full.get("beta_slow")) is not None:
            w.add_rope_scaling_yarn_beta_slow(slow)
    elif kind in ("su", "longrope"):
        w.add_rope_scaling_type(gguf.RopeScalingType.LONGROPE)
    elif kind not in ("", "default", "llama3"):  # llama3: the rope_freqs tensor
        raise ConvertError(f"{p.source}: rope type {kind!r} is not supported")
    if (theta := full.get("rope_theta")) is not None:
        w.add_rope_freq_base(theta)
    if (local := rope.get("sliding_attention", {}).get("rope_theta")) is not None:
        w.add_rope_freq_base_swa(local)
    if (eps := p.find("rms_norm_eps", "norm_eps", default=None)) is not None:
        w.add_layer_norm_rms_eps(eps)
    if (head_dim := p.config.get("head_dim")) is not None:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)


def _write_hyperparameters(
    w: gguf.GGUFWriter, fam: Family, p: _Param, rope: dict[str, Any], n_layer: int, ftype: LlamaFileType
) -> None:
    if fam.phi3:
        _write_phi3(w, p, rope, n_layer)
    else:
        _write_common(w, p, rope, n_layer)
    if fam.vocab_size_key:
        w.add_vocab_size(p.find("vocab_size"))
        head_dim = p.config.get("head_dim") or p.find("hidden_size") // p.find("num_attention_heads")
        w.add_rope_dimension_count(head_dim)
    if fam.arch == gguf.MODEL_ARCH.GEMMA3:
        _write_gemma3(w, p, n_layer)
    w.add_file_type(ftype)


# Gemma 3's values where config.json is silent, as llama.cpp's converter fills them in
_GEMMA3_DEFAULTS = {
    "max_position_embeddings": 131072,
    "num_attention_heads": 8,
    "rms_norm_eps": 1e-6,
    "head_dim": 256,
    "num_key_value_heads": 4,
}


def _write_gemma3(w: gguf.GGUFWriter, p: _Param, n_layer: int) -> None:
    """Gemma 3's keys beyond the common ones (its defaults are filled in `_gemma3_config`)."""
    c = p.config
    if c.get("attn_logit_softcapping") is not None:
        raise ConvertError(f"{p.source}: Gemma 3 with attn_logit_softcapping is not supported by llama.cpp")
    if c.get("final_logit_softcapping"):
        w.add_final_logit_softcapping(c["final_logit_softcapping"])
    if c.get("sliding_window_pattern") != 1:
        w.add_sliding_window(p.find("sliding_window"))
    # llama.cpp assumes 5 local layers then 1 global; say so in the file when the config differs
    layer_types = c.get("layer_types")
    if layer_types and len(layer_types) == n_layer:
        local = [t == "sliding_attention" for t in layer_types]
        if local != [il % 6 < 5 for il in range(n_layer)]:
            log.warning("layer_types is not Gemma 3's 5:1 pattern: written per layer (llama.cpp ignores it)")
            w.add_sliding_window_pattern(local)
    scalar, head_dim = c.get("query_pre_attn_scalar"), c["head_dim"]
    if scalar is not None and scalar != head_dim and n_layer != 62:
        log.warning(
            "query_pre_attn_scalar %s != head_dim %s: llama.cpp scales queries by head_dim", scalar, head_dim
        )


def _phi3_rope_dims(p: _Param, rope: dict[str, Any]) -> int:
    n_embd, n_head = p.find("hidden_size", "n_embd"), p.find("num_attention_heads", "n_head")
    return int(rope.get("partial_rotary_factor", 1.0) * n_embd) // n_head


def _write_phi3(w: gguf.GGUFWriter, p: _Param, rope: dict[str, Any], n_layer: int) -> None:
    if "original_max_position_embeddings" not in rope:
        raise ConvertError(f"{p.source}: Phi-3 needs original_max_position_embeddings")
    w.add_context_length(p.find("n_positions", "max_position_embeddings"))
    w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    w.add_embedding_length(p.find("hidden_size", "n_embd"))
    w.add_feed_forward_length(p.find("intermediate_size"))
    w.add_block_count(n_layer)
    w.add_head_count(p.find("num_attention_heads", "n_head"))
    w.add_head_count_kv(p.find("num_key_value_heads", "n_head_kv"))
    w.add_layer_norm_rms_eps(p.find("rms_norm_eps"))
    w.add_rope_dimension_count(_phi3_rope_dims(p, rope))
    w.add_rope_freq_base(rope.get("full_attention", rope)["rope_theta"])
    w.add_sliding_window(p.config.get("sliding_window") or 0)


# ---- tensors ----------------------------------------------------------------------------------


def _permute_rope_rows(x: torch.Tensor, n_head: int) -> torch.Tensor:
    """Per head, rows [first half; second half] (HF's rotate-half RoPE) -> pairs (x0, x_half, x1, ...),
    the interleaved order llama.cpp's normal RoPE rotates. Works on weights and biases."""
    return x.reshape(n_head, 2, x.shape[0] // n_head // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


def _extra_tensors(fam: Family, p: _Param, rope: dict[str, Any]) -> Iterator[tuple[str, torch.Tensor]]:
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
        n_rot = _phi3_rope_dims(p, rope)
        if short is None or len(long) != len(short) or len(long) != n_rot // 2:
            raise ConvertError(f"{p.source}: rope long_factor / short_factor must have {n_rot // 2} entries")
        yield gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FACTORS_LONG] + ".weight", torch.tensor(long)
        yield gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT] + ".weight", torch.tensor(short)


def _phi3_attn_factor(p: _Param, rope: dict[str, Any]) -> float | None:
    """LongRoPE's attention scale for Phi-3's long-context models (None: no LongRoPE)."""
    if not rope.get("long_factor"):
        return None
    n_ctx, n_orig = p.find("n_positions", "max_position_embeddings"), rope["original_max_position_embeddings"]
    scale = n_ctx / n_orig
    kind = str(rope.get("rope_type", "")).lower()
    if kind in ("su", "longrope"):
        return math.sqrt(1 + math.log(scale) / math.log(n_orig)) if scale > 1.0 else 1.0
    if kind == "yarn":
        return 0.1 * math.log(scale) + 1.0 if scale > 1.0 else 1.0
    raise ConvertError(f"{p.source}: Phi-3 rope type {kind!r} is not supported")


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


def _plan(model_dir: Path, fam: Family, p: _Param, rope: dict[str, Any], n_vocab: int) -> list[PlannedTensor]:
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
    config = _read_config(model_dir)
    fam = _family(config, model_dir)
    config = _with_config_defaults(fam, config)
    rope = _rope_parameters(config)
    if fam.arch == gguf.MODEL_ARCH.GEMMA3:
        config = _GEMMA3_DEFAULTS | {k: v for k, v in config.items() if v is not None}
        full = rope.setdefault("full_attention", rope) if "full_attention" in rope else rope
        full.setdefault("rope_theta", 1_000_000.0)
    p = _Param(config, model_dir / "config.json")
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
    p: _Param,
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
    _write_hyperparameters(w, fam, p, rope, n_layer, ftype)
    if fam.phi3 and (attn_factor := _phi3_attn_factor(p, rope)) is not None:
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
