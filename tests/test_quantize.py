"""gguflm quantize / imatrix against gguf-py's numpy quantizers and against llama.cpp's own quantizer.

llama.cpp's comparisons need /tmp/lcpvenv (llama-cpp-python built from vendor/llama.cpp): its
libggml-base for the row quantizers (ctypes: ggml_quantize_chunk), its llama_model_quantize for whole
files (tests/llama_cpp_quantize.py, run by that venv's Python). They skip with a message without it.
"""

from __future__ import annotations

import ctypes
import glob
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from gguflm.cli import main
from gguflm.gguf_file import GGUFFile
from gguflm.model import Model
from gguflm.quantize import mix
from gguflm.quantize.driver import quantize_file
from gguflm.quantize.imatrix import collect, read_imatrix, write_dat_imatrix, write_gguf_imatrix
from gguflm.quantize.rows import quantize_rows
from gguflm.writer import make_tiny_model

QT = gguf.GGMLQuantizationType
LEGACY = [QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0]
K_QUANTS = [QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K]
LCP_PYTHON = Path("/tmp/lcpvenv/bin/python")
LCP_HELPER = Path(__file__).with_name("llama_cpp_quantize.py")
GGML_BASE = sorted(glob.glob("/tmp/lcpvenv/lib/python3*/site-packages/llama_cpp/lib/libggml-base.so"))
needs_llama_cpp = pytest.mark.skipif(
    not LCP_PYTHON.exists() or not GGML_BASE,
    reason="llama.cpp comparison skipped: /tmp/lcpvenv (llama-cpp-python) is not on this machine",
)


def edge_rows(n_rows: int, n_cols: int, seed: int = 0) -> np.ndarray:
    """Gaussian rows plus the cases that trip quantizers: zeros, a constant, huge and tiny values,
    one-signed rows and one outlier."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n_rows, n_cols)).astype(np.float32)
    x[0] = 0
    x[1] = 3.0
    x[2] *= 1e4
    x[3] *= 1e-6
    x[4] = np.abs(x[4])
    x[5] = -np.abs(x[5])
    x[6, 7] = 50.0
    x[7, : n_cols // 2] = 0
    return x


@pytest.mark.parametrize("qtype", LEGACY, ids=lambda t: t.name)
def test_legacy_formats_are_bit_exact_with_gguf_numpy(qtype: QT) -> None:
    x = edge_rows(64, 512)
    mine = quantize_rows(torch.from_numpy(x), qtype).numpy()
    assert np.array_equal(mine, gguf.quants.quantize(x, qtype))


@pytest.mark.parametrize("qtype", K_QUANTS, ids=lambda t: t.name)
def test_k_quants_decode_with_gguf_and_beat_plain_rounding_of_fewer_bits(qtype: QT) -> None:
    """gguf-py decodes our blocks back near the input: better than a legacy format with at least as
    many bits per weight rounds them (the K search is worth its bits), exact on a constant row."""
    x = edge_rows(64, 512)[8:]  # gaussian rows
    q = quantize_rows(torch.from_numpy(x), qtype).numpy()
    err = np.sqrt(((gguf.quants.dequantize(q, qtype) - x) ** 2).mean())
    peer = {QT.Q2_K: QT.Q4_0, QT.Q3_K: QT.Q4_0, QT.Q4_K: QT.Q4_0, QT.Q5_K: QT.Q5_0, QT.Q6_K: QT.Q8_0}[qtype]
    peer_err = np.sqrt(((gguf.quants.dequantize(gguf.quants.quantize(x, peer), peer) - x) ** 2).mean())
    bits = {QT.Q2_K: 2, QT.Q3_K: 3, QT.Q4_K: 4, QT.Q5_K: 5, QT.Q6_K: 6}[qtype]
    peer_bits = {QT.Q4_0: 4, QT.Q5_0: 5, QT.Q8_0: 8}[peer]
    assert err < peer_err * 2.0 ** (peer_bits - bits) * 1.05, (err, peer_err)
    zeros = quantize_rows(torch.zeros(2, 256), qtype).numpy()
    assert np.array_equal(gguf.quants.dequantize(zeros, qtype), np.zeros((2, 256), np.float32))


def ggml_quantize(x: np.ndarray, qtype: QT, imatrix: np.ndarray | None) -> np.ndarray:
    lib = ctypes.CDLL(GGML_BASE[0])
    fn = lib.ggml_quantize_chunk
    fn.restype = ctypes.c_size_t
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p] + [ctypes.c_int64] * 3 + [ctypes.c_void_p]
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    out = np.zeros((x.shape[0], x.shape[1] // block * size), np.uint8)
    imat = imatrix.ctypes.data if imatrix is not None else None
    fn(int(qtype), x.ctypes.data, out.ctypes.data, 0, x.shape[0], x.shape[1], imat)
    return out


@needs_llama_cpp
@pytest.mark.parametrize("weighted", [False, True], ids=["ref", "imatrix"])
@pytest.mark.parametrize("qtype", LEGACY + K_QUANTS, ids=lambda t: t.name)
def test_every_block_equals_llama_cpps(qtype: QT, weighted: bool) -> None:
    """ggml's quantize_row_*_ref and, with an imatrix, quantize_row_*_impl: the same bytes."""
    x = edge_rows(32, 768, seed=1)
    imat = (np.random.default_rng(2).random(768, dtype=np.float32) * 3) ** 2 if weighted else None
    mine = quantize_rows(torch.from_numpy(x), qtype, torch.from_numpy(imat) if weighted else None).numpy()
    theirs = ggml_quantize(x, qtype, imat)
    size = gguf.GGML_QUANT_SIZES[qtype][1]
    same = (mine.reshape(-1, size) == theirs.reshape(-1, size)).all(axis=1)
    assert same.all(), f"{same.mean():.4f} of blocks identical"


def facts(n_layer: int = 8, n_gqa: int = 4) -> mix.ModelFacts:
    return mix.ModelFacts(arch="llama", n_layer=n_layer, n_gqa=n_gqa)


def llama_tensors(n_layer: int, n_embd: int, tied: bool) -> list[tuple[str, tuple[int, ...], QT]]:
    out = [("token_embd.weight", (512, n_embd), QT.F32), ("output_norm.weight", (n_embd,), QT.F32)]
    if not tied:
        out.append(("output.weight", (512, n_embd), QT.F32))
    for i in range(n_layer):
        for part in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up"):
            out.append((f"blk.{i}.{part}.weight", (n_embd, n_embd), QT.F32))
        out.append((f"blk.{i}.ffn_down.weight", (n_embd, 2 * n_embd), QT.F32))
        out += [
            (f"blk.{i}.attn_norm.weight", (n_embd,), QT.F32),
            (f"blk.{i}.ffn_norm.weight", (n_embd,), QT.F32),
        ]
    return out


def test_type_mix_follows_llama_quantize_rules() -> None:
    """The rules as llama-quant.cpp states them, worked out by hand for 8 layers."""
    types, _ = mix.plan(llama_tensors(8, 256, tied=False), "Q4_K_M", facts())
    types = dict(types)
    # use_more_bits(i, 8): i < 1, i >= 7, (i - 1) % 3 == 2 -> layers 0, 3, 6, 7
    assert [i for i in range(8) if types[f"blk.{i}.attn_v.weight"] == QT.Q6_K] == [0, 3, 6, 7]
    assert [i for i in range(8) if types[f"blk.{i}.ffn_down.weight"] == QT.Q6_K] == [0, 3, 6, 7]
    assert types["blk.1.attn_v.weight"] == types["blk.1.attn_q.weight"] == QT.Q4_K
    assert types["output.weight"] == QT.Q6_K and types["token_embd.weight"] == QT.Q4_K
    assert types["blk.0.attn_norm.weight"] == QT.F32
    tied = dict(mix.plan(llama_tensors(8, 256, tied=True), "Q4_K_M", facts())[0])
    assert tied["token_embd.weight"] == QT.Q6_K  # the tied head takes the output's type
    q3 = dict(mix.plan(llama_tensors(8, 256, tied=False), "Q3_K_M", facts())[0])
    assert [q3[f"blk.{i}.attn_v.weight"] for i in range(3)] == [QT.Q5_K, QT.Q5_K, QT.Q4_K]
    assert q3["blk.0.attn_output.weight"] == QT.Q4_K and q3["blk.0.ffn_down.weight"] == QT.Q4_K
    q2 = dict(mix.plan(llama_tensors(8, 256, tied=False), "Q2_K", facts(n_gqa=1))[0])
    assert q2["blk.0.attn_v.weight"] == QT.Q3_K and q2["blk.0.attn_q.weight"] == QT.Q2_K
    # rows of 576 (SmolLM2): K types fall back to 32-wide ones, the head to Q8_0
    narrow, state = mix.plan(llama_tensors(8, 576, tied=False), "Q4_K_M", facts())
    narrow_types = dict(narrow)
    assert narrow_types["blk.1.attn_q.weight"] == QT.Q5_0 and narrow_types["blk.0.attn_v.weight"] == QT.Q8_0
    assert narrow_types["output.weight"] == QT.Q8_0 and state.fallbacks
    pure = dict(mix.plan(llama_tensors(8, 256, tied=False), "Q4_K_M", facts(), pure=True)[0])
    assert {t for n, t in pure.items() if n.endswith("weight") and "norm" not in n} == {QT.Q4_K}
    with pytest.raises(ValueError, match="unknown quantization type"):
        mix.plan(llama_tensors(1, 256, tied=False), "Q9_K", facts())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A llama with rows of 256 (K-quants fit), 8 layers, 4 query heads per KV head."""
    path = tmp_path_factory.mktemp("quantize") / "tiny.gguf"
    return make_tiny_model(
        path, "llama", n_embd=256, n_ff=512, n_layer=8, n_head=4, n_head_kv=1, tied_output=False
    )


def llama_cpp_quantize(src: Path, dst: Path, type_name: str, *extra: str) -> None:
    ftype = int(mix.FILE_TYPES[type_name][0])
    done = subprocess.run(
        [str(LCP_PYTHON), str(LCP_HELPER), str(src), str(dst), str(ftype), *extra],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]


def compare_files(tmp_path: Path, src: Path, type_name: str) -> None:
    mine, theirs = tmp_path / f"mine-{type_name}.gguf", tmp_path / f"lcp-{type_name}.gguf"
    quantize_file(src, mine, type_name, progress=False)
    llama_cpp_quantize(src, theirs, type_name)
    assert mine.read_bytes() == theirs.read_bytes(), type_name


@needs_llama_cpp
@pytest.mark.parametrize("type_name", ["Q4_K_M", "Q2_K"])
def test_quantized_file_is_byte_identical_to_llama_cpps(tiny: Path, tmp_path: Path, type_name: str) -> None:
    compare_files(tmp_path, tiny, type_name)


@needs_llama_cpp
def test_fallbacks_for_narrow_rows_are_byte_identical(tmp_path: Path) -> None:
    narrow = make_tiny_model(tmp_path / "narrow.gguf", "qwen2", n_layer=4)  # rows of 64: no K-quant fits
    compare_files(tmp_path, narrow, "Q4_K_M")


@pytest.mark.slow
@needs_llama_cpp
@pytest.mark.parametrize(
    "type_name",
    [
        "Q4_0",
        "Q4_1",
        "Q5_0",
        "Q5_1",
        "Q8_0",
        "Q3_K_S",
        "Q3_K_M",
        "Q3_K_L",
        "Q4_K_S",
        "Q5_K_S",
        "Q5_K_M",
        "Q6_K",
        "F16",
    ],
)
def test_every_file_type_is_byte_identical_to_llama_cpps(tiny: Path, tmp_path: Path, type_name: str) -> None:
    compare_files(tmp_path, tiny, type_name)


def test_imatrix_sums_the_squared_inputs_of_each_matrix(tiny: Path, tmp_path: Path) -> None:
    """Checked against the named observation points: attn_norm enters q/k/v, ffn_norm gate/up."""
    model = Model.load(tiny, mode="reference")
    tokens = [int(t) for t in np.random.default_rng(3).integers(3, 380, 2 * 64)]
    seen: dict[tuple[str, int], torch.Tensor] = {}

    def observer(name: str, il: int, x: torch.Tensor) -> None:
        if name in ("attn_norm", "ffn_norm"):
            sq = x.double().square().sum(0)
            seen[name, il] = seen[name, il] + sq if (name, il) in seen else sq

    model.transformer.observers.append(observer)
    collector, n_chunks, ppl = collect(model, tokens, 64, bos=1, progress=False)
    model.transformer.observers.clear()
    assert n_chunks == 2 and np.isfinite(ppl)
    assert len(collector.sums) == 8 * 7  # q, k, v, output, gate, up, down per layer; never token_embd/output
    for il in range(8):
        for part, point in (("attn_q", "attn_norm"), ("attn_v", "attn_norm"), ("ffn_up", "ffn_norm")):
            got = collector.sums[f"blk.{il}.{part}.weight"]
            torch.testing.assert_close(got, seen[point, il], rtol=1e-9, atol=0)
        assert collector.counts[f"blk.{il}.ffn_down.weight"] == 128
    # both file formats read back to the same mean squares
    write_gguf_imatrix(tmp_path / "im.gguf", collector, ["text.txt"], n_chunks, 64)
    write_dat_imatrix(tmp_path / "im.dat", collector, "text.txt", n_chunks, 64)
    a, b = read_imatrix(tmp_path / "im.gguf"), read_imatrix(tmp_path / "im.dat")
    assert a.datasets == b.datasets == ["text.txt"] and a.chunk_count == b.chunk_count == 2
    for name, sums in collector.sums.items():
        expected = (sums / 128).float()
        torch.testing.assert_close(a.values[name], expected, rtol=1e-6, atol=0)
        torch.testing.assert_close(b.values[name], expected, rtol=1e-6, atol=0)


@needs_llama_cpp
@pytest.mark.parametrize("type_name", ["Q4_K_M", pytest.param("Q4_0", marks=pytest.mark.slow)])
def test_quantizing_with_an_imatrix_gives_llama_cpps_tensors(
    tiny: Path, tmp_path: Path, type_name: str
) -> None:
    """Same imatrix (.dat) into both quantizers: every tensor's type and bytes agree (the metadata
    differs only by the quantize.imatrix.* keys llama-quantize's CLI adds, not its library)."""
    model = Model.load(tiny, mode="reference")
    tokens = [int(t) for t in np.random.default_rng(4).integers(3, 380, 128)]
    collector, n_chunks, _ = collect(model, tokens, 64, bos=1, progress=False)
    write_dat_imatrix(tmp_path / "im.dat", collector, "text.txt", n_chunks, 64)
    mine, theirs = tmp_path / "mine.gguf", tmp_path / "lcp.gguf"
    quantize_file(tiny, mine, type_name, imatrix=read_imatrix(tmp_path / "im.dat"), progress=False)
    llama_cpp_quantize(tiny, theirs, type_name, "--imatrix", str(tmp_path / "im.dat"))
    a, b = GGUFFile(mine), GGUFFile(theirs)
    assert list(a.tensors) == list(b.tensors)
    for name, info in a.tensors.items():
        assert info.qtype == b.tensors[name].qtype, name
        assert torch.equal(info.data, b.tensors[name].data), name
    assert a.metadata["quantize.imatrix.entries_count"] == 56


def test_requantized_file_runs_and_keeps_its_metadata(tiny: Path, tmp_path: Path) -> None:
    """Q4_1 in (requantized, as the shipped SmolLM2 would be), Q8_0 out: loads, logits near the
    original's, every key of the input kept, file_type and quantization_version set."""
    small = make_tiny_model(tmp_path / "small.gguf", "llama")
    q41 = tmp_path / "q41.gguf"
    quantize_file(small, q41, "Q4_1", progress=False)
    out = tmp_path / "q80.gguf"
    quantize_file(q41, out, "Q8_0", progress=False)
    src, dst = GGUFFile(q41), GGUFFile(out)
    assert {k: v for k, v in dst.metadata.items() if k != "general.file_type"} == {
        k: v for k, v in src.metadata.items() if k != "general.file_type"
    }
    assert dst.metadata["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_Q8_0)
    assert dst.metadata["general.quantization_version"] == 2
    tokens = [1, 20, 30, 40, 50, 60]
    a = Model.load(q41, mode="reference")
    b = Model.load(out, mode="reference")
    from gguflm.batch import Batch
    from gguflm.context import Context

    logits = []
    for m in (a, b):
        ctx = Context(m, n_ctx=16)
        ctx.decode(Batch.from_tokens(tokens))
        logits.append(ctx.logits(-1))
    assert torch.allclose(logits[0], logits[1], atol=0.05 * float(logits[0].abs().max()))


def test_cli_quantize_and_its_errors(tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "q.gguf"
    assert main(["quantize", str(tiny), str(out), "q8_0"]) == 0
    assert GGUFFile(out).tensors["blk.0.attn_q.weight"].qtype == QT.Q8_0
    capsys.readouterr()
    assert main(["quantize", str(tiny), str(out), "Q9_K"]) != 0
    err = capsys.readouterr().err.strip()
    assert "unknown quantization type 'Q9_K'" in err and "\n" not in err
    assert main(["quantize", str(tmp_path / "missing.gguf"), str(out), "Q4_0"]) != 0
    assert "no such file" in capsys.readouterr().err
    assert main(["quantize", str(tiny), str(out), "Q4_0", "--imatrix", str(tmp_path / "none.dat")]) != 0
    assert "no such imatrix file" in capsys.readouterr().err
    assert main(["quantize", str(tiny), str(out), "Q2_K_S"]) != 0
    assert "requires an importance matrix" in capsys.readouterr().err


def test_cli_imatrix_writes_what_quantize_reads(
    tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = tmp_path / "text.txt"
    text.write_text("The capital of France is Paris. Once upon a time, there was a little girl. " * 20)
    im = tmp_path / "im.gguf"
    argv = ["imatrix", "-m", str(tiny), "--mode", "reference", "-f", str(text), "-o", str(im), "-c", "64"]
    assert main([*argv, "--chunks", "2"]) == 0
    assert "over 2 chunks" in capsys.readouterr().out
    out = tmp_path / "q.gguf"
    assert main(["quantize", str(tiny), str(out), "Q4_0", "--imatrix", str(im)]) == 0
    meta = GGUFFile(out).metadata
    assert meta["quantize.imatrix.chunks_count"] == 2 and meta["quantize.imatrix.dataset"] == str(text)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
