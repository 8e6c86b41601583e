"""The tokenizer half of `gguflm convert`: a Hugging Face tokenizer as `tokenizer.ggml.*` metadata.

Two kinds, as llama.cpp's converter writes them:

* ``llama`` (SentencePiece): `tokenizer.model` read with sentencepiece; pieces, scores and types,
  added tokens from `added_tokens.json` and `tokenizer_config.json`, `[PAD{i}]` up to the model's
  vocab_size.
* ``gpt2`` (byte-level BPE): `tokenizer.json` read with the `tokenizers` library; added tokens are
  CONTROL when special (or when they look special, `<|...|>`), USER_DEFINED otherwise; merges come
  from `gguf.SpecialVocab`, as do the special ids, add_bos/add_eos and the chat template.

The BPE pre-tokenizer name (`tokenizer.ggml.pre`) is found the way llama.cpp's converter finds it,
then a way that also works for vocabularies it has never seen:

1. llama.cpp tokenizes a fixed check text and looks the SHA-256 of the ids up in a table of known
   models (`convert_hf_to_gguf_update.py` generates it). `KNOWN_PRE_TOKENIZER_HASHES` holds the
   entries for the families gguflm runs, so a real checkpoint of them gets llama.cpp's exact name.
2. A hash depends on the vocabulary, so any retrained or trimmed vocabulary misses the table. The
   split into words does not: the Hugging Face pre-tokenizer splits the check text, and every
   pre-tokenizer gguflm implements (llama.cpp's, `gguflm.tokenizer.PRE_TOKENIZERS`) splits it too.
   The names whose words equal Hugging Face's are candidates, narrowed to those whose ignore_merges
   flag (it changes ids) and then detokenizer space clean-up agree with the tokenizer's files where
   any do; the first in `PREFERRED_PRE_TOKENIZERS` order wins (several names share one split).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from hashlib import sha256
from pathlib import Path
from typing import Any

import gguf

from gguflm.tokenizer import PRE_TOKENIZERS, PreTokenizer

log = logging.getLogger(__name__)

__all__ = ["ConvertError", "Vocab", "detect_pre_tokenizer", "load_vocab"]


class ConvertError(ValueError):
    """A checkpoint directory gguflm cannot convert; the message says what is wrong."""


# The text llama.cpp's converter tokenizes to identify a BPE pre-tokenizer (conversion/base.py,
# get_vocab_base_pre); the hashes below are of str(list of ids) for it.
CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ "
    "🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, "
    "'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)

# llama.cpp's table, the entries of the families gguflm runs (hash -> tokenizer.ggml.pre).
KNOWN_PRE_TOKENIZER_HASHES = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM / SmolLM2
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen 1.5 / 2 / 2.5
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen 3
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # Mistral Nemo
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "fcace8b9cac38ce847670c970cd5892031a753a1ef381abd1d9af00f713da085": "phi-2",
    "a8594e3edff7c29c003940395316294b2c623e09894deebbc65f33f1515df79e": "dbrx",
    "ccc2ef013c104be7bae2965776d611e1d7a8a2a9c547dd93a682c9a9fc80352e": "gpt-4o",  # Phi-4
}

# Tie-break among names with one split: the name llama.cpp gives the family's models first.
PREFERRED_PRE_TOKENIZERS = ("llama-bpe", "qwen2", "smollm", "gpt-2", "starcoder", "tekken", "gpt-4o", "dbrx")

# llama.cpp's SentencePiece token types (the same numbers as gguf.TokenType)
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6


@dataclass
class Vocab:
    """What `tokenizer.ggml.*` will hold."""

    model: str  # "gpt2" or "llama"
    pre: str
    tokens: list[str]
    token_types: list[int]
    scores: list[float] | None = None
    special: gguf.SpecialVocab | None = None  # merges, special ids, add_bos/eos, chat template
    add_space_prefix: bool | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def add_to(self, writer: gguf.GGUFWriter) -> None:
        writer.add_tokenizer_model(self.model)
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        writer.add_token_types(self.token_types)
        if self.special is not None:
            self.special.add_to_gguf(writer, quiet=True)
        if self.add_space_prefix is not None:
            writer.add_add_space_prefix(self.add_space_prefix)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ConvertError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ConvertError(f"{path}: expected a JSON object")
    return data


def _tokenizer_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "tokenizer_config.json"
    return _read_json(path) if path.is_file() else {}


def looks_special(text: str) -> bool:
    """Added tokens some models forget to mark special (llama.cpp's does_token_look_special)."""
    return (
        text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (text.startswith("<|") and text.endswith("|>"))
        or (text.startswith("<\uff5c") and text.endswith("\uff5c>"))
        or (text.startswith("<unused") and text.endswith(">"))
    )


# ---- SentencePiece ---------------------------------------------------------------------------


def _spm_vocab(model_dir: Path, vocab_size: int | None, *, phi3: bool) -> Vocab:
    """tokenizer.model as llama.cpp's `_create_vocab_sentencepiece` (`phi3`: its Phi-3 variant, which
    also takes tokenizer.json's added tokens and types them by their `special` flag alone)."""
    try:
        from sentencepiece import SentencePieceProcessor
    except ImportError as e:
        raise ConvertError("converting a SentencePiece tokenizer needs: pip install sentencepiece") from e
    spm = SentencePieceProcessor()
    try:
        spm.LoadFromFile(str(model_dir / "tokenizer.model"))
    except (OSError, RuntimeError) as e:
        raise ConvertError(f"{model_dir / 'tokenizer.model'}: not a SentencePiece model ({e})") from e
    n = vocab_size or spm.vocab_size()
    tokens = [f"[PAD{i}]" for i in range(n)]
    scores = [-10000.0] * n
    types = [_UNUSED] * n
    for i in range(min(n, spm.vocab_size())):
        tokens[i], scores[i] = spm.IdToPiece(i), spm.GetScore(i)
        types[i] = (
            _UNKNOWN
            if spm.IsUnknown(i)
            else _CONTROL
            if spm.IsControl(i)
            else _UNUSED
            if spm.IsUnused(i)
            else _BYTE
            if spm.IsByte(i)
            else _NORMAL
        )
    if spm.vocab_size() > n:
        log.warning("tokenizer.model has %d pieces, vocab_size is %d: ignoring the rest", spm.vocab_size(), n)

    def put(tid: int, text: str, special: bool) -> None:
        if tid >= n:
            log.warning("ignoring added token %d %r: vocab_size is %d", tid, text, n)
            return
        if special or (not phi3 and looks_special(text)):
            types[tid] = _CONTROL
        else:
            types[tid] = _USER_DEFINED
            if not phi3:  # llama.cpp pre-normalizes spaces in user-defined tokens
                text = text.replace("\u2581", " ")
        tokens[tid], scores[tid] = text, -1000.0

    added = model_dir / "added_tokens.json"
    if added.is_file():
        for text, tid in _read_json(added).items():
            if tid < n:
                tokens[tid], scores[tid], types[tid] = text, -1000.0, _USER_DEFINED
    for tid, entry in _tokenizer_config(model_dir).get("added_tokens_decoder", {}).items():
        put(int(tid), entry["content"], bool(entry.get("special")))
    if phi3 and (model_dir / "tokenizer.json").is_file():
        for entry in _read_json(model_dir / "tokenizer.json").get("added_tokens", []):
            put(int(entry["id"]), entry["content"], bool(entry.get("special")))
    return Vocab(
        "llama",
        "default",
        tokens,
        types,
        scores,
        special=gguf.SpecialVocab(model_dir, n_vocab=len(tokens)),
    )


# ---- byte-level BPE ----------------------------------------------------------------------------


def _byte_alphabet_to_text(piece: str) -> str:
    """A ByteLevel pre-tokenizer's piece (GPT-2's printable byte alphabet) back to its text."""
    from gguflm.tokenizer import _CHAR_TO_BYTE

    return bytes(_CHAR_TO_BYTE[c] for c in piece).decode("utf-8", errors="replace")


def _hf_words(tokenizer: Any, text: str) -> list[str] | None:
    """How the Hugging Face pre-tokenizer (and normalizer) splits `text`, as text; None if unknown."""
    if tokenizer.pre_tokenizer is None:
        return None
    if tokenizer.normalizer is not None:
        text = tokenizer.normalizer.normalize_str(text)
    pieces = [piece for piece, _ in tokenizer.pre_tokenizer.pre_tokenize_str(text)]
    try:
        return [_byte_alphabet_to_text(p) for p in pieces]
    except KeyError:  # a pre-tokenizer without the byte alphabet (no ByteLevel step)
        return None


def detect_pre_tokenizer(tokenizer: Any, model_json: dict[str, Any], config: dict[str, Any]) -> str:
    """`tokenizer.ggml.pre` for a `tokenizers.Tokenizer` (see the module docstring: hash, then split)."""
    ids = tokenizer.encode(CHECK_TEXT).ids
    digest = sha256(str(ids).encode()).hexdigest()
    if digest in KNOWN_PRE_TOKENIZER_HASHES:
        return KNOWN_PRE_TOKENIZER_HASHES[digest]
    words = _hf_words(tokenizer, CHECK_TEXT)
    if words is None:
        raise ConvertError(
            "BPE pre-tokenizer not recognized: tokenizer.json has no byte-level pre-tokenizer "
            f"(check-text hash {digest})"
        )
    split = [name for name, spec in PRE_TOKENIZERS.items() if PreTokenizer(spec).split(CHECK_TEXT) == words]
    if not split:
        raise ConvertError(
            "BPE pre-tokenizer not recognized: no llama.cpp pre-tokenizer splits text as tokenizer.json's "
            f"does (check-text hash {digest}); gguflm cannot tokenize this model as llama.cpp would"
        )
    # ignore_merges changes token ids, so it must agree; the space clean-up only changes decoding
    ignore_merges = bool(model_json.get("model", {}).get("ignore_merges", False))
    split = [name for name in split if PRE_TOKENIZERS[name].ignore_merges == ignore_merges] or split
    clean = config.get("clean_up_tokenization_spaces")
    if clean is not None:
        split = [name for name in split if PRE_TOKENIZERS[name].clean_spaces == bool(clean)] or split
    rank = {name: i for i, name in enumerate(PREFERRED_PRE_TOKENIZERS)}
    choice = min(split, key=lambda name: (rank.get(name, len(rank)), split.index(name)))
    log.info("pre-tokenizer %r by its split of the check text (hash %s not in the table)", choice, digest)
    return choice


def _bpe_vocab(model_dir: Path, vocab_size: int | None) -> Vocab:
    """tokenizer.json as llama.cpp's `get_vocab_base` + `_set_vocab_gpt2`."""
    try:
        from tokenizers import Tokenizer
    except ImportError as e:
        raise ConvertError("converting a BPE tokenizer needs: pip install tokenizers") from e
    path = model_dir / "tokenizer.json"
    model_json = _read_json(path)
    model = model_json.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        kind = "SentencePiece-style BPE" if model.get("byte_fallback") else repr(model.get("type"))
        raise ConvertError(
            f"{path}: a {kind} tokenizer; gguflm converts byte-level BPE tokenizer.json files "
            "or SentencePiece tokenizer.model files"
        )
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as e:  # the Rust library raises plain Exceptions
        raise ConvertError(f"{path}: cannot be loaded by the tokenizers library ({e})") from e
    config = _tokenizer_config(model_dir)
    by_id = {tid: text for text, tid in tokenizer.get_vocab(with_added_tokens=True).items()}
    added = tokenizer.get_added_tokens_decoder()
    n = vocab_size or (max(by_id) + 1)
    if max(by_id) >= n:
        raise ConvertError(f"{path}: token id {max(by_id)} does not fit the model's vocab_size {n}")
    tokens: list[str] = []
    types: list[int] = []
    for i in range(n):
        text = by_id.get(i)
        if text is None:
            tokens.append(f"[PAD{i}]")
            types.append(_UNUSED)
        elif i in added:
            entry = added[i]
            if not entry.normalized:  # llama.cpp expects added tokens in normalized form
                text = tokenizer.decode(tokenizer.encode(text, add_special_tokens=False).ids, False)
            if entry.special or looks_special(text):
                types.append(_CONTROL)
            else:
                types.append(_USER_DEFINED)
                text = text.replace("\u2581", " ")
            tokens.append(text)
        else:
            tokens.append(text)
            types.append(_NORMAL)
    return Vocab(
        "gpt2",
        detect_pre_tokenizer(tokenizer, model_json, config),
        tokens,
        types,
        special=gguf.SpecialVocab(model_dir, load_merges=True),
    )


def load_vocab(
    model_dir: Path, vocab_size: int | None, *, prefer_spm: bool = True, phi3: bool = False
) -> Vocab:
    """The checkpoint's tokenizer: tokenizer.model (SentencePiece) when present and `prefer_spm`,
    else tokenizer.json (byte-level BPE), as llama.cpp's converter chooses for these families."""
    config = _tokenizer_config(model_dir)
    if phi3 and config.get("tokenizer_class") == "GPT2Tokenizer":  # Phi-4
        prefer_spm = False
    if prefer_spm and (model_dir / "tokenizer.model").is_file():
        return _spm_vocab(model_dir, vocab_size, phi3=phi3)
    if (model_dir / "tokenizer.json").is_file():
        return _bpe_vocab(model_dir, vocab_size)
    if (model_dir / "tokenizer.model").is_file():
        return _spm_vocab(model_dir, vocab_size, phi3=phi3)
    raise ConvertError(f"{model_dir}: no tokenizer.json or tokenizer.model")
