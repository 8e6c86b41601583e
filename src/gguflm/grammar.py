"""Constrained output: GBNF grammars and JSON Schema, enforced token by token.

llama.cpp constrains sampling with a grammar (`--grammar`, `--json-schema`, the server's
`response_format`). We do not write a grammar engine; we use llguidance (Rust, no dependencies,
an Earley parser over a token trie) and map our vocabulary onto it:

- every token is given as the exact bytes it stands for (`Tokenizer.token_to_piece`), so a
  byte-level BPE token holding half of a UTF-8 character is half a character to the grammar too;
- control, unknown and unused tokens are not text: they get llguidance's special-token marker
  (a leading 0xFF byte, never valid UTF-8), so no grammar string can match them;
- the end-of-generation ids (EOS, EOT, ...) are the grammar's end: allowed exactly when the
  text so far is a complete sentence of the grammar.

Where a grammar forces text (a literal, a JSON key), llguidance allows only tokens that follow
the canonical tokenization of that text (asked of `encode_exact`), so the model sees the token
sequences it was trained on; every allowed token is still grammatical.

`Grammar` is the checked description (malformed input fails here with `GrammarError`, before
any token is generated); `Grammar.matcher(tokenizer)` gives a `GrammarMatcher`, the per-sequence
state that masks logits and accepts tokens. Why llguidance and not xgrammar: see
benchmarks/bench_grammar.py's docstring.
"""

from __future__ import annotations

import json
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import llguidance
import numpy as np
import torch

from gguflm.tokenizer import TokenAttr, Tokenizer

__all__ = [
    "Grammar",
    "GrammarError",
    "GrammarMatcher",
    "TokenRejected",
    "constrain",
    "encode_exact",
    "tokenizer_info",
]

GrammarKind = Literal["gbnf", "json_schema", "json_object"]

# llama.cpp's json-schema-to-grammar allows `| " " | "\n"{1,2} [ \t]{0,20}` between JSON tokens:
# free whitespace lets a small model loop on newlines until max_tokens, bounded whitespace cannot.
JSON_WHITESPACE = r"(?: |\n{1,2}[ \t]{0,20})?"

_SPECIAL_MARKER = b"\xff"  # llguidance: a token whose bytes start with 0xFF is a special token
_NOT_TEXT = TokenAttr.CONTROL | TokenAttr.UNKNOWN | TokenAttr.UNUSED


class GrammarError(ValueError):
    """A grammar or JSON schema the engine refuses; raised when the constraint is built."""


class TokenRejected(ValueError):
    """`GrammarMatcher.accept` was given a token the grammar does not allow in this state."""


@dataclass(frozen=True)
class Grammar:
    """A checked constraint, independent of any tokenizer; build it with a `from_*` constructor.

    `spec` is llguidance's serialized grammar; `source` is what the user gave, for messages.
    """

    kind: GrammarKind
    source: str
    spec: str

    @classmethod
    def from_gbnf(cls, text: str) -> Grammar:
        """A llama.cpp GBNF grammar (`root ::= "yes" | "no"`); llguidance translates it to its Lark form."""
        if not isinstance(text, str):
            raise GrammarError(f"a GBNF grammar is text, not {type(text).__name__}")
        try:
            spec = llguidance.grammar_from("gbnf", text)
        except ValueError as e:  # the translator's message names the line and the rule
            raise GrammarError(f"invalid GBNF grammar: {e}") from None
        return cls._checked("gbnf", text, spec)

    @classmethod
    def from_json_schema(cls, schema: Mapping[str, Any] | str | bool, *, compact: bool = False) -> Grammar:
        """Output that validates against a JSON Schema (a dict, or its JSON text).

        `compact` allows no whitespace between JSON tokens; otherwise a little (JSON_WHITESPACE).
        """
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise GrammarError(f"invalid JSON schema: not JSON ({e})") from None
        if not isinstance(schema, Mapping | bool):
            raise GrammarError(f"invalid JSON schema: expected an object or a boolean, got {schema!r:.80}")
        source = json.dumps(schema, ensure_ascii=False)
        options: dict[str, Any] = (
            {"whitespace_flexible": False} if compact else {"whitespace_pattern": JSON_WHITESPACE}
        )
        try:
            spec = llguidance.LLMatcher.grammar_from_json_schema(source, overrides=options)  # type: ignore[arg-type]
        except ValueError as e:
            raise GrammarError(f"invalid JSON schema: {e}") from None
        return cls._checked("json_schema", source, spec)

    @classmethod
    def json_object(cls) -> Grammar:
        """Any JSON object, like OpenAI's `response_format={"type": "json_object"}`."""
        return cls._checked(
            "json_object",
            '{"type": "object"}',
            llguidance.LLMatcher.grammar_from_json_schema(
                {"type": "object"},
                overrides={"whitespace_pattern": JSON_WHITESPACE},
            ),
        )

    @classmethod
    def from_response_format(cls, response_format: Mapping[str, Any] | None) -> Grammar | None:
        """The grammar an OpenAI-style `response_format` asks for; None for plain text.

        Accepts `{"type": "text"}`, `{"type": "json_object"}` (with an optional "schema", as
        llama.cpp's server does) and `{"type": "json_schema", "json_schema": {"schema": {...}}}`.
        """
        if response_format is None:
            return None
        kind = response_format.get("type", "text")
        if kind == "text":
            return None
        if kind == "json_object":
            schema = response_format.get("schema")
            return cls.json_object() if schema is None else cls.from_json_schema(schema)
        if kind == "json_schema":
            wrapper = response_format.get("json_schema")
            schema = wrapper.get("schema") if isinstance(wrapper, Mapping) else None
            if schema is None:
                raise GrammarError('response_format "json_schema" needs {"json_schema": {"schema": {...}}}')
            return cls.from_json_schema(schema)
        raise GrammarError(f"unknown response_format type {kind!r} (text, json_object, json_schema)")

    @classmethod
    def _checked(cls, kind: GrammarKind, source: str, spec: str) -> Grammar:
        """Compile once without a tokenizer so errors surface now, not at the first token."""
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(spec)
        if is_error:
            what = "GBNF grammar" if kind == "gbnf" else "JSON schema"
            raise GrammarError(f"invalid {what}: {messages[0] if messages else 'rejected by llguidance'}")
        return cls(kind=kind, source=source, spec=spec)

    def matcher(self, tokenizer: Tokenizer) -> GrammarMatcher:
        """A fresh per-sequence matcher over `tokenizer`'s vocabulary."""
        return GrammarMatcher(self, tokenizer)

    def __repr__(self) -> str:
        return f"Grammar({self.kind}, {self.source!r:.80})"


# ---- vocabulary mapping ------------------------------------------------------------------

_INFO_CACHE: weakref.WeakKeyDictionary[Tokenizer, llguidance.LLTokenizer] = weakref.WeakKeyDictionary()


class _VocabForLLG:
    """The duck-typed tokenizer `llguidance.TokenizerWrapper` reads (tokens, ids, an encoder).

    It holds the Tokenizer weakly: the cache below maps Tokenizer -> LLTokenizer, and a strong
    reference from the value would keep the key alive for ever.
    """

    def __init__(self, tokenizer: Tokenizer, eog: list[int]) -> None:
        self.tokens = _token_bytes(tokenizer)
        self.eos_token_id = eog[0]
        self.bos_token_id = tokenizer.bos_id
        self.special_token_ids = [i for i, t in enumerate(self.tokens) if t[:1] == _SPECIAL_MARKER]
        self._tokenizer = weakref.ref(tokenizer)

    def __call__(self, data: bytes) -> list[int]:
        tokenizer = self._tokenizer()
        if tokenizer is None:
            raise RuntimeError("the Tokenizer this grammar vocabulary was built from is gone")
        return encode_exact(tokenizer, data.decode("utf-8", "replace"))


def _token_bytes(tokenizer: Tokenizer) -> list[bytes]:
    """Each token's bytes as the grammar sees them; non-text tokens get the special marker."""
    out: list[bytes] = []
    for tid in range(tokenizer.n_vocab):
        piece = tokenizer.token_to_piece(tid, special=True)
        if not piece or tokenizer.token_attr(tid) & _NOT_TEXT:
            piece = _SPECIAL_MARKER + tokenizer.token_text(tid).encode("utf-8", "surrogatepass")
        out.append(piece)
    return out


def encode_exact(tokenizer: Tokenizer, text: str) -> list[int]:
    """Token ids whose pieces spell exactly `text`, which llguidance asks for forced bytes.

    `Tokenizer.encode` adds SentencePiece's leading space (add_space_prefix); here text in the
    middle of an output is meant, so encode it after a newline and drop that prefix's tokens.
    """
    if not (tokenizer.is_spm and tokenizer.add_space_prefix) or not text:
        return tokenizer.encode(text, add_special=False)
    ids = tokenizer.encode("\n" + text, add_special=False)
    spelled = b""
    for k, tid in enumerate(ids):
        spelled += tokenizer.token_to_piece(tid, special=True)
        if spelled in (b"\n", b" \n"):
            return ids[k + 1 :]
        if len(spelled) >= 2:
            break
    return tokenizer.encode(text, add_special=False)  # the newline merged with the text: rare


def tokenizer_info(tokenizer: Tokenizer) -> llguidance.LLTokenizer:
    """llguidance's view of a vocabulary (token trie), built once per Tokenizer (~0.1 s for 49k)."""
    info = _INFO_CACHE.get(tokenizer)
    if info is None:
        eog = sorted(tokenizer.eog_ids)
        if not eog:
            raise ValueError(
                f"{tokenizer.source}: a grammar needs an end-of-generation token, the vocabulary has none"
            )
        vocab = _VocabForLLG(tokenizer, eog)
        info = llguidance.LLTokenizer(
            llguidance.TokenizerWrapper(vocab), n_vocab=tokenizer.n_vocab, eos_token=eog
        )
        _INFO_CACHE[tokenizer] = info
    return info


# ---- per-sequence state --------------------------------------------------------------------


class GrammarMatcher:
    """Where one sequence is in the grammar: masks logits, accepts the sampled tokens.

    The loop is `logits = m.mask_logits(logits); token = sample(logits); m.accept(token)`.
    End-of-generation tokens are allowed exactly when the output so far is complete; when
    `is_finished()` nothing but them is allowed, so a caller may stop right there.
    """

    def __init__(self, grammar: Grammar, tokenizer: Tokenizer) -> None:
        self.grammar = grammar
        self.tokenizer = tokenizer
        self.n_vocab = tokenizer.n_vocab
        self._matcher = llguidance.LLMatcher(tokenizer_info(tokenizer), grammar.spec, log_level=0)
        if self._matcher.is_error():  # e.g. a grammar naming a special token this vocabulary lacks
            raise GrammarError(f"{grammar!r} does not fit this vocabulary: {self._matcher.get_error()}")
        self._words = torch.zeros((self.n_vocab + 31) // 32, dtype=torch.int32)  # one bit per token
        self._allowed: torch.Tensor | None = None  # bool (n_vocab,) for the current state
        self._on_device: dict[torch.device, torch.Tensor] = {}

    @classmethod
    def _from_state(cls, other: GrammarMatcher, state: llguidance.LLMatcher) -> GrammarMatcher:
        new = cls.__new__(cls)
        new.grammar, new.tokenizer, new.n_vocab = other.grammar, other.tokenizer, other.n_vocab
        new._matcher = state
        new._words = torch.zeros_like(other._words)
        new._allowed = other._allowed
        new._on_device = dict(other._on_device)
        return new

    def allowed(self) -> torch.Tensor:
        """Bool (n_vocab,): the tokens the grammar allows next (computed once per state)."""
        if self._allowed is None:
            words = self._words
            self._matcher.unsafe_compute_mask_ptr(words.data_ptr(), words.numel() * 4)
            self._raise_if_error()
            # bit j of word i is token 32*i + j; little-endian words, so bytes unpack LSB first
            bits = np.unpackbits(words.numpy().view(np.uint8), bitorder="little")[: self.n_vocab]
            self._allowed = torch.from_numpy(bits.view(np.bool_))
            self._on_device = {}
        return self._allowed

    def mask_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """A copy of `logits` (..., n_vocab or more) with disallowed tokens at -inf."""
        allowed = self.allowed()
        width = logits.shape[-1]
        if width < self.n_vocab:
            raise ValueError(f"logits have {width} entries, the vocabulary {self.n_vocab}")
        if width > self.n_vocab or logits.device != allowed.device:
            # padded output rows and other devices: a widened copy, kept until the state moves
            placed = self._on_device.get(logits.device)
            if placed is None or placed.shape[-1] != width:
                placed = torch.nn.functional.pad(allowed, (0, width - self.n_vocab)).to(logits.device)
                self._on_device[logits.device] = placed
            allowed = placed
        if logits.device.type == "cpu" and logits.dtype in (torch.float32, torch.float64):
            # one single-threaded numpy pass: on 49k floats torch's intra-op threads cost more
            # than the work, and much more when other processes hold the cores
            x = logits.detach().numpy()
            return torch.from_numpy(np.where(allowed.numpy(), x, x.dtype.type(-np.inf)))
        return logits.masked_fill(~allowed, float("-inf"))

    def is_allowed(self, token: int) -> bool:
        """Whether `token` may come next; uses the mask when it is already computed."""
        if not 0 <= token < self.n_vocab:
            return False
        if self._allowed is not None:
            return bool(self._allowed[token])
        return self._matcher.validate_tokens([token]) == 1

    def accept(self, token: int) -> None:
        """Advance past a sampled token; `TokenRejected` (state unchanged) if it is not allowed."""
        if not self.is_allowed(token):
            piece = self.tokenizer.token_to_piece(token) if 0 <= token < self.n_vocab else b"?"
            raise TokenRejected(f"token {token} ({piece!r}) is not allowed by the grammar here")
        if not self._matcher.consume_token(token):
            self._raise_if_error()
        self._allowed = None

    def can_end(self) -> bool:
        """Whether the output so far is a complete sentence of the grammar (EOS is allowed)."""
        return self._matcher.is_accepting()

    def is_finished(self) -> bool:
        """True once the grammar allows nothing more than end of generation (or EOS was accepted)."""
        return self._matcher.is_stopped()

    def reset(self) -> None:
        """Back to the start of the grammar, for reuse on a new generation."""
        self._matcher.reset()
        self._raise_if_error()
        self._allowed = None

    def copy(self) -> GrammarMatcher:
        """An independent matcher in the same state (for forking a sequence, e.g. n > 1)."""
        return GrammarMatcher._from_state(self, self._matcher.deep_copy())

    def _raise_if_error(self) -> None:
        if self._matcher.is_error():
            raise GrammarError(f"grammar engine error: {self._matcher.get_error()}")

    def __repr__(self) -> str:
        return f"GrammarMatcher({self.grammar!r}, finished={self.is_finished()})"


def constrain(
    matcher: GrammarMatcher, sample: Callable[[torch.Tensor], int]
) -> Callable[[torch.Tensor], int]:
    """Wrap a `sample(logits) -> token` for `generate`: mask, sample, then accept the token."""

    def constrained(logits: torch.Tensor) -> int:
        token = sample(matcher.mask_logits(logits))
        matcher.accept(token)
        return token

    return constrained
