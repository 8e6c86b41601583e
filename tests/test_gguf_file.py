"""GGUFFile: what write_gguf writes reads back the same, and bad files are refused with a message
that names the file and the problem (not a numpy traceback from deep inside gguf-py)."""

from __future__ import annotations

import re
import struct
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFValueType as V

from gguflm.gguf_file import GGUFError, GGUFFile
from gguflm.writer import make_tiny_model, write_gguf

# ----------------------------------------------------------------------------------------------
# helpers


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    """A small but complete model file to corrupt: 1 layer, F32 norms, Q8_0 matrices."""
    return make_tiny_model(
        tmp_path / "tiny.gguf", "llama", n_vocab=300, n_embd=32, n_layer=1, n_ff=64, weight_type=Q.Q8_0
    )


def _refused(path: Path, phrase: str) -> str:
    """Open `path`, expect GGUFError naming the file and matching `phrase`; return the message without the path."""
    with pytest.raises(GGUFError) as info:
        GGUFFile(path)
    message = str(info.value)
    assert str(path) in message, message
    problem = message.replace(str(path), "")  # tmp_path holds the test's name, which may hold the phrase
    assert re.search(phrase, problem, re.IGNORECASE), f"{phrase!r} not in {message!r}"
    return problem


def _bad_copy(good: Path, data: bytes | bytearray) -> Path:
    bad = good.with_name("bad.gguf")
    bad.write_bytes(bytes(data))
    return bad


def _tensor_fields(path: Path) -> dict[str, dict[str, int]]:
    """Byte positions of each tensor-info record's fields: dims, type id, data offset.

    A record is: name length (u64), name, n_dims (u32), dims (u64 each), type (u32), offset (u64).
    """
    reader = gguf.GGUFReader(path)
    out = {}
    for t in reader.tensors:
        sizes = [part.nbytes for part in t.field.parts]
        start = t.field.offset
        out[t.name] = {
            "dims": start + sum(sizes[:3]),
            "type": start + sum(sizes[:4]),
            "offset": start + sum(sizes[:5]),
            "abs_data": int(t.data_offset),
            "n_bytes": int(t.n_bytes),
        }
    return out


def _data_start(path: Path) -> int:
    """Where the tensor data section begins: offsets in tensor infos are relative to it."""
    fields = _tensor_fields(path)
    first = min(fields.values(), key=lambda f: f["abs_data"])
    return first["abs_data"] - struct.unpack_from("<Q", path.read_bytes(), first["offset"])[0]


# ----------------------------------------------------------------------------------------------
# refused files


def test_nonexistent_path(tmp_path: Path) -> None:
    _refused(tmp_path / "missing.gguf", r"no such file|not found|does not exist")


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.gguf"
    path.write_bytes(b"")
    _refused(path, r"empty|truncated header")


def test_wrong_magic(tiny: Path) -> None:
    data = bytearray(tiny.read_bytes())
    data[:4] = b"GGML"
    _refused(_bad_copy(tiny, data), r"not a GGUF file|magic")


@pytest.mark.parametrize("version", [0, 1, 4, 0x7FFF])
def test_unsupported_version(tiny: Path, version: int) -> None:
    data = bytearray(tiny.read_bytes())
    data[4:8] = struct.pack("<I", version)
    message = _refused(_bad_copy(tiny, data), r"unsupported GGUF version")
    assert str(version) in message


@pytest.mark.parametrize("size", [3, 4, 8, 16, 23])
def test_truncated_header(tiny: Path, size: int) -> None:
    _refused(_bad_copy(tiny, tiny.read_bytes()[:size]), r"truncated")


def test_truncated_in_metadata(tiny: Path) -> None:
    """Cut inside the key/value section (the token list is most of it)."""
    data = tiny.read_bytes()
    _refused(_bad_copy(tiny, data[: len(data) // 8]), r"truncated")


def test_truncated_in_tensor_data(tiny: Path) -> None:
    fields = _tensor_fields(tiny)
    matrix = fields["blk.0.ffn_up.weight"]
    cut = matrix["abs_data"] + matrix["n_bytes"] // 2
    _refused(_bad_copy(tiny, tiny.read_bytes()[:cut]), r"truncated")


def test_any_cut_is_refused_with_a_gguf_error(tiny: Path) -> None:
    """Whatever the cut point, the error is a GGUFError naming the file, never an IndexError etc."""
    data = tiny.read_bytes()
    cuts = sorted({*range(0, 64), *np.linspace(64, len(data) - 1, 60, dtype=int).tolist()})
    for cut in cuts:
        _refused(_bad_copy(tiny, data[:cut]), r"truncated|corrupt|past the end")


def _last_tensor(path: Path) -> tuple[str, dict[str, int]]:
    return max(_tensor_fields(path).items(), key=lambda kv: kv[1]["abs_data"])


def test_tensor_offset_past_end_of_file(tiny: Path) -> None:
    """The offset is moved so that the last tensor's data ends 64 bytes after the end of the file."""
    data = bytearray(tiny.read_bytes())
    name, field = _last_tensor(tiny)
    past_end = len(data) - _data_start(tiny) - field["n_bytes"] + 64
    aligned = -(-past_end // 32) * 32  # keep it aligned: only the end is wrong
    struct.pack_into("<Q", data, field["offset"], aligned)
    message = _refused(_bad_copy(tiny, data), r"past the end|beyond the end|out of (the )?file")
    assert name in message


def test_tensor_offset_huge(tiny: Path) -> None:
    data = bytearray(tiny.read_bytes())
    name, field = _last_tensor(tiny)
    struct.pack_into("<Q", data, field["offset"], 2**62)
    message = _refused(_bad_copy(tiny, data), r"past the end|beyond the end|out of (the )?file")
    assert name in message


def test_tensor_size_past_end_of_file(tiny: Path) -> None:
    """The offset is right but a dimension is inflated, so the data would run past the file's end."""
    data = bytearray(tiny.read_bytes())
    name = "blk.0.ffn_down.weight"
    dims_at = _tensor_fields(tiny)[name]["dims"]
    struct.pack_into("<Q", data, dims_at + 8, 100_000)  # ne[1]: rows
    message = _refused(_bad_copy(tiny, data), r"past the end|beyond the end|out of (the )?file")
    assert name in message


@pytest.mark.parametrize("type_id", [4, 5, 200])  # 4/5 are removed Q4_2/Q4_3; 200 never existed
def test_unknown_tensor_type(tiny: Path, type_id: int) -> None:
    data = bytearray(tiny.read_bytes())
    name = "blk.0.attn_q.weight"
    struct.pack_into("<I", data, _tensor_fields(tiny)[name]["type"], type_id)
    message = _refused(_bad_copy(tiny, data), r"unknown (tensor )?type|unsupported (tensor )?type")
    assert str(type_id) in message
    assert name in message


def test_misaligned_tensor_offset(tiny: Path) -> None:
    """llama.cpp refuses a tensor whose offset is not a multiple of general.alignment (32 by default)."""
    data = bytearray(tiny.read_bytes())
    name = "blk.0.attn_q.weight"
    at = _tensor_fields(tiny)[name]["offset"]
    (offset,) = struct.unpack_from("<Q", data, at)
    struct.pack_into("<Q", data, at, offset + 4)
    message = _refused(_bad_copy(tiny, data), r"align|multiple of")
    assert name in message


def test_duplicate_tensor_name(tiny: Path) -> None:
    data = bytearray(tiny.read_bytes())
    # both names have the same length, so renaming keeps every other byte in place
    first = data.index(b"blk.0.attn_k.weight")
    data[first : first + len(b"blk.0.attn_k.weight")] = b"blk.0.attn_v.weight"
    _refused(_bad_copy(tiny, data), r"duplicate")


# ----------------------------------------------------------------------------------------------
# round trips

METADATA: dict[str, Any] = {
    "general.architecture": "llama",
    "general.name": "round trip ✓ 日本語",
    "llama.block_count": 2,
    "llama.context_length": 4096,
    "llama.rope.freq_base": 500000.0,
    "llama.attention.layer_norm_rms_epsilon": 1e-6,
    "tokenizer.ggml.add_bos_token": True,
    "tokenizer.ggml.tokens": ["<s>", "a", "b c", ""],
    "tokenizer.ggml.token_type": [3, 1, 1, 5],
    "tokenizer.ggml.scores": [0.0, -1.5, -2.25, 3.0],
    "test.negative": -7,
    "test.big": 2**40,
    "test.int64": np.int64(-(2**40)),
    "test.uint8": np.uint8(200),
    "test.float64": np.float64(1 / 3),
    "test.bools": [True, False, True],
    "test.numpy_array": np.array([1, 2, 3], dtype=np.uint16),
}

STORED_TYPES = {
    "general.name": [V.STRING],
    "llama.block_count": [V.UINT32],
    "llama.context_length": [V.UINT32],
    "llama.rope.freq_base": [V.FLOAT32],
    "llama.attention.layer_norm_rms_epsilon": [V.FLOAT32],
    "tokenizer.ggml.add_bos_token": [V.BOOL],
    "tokenizer.ggml.tokens": [V.ARRAY, V.STRING],
    "tokenizer.ggml.token_type": [V.ARRAY, V.INT32],
    "tokenizer.ggml.scores": [V.ARRAY, V.FLOAT32],
    "test.negative": [V.INT32],
    "test.big": [V.UINT64],
    "test.int64": [V.INT64],
    "test.uint8": [V.UINT8],
    "test.float64": [V.FLOAT64],
    "test.bools": [V.ARRAY, V.BOOL],
    "test.numpy_array": [V.ARRAY, V.UINT16],
}


def _roundtrip_tensors() -> dict[str, tuple[np.ndarray, Q]]:
    rng = np.random.default_rng(1)
    k_blocks = rng.integers(0, 256, size=(3, 2 * gguf.GGML_QUANT_SIZES[Q.Q6_K][1]), dtype=np.uint8)
    k_blocks[..., -2:] = 0  # Q6_K's trailing f16 scale: keep it finite
    return {
        "f32.vector": (rng.standard_normal(7).astype(np.float32), Q.F32),
        "f32.matrix": (rng.standard_normal((5, 3)).astype(np.float32), Q.F32),
        "f16.matrix": (rng.standard_normal((4, 8)), Q.F16),
        "bf16.matrix": (rng.standard_normal((2, 16)), Q.BF16),
        "q8_0.matrix": (rng.standard_normal((3, 64)), Q.Q8_0),
        "q4_0.3d": (rng.standard_normal((2, 3, 32)), Q.Q4_0),
        "q4_1.matrix": (rng.standard_normal((2, 32)), Q.Q4_1),
        "q5_0.matrix": (rng.standard_normal((2, 32)), Q.Q5_0),
        "q5_1.matrix": (rng.standard_normal((2, 32)), Q.Q5_1),
        "q6_k.raw_blocks": (k_blocks, Q.Q6_K),  # encoded bytes, shape (rows, row_bytes)
    }


def test_metadata_round_trip(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "meta.gguf", METADATA, {"x": (np.zeros(4, np.float32), Q.F32)})
    meta = GGUFFile(path).metadata
    assert meta["general.architecture"] == "llama"
    assert meta["general.name"] == METADATA["general.name"]
    assert meta["llama.block_count"] == 2
    assert meta["llama.context_length"] == 4096
    assert meta["llama.rope.freq_base"] == 500000.0
    assert meta["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6, rel=1e-6)  # float32
    assert meta["tokenizer.ggml.add_bos_token"] is True
    assert meta["tokenizer.ggml.tokens"] == ["<s>", "a", "b c", ""]
    assert meta["tokenizer.ggml.token_type"] == [3, 1, 1, 5]
    assert meta["tokenizer.ggml.scores"] == [0.0, -1.5, -2.25, 3.0]
    assert meta["test.negative"] == -7
    assert meta["test.big"] == 2**40
    assert meta["test.int64"] == -(2**40)
    assert meta["test.uint8"] == 200
    assert meta["test.float64"] == 1 / 3
    assert meta["test.bools"] == [True, False, True]
    assert meta["test.numpy_array"] == [1, 2, 3]


def test_metadata_is_stored_with_llama_cpp_types(tmp_path: Path) -> None:
    """llama.cpp checks each key's stored type: counts must be UINT32, token types an INT32 array."""
    path = write_gguf(tmp_path / "meta.gguf", METADATA, {"x": (np.zeros(4, np.float32), Q.F32)})
    fields = gguf.GGUFReader(path).fields
    for key, expected in STORED_TYPES.items():
        assert [V(t) for t in fields[key].types] == expected, key


def test_tensor_round_trip(tmp_path: Path) -> None:
    tensors = _roundtrip_tensors()
    path = write_gguf(tmp_path / "tensors.gguf", {"general.architecture": "llama"}, tensors)
    f = GGUFFile(path)
    assert list(f.tensors) == list(tensors)
    for name, (array, qtype) in tensors.items():
        info = f.tensor(name)
        assert info.qtype == qtype, name
        assert info.data.dtype == torch.uint8
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        if array.dtype == np.uint8:  # raw blocks: the logical row is row_bytes / type_size blocks long
            assert info.shape == (*array.shape[:-1], array.shape[-1] // type_size * block), name
            assert info.data.numpy().tobytes() == array.tobytes()
            continue
        assert info.shape == array.shape, name
        assert info.n_bytes == array.size // block * type_size, name
        expected = gguf.quants.quantize(array.astype(np.float32), qtype)
        assert info.data.numpy().tobytes() == np.ascontiguousarray(expected).tobytes(), name
        values = gguf.quants.dequantize(info.data.numpy(), qtype).reshape(array.shape)
        tolerance = {Q.F32: 0.0, Q.F16: 1e-3, Q.BF16: 1e-2, Q.Q8_0: 0.03}.get(qtype, 0.5)
        np.testing.assert_allclose(values, array, atol=tolerance * np.abs(array).max() + 1e-7, err_msg=name)


def test_custom_alignment_pads_the_data(tmp_path: Path) -> None:
    tensors = {name: (np.arange(n, dtype=np.float32), Q.F32) for name, n in [("a", 3), ("b", 5), ("c", 1)]}
    path = write_gguf(
        tmp_path / "aligned.gguf", {"general.architecture": "llama", "general.alignment": 64}, tensors
    )
    f = GGUFFile(path)
    assert f.metadata["general.alignment"] == 64
    for name, field in _tensor_fields(path).items():
        assert field["abs_data"] % 64 == 0, name
        np.testing.assert_array_equal(f.tensor(name).data.view(torch.float32).numpy(), tensors[name][0])


def test_tiny_model_round_trip(tmp_path: Path) -> None:
    path = make_tiny_model(tmp_path / "q.gguf", "qwen2", tied_output=False, weight_type=Q.Q4_0, n_vocab=300)
    f = GGUFFile(path)
    assert f.metadata["qwen2.block_count"] == 2
    assert f.metadata["qwen2.embedding_length"] == 64
    assert f.metadata["qwen2.attention.head_count_kv"] == 2
    assert len(f.metadata["tokenizer.ggml.tokens"]) == 300
    assert f.tensor("token_embd.weight").shape == (300, 64)
    assert f.tensor("output.weight").shape == (300, 64)
    assert f.tensor("blk.1.attn_k.weight").shape == (32, 64)
    assert f.tensor("blk.1.attn_k.weight").qtype == Q.Q4_0
    assert f.tensor("blk.1.attn_k.bias").shape == (32,)
    assert f.tensor("blk.1.attn_k.bias").qtype == Q.F32
    assert f.tensor("blk.0.ffn_down.weight").shape == (64, 128)


def test_write_gguf_rejects_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"general\.architecture"):
        write_gguf(tmp_path / "a.gguf", {}, {})
    with pytest.raises(ValueError, match="block"):
        write_gguf(tmp_path / "b.gguf", {"general.architecture": "llama"}, {"w": (np.zeros((2, 33)), Q.Q8_0)})
    with pytest.raises(ValueError, match="cannot quantize"):
        write_gguf(
            tmp_path / "c.gguf", {"general.architecture": "llama"}, {"w": (np.zeros((1, 256)), Q.Q4_K)}
        )
    with pytest.raises(ValueError, match="empty"):
        write_gguf(tmp_path / "d.gguf", {"general.architecture": "llama", "x": []}, {})


# ----------------------------------------------------------------------------------------------
# memory mapping


def _mapped_ranges(path: Path) -> list[tuple[int, int]]:
    """Address ranges where this process has `path` memory-mapped (Linux /proc/self/maps)."""
    ranges = []
    target = str(path.resolve())
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5] == target:
            start, end = (int(x, 16) for x in parts[0].split("-"))
            ranges.append((start, end))
    return ranges


def test_tensor_data_is_memory_mapped_not_copied(tiny: Path) -> None:
    f = GGUFFile(tiny)
    offsets = {name: field["abs_data"] for name, field in _tensor_fields(tiny).items()}
    first = min(offsets, key=offsets.__getitem__)
    base = f.tensor(first).data.data_ptr() - offsets[first]  # where the file's byte 0 would be
    for name, info in f.tensors.items():
        # one buffer laid out like the file: each tensor sits at its file offset from the same base
        assert info.data.data_ptr() - base == offsets[name], name
        assert info.data.is_contiguous()
        # and the tensor does not own a private copy of its bytes
        assert info.data.untyped_storage().nbytes() == info.n_bytes, name
    if not Path("/proc/self/maps").exists():
        pytest.skip("no /proc/self/maps to confirm the mapping")
    ranges = _mapped_ranges(tiny)
    assert ranges, "the file is not memory-mapped"
    for name, info in f.tensors.items():
        start, end = info.data.data_ptr(), info.data.data_ptr() + info.n_bytes
        assert any(lo <= start and end <= hi for lo, hi in ranges), name


def test_real_model_reads_like_gguf_reader(smollm2_path: Path) -> None:
    """Our header walk against the gguf package's own reader on the real SmolLM2 file."""
    reader = gguf.GGUFReader(smollm2_path)
    f = GGUFFile(smollm2_path)
    expected = {}
    for key, field in reader.fields.items():
        if not key.startswith("GGUF."):
            value = field.contents()
            expected[key] = value.item() if isinstance(value, np.generic) else value
    assert f.metadata == expected
    assert list(f.tensors) == [t.name for t in reader.tensors]
    for t in reader.tensors:
        info = f.tensors[t.name]
        assert info.qtype == t.tensor_type and info.shape == tuple(reversed(t.shape.tolist()))
        assert info.data.numpy().tobytes() == np.asarray(t.data).tobytes()


def _rss_file_kb() -> int:
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"RssFile:\s+(\d+)", status).group(1))  # type: ignore[union-attr]


def test_released_pages_leave_resident_memory_and_read_back_the_same_bytes(tmp_path: Path) -> None:
    """release_range drops the whole pages under a view of the file from resident memory (RssFile falls
    by about its size); the bytes read back are the file's; a tensor that is not a view of the file, or a
    range inside one page, is left alone."""
    path = make_tiny_model(tmp_path / "m.gguf", "llama", n_vocab=32768, n_layer=1, weight_type=Q.Q8_0)
    f = GGUFFile(path)
    data = f.tensor("token_embd.weight").data  # 32768 x 64 Q8_0: 2.2 MB
    before = data.clone()  # every page resident now
    resident = _rss_file_kb()
    f.release_range(data)
    assert resident - _rss_file_kb() >= 0.8 * data.numel() / 1024
    f.release_range(data[5:9])  # less than a page
    foreign = torch.arange(10, dtype=torch.uint8)
    f.release_range(foreign)
    assert torch.equal(data, before) and torch.equal(foreign, torch.arange(10, dtype=torch.uint8))
    f.release_pages()
    assert torch.equal(data, before)
