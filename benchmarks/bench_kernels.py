"""Time the native quantized kernels (gguflm.kernels) against today's torch path on SmolLM2 / Gemma 3 shapes.

    python benchmarks/bench_kernels.py [--m 1 4 16] [--threads 2] [--types Q4_1 Q8_0] [--no-compile]

Columns, ms per call (fastest call of interleaved rounds, see bench_quants.timeit):
  native  gguflm.kernels.matmul (8-bit activations, integer dots; this CPU's ISA)
  torch   QuantizedLinear(..., mode="fast") with the pure-torch kernel it used before the native ones:
          "int4" (torch's int4 kernel, bf16 activations), "bf16" (a bf16 copy) for Q6_K
  fp32    dense F.linear on the dequantized weight (no quantized format at all)
First it compiles the kernels into a fresh temporary cache (the first-use compile time; --no-compile
skips that and uses the normal cache).
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import gguf
import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from bench_quants import timeit, weight_bytes

from gguflm import kernels
from gguflm.quants import QuantizedLinear, dequantize

QT = gguf.GGMLQuantizationType
# (type, out, in): SmolLM2-135M (Q4_1 layers, Q8_0 tied head), Gemma 3 270M Q4_K_M (Q6_K/Q4_K ffn_down,
# Q5_0 ffn_gate/up (in=640 is not a whole number of 256-blocks, so no K-quant there), Q8_0 embeddings/head)
CASES = [
    (QT.Q4_1, 576, 1536),
    (QT.Q4_1, 1536, 576),
    (QT.Q4_1, 49152, 576),
    (QT.Q8_0, 576, 1536),
    (QT.Q8_0, 1536, 576),
    (QT.Q8_0, 49152, 576),
    (QT.Q6_K, 640, 2048),
    (QT.Q4_K, 640, 2048),
    (QT.Q5_0, 2048, 640),
    (QT.Q8_0, 262144, 640),
]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def torch_linear(data: torch.Tensor, qtype: QT, shape: tuple[int, int]) -> QuantizedLinear:
    """The fast mode's pure-torch kernel before native kernels: a bf16 copy for Q6_K, torch's int4 otherwise."""
    kernel = "bf16" if qtype == QT.Q6_K else "int4"
    return QuantizedLinear(data, qtype, shape, mode="fast", kernel=kernel)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", nargs="+", type=int, default=[1, 4, 16])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--types", nargs="+", default=None, help="only these formats, e.g. Q4_1 Q8_0")
    ap.add_argument("--no-compile", action="store_true", help="do not time a fresh compile")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    if not args.no_compile:  # in a child process: one process cannot load two builds of one extension
        with tempfile.TemporaryDirectory() as tmp:
            code = "from gguflm import kernels; kernels.build('auto')"
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-c", code], env={**os.environ, "GGUFLM_CACHE": tmp}, check=True)
            print(f"first-use compile: {time.perf_counter() - t0:.1f} s (fresh cache, whole child process)")
    t0 = time.perf_counter()
    mod = kernels.native()
    if mod is None:
        sys.exit(
            "native kernels unavailable: " + str(kernels.native_error.get(kernels.variant(), "disabled"))
        )
    print(f"load from cache: {time.perf_counter() - t0:.2f} s")
    flags = " ".join(kernels.cpu_flags())
    print(
        f"CPU: {cpu_name()} ({flags}); torch {torch.__version__} capability "
        f"{torch.backends.cpu.get_cpu_capability()}; native path {mod.isa()}; {args.threads} threads"
    )
    print("ms per call (lower is better)")
    print(
        f"{'type':5} {'out x in':>11} {'M':>3} {'kernel':>7} {'native':>8} {'torch':>8} {'fp32':>8} {'speedup':>8}"
    )
    rng = np.random.default_rng(0)
    with torch.inference_mode():
        for qtype, n, k in CASES:
            if args.types and qtype.name not in args.types:
                continue
            data = weight_bytes(qtype, (n, k), rng)
            fast = torch_linear(data, qtype, (n, k))
            w32 = dequantize(data, qtype, (n, k)) if n * k <= 50_000_000 else None
            for m in args.m:
                x = torch.randn(m, k)
                fns = {
                    "native": functools.partial(mod.qmatmul, x, data, int(qtype), n),
                    "torch": functools.partial(fast, x),
                }
                if w32 is not None:
                    fns["fp32"] = functools.partial(F.linear, x, w32)
                t = timeit(fns)
                fp32 = f"{t['fp32']:8.3f}" if "fp32" in t else f"{'-':>8}"
                print(
                    f"{qtype.name:5} {f'{n}x{k}':>11} {m:3} {fast.kernel:>7} {t['native']:8.3f} {t['torch']:8.3f} "
                    f"{fp32} {t['torch'] / t['native']:7.2f}x",
                    flush=True,
                )
            del fast, w32


if __name__ == "__main__":
    main()
