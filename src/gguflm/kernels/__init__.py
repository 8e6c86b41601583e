"""Native quantized kernels: small-batch products x @ W^T with W in its GGUF block format.

The C++ sources (`*.cpp` next to this file) are compiled on first use with
`torch.utils.cpp_extension.load` (g++ and ninja), with -O3 and the machine's own instruction set, and
cached under $GGUFLM_CACHE/kernels (else ~/.cache/gguflm/kernels) by torch version, source hash and
ISA flags. Where it cannot be built (no compiler, a failed build) `native()` returns None after one
line on stderr, and callers keep the pure-torch path (`gguflm.quants`), which stays the reference.

Environment: GGUFLM_KERNELS=torch disables the native kernels; =auto (default) builds for this CPU
(-march=native); =avx2 builds the AVX2 path without AVX512 (-march=haswell); =generic builds the
plain C++ path (-march=x86-64), so every path can be tested and compared on one machine.

Arithmetic (llama.cpp's ggml_vec_dot_*_q8_0 idea): each activation row is quantized once per block of
32 to 8 bits (d = max|x| / 127, q = round(x / d)), then each 32-element chunk of a weight row is an
exact integer dot product with the activation codes, scaled in fp32 by the weight's and the
activation block's scales. The only error against `quants.dequantize(W) @ x` is that rounding of x.

The C++ functions are registered as torch operators (torch.ops.<build name>.qmatmul, no pybind11:
the first-use build takes ~17 s instead of ~30 s); `native()` wraps them in a `NativeKernels` object.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import sys
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import torch

from gguflm import cpu, paths
from gguflm.cpu import kernel_choice

QT = gguf.GGMLQuantizationType

SUPPORTED: frozenset[QT] = frozenset({QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0, QT.Q4_K, QT.Q5_K, QT.Q6_K})
VARIANTS: dict[str, list[str]] = {  # GGUFLM_KERNELS value -> -march flags
    "auto": ["-march=native"],
    "avx2": ["-march=haswell"],  # AVX2 + FMA + F16C, no AVX512
    "generic": ["-march=x86-64"],  # no AVX2: the plain C++ path
}
SOURCES = ("qmatmul.cpp", "packed.cpp", "attention.cpp", "prefill_attention.cpp", "rowwise.cpp", "layer.cpp")
HEADERS = (
    "qmatmul.h",
    "vec_math.h",
)  # included by the sources: hashed into the build key, copied beside them
_CPU_FLAGS = (
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
)

log = logging.getLogger(__name__)


def variant() -> str:
    """The build asked for by $GGUFLM_KERNELS (gguflm.cpu.kernel_choice): none for "torch", "avx2" or
    "generic" for those, "auto" (this CPU's own instruction set) for the rest."""
    v = kernel_choice()
    return v if v in ("torch", "avx2", "generic") else "auto"


def cpu_flags() -> list[str]:
    """The machine and the ISA flags that decide what -march=native compiles (part of the cache key)."""
    have = cpu.cpu_flags()
    return [platform.machine(), *(f for f in _CPU_FLAGS if f in have)]


def cache_dir() -> Path:
    """gguflm's cache folder (gguflm.paths.cache_dir) / kernels."""
    return paths.cache_dir() / "kernels"


def _build_key(flags: list[str]) -> str:
    h = hashlib.sha256()
    here = Path(__file__).parent
    for src in SOURCES + HEADERS:
        h.update((here / src).read_bytes())
    h.update(torch.__version__.encode())
    h.update(" ".join(flags + cpu_flags()).encode())
    return h.hexdigest()[:16]


class NativeKernels:
    """One build's operators (registered as torch.ops.<ns>): `qmatmul(x, raw, qtype, n_out, levels=1)`
    (qmatmul.cpp); for every SUPPORTED format `repack(raw, qtype, n_out)` (8 rows' blocks side by side;
    `repack_into(raw, qtype, n_out, out)` writes them into `out` of `packed_nbytes(qtype, n_out, k)` bytes),
    its inverse `unpack(packed, qtype, n_out, r0, r1)` and `qmatmul_packed(x, packed, qtype, n_out, levels=1)`
    (packed.cpp); the decode
    attention pair `rope_store` and `attend_cells` (attention.cpp), the prefill's `attend_prefill` and the
    products it runs, `attend_prefill_isa()` (prefill_attention.cpp), `rms_norm` and `gated` (rowwise.cpp), a whole
    decode layer through them in one call, `decode_layer(x, layer.id, ...)` with the layer's weights
    registered once (`layer(...)`, a `NativeLayer`; layer.cpp), and `isa()`."""

    def __init__(self, namespace: str, library: str) -> None:
        self.namespace = namespace
        self.library = library  # path of the shared object
        ops = getattr(torch.ops, namespace)
        self.qmatmul = ops.qmatmul
        self.repack = ops.repack
        self.repack_into = ops.repack_into
        self.packed_nbytes = ops.packed_nbytes
        self.unpack = ops.unpack
        self.qmatmul_packed = ops.qmatmul_packed
        self.rope_store = ops.rope_store
        self.attend_cells = ops.attend_cells
        self.attend_prefill = ops.attend_prefill
        self.attend_prefill_isa = ops.attend_prefill_isa
        self.rms_norm = ops.rms_norm
        self.gated = ops.gated
        self.decode_layer = ops.decode_layer
        self._decode_layer_new = ops.decode_layer_new
        self._decode_layer_free = ops.decode_layer_free
        self.isa = ops.isa

    def layer(self, *weights: Any) -> NativeLayer:
        """A layer's weights and settings (layer.cpp's decode_layer_new arguments) registered for
        decode_layer, for as long as the returned object lives."""
        return NativeLayer(self._decode_layer_new(*weights), self._decode_layer_free)

    def __repr__(self) -> str:
        return f"NativeKernels({self.namespace}, isa={self.isa()})"


class NativeLayer:
    """The id under which the kernels hold a layer's weights (decode_layer_new); they let go of them
    when this object is collected."""

    def __init__(self, layer_id: int, free: Callable[[int], None]) -> None:
        self.id = layer_id
        weakref.finalize(self, free, layer_id)


def _copy_source(src: Path, folder: Path) -> Path:
    """The build compiles a copy of the source kept in its own folder: the folder is named by the
    sources' content, and ninja rebuilds when a source's path changes, so every checkout (a clone, a
    worktree, an installed package) with the same sources then shares one build instead of each
    rebuilding it. Written atomically: processes may build side by side."""
    dest = folder / src.name
    data = src.read_bytes()
    if not dest.is_file() or dest.read_bytes() != data:
        tmp = folder / f".{src.name}.{os.getpid()}"
        tmp.write_bytes(data)
        os.replace(tmp, dest)
    return dest


def build(name: str = "auto") -> NativeKernels:
    """Compile (or load from the cache) the kernels for variant `name`; raises on a failed build."""
    from torch.utils import cpp_extension

    march = VARIANTS[name]
    # -fopenmp: at::parallel_for is OpenMP in torch's CPU builds. -fno-trapping-math: no kernel reads the
    # floating-point exception flags, and without it GCC keeps a float select such as fast_exp's clamp a
    # branch, so that loops calling fast_exp (the gated activation, the softmax) stayed scalar in AVX2
    # builds (SmolLM2's gate at 16 rows 3.3 ns an element against 0.4 in the AVX512 build, AMD Zen 4). It
    # changes no result: IEEE arithmetic and rounding stay as they are.
    cflags = ["-O3", *march, "-fopenmp", "-fno-trapping-math"]
    key = _build_key(cflags)
    ext = f"gguflm_kernels_{name}_{key}"  # also the torch.ops namespace: unique per build
    folder = cache_dir() / ext
    folder.mkdir(parents=True, exist_ok=True)
    here = Path(__file__).parent
    if not any(folder.glob(f"{ext}*.so")):
        march_s = " ".join(march)
        print(f"gguflm: compiling native kernels ({name}: {march_s}) into {folder} ...", file=sys.stderr)
    if not hasattr(torch.ops, ext) or not hasattr(getattr(torch.ops, ext), "decode_layer"):
        for header in HEADERS:
            _copy_source(here / header, folder)
        library = cpp_extension.load(
            name=ext,
            sources=[str(_copy_source(here / s, folder)) for s in SOURCES],
            extra_cflags=[*cflags, f"-DGGUFLM_NS={ext}"],
            extra_ldflags=["-fopenmp"],
            build_directory=str(folder),
            is_python_module=False,
            verbose=False,
        )
    else:
        library = "(already loaded)"
    return NativeKernels(ext, str(library))


def native(name: str | None = None) -> NativeKernels | None:
    """The compiled kernels for `name` (default: $GGUFLM_KERNELS), or None where disabled or unbuildable.

    Never raises for a missing compiler or a failed build: it prints one line and returns None (the
    build's exception is kept in `native_error`). An unknown $GGUFLM_KERNELS value is a ValueError.
    """
    return _native(variant() if name is None else name)


native_error: dict[str, BaseException] = {}


@functools.cache
def _native(name: str) -> NativeKernels | None:
    if name == "torch":
        return None
    try:
        return build(name)
    except Exception as e:  # any build/load failure means "use the torch path"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"gguflm: native kernels unavailable, using the torch path ({first})", file=sys.stderr)
        native_error[name] = e
        return None


def isa(name: str | None = None) -> str:
    """The path the kernels run ("avx512vnni", "avx2", "scalar"), or "torch" where there are none."""
    mod = native(name)
    return mod.isa() if mod is not None else "torch"


def matmul(
    x: torch.Tensor, raw: torch.Tensor, qtype: QT, n_out: int, name: str | None = None, levels: int = 1
) -> torch.Tensor:
    """y (M, n_out) fp32 = x (M, K) fp32 @ W^T, W (n_out, K) given as its raw GGUF bytes (flat uint8).
    levels 2: each activation block quantized twice (the value, then what its rounding left), for an
    error of max|x_b| / 254^2 instead of max|x_b| / 254 (gguflm.cpu.activation_levels).

    Raises RuntimeError where the native kernels are unavailable (check `native()` first) and
    ValueError for a format outside SUPPORTED; shape and dtype errors come from the C++ checks.
    """
    qtype = QT(qtype)
    if qtype not in SUPPORTED:
        raise ValueError(f"{qtype.name} has no native kernel; supported: {sorted(t.name for t in SUPPORTED)}")
    mod = native(name)
    if mod is None:
        raise RuntimeError("gguflm native kernels are unavailable (GGUFLM_KERNELS=torch or the build failed)")
    return mod.qmatmul(x, raw, int(qtype), int(n_out), int(levels))
