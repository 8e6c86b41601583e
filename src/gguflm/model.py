"""`Model`: a GGUF file loaded with its tokenizer into its family's transformer (gguflm.models)."""

from __future__ import annotations

import ctypes
import logging
import os
import sys
from pathlib import Path

import torch

from gguflm.config import ModelArgs
from gguflm.gguf_file import GGUFError, GGUFFile
from gguflm.models import Transformer, load_transformer, model_args
from gguflm.tokenizer import Tokenizer

MODES = ("fast", "reference")
log = logging.getLogger("gguflm")


def _return_freed_memory() -> None:
    """Hand the heap freed by weight packing back to the OS (glibc keeps it otherwise)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            log.debug("malloc_trim is not available")


class Model:
    """A GGUF model: metadata, ModelArgs, tokenizer and transformer weights (kept in their GGUF format)."""

    def __init__(
        self, file: GGUFFile, args: ModelArgs, tokenizer: Tokenizer, transformer: Transformer, mode: str
    ) -> None:
        self.mode = mode
        self.file = file
        self.args = args
        self.tokenizer = tokenizer
        self.transformer = transformer

    @classmethod
    def load(
        cls, path: str | os.PathLike[str], *, mode: str = "fast", device: str | torch.device = "cpu"
    ) -> Model:
        """Load a GGUF file. mode "fast" uses packed quantized kernels; "reference" is exact fp32."""
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r} (expected one of {MODES})")
        file = GGUFFile(path)
        args = model_args(file)  # an unknown architecture is named before the tokenizer is read
        tokenizer = Tokenizer.from_metadata(file.metadata, source=str(file.path))
        if tokenizer.n_vocab != args.n_vocab:
            raise GGUFError(
                f"{file.path}: tokenizer has {tokenizer.n_vocab} tokens, the model {args.n_vocab}"
            )
        transformer = load_transformer(file, args, mode, torch.device(device))
        file.release_pages()
        _return_freed_memory()
        return cls(file, args, tokenizer, transformer, mode)

    @property
    def path(self) -> Path:
        return self.file.path

    @property
    def n_vocab(self) -> int:
        return self.args.n_vocab

    @property
    def n_embd(self) -> int:
        return self.args.n_embd

    def token_embeddings(self, tokens: list[int] | torch.Tensor) -> torch.Tensor:
        """(n, n_embd) rows of the input embedding matrix, for Batch.from_embeddings."""
        ids = torch.as_tensor(tokens, dtype=torch.long)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.n_vocab):
            raise ValueError(f"token ids must be in [0, {self.n_vocab})")
        return self.transformer.embed(ids)
