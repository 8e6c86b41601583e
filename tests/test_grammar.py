"""Constrained output: GBNF and JSON Schema through llguidance, on SmolLM2's byte-level vocabulary.

The model tests check what a user sees (a chat reply that parses and validates); the property
tests drive the matcher with random logits, the harshest sampler, and check that whatever comes
out is a sentence of the grammar, byte-level tokens that cut UTF-8 characters included.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import is_utf8
from hypothesis import given, settings
from hypothesis import strategies as st

from gguflm import Context, Model
from gguflm.chat import ChatTemplate
from gguflm.generate import generate
from gguflm.grammar import (
    Grammar,
    GrammarError,
    GrammarMatcher,
    TokenRejected,
    constrain,
    encode_exact,
    tokenizer_info,
)
from gguflm.tokenizer import Tokenizer

COLOURS = 'root ::= "red" | "green" | "blue"'

# integers and decimals joined by operators, with parentheses: context-free, not regular
ARITHMETIC = r"""
root ::= expr
expr ::= term (("+" | "-" | "*") term)*
term ::= num | "(" expr ")"
num  ::= "-"? [0-9]+ ("." [0-9]+)?
"""

NON_ASCII = ["héllo", "日本", "naïve café", "€5"]

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 24}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def tok(smollm2: Model) -> Tokenizer:
    return smollm2.tokenizer


def greedy(logits: torch.Tensor) -> int:
    return int(torch.argmax(logits))


def gumbel_sample(logits: np.ndarray, rng: np.random.Generator) -> int:
    """A draw from softmax(logits) (Gumbel-max), in numpy: one thread, cheap on a busy machine."""
    return int(np.argmax(logits + rng.gumbel(size=logits.shape).astype(np.float32)))


def chat_ids(model: Model, question: str) -> list[int]:
    template = ChatTemplate.from_metadata(model.file.metadata)
    text = template.render([{"role": "user", "content": question}], add_generation_prompt=True)
    return model.tokenizer.encode(text, add_special=True, parse_special=True)


def run_random(
    matcher: GrammarMatcher, tok: Tokenizer, seed: int, max_tokens: int = 200, finish: list[int] | None = None
) -> list[int]:
    """Sample through the mask from random logits; EOS (and `finish` tokens, e.g. closing
    brackets) get likelier each step so that runs end."""
    rng = np.random.default_rng(seed)
    boost = sorted(tok.eog_ids) + (finish or [])
    out: list[int] = []
    for step in range(max_tokens):
        logits = rng.standard_normal(tok.n_vocab, dtype=np.float32) * 3
        logits[boost] += 0.5 * step
        masked = matcher.mask_logits(torch.from_numpy(logits)).numpy()
        assert np.isfinite(masked).any(), "the grammar left no token allowed"
        token = gumbel_sample(masked, rng)
        matcher.accept(token)
        if token in tok.eog_ids:
            return out
        out.append(token)
    pytest.fail(f"seed {seed}: no end of generation after {max_tokens} tokens")


def is_arithmetic(text: str) -> bool:
    """An independent recursive-descent check of ARITHMETIC."""
    pos = 0

    def num() -> bool:
        nonlocal pos
        start = pos
        if text[pos : pos + 1] == "-":
            pos += 1
        digits = pos
        while text[pos : pos + 1].isdigit():
            pos += 1
        if pos == digits:
            pos = start
            return False
        if text[pos : pos + 1] == "." and text[pos + 1 : pos + 2].isdigit():
            pos += 1
            while text[pos : pos + 1].isdigit():
                pos += 1
        return True

    def term() -> bool:
        nonlocal pos
        if text[pos : pos + 1] == "(":
            pos += 1
            if not expr() or text[pos : pos + 1] != ")":
                return False
            pos += 1
            return True
        return num()

    def expr() -> bool:
        nonlocal pos
        if not term():
            return False
        while text[pos : pos + 1] in ("+", "-", "*") and pos < len(text):
            pos += 1
            if not term():
                return False
        return True

    return expr() and pos == len(text)


# ---- with the model ------------------------------------------------------------------------


def test_gbnf_choice_greedy_chat(smollm2: Model) -> None:
    matcher = Grammar.from_gbnf(COLOURS).matcher(smollm2.tokenizer)
    ids = chat_ids(smollm2, "What colour is the sky on a clear day?")
    ctx = Context(smollm2, n_ctx=len(ids) + 16)
    out = list(generate(ctx, ids, 16, constrain(matcher, greedy)))
    assert smollm2.tokenizer.decode(out) in ("red", "green", "blue")
    assert matcher.is_finished()  # the end of generation was forced and accepted


def test_gbnf_choice_model_plus_noise(smollm2: Model) -> None:
    """Sampling (model logits + random noise) still lands on exactly one of the choices."""
    tok = smollm2.tokenizer
    ids = chat_ids(smollm2, "Pick a colour.")
    rng = np.random.default_rng(7)

    def noisy(logits: torch.Tensor) -> int:
        noise = rng.standard_normal(logits.shape[-1], dtype=np.float32) * 5
        return gumbel_sample(logits.numpy() + noise, rng)

    seen = set()
    for _ in range(2):
        ctx = Context(smollm2, n_ctx=len(ids) + 16)
        matcher = Grammar.from_gbnf(COLOURS).matcher(tok)
        text = tok.decode(list(generate(ctx, ids, 16, constrain(matcher, noisy))))
        assert text in ("red", "green", "blue")
        seen.add(text)
    assert seen


def test_json_schema_chat_reply_validates(smollm2: Model) -> None:
    tok = smollm2.tokenizer
    matcher = Grammar.from_json_schema(PERSON).matcher(tok)
    ids = chat_ids(smollm2, "Give me a JSON object describing a person called Alice who is 30 years old.")
    ctx = Context(smollm2, n_ctx=len(ids) + 72)
    out = list(generate(ctx, ids, 64, constrain(matcher, greedy)))
    assert matcher.is_finished(), f"the reply did not end within 64 tokens: {tok.decode(out)!r}"
    reply = json.loads(tok.decode(out))
    assert set(reply) == {"name", "age"}
    assert isinstance(reply["name"], str) and len(reply["name"]) <= 24
    assert isinstance(reply["age"], int) and not isinstance(reply["age"], bool)


# ---- the vocabulary mapping ------------------------------------------------------------------


def test_tokenizer_info_is_built_once(tok: Tokenizer) -> None:
    info = tokenizer_info(tok)
    assert tokenizer_info(tok) is info
    assert info.vocab_size == tok.n_vocab
    assert sorted(info.eos_tokens) == sorted(tok.eog_ids)


def test_end_of_generation_only_when_complete(tok: Tokenizer) -> None:
    matcher = Grammar.from_gbnf(COLOURS).matcher(tok)
    eog = sorted(tok.eog_ids)
    assert not matcher.allowed()[eog].any()
    for t in encode_exact(tok, "gre"):
        matcher.accept(t)
    assert not matcher.can_end() and not matcher.allowed()[eog].any()
    for t in encode_exact(tok, "en"):
        matcher.accept(t)
    assert matcher.can_end() and matcher.is_finished()
    allowed = matcher.allowed()
    assert allowed[eog].all() and int(allowed.sum()) == len(eog)  # only the end is left
    matcher.accept(eog[0])
    assert matcher.is_finished()


def test_control_tokens_are_not_text(tok: Tokenizer) -> None:
    """'<|im_start|>' as grammar text must be spelled with text tokens, never the control token."""
    im_start = tok.text_to_token("<|im_start|>")
    assert im_start is not None and tok.is_control(im_start)
    matcher = Grammar.from_gbnf('root ::= "<|im_start|>"').matcher(tok)
    allowed = matcher.allowed()
    assert not allowed[im_start]
    assert allowed[tok.encode("<|", add_special=False)[0]]
    assert not matcher.is_allowed(im_start)


@pytest.fixture(scope="module")
def pieces(tok: Tokenizer) -> list[bytes]:
    return [b"" if tok.is_control(i) else tok.token_to_piece(i) for i in range(tok.n_vocab)]


@pytest.mark.parametrize("text", NON_ASCII)
def test_allowed_tokens_spell_the_rest(tok: Tokenizer, pieces: list[bytes], text: str) -> None:
    """Walking a string with the shortest allowed token each time (so through states inside a
    character), every allowed token is a text token whose bytes start what is left.

    llguidance may allow fewer: where the grammar forces the bytes, it keeps to the canonical
    tokenization (the tokens the model saw in training) beyond the first token.
    """
    matcher = Grammar.from_gbnf(f'root ::= "{text}"').matcher(tok)
    rest = text.encode()
    while rest:
        allowed = [int(i) for i in matcher.allowed().nonzero()]
        assert allowed and all(pieces[i] and rest.startswith(pieces[i]) for i in allowed), rest
        token = min(allowed, key=lambda i: (len(pieces[i]), i))
        matcher.accept(token)
        rest = rest[len(pieces[token]) :]
    assert matcher.is_finished()


# ---- properties with random logits -------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_random_sampling_yields_arithmetic(tok: Tokenizer, seed: int) -> None:
    matcher = Grammar.from_gbnf(ARITHMETIC).matcher(tok)
    closing = [i for i in range(tok.n_vocab) if set(tok.token_to_piece(i)) == {ord(")")}]
    text = tok.decode_bytes(run_random(matcher, tok, seed, finish=closing)).decode("utf-8")
    assert is_arithmetic(text), text


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_random_sampling_yields_non_ascii_choice(tok: Tokenizer, seed: int) -> None:
    grammar = Grammar.from_gbnf("root ::= " + " | ".join(f'"{s}"' for s in NON_ASCII))
    data = tok.decode_bytes(run_random(grammar.matcher(tok), tok, seed))
    assert data.decode("utf-8") in NON_ASCII


def test_random_sampling_uses_split_utf8_tokens(tok: Tokenizer) -> None:
    """The runs above do pass through tokens that hold part of a character."""
    grammar = Grammar.from_gbnf("root ::= " + " | ".join(f'"{s}"' for s in NON_ASCII))
    partial = 0
    for seed in range(20):
        out = run_random(grammar.matcher(tok), tok, seed)
        assert tok.decode_bytes(out).decode("utf-8") in NON_ASCII
        partial += sum(not is_utf8(tok.token_to_piece(t)) for t in out)
    assert partial > 0


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_random_sampling_yields_schema_valid_json(tok: Tokenizer, seed: int) -> None:
    schema = {
        "type": "object",
        "properties": {
            "ok": {"type": "boolean"},
            "n": {"type": "integer", "minimum": -5, "maximum": 5},
            "tag": {"enum": ["a", "b"]},
        },
        "required": ["ok", "n", "tag"],
        "additionalProperties": False,
    }
    value = json.loads(tok.decode_bytes(run_random(Grammar.from_json_schema(schema).matcher(tok), tok, seed)))
    assert set(value) == {"ok", "n", "tag"}
    assert isinstance(value["ok"], bool)
    assert type(value["n"]) is int and -5 <= value["n"] <= 5
    assert value["tag"] in ("a", "b")


# ---- matcher API -----------------------------------------------------------------------------


def test_json_object_mode_walks_valid_json_and_refuses_others(tok: Tokenizer) -> None:
    matcher = Grammar.json_object().matcher(tok)
    assert not matcher.is_allowed(tok.encode("[", add_special=False)[0])  # the top level is an object
    for t in encode_exact(tok, '{"a": [1, 2.5, {"b": null}], "c": "é"}'):
        matcher.accept(t)
    assert matcher.can_end()


def test_accept_rejects_without_changing_state(tok: Tokenizer) -> None:
    matcher = Grammar.from_gbnf(COLOURS).matcher(tok)
    (yellow,) = encode_exact(tok, "yellow")
    with pytest.raises(TokenRejected, match="not allowed"):
        matcher.accept(yellow)
    with pytest.raises(TokenRejected):
        matcher.accept(tok.n_vocab + 5)
    for t in encode_exact(tok, "red"):
        matcher.accept(t)
    assert matcher.is_finished()


def test_reset_and_copy(tok: Tokenizer) -> None:
    matcher = Grammar.from_gbnf(COLOURS).matcher(tok)
    start = matcher.allowed().clone()
    (b,) = encode_exact(tok, "b")
    matcher.accept(b)
    fork = matcher.copy()
    for t in encode_exact(tok, "lue"):
        fork.accept(t)
    assert fork.is_finished() and not matcher.is_finished()  # the fork moved on alone
    assert not torch.equal(matcher.allowed(), start)
    matcher.reset()
    assert torch.equal(matcher.allowed(), start)


def test_mask_logits_shapes(tok: Tokenizer) -> None:
    matcher = Grammar.from_gbnf(COLOURS).matcher(tok)
    allowed = matcher.allowed()
    logits = torch.zeros(tok.n_vocab)
    masked = matcher.mask_logits(logits)
    assert torch.equal(torch.isfinite(masked), allowed) and torch.equal(logits, torch.zeros(tok.n_vocab))
    wide = matcher.mask_logits(torch.zeros(2, tok.n_vocab + 64))  # padded output rows
    assert wide.shape == (2, tok.n_vocab + 64) and torch.isinf(wide[:, tok.n_vocab :]).all()
    assert torch.equal(torch.isfinite(wide[1, : tok.n_vocab]), allowed)
    with pytest.raises(ValueError, match="logits"):
        matcher.mask_logits(torch.zeros(10))


# ---- errors before generation ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("gbnf", "message"),
    [
        ("root ::= foo", "foo"),
        ('root ::= "unterminated', "end of input"),
        ('expr ::= "a"', "root"),
        ("root ::= [a-", "end of input"),
    ],
)
def test_malformed_gbnf(gbnf: str, message: str) -> None:
    with pytest.raises(GrammarError, match=message) as info:
        Grammar.from_gbnf(gbnf)
    assert isinstance(info.value, ValueError) and "GBNF" in str(info.value)


@pytest.mark.parametrize(
    ("schema", "message"),
    [
        ('{"type": "foo"}', "foo"),
        ('{"type": ', "not JSON"),
        ({"type": "string", "pattern": "(("}, "regex"),
        ({"type": "object", "properties": {"a": {"$ref": "#/defs/x"}}}, "/defs/x"),
        ({"type": "string", "maxLength": -1}, "maxLength"),
        ("[1, 2]", "object or a boolean"),
    ],
)
def test_malformed_schema(schema: object, message: str) -> None:
    with pytest.raises(GrammarError, match=message):
        Grammar.from_json_schema(schema)  # type: ignore[arg-type]


def test_malformed_grammar_fails_before_any_decode(smollm2: Model) -> None:
    ctx = Context(smollm2, n_ctx=64)
    with pytest.raises(GrammarError):
        Grammar.from_gbnf("root ::= (").matcher(smollm2.tokenizer)
    assert ctx.kv.seq_pos_max(0) < 0  # nothing was decoded


def test_response_format() -> None:
    assert Grammar.from_response_format(None) is None
    assert Grammar.from_response_format({"type": "text"}) is None
    assert Grammar.from_response_format({"type": "json_object"}).kind == "json_object"  # type: ignore[union-attr]
    rf = {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}}
    assert Grammar.from_response_format(rf).kind == "json_schema"  # type: ignore[union-attr]
    with pytest.raises(GrammarError, match="schema"):
        Grammar.from_response_format({"type": "json_schema"})
    with pytest.raises(GrammarError, match="unknown"):
        Grammar.from_response_format({"type": "xml"})


# ---- a SentencePiece vocabulary --------------------------------------------------------------


def tiny_spm() -> Tokenizer:
    """SPM with byte fallback and a few merges; encode() adds a leading space (add_space_prefix)."""
    words = ["▁", "h", "i", "▁h", "hi", "▁hi"]
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *words]
    types = [2, 3, 3] + [6] * 256 + [1] * len(words)
    scores = [0.0] * 259 + [-1.0, -2.0, -2.0, -5.0, -3.0, -4.0]
    return Tokenizer(
        model="llama",
        tokens=tokens,
        token_types=types,
        scores=scores,
        special_ids={"bos": 1, "eos": 2, "unk": 0},
    )


def test_spm_vocabulary() -> None:
    tok = tiny_spm()
    assert tok.token_to_piece(tok.encode("hi", add_special=False)[0]).startswith(b" ")  # the prefix
    ids = encode_exact(tok, "hi hi")
    assert b"".join(tok.token_to_piece(t) for t in ids) == b"hi hi"
    grammar = Grammar.from_gbnf('root ::= "hi " [a-z] "\\n"')
    for seed in range(10):
        out = run_random(grammar.matcher(tok), tok, seed, max_tokens=20)
        data = b"".join(tok.token_to_piece(t) for t in out)
        assert len(data) == 5 and data.startswith(b"hi ") and data.endswith(b"\n"), data
