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
K_QUANTS = [QT.Q4_K, QT.Q5_K, QT.Q6_K]


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

    if qtype in (QT.Q4_K, QT.Q5_K):
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


def _check(
    y: torch.Tensor, x: torch.Tensor, raw: torch.Tensor, qtype: QT, n: int, levels: int = 1
) -> tuple[float, float]:
    """Assert the derived bound; return (max error / max |ref|, mean error / mean |ref|). With two
    levels the leftover |r| <= max|x_b| / 254 is quantized again: half a step <= max|x_b| / 254^2."""
    m, k = x.shape
    w = quants.dequantize(raw, qtype, (n, k)).double()  # (n, k), exact
    xd = x.double()
    ref = xd @ w.T  # (m, n)
    assert y.shape == (m, n) and y.dtype == torch.float32
    err = (y.double() - ref).abs()
    steps = 254.0**levels
    half_step = (xd.abs().view(m, k // 32, 32).amax(-1) / steps).repeat_interleave(32, dim=1)  # (m, k)
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
# every format on the file's layout (qmatmul) and on the row-interleaved copy (repack, qmatmul_packed)
LAYOUTS = [(qt, k, layout) for layout in ("file", "packed") for qt, k in CASES]
LAYOUT_IDS = [f"{qt.name}-K{k}-{layout}" for qt, k, layout in LAYOUTS]


def _product(
    mod, layout: str, x: torch.Tensor, raw: torch.Tensor, qtype: QT, n: int, levels: int = 1
) -> torch.Tensor:
    """x @ W^T through the kernel of `layout`: qmatmul on the file's bytes, or qmatmul_packed on repack's copy."""
    if layout == "packed":
        return mod.qmatmul_packed(x, mod.repack(raw, int(qtype), n), int(qtype), n, levels)
    return mod.qmatmul(x, raw, int(qtype), n, levels)


@pytest.mark.parametrize("path", _paths())
@pytest.mark.parametrize("m", [1, 3, 16])
@pytest.mark.parametrize(("qtype", "k", "layout"), LAYOUTS, ids=LAYOUT_IDS)
def test_matmul_matches_dequantized_reference(path: str, m: int, qtype: QT, k: int, layout: str) -> None:
    mod = _module(path)
    n = 93  # weight rows go 8 at a time: the last group is partly filled
    raw = _weights(qtype, n, k, seed=k + int(qtype))
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m * 1000 + k))
    _check(_product(mod, layout, x, raw, qtype, n), x, raw, qtype, n)


@pytest.mark.parametrize("path", _paths())
@pytest.mark.parametrize("m", [3, 300])
def test_activation_codes_are_ggml_q8_0s(path: str, m: int) -> None:
    """The activations' codes are gguf-py's Q8_0 codes (round half to even of x / d, d = max|x_b| / 127 in
    fp32), the scales d themselves in fp32: the product then equals those codes' exact product up to fp32
    rounding, far inside the activation-rounding bound a code off by one would break. m = 300: rows
    quantized on several threads."""
    mod = _module(path)
    n, k = 40, 640
    raw = _weights(QT.Q8_0, n, k, seed=5)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
    x[1, 32:64] = 0.0  # a zero block: d = 0
    x[2, 64:96] = torch.arange(32) - 15.5  # halves: x / d lands on .5 exactly where d = 16.5 / 127
    blocks = x.numpy().reshape(m * k // 32, 32)
    codes = quantize(blocks, QT.Q8_0)[:, 2:].view(np.int8).astype(np.float64)  # (m k / 32, 32)
    d = (np.abs(blocks).max(axis=1, keepdims=True) / np.float32(127)).astype(np.float64)  # fp32 scale
    xq = torch.from_numpy((codes * d).reshape(m, k))
    w = quants.dequantize(raw, QT.Q8_0, (n, k)).double()  # (n, k)
    ref = xq @ w.T  # (m, n)
    slack = 1e-6 * (xq.abs() @ w.abs().T) + 1e-30  # fp32 sums: ~4e-8; one code off by one: ~1e-4
    for y in (mod.qmatmul(x, raw, int(QT.Q8_0), n), _product(mod, "packed", x, raw, QT.Q8_0, n)):
        assert ((y.double() - ref).abs() <= slack).all()


@pytest.mark.parametrize("path", _paths())
@pytest.mark.parametrize("qtype", sorted(kernels.SUPPORTED), ids=lambda t: t.name)
def test_repack_moves_bytes_and_unpack_gives_them_back(path: str, qtype: QT) -> None:
    """Any bytes (random codes, scales, mins and 5th bits; the K-quants' packed 6-bit scales too, which the
    layout keeps decoded) survive repack + unpack exactly, whole or any row range; the packed copy is the
    file's size rounded up to 8 rows (a group), or to 16 (a pair of groups) where the 512-bit kernels read
    the 32-element formats in pairs, at most 5% more; rows past n_out do not leak out."""
    mod = _module(path)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    n, k = 21, 4 * block
    raw = torch.from_numpy(
        np.random.default_rng(int(qtype)).integers(0, 256, n * k // block * size, dtype=np.uint8)
    )
    packed = mod.repack(raw, int(qtype), n)
    # 21 rows -> 3 groups of 8, and where paired an all-zero fourth to make 2 pairs
    paired = qtype in LEGACY and mod.isa() == "avx512vnni"
    blocks = (32 if paired else 24) * (k // block)
    assert packed.numel() % blocks == 0 and size <= packed.numel() // blocks <= 1.05 * size
    assert torch.equal(mod.unpack(packed, int(qtype), n, 0, n), raw)
    rows = raw.view(n, -1)
    for r0, r1 in ((0, 1), (3, 17), (8, 16), (16, 21), (20, 21), (5, 5)):
        assert torch.equal(mod.unpack(packed, int(qtype), n, r0, r1), rows[r0:r1].reshape(-1)), (r0, r1)
    with pytest.raises(RuntimeError, match="outside"):
        mod.unpack(packed, int(qtype), n, 0, n + 1)
    with pytest.raises(RuntimeError, match="whole"):
        mod.repack(raw[:-1], int(qtype), n)
    with pytest.raises(RuntimeError, match="needs"):
        mod.qmatmul_packed(torch.randn(1, k), packed[:-1], int(qtype), n)
    with pytest.raises(RuntimeError, match=f"multiple of the block size {block}"):
        mod.qmatmul_packed(torch.randn(1, k + 16), packed, int(qtype), n)
    with pytest.raises(RuntimeError, match="no row-interleaved layout"):
        mod.repack(raw, int(QT.Q2_K), n)


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
    _check(_product(mod, "packed", x, t.data, t.qtype, n), x, t.data, t.qtype, n)


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


# bytes of a block that hold weight codes (and K-quant sub-block scales), set to all ones below
_CODE_BYTES = {
    QT.Q4_0: slice(2, 18),
    QT.Q4_1: slice(4, 20),
    QT.Q5_0: slice(2, 22),  # qh and qs
    QT.Q5_1: slice(4, 24),
    QT.Q4_K: slice(4, 144),  # 6-bit scales and mins, codes
    QT.Q5_K: slice(4, 176),
    QT.Q6_K: slice(0, 192),  # ql, qh
}


def _largest_codes(qtype: QT, n: int, k: int) -> torch.Tensor:
    """Blocks whose every weight code is its format's largest (Q8_0: -128, whose magnitude is the
    largest), with f16 scales of 0.01: the products that come closest to the int16 pair sums' limit."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = np.zeros((n * k // block, size), dtype=np.uint8)
    d = np.array([0.01], dtype=np.float16).view(np.uint8)  # its 2 bytes
    if qtype == QT.Q8_0:
        raw[:, 0:2] = d
        raw[:, 2:34] = 0x80
    elif qtype == QT.Q6_K:
        raw[:, _CODE_BYTES[qtype]] = 0xFF
        raw[:, 192:208] = 127  # int8 sub-block scales
        raw[:, 208:210] = d
    else:
        raw[:, 0:2] = d
        if qtype in (QT.Q4_1, QT.Q5_1, QT.Q4_K, QT.Q5_K):
            raw[:, 2:4] = d  # min or dmin
        raw[:, _CODE_BYTES[qtype]] = 0xFF
    return torch.from_numpy(raw.reshape(-1))


@pytest.mark.parametrize("path", _paths())
@pytest.mark.parametrize("qtype", sorted(kernels.SUPPORTED))
def test_largest_codes_against_largest_activations_do_not_saturate(path: str, qtype: QT) -> None:
    """Codes at their largest against activation codes of +-127 (x constant: quantized exactly). Without
    VNNI the kernels add pair sums in int16 (maddubs) before widening, as many as cannot overflow; were one
    more added, or a format's code range misjudged, these outputs would come out wrong."""
    n, k = 24, 512
    raw = _largest_codes(qtype, n, k)
    mod = _module(path)
    for sign in (1.0, -1.0):
        x = torch.full((16, k), sign)  # 16 rows: every tile height
        for levels in (1, 2):
            for layout in ("file", "packed"):
                y = _product(mod, layout, x, raw, qtype, n, levels)
                ref = x.double() @ quants.dequantize(raw, qtype, (n, k)).double().T
                torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=0)


INVARIANCE = [(qt, layout) for layout in ("file", "packed") for qt in sorted(kernels.SUPPORTED)]


@pytest.mark.parametrize("path", _paths())
@pytest.mark.parametrize(("qtype", "layout"), INVARIANCE, ids=[f"{qt.name}-{lay}" for qt, lay in INVARIANCE])
def test_a_rows_result_does_not_depend_on_what_shares_the_call(path: str, qtype: QT, layout: str) -> None:
    """Bit-identical rows whatever the batch (1..16 rows, any tile split): sequences decoded in parallel
    must get the logits they get alone. Bit-identical outputs whatever weight rows share the matrix."""
    mod = _module(path)
    k, n = 512, 83
    raw = _weights(qtype, n, k, seed=5)
    x = torch.randn(16, k, generator=torch.Generator().manual_seed(7))
    full = _product(mod, layout, x, raw, qtype, n)
    for rows in (1, 2, 3, 5, 8, 11):
        for start in range(0, 16 - rows + 1, 3):
            part = _product(mod, layout, x[start : start + rows].contiguous(), raw, qtype, n)
            assert torch.equal(part, full[start : start + rows]), (rows, start)
    # a prefill-sized call (16+ rows: groups in pairs on 512-bit VNNI) gives a row the same bits too, and
    # so does any set of weight rows beside it: 8-row groups alone, paired, or last and partial
    x = torch.cat((x, torch.randn(54, k, generator=torch.Generator().manual_seed(8))))  # (70, k)
    wide = _product(mod, layout, x, raw, qtype, n)
    assert torch.equal(wide[:16], full)
    row_bytes = raw.numel() // n
    for r0, r1 in ((0, 8), (8, 24), (16, 83), (72, 83), (80, 83)):
        part = _product(mod, layout, x, raw[r0 * row_bytes : r1 * row_bytes].contiguous(), qtype, r1 - r0)
        assert torch.equal(part, wide[:, r0:r1]), (r0, r1)


# ---- decode attention, RMSNorm and gated activations (attention.cpp, rowwise.cpp) against float64 torch -----------------


def _attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cells: list[int], mask: list[bool], softcap: float
) -> torch.Tensor:
    """One row q (n_head, hd) against cache cells (n_ctx, n_kv, hd), in float64 -> (n_head, hd)."""
    n_head, hd = q.shape
    group = n_head // k.shape[1]
    seen = torch.tensor([c for c, m in zip(cells, mask, strict=True) if m], dtype=torch.long)
    if not len(seen):
        return torch.zeros(n_head, hd, dtype=torch.float64)
    keys = k[seen].double().repeat_interleave(group, dim=1)  # (n, n_head, hd)
    values = v[seen].double().repeat_interleave(group, dim=1)
    scores = torch.einsum("hd,nhd->hn", q.double(), keys) / hd**0.5  # (n_head, n)
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    return torch.einsum("hn,nhd->hd", scores.softmax(dim=-1), values)


@pytest.mark.parametrize("path", _paths())
@pytest.mark.parametrize("softcap", [0.0, 20.0])
@pytest.mark.parametrize("cache", [torch.float32, torch.float16], ids=["f32", "f16"])
def test_attend_cells_matches_float64_attention(path: str, softcap: float, cache: torch.dtype) -> None:
    """Two sets of three rows over 20 cells each (shuffled cache cells), grouped KV heads, random masks
    with a fully masked row; rows outside the sets are left as they were. An fp16 cache: the reference
    takes the same fp16 values."""
    mod = _module(path)
    g = torch.Generator().manual_seed(3)
    T, n_head, n_kv, hd, n_ctx = 8, 6, 2, 64, 48
    q = torch.randn(T, n_head, hd, generator=g)
    k, v = (
        torch.randn(n_ctx, n_kv, hd, generator=g).to(cache),
        torch.randn(n_ctx, n_kv, hd, generator=g).to(cache),
    )
    rows = torch.tensor([[0, 2, 4], [7, 1, 3]])
    cells = torch.randperm(n_ctx, generator=g)[:40].view(2, 20)
    mask = torch.rand(2, 3, 20, generator=g) < 0.6
    mask[1, 2] = False  # sees nothing: zeros
    out = torch.full((T, n_head, hd), 7.0)
    mod.attend_cells(q, k, v, [rows], [cells], [mask], hd**-0.5, softcap, out)
    for b in range(2):
        for r in range(3):
            want = _attention_reference(q[rows[b, r]], k, v, cells[b].tolist(), mask[b, r].tolist(), softcap)
            torch.testing.assert_close(out[rows[b, r]].double(), want, rtol=1e-5, atol=1e-5)
    assert torch.equal(out[[5, 6]], torch.full((2, n_head, hd), 7.0))  # not in any set: untouched
    assert torch.equal(out[3], torch.zeros(n_head, hd))
    # the sets as two groups of one call, the second over only 15 of its cells
    groups = torch.full((T, n_head, hd), 7.0)
    mod.attend_cells(
        q,
        k,
        v,
        [rows[:1], rows[1:]],
        [cells[:1], cells[1:, :15]],
        [mask[:1], mask[1:, :, :15]],
        hd**-0.5,
        softcap,
        groups,
    )
    assert torch.equal(groups[rows[0]], out[rows[0]])
    for r in range(2):
        want = _attention_reference(
            q[rows[1, r]], k, v, cells[1, :15].tolist(), mask[1, r, :15].tolist(), softcap
        )
        torch.testing.assert_close(groups[rows[1, r]].double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("path", _paths())
def test_a_rows_attention_does_not_depend_on_its_set_or_masked_cells(path: str) -> None:
    """Bit-identical: a row alone, the same row among others (a parallel decode step), and the same row
    over a longer cell list whose extra cells it may not see."""
    mod = _module(path)
    g = torch.Generator().manual_seed(4)
    n_head, n_kv, hd, n_ctx = 9, 3, 64, 300
    q = torch.randn(4, n_head, hd, generator=g)
    k, v = torch.randn(n_ctx, n_kv, hd, generator=g), torch.randn(n_ctx, n_kv, hd, generator=g)
    cells = torch.arange(0, 250)
    visible = torch.rand(250, generator=g) < 0.8

    def attend(rows: list[int], cell_ids: torch.Tensor, row_mask: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(4, n_head, hd)
        mask = row_mask.expand(1, len(rows), len(cell_ids)).contiguous()
        mod.attend_cells(q, k, v, [torch.tensor([rows])], [cell_ids[None]], [mask], 0.125, 0.0, out)
        return out

    alone = attend([2], cells, visible)[2]
    assert torch.equal(attend([0, 1, 2, 3], cells, visible)[2], alone)
    extra = torch.cat((cells, torch.arange(250, 300)))
    assert torch.equal(attend([2], extra, torch.cat((visible, torch.zeros(50, dtype=torch.bool))))[2], alone)


def _rope_reference(x: torch.Tensor, pos: torch.Tensor, theta: torch.Tensor, rd: int) -> torch.Tensor:
    """x (T, heads, hd) with adjacent pairs of the first rd dims rotated by pos * theta, float64."""
    x = x.double().clone()
    angle = pos.double()[:, None, None] * theta.double()  # (T, 1, rd/2)
    a, b = x[..., 0:rd:2].clone(), x[..., 1:rd:2].clone()
    x[..., 0:rd:2] = a * angle.cos() - b * angle.sin()
    x[..., 1:rd:2] = a * angle.sin() + b * angle.cos()
    return x


@pytest.mark.parametrize("path", _paths())
@pytest.mark.parametrize(("rd", "norms"), [(64, False), (32, False), (64, True)])
def test_rope_store_matches_float64(path: str, rd: int, norms: bool) -> None:
    """q/k RMSNorm per head (Qwen 3, Gemma 3), rope over all or part of a head (partial rotary), and k, v
    written to the given cells; no other cell changes. An fp16 cache gets the fp32 cache's values rounded
    as torch rounds them (what the Python path writes)."""
    from gguflm.models.rope import Rope

    mod = _module(path)
    g = torch.Generator().manual_seed(5)
    T, n_head, n_kv, hd, n_ctx = 5, 4, 2, 64, 16
    qkv = torch.randn(T, (n_head + 2 * n_kv) * hd, generator=g)
    pos = torch.tensor([3, 4, 9, 0, 100])
    theta = 10000.0 ** (-torch.arange(0, rd, 2).double() / rd)
    rope = Rope(theta.float(), 1.0, rd, torch.device("cpu"))
    rotation = torch.view_as_real(rope.rotation(pos)).view(T, rd // 2, 2)
    q_norm = k_norm = None
    if norms:
        q_norm, k_norm = torch.rand(hd, generator=g) + 0.5, torch.rand(hd, generator=g) + 0.5
    k_cache, v_cache = torch.full((n_ctx, n_kv, hd), 3.0), torch.full((n_ctx, n_kv, hd), 3.0)
    cells = torch.tensor([7, 2, 11, 0, 5])
    q = mod.rope_store(qkv, rotation, q_norm, k_norm, 1e-6, k_cache, v_cache, cells, n_head)

    heads = qkv.double().view(T, n_head + 2 * n_kv, hd)
    want_q, want_k, want_v = heads[:, :n_head], heads[:, n_head : n_head + n_kv], heads[:, n_head + n_kv :]
    if q_norm is not None and k_norm is not None:
        want_q = torch.nn.functional.rms_norm(want_q, (hd,), q_norm.double(), 1e-6)
        want_k = torch.nn.functional.rms_norm(want_k, (hd,), k_norm.double(), 1e-6)
    torch.testing.assert_close(q.double(), _rope_reference(want_q, pos, theta, rd), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(
        k_cache[cells].double(), _rope_reference(want_k, pos, theta, rd), rtol=1e-5, atol=1e-4
    )
    assert torch.equal(v_cache[cells], want_v.float())
    others = torch.tensor([c for c in range(n_ctx) if c not in cells.tolist()])
    assert (k_cache[others] == 3.0).all() and (v_cache[others] == 3.0).all()
    k16, v16 = k_cache.half().fill_(3.0), v_cache.half().fill_(3.0)
    assert torch.equal(mod.rope_store(qkv, rotation, q_norm, k_norm, 1e-6, k16, v16, cells, n_head), q)
    assert torch.equal(k16, k_cache.half()) and torch.equal(v16, v_cache.half())


@pytest.mark.parametrize("path", _paths())
@pytest.mark.parametrize("n", [576, 640, 17])
def test_rms_norm_matches_float64_and_rows_are_independent(path: str, n: int) -> None:
    mod = _module(path)
    g = torch.Generator().manual_seed(6)
    x, w = torch.randn(9, n, generator=g) * 3, torch.randn(n, generator=g)
    y = mod.rms_norm(x, w, 1e-5)
    want = torch.nn.functional.rms_norm(x.double(), (n,), w.double(), 1e-5)
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)
    assert torch.equal(mod.rms_norm(x[4:5].contiguous(), w, 1e-5), y[4:5])


def test_attention_kernels_refuse_bad_inputs() -> None:
    mod = _module("auto")
    q, k, v = torch.randn(2, 4, 8), torch.randn(10, 2, 8), torch.randn(10, 2, 8)
    out = torch.zeros(2, 4, 8)
    rows, mask = torch.tensor([[0, 1]]), torch.ones(1, 2, 3, dtype=torch.bool)
    with pytest.raises(RuntimeError, match="outside the cache"):
        mod.attend_cells(q, k, v, [rows], [torch.tensor([[0, 1, 10]])], [mask], 1.0, 0.0, out)
    with pytest.raises(RuntimeError, match="outside q"):
        mod.attend_cells(
            q, k, v, [torch.tensor([[0, 2]])], [torch.tensor([[0, 1, 2]])], [mask], 1.0, 0.0, out
        )
    with pytest.raises(RuntimeError, match="multiple of n_head_kv"):
        mod.attend_cells(
            torch.randn(2, 3, 8),
            k,
            v,
            [rows],
            [torch.tensor([[0, 1, 2]])],
            [mask],
            1.0,
            0.0,
            torch.zeros(2, 3, 8),
        )
    with pytest.raises(RuntimeError, match="float32"):
        mod.rms_norm(torch.randn(2, 8, dtype=torch.float64), torch.randn(8), 1e-5)
    qkv, rot = torch.randn(1, 64), torch.randn(1, 4, 2)
    with pytest.raises(RuntimeError, match="outside the cache"):
        mod.rope_store(qkv, rot, None, None, 1e-5, k, v, torch.tensor([10]), 4)
    assert (k.isfinite().all() and v.isfinite().all()) and out.eq(0).all()  # nothing written on refusal


@pytest.mark.parametrize("path", _paths())
@pytest.mark.parametrize("gelu", [False, True])
def test_gated_activation_matches_float64(path: str, gelu: bool) -> None:
    """SwiGLU / GeGLU: act(gate) * up for gate_up = [gate | up], large and small values alike."""
    mod = _module(path)
    gate_up = torch.randn(7, 2 * 1536, generator=torch.Generator().manual_seed(8)) * 4
    gate, up = gate_up.double().chunk(2, dim=-1)
    act = torch.nn.functional.gelu(gate, approximate="tanh") if gelu else torch.nn.functional.silu(gate)
    torch.testing.assert_close(mod.gated(gate_up, gelu).double(), act * up, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("path", _paths())
@pytest.mark.parametrize(("qtype", "k", "layout"), LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("m", [5, 37])
def test_two_level_activations_meet_the_finer_bound(
    path: str, qtype: QT, k: int, layout: str, m: int
) -> None:
    """GGUFLM_ACTIVATIONS=q8x2: within max|x_b| / 254^2 per element (plus fp32 rounding), and each row's
    result still independent of the rows sharing the call (37 rows: 74 activation rows, the packed
    kernels' 512-bit group pairs where the CPU has them)."""
    mod = _module(path)
    n = 48
    raw = _weights(qtype, n, k, seed=9)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(10))
    y = _product(mod, layout, x, raw, qtype, n, 2)
    _, rel_mean = _check(y, x, raw, qtype, n, levels=2)
    assert rel_mean < 2e-4, rel_mean  # against ~0.6% with one level
    for row in (0, 3, m - 1):
        assert torch.equal(
            _product(mod, layout, x[row : row + 1].contiguous(), raw, qtype, n, 2), y[row : row + 1]
        )
    with pytest.raises(RuntimeError, match="levels must be 1 or 2"):
        mod.qmatmul(x, raw, int(qtype), n, 3)
