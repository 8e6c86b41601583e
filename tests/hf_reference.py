"""An independent reference for our forward pass: Hugging Face transformers run on the same GGUF.

transformers dequantizes the GGUF to float32 and runs its own Llama/Qwen2/Qwen3/Gemma2/Gemma3/Phi3
code, so agreement with it checks our dequantization, RoPE layout, attention and norms against code
we did not write. It must run offline: the GGUF carries config and tokenizer, and nothing may be
downloaded here.

transformers' GGUF loader leaves a few hyperparameters at its config classes' defaults although the
file states them (see `llama_cpp_config_overrides`); `hf_model` sets them from the file as llama.cpp
reads it, so that the reference means what llama.cpp means. tests/test_hf_reference.py checks both
that the raw loader still has these gaps and that, with them filled, HF equals a plain float64
forward written from llama.cpp's graph code.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

# Set before transformers is imported: it reads these once.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import gguf
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()


def llama_cpp_config_overrides(gguf_path: Path) -> dict[str, Any]:
    """Config values transformers' GGUF loader (5.x, `GGUF_CONFIG_MAPPING`) does not take from the
    file, set as llama.cpp reads the file instead.

    - qwen3: `qwen3.attention.key_length` is not mapped (it is for qwen3_moe), so `head_dim` stays
      Qwen3Config's 128. That is right for the released Qwen3 models and wrong for any other file.
    - gemma2/gemma3: nothing sets `query_pre_attn_scalar`, which stays 256, so HF scales queries by
      1/16. llama.cpp (llama-model.cpp, `f_attention_scale`) uses 1/sqrt(key_length), except for the
      27B models (46 / 62 layers), where it uses 1/sqrt(n_embd / n_head), as Google's configs do.
    - gemma2: `gemma2.attn_logit_softcapping` / `final_logit_softcapping` are not mapped; HF keeps
      50 / 30 (Gemma 2's real values and llama.cpp's defaults when the keys are absent).
    """
    fields = gguf.GGUFReader(Path(gguf_path)).fields
    meta = {key: fields[key].contents() for key in fields if not key.startswith("tokenizer.")}
    arch = meta["general.architecture"]
    overrides: dict[str, Any] = {}
    key_length = meta.get(f"{arch}.attention.key_length")
    if arch == "qwen3" and key_length is not None:
        overrides["head_dim"] = key_length
    if arch in ("gemma2", "gemma3"):
        n_embd, n_head = meta[f"{arch}.embedding_length"], meta[f"{arch}.attention.head_count"]
        is_27b = meta[f"{arch}.block_count"] == {"gemma2": 46, "gemma3": 62}[arch]
        overrides["query_pre_attn_scalar"] = n_embd // n_head if is_27b else key_length or n_embd // n_head
    if arch == "gemma2":
        for key in ("attn_logit_softcapping", "final_logit_softcapping"):
            if f"{arch}.{key}" in meta:
                overrides[key] = float(meta[f"{arch}.{key}"])
    return overrides


@functools.lru_cache(maxsize=4)
def hf_model(gguf_path: Path, *, llama_cpp_config: bool = True) -> Any:
    """The transformers model for a GGUF file, in float32 and eval mode; cached per resolved path.

    With `llama_cpp_config` (the default) the config values the loader misses are set from the file
    (`llama_cpp_config_overrides`); without it the model is exactly what transformers loads.
    """
    path = Path(gguf_path).resolve()
    overrides = llama_cpp_config_overrides(path) if llama_cpp_config else {}
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32, local_files_only=True, **overrides
    )
    return model.eval()


@functools.lru_cache(maxsize=4)
def hf_tokenizer(gguf_path: Path) -> Any:
    """transformers' tokenizer rebuilt from the GGUF metadata (a second opinion on tokenization)."""
    path = Path(gguf_path).resolve()
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)


def hf_logits(gguf_path: Path, token_ids: list[int]) -> torch.Tensor:
    """float32 logits, shape (n_tokens, n_vocab), for one causal pass over the whole sequence."""
    if not token_ids:
        raise ValueError("token_ids is empty")
    model = hf_model(Path(gguf_path).resolve())
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([token_ids], dtype=torch.long), use_cache=False)
    return out.logits[0].to(torch.float32)


def hf_logits_with_config(gguf_path: Path, token_ids: list[int], **config: Any) -> torch.Tensor:
    """hf_logits with config values set by hand (rope_parameters, which the GGUF loader does not map)."""
    path = Path(gguf_path).resolve()
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32, local_files_only=True, **config
    ).eval()
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([token_ids], dtype=torch.long), use_cache=False)
    return out.logits[0].to(torch.float32)
