"""Tokenizers built from GGUF metadata that give the token ids llama.cpp gives.

Two vocabulary kinds, as `tokenizer.ggml.model` names them:

* ``gpt2``: byte-level BPE. The text is split into words by the pre-tokenizer that
  ``tokenizer.ggml.pre`` selects, each word's UTF-8 bytes are mapped to GPT-2's printable
  byte alphabet, and the word is merged pair by pair in the order of ``tokenizer.ggml.merges``.
* ``llama``: SentencePiece-style. Spaces become U+2581, adjacent pieces are merged by the
  highest score while the merged text is a token, and characters no token covers fall back
  to ``<0xXX>`` byte tokens.

llama.cpp is the contract, not Hugging Face: where the two differ (its std::regex engine, its
custom splitters, its special-token partition, its detokenizer's space clean-up) this module
follows llama.cpp.
"""

from __future__ import annotations

import codecs
import heapq
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import IntFlag
from itertools import compress, repeat
from typing import Any

import regex

__all__ = ["PRE_TOKENIZERS", "StreamDecoder", "TokenAttr", "Tokenizer"]

# `tokenizer.ggml.token_type` values.
TOKEN_TYPE_NORMAL = 1
TOKEN_TYPE_UNKNOWN = 2
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4
TOKEN_TYPE_UNUSED = 5
TOKEN_TYPE_BYTE = 6


class TokenAttr(IntFlag):
    """Per-token attributes; llama.cpp keeps flags rather than types because it adds some at load."""

    UNDEFINED = 0
    UNKNOWN = 1 << 0
    UNUSED = 1 << 1
    NORMAL = 1 << 2
    CONTROL = 1 << 3
    USER_DEFINED = 1 << 4
    BYTE = 1 << 5


# plain ints inside: IntFlag arithmetic is slow over a 100k-token vocabulary
_UNKNOWN, _UNUSED, _NORMAL = int(TokenAttr.UNKNOWN), int(TokenAttr.UNUSED), int(TokenAttr.NORMAL)
_CONTROL, _USER, _BYTE = int(TokenAttr.CONTROL), int(TokenAttr.USER_DEFINED), int(TokenAttr.BYTE)
_TYPE_TO_ATTR = {
    TOKEN_TYPE_NORMAL: _NORMAL,
    TOKEN_TYPE_UNKNOWN: _UNKNOWN,
    TOKEN_TYPE_CONTROL: _CONTROL,
    TOKEN_TYPE_USER_DEFINED: _USER,
    TOKEN_TYPE_UNUSED: _UNUSED,
    TOKEN_TYPE_BYTE: _BYTE,
}

SPM_SPACE = "\u2581"  # SentencePiece's visible space


def _gpt2_byte_alphabet() -> list[str]:
    """GPT-2's byte -> printable character table: printable Latin-1 bytes map to themselves."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table: list[str] = [""] * 256
    for b in keep:
        table[b] = chr(b)
    extra = 0
    for b in range(256):
        if not table[b]:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_BYTE_TO_CHAR = _gpt2_byte_alphabet()
_CHAR_TO_BYTE = {c: b for b, c in enumerate(_BYTE_TO_CHAR)}
# str.translate table for text that was decoded as Latin-1 (one char per byte).
_LATIN1_TO_ALPHABET = {b: c for b, c in enumerate(_BYTE_TO_CHAR)}
# alphabet char -> its byte as a Latin-1 char; other chars below 256 -> one Latin-1 cannot encode
_ALPHABET_TO_LATIN1 = {c: "\uffff" for c in range(256)} | {
    ord(c): chr(b) for b, c in enumerate(_BYTE_TO_CHAR)
}

# llama.cpp's std::wregex cannot see non-ASCII white space, so it replaces it with \v before
# matching patterns that use no \p{..} class; patterns marked "wide" below do the same.
_WIDE_SPACES = dict.fromkeys(
    [0x85, 0xA0, 0x1680, *range(0x2000, 0x200B), 0x2028, 0x2029, 0x202F, 0x205F, 0x3000], "\x0b"
)


# --------------------------------------------------------------------------------------------
# pre-tokenizers
# --------------------------------------------------------------------------------------------

_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"

# llama.cpp's gpt2 pattern, as its hand-written splitter runs it (with a final \s+ fallback).
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN35 = (
    _CONTRACTIONS
    + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SEED_CODER = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# "upper-case run then lower-case run" words; (?=\p{L})[^a-z] is "a letter that is not a-z".
_UPPER = r"(?:(?=\p{L})[^a-z])"
_LOWER = r"(?:(?=\p{L})[^A-Z])"
_TEKKEN = (
    rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O = (
    rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+{_CONTRACTIONS}?"
    rf"|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*{_CONTRACTIONS}?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_DEEPSEEK3_WORDS = (
    r"""[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"""
    r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_CJK_DEEPSEEK3 = "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+"
_CJK_DEEPSEEK_CODER = "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+"
_PORO = r" ?[^(\s|.,!?\u2026\u3002\uff0c\u3001\u0964\u06d4\u060c)]+"
_DIGITS3 = "[0-9][0-9][0-9]"


@dataclass(frozen=True)
class _Step:
    """One of llama.cpp's split passes. `wide`: it ran on std::wregex (no \\p{..} in the pattern)."""

    pattern: str
    wide: bool = False


@dataclass(frozen=True)
class PreTokenizerSpec:
    """A `tokenizer.ggml.pre` value: its split passes and the vocabulary flags llama.cpp ties to it."""

    steps: tuple[_Step, ...]
    clean_spaces: bool = True  # detokenizer removes " ," " 's" ... (llama.cpp's clean_spaces)
    ignore_merges: bool = False  # a word that is a whole token is taken as is
    add_bos: bool = False  # default of add_bos_token when the GGUF does not say


def _spec(*steps: str | _Step, **flags: bool) -> PreTokenizerSpec:
    return PreTokenizerSpec(tuple(s if isinstance(s, _Step) else _Step(s) for s in steps), **flags)


_DEFAULT_SPEC = _spec(r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", _Step(_DIGITS3, wide=True))
_LLAMA3_SPEC = _spec(_LLAMA3, ignore_merges=True, add_bos=True)
_GPT2_SPEC = _spec(_GPT2)
_STARCODER_SPEC = _spec(r"\p{N}", _GPT2)
_QWEN2_SPEC = _spec(_QWEN2, clean_spaces=False)

# Pre-tokenizer names -> splits, as llama.cpp's llama_vocab::impl::load maps them.
PRE_TOKENIZERS: dict[str, PreTokenizerSpec] = {
    "default": _DEFAULT_SPEC,
    **dict.fromkeys(
        ["llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2"],
        _LLAMA3_SPEC,
    ),
    **dict.fromkeys(["dbrx", "smaug-bpe"], _spec(_LLAMA3)),
    "falcon": _spec(r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, _Step(_DIGITS3, wide=True)),
    **dict.fromkeys(
        ["gpt-2", "phi-2", "mpt", "olmo", "jais", "gigachat", "a.x-4.0", "mellum", "exaone4"], _GPT2_SPEC
    ),
    **dict.fromkeys(["trillion", "granite-docling"], _spec(_GPT2, clean_spaces=False)),
    **dict.fromkeys(["starcoder", "refact", "codeshell", "exaone", "minerva-7b", "mellum2"], _STARCODER_SPEC),
    **dict.fromkeys(["smollm", "command-r"], _spec(r"\p{N}", _GPT2, clean_spaces=False)),
    **dict.fromkeys(
        ["qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "hunyuan", "solar-open", "grok-2"], _QWEN2_SPEC
    ),
    **dict.fromkeys(["stablelm2", "megrez"], _spec(_QWEN2)),
    "qwen35": _spec(_QWEN35, clean_spaces=False),
    "seed-coder": _spec(_SEED_CODER, clean_spaces=False),
    "deepseek-coder": _spec(
        _Step("[\r\n]", wide=True),
        r"\s?\p{L}+",
        r"\s?\p{P}+",
        _Step(_CJK_DEEPSEEK_CODER, wide=True),
        r"\p{N}",
        clean_spaces=False,
    ),
    **dict.fromkeys(
        ["deepseek-v3", "hunyuan-dense"],
        _spec(r"\p{N}{1,3}", _Step(_CJK_DEEPSEEK3, wide=True), _DEEPSEEK3_WORDS, clean_spaces=False),
    ),
    "tekken": _spec(_TEKKEN, clean_spaces=False, ignore_merges=True, add_bos=True),
    **dict.fromkeys(["gpt-4o", "llama4"], _spec(_GPT4O, clean_spaces=False)),
    "poro-chat": _spec(_Step(_PORO, wide=True), clean_spaces=False),
    **dict.fromkeys(["bloom", "gpt3-finnish"], _spec(_Step(_PORO, wide=True))),
    "viking": _spec(_Step(_PORO, wide=True), r"\p{N}", clean_spaces=False),
}


class PreTokenizer:
    """Splits text into words with llama.cpp's passes: each pass refines the previous pieces.

    A pass keeps both its matches and the unmatched text between them as pieces, and never
    looks across a piece boundary (lookaheads see a boundary as the end of the text).
    """

    def __init__(self, spec: PreTokenizerSpec) -> None:
        self.spec = spec
        # each pattern wrapped in one group: split() then returns gaps and matches, in C
        self._steps = [(regex.compile(f"({s.pattern})"), s.wide) for s in spec.steps]

    def split(self, text: str) -> list[str]:
        if not text:
            return []
        pieces = [text]
        for pattern, wide in self._steps:
            out: list[str] = []
            for piece in pieces:
                if not wide:
                    out += [p for p in pattern.split(piece) if p]
                    continue
                pos = 0  # matched on a copy with \v for non-ASCII spaces: cut the original
                for part in pattern.split(piece.translate(_WIDE_SPACES)):
                    if part:
                        out.append(piece[pos : pos + len(part)])
                        pos += len(part)
            pieces = out
        return pieces


# --------------------------------------------------------------------------------------------
# special-token auto-detection (llama.cpp finds these by text when the GGUF lacks the ids)
# --------------------------------------------------------------------------------------------

_DS_END = "<\uff5cend\u2581of\u2581sentence\uff5c>"  # DeepSeek's full-width bars and U+2581
_EOT_TEXTS = (
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>",
    "<EOT>", "_<EOT>", "[EOT]", _DS_END, "<end_of_utterance>",
)  # fmt: skip
_EOM_TEXTS = ("<|eom_id|>",)
_FIM_PRE_TEXTS = (
    "<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<\uff5cfim\u2581begin\uff5c>", "<PRE>",
    "\u2581<PRE>", "<|code_prefix|>", "<|prefix|>",
)  # fmt: skip
_FIM_SUF_TEXTS = (
    "<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<\uff5cfim\u2581hole\uff5c>", "<SUF>",
    "\u2581<SUF>", "<|code_suffix|>", "<|suffix|>",
)  # fmt: skip
_FIM_MID_TEXTS = (
    "<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<\uff5cfim\u2581end\uff5c>", "<MID>",
    "\u2581<MID>", "<|code_middle|>", "<|middle|>",
)  # fmt: skip
_FIM_PAD_TEXTS = ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]")
_FIM_REP_TEXTS = ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>")
_FIM_SEP_TEXTS = ("<|file_sep|>",)
_EOG_TEXTS = frozenset(
    {
        "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
        "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
        "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>", _DS_END, "[e~[",
    }
)  # fmt: skip
_ALWAYS_RENDERED = ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>")  # gpt-oss

_MAX_CACHE = 1 << 17  # words kept in the BPE word cache before it is cleared


def _check_type(source: str, key: str, value: Any, kind: type | tuple[type, ...]) -> Any:
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise ValueError(f"{source}: metadata key {key!r} has an unexpected type ({type(value).__name__})")
    return value


# --------------------------------------------------------------------------------------------
# the tokenizer
# --------------------------------------------------------------------------------------------


class Tokenizer:
    """Text <-> token ids for one GGUF vocabulary; build it with `Tokenizer.from_metadata`."""

    def __init__(
        self,
        *,
        model: str,
        tokens: Sequence[str],
        token_types: Sequence[int] | None = None,
        scores: Sequence[float] | None = None,
        merges: Sequence[str] | None = None,
        pre: str | None = None,
        special_ids: dict[str, int] | None = None,
        add_bos: bool | None = None,
        add_eos: bool | None = None,
        add_space_prefix: bool | None = None,
        source: str = "",
    ) -> None:
        src = source or "<metadata>"
        self.source = src
        if model not in ("gpt2", "llama"):
            raise ValueError(
                f"{src}: unsupported tokenizer model {model!r} (supported: 'gpt2' byte-level BPE, "
                "'llama' SentencePiece)"
            )
        self.model = model
        self.is_spm = model == "llama"
        n = len(tokens)
        if n == 0:
            raise ValueError(f"{src}: the vocabulary (tokenizer.ggml.tokens) is empty")
        if token_types is not None and len(token_types) < n:
            raise ValueError(f"{src}: {len(token_types)} token types for {n} tokens")
        if scores is not None and len(scores) < n:
            raise ValueError(f"{src}: {len(scores)} token scores for {n} tokens")

        # vocabulary: llama.cpp names empty tokens, and refuses duplicates
        # (C-level loops over the whole vocabulary: Gemma's has 262k tokens)
        texts = list(tokens)
        if not all(texts):
            texts = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(texts)]
        self._text_to_id: dict[str, int] = dict(zip(texts, range(n), strict=True))
        if len(self._text_to_id) != n:
            first: dict[str, int] = {}
            for i, t in enumerate(texts):
                j = first.setdefault(t, i)
                if j != i:
                    raise ValueError(f"{src}: duplicate token in vocabulary: {t!r} has ids {j} and {i}")
        self._texts = texts
        self._scores = list(map(float, scores[:n])) if scores is not None else [0.0] * n
        attrs: list[int] = [_NORMAL] * n
        if token_types is not None:  # unknown type values: no attribute, as llama.cpp's UNDEFINED
            attrs = list(map(_TYPE_TO_ATTR.get, map(int, token_types[:n]), repeat(0)))
        self._attrs: list[int] = attrs

        # model-kind defaults, as llama.cpp sets them before reading the keys
        if self.is_spm:
            self.pre = "default"
            spec = None
            ids = {"bos": 1, "eos": 2, "unk": 0}
            default_add_bos, self.clean_spaces = True, False
            self.add_space_prefix = True if add_space_prefix is None else bool(add_space_prefix)
        else:
            self.pre = "default" if pre is None else pre  # llama.cpp warns and goes on with 'default'
            spec = PRE_TOKENIZERS.get(self.pre)
            if spec is None:
                known = ", ".join(sorted(PRE_TOKENIZERS))
                raise ValueError(
                    f"{src}: unknown pre-tokenizer tokenizer.ggml.pre = {self.pre!r} (supported: {known})"
                )
            if merges is None:
                raise ValueError(f"{src}: a gpt2 (BPE) vocabulary needs tokenizer.ggml.merges")
            ids = {"bos": 11, "eos": 11}
            default_add_bos, self.clean_spaces = spec.add_bos, spec.clean_spaces
            self.add_space_prefix = bool(add_space_prefix)  # only ever strips a space when decoding
        ids = {k: v for k, v in ids.items() if v < n}
        for key, value in (special_ids or {}).items():
            if 0 <= value < n:
                ids[key] = value
        self.add_bos = default_add_bos if add_bos is None else bool(add_bos)
        self.add_eos = bool(add_eos)
        if self.add_bos and "bos" not in ids:
            raise ValueError(f"{src}: tokenizer.ggml.add_bos_token is true, but there is no BOS token")
        if self.add_eos and "eos" not in ids:
            raise ValueError(f"{src}: tokenizer.ggml.add_eos_token is true, but there is no EOS token")

        self._find_special_by_text(ids)
        self.bos_id: int | None = ids.get("bos")
        self.eos_id: int | None = ids.get("eos")
        self.eot_id: int | None = ids.get("eot")
        self.eom_id: int | None = ids.get("eom")
        self.unk_id: int | None = ids.get("unk")
        self.pad_id: int | None = ids.get("pad")
        self.sep_id: int | None = ids.get("sep")
        self.fim_ids: dict[str, int] = {k: v for k, v in ids.items() if k.startswith("fim_")}
        self.eog_ids: set[int] = self._end_of_generation_ids(ids)
        for text in _ALWAYS_RENDERED:
            tid = self._text_to_id.get(text)
            if tid is not None:
                self._attrs[tid] = _USER

        # longest first (by UTF-8 length), as tokenizer_st_partition tries them
        special = list(compress(range(n), map((_CONTROL | _USER | _UNKNOWN).__and__, self._attrs)))
        special.sort(key=lambda i: (-len(self._texts[i].encode("utf-8", "surrogatepass")), i))
        self._special_parse = [(i, self._texts[i]) for i in special]
        # without parse_special only user-defined tokens are cut out (not ones also marked control)
        self._special_always = [
            (i, t) for i, t in self._special_parse if self._attrs[i] & (_USER | _CONTROL | _UNKNOWN) == _USER
        ]

        self._pieces = self._make_pieces()
        self._hidden = list(map(bool, map((_CONTROL | _UNKNOWN).__and__, self._attrs)))

        if spec is not None:
            self._pre_tokenizer: PreTokenizer | None = PreTokenizer(spec)
            self._ignore_merges = spec.ignore_merges
            self._ranks = self._parse_merges(merges or [])
        else:
            self._pre_tokenizer = None
            self._ignore_merges = False
            self._ranks = {}
        self._cache: dict[str, list[int]] = {}
        self._byte_ids = self._byte_tokens()

    # ---- construction ------------------------------------------------------------------

    @classmethod
    def from_metadata(cls, metadata: dict[str, Any], source: str = "") -> Tokenizer:
        """Build from GGUF metadata (`GGUFFile.metadata`); `source` names the file in errors."""
        src = source or "<metadata>"

        def get(key: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
            if key not in metadata:
                return default
            return _check_type(src, key, metadata[key], kind)

        model = get("tokenizer.ggml.model", str)
        if model is None:
            raise ValueError(f"{src}: missing metadata key 'tokenizer.ggml.model'")
        tokens = get("tokenizer.ggml.tokens", list)
        if tokens is None:
            raise ValueError(f"{src}: missing metadata key 'tokenizer.ggml.tokens'")
        special_keys = {
            "bos": "bos_token_id",
            "eos": "eos_token_id",
            "eot": "eot_token_id",
            "eom": "eom_token_id",
            "unk": "unknown_token_id",
            "sep": "seperator_token_id",  # sic: the GGUF key is spelled this way
            "pad": "padding_token_id",
            "mask": "mask_token_id",
            "fim_pre": "fim_pre_token_id",
            "fim_suf": "fim_suf_token_id",
            "fim_mid": "fim_mid_token_id",
            "fim_pad": "fim_pad_token_id",
            "fim_rep": "fim_rep_token_id",
            "fim_sep": "fim_sep_token_id",
        }
        deprecated = {
            "fim_pre": "prefix_token_id",
            "fim_suf": "suffix_token_id",
            "fim_mid": "middle_token_id",
        }
        special_ids: dict[str, int] = {}
        for name, key in special_keys.items():
            value = get("tokenizer.ggml." + key, int)
            if value is None and name in deprecated:
                value = get("tokenizer.ggml." + deprecated[name], int)
            if value is not None:
                special_ids[name] = value
        return cls(
            model=model,
            tokens=tokens,
            token_types=get("tokenizer.ggml.token_type", list),
            scores=get("tokenizer.ggml.scores", list),
            merges=get("tokenizer.ggml.merges", list),
            pre=get("tokenizer.ggml.pre", str),
            special_ids=special_ids,
            add_bos=get("tokenizer.ggml.add_bos_token", bool),
            add_eos=get("tokenizer.ggml.add_eos_token", bool),
            add_space_prefix=get("tokenizer.ggml.add_space_prefix", bool),
            source=src,
        )

    def _mark_control(self, tid: int) -> None:
        """llama.cpp forces control type on tokens it recognises as special by their text."""
        self._attrs[tid] |= _CONTROL

    def _find_special_by_text(self, ids: dict[str, int]) -> None:
        """Fill in EOT/EOM/FIM ids the GGUF lacks, from well-known texts.

        llama.cpp takes the first hit in hash-map order, which is not reproducible; this takes
        the first text of its list that the vocabulary has.
        """
        for name, texts in (
            ("eot", _EOT_TEXTS),
            ("eom", _EOM_TEXTS),
            ("fim_pre", _FIM_PRE_TEXTS),
            ("fim_suf", _FIM_SUF_TEXTS),
            ("fim_mid", _FIM_MID_TEXTS),
            ("fim_pad", _FIM_PAD_TEXTS),
            ("fim_rep", _FIM_REP_TEXTS),
            ("fim_sep", _FIM_SEP_TEXTS),
        ):
            if name in ids:
                continue
            for text in texts:
                tid = self._text_to_id.get(text)
                if tid is not None:
                    ids[name] = tid
                    self._mark_control(tid)
                    break
        for i in compress(range(len(self._attrs)), map(_CONTROL.__and__, self._attrs)):
            if "unused" in self._texts[i]:  # control tokens named "unused..." are unused
                self._attrs[i] |= _UNUSED

    def _end_of_generation_ids(self, ids: dict[str, int]) -> set[int]:
        """The ids that end generation: EOS, EOT, EOM, FIM pad/repo/sep and known end texts."""
        eog = {ids[k] for k in ("fim_pad", "fim_rep", "fim_sep") if k in ids}
        for text in _EOG_TEXTS:
            tid = self._text_to_id.get(text)
            if tid is not None:
                eog.add(tid)
                self._mark_control(tid)
        eog.update(ids[k] for k in ("eos", "eot", "eom") if k in ids)
        texts = {self._texts[i]: i for i in eog}
        # gpt-oss / solar-open: "<|end|>" ends a message there, not the generation
        has_call = "<|call|>" in texts or "<|calls|>" in texts
        if "<|end|>" in texts and has_call and ("<|return|>" in texts or "<|flush|>" in texts):
            eog.discard(texts["<|end|>"])
            self._attrs[texts["<|end|>"]] = _USER
        if "<|tool_response>" in texts and "</s>" in texts:  # gemma4, paddleocr
            eog.discard(texts["</s>"])
            self._attrs[texts["</s>"]] = _NORMAL
        return eog

    def _parse_merges(self, merges: Iterable[str]) -> dict[tuple[str, str], int]:
        """Merge ranks keyed by pair; split at the first space after the first character."""
        ranks: dict[tuple[str, str], int] = {}
        for rank, merge in enumerate(merges):
            if not isinstance(merge, str):
                raise ValueError(f"{self.source}: tokenizer.ggml.merges[{rank}] is not a string")
            cut = merge.find(" ", 1)
            pair = (merge[:cut], merge[cut + 1 :]) if cut >= 0 else ("", "")
            ranks.setdefault(pair, rank)
        return ranks

    def _byte_tokens(self) -> list[int | None]:
        """Byte -> token id for byte fallback (`<0xXX>` for SPM, the alphabet char for BPE)."""
        out: list[int | None] = []
        for b in range(256):
            if self.is_spm:
                tid = self._text_to_id.get(f"<0x{b:02X}>")
                if tid is None and b < 0x80:
                    tid = self._text_to_id.get(chr(b))
            else:
                tid = self._text_to_id.get(_BYTE_TO_CHAR[b])
            out.append(tid)
        return out

    def _make_pieces(self) -> list[bytes]:
        """Every token's piece; plain SPM tokens (nearly all of a SentencePiece vocabulary) inline."""
        n = len(self._texts)
        joined = "\x00".join(self._texts) if self.is_spm else ""
        if not joined or joined.count("\x00") != n - 1:  # BPE, or a token holding NUL: one by one
            return [self._make_piece(i) for i in range(n)]
        pieces = joined.replace(SPM_SPACE, " ").encode("utf-8", "surrogatepass").split(b"\x00")
        for i in compress(range(n), map(_NORMAL.__ne__, self._attrs)):
            pieces[i] = self._make_piece(i)
        return pieces

    def _make_piece(self, tid: int) -> bytes:
        """The bytes `token_to_piece(special=True)` gives, computed once like llama.cpp's cache."""
        text, attr = self._texts[tid], self._attrs[tid]
        if attr & (_CONTROL | _UNKNOWN | _USER):
            return text.encode("utf-8", "surrogatepass")
        if attr & _NORMAL:
            if self.is_spm:
                return text.replace(SPM_SPACE, " ").encode("utf-8", "surrogatepass")
            try:
                return text.translate(_ALPHABET_TO_LATIN1).encode("latin-1")
            except UnicodeEncodeError:
                pass
            out = bytearray()
            for ch in text:
                b = _CHAR_TO_BYTE.get(ch)
                if b is not None:
                    out.append(b)
                else:  # a character outside GPT-2's alphabet: llama.cpp's marker, verbatim
                    raw = ch.encode("utf-8", "surrogatepass")
                    out += b"[UNK_BYTE_0x" + raw.hex().encode() + text.encode("utf-8", "surrogatepass") + b"]"
            return bytes(out)
        if attr & _BYTE:
            try:
                return bytes([int(text[3:5], 16)])
            except ValueError:
                return b""
        return b""  # unused and undefined tokens render as nothing

    # ---- vocabulary queries ----------------------------------------------------------------

    @property
    def n_vocab(self) -> int:
        return len(self._texts)

    @property
    def tokens(self) -> list[str]:
        """The vocabulary texts, by id (a copy)."""
        return list(self._texts)

    def token_text(self, tid: int) -> str:
        """The raw vocabulary text of a token (GPT-2 alphabet / U+2581 spaces left as they are)."""
        self._check_id(tid)
        return self._texts[tid]

    def token_attr(self, tid: int) -> TokenAttr:
        self._check_id(tid)
        return TokenAttr(self._attrs[tid])

    def text_to_token(self, text: str) -> int | None:
        """The id whose vocabulary text is exactly `text`, or None."""
        return self._text_to_id.get(text)

    def is_eog(self, tid: int) -> bool:
        """True for tokens that end generation (EOS, EOT, ...)."""
        return tid in self.eog_ids

    def is_control(self, tid: int) -> bool:
        self._check_id(tid)
        return bool(self._attrs[tid] & _CONTROL)

    def _check_id(self, tid: int) -> None:
        if not 0 <= tid < len(self._texts):
            raise ValueError(f"invalid token id {tid} (vocabulary has {len(self._texts)} tokens)")

    # ---- encoding ------------------------------------------------------------------

    def encode(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        """Text -> token ids, as `llama_tokenize(text, add_special, parse_special)`.

        `add_special` adds BOS / EOS where the vocabulary asks for them; `parse_special` lets
        control tokens written in the text (e.g. "<|im_start|>") become those tokens.
        User-defined tokens are always matched whole, as in llama.cpp.
        """
        out: list[int] = []
        if add_special and self.add_bos:
            assert self.bos_id is not None
            out.append(self.bos_id)
        fragments = self._partition(text, parse_special) if text else []
        if self.is_spm:
            prev_special = True  # the first fragment gets the space prefix too
            for frag in fragments:
                if isinstance(frag, int):
                    out.append(frag)
                    prev_special = True
                    continue
                if self.add_space_prefix and prev_special:
                    frag = " " + frag
                self._encode_spm(frag.replace(" ", SPM_SPACE), out)
                prev_special = False
        else:
            for frag in fragments:
                if isinstance(frag, int):
                    out.append(frag)
                else:
                    self._encode_bpe(frag, out)
        if add_special and self.add_eos:
            assert self.eos_id is not None
            out.append(self.eos_id)
        return out

    def _partition(self, text: str, parse_special: bool) -> list[str | int]:
        """Cut special tokens out of the text, longest token first (tokenizer_st_partition)."""
        fragments: list[str | int] = [text]
        for tid, token in self._special_parse if parse_special else self._special_always:
            if token not in text:
                continue
            out: list[str | int] = []
            for frag in fragments:
                if isinstance(frag, int) or token not in frag:
                    out.append(frag)
                    continue
                for k, part in enumerate(frag.split(token)):
                    if k:
                        out.append(tid)
                    if part:
                        out.append(part)
            fragments = out
        return fragments

    # -- byte-level BPE --

    def _encode_bpe(self, text: str, out: list[int]) -> None:
        assert self._pre_tokenizer is not None
        cache = self._cache
        for word in self._pre_tokenizer.split(text):
            ids = cache.get(word)
            if ids is None:
                ids = self._bpe_word(word)
                if len(cache) >= _MAX_CACHE:
                    cache.clear()
                cache[word] = ids
            out.extend(ids)

    def _bpe_word(self, word: str) -> list[int]:
        """One pre-tokenized word -> ids: byte-alphabet it, merge by rank, look the parts up."""
        encoded = word.encode("utf-8", "surrogatepass").decode("latin-1").translate(_LATIN1_TO_ALPHABET)
        text_to_id = self._text_to_id
        if self._ignore_merges:
            tid = text_to_id.get(encoded)
            if tid is not None:
                return [tid]
        parts = list(encoded)
        if len(parts) > 1:
            parts = self._merge_short(parts) if len(parts) <= 24 else self._merge_long(parts)
        ids: list[int] = []
        for part in parts:
            tid = text_to_id.get(part)
            if tid is not None:
                ids.append(tid)
                continue
            # llama.cpp looks up each UTF-8 byte of the part as a one-byte text: only ASCII can hit
            for b in part.encode("utf-8"):
                if b < 0x80:
                    tid = text_to_id.get(chr(b))
                    if tid is not None:
                        ids.append(tid)
        return ids

    def _merge_short(self, parts: list[str]) -> list[str]:
        """Merge the lowest-ranked adjacent pair (leftmost on ties) until none is left; O(n^2)."""
        ranks = self._ranks
        while True:
            best = -1
            best_rank = 1 << 62
            left = parts[0]
            for i in range(len(parts) - 1):
                right = parts[i + 1]
                rank = ranks.get((left, right))
                if rank is not None and rank < best_rank:
                    best_rank, best = rank, i
                left = right
            if best < 0:
                return parts
            parts[best : best + 2] = [parts[best] + parts[best + 1]]
            if len(parts) == 1:
                return parts

    def _merge_long(self, parts: list[str]) -> list[str]:
        """The same merge order with a heap and a linked list, for long words; O(n log n)."""
        ranks = self._ranks
        n = len(parts)
        nxt = [*range(1, n), -1]
        prv = list(range(-1, n - 1))
        heap: list[tuple[int, int, int, str, str]] = []
        for i in range(n - 1):
            rank = ranks.get((parts[i], parts[i + 1]))
            if rank is not None:
                heap.append((rank, i, i + 1, parts[i], parts[i + 1]))
        heapq.heapify(heap)
        alive = [True] * n
        while heap:
            _, i, j, left, right = heapq.heappop(heap)
            if not (alive[i] and alive[j] and nxt[i] == j and parts[i] == left and parts[j] == right):
                continue  # stale: one side was merged since this pair was queued
            parts[i] = left + right
            alive[j] = False
            k = nxt[j]
            nxt[i] = k
            if k >= 0:
                prv[k] = i
                rank = ranks.get((parts[i], parts[k]))
                if rank is not None:
                    heapq.heappush(heap, (rank, i, k, parts[i], parts[k]))
            p = prv[i]
            if p >= 0:
                rank = ranks.get((parts[p], parts[i]))
                if rank is not None:
                    heapq.heappush(heap, (rank, p, i, parts[p], parts[i]))
        out = []
        i = 0
        while i >= 0:
            out.append(parts[i])
            i = nxt[i]
        return out

    # -- SentencePiece --

    def _encode_spm(self, text: str, out: list[int]) -> None:
        """llm_tokenizer_spm: merge the best-scoring adjacent pair whose text is a token."""
        if not text:
            return
        text_to_id, scores = self._text_to_id, self._scores
        parts = list(text)
        n = len(parts)
        nxt = [*range(1, n), -1]
        prv = list(range(-1, n - 1))
        heap: list[tuple[float, int, int, int]] = []

        def push(i: int, j: int) -> None:
            tid = text_to_id.get(parts[i] + parts[j])
            if tid is not None:
                heapq.heappush(heap, (-scores[tid], i, j, len(parts[i]) + len(parts[j])))

        for i in range(n - 1):
            push(i, i + 1)
        while heap:
            _, i, j, size = heapq.heappop(heap)
            if not parts[i] or not parts[j] or len(parts[i]) + len(parts[j]) != size:
                continue  # stale
            parts[i] += parts[j]
            parts[j] = ""
            k = nxt[j]
            nxt[i] = k
            if k >= 0:
                prv[k] = i
            if prv[i] >= 0:
                push(prv[i], i)
            if k >= 0:
                push(i, k)
        i = 0
        while i >= 0:
            piece = parts[i]
            tid = text_to_id.get(piece)
            if tid is not None:
                out.append(tid)
            else:
                for b in piece.encode("utf-8", "surrogatepass"):
                    out.append(self._spm_byte_token(b))
            i = nxt[i]

    def _spm_byte_token(self, b: int) -> int:
        tid = self._byte_ids[b]
        if tid is None:
            if self.unk_id is None:
                raise ValueError(
                    f"{self.source}: no <0x{b:02X}> byte token for byte fallback and no unknown token"
                )
            return self.unk_id
        return tid

    # ---- decoding ------------------------------------------------------------------

    def token_to_piece(self, tid: int, special: bool = True) -> bytes:
        """The bytes of one token, as `llama_token_to_piece` (no leading-space strip).

        Control and unknown tokens give their text only when `special` is true; a piece may be
        part of a UTF-8 character (byte tokens), hence bytes.
        """
        self._check_id(tid)
        if not special and self._hidden[tid]:
            return b""
        return self._pieces[tid]

    def piece(self, tid: int) -> str:
        """A token's piece for display: special tokens as text, partial UTF-8 bytes as \\xNN."""
        return self.token_to_piece(tid, special=True).decode("utf-8", "backslashreplace")

    def decode_bytes(self, ids: Iterable[int], special: bool = False) -> bytes:
        """`decode` before UTF-8 decoding (llama_detokenize with remove_special=false)."""
        pieces = [self.token_to_piece(t, special) for t in ids]
        if pieces and self.add_space_prefix and pieces[0][:1] == b" ":
            pieces[0] = pieces[0][1:]
        data = b"".join(pieces)
        if self.clean_spaces and data:
            data = _clean_spaces(data)
        return data

    def decode(self, ids: Iterable[int], special: bool = False) -> str:
        """Token ids -> text; special tokens are dropped unless `special`.

        Invalid UTF-8 (e.g. a cut multi-byte character) becomes U+FFFD.
        """
        return self.decode_bytes(ids, special).decode("utf-8", "replace")

    def __repr__(self) -> str:
        return f"Tokenizer(model={self.model!r}, pre={self.pre!r}, n_vocab={self.n_vocab}, source={self.source!r})"


_SPACE_BEFORE_PUNCT = regex.compile(rb" (?=[?!.,])")
_SPACED_APOSTROPHE = regex.compile(rb" ' ")
_SPACE_CONTRACTION = regex.compile(rb" '(?=[sm]|re|ve)")


def _clean_spaces(data: bytes) -> bytes:
    """llama.cpp's clean_up_tokenization_spaces: " ?" -> "?", " ' " -> "'", " 's" -> "'s"."""
    data = _SPACE_BEFORE_PUNCT.sub(b"", data)
    data = _SPACED_APOSTROPHE.sub(b"'", data)
    return _SPACE_CONTRACTION.sub(b"'", data)


class StreamDecoder:
    """Turns a stream of token ids into text, holding back incomplete UTF-8 characters.

    A character can be split over byte tokens (emoji, CJK); `push` returns only complete text
    and `flush` whatever is left (an unfinished character becomes U+FFFD). Pieces are exactly
    `token_to_piece(id, special)`, like llama.cpp's streaming output (no leading-space strip).
    """

    def __init__(self, tokenizer: Tokenizer, special: bool = False) -> None:
        self.tokenizer = tokenizer
        self.special = special
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, tid: int) -> str:
        return self._decoder.decode(self.tokenizer.token_to_piece(tid, self.special))

    def flush(self) -> str:
        text = self._decoder.decode(b"", final=True)
        self._decoder.reset()
        return text
