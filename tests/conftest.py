"""Shared fixtures: the real SmolLM2 GGUF and tiny random models written by our own GGUF writer."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from gguflm.model import Model
from gguflm.paths import default_model_path
from gguflm.writer import make_tiny_model

REFERENCE_MODEL = "smollm2-135m-instruct-q4_1"


def _find_reference_dir() -> Path:
    """llama.cpp's outputs: $GGUFLM_REFERENCE_DIR, else shared/reference beside any parent of the repo."""
    env = os.environ.get("GGUFLM_REFERENCE_DIR")
    candidates = [Path(env)] if env else []
    candidates += [parent / "shared" / "reference" for parent in Path(__file__).resolve().parents]
    candidates.append(Path("/work/shared/reference"))
    for candidate in candidates:
        if (candidate / REFERENCE_MODEL).is_dir():
            return candidate / REFERENCE_MODEL
    return candidates[0] / REFERENCE_MODEL


REFERENCE_DIR = _find_reference_dir()


def reference(name: str) -> dict[str, Any]:
    """A file of llama.cpp outputs from ../shared/reference."""
    path = REFERENCE_DIR / name
    if not path.is_file():
        pytest.fail(f"reference data {path} is missing: the tests compare against it")
    return json.loads(path.read_text())


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    return default_model_path()


@pytest.fixture(scope="session")
def smollm2(smollm2_path: Path) -> Model:
    return Model.load(smollm2_path)


@pytest.fixture(scope="session")
def smollm2_reference_mode(smollm2_path: Path) -> Model:
    return Model.load(smollm2_path, mode="reference")


@pytest.fixture(scope="session")
def tiny_llama_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "llama.gguf", "llama", tied_output=True, seed=1)


@pytest.fixture(scope="session")
def tiny_qwen2_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "qwen2.gguf", "qwen2", tied_output=False, seed=2)


@pytest.fixture(scope="session")
def tiny_llama(tiny_llama_path: Path) -> Model:
    return Model.load(tiny_llama_path, mode="reference")


def is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


@pytest.fixture(scope="session")
def tiny_gemma3(tmp_path_factory: pytest.TempPathFactory) -> Model:
    """Sliding-window (8) and global layers, q/k norms, head_dim != n_embd / n_head: fp32 reference."""
    path = make_tiny_model(tmp_path_factory.mktemp("tiny") / "gemma3.gguf", "gemma3", seed=3)
    return Model.load(path, mode="reference")
