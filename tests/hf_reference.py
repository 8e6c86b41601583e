"""An independent reference for our forward pass: Hugging Face transformers run on the same GGUF.

transformers dequantizes the GGUF to float32 and runs its own Llama/Qwen2 code, so agreement with it
checks our dequantization, RoPE layout, attention and norms against code we did not write. It must
run offline: the GGUF carries config and tokenizer, and nothing may be downloaded here.
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

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()


@functools.lru_cache(maxsize=4)
def hf_model(gguf_path: Path) -> Any:
    """The transformers model for a GGUF file, in float32 and eval mode; cached per resolved path."""
    path = Path(gguf_path).resolve()
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32, local_files_only=True
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
