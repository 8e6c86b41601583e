"""A trained model as a GGUF file that gguflm, llama.cpp and every GGUF tool run: architecture `llama`,
the hyper-parameter keys llama.cpp's loader requires, the BPE tokenizer, matrices in F32, F16 or Q8_0.

The q/k rows are written as trained: the engine rotates adjacent pairs, llama.cpp's "normal" rope for
`llama`, which is the GGUF layout (Hugging Face's halves are what llama.cpp's converter permutes).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import gguf
import torch
from gguf import GGMLQuantizationType as GQ
from tokenizers import Tokenizer

from gguflm.config import ModelArgs
from gguflm.train.bpe import tokenizer_metadata
from gguflm.writer import write_gguf

log = logging.getLogger("gguflm")

QTYPES: dict[str, GQ] = {"f32": GQ.F32, "f16": GQ.F16, "q8_0": GQ.Q8_0}  # by OUTTYPES name
_FILE_TYPES = {
    GQ.F32: gguf.LlamaFileType.ALL_F32,
    GQ.F16: gguf.LlamaFileType.MOSTLY_F16,
    GQ.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0,
}


def model_metadata(args: ModelArgs, name: str) -> dict[str, Any]:
    """The `general.*` and `llama.*` keys for args (llama.cpp's LLM_KV names, via gguf-py's Keys)."""
    k = gguf.Keys
    a = args

    def key(template: str) -> str:
        return template.format(arch="llama")

    return {
        "general.architecture": "llama",
        "general.type": "model",
        "general.name": name,
        key(k.LLM.VOCAB_SIZE): a.n_vocab,
        key(k.LLM.CONTEXT_LENGTH): a.n_ctx_train,
        key(k.LLM.EMBEDDING_LENGTH): a.n_embd,
        key(k.LLM.BLOCK_COUNT): a.n_layer,
        key(k.LLM.FEED_FORWARD_LENGTH): a.n_ff,
        key(k.Attention.HEAD_COUNT): a.n_head,
        key(k.Attention.HEAD_COUNT_KV): a.n_head_kv,
        key(k.Attention.LAYERNORM_RMS_EPS): float(a.norm_eps),
        key(k.Rope.FREQ_BASE): float(a.rope_freq_base),
        key(k.Rope.DIMENSION_COUNT): a.rope_dim,
    }


def tensor_type(name: str, shape: tuple[int, ...], outtype: GQ) -> GQ:
    """Vectors (norms) stay F32; a matrix whose rows do not split into Q8_0's blocks of 32 is written
    F16 instead (llama.cpp's converter falls back the same way)."""
    if len(shape) == 1:
        return GQ.F32
    block, _ = gguf.GGML_QUANT_SIZES[outtype]
    if shape[-1] % block:
        log.info("%s: rows of %d are not a multiple of %d: F16", name, shape[-1], block)
        return GQ.F16
    return outtype


def export_gguf(
    path: str | os.PathLike[str],
    args: ModelArgs,
    params: dict[str, torch.Tensor],
    tokenizer: Tokenizer,
    outtype: str = "f32",
    name: str = "gguflm-trained",
) -> Path:
    """Write the model (params: GGUF name -> tensor) and its tokenizer; outtype f32, f16 or q8_0."""
    if outtype not in QTYPES:
        raise ValueError(f"unknown output type {outtype!r} (expected one of {', '.join(QTYPES)})")
    qtype = QTYPES[outtype]
    tensors = {}
    for tname, value in params.items():
        array = value.detach().to(device="cpu", dtype=torch.float32).numpy()
        tensors[tname] = (array, tensor_type(tname, array.shape, qtype))
    metadata = model_metadata(args, name) | {"general.file_type": int(_FILE_TYPES[qtype])}
    if qtype == GQ.Q8_0:
        metadata["general.quantization_version"] = gguf.GGML_QUANT_VERSION
    metadata |= tokenizer_metadata(tokenizer)
    return write_gguf(path, metadata, tensors)
