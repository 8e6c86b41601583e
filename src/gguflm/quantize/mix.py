"""Which tensor gets which type: llama-quantize's rules (src/llama-quant.cpp, llama_tensor_get_type).

A file type (`Q4_K_M`) names a default tensor type (Q4_K) and a mix: attn_v and ffn_down of some
layers get more bits (use_more_bits), the output head Q6_K, and so on. Tensors are visited in
llama.cpp's order (layer, then name), because some rules count the attn_v tensors seen so far.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum

import gguf

QT = gguf.GGMLQuantizationType
FT = gguf.LlamaFileType

# name on the command line -> (file type, default tensor type); aliases as llama-quantize has them
FILE_TYPES: dict[str, tuple[FT, QT]] = {
    "Q4_0": (FT.MOSTLY_Q4_0, QT.Q4_0),
    "Q4_1": (FT.MOSTLY_Q4_1, QT.Q4_1),
    "Q5_0": (FT.MOSTLY_Q5_0, QT.Q5_0),
    "Q5_1": (FT.MOSTLY_Q5_1, QT.Q5_1),
    "Q8_0": (FT.MOSTLY_Q8_0, QT.Q8_0),
    "Q2_K": (FT.MOSTLY_Q2_K, QT.Q2_K),
    "Q2_K_S": (FT.MOSTLY_Q2_K_S, QT.Q2_K),
    "Q3_K": (FT.MOSTLY_Q3_K_M, QT.Q3_K),
    "Q3_K_S": (FT.MOSTLY_Q3_K_S, QT.Q3_K),
    "Q3_K_M": (FT.MOSTLY_Q3_K_M, QT.Q3_K),
    "Q3_K_L": (FT.MOSTLY_Q3_K_L, QT.Q3_K),
    "Q4_K": (FT.MOSTLY_Q4_K_M, QT.Q4_K),
    "Q4_K_S": (FT.MOSTLY_Q4_K_S, QT.Q4_K),
    "Q4_K_M": (FT.MOSTLY_Q4_K_M, QT.Q4_K),
    "Q5_K": (FT.MOSTLY_Q5_K_M, QT.Q5_K),
    "Q5_K_S": (FT.MOSTLY_Q5_K_S, QT.Q5_K),
    "Q5_K_M": (FT.MOSTLY_Q5_K_M, QT.Q5_K),
    "Q6_K": (FT.MOSTLY_Q6_K, QT.Q6_K),
    "F16": (FT.MOSTLY_F16, QT.F16),
    "BF16": (FT.MOSTLY_BF16, QT.BF16),
    "F32": (FT.ALL_F32, QT.F32),
}

# the types --output-tensor-type / --token-embedding-type accept (what gguflm can write)
TENSOR_TYPES: dict[str, QT] = {
    t.name: t
    for t in (
        QT.F32, QT.F16, QT.BF16, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0,
        QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K,
    )
}  # fmt: skip

FLOAT_TYPES = (QT.F32, QT.F16, QT.BF16)
# a 256-wide type that does not fit a row falls back to a 32-wide one (tensor_type_fallback)
FALLBACK = {QT.Q2_K: QT.Q4_0, QT.Q3_K: QT.Q4_0, QT.Q4_K: QT.Q5_0, QT.Q5_K: QT.Q5_1, QT.Q6_K: QT.Q8_0}


class Category(Enum):
    OUTPUT = "output"
    TOKEN_EMBD = "token_embd"
    ATTN_QKV = "attn_qkv"
    ATTN_KV_B = "attn_kv_b"
    ATTN_V = "attn_v"
    ATTN_K = "attn_k"
    ATTN_Q = "attn_q"
    ATTN_OUTPUT = "attn_output"
    FFN_UP = "ffn_up"
    FFN_GATE = "ffn_gate"
    FFN_DOWN = "ffn_down"
    OTHER = "other"


def category(name: str) -> Category:
    """tensor_get_category: by substring, first match wins (so attn_qkv before attn_q)."""
    if name == "output.weight":
        return Category.OUTPUT
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return Category.TOKEN_EMBD
    for key, cat in (
        ("attn_qkv.weight", Category.ATTN_QKV),
        ("attn_kv_b.weight", Category.ATTN_KV_B),
        ("attn_v.weight", Category.ATTN_V),
        ("attn_k.weight", Category.ATTN_K),
        ("attn_q.weight", Category.ATTN_Q),
        ("attn_output.weight", Category.ATTN_OUTPUT),
        ("ffn_up", Category.FFN_UP),
        ("ffn_gate", Category.FFN_GATE),
        ("ffn_down", Category.FFN_DOWN),
    ):
        if key in name:
            return cat
    return Category.OTHER


_NOT_QUANTIZED = (
    "_norm.weight", "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "altup", "laurel",
    "per_layer_model_proj", "ssm_conv1d", "shortconv.conv.weight", "indexer.k_proj.weight",
    "indexer.q_proj.weight", "time_mix_first.weight", "time_mix_w0.weight", "time_mix_w1.weight",
    "time_mix_w2.weight", "time_mix_v0.weight", "time_mix_v1.weight", "time_mix_v2.weight",
    "time_mix_a0.weight", "time_mix_a1.weight", "time_mix_a2.weight", "time_mix_g1.weight",
    "time_mix_g2.weight", "time_mix_decay_w1.weight", "time_mix_decay_w2.weight",
    "time_mix_lerp_fused.weight", "attn_rel_b.weight", ".position_embd", ".rel_pos", ".patch_embd",
)  # fmt: skip


def allows_quantization(name: str, n_dims: int, quantize_output: bool = True) -> bool:
    """tensor_allows_quantization: 2-D and 3-D `*weight` tensors, except norms and a list of small ones."""
    if n_dims < 2 or not name.endswith("weight"):
        return False
    if name == "output.weight" and not quantize_output:
        return False
    if name in ("position_embd.weight", "token_types.weight"):
        return False
    return not any(part in name for part in _NOT_QUANTIZED)


def tensor_order(names: list[str]) -> list[str]:
    """llama_model_loader's weights_map order: by layer number (-1 outside blocks), then by name."""

    def key(name: str) -> tuple[int, str]:
        m = re.match(r"blk\.(-?\d+)\.", name)
        return (int(m.group(1)) if m else -1, name)

    return sorted(names, key=key)


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """The layers K_M mixes give more bits: the first and last eighth, and every third in between."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


@dataclass
class ModelFacts:
    """What the rules read from the model's metadata (llama_hparams)."""

    arch: str
    n_layer: int
    n_gqa: int  # n_head / n_head_kv of layer 0
    n_expert: int = 0
    is_70b: bool = False  # llama.cpp's LLM_TYPE_70B: a llama with 80 layers and grouped KV heads


@dataclass
class MixState:
    """quantize_state_impl: counters over the tensors visited so far."""

    facts: ModelFacts
    ftype: FT
    has_imatrix: bool = False
    output_type: QT | None = None
    token_embd_type: QT | None = None
    pure: bool = False
    n_attention_wv: int = 0
    i_attention_wv: int = 0
    i_ffn_down: int = 0
    i_ffn_gate: int = 0
    i_ffn_up: int = 0
    has_tied_embeddings: bool = True
    fallbacks: list[str] = field(default_factory=list)


def _layer(st: MixState, counter: int, name: str) -> tuple[int, int]:
    """layer_info: the counter, or (with experts) the layer number parsed from the name."""
    if st.facts.n_expert > 1:
        m = re.match(r"blk\.(\d+)\.", name)
        if m is None:
            raise ValueError(f"failed to determine layer for tensor {name}")
        return int(m.group(1)), st.facts.n_layer
    return counter, st.facts.n_layer


def _mix_type(st: MixState, new: QT, name: str, ncols: int, cat: Category) -> QT:
    """llama_tensor_get_type_impl for the K-quant and legacy file types."""
    f, ft, arch = st.facts, st.ftype, st.facts.arch
    falcon = arch == "falcon"
    if cat == Category.OUTPUT or (st.has_tied_embeddings and cat == Category.TOKEN_EMBD):
        if st.output_type is not None:
            return st.output_type
        block = gguf.GGML_QUANT_SIZES[new][0]
        if falcon or ncols % block:
            return QT.Q8_0
        return new if new == QT.Q8_0 else QT.Q6_K
    if cat == Category.TOKEN_EMBD:
        return st.token_embd_type if st.token_embd_type is not None else new
    if cat in (Category.ATTN_V, Category.ATTN_QKV, Category.ATTN_KV_B):
        if ft == FT.MOSTLY_Q2_K:
            new = QT.Q4_K if f.n_gqa >= 4 else QT.Q3_K
        elif ft == FT.MOSTLY_Q2_K_S and f.n_gqa >= 4:
            new = QT.Q4_K
        elif ft == FT.MOSTLY_Q3_K_M:
            new = QT.Q5_K if st.i_attention_wv < 2 else QT.Q4_K
        elif ft == FT.MOSTLY_Q3_K_L:
            new = QT.Q5_K
        elif ft in (FT.MOSTLY_Q4_K_M, FT.MOSTLY_Q5_K_M) and use_more_bits(
            st.i_attention_wv, st.n_attention_wv
        ):
            new = QT.Q6_K
        elif ft == FT.MOSTLY_Q4_K_S and st.i_attention_wv < 4:
            new = QT.Q5_K
        if f.is_70b and new in (QT.Q3_K, QT.Q4_K):
            new = QT.Q5_K
        if f.n_expert == 8:
            new = QT.Q8_0
        st.i_attention_wv += 1
    elif cat == Category.ATTN_K:
        if f.n_expert == 8:
            new = QT.Q8_0
    elif cat == Category.FFN_DOWN:
        i_layer, n_layer = _layer(st, st.i_ffn_down, name)
        if ft == FT.MOSTLY_Q2_K:
            new = QT.Q3_K
        elif ft == FT.MOSTLY_Q2_K_S:
            if i_layer < n_layer // 8:
                new = QT.Q4_K
        elif ft == FT.MOSTLY_Q3_K_M:
            if i_layer < n_layer // 16:
                new = QT.Q5_K
            elif not falcon or use_more_bits(i_layer, n_layer):
                new = QT.Q4_K
            else:
                new = QT.Q3_K
        elif ft == FT.MOSTLY_Q3_K_L:
            new = QT.Q4_K if falcon else QT.Q5_K
        elif ft == FT.MOSTLY_Q4_K_M:
            if falcon:
                new = (
                    QT.Q6_K
                    if i_layer < n_layer // 16
                    else QT.Q5_K
                    if use_more_bits(i_layer, n_layer)
                    else QT.Q4_K
                )
            elif use_more_bits(i_layer, n_layer):
                new = QT.Q6_K
        elif ft == FT.MOSTLY_Q5_K_M and use_more_bits(i_layer, n_layer):
            new = QT.Q6_K
        elif ft == FT.MOSTLY_Q4_K_S and not falcon and i_layer < n_layer // 8:
            new = QT.Q5_K
        elif ft in (FT.MOSTLY_Q4_0, FT.MOSTLY_Q5_0) and st.has_imatrix and i_layer < n_layer // 8:
            new = QT.Q4_1 if ft == FT.MOSTLY_Q4_0 else QT.Q5_1
        st.i_ffn_down += 1
    elif cat == Category.ATTN_OUTPUT:
        if not falcon:
            if f.n_expert == 8:
                if ft in (
                    FT.MOSTLY_Q2_K,
                    FT.MOSTLY_Q3_K_S,
                    FT.MOSTLY_Q3_K_M,
                    FT.MOSTLY_Q4_K_S,
                    FT.MOSTLY_Q4_K_M,
                ):
                    new = QT.Q5_K
            elif ft == FT.MOSTLY_Q2_K:
                new = QT.Q3_K
            elif ft == FT.MOSTLY_Q3_K_M:
                new = QT.Q4_K
            elif ft == FT.MOSTLY_Q3_K_L:
                new = QT.Q5_K
        elif ft == FT.MOSTLY_Q3_K_L:
            new = QT.Q4_K
    elif cat == Category.ATTN_QKV:  # unreachable (handled with attn_v above), kept as llama.cpp has it
        pass
    elif cat == Category.FFN_GATE:
        st.i_ffn_gate += 1
    elif cat == Category.FFN_UP:
        st.i_ffn_up += 1
    return new


def _fallback(st: MixState, name: str, ncols: int, target: QT) -> QT:
    """tensor_type_fallback: a row length the type's block does not divide."""
    block = gguf.GGML_QUANT_SIZES[target][0]
    if ncols % block == 0:
        return target
    new = FALLBACK.get(target, target)
    if ncols % gguf.GGML_QUANT_SIZES[new][0]:
        new = QT.F16
    st.fallbacks.append(f"{name}: {ncols} columns not divisible by {block} ({target.name}) -> {new.name}")
    return new


def target_type(st: MixState, name: str, shape: tuple[int, ...], current: QT, default: QT) -> QT:
    """llama_tensor_get_type for one tensor (shape in torch order: the row length is shape[-1])."""
    if not allows_quantization(name, len(shape)):
        return current
    cat = category(name)
    if st.token_embd_type is not None and cat == Category.TOKEN_EMBD:
        return st.token_embd_type
    if st.output_type is not None and cat == Category.OUTPUT:
        return st.output_type
    new = default
    if default in FLOAT_TYPES:  # ggml_is_quantized: float targets take no mix and no fallback
        return new
    ncols = shape[-1]
    if not st.pure:
        new = _mix_type(st, new, name, ncols, cat)
    return _fallback(st, name, ncols, new)


def plan(
    tensors: list[tuple[str, tuple[int, ...], QT]],
    ftype_name: str,
    facts: ModelFacts,
    *,
    has_imatrix: bool = False,
    pure: bool = False,
    output_type: QT | None = None,
    token_embd_type: QT | None = None,
) -> tuple[list[tuple[str, QT]], MixState]:
    """(name, shape, current type) per tensor -> [(name, target type)] in llama.cpp's tensor order."""
    if ftype_name not in FILE_TYPES:
        raise ValueError(f"unknown quantization type {ftype_name!r} (one of: {', '.join(FILE_TYPES)})")
    ftype, default = FILE_TYPES[ftype_name]
    st = MixState(facts, ftype, has_imatrix, output_type, token_embd_type, pure)
    by_name = {name: (shape, qtype) for name, shape, qtype in tensors}
    order = tensor_order(list(by_name))
    for name in order:
        if category(name) in (Category.ATTN_V, Category.ATTN_QKV, Category.ATTN_KV_B):
            st.n_attention_wv += 1
        if category(name) == Category.OUTPUT:
            st.has_tied_embeddings = False
    out = [(name, target_type(st, name, *by_name[name], default)) for name in order]
    if ftype == FT.MOSTLY_Q2_K_S and not has_imatrix:
        needs = [
            n for n, t in out if t == QT.Q2_K and category(n) not in (Category.OUTPUT, Category.TOKEN_EMBD)
        ]
        if needs:
            raise ValueError(f"Q2_K_S requires an importance matrix (--imatrix): tensor {needs[0]}")
    return out, st
