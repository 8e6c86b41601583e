"""What every caller's generation shares: `Generation`, one request's state from logits to final
text (sampler, grammar, stop strings, logprobs, finish reason), used by `gguflm.LLM`, `gguflm run` and
the server's engine; `generate`, a plain token loop over a sampling function; and `embed`."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from gguflm.batch import Batch
from gguflm.context import DECODE_OK, Context, normalize
from gguflm.model import Model
from gguflm.sampling import Sampler, log_softmax, top_logprobs
from gguflm.tokenizer import StreamDecoder, Tokenizer

if TYPE_CHECKING:
    from gguflm.grammar import GrammarMatcher


class DecodeError(RuntimeError):
    """Context.decode refused a batch; the status says why (1: no KV room, -1: invalid batch)."""

    def __init__(self, status: int, what: str) -> None:
        reason = "the context is full" if status == 1 else "the batch is invalid"
        super().__init__(f"decode failed for {what} ({reason}, status {status})")
        self.status = status


def decode_tokens(ctx: Context, tokens: list[int], seq_id: int = 0) -> None:
    """Decode tokens for one sequence in batches of n_batch, continuing its cached positions."""
    if not tokens:
        raise ValueError("nothing to decode: the token list is empty")
    for start in range(0, len(tokens), ctx.n_batch):
        chunk = tokens[start : start + ctx.n_batch]
        output = [start + i == len(tokens) - 1 for i in range(len(chunk))]
        status = ctx.decode(Batch.from_tokens(chunk, seq_ids=[[seq_id]] * len(chunk), output=output))
        if status != DECODE_OK:
            raise DecodeError(status, f"{len(chunk)} prompt tokens")


def generate(
    ctx: Context,
    prompt: list[int],
    n_predict: int,
    sample: Callable[[torch.Tensor], int],
    seq_id: int = 0,
    stop_at_eog: bool = True,
) -> Iterator[int]:
    """Yield up to n_predict new tokens (n_predict < 0: until end of generation or a full context)."""
    n_prompt = len(prompt)
    if n_prompt >= ctx.n_ctx:
        raise ValueError(f"the prompt has {n_prompt} tokens, the context holds {ctx.n_ctx}")
    decode_tokens(ctx, prompt, seq_id)
    tokenizer = ctx.model.tokenizer
    n = 0
    while n_predict < 0 or n < n_predict:
        token = sample(ctx.logits(-1))
        if stop_at_eog and tokenizer.is_eog(token):
            return
        yield token
        n += 1
        if n == n_predict or ctx.kv.seq_pos_max(seq_id) + 1 >= ctx.n_ctx:
            return
        status = ctx.decode(Batch.from_tokens([token], seq_ids=[[seq_id]]))
        if status != DECODE_OK:
            raise DecodeError(status, "a generated token")


def embed(
    model: Model,
    prompts: list[list[int]],
    pooling: str,
    embd_normalize: int = 2,
    n_batch: int = 2048,
    contexts: dict[tuple[int, int, str], Context] | None = None,
) -> list[list[float]]:
    """Embeddings of tokenized prompts, like llama-embedding: one vector per prompt when pooling,
    one per token with pooling "none"; each normalized with llama.cpp's common_embd_normalize.

    Prompts are packed in order into batches of up to n_batch tokens, a sequence each, as
    llama-embedding does: one forward per batch instead of one per prompt (64 short texts: 4x).
    Pooling "none" packs at most 512 tokens a batch: every token is an output, logits included.
    `contexts` keeps the embeddings contexts made, by (n_batch, n_seq_max, pooling), for the next
    call (a server embeds often; a context's KV cache is a large allocation); the cache is cleared
    before each batch, so a kept context gives the same vectors as a new one.
    """
    if pooling == "none":
        n_batch = min(n_batch, 512)
    n_batch = max(n_batch, *map(len, prompts))
    batches: list[list[list[int]]] = []
    n_tokens = 0
    for tokens in prompts:
        if batches and n_tokens + len(tokens) <= n_batch:
            batches[-1].append(tokens)
            n_tokens += len(tokens)
        else:
            batches.append([tokens])
            n_tokens = len(tokens)
    key = (n_batch, max(map(len, batches)), pooling)
    ctx = contexts.get(key) if contexts is not None else None
    if ctx is None:
        ctx = Context(
            model,
            n_ctx=n_batch,
            n_batch=n_batch,
            n_ubatch=n_batch,
            n_seq_max=key[1],
            embeddings=True,
            pooling=pooling,
        )
        if contexts is not None:
            contexts[key] = ctx
    vectors: list[list[float]] = []
    for members in batches:
        ctx.kv.clear()
        batch = Batch.from_tokens(
            [t for tokens in members for t in tokens],
            pos=[p for tokens in members for p in range(len(tokens))],
            seq_ids=[[s] for s, tokens in enumerate(members) for _ in tokens],
        )
        status = ctx.decode(batch)
        if status != DECODE_OK:
            raise DecodeError(status, "an embedding batch")
        if pooling == "none":
            rows = [ctx.embeddings(i) for i in range(batch.n_tokens)]
        else:
            rows = [ctx.embeddings_seq(s) for s in range(len(members))]
        vectors.extend(normalize(r, embd_normalize).tolist() for r in rows)
    return vectors


# ---- one request's generation state --------------------------------------------------------------


def find_stop(text: str, stops: Sequence[str], start: int) -> int | None:
    """Where the earliest stop string begins in text[start:], or None."""
    hits = [i for s in stops if (i := text.find(s, start)) >= 0]
    return min(hits) if hits else None


def held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of `text` that could still grow into a stop string."""
    held = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), held, -1):
            if text.endswith(s[:k]):
                held = k
                break
    return held


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens a and b share."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


@dataclass
class GenToken:
    """One generated (or echoed prompt) token, with where its text sits in the returned text."""

    id: int
    start: int  # offset of its text in the completion text (characters)
    text: str  # the text it added (may be "" while a UTF-8 character is incomplete)
    logprob: float | None = None
    top: list[tuple[int, float]] = field(default_factory=list)

    @property
    def end(self) -> int:
        return self.start + len(self.text)


@dataclass
class Piece:
    """A stretch of returned text and the tokens whose text it completes."""

    text: str
    tokens: list[GenToken]


class Generation:
    """One request's state from its first sampled token to its finish reason, whoever decodes.

    `gguflm.LLM`, the CLI and the server's engine all feed it the logits row of the request's last
    decoded token and decode the token it hands back; so the sampler chain, the grammar, stop
    strings (text that could still become one is held back), logprobs and the finish reason
    behave the same everywhere. `step` returns the pieces of text that became final and the token
    to decode next, or None once finished (`finish_reason` "stop" or "length"; `stop_type` says
    which stop: "eos", "word" with `stop_word`, or "limit").
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        sampler: Sampler,
        max_tokens: int,
        stops: Sequence[str] = (),
        n_probs: int | None = None,
        matcher: GrammarMatcher | None = None,
    ) -> None:
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
        self.tokenizer = tokenizer
        self.sampler = sampler
        self.max_tokens = max_tokens
        self.stops = [s for s in stops if s]
        self.n_probs = n_probs
        self.matcher = matcher
        self.n_generated = 0  # tokens sampled and kept (stop-string tokens included, not EOG)
        self.finish_reason: str | None = None
        self.stop_type = "none"
        self.stop_word = ""
        self.tokens: list[int] = []  # every kept token id
        self._decoder = StreamDecoder(tokenizer)
        self._text = ""
        self._emitted = 0  # characters of _text returned so far
        self._pending: list[GenToken] = []  # tokens whose text is not returned yet
        self._longest = max((len(s) for s in self.stops), default=0)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def step(self, logits: torch.Tensor) -> tuple[list[Piece], int | None]:
        """Sample from `logits` (n_vocab,): the final pieces, and the token to decode next or None."""
        if self.done:
            raise RuntimeError("this generation has finished")
        masked = self.matcher.mask_logits(logits) if self.matcher is not None else logits
        token = self.sampler(masked)
        logprob, top = None, []
        if self.n_probs is not None:
            lp = log_softmax(logits)  # the model's distribution, before masks and samplers
            logprob, top = float(lp[token]), top_logprobs(lp, self.n_probs)
        if self.tokenizer.is_eog(token):
            return self._end("stop", "eos"), None
        self.n_generated += 1
        self.tokens.append(token)
        piece = self._decoder.push(token)
        self._pending.append(GenToken(token, len(self._text), piece, logprob, top))
        self._text += piece
        cut = find_stop(self._text, self.stops, max(0, self._emitted - self._longest))
        if cut is not None:
            return self._cut(cut), None
        safe = len(self._text) - held_back(self._text, self.stops)
        pieces = self._release(safe)
        if self.matcher is not None:
            self.matcher.accept(token)
            if self.matcher.is_finished():
                return pieces + self._end("stop", "eos"), None
        if self.n_generated >= self.max_tokens:
            return pieces + self._end("length", "limit"), None
        return pieces, token

    def _release(self, upto: int) -> list[Piece]:
        """Return text up to character `upto` with the tokens it completes."""
        ready = [t for t in self._pending if t.end <= upto]
        self._pending = self._pending[len(ready) :]
        pieces = self._worth(self._text[self._emitted : upto], ready)
        self._emitted = max(self._emitted, upto)
        return pieces

    def _cut(self, cut: int) -> list[Piece]:
        """A stop string begins at `cut`: return the text before it and finish."""
        self.stop_word = next(s for s in self.stops if self._text.startswith(s, cut))
        self.finish_reason, self.stop_type = "stop", "word"
        tokens = [t for t in self._pending if t.start < cut]
        self._pending = []
        pieces = self._worth(self._text[self._emitted : cut], tokens)
        self._text = self._text[:cut]
        self._emitted = cut
        return pieces

    def _end(self, reason: str, stop_type: str) -> list[Piece]:
        """Finish: flush the decoder and whatever text was held back (unless a stop string is in it)."""
        self._text += self._decoder.flush()
        cut = find_stop(self._text, self.stops, max(0, self._emitted - self._longest))
        if cut is not None:
            return self._cut(cut)
        self.finish_reason, self.stop_type = reason, stop_type
        tokens, self._pending = self._pending, []
        pieces = self._worth(self._text[self._emitted :], tokens)
        self._emitted = len(self._text)
        return pieces

    def _worth(self, text: str, tokens: list[GenToken]) -> list[Piece]:
        """A piece when it has text, or tokens whose logprobs were asked for; nothing otherwise."""
        return [Piece(text, tokens)] if text or (tokens and self.n_probs is not None) else []


# ---- OpenAI's logprobs shapes ----------------------------------------------------------------------


def _piece(tokenizer: Tokenizer, tid: int) -> bytes:
    return tokenizer.token_to_piece(tid, special=True)


def completion_logprobs(tokenizer: Tokenizer, tokens: Sequence[GenToken], base: int) -> dict[str, Any]:
    """OpenAI's (and llama-cpp-python's) completion logprobs; offsets count characters from `base`.

    The chosen token is always listed among its top_logprobs, as llama-cpp-python does.
    """
    out: dict[str, Any] = {"tokens": [], "text_offset": [], "token_logprobs": [], "top_logprobs": []}
    for t in tokens:
        text = _piece(tokenizer, t.id).decode("utf-8", errors="replace")
        out["tokens"].append(text)
        out["text_offset"].append(base + t.start)
        out["token_logprobs"].append(t.logprob)
        if t.logprob is None:
            out["top_logprobs"].append(None)
        else:
            top = {_piece(tokenizer, i).decode("utf-8", errors="replace"): lp for i, lp in t.top}
            top[text] = t.logprob
            out["top_logprobs"].append(top)
    return out


def chat_logprobs(tokenizer: Tokenizer, tokens: Sequence[GenToken]) -> dict[str, Any]:
    """OpenAI's chat logprobs: per token its text, logprob, UTF-8 bytes and the top alternatives."""

    def entry(tid: int, logprob: float) -> dict[str, Any]:
        piece = _piece(tokenizer, tid)
        return {"token": piece.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(piece)}

    content = []
    for t in tokens:
        if t.logprob is None:
            raise ValueError(f"token {t.id} has no logprob: the generation was not asked for them")
        content.append({**entry(t.id, t.logprob), "top_logprobs": [entry(i, lp) for i, lp in t.top]})
    return {"content": content, "refusal": None}
