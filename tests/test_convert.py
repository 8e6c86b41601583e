"""`gguflm convert`: tiny random transformers checkpoints of each family, converted, then checked
against transformers (logits, tokenization), gguf-py's quantizers (--outtype), and, where its source
is at hand, llama.cpp's own converter (key by key, tensor by tensor)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from hf_checkpoints import FAMILIES, make_checkpoint, make_tokenizer
from transformers import AutoTokenizer

from gguflm import Batch, Context, Model, convert_vocab
from gguflm.cli import main
from gguflm.convert import ConvertError, convert
from gguflm.convert_vocab import detect_pre_tokenizer
from gguflm.gguf_file import GGUFFile
from gguflm.tokenizer import Tokenizer

T = gguf.GGMLQuantizationType
LLAMA_CPP = Path("/tmp/lsrv/llama_cpp_python-0.3.36/vendor/llama.cpp")
N_TOKENS = 24  # past the Gemma 3 model's window of 8

TEXTS = [
    "Hello world",
    "The capital of France is Paris. The capital of Germany is Berlin!",
    " leading space, double  spaces and a trailing one ",
    "numbers 3 33 333 3333 3.14159 and 2024-11-30",
    "line one\nline two\n\n\tindented\r\nwindows",
    "café naïve résumé — 日本語 русский 🦙",
    "We're sure they've done it; I'm told he'll say it's good, and you'd agree.",
    "def f(x):\n    return x ** 2  # square",
    "",
]
CHAT_TEXTS = ["<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"]


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return float((ours - theirs).abs().max() / (theirs.max() - theirs.min()))


def all_logits(path: Path, tokens: list[int], mode: str = "reference") -> torch.Tensor:
    model = Model.load(path, mode=mode)
    ctx = Context(model, n_ctx=64)
    assert ctx.decode(Batch.from_tokens(tokens, output=[True] * len(tokens))) == 0
    return ctx.all_logits().clone()


def hf_all_logits(model: torch.nn.Module, tokens: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=torch.tensor([tokens])).logits[0].float()


def random_tokens(n_vocab: int, seed: int = 0) -> list[int]:
    return torch.randint(0, n_vocab, (N_TOKENS,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def converted(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, Path, Path, torch.nn.Module]:
    """(family, HF dir, converted f32 GGUF, the HF model) per family."""
    family = request.param
    root = tmp_path_factory.mktemp(family)
    hf_dir, hf_model = make_checkpoint(family, root / "model", seed=1)
    out = convert(hf_dir, root / f"{family}-f32.gguf", "f32").path
    return family, hf_dir, out, hf_model


def test_converted_model_logits_match_transformers(
    converted: tuple[str, Path, Path, torch.nn.Module],
) -> None:
    _, _, path, hf_model = converted
    tokens = random_tokens(hf_model.config.vocab_size)
    assert relative_error(all_logits(path, tokens), hf_all_logits(hf_model, tokens)) < 1e-4


def test_converted_tokenizer_matches_transformers(converted: tuple[str, Path, Path, torch.nn.Module]) -> None:
    family, hf_dir, path, _ = converted
    ours = Tokenizer.from_metadata(GGUFFile(path).metadata, str(path))
    theirs = AutoTokenizer.from_pretrained(hf_dir)
    texts = TEXTS + (CHAT_TEXTS if "<|im_start|>" in theirs.get_vocab() else [])
    spm_file = hf_dir / "tokenizer.model"
    for text in texts:
        expected = theirs(text)["input_ids"]
        if spm_file.is_file() and text.startswith(" ") and ours.add_space_prefix:
            # transformers 5's Llama tokenizer drops the dummy-prefix space before a leading space;
            # SentencePiece itself (the checkpoint's tokenizer.model) keeps it, as llama.cpp does
            import sentencepiece

            original = [
                ours.bos_id,
                *sentencepiece.SentencePieceProcessor(model_file=str(spm_file)).encode(text),
            ]
            assert expected != original, "transformers now agrees with SentencePiece: drop this branch"
            expected = original
        assert ours.encode(text, add_special=True, parse_special=True) == expected, (family, text)


def test_tensor_layout_follows_llama_cpp_rules(converted: tuple[str, Path, Path, torch.nn.Module]) -> None:
    """Names from gguf-py's table for the architecture; norms and biases F32; tied output absent."""
    family, _, path, hf_model = converted
    file = GGUFFile(path)
    arch = file.require("general.architecture")
    names = set(file.tensors)
    allowed = {
        gguf.TENSOR_NAMES[kind].format(bid=i) + suffix
        for kind in gguf.MODEL_TENSORS[next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch)]
        for i in range(hf_model.config.num_hidden_layers)
        for suffix in (".weight", ".bias")
    }
    assert names <= allowed
    assert ("output.weight" in names) == (not hf_model.config.tie_word_embeddings)
    if family == "phi3":
        assert {
            "blk.0.attn_qkv.weight",
            "blk.0.ffn_up.weight",
        } <= names and "blk.0.ffn_gate.weight" not in names


def test_outtypes_store_what_gguf_py_quantizes(tmp_path: Path) -> None:
    """A bf16 checkpoint: auto -> BF16 (its exact bits), f16, q8_0 (F16 where rows of 200 do not hold
    blocks of 32), each matrix equal to gguf-py's quantization of the f32 conversion's values."""
    hf_dir, hf_model = make_checkpoint(
        "llama", tmp_path / "model", dtype=torch.bfloat16, tokenizer="bpe-llama3", intermediate_size=200
    )
    reference = gguf.GGUFReader(convert(hf_dir, tmp_path / "f32.gguf", "f32").path)
    f32 = {t.name: np.asarray(t.data).reshape(tuple(reversed(t.shape.tolist()))) for t in reference.tensors}
    tokens = random_tokens(hf_model.config.vocab_size)
    expected_logits = hf_all_logits(hf_model, tokens)
    for outtype, matrix_type in (("auto", T.BF16), ("f16", T.F16), ("q8_0", T.Q8_0)):
        result = convert(hf_dir, tmp_path / f"{outtype}.gguf", outtype)
        reader = gguf.GGUFReader(result.path)
        file_type = {T.BF16: gguf.LlamaFileType.MOSTLY_BF16, T.F16: gguf.LlamaFileType.MOSTLY_F16}
        assert reader.fields["general.file_type"].contents() == file_type.get(
            matrix_type, gguf.LlamaFileType.MOSTLY_Q8_0
        )
        for t in reader.tensors:
            values = f32[t.name]
            if values.ndim == 1:
                want = T.F32
            elif matrix_type == T.Q8_0 and values.shape[-1] % 32:
                want = T.F16
            else:
                want = matrix_type
            assert t.tensor_type == want, (outtype, t.name)
            assert np.array_equal(
                np.asarray(t.data).view(np.uint8).ravel(),
                gguf.quants.quantize(values, want).view(np.uint8).ravel(),
            ), t.name
        if matrix_type == T.BF16:  # bf16 -> f32 -> bf16 is lossless
            embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
            stored = torch.from_numpy(np.asarray(embd.data).view(np.int16).copy()).view(torch.bfloat16)
            hf_embd = hf_model.model.embed_tokens.weight.to(torch.bfloat16).flatten()
            assert torch.equal(stored.flatten(), hf_embd)
        # bf16 values are exact in BF16 and F16 (7 mantissa bits, small exponents); Q8_0 rounds
        bound = 3e-2 if matrix_type == T.Q8_0 else 1e-4
        assert relative_error(all_logits(result.path, tokens), expected_logits) < bound, outtype


def test_sharded_checkpoint_converts_like_one_file(tmp_path: Path) -> None:
    """model-0000k-of-0000n.safetensors with their index: the same tensors as from one file."""
    hf_dir, hf_model = make_checkpoint("qwen2", tmp_path / "one", seed=3)
    sharded = tmp_path / "sharded"
    hf_model.save_pretrained(sharded, max_shard_size="100KB")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (hf_dir / name).is_file():
            (sharded / name).write_bytes((hf_dir / name).read_bytes())
    assert (
        len(list(sharded.glob("*.safetensors"))) > 2 and (sharded / "model.safetensors.index.json").is_file()
    )
    one = gguf.GGUFReader(convert(hf_dir, tmp_path / "one.gguf", "f32").path)
    many = gguf.GGUFReader(convert(sharded, tmp_path / "many.gguf", "f32").path)
    assert {t.name: bytes(np.asarray(t.data).view(np.uint8)) for t in one.tensors} == {
        t.name: bytes(np.asarray(t.data).view(np.uint8)) for t in many.tensors
    }


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 16, "rope_theta": 10000.0},
        {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0},
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "rope_theta": 10000.0},
    ],
    ids=["llama3", "linear", "yarn"],
)  # fmt: skip
def test_rope_scaling_matches_transformers(tmp_path: Path, rope: dict[str, float | str]) -> None:
    """Rope scaling keys (and Llama 3.1's rope_freqs tensor) mean what transformers computes."""
    hf_dir, hf_model = make_checkpoint(
        "llama", tmp_path / "model", tokenizer="bpe-llama3", rope_parameters=rope
    )
    path = convert(hf_dir, tmp_path / "rope.gguf", "f32").path
    tokens = random_tokens(hf_model.config.vocab_size, seed=2)
    assert relative_error(all_logits(path, tokens), hf_all_logits(hf_model, tokens)) < 1e-4


def test_an_older_config_gets_the_keys_transformers_defaults_imply(tmp_path: Path) -> None:
    """config.json without head_dim and rope_theta (as SmolLM2's): key_length and rope.freq_base are
    written with the values transformers' AutoConfig fills in, as llama.cpp's converter reads them."""
    from transformers import AutoConfig

    hf_dir, hf_model = make_checkpoint("llama", tmp_path / "model", tokenizer="bpe-qwen2")
    config = json.loads((hf_dir / "config.json").read_text())
    for key in ("head_dim", "rope_theta", "rope_parameters", "rope_scaling"):
        config.pop(key, None)
    (hf_dir / "config.json").write_text(json.dumps(config))
    filled = AutoConfig.from_pretrained(hf_dir)
    file = GGUFFile(convert(hf_dir, tmp_path / "old.gguf", "f32").path)
    assert file.get("llama.attention.key_length") == filled.head_dim == 16
    assert file.get("llama.rope.freq_base") == filled.rope_parameters["rope_theta"]
    tokens = random_tokens(hf_model.config.vocab_size)
    assert relative_error(all_logits(file.path, tokens), hf_all_logits(hf_model, tokens)) < 1e-4


@pytest.mark.parametrize(
    ("kind", "config", "expected"),
    [
        ("bpe-llama3", {}, "llama-bpe"),
        ("bpe-qwen2", {"clean_up_tokenization_spaces": False}, "qwen2"),
        ("smollm2", {"clean_up_tokenization_spaces": False}, "smollm"),
        ("smollm2", {"clean_up_tokenization_spaces": True}, "starcoder"),  # same split, spaces cleaned
    ],
)
def test_pre_tokenizer_found_by_split_without_the_hash_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str, config: dict[str, bool], expected: str
) -> None:
    """A vocabulary llama.cpp's hash table does not know: the llama.cpp split that cuts the check
    text as tokenizer.json does, tie-broken by the detokenizer's space clean-up."""
    backend = make_tokenizer(kind, tmp_path).backend_tokenizer
    if kind == "smollm2":  # in the table: llama.cpp's own name, then hide the table
        assert detect_pre_tokenizer(backend, json.loads(backend.to_str()), config) == "smollm"
        monkeypatch.setattr(convert_vocab, "KNOWN_PRE_TOKENIZER_HASHES", {})
    assert detect_pre_tokenizer(backend, json.loads(backend.to_str()), config) == expected


def test_unknown_pre_tokenizer_is_refused(tmp_path: Path) -> None:
    from tokenizers import pre_tokenizers

    backend = make_tokenizer("bpe-qwen2", tmp_path).backend_tokenizer
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    with pytest.raises(ConvertError, match="BPE pre-tokenizer not recognized"):
        detect_pre_tokenizer(backend, json.loads(backend.to_str()), {})


# ---- the command line and bad input ----------------------------------------------------------


def test_cli_converts_and_reports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    hf_dir, _ = make_checkpoint("qwen3", tmp_path / "model", tokenizer="bpe-qwen2")
    out = tmp_path / "out.gguf"
    assert main(["convert", str(hf_dir), str(out), "--outtype", "q8_0"]) == 0
    assert out.is_file() and not (tmp_path / "out.gguf.part").exists()
    assert "qwen3" in capsys.readouterr().err
    assert Model.load(out, mode="reference").n_vocab == 384


def _config_only(tmp_path: Path, config: dict[str, object]) -> Path:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    return tmp_path / "m"


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda p: p / "absent", "not a directory"),
        (lambda p: (p / "m").mkdir() or p / "m", "no config.json"),
        (
            lambda p: _config_only(p, {"architectures": ["BertForMaskedLM"]}),
            "'BertForMaskedLM' is not supported",
        ),
        (lambda p: _config_only(p, {"model_type": "llama"}), "no 'architectures'"),
        (lambda p: _config_only(p, {"architectures": ["LlamaForCausalLM"]}), "missing num_hidden_layers"),
    ],
    ids=["no-dir", "no-config", "unknown-arch", "no-architectures", "incomplete-config"],
)
def test_bad_directory_is_one_clear_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], setup, message: str
) -> None:  # type: ignore[no-untyped-def]
    directory = setup(tmp_path)
    assert main(["convert", str(directory), str(tmp_path / "x.gguf")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "x.gguf").exists()


def test_missing_files_and_unmappable_tensor_are_errors(tmp_path: Path) -> None:
    hf_dir, _ = make_checkpoint("qwen2", tmp_path / "model")
    (hf_dir / "tokenizer.json").rename(tmp_path / "tokenizer.json")
    with pytest.raises(ConvertError, match=r"no tokenizer\.json or tokenizer\.model"):
        convert(hf_dir, tmp_path / "x.gguf")
    (tmp_path / "tokenizer.json").rename(hf_dir / "tokenizer.json")
    (hf_dir / "model.safetensors").rename(tmp_path / "weights.safetensors")
    with pytest.raises(ConvertError, match=r"no \*\.safetensors"):
        convert(hf_dir, tmp_path / "x.gguf")
    from safetensors.torch import save_file

    save_file({"model.layers.0.unknown_thing.weight": torch.zeros(2, 2)}, str(hf_dir / "model.safetensors"))
    with pytest.raises(
        ConvertError, match=re.escape("cannot map tensor 'model.layers.0.unknown_thing.weight'")
    ):
        convert(hf_dir, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists() and not (tmp_path / "x.gguf.part").exists()


# ---- llama.cpp's converter on the same directories (optional) ---------------------------------

# Families whose tokenizer llama.cpp's converter recognizes: its hash table knows SmolLM2's
# vocabulary, and SentencePiece needs no hash. (Our trained BPE vocabularies are unknown to it. For a
# qwen2 directory transformers' AutoTokenizer also swaps in Qwen 2's own split, whatever
# tokenizer.json says, so llama.cpp hashes another tokenization there.)
LLAMA_CPP_CASES = {
    "llama": {},
    "mistral": {},
    "qwen3": {"tokenizer": "smollm2"},
    "gemma3": {},
    "phi3": {},
}
_DRIVER = """
import sys
sys.argv = [sys.argv[0]]
sys.path.insert(0, {root!r})
import convert_hf_to_gguf
for args in {jobs!r}:
    sys.argv = ["convert_hf_to_gguf.py", *args]
    convert_hf_to_gguf.main()
"""


def _llama_cpp_available() -> str | None:
    if not (LLAMA_CPP / "convert_hf_to_gguf.py").is_file():
        return f"llama.cpp's converter is not at {LLAMA_CPP}"
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            f"import sys; sys.path.insert(0, {str(LLAMA_CPP)!r}); import convert_hf_to_gguf",
        ],
        capture_output=True,
        text=True,
    )
    if probe.returncode:
        return f"llama.cpp's converter does not import here: {probe.stderr.strip().splitlines()[-1:]}"
    return None


def gguf_contents(path: Path) -> tuple[dict[str, tuple[object, list[int]]], dict[str, tuple[str, bytes]]]:
    """(key -> (value, GGUF value types), tensor name -> (type, shape and bytes))."""
    reader = gguf.GGUFReader(path)
    keys = {
        k: (f.contents(), [int(t) for t in f.types])
        for k, f in reader.fields.items()
        if not k.startswith("GGUF.")
    }
    tensors = {
        t.name: (
            t.tensor_type.name,
            str(t.shape.tolist()).encode() + bytes(np.asarray(t.data).view(np.uint8)),
        )
        for t in reader.tensors
    }
    return keys, tensors


@pytest.mark.slow  # about 70 s on 2 busy cores: llama.cpp's converter imports transformers, 6 runs
def test_same_file_as_llama_cpp_converter(tmp_path: Path) -> None:
    reason = _llama_cpp_available()
    if reason:
        pytest.skip(reason)
    jobs, ours = [], {}
    for family, options in LLAMA_CPP_CASES.items():
        hf_dir, _ = make_checkpoint(family, tmp_path / family / "model", seed=4, **options)
        outtypes = ("f32", "q8_0") if family == "llama" else ("f32",)
        for outtype in outtypes:
            ours[family, outtype] = convert(hf_dir, tmp_path / f"{family}-{outtype}.gguf", outtype).path
            jobs.append(
                [
                    str(hf_dir),
                    "--outfile",
                    str(tmp_path / f"{family}-{outtype}.lcpp.gguf"),
                    "--outtype",
                    outtype,
                ]
            )
    driver = _DRIVER.format(root=str(LLAMA_CPP), jobs=jobs)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    run = subprocess.run(
        [sys.executable, "-c", driver], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert run.returncode == 0, run.stderr[-3000:]
    for (family, outtype), path in ours.items():
        our_keys, our_tensors = gguf_contents(path)
        their_keys, their_tensors = gguf_contents(path.with_suffix(".lcpp.gguf"))
        # every key, value and value type the same (general.* included: both use gguf-py's Metadata)
        differing = sorted(
            k for k in our_keys.keys() | their_keys.keys() if our_keys.get(k) != their_keys.get(k)
        )
        assert not differing, (family, outtype, differing)
        assert our_tensors.keys() == their_tensors.keys(), family
        for name, ours_t in our_tensors.items():
            assert ours_t == their_tensors[name], (family, outtype, name)


LLAMA_CPP_PYTHON = Path("/tmp/lcpvenv/bin/python")  # llama-cpp-python, a native build of libllama
_RUNNER = """
import json, sys
import numpy as np
import llama_cpp
for path, tokens in json.loads(sys.argv[1]):
    llm = llama_cpp.Llama(model_path=path, n_ctx=64, logits_all=True, verbose=False, n_threads=2)
    llm.eval(tokens)
    np.save(path + ".logits.npy", np.asarray(llm.scores[: len(tokens)], dtype=np.float32))
"""


@pytest.mark.slow  # about 20 s: six checkpoints, one llama.cpp process
def test_llama_cpp_runs_converted_files(tmp_path: Path) -> None:
    """llama.cpp loads every family's converted file and its logits match transformers' (its KV
    cache is F16, hence the looser bound than gguflm's fp32 reference mode)."""
    if not LLAMA_CPP_PYTHON.is_file():
        pytest.skip(f"no llama-cpp-python at {LLAMA_CPP_PYTHON}")
    jobs, expected = [], {}
    for family in sorted(FAMILIES):
        hf_dir, hf_model = make_checkpoint(family, tmp_path / family / "model", seed=5)
        path = convert(hf_dir, tmp_path / f"{family}.gguf", "f32").path
        tokens = random_tokens(hf_model.config.vocab_size, seed=6)
        jobs.append([str(path), tokens])
        expected[str(path)] = hf_all_logits(hf_model, tokens)
    run = subprocess.run(
        [str(LLAMA_CPP_PYTHON), "-c", _RUNNER, json.dumps(jobs)], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-3000:]
    for path, theirs in expected.items():
        ours = torch.from_numpy(np.load(path + ".logits.npy"))
        assert relative_error(ours, theirs) < 2e-3, path
        assert torch.equal(ours.argmax(-1), theirs.argmax(-1)), path
