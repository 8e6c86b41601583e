"""GGML block formats: dequantize bit-exact against gguf-py, and QuantizedLinear in both modes.

Random blocks are random bytes with every f16 scale field overwritten by a random finite f16, so every
bit pattern of the codes and 6-bit scales is exercised; formats gguf-py can quantize are also checked
on quantized random floats. Fast-mode errors are measured as max |y - y_ref| / max |y_ref|: observed
3e-3 to 5e-3 typically and at most 6.1e-3 over 6 draws of every format, kernel and M (the rounding of
activations, scales and outputs to bf16), against a bound of 1e-2. (On the SmolLM2-135M Q4_1 model the
fast mode's perplexity is within 0.02% of the reference mode's.)
"""

from __future__ import annotations

import warnings
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from gguflm import kernels, quants
from gguflm.cpu import has_fast_bf16
from gguflm.quants import SUPPORTED_TYPES, QuantizedLinear, dequantize

QT = gguf.GGMLQuantizationType
QUANT_TYPES = [t for t in SUPPORTED_TYPES if t not in (QT.F32, QT.F16, QT.BF16)]
# byte offsets of the f16 fields (d, dmin) in each block
F16_FIELDS = {
    QT.Q4_0: (0,),
    QT.Q4_1: (0, 2),
    QT.Q5_0: (0,),
    QT.Q5_1: (0, 2),
    QT.Q8_0: (0,),
    QT.Q2_K: (80, 82),
    QT.Q3_K: (108,),
    QT.Q4_K: (0, 2),
    QT.Q5_K: (0, 2),
    QT.Q6_K: (208,),
}
FAST_REL_ERR = 1e-2


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)  # activations are torch.randn: keep every run the same


def block_size(qtype: QT) -> int:
    return gguf.GGML_QUANT_SIZES[qtype][0]


def random_bytes(qtype: QT, shape: tuple[int, ...], seed: int, scale: float | None = None) -> np.ndarray:
    """Raw GGUF bytes (flat uint8) of a random tensor: random blocks with finite f16 scales.

    scale=None draws f16 scales over many magnitudes (subnormal to 1e2) for bit-exactness; a number
    draws them near it, for matmul tests whose outputs should stay in a sane range.
    """
    rng = np.random.default_rng(seed)
    n = int(np.prod(shape))
    if qtype == QT.F32:
        return rng.standard_normal(n).astype(np.float32).view(np.uint8)
    if qtype == QT.F16:
        return rng.standard_normal(n).astype(np.float16).view(np.uint8)
    if qtype == QT.BF16:  # every bit pattern, NaNs and infinities included: BF16 -> F32 is a shift
        if scale is None:
            return rng.integers(0, 256, 2 * n, dtype=np.uint8)
        return gguf.quants.quantize(rng.standard_normal(n).astype(np.float32), qtype).view(np.uint8)
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    nb = n // block
    raw = rng.integers(0, 256, (nb, type_size), dtype=np.uint8)
    for off in F16_FIELDS[qtype]:
        if scale is None:
            mag = 10.0 ** rng.uniform(-7, 2, nb)
        else:
            mag = scale * rng.uniform(0.5, 1.5, nb)
        f16 = (mag * rng.choice([-1.0, 1.0], nb)).astype(np.float16)
        raw[:, off : off + 2] = f16.view(np.uint8).reshape(nb, 2)
    return raw.reshape(-1)


def as_torch(raw: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(raw).reshape(-1))


def assert_bits_equal(got: torch.Tensor, want: np.ndarray) -> None:
    want = np.ascontiguousarray(want, dtype=np.float32)
    assert got.dtype == torch.float32
    assert tuple(got.shape) == want.shape
    same = got.numpy().view(np.uint32) == want.view(np.uint32)
    if not same.all():
        i = np.flatnonzero(~same.reshape(-1))[0]
        raise AssertionError(
            f"{(~same).sum()} of {same.size} values differ; first at flat {i}: "
            f"got {got.reshape(-1)[i].item()!r}, gguf {want.reshape(-1)[i]!r}"
        )


def shapes_for(qtype: QT) -> list[tuple[int, ...]]:
    b = block_size(qtype)
    if b == 1:
        return [(7,), (3, 5), (2, 3, 64)]
    return [(b,), (5, 2 * b), (2, 3, b)]


# ----------------------------------------------------------------------------------------------------
# dequantize
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("qtype", SUPPORTED_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("seed", [0, 1])
def test_dequantize_random_blocks_bit_exact(qtype: QT, seed: int) -> None:
    for shape in shapes_for(qtype):
        raw = random_bytes(qtype, shape, seed)
        want = gguf.quants.dequantize(raw.reshape(*shape[:-1], -1), qtype).reshape(shape)
        assert_bits_equal(dequantize(as_torch(raw), qtype, shape), want)


@pytest.mark.parametrize(
    "qtype", [QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0, QT.BF16], ids=lambda t: t.name
)
def test_dequantize_quantized_floats_bit_exact(qtype: QT) -> None:
    x = np.random.default_rng(3).standard_normal((6, 256)).astype(np.float32)
    x[0] = 0.0  # all-zero blocks: d = 0
    raw = gguf.quants.quantize(x, qtype)
    assert_bits_equal(dequantize(as_torch(raw), qtype, x.shape), gguf.quants.dequantize(raw, qtype))


def test_dequantize_does_not_write_and_accepts_views() -> None:
    raw = random_bytes(QT.Q4_K, (4, 256), 5)
    big = torch.from_numpy(np.concatenate([np.zeros(32, np.uint8), raw]))  # (32 + bytes,)
    view = big[32:]  # a non-owning view at an offset, like a memory-mapped tensor
    before = big.clone()
    out = dequantize(view, QT.Q4_K, (4, 256))
    assert torch.equal(big, before)
    assert_bits_equal(out, gguf.quants.dequantize(raw.reshape(4, -1), QT.Q4_K))
    odd = torch.from_numpy(np.concatenate([np.zeros(1, np.uint8), raw]))[1:]  # misaligned f16 fields
    assert_bits_equal(dequantize(odd, QT.Q4_K, (4, 256)), gguf.quants.dequantize(raw.reshape(4, -1), QT.Q4_K))


@pytest.mark.parametrize("qtype", [QT.IQ2_XXS, QT.Q8_1, QT.IQ4_NL, QT.TQ1_0], ids=lambda t: t.name)
def test_unsupported_type_raises_value_error(qtype: QT) -> None:
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    data = torch.zeros(type_size, dtype=torch.uint8)
    with pytest.raises(ValueError, match=qtype.name):
        dequantize(data, qtype, (block,))
    with pytest.raises(ValueError, match=qtype.name):
        QuantizedLinear(data, qtype, (1, block))


def test_wrong_sizes_raise_value_error() -> None:
    data = as_torch(random_bytes(QT.Q8_0, (2, 64), 0))
    with pytest.raises(ValueError, match="bytes"):
        dequantize(data, QT.Q8_0, (3, 64))
    with pytest.raises(ValueError, match="block"):
        dequantize(data, QT.Q8_0, (2, 48))
    with pytest.raises(ValueError, match="multiple"):
        QuantizedLinear(data, QT.Q8_0, (4, 48))
    with pytest.raises(ValueError, match="mode"):
        QuantizedLinear(data, QT.Q8_0, (2, 64), mode="quick")


# ----------------------------------------------------------------------------------------------------
# QuantizedLinear
# ----------------------------------------------------------------------------------------------------

LINEAR_TYPES = SUPPORTED_TYPES


def layer_shape(qtype: QT) -> tuple[int, int]:
    """(out, in): out not a multiple of 16 (the int4 packer pads), in a few blocks wide."""
    return (72, 512) if block_size(qtype) == 256 else (40, 96)


def weight(qtype: QT, shape: tuple[int, int], seed: int) -> torch.Tensor:
    return as_torch(random_bytes(qtype, shape, seed, scale=0.01))


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("qtype", LINEAR_TYPES, ids=lambda t: t.name)
def test_reference_linear_is_exact_fp32(qtype: QT) -> None:
    shape = layer_shape(qtype)
    data = weight(qtype, shape, 10)
    w = dequantize(data, qtype, shape)  # (out, in)
    bias = torch.randn(shape[0])
    layer = QuantizedLinear(data, qtype, shape, mode="reference", bias=bias)
    assert (layer.out_features, layer.in_features, layer.qtype) == (*shape, qtype)
    for m in (1, 7, 64):
        x = torch.randn(m, shape[1])
        torch.testing.assert_close(layer(x), x @ w.T + bias, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("qtype", LINEAR_TYPES, ids=lambda t: t.name)
def test_fast_linear_close_to_reference(qtype: QT) -> None:
    shape = layer_shape(qtype)
    data = weight(qtype, shape, 11)
    ref = QuantizedLinear(data, qtype, shape, mode="reference")
    fast = QuantizedLinear(data, qtype, shape, mode="fast")
    dense = "bf16" if has_fast_bf16() else "f32"
    packed = "native" if qtype in kernels.SUPPORTED and kernels.native() is not None else "int4"
    want_kernel = {QT.F32: "f32", QT.F16: dense, QT.BF16: dense}.get(qtype, packed)
    if qtype == QT.Q6_K and packed == "int4":  # no int4 form worth having: four padded planes
        want_kernel = dense
    assert fast.kernel == want_kernel
    # decode rows, and prefill rows (through the dequantize-to-bf16 path where the kernel stops)
    ms = [1, 7, 64, min(fast.packed_max_rows + 1, 300)]
    for m in ms:
        x = torch.randn(m, shape[1])
        err = rel_err(fast(x), ref(x))
        assert err < FAST_REL_ERR, f"{qtype.name} M={m}: relative error {err:.2e}"


@pytest.mark.parametrize("qtype", QUANT_TYPES, ids=lambda t: t.name)
def test_forced_kernels_close_to_reference(qtype: QT) -> None:
    """Every format through both packed paths, Q6_K's four padded int4 planes included."""
    shape = layer_shape(qtype)
    data = weight(qtype, shape, 12)
    ref = QuantizedLinear(data, qtype, shape, mode="reference")
    x = torch.randn(3, shape[1])
    for kernel in ("int4", "bf16"):
        err = rel_err(QuantizedLinear(data, qtype, shape, kernel=kernel)(x), ref(x))
        assert err < FAST_REL_ERR, f"{qtype.name} kernel {kernel}: relative error {err:.2e}"


@pytest.mark.parametrize("qtype", [QT.Q4_1, QT.Q8_0, QT.Q4_K], ids=lambda t: t.name)
def test_dense_copy_is_close_and_gives_each_row_the_same_result_whatever_shares_the_call(qtype: QT) -> None:
    shape = (4096, 512)  # big enough that a plain bf16 matmul's row results depend on the row count
    data = weight(qtype, shape, 13)
    ref = QuantizedLinear(data, qtype, shape, mode="reference")
    fast = QuantizedLinear(data, qtype, shape)
    fast.keep_dense_copy()
    x = torch.randn(40, shape[1])
    y = fast(x)
    assert rel_err(y, ref(x)) < FAST_REL_ERR
    for rows in ([0], [0, 5], list(range(17)), [3, 0, 9]):  # 1, 2, 17 (two padded calls), reordered
        assert torch.equal(fast(x[rows]), y[rows]), rows


def test_fast_linear_on_quantized_floats() -> None:
    """Real quantized data (Q4_1 and Q8_0 are the default model's formats), batch dims and a bias."""
    rng = np.random.default_rng(4)
    w = rng.standard_normal((48, 128)).astype(np.float32) * 0.05
    bias = torch.randn(48)
    for qtype in (QT.Q4_1, QT.Q8_0):
        data = as_torch(gguf.quants.quantize(w, qtype))
        ref = QuantizedLinear(data, qtype, (48, 128), mode="reference", bias=bias)
        fast = QuantizedLinear(data, qtype, (48, 128), bias=bias)
        for lead in ((1,), (2, 3), (5, 40)):
            x = torch.randn(*lead, 128)
            y = fast(x)
            assert y.shape == (*lead, 48) and y.dtype == torch.float32
            assert rel_err(y, ref(x)) < FAST_REL_ERR
        assert fast(torch.zeros(0, 128)).shape == (0, 48)


@pytest.mark.parametrize("qtype", [QT.Q8_0, QT.Q4_1, QT.Q4_K, QT.Q6_K, QT.F16, QT.BF16], ids=lambda t: t.name)
def test_rows_equal_dequantized_rows(qtype: QT) -> None:
    shape = layer_shape(qtype)
    data = weight(qtype, shape, 13)
    w = dequantize(data, qtype, shape)
    ids = torch.tensor([0, 5, shape[0] - 1, 5, 17])
    for mode in ("fast", "reference"):
        layer = QuantizedLinear(data, qtype, shape, mode=mode)
        assert torch.equal(layer.rows(ids), w[ids])
        assert torch.equal(layer.rows(ids.view(1, 5)), w[ids])
        assert layer.rows(torch.tensor([], dtype=torch.long)).shape == (0, shape[1])
    with pytest.raises(IndexError):
        layer.rows(torch.tensor([shape[0]]))


@pytest.mark.parametrize("qtype", [QT.Q4_1, QT.Q8_0, QT.Q3_K, QT.Q6_K, QT.BF16, QT.F32], ids=lambda t: t.name)
@pytest.mark.parametrize("mode", ["fast", "reference"])
def test_concat_equals_separate_matmuls(qtype: QT, mode: str) -> None:
    k = 256 if block_size(qtype) == 256 else 64
    outs = [48, 16, 24]  # e.g. Q, K, V
    datas = [weight(qtype, (n, k), 20 + i) for i, n in enumerate(outs)]
    biases = [torch.randn(n) for n in outs]
    fused = QuantizedLinear.concat(
        [(d, qtype, (n, k)) for d, n in zip(datas, outs, strict=True)], mode=mode, bias=torch.cat(biases)
    )
    assert (fused.out_features, fused.in_features) == (sum(outs), k)
    separate = [
        QuantizedLinear(d, qtype, (n, k), mode=mode, bias=b)
        for d, n, b in zip(datas, outs, biases, strict=True)
    ]
    for m in (1, 100):
        x = torch.randn(m, k)
        torch.testing.assert_close(
            fused(x), torch.cat([s(x) for s in separate], dim=-1), rtol=1e-5, atol=1e-5
        )
    ids = torch.tensor([0, 47, 48, 63, 64, 87, 3])
    w = torch.cat([dequantize(d, qtype, (n, k)) for d, n in zip(datas, outs, strict=True)])
    assert torch.equal(fused.rows(ids), w[ids])


@pytest.mark.parametrize("qtype", sorted(kernels.SUPPORTED), ids=lambda t: t.name)
def test_repacked_weights_give_prefill_the_files_exact_values(
    qtype: QT, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the native kernels the fast mode keeps 8-row-interleaved copies of the SUPPORTED formats (the
    K-quants' with their 6-bit scales decoded); prefill's dequantized chunks (more rows than the kernels
    take) come out of that copy, and must be exactly the file's values, part boundaries and a partial
    last group of rows included."""
    if kernels.native() is None:
        pytest.fail(f"the native kernels did not build: {kernels.native_error}")
    outs, k = [40, 13, 700], 2 * block_size(qtype)  # 753 rows: parts not multiples of 8
    monkeypatch.setattr(quants, "_CHUNK_ELEMENTS", 100 * k)  # chunks of 100 rows: not multiples of 8 either
    datas = [weight(qtype, (n, k), 30 + i) for i, n in enumerate(outs)]
    fused = QuantizedLinear.concat([(d, qtype, (n, k)) for d, n in zip(datas, outs, strict=True)])
    assert fused.kernel == "native" and fused._unpack is not None
    w = torch.cat([dequantize(d, qtype, (n, k)) for d, n in zip(datas, outs, strict=True)])
    chunks = list(fused._chunks())
    assert len(chunks) == 8 and torch.equal(torch.cat(chunks), w)
    x = torch.randn(min(fused.packed_max_rows + 1, 300), k)
    assert rel_err(fused(x), x @ w.T) < FAST_REL_ERR


def test_concat_rejects_mixed_weights() -> None:
    a = weight(QT.Q8_0, (16, 64), 0)
    b = weight(QT.Q4_0, (16, 64), 1)
    c = weight(QT.Q8_0, (16, 128), 2)
    with pytest.raises(ValueError, match="Q4_0"):
        QuantizedLinear.concat([(a, QT.Q8_0, (16, 64)), (b, QT.Q4_0, (16, 64))])
    with pytest.raises(ValueError, match="in_features"):
        QuantizedLinear.concat([(a, QT.Q8_0, (16, 64)), (c, QT.Q8_0, (16, 128))])
    with pytest.raises(ValueError, match="bias"):
        QuantizedLinear.concat([(a, QT.Q8_0, (16, 64))], bias=torch.zeros(17))


def test_read_only_memory_map_is_never_written(tmp_path: Path) -> None:
    """Weights come memory-mapped from the GGUF file: a write into them would crash here (read-only)."""
    shape = (40, 96)
    raw = random_bytes(QT.Q4_1, shape, 30, scale=0.01)
    path = tmp_path / "w.bin"
    raw.tofile(path)
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch warns that the array is not writable
        data = torch.from_numpy(mm)
    w = dequantize(data, QT.Q4_1, shape)
    x = torch.randn(100, shape[1])
    for mode in ("fast", "reference"):
        layer = QuantizedLinear(data, QT.Q4_1, shape, mode=mode)
        layer(x[:1])
        layer(x)
        assert torch.equal(layer.rows(torch.tensor([3, 1])), w[[3, 1]])
    assert np.array_equal(np.fromfile(path, dtype=np.uint8), raw)


def test_int4_packing_across_chunks_and_odd_part_boundaries() -> None:
    """Parts longer than a packing chunk, with boundaries off the packer's 64-row period."""
    outs = [1100, 60, 37]
    datas = [weight(QT.Q4_1, (n, 64), 40 + i) for i, n in enumerate(outs)]
    parts = [(d, QT.Q4_1, (n, 64)) for d, n in zip(datas, outs, strict=True)]
    ref = QuantizedLinear.concat(parts, mode="reference")
    x = torch.randn(3, 64)
    want = ref(x)
    for kernel in ("int4", "native"):  # native: one product per part, concatenated
        fast = QuantizedLinear.concat(parts, mode="fast", kernel=kernel)
        assert float((fast(x) - want).abs().max() / want.abs().max()) < 1e-2


@pytest.mark.parametrize(("qtype", "k"), [(QT.Q8_0, 64), (QT.Q4_K, 256)])
def test_a_big_matrix_is_repacked_in_chunks_each_released_once_copied(
    monkeypatch: pytest.MonkeyPatch, qtype: QT, k: int
) -> None:
    """The chunked repack (big matrices, file pages released as the copy fills) gives the one-call
    repack's bytes, and hands `release` every byte of the file's matrix exactly once (Q4_K: a packed
    group is larger than its 8 rows in the file)."""
    if kernels.native() is None:
        pytest.fail(f"the native kernels did not build: {kernels.native_error}")
    row_bytes = quants.row_nbytes(qtype, k)
    monkeypatch.setattr(
        quants, "_REPACK_CHUNK_BYTES", 48 * row_bytes
    )  # 48 rows (3 pairs of groups) per chunk
    data = weight(qtype, (203, k), 40)  # 203 rows: 4 chunks of 48, then 11 rows (a partial pair)
    released: list[torch.Tensor] = []
    layer = QuantizedLinear(data, qtype, (203, k), release=released.append)
    assert torch.equal(layer._raw, kernels.native().repack(data, int(qtype), 203))
    assert [c.numel() for c in released] == [48 * row_bytes] * 4 + [11 * row_bytes]
    assert torch.equal(torch.cat(released), data)
