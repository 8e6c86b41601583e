"""What the CPU can do fast, decided once: the fast mode's prefill runs in bf16 only where the CPU has
native bf16 arithmetic (AMX or AVX512-BF16); elsewhere a bf16 matmul is ~5x slower than fp32 (AMD Zen 3:
512x576 by 576x1536 takes 58 ms in bf16, 12 ms in fp32).

GGUFLM_KERNELS picks the path: auto (default) uses the native kernels (gguflm.kernels) built for this
CPU, falling back to torch's where they cannot be built; torch uses torch's only; native is auto that
says so; avx2 and generic build the native kernels for that instruction set and pretend the CPU has no
bf16 arithmetic (to test and compare that path anywhere); avx512 and amx pretend it has.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

KERNEL_CHOICES = ("auto", "torch", "native", "generic", "avx2", "avx512", "amx")


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The flags /proc/cpuinfo lists for the first CPU (empty where there is no such file)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def kernel_choice() -> str:
    """GGUFLM_KERNELS, checked: one of KERNEL_CHOICES (default auto)."""
    choice = os.environ.get("GGUFLM_KERNELS", "auto").strip().lower() or "auto"
    if choice not in KERNEL_CHOICES:
        raise ValueError(f"GGUFLM_KERNELS={choice!r}: expected one of {', '.join(KERNEL_CHOICES)}")
    return choice


def activation_levels(near_logits: bool = False) -> int:
    """How many 8-bit codes the native kernels give each activation, by GGUFLM_ACTIVATIONS. q8: one, in
    blocks of 32, as llama.cpp does (SmolLM2 on GPL-3 against fp32: top-1 96.4%, KL 0.0031; llama.cpp
    96.0%, 0.0037). q8x2: two, the rounding left over quantized again, finer than bf16 (97.8%, 0.0009), for
    twice the integer work. auto (default): q8, but q8x2 for the products `near_logits`, whose rounding
    reaches the logits unmixed: the last layer's, and the output head's unless it outweighs the layers
    (Transformer.refine_near_logits; SmolLM2 97.3%, 0.0017). A prefill keeps only its output rows after the
    last layer's attention, so there auto adds ~1% to the integer work; a decode step with 16 sequences
    pays +8% CPU time for SmolLM2 (AMD EPYC Zen 4), one sequence next to nothing (the head streams memory)."""
    value = os.environ.get("GGUFLM_ACTIVATIONS", "auto").strip().lower() or "auto"
    if value not in ("auto", "q8", "q8x2"):
        raise ValueError(f"GGUFLM_ACTIVATIONS={value!r}: expected auto, q8 or q8x2")
    return 2 if value == "q8x2" or (value == "auto" and near_logits) else 1


def use_native_kernels() -> bool:
    """Whether the fast mode runs on gguflm.kernels where they build: everywhere but GGUFLM_KERNELS=torch."""
    return kernel_choice() != "torch"


def has_fast_bf16() -> bool:
    """True where bf16 matmuls beat fp32 ones: AMX or AVX512-BF16 (torch's oneDNN uses either)."""
    choice = kernel_choice()
    if choice in ("avx512", "amx"):
        return True
    if choice in ("generic", "avx2"):
        return False
    return bool({"amx_bf16", "avx512_bf16"} & cpu_flags())


def prefill_dtype() -> torch.dtype:
    """The dtype of the fast mode's many-row matmuls and prefill attention on this CPU."""
    return torch.bfloat16 if has_fast_bf16() else torch.float32


def dequantized_prefill() -> bool:
    """Whether the fast mode's many-row products (prefill) dequantize weights a chunk at a time for bf16
    matmuls rather than run the native int8 kernels all the way: only where the CPU has AMX, whose tile
    products outrun those kernels (pp512 5.5-6.5x llama.cpp's on Sapphire Rapids). Without AMX the int8
    kernels win: SmolLM2 pp512 ~1100 against ~850 t/s for bf16 on 2 AMD EPYC Zen 4 cores (AVX512-BF16);
    fp32, the choice without any bf16 arithmetic, is slower still."""
    choice = kernel_choice()
    if choice in ("amx", "avx512", "avx2", "generic"):
        return choice == "amx"
    return "amx_bf16" in cpu_flags()


def describe() -> str:
    """One line for `gguflm bench`: the CPU's capability, the kernel path that runs (building the
    native kernels if they are not yet) and the prefill dtype chosen."""
    from gguflm import kernels  # gguflm.kernels reads this module's flags

    flags = cpu_flags()
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16") if f in flags]
    path = kernels.isa() if use_native_kernels() else "torch"
    return (
        f"cpu: {torch.backends.cpu.get_cpu_capability()} ({' '.join(isa) or 'no SIMD flags read'}), "
        f"kernels={kernel_choice()} ({'native ' + path if path != 'torch' else 'torch int4'} decode), "
        f"prefill in {'native int8' if path != 'torch' and not dequantized_prefill() else str(prefill_dtype()).removeprefix('torch.')}"
    )
