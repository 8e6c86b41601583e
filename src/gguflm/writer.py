"""Writing GGUF files, mainly small random models for tests.

Built on `gguf.GGUFWriter`; this module adds the value typing llama.cpp expects (its loader checks
the stored type of each key, so an `int` must land as UINT32, not gguf-py's default INT32), numpy
quantization of tensors, and `make_tiny_model`: a complete random llama, qwen2, qwen3, gemma2,
gemma3 or phi3 file, laid out as llama.cpp's converter writes that family, with a real byte-level
BPE tokenizer that both this project and Hugging Face transformers can load.
"""

from __future__ import annotations

import fnmatch
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any, Literal

import gguf
import numpy as np
import regex
from gguf import GGMLQuantizationType, GGUFValueType

__all__ = [
    "SPECIAL_TOKENS",
    "byte_to_unicode",
    "make_tiny_model",
    "make_tokenizer_metadata",
    "write_gguf",
]

# Scalar keys llama.cpp declares as int32; every other integer key it reads is uint32.
_INT32_KEYS = frozenset(
    {"general.sampling.top_k", "general.sampling.penalty_last_n", "general.sampling.mirostat"}
)

_NUMPY_VALUE_TYPES: dict[np.dtype[Any], GGUFValueType] = {
    np.dtype(np.uint8): GGUFValueType.UINT8,
    np.dtype(np.int8): GGUFValueType.INT8,
    np.dtype(np.uint16): GGUFValueType.UINT16,
    np.dtype(np.int16): GGUFValueType.INT16,
    np.dtype(np.uint32): GGUFValueType.UINT32,
    np.dtype(np.int32): GGUFValueType.INT32,
    np.dtype(np.uint64): GGUFValueType.UINT64,
    np.dtype(np.int64): GGUFValueType.INT64,
    np.dtype(np.float32): GGUFValueType.FLOAT32,
    np.dtype(np.float64): GGUFValueType.FLOAT64,
    np.dtype(np.bool_): GGUFValueType.BOOL,
}


def _scalar_type(key: str, value: Any) -> GGUFValueType:
    """The GGUF type for one Python/numpy scalar; numpy scalars keep their exact width."""
    if isinstance(value, np.generic):
        if value.dtype not in _NUMPY_VALUE_TYPES:
            raise ValueError(f"metadata {key!r}: numpy type {value.dtype} has no GGUF value type")
        return _NUMPY_VALUE_TYPES[value.dtype]
    if isinstance(value, str):
        return GGUFValueType.STRING
    if isinstance(value, bool):  # before int: bool is an int subclass
        return GGUFValueType.BOOL
    if isinstance(value, int):
        if key in _INT32_KEYS or -(2**31) <= value < 0:
            return GGUFValueType.INT32
        if 0 <= value < 2**32:
            return GGUFValueType.UINT32
        return GGUFValueType.UINT64 if value > 0 else GGUFValueType.INT64
    if isinstance(value, float):
        return GGUFValueType.FLOAT32
    raise ValueError(f"metadata {key!r}: cannot store a {type(value).__name__} in GGUF")


def _array_type(key: str, values: Sequence[Any]) -> GGUFValueType:
    """Element type of a list: str, bool, float32, or int32 (llama.cpp's type for token_type and such)."""
    if isinstance(values, np.ndarray):
        if values.dtype not in _NUMPY_VALUE_TYPES:
            raise ValueError(f"metadata {key!r}: numpy array type {values.dtype} has no GGUF value type")
        return _NUMPY_VALUE_TYPES[values.dtype]
    kinds = {type(v) for v in values}
    if kinds == {str}:
        return GGUFValueType.STRING
    if kinds == {bool}:
        return GGUFValueType.BOOL
    if kinds == {int}:
        return GGUFValueType.INT32
    if kinds <= {int, float}:
        return GGUFValueType.FLOAT32
    names = sorted(k.__name__ for k in kinds)
    raise ValueError(f"metadata {key!r}: a GGUF array holds one type of str/int/float/bool, got {names}")


def _add_metadata(writer: gguf.GGUFWriter, key: str, value: Any) -> None:
    if isinstance(value, (list, tuple, np.ndarray)):
        if len(value) == 0:
            raise ValueError(f"metadata {key!r}: gguf-py cannot write an empty array")
        sub_type = _array_type(key, value)
        items = value.tolist() if isinstance(value, np.ndarray) else list(value)
        writer.add_key_value(key, items, GGUFValueType.ARRAY, sub_type=sub_type)
    else:
        vtype = _scalar_type(key, value)
        writer.add_key_value(key, value.item() if isinstance(value, np.generic) else value, vtype)


def _tensor_payload(
    name: str, array: np.ndarray, qtype: GGMLQuantizationType
) -> tuple[np.ndarray, GGMLQuantizationType | None]:
    """Bytes or floats to hand to GGUFWriter.add_tensor, and the raw_dtype it needs with them.

    A uint8 array is taken as already-encoded blocks (shape (..., row_bytes)): the way in for types
    gguf-py cannot quantize, such as the K-quants.
    """
    qtype = GGMLQuantizationType(qtype)
    if array.dtype == np.uint8:
        return np.ascontiguousarray(array), qtype
    data = np.ascontiguousarray(array, dtype=np.float32)
    if qtype == GGMLQuantizationType.F32:
        return data, None
    if qtype == GGMLQuantizationType.F16:
        return data.astype(np.float16), None
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    if data.ndim == 0 or data.shape[-1] % block:
        raise ValueError(
            f"tensor {name!r}: shape {data.shape} has rows not a multiple of {qtype.name}'s block {block}"
        )
    try:
        encoded = gguf.quants.quantize(data, qtype)
    except NotImplementedError as e:
        raise ValueError(
            f"tensor {name!r}: gguf-py cannot quantize to {qtype.name}; pass encoded uint8 blocks"
        ) from e
    return encoded, qtype


def write_gguf(
    path: str | os.PathLike[str],
    metadata: dict[str, Any],
    tensors: dict[str, tuple[np.ndarray, GGMLQuantizationType]],
) -> Path:
    """Write a GGUF v3 file; `metadata` must hold `general.architecture`.

    Tensors are numpy arrays in torch order (last dim contiguous); float arrays are quantized to the
    given type, uint8 arrays are written as encoded blocks. Values are typed as llama.cpp reads them:
    int -> UINT32 (INT32 when negative or for its few int32 keys), float -> FLOAT32, lists of int ->
    INT32, lists of float -> FLOAT32; numpy scalars and arrays keep their own type.
    """
    path = Path(path)
    if "general.architecture" not in metadata:
        raise ValueError("metadata needs 'general.architecture' (GGUFWriter writes it from the arch)")
    writer = gguf.GGUFWriter(path, str(metadata["general.architecture"]))
    for key, value in metadata.items():
        if key == "general.alignment":  # also pads the data with it, not just records it
            writer.add_custom_alignment(int(value))
        elif key != "general.architecture":
            _add_metadata(writer, key, value)
    for name, (array, qtype) in tensors.items():
        payload, raw_dtype = _tensor_payload(name, np.asarray(array), qtype)
        writer.add_tensor(name, payload, raw_shape=payload.shape, raw_dtype=raw_dtype)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return path


# ---------------------------------------------------------------------------------------------
# A small byte-level BPE tokenizer (GPT-2 style), learned from a fixed text so that it is real:
# merges are consistent, each merge result is a token, and text tokenizes to more than bytes.

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

_CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] "
    "+ '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# The split merges are learned within: GPT-2's, with each digit on its own (as SmolLM2 and Qwen2
# do). No merge then involves a digit, so llama.cpp's "smollm" split and the plain GPT-2 split that
# transformers uses for it give the same tokens.
_TRAIN_SPLIT = regex.compile(r"""\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")

_BPE_CORPUS = """\
The capital of France is Paris. The capital of Germany is Berlin, and the capital of Italy is Rome.
Once upon a time, there was a little girl who loved to read books about the sea and the stars.
She would sit by the window in the evening and think about the people who lived in other places.
Hello world! This is a small test of the tokenizer, with some words that come back again and again:
the model, the models, the tokenizer, the tokens, the merges, the vocabulary, the text, the test.
def fibonacci(n):
    if n < 2:
        return n
    return fibonacci(n - 1) + fibonacci(n - 2)
print("hello, world")  # 12345 67890
What is the answer? It is 42. How many are there? There are 1000 of them, or maybe 2024.
We're going to see what they've done; I'm sure you'll like it, and they'd say it's good.
Numbers like 3.14159 and 2.71828 appear in mathematics, science, and engineering every day.
A quick brown fox jumps over the lazy dog while another fox watches from behind a tree.
In the beginning there was nothing, and then there was something, and then there was everything.
café naïve résumé — unicode text, 日本語, русский текст, and emoji 🦙 too.
"""


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table: printable Latin-1 bytes stand for themselves,
    the rest are moved to code points from 256 up, so every byte is one visible vocab character."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in kept}
    shift = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shift)
            shift += 1
    return table


def _learn_merges(n_merges: int) -> list[tuple[str, str]]:
    """Greedy BPE training on `_BPE_CORPUS`: repeatedly merge the most frequent adjacent pair."""
    spell = byte_to_unicode()
    words = Counter(
        tuple(spell[b] for b in piece.encode("utf-8")) for piece in _TRAIN_SPLIT.findall(_BPE_CORPUS)
    )
    merges: list[tuple[str, str]] = []
    while len(merges) < n_merges:
        pairs: Counter[tuple[str, str]] = Counter()
        for word, count in words.items():
            for pair in pairwise(word):
                pairs[pair] += count
        if not pairs:
            break
        # most frequent first; ties broken by the pair itself so the result is deterministic
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        joined = best[0] + best[1]
        new_words: Counter[tuple[str, str]] = Counter()
        for word, count in words.items():
            out: list[str] = []
            i = 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(joined)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            new_words[tuple(out)] += count
        words = new_words
    return merges


def make_tokenizer_metadata(
    n_vocab: int, pre: str = "smollm", *, bos_id: int = 1, eos_id: int = 2
) -> dict[str, Any]:
    """`tokenizer.*` metadata for a gpt2-style BPE vocabulary of exactly `n_vocab` tokens.

    Layout: ids 0..2 are SPECIAL_TOKENS (CONTROL), then the 256 byte symbols in byte order (byte b
    is id 3 + b), then merge results in merge order; if the corpus runs out of merges the rest is
    `<|reserved_N|>` tokens of type UNUSED.
    """
    n_fixed = len(SPECIAL_TOKENS) + 256
    if n_vocab <= n_fixed:  # llama.cpp refuses a BPE vocabulary without merges
        raise ValueError(
            f"n_vocab {n_vocab} must exceed {n_fixed} (specials + 256 byte tokens) to hold a merge"
        )
    spell = byte_to_unicode()
    tokens = [*SPECIAL_TOKENS, *(spell[b] for b in range(256))]
    types = [int(gguf.TokenType.CONTROL)] * len(SPECIAL_TOKENS) + [int(gguf.TokenType.NORMAL)] * 256
    known = set(tokens)
    merges: list[str] = []
    # Learn more merges than needed: a merge whose result already exists adds no token.
    for left, right in _learn_merges(4 * (n_vocab - n_fixed) + 16):
        if len(tokens) >= n_vocab:
            break
        merges.append(f"{left} {right}")
        if left + right not in known:
            known.add(left + right)
            tokens.append(left + right)
            types.append(int(gguf.TokenType.NORMAL))
    while len(tokens) < n_vocab:
        tokens.append(f"<|reserved_{len(tokens)}|>")
        types.append(int(gguf.TokenType.UNUSED))
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.bos_token_id": bos_id,
        "tokenizer.ggml.eos_token_id": eos_id,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.padding_token_id": eos_id,
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.ggml.add_space_prefix": False,
        "tokenizer.chat_template": _CHATML_TEMPLATE,
    }


# ---------------------------------------------------------------------------------------------


def _file_type(qtype: GGMLQuantizationType) -> int:
    """llama.cpp's `general.file_type` for a file whose matrices are mostly `qtype`."""
    if qtype == GGMLQuantizationType.F32:
        return int(gguf.LlamaFileType.ALL_F32)
    member = getattr(gguf.LlamaFileType, f"MOSTLY_{qtype.name}", None)
    return int(member) if member is not None else int(gguf.LlamaFileType.GUESSED)


TinyArch = Literal["llama", "qwen2", "qwen3", "gemma2", "gemma3", "phi3"]


@dataclass(frozen=True)
class _Family:
    """How one architecture's tiny model differs from the llama block, in llama.cpp's terms.

    The tensor flags name what llama.cpp's converter writes for the family; the rest are the
    defaults `make_tiny_model` uses when its caller does not say (hyperparameters and the extra
    `{arch}.*` metadata keys the family's loader in llama.cpp reads).
    """

    qkv_bias: bool = False  # attn_q/k/v.bias (qwen2)
    qk_norm: bool = False  # attn_q_norm/attn_k_norm, head_dim each, applied per head before RoPE
    post_norms: bool = False  # post_attention_norm and post_ffw_norm around the two sublayers (gemma)
    fused: bool = False  # attn_qkv = [q; k; v] rows, ffn_up = [gate; up] rows, no ffn_gate (phi3)
    has_output: bool = True  # False: llama.cpp always ties output to token_embd (gemma2)
    tied_output: bool = True
    n_layer: int = 2
    head_dim: int | None = None  # None: n_embd // n_head
    key_length: bool = False  # write {arch}.attention.key_length / value_length even when implied
    rope_freq_base: float = 10000.0
    rms_norm_eps: float = 1e-5
    sliding_window: int | None = None  # written as {arch}.attention.sliding_window
    extra: tuple[tuple[str, Any], ...] = ()  # further {arch}.* keys
    tokenizer: tuple[str, int, int] = ("smollm", 1, 2)  # tokenizer.ggml.pre, BOS id, EOS id


_FAMILIES: dict[str, _Family] = {
    # SmolLM2's tokenizer layout: BOS <|im_start|>, EOS <|im_end|>
    "llama": _Family(),
    # Qwen2's: BOS <|endoftext|>, EOS <|im_end|>
    "qwen2": _Family(qkv_bias=True, tokenizer=("qwen2", 0, 2)),
    "qwen3": _Family(qk_norm=True, key_length=True, tokenizer=("qwen2", 0, 2)),
    # Gemma 2: even layers local (llama.cpp's swa pattern 2), both logit softcaps. Its real models
    # have head_dim 256 != n_embd / n_head; the tiny one differs too (4 x 32 = 128 != 64).
    "gemma2": _Family(
        post_norms=True,
        has_output=False,
        head_dim=32,
        key_length=True,
        rms_norm_eps=1e-6,
        sliding_window=8,
        extra=(("attn_logit_softcapping", 50.0), ("final_logit_softcapping", 30.0)),
    ),
    # Gemma 3: layers 0-4 of each 6 local with RoPE base 10000, the 6th global with rope.freq_base.
    "gemma3": _Family(
        qk_norm=True,
        post_norms=True,
        n_layer=6,
        head_dim=32,
        key_length=True,
        rope_freq_base=1e6,
        rms_norm_eps=1e-6,
        sliding_window=8,
    ),
    "phi3": _Family(fused=True, tied_output=False),
}


def _pattern_matches(pattern: str, name: str) -> bool:
    """Whether a `tensor_types` pattern names tensor `name`.

    A pattern is an fnmatch glob matched against the name without `.weight`/`.bias` and against its
    per-layer part: "attn_v" matches every `blk.N.attn_v.weight`, "blk.0.attn_v" only layer 0's,
    "blk.[02].ffn_*" the FFN matrices of layers 0 and 2, "token_embd" the embedding.
    """
    stem = name.rsplit(".", 1)[0]
    leaf = stem.split(".", 2)[2] if stem.startswith("blk.") else stem
    return fnmatch.fnmatchcase(stem, pattern) or fnmatch.fnmatchcase(leaf, pattern)


def make_tiny_model(
    path: str | os.PathLike[str],
    arch: TinyArch = "llama",
    *,
    n_vocab: int = 384,
    n_embd: int = 64,
    n_layer: int | None = None,
    n_head: int = 4,
    n_head_kv: int = 2,
    n_ff: int = 128,
    head_dim: int | None = None,
    tied_output: bool | None = None,
    weight_type: GGMLQuantizationType = GGMLQuantizationType.F32,
    embedding_type: GGMLQuantizationType | None = None,
    tensor_types: dict[str, GGMLQuantizationType] | None = None,
    seed: int = 0,
    rope_freq_base: float | None = None,
    context_length: int = 256,
    rms_norm_eps: float | None = None,
    sliding_window: int | None = None,
    extra_metadata: dict[str, Any] | None = None,
) -> Path:
    """Write a random model of `arch` laid out as llama.cpp's converter would, and return its path.

    Families (tensor names per layer `blk.N.`, as llama.cpp's convert_hf_to_gguf.py writes them):
    - llama: attn_norm, attn_q/k/v, attn_output, ffn_norm, ffn_gate/up/down; normal (GPT-J) RoPE.
    - qwen2: llama + attn_q/k/v.bias; NEOX RoPE.
    - qwen3: llama + attn_q_norm/attn_k_norm (head_dim each); NEOX RoPE; key/value_length written.
    - gemma2: llama + post_attention_norm, post_ffw_norm; GELU gate; always tied (no `output`);
      head_dim 32 by default (so n_head * head_dim != n_embd); sliding_window 8 (even layers local);
      attn_logit_softcapping 50, final_logit_softcapping 30.
    - gemma3: gemma2's block + attn_q_norm/attn_k_norm, no softcaps; 6 layers by default (0-4 local
      with RoPE base 10000, 5 global with rope.freq_base, default 1e6); sliding_window 8.
    - phi3: attn_qkv (rows q, k, v) and ffn_up holding gate then up (2 * n_ff rows), no ffn_gate;
      untied `output` by default; NEOX RoPE.
    Arguments left as None take the family's default (above; otherwise n_layer 2, head_dim
    n_embd / n_head, rope_freq_base 1e4, rms_norm_eps 1e-5, tied for all but phi3).

    Gemma norms hold llama.cpp's value, 1 + w (its converter adds the 1 that Gemma's RMSNorm adds at
    run time), so every stored norm is ~1 in every family: the scale applied is what is stored.

    2D matrices are stored as `weight_type` (token_embd/output as `embedding_type`, default the same);
    norms and qwen2's q/k/v biases stay F32, as in llama.cpp's quantizer. `tensor_types` overrides
    the type of matrices by name pattern (see `_pattern_matches`; the last match wins), e.g.
    {"attn_q": Q5_0, "attn_v": Q8_0} for a K-quant-mix-like file. Weights are normal with std
    1/sqrt(fan_in) (0.5/sqrt for v/o/down) so that attention scores and activations are O(1) and
    logits are spread enough (std ~2) for argmax comparisons not to hinge on near ties. Weights are
    random, so q/k need no RoPE permutation: HF un-permutes llama's q/k, which is exact for any
    weights, and the NEOX families are not permuted at all.
    `extra_metadata` is written last, over the defaults (e.g. {"gemma2.final_logit_softcapping": 5.0}).
    """
    if arch not in _FAMILIES:
        raise ValueError(f"arch must be one of {sorted(_FAMILIES)}, not {arch!r}")
    fam = _FAMILIES[arch]
    n_layer = fam.n_layer if n_layer is None else n_layer
    tied_output = fam.tied_output if tied_output is None else tied_output
    rope_freq_base = fam.rope_freq_base if rope_freq_base is None else rope_freq_base
    rms_norm_eps = fam.rms_norm_eps if rms_norm_eps is None else rms_norm_eps
    sliding_window = fam.sliding_window if sliding_window is None else sliding_window
    if head_dim is None:
        head_dim = fam.head_dim if fam.head_dim is not None else n_embd // n_head
        if fam.head_dim is None and n_embd % n_head:
            raise ValueError(f"n_embd {n_embd} is not a multiple of n_head {n_head}; pass head_dim")
    if n_head % n_head_kv:
        raise ValueError(f"n_head {n_head} is not a multiple of n_head_kv {n_head_kv}")
    if fam.fused and head_dim * n_head != n_embd:  # llama.cpp's phi3 splits attn_qkv at n_embd
        raise ValueError(f"{arch} needs n_head * head_dim == n_embd, got {n_head} * {head_dim} != {n_embd}")
    if not tied_output and not fam.has_output:
        raise ValueError(f"{arch} has no output tensor in llama.cpp: it always ties it to token_embd")
    embedding_type = weight_type if embedding_type is None else embedding_type
    overrides = dict(tensor_types or {})
    unused = set(overrides)
    n_q, n_kv = n_head * head_dim, n_head_kv * head_dim
    rng = np.random.default_rng(seed)

    def matrix(n_out: int, n_in: int, gain: float = 1.0) -> np.ndarray:
        return (rng.standard_normal((n_out, n_in)) * (gain / np.sqrt(n_in))).astype(np.float32)

    def vector(n: int, mean: float, std: float) -> np.ndarray:
        return (mean + std * rng.standard_normal(n)).astype(np.float32)

    f32 = GGMLQuantizationType.F32
    tensors: dict[str, tuple[np.ndarray, GGMLQuantizationType]] = {}

    def add(name: str, array: np.ndarray, qtype: GGMLQuantizationType) -> None:
        # overrides are for matrices (the last matching pattern wins): norms and biases stay F32,
        # as llama.cpp's quantizer keeps them
        for pattern, override in overrides.items():
            if array.ndim == 2 and _pattern_matches(pattern, name):
                qtype = override
                unused.discard(pattern)
        tensors[name] = (array, qtype)

    # Embedding rows with std 3/sqrt(n_embd): when tied, the logits get std ~3.
    add("token_embd.weight", matrix(n_vocab, n_embd, 3.0), embedding_type)
    # Per layer, in the order llama.cpp's converter writes them (the RNG draws follow it too).
    for i in range(n_layer):
        blk = f"blk.{i}"
        add(f"{blk}.attn_norm.weight", vector(n_embd, 1.0, 0.1), f32)
        q, k, v = matrix(n_q, n_embd), matrix(n_kv, n_embd), matrix(n_kv, n_embd, 0.5)
        if fam.fused:
            add(f"{blk}.attn_qkv.weight", np.concatenate([q, k, v]), weight_type)
        else:
            add(f"{blk}.attn_q.weight", q, weight_type)
            add(f"{blk}.attn_k.weight", k, weight_type)
            add(f"{blk}.attn_v.weight", v, weight_type)
        if fam.qkv_bias:
            add(f"{blk}.attn_q.bias", vector(n_q, 0.0, 0.1), f32)
            add(f"{blk}.attn_k.bias", vector(n_kv, 0.0, 0.1), f32)
            add(f"{blk}.attn_v.bias", vector(n_kv, 0.0, 0.1), f32)
        if fam.qk_norm:
            add(f"{blk}.attn_q_norm.weight", vector(head_dim, 1.0, 0.1), f32)
            add(f"{blk}.attn_k_norm.weight", vector(head_dim, 1.0, 0.1), f32)
        add(f"{blk}.attn_output.weight", matrix(n_embd, n_q, 0.5), weight_type)
        if fam.post_norms:
            add(f"{blk}.post_attention_norm.weight", vector(n_embd, 1.0, 0.1), f32)
        add(f"{blk}.ffn_norm.weight", vector(n_embd, 1.0, 0.1), f32)
        gate, up = matrix(n_ff, n_embd), matrix(n_ff, n_embd)
        if fam.fused:  # llama.cpp's SwiGLU on a fused ffn_up: silu(first half) * second half
            add(f"{blk}.ffn_up.weight", np.concatenate([gate, up]), weight_type)
        else:
            add(f"{blk}.ffn_gate.weight", gate, weight_type)
            add(f"{blk}.ffn_up.weight", up, weight_type)
        add(f"{blk}.ffn_down.weight", matrix(n_embd, n_ff, 0.5), weight_type)
        if fam.post_norms:
            add(f"{blk}.post_ffw_norm.weight", vector(n_embd, 1.0, 0.1), f32)
    add("output_norm.weight", vector(n_embd, 1.0, 0.1), f32)
    if not tied_output:
        add("output.weight", matrix(n_vocab, n_embd, 3.0), embedding_type)
    if unused:
        raise ValueError(
            f"tensor_types patterns {sorted(unused)} match no weight matrix of this {arch} model"
        )

    metadata: dict[str, Any] = {
        "general.architecture": arch,
        "general.type": "model",
        "general.name": f"tiny-{arch}-test",
        "general.file_type": _file_type(weight_type),
        f"{arch}.block_count": n_layer,
        f"{arch}.context_length": context_length,
        f"{arch}.embedding_length": n_embd,
        f"{arch}.feed_forward_length": n_ff,
        f"{arch}.attention.head_count": n_head,
        f"{arch}.attention.head_count_kv": n_head_kv,
        f"{arch}.rope.freq_base": float(rope_freq_base),
        f"{arch}.attention.layer_norm_rms_epsilon": float(rms_norm_eps),
        f"{arch}.rope.dimension_count": head_dim,
        f"{arch}.vocab_size": n_vocab,
    }
    if fam.key_length or head_dim * n_head != n_embd:
        metadata[f"{arch}.attention.key_length"] = head_dim
        metadata[f"{arch}.attention.value_length"] = head_dim
    if sliding_window is not None:
        metadata[f"{arch}.attention.sliding_window"] = sliding_window
    metadata |= {f"{arch}.{key}": value for key, value in fam.extra}
    if {qtype for _, qtype in tensors.values()} - {GGMLQuantizationType.F32, GGMLQuantizationType.F16}:
        metadata["general.quantization_version"] = gguf.GGML_QUANT_VERSION
    pre, bos_id, eos_id = fam.tokenizer
    metadata |= make_tokenizer_metadata(n_vocab, pre, bos_id=bos_id, eos_id=eos_id)
    metadata |= extra_metadata or {}
    return write_gguf(path, metadata, tensors)
