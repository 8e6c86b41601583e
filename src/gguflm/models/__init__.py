"""One module per model family; `ARCHITECTURES` maps GGUF's `general.architecture` to its class."""

from __future__ import annotations

import torch

from gguflm.config import ModelArgs
from gguflm.gguf_file import GGUFError, GGUFFile
from gguflm.models.base import PREFILL_ROWS, SequenceGroup, Transformer, UBatch, Weights
from gguflm.models.gemma3 import Gemma2, Gemma3
from gguflm.models.llama import Llama, Qwen2
from gguflm.models.phi3 import Phi3
from gguflm.models.qwen3 import Qwen3

ARCHITECTURES: dict[str, type[Transformer]] = {
    "llama": Llama,
    "qwen2": Qwen2,
    "qwen3": Qwen3,
    "gemma2": Gemma2,
    "gemma3": Gemma3,
    "phi3": Phi3,
}

__all__ = [
    "ARCHITECTURES",
    "PREFILL_ROWS",
    "SequenceGroup",
    "Transformer",
    "UBatch",
    "load_transformer",
    "model_args",
]


def family(file: GGUFFile) -> type[Transformer]:
    arch = file.require("general.architecture")
    if arch not in ARCHITECTURES:
        raise GGUFError(
            f"{file.path}: unknown architecture {arch!r} (supported: {', '.join(sorted(ARCHITECTURES))})"
        )
    return ARCHITECTURES[arch]


def model_args(file: GGUFFile) -> ModelArgs:
    """The hyper-parameters of the file's model, as its family reads them."""
    return family(file).configure(ModelArgs.from_gguf(file), file)


def load_transformer(file: GGUFFile, args: ModelArgs, mode: str, device: torch.device) -> Transformer:
    """The family's transformer over the file's tensors (kept in their formats)."""
    return family(file)(args, Weights(file, args, mode, device))
