"""Time QuantizedLinear (fast, reference) against dense fp32 and bf16 F.linear on SmolLM2-135M's shapes.

    python benchmarks/bench_quants.py [--types Q4_1 Q8_0] [--m 1 16 512] [--split]

--split also times the two halves of the fast mode separately: the int4 kernel ("int4") and the
dequantize-to-bf16 + bf16 matmul path ("deq-bf16"), the numbers behind the fast mode's switch point.
Times are milliseconds per call, the fastest of many calls in interleaved rounds (the machine is
shared and noisy). Weights are random floats quantized with gguf where it can, random
blocks with sane scales otherwise.
"""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Callable

import gguf
import numpy as np
import torch
import torch.nn.functional as F

from gguflm.quants import QuantizedLinear, dequantize

QT = gguf.GGMLQuantizationType
# (out, in): attn q/o, attn k/v, ffn gate/up, ffn down, token embedding / tied output
SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536), (49152, 576)]
F16_FIELDS = {QT.Q2_K: (80, 82), QT.Q3_K: (108,), QT.Q4_K: (0, 2), QT.Q5_K: (0, 2), QT.Q6_K: (208,)}


def weight_bytes(qtype: QT, shape: tuple[int, int], rng: np.random.Generator) -> torch.Tensor:
    """Raw GGUF bytes of a (out, in) weight of `qtype`."""
    if qtype in F16_FIELDS:  # gguf cannot quantize K-quants: random blocks, small finite f16 scales
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        nb = shape[0] * shape[1] // block
        raw = rng.integers(0, 256, (nb, type_size), dtype=np.uint8)
        for off in F16_FIELDS[qtype]:
            raw[:, off : off + 2] = (rng.uniform(0.5, 1.5, (nb, 1)) * 1e-3).astype(np.float16).view(np.uint8)
    else:
        raw = gguf.quants.quantize(rng.standard_normal(shape).astype(np.float32) * 0.05, qtype)
    return torch.from_numpy(np.ascontiguousarray(raw).reshape(-1).view(np.uint8))


def timeit(fns: dict[str, Callable[[], object]], rounds: int = 3, budget_s: float = 0.1) -> dict[str, float]:
    """ms per call for each fn: the fastest call over interleaved rounds.

    The minimum, not the median: the machine's 2 cores are shared, and other jobs only ever add time.
    """
    best = {k: float("inf") for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            fn()
            n = 0
            start = time.perf_counter()
            while n < 3 or (time.perf_counter() - start < budget_s and n < 200):
                t0 = time.perf_counter()
                fn()
                best[name] = min(best[name], (time.perf_counter() - t0) * 1e3)
                n += 1
    return best


def time_shape(
    qtype: QT, n: int, k: int, ms: list[int], split: bool, reference: bool, rng: np.random.Generator
) -> list[tuple[int, str, dict[str, float]]]:
    """(M, kernel the fast mode used, {column: ms}) for each M, one (n, k) weight of `qtype`."""
    data = weight_bytes(qtype, (n, k), rng)
    w32 = dequantize(data, qtype, (n, k))  # (n, k) dense fp32 baseline
    w16 = w32.bfloat16()  # (n, k)
    fast = QuantizedLinear(data, qtype, (n, k), mode="fast")
    ref = QuantizedLinear(data, qtype, (n, k), mode="reference")
    threshold = fast.packed_max_rows if fast.kernel == "int4" else 0

    def forced(rows: int, x: torch.Tensor) -> None:
        fast.packed_max_rows = rows
        fast(x)
        fast.packed_max_rows = threshold

    out = []
    for m in ms:
        x = torch.randn(m, k)  # (M, in)
        fns: dict[str, Callable[[], object]] = {
            "fp32": functools.partial(F.linear, x, w32),
            "bf16": functools.partial(F.linear, x.bfloat16(), w16),
            "fast": functools.partial(fast, x),
        }
        if split and fast.kernel == "int4":
            fns["int4"] = functools.partial(forced, 1 << 30, x)
            fns["deq-bf16"] = functools.partial(forced, 0, x)
        if reference:
            fns["reference"] = functools.partial(ref, x)
        kernel = fast.kernel
        if kernel == "int4" and m > threshold:
            kernel = "deq-bf16"
        out.append((m, kernel, timeit(fns)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--types", nargs="+", default=["Q4_1", "Q8_0"])
    ap.add_argument("--m", nargs="+", type=int, default=[1, 16, 512])
    ap.add_argument("--shapes", nargs="+", default=None, help="OUTxIN, e.g. 1536x576")
    ap.add_argument("--split", action="store_true", help="also time the int4 and deq-bf16 paths alone")
    ap.add_argument("--no-reference", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(2)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes] if args.shapes else SHAPES
    rng = np.random.default_rng(0)
    cols = ["fp32", "bf16", "fast"] + (["int4", "deq-bf16"] if args.split else [])
    cols += [] if args.no_reference else ["reference"]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; ms per call (lower is better)")
    print(f"{'type':6} {'out x in':>11} {'M':>4} {'kernel':>8} " + " ".join(f"{c:>9}" for c in cols))
    with torch.inference_mode():
        for name in args.types:
            for n, k in shapes:
                if k % gguf.GGML_QUANT_SIZES[QT[name]][0]:
                    print(f"{name:6} {f'{n}x{k}':>11}  skipped: rows are not whole {name} blocks")
                    continue
                for m, kernel, t in time_shape(
                    QT[name], n, k, args.m, args.split, not args.no_reference, rng
                ):
                    row = " ".join(f"{t[c]:9.3f}" if c in t else f"{'-':>9}" for c in cols)
                    print(f"{name:6} {f'{n}x{k}':>11} {m:4} {kernel:>8} {row}", flush=True)


if __name__ == "__main__":
    main()
