"""gguflm: llama.cpp-style inference of GGUF models in Python, on PyTorch."""

from gguflm.batch import Batch
from gguflm.config import ModelArgs
from gguflm.context import DECODE_INVALID, DECODE_NO_SLOT, DECODE_OK, Context, normalize
from gguflm.gguf_file import GGUFError, GGUFFile
from gguflm.llm import LLM
from gguflm.model import Model

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
