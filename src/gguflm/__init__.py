"""gguflm: llama.cpp-style inference of GGUF models in Python, on PyTorch.

The names below are imported on first use (PEP 562), so that `import gguflm.tokenizer` or the
`gguflm tokenize` command do not load the whole engine.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gguflm.batch import Batch
    from gguflm.config import ModelArgs
    from gguflm.context import DECODE_INVALID, DECODE_NO_SLOT, DECODE_OK, Context, normalize
    from gguflm.gguf_file import GGUFError, GGUFFile
    from gguflm.llm import LLM
    from gguflm.model import Model

_EXPORTS = {  # name -> the module that defines it
    "DECODE_INVALID": "gguflm.context",
    "DECODE_NO_SLOT": "gguflm.context",
    "DECODE_OK": "gguflm.context",
    "LLM": "gguflm.llm",
    "Batch": "gguflm.batch",
    "Context": "gguflm.context",
    "GGUFError": "gguflm.gguf_file",
    "GGUFFile": "gguflm.gguf_file",
    "Model": "gguflm.model",
    "ModelArgs": "gguflm.config",
    "normalize": "gguflm.context",
}

__all__ = [
    "DECODE_INVALID",
    "DECODE_NO_SLOT",
    "DECODE_OK",
    "LLM",
    "Batch",
    "Context",
    "GGUFError",
    "GGUFFile",
    "Model",
    "ModelArgs",
    "normalize",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'gguflm' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups do not come back here
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
