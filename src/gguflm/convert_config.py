"""The config.json half of `gguflm convert`: which family a checkpoint is, the values its config
leaves to transformers' defaults, its RoPE settings, and the `{arch}.*` keys llama.cpp's converter
writes for it (`convert_hf_to_gguf.py`'s set_gguf_parameters of each family)."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
from gguf import LlamaFileType

from gguflm.convert_vocab import ConvertError

log = logging.getLogger(__name__)

__all__ = ["HF_ARCHITECTURES", "Family", "Param", "read_config", "rope_parameters", "write_hyperparameters"]


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


# ---- reading config.json ---------------------------------------------------------------------


def read_config(model_dir: Path) -> dict[str, Any]:
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


def family_of(config: dict[str, Any], model_dir: Path) -> Family:
    archs = config.get("architectures") or []
    if not archs:
        raise ConvertError(f"{model_dir / 'config.json'}: no 'architectures' entry")
    if archs[0] not in HF_ARCHITECTURES:
        raise ConvertError(
            f"{model_dir}: architecture {archs[0]!r} is not supported "
            f"(supported: {', '.join(sorted(HF_ARCHITECTURES))})"
        )
    return HF_ARCHITECTURES[archs[0]]


class Param:
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


def with_config_defaults(fam: Family, config: dict[str, Any]) -> dict[str, Any]:
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


def rope_parameters(config: dict[str, Any]) -> dict[str, Any]:
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


def _write_common(w: gguf.GGUFWriter, p: Param, rope: dict[str, Any], n_layer: int) -> None:
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


def write_hyperparameters(
    w: gguf.GGUFWriter, fam: Family, p: Param, rope: dict[str, Any], n_layer: int, ftype: LlamaFileType
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
GEMMA3_DEFAULTS = {
    "max_position_embeddings": 131072,
    "num_attention_heads": 8,
    "rms_norm_eps": 1e-6,
    "head_dim": 256,
    "num_key_value_heads": 4,
}


def _write_gemma3(w: gguf.GGUFWriter, p: Param, n_layer: int) -> None:
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


def phi3_rope_dims(p: Param, rope: dict[str, Any]) -> int:
    n_embd, n_head = p.find("hidden_size", "n_embd"), p.find("num_attention_heads", "n_head")
    return int(rope.get("partial_rotary_factor", 1.0) * n_embd) // n_head


def _write_phi3(w: gguf.GGUFWriter, p: Param, rope: dict[str, Any], n_layer: int) -> None:
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
    w.add_rope_dimension_count(phi3_rope_dims(p, rope))
    w.add_rope_freq_base(rope.get("full_attention", rope)["rope_theta"])
    w.add_sliding_window(p.config.get("sliding_window") or 0)


def phi3_attn_factor(p: Param, rope: dict[str, Any]) -> float | None:
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
