"""The HTTP side of `gguflm serve`: llama-server's routes, OpenAI-compatible and native, on FastAPI.

Handlers parse and check requests, tokenize and render chat templates (pure Python), then hand
`GenRequest`s to the engine thread and read their events from an asyncio queue. They never touch
torch.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gguflm.generate import GenToken, chat_logprobs, completion_logprobs
from gguflm.server import schemas
from gguflm.server.engine import EmbedRequest, Engine, Event, Finished, GenRequest, QueueFull

OPEN_ROUTES = frozenset({"/", "/health", "/v1/health", "/v1/models", "/models"})  # the page holds no secrets
POLL_S = 0.25
MAX_N = 16  # choices per prompt
MAX_CHOICES = 64  # choices per request, over all its prompts
MAX_TOP_LOGPROBS = 20
RETRY_AFTER_S = 1


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"code", "message", "type"}}."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
        **extra: Any,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.extra = status, message, type_, extra
        self.headers = headers


def error_response(
    status: int, message: str, type_: str, headers: dict[str, str] | None = None, **extra: Any
) -> JSONResponse:
    body = {"error": {"code": status, "message": message, "type": type_, **extra}}
    return JSONResponse(body, status, headers=headers)


@dataclass
class ServerConfig:
    alias: str
    api_key: str | None
    embeddings: bool
    chat_template: str | None = None  # a built-in name, a file or Jinja source (None: the GGUF's)
    timeout: float = 600.0  # seconds a generation request may take (0: no limit)
    max_body_bytes: int = 0  # request bodies larger than this get 413 (0: no limit)


class BearerAuth:
    """`Authorization: Bearer KEY` on every route but OPEN_ROUTES and CORS preflights; compared in
    constant time. A plain ASGI middleware: Starlette's BaseHTTPMiddleware would hide client
    disconnects from the handlers (Request.is_disconnected), which cancel requests with them."""

    def __init__(self, app: ASGIApp, key: str) -> None:
        self.app, self.key = app, key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN_ROUTES and scope["method"] != "OPTIONS":
            header = Headers(scope=scope).get("authorization", "")
            given = header[7:] if header.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(given.encode(), self.key):
                response = error_response(401, "invalid or missing API key", "authentication_error")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class LoadingApp:
    """The ASGI app the server listens with: 503 "Loading model" (llama-server's answer, with
    Retry-After) on every route until `ready(app)` hands over the real one, so that a client polling
    /health while a large model loads is told to wait instead of being refused."""

    def __init__(self) -> None:
        self.app: ASGIApp | None = None

    def ready(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        app = self.app
        if app is not None:
            await app(scope, receive, send)
        elif scope["type"] == "http":
            response = error_response(503, "Loading model", "unavailable_error", {"Retry-After": "1"})
            await response(scope, receive, send)


class _BodyTooLarge(Exception):
    pass


class BodyLimit:
    """413 for a body over `limit` bytes: told by Content-Length before reading, or counted while
    reading a chunked body (the handler's read then fails and this answers instead)."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    def _response(self) -> JSONResponse:
        return error_response(
            413,
            f"the request body is larger than {self.limit} bytes (--max-body-bytes)",
            "invalid_request_error",
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = Headers(scope=scope).get("content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            await self._response()(scope, receive, send)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _BodyTooLarge
            return message

        try:
            await self.app(scope, counted, send)
        except _BodyTooLarge:
            await self._response()(scope, receive, send)


# ---- request checking ------------------------------------------------------------------------------


def _number(body: dict[str, Any], name: str, default: float) -> float:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise APIError(400, f"'{name}' must be a number, got {json.dumps(v)[:40]}")
    return float(v)


def _integer(body: dict[str, Any], name: str, default: int | None) -> int | None:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise APIError(400, f"'{name}' must be an integer, got {json.dumps(v)[:40]}")
    return v


# SamplerParams field <- request field (OpenAI's name, else llama-server's), and whether it is an integer
_SAMPLING_FIELDS: tuple[tuple[str, str, bool], ...] = (
    ("temp", "temperature", False),
    ("dynatemp_range", "dynatemp_range", False),
    ("dynatemp_exponent", "dynatemp_exponent", False),
    ("top_k", "top_k", True),
    ("top_p", "top_p", False),
    ("min_p", "min_p", False),
    ("typ_p", "typical_p", False),
    ("top_n_sigma", "top_n_sigma", False),
    ("xtc_probability", "xtc_probability", False),
    ("xtc_threshold", "xtc_threshold", False),
    ("min_keep", "min_keep", True),
    ("penalty_last_n", "repeat_last_n", True),
    ("penalty_repeat", "repeat_penalty", False),
    ("penalty_present", "presence_penalty", False),
    ("penalty_freq", "frequency_penalty", False),
    ("dry_multiplier", "dry_multiplier", False),
    ("dry_base", "dry_base", False),
    ("dry_allowed_length", "dry_allowed_length", True),
    ("dry_penalty_last_n", "dry_penalty_last_n", True),
    ("mirostat", "mirostat", True),
    ("mirostat_tau", "mirostat_tau", False),
    ("mirostat_eta", "mirostat_eta", False),
)


def _ranged(body: dict[str, Any], name: str, default: int, lo: int, hi: int) -> int:
    v = _integer(body, name, default)
    assert v is not None
    if not lo <= v <= hi:
        raise APIError(400, f"'{name}' must be between {lo} and {hi}, got {v}")
    return v


def _boolean(body: dict[str, Any], name: str, default: bool) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise APIError(400, f"'{name}' must be true or false, got {json.dumps(v)[:40]}")
    return v


def _stops(body: dict[str, Any]) -> list[str]:
    v = body.get("stop")
    if v is None:
        return []
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise APIError(400, "'stop' must be a string or a list of strings")
    return [s for s in items if s]


async def _json_body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    return body


async def _until_disconnect(request: Request) -> None:
    """Returns when the client goes away (the body has been read: receive() waits for that)."""
    while (await request.receive())["type"] != "http.disconnect":
        await asyncio.sleep(POLL_S)  # a server that re-sends the body must not spin us


def _timings(done: Finished) -> dict[str, Any]:
    """llama-server's `timings` object."""
    n_prompt = done.n_prompt - done.n_cached
    n_gen = done.n_generated
    return {
        "cache_n": done.n_cached,
        "prompt_n": n_prompt,
        "prompt_ms": done.t_prompt_ms,
        "prompt_per_token_ms": done.t_prompt_ms / n_prompt if n_prompt else 0.0,
        "prompt_per_second": 1e3 * n_prompt / done.t_prompt_ms if done.t_prompt_ms > 0 else 0.0,
        "predicted_n": n_gen,
        "predicted_ms": done.t_gen_ms,
        "predicted_per_token_ms": done.t_gen_ms / n_gen if n_gen else 0.0,
        "predicted_per_second": 1e3 * n_gen / done.t_gen_ms if done.t_gen_ms > 0 else 0.0,
    }


def _usage(done: list[Finished], n: int) -> dict[str, Any]:
    """OpenAI's usage over a request's choices, in index order: each prompt's `n` choices share
    it, so its tokens (and the cached ones) count once."""
    firsts = done[::n]
    n_prompt = sum(d.n_prompt for d in firsts)
    n_gen = sum(d.n_generated for d in done)
    return {
        "prompt_tokens": n_prompt,
        "completion_tokens": n_gen,
        "total_tokens": n_prompt + n_gen,
        "prompt_tokens_details": {"cached_tokens": sum(d.n_cached for d in firsts)},
    }


def _sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


Emitter = Callable[[int], Callable[[Event], None]]
Queue = asyncio.Queue[tuple[int, Event]]


def _queue() -> tuple[Queue, Emitter]:
    """One queue for a request's choices: the engine's events arrive tagged with the choice index."""
    loop = asyncio.get_running_loop()
    q: Queue = asyncio.Queue()

    def emitter(i: int) -> Callable[[Event], None]:
        return lambda event: loop.call_soon_threadsafe(q.put_nowait, (i, event))

    return q, emitter


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gguflm")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown"


# ---- the app ----------------------------------------------------------------------------------------


def build_app(engine: Engine, config: ServerConfig) -> FastAPI:
    from gguflm.chat import ChatTemplate, ChatTemplateError
    from gguflm.grammar import Grammar, GrammarError
    from gguflm.sampling import Sampler, SamplerParams, parse_samplers

    __version__ = _version()
    tok = engine.tokenizer
    metadata = engine.model.file.metadata
    template = ChatTemplate.from_metadata(
        metadata, config.chat_template, add_bos=tok.add_bos, add_eos=tok.add_eos
    )
    app = FastAPI(title="gguflm serve", version=__version__, docs_url=None, redoc_url=None)
    if config.api_key is not None:
        app.add_middleware(BearerAuth, key=config.api_key)
    if config.max_body_bytes:
        app.add_middleware(BodyLimit, limit=config.max_body_bytes)
    # browsers' preflight (OPTIONS) and cross-origin calls, as llama-server allows them; added
    # last, so outermost: a 401 or 413 carries the CORS headers too
    app.add_middleware(
        CORSMiddleware, allow_origins=["*"], allow_methods=["*"], allow_headers=["*"], max_age=600
    )

    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError) -> JSONResponse:
        return error_response(e.status, e.message, e.type, e.headers, **e.extra)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        if e.status_code == 404:
            return error_response(404, f"no route {request.url.path}", "not_found_error")
        return error_response(e.status_code, str(e.detail), "invalid_request_error")

    def default_params() -> dict[str, Any]:
        """The sampling settings a request gets when it gives none (llama-server's defaults)."""
        p = SamplerParams()
        return {
            "n_predict": -1,
            "seed": p.seed,
            "temperature": p.temp,
            "top_k": p.top_k,
            "top_p": p.top_p,
            "min_p": p.min_p,
            "repeat_penalty": p.penalty_repeat,
            "presence_penalty": p.penalty_present,
            "frequency_penalty": p.penalty_freq,
            "stop": [],
            "cache_prompt": True,
        }

    # ---- simple routes -------------------------------------------------------------------------

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        from gguflm.server.page import PAGE

        return HTMLResponse(PAGE)

    @app.get("/health")
    @app.get("/v1/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    @app.get("/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{"id": config.alias, "object": "model", "created": 0, "owned_by": "gguflm"}],
        }

    @app.get("/props")
    async def props() -> dict[str, Any]:
        def text(tid: int | None) -> str:
            return "" if tid is None else tok.token_to_piece(tid, True).decode("utf-8", errors="replace")

        return {
            "default_generation_settings": {
                "n_ctx": engine.n_ctx_slot,
                "params": default_params(),
            },
            "total_slots": engine.n_parallel,
            "model_alias": config.alias,
            "model_path": str(engine.model.path),
            "chat_template": template.source,
            "bos_token": text(tok.bos_id),
            "eos_token": text(tok.eos_id),
            "modalities": {"vision": False, "audio": False},
            "build_info": f"gguflm {__version__}",
        }

    @app.get("/slots")
    async def slots(fail_on_no_slot: bool = False) -> list[dict[str, Any]]:
        """Each slot's state; `?fail_on_no_slot=1` answers 503 when none is free (llama-server's)."""
        info = engine.slot_info()
        if fail_on_no_slot and all(s["is_processing"] for s in info):
            raise APIError(503, "no slot is free", "unavailable_error")
        return info

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        m = engine.metrics
        rows = [
            ("prompt_tokens_total", "counter", "Number of prompt tokens processed.", m.n_prompt_tokens),
            ("prompt_seconds_total", "counter", "Prompt process time", m.t_prompt_s),
            ("tokens_predicted_total", "counter", "Number of generation tokens processed.", m.n_generated),
            ("tokens_predicted_seconds_total", "counter", "Predict process time", m.t_gen_s),
            ("n_decode_total", "counter", "Total number of llama_decode() calls", m.n_decode),
            (
                "n_busy_slots_per_decode",
                "counter",
                "Average number of busy slots per llama_decode() call",
                m.n_busy_slots / m.n_decode if m.n_decode else 0.0,
            ),
            (
                "prompt_tokens_seconds",
                "gauge",
                "Average prompt throughput in tokens/s.",
                m.n_prompt_tokens / m.t_prompt_s if m.t_prompt_s else 0.0,
            ),
            (
                "predicted_tokens_seconds",
                "gauge",
                "Average generation throughput in tokens/s.",
                m.n_generated / m.t_gen_s if m.t_gen_s else 0.0,
            ),
            ("requests_processing", "gauge", "Number of requests processing.", engine.n_busy()),
            ("requests_deferred", "gauge", "Number of requests deferred.", engine.n_deferred()),
        ]
        lines = []
        for name, kind, help_, value in rows:
            lines += [f"# HELP llamacpp:{name} {help_}", f"# TYPE llamacpp:{name} {kind}"]
            lines.append(f"llamacpp:{name} {value}")
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    @app.post("/tokenize", openapi_extra=schemas.body(schemas.TOKENIZE))
    async def tokenize(request: Request) -> dict[str, Any]:
        body = await _json_body(request)
        content = body.get("content")
        if not isinstance(content, str):
            raise APIError(400, "'content' must be a string")
        add_special = _boolean(body, "add_special", False)
        parse_special = _boolean(body, "parse_special", True)
        ids = tok.encode(content, add_special=add_special, parse_special=parse_special)
        if _boolean(body, "with_pieces", False):
            pieces = [
                {"id": i, "piece": tok.token_to_piece(i, True).decode("utf-8", errors="replace")} for i in ids
            ]
            return {"tokens": pieces}
        return {"tokens": ids}

    @app.post("/detokenize", openapi_extra=schemas.body(schemas.DETOKENIZE))
    async def detokenize(request: Request) -> dict[str, Any]:
        body = await _json_body(request)
        ids = _token_ids(body.get("tokens", []), "tokens")
        return {"content": tok.decode(ids, special=True)}

    def _token_ids(v: Any, name: str) -> list[int]:
        if not isinstance(v, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in v):
            raise APIError(400, f"'{name}' must be a list of token ids")
        bad = [t for t in v if not 0 <= t < tok.n_vocab]
        if bad:
            raise APIError(400, f"token id {bad[0]} is outside the vocabulary (0..{tok.n_vocab - 1})")
        return v

    def _render(body: dict[str, Any]) -> str:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise APIError(400, "'messages' must be a non-empty list of messages")
        tools = body.get("tools")
        if tools is not None and not isinstance(tools, list):
            raise APIError(400, "'tools' must be a list")
        try:
            return template.render(messages, add_generation_prompt=True, tools=tools or None)
        except (ValueError, ChatTemplateError) as e:
            raise APIError(400, str(e)) from None

    @app.post("/apply-template", openapi_extra=schemas.body(schemas.APPLY_TEMPLATE))
    async def apply_template(request: Request) -> dict[str, str]:
        return {"prompt": _render(await _json_body(request))}

    # ---- generation ----------------------------------------------------------------------------

    def _logit_bias(body: dict[str, Any]) -> dict[int, float]:
        """OpenAI's {"token id": bias} (keys are strings in JSON), or llama.cpp's [[id, bias], ...];
        `ignore_eos` adds -inf for the end-of-generation tokens, as llama-server does."""
        raw = body.get("logit_bias") or {}
        pairs = list(raw.items()) if isinstance(raw, dict) else raw
        if not isinstance(pairs, list):
            raise APIError(400, "'logit_bias' must be an object of token id -> bias")
        bias: dict[int, float] = {}
        for pair in pairs:
            if not (isinstance(pair, list | tuple) and len(pair) == 2):
                raise APIError(400, "'logit_bias' entries must be token id -> bias")
            key, value = pair
            try:
                tid = int(key)
            except (TypeError, ValueError):
                raise APIError(400, f"'logit_bias' keys are token ids, got {key!r}") from None
            if not 0 <= tid < tok.n_vocab:
                raise APIError(400, f"'logit_bias' token id {tid} is outside the vocabulary")
            if value is False:
                value = float("-inf")  # llama.cpp: false bans the token
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise APIError(400, f"'logit_bias' values must be numbers, got {value!r}")
            bias[tid] = float(value)
        if _boolean(body, "ignore_eos", False):
            bias.update(dict.fromkeys(tok.eog_ids, float("-inf")))
        return bias

    def _string_list(body: dict[str, Any], name: str) -> list[str] | None:
        v = body.get(name)
        if v is None:
            return None
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise APIError(400, f"'{name}' must be a list of strings")
        return v

    def _sampler_params(body: dict[str, Any], choice: int) -> SamplerParams:
        """OpenAI's fields and llama-server's extra ones (its names) -> SamplerParams; ValueError
        from SamplerParams (a value out of range) becomes a 400. Choice i of a seeded request uses
        seed + i, so that n > 1 choices differ."""
        seed = _integer(body, "seed", None)
        if seed is None or seed in (-1, 0xFFFFFFFF):
            seed = 0xFFFFFFFF
        else:
            seed = (seed + choice) & 0xFFFFFFFF
        d = SamplerParams()
        extra: dict[str, Any] = {}
        samplers = body.get("samplers")
        if samplers is not None:
            if isinstance(samplers, str):
                try:
                    extra["samplers"] = parse_samplers(samplers)
                except ValueError as e:
                    raise APIError(400, f"'samplers': {e}") from None
            else:
                extra["samplers"] = _string_list(body, "samplers")
        breakers = _string_list(body, "dry_sequence_breakers")
        if breakers is not None:
            extra["dry_sequence_breakers"] = tuple(breakers)
        try:
            read = {
                field: (_integer if is_int else _number)(body, name, getattr(d, field))
                for field, name, is_int in _SAMPLING_FIELDS
            }
            return SamplerParams(
                seed=seed,
                **read,
                logit_bias=_logit_bias(body),
                **extra,
            )
        except ValueError as e:
            raise APIError(400, str(e)) from None

    def _sampler(params: SamplerParams, prompt: list[int]) -> Sampler:
        """A ready sampler whose penalties have seen the prompt's last repeat_last_n tokens."""
        sampler = Sampler(params, n_ctx=engine.n_ctx_slot, tokenizer=tok)
        window = params.penalty_last_n if params.penalty_last_n >= 0 else engine.n_ctx_slot
        sampler.accept_prompt(prompt[-window:] if window else [])
        return sampler

    def _grammar(body: dict[str, Any]) -> Grammar | None:
        """`response_format` (OpenAI), `json_schema` or `grammar` (GBNF, llama-server's fields)."""
        given = [k for k in ("response_format", "json_schema", "grammar") if body.get(k) is not None]
        if len(given) > 1:
            raise APIError(400, f"give one of {', '.join(given)}, not several")
        try:
            if body.get("response_format") is not None:
                rf = body["response_format"]
                if not isinstance(rf, dict):
                    raise APIError(400, "'response_format' must be an object")
                return Grammar.from_response_format(rf)
            if body.get("json_schema") is not None:
                return Grammar.from_json_schema(body["json_schema"])
            if body.get("grammar") is not None:
                if not isinstance(body["grammar"], str):
                    raise APIError(400, "'grammar' must be GBNF text")
                return Grammar.from_gbnf(body["grammar"])
        except (GrammarError, ValueError, TypeError) as e:
            raise APIError(400, f"bad grammar: {e}") from None
        return None

    def _max_tokens(body: dict[str, Any], n_prompt: int) -> int:
        max_tokens = _integer(body, "max_completion_tokens", None)
        if max_tokens is None:
            max_tokens = _integer(body, "max_tokens", None)
        if max_tokens is None:
            max_tokens = _integer(body, "n_predict", -1)
        assert max_tokens is not None
        if max_tokens == 0 or max_tokens < -1:
            raise APIError(
                400, f"max_tokens must be at least 1 (n_predict: -1 for no limit), got {max_tokens}"
            )
        room = engine.n_ctx_slot - n_prompt
        return room if max_tokens < 0 else min(max_tokens, room)

    def _check_prompt(prompt: list[int]) -> None:
        n_prompt, limit = len(prompt), engine.n_ctx_slot
        if n_prompt == 0:
            raise APIError(400, "the prompt is empty")
        if n_prompt >= limit:
            raise APIError(
                400,
                f"the request has {n_prompt} prompt tokens, but a slot's context holds {limit} "
                f"(at most {limit - 1} prompt tokens; -c {engine.n_ctx} shared by -np {engine.n_parallel})",
                "exceed_context_size_error",
                n_prompt_tokens=n_prompt,
                n_ctx=limit,
            )

    async def _requests(
        body: dict[str, Any], prompt: list[int], emitter: Emitter, n: int, n_probs: int | None, first: int = 0
    ) -> list[GenRequest]:
        """Check everything, then build the requests of a prompt's n choices, numbered from
        `first` (nothing is submitted yet)."""
        _check_prompt(prompt)
        max_tokens = _max_tokens(body, len(prompt))
        stops = _stops(body)
        cache_prompt = _boolean(body, "cache_prompt", True)
        grammar = _grammar(body)
        samplers = [_sampler(_sampler_params(body, i), prompt) for i in range(n)]
        matchers = [None] * n
        if grammar is not None:  # compiling a schema's token mask can take a while: off the loop
            try:
                matchers = await asyncio.to_thread(lambda: [grammar.matcher(tok) for _ in range(n)])
            except (GrammarError, ValueError) as e:
                raise APIError(400, f"bad grammar: {e}") from None
        reqs = []
        for i in range(n):
            reqs.append(
                GenRequest(
                    prompt,
                    samplers[i],
                    max_tokens,
                    stops,
                    emitter(first + i),
                    n_probs,
                    matchers[i],
                    cache_prompt,
                )
            )
        return reqs

    def _submit(reqs: list[GenRequest]) -> None:
        """All or none: a full queue cancels the ones already in and answers 503 + Retry-After."""
        for i, req in enumerate(reqs):
            try:
                engine.submit(req)
            except QueueFull as e:
                for r in reqs[:i]:
                    r.cancel()
                raise APIError(
                    503,
                    f"the server is busy ({e}); retry later",
                    "unavailable_error",
                    headers={"Retry-After": str(RETRY_AFTER_S)},
                ) from None

    def _deadline() -> float | None:
        return asyncio.get_running_loop().time() + config.timeout if config.timeout > 0 else None

    async def _next(q: Queue, deadline: float | None) -> tuple[int, Event]:
        if deadline is None:
            return await q.get()
        left = deadline - asyncio.get_running_loop().time()
        try:
            return await asyncio.wait_for(q.get(), max(left, 0.0))
        except TimeoutError:
            raise APIError(
                408,
                f"the request took longer than the server's --timeout of {config.timeout:g} s",
                "timeout_error",
            ) from None

    async def _collect(
        request: Request, reqs: list[GenRequest], q: Queue
    ) -> list[tuple[str, list[GenToken], Finished]]:
        """Wait for every choice of a non-streamed request; a client that leaves cancels them."""
        texts: list[list[str]] = [[] for _ in reqs]
        tokens: list[list[GenToken]] = [[] for _ in reqs]
        done: list[Finished | None] = [None] * len(reqs)
        deadline = _deadline()
        watch = asyncio.ensure_future(_until_disconnect(request))
        try:
            while any(d is None for d in done):
                getter = asyncio.ensure_future(_next(q, deadline))
                await asyncio.wait({getter, watch}, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    raise APIError(499, "client closed the request")
                i, event = getter.result()
                if event[0] == "text":
                    texts[i].append(event[1])
                    tokens[i].extend(event[2])
                elif event[0] == "error":
                    raise APIError(500, event[1], "server_error")
                else:
                    done[i] = event[1]
        finally:
            watch.cancel()
            for req in reqs:
                req.cancel()  # a no-op once finished; frees the slot on any other way out
        return [("".join(t), k, d) for t, k, d in zip(texts, tokens, done, strict=True) if d is not None]

    async def _events(reqs: list[GenRequest], q: Queue) -> AsyncIterator[tuple[int, Event]]:
        """A streamed request's events until every choice is done; an engine error or the timeout
        ends it with an error event. Leaving early (a disconnect) cancels the choices."""
        left = len(reqs)
        deadline = _deadline()
        try:
            while left:
                try:
                    i, event = await _next(q, deadline)
                except APIError as e:
                    yield 0, ("error", e.message, e.status, e.type)
                    return
                if event[0] == "error":
                    yield i, ("error", event[1], 500, "server_error")
                    return
                if event[0] == "done":
                    left -= 1
                yield i, event
        finally:
            for req in reqs:
                req.cancel()

    def _error_sse(event: Event) -> str:
        return _sse({"error": {"code": event[2], "message": event[1], "type": event[3]}})

    def _stream_options(body: dict[str, Any]) -> bool:
        opts = body.get("stream_options")
        if opts is None:
            return False
        if not isinstance(opts, dict):
            raise APIError(400, "'stream_options' must be an object")
        return _boolean(opts, "include_usage", False)

    def _prompt_tokens(prompt: Any) -> list[int]:
        """A prompt as text or token ids (a one-item list of either too)."""
        prompts = _prompt_list(prompt)
        if len(prompts) != 1:
            raise APIError(400, "'prompt' must be one prompt here: a string or a list of token ids")
        return prompts[0]

    def _prompt_list(prompt: Any) -> list[list[int]]:
        """OpenAI's prompt: a string, token ids, or a list of strings and token-id lists (a batch)."""
        if isinstance(prompt, str):
            return [tok.encode(prompt, add_special=True, parse_special=True)]
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            return [_token_ids(prompt, "prompt")]
        if isinstance(prompt, list) and prompt and all(isinstance(p, str | list) for p in prompt):
            out: list[list[int]] = []
            for item in prompt:
                if isinstance(item, list) and not all(isinstance(t, int) for t in item):
                    raise APIError(400, "a prompt in a batch must be a string or a list of token ids")
                out += _prompt_list(item)
            return out
        raise APIError(400, "'prompt' must be a string, a list of token ids, or a list of those")

    def _head(prefix: str, obj: str) -> dict[str, Any]:
        return {
            "id": f"{prefix}-{uuid.uuid4().hex}",
            "object": obj,
            "created": int(time.time()),
            "model": config.alias,
        }

    # ---- OpenAI completions -----------------------------------------------------------------------

    @app.post("/v1/completions", openapi_extra=schemas.body(schemas.COMPLETIONS))
    async def completions(request: Request) -> Any:
        """OpenAI's completions; a batch of prompts gives choice p * n + j for prompt p's choice j."""
        body = await _json_body(request)
        prompts = _prompt_list(body.get("prompt"))
        stream = _boolean(body, "stream", False)
        include_usage = _stream_options(body)
        n = _ranged(body, "n", 1, 1, MAX_N)
        if len(prompts) * n > MAX_CHOICES:
            raise APIError(400, f"{len(prompts)} prompts x n = {n} is more than {MAX_CHOICES} choices")
        n_probs = body.get("logprobs")
        if n_probs is not None:
            n_probs = _ranged(body, "logprobs", 0, 0, MAX_TOP_LOGPROBS)
        q, emitter = _queue()
        reqs = []
        for p, tokens in enumerate(prompts):
            reqs += await _requests(body, tokens, emitter, n, n_probs, p * n)
        head = _head("cmpl", "text_completion")

        def choice(i: int, text: str, toks: list[GenToken], finish: str | None) -> dict[str, Any]:
            lp = completion_logprobs(tok, toks, 0) if n_probs is not None else None
            return {"text": text, "index": i, "logprobs": lp, "finish_reason": finish}

        _submit(reqs)
        if stream:

            async def gen() -> AsyncIterator[str]:
                done: dict[int, Finished] = {}
                async for i, event in _events(reqs, q):
                    if event[0] == "text":
                        yield _sse({**head, "choices": [choice(i, event[1], event[2], None)]})
                    elif event[0] == "done":
                        done[i] = event[1]
                        last = {**head, "choices": [choice(i, "", [], event[1].finish_reason)]}
                        yield _sse(
                            {**last, "timings": _timings(event[1])} if len(done) == len(reqs) else last
                        )
                    else:
                        yield _error_sse(event)
                if include_usage and len(done) == len(reqs):
                    yield _sse({**head, "choices": [], "usage": _usage([done[k] for k in sorted(done)], n)})
                yield "data: [DONE]\n\n"

            return StreamingResponse(gen(), media_type="text/event-stream")
        results = await _collect(request, reqs, q)
        return {
            **head,
            "choices": [choice(i, text, toks, d.finish_reason) for i, (text, toks, d) in enumerate(results)],
            "usage": _usage([d for *_, d in results], n),
            "timings": _timings(results[0][2]),
        }

    # ---- OpenAI chat ------------------------------------------------------------------------------

    @app.post("/v1/chat/completions", openapi_extra=schemas.body(schemas.CHAT))
    @app.post("/chat/completions", openapi_extra=schemas.body(schemas.CHAT))
    async def chat_completions(request: Request) -> Any:
        body = await _json_body(request)
        tokens = tok.encode(_render(body), add_special=True, parse_special=True)
        stream = _boolean(body, "stream", False)
        include_usage = _stream_options(body)
        n = _ranged(body, "n", 1, 1, MAX_N)
        want_logprobs = _boolean(body, "logprobs", False)
        n_top = _ranged(body, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS)
        if body.get("top_logprobs") is not None and not want_logprobs:
            raise APIError(400, "'top_logprobs' needs 'logprobs': true")
        n_probs = n_top if want_logprobs else None
        q, emitter = _queue()
        reqs = await _requests(body, tokens, emitter, n, n_probs)
        head = _head("chatcmpl", "chat.completion.chunk")

        def lp(toks: list[GenToken]) -> dict[str, Any] | None:
            return chat_logprobs(tok, toks) if want_logprobs else None

        def delta(
            i: int, d: dict[str, Any], toks: list[GenToken] | None, finish: str | None
        ) -> dict[str, Any]:
            choice = {"index": i, "delta": d, "logprobs": lp(toks) if toks else None, "finish_reason": finish}
            return {**head, "choices": [choice]}

        _submit(reqs)
        if stream:

            async def gen() -> AsyncIterator[str]:
                for i in range(n):
                    yield _sse(delta(i, {"role": "assistant", "content": ""}, None, None))
                done: dict[int, Finished] = {}
                async for i, event in _events(reqs, q):
                    if event[0] == "text":
                        yield _sse(delta(i, {"content": event[1]}, event[2], None))
                    elif event[0] == "done":
                        done[i] = event[1]
                        last = delta(i, {}, None, event[1].finish_reason)
                        yield _sse({**last, "timings": _timings(event[1])} if len(done) == n else last)
                    else:
                        yield _error_sse(event)
                if include_usage and len(done) == n:
                    yield _sse({**head, "choices": [], "usage": _usage([done[k] for k in sorted(done)], n)})
                yield "data: [DONE]\n\n"

            return StreamingResponse(gen(), media_type="text/event-stream")
        results = await _collect(request, reqs, q)
        return {
            **head,
            "object": "chat.completion",
            "choices": [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": lp(toks),
                    "finish_reason": d.finish_reason,
                }
                for i, (text, toks, d) in enumerate(results)
            ],
            "usage": _usage([d for *_, d in results], n),
            "timings": _timings(results[0][2]),
        }

    # ---- llama-server's native completion ----------------------------------------------------------

    @app.post("/completion", openapi_extra=schemas.body(schemas.COMPLETION))
    @app.post("/completions", openapi_extra=schemas.body(schemas.COMPLETION))
    async def native_completion(request: Request) -> Any:
        body = await _json_body(request)
        tokens = _prompt_tokens(body.get("prompt"))
        stream = _boolean(body, "stream", False)
        n_probs = _ranged(body, "n_probs", 0, 0, MAX_TOP_LOGPROBS) or None
        return_tokens = _boolean(body, "return_tokens", False)
        want_timings = _boolean(body, "timings_per_token", False)
        q, emitter = _queue()
        (req,) = await _requests(body, tokens, emitter, 1, n_probs)
        prompt_text = body["prompt"] if isinstance(body.get("prompt"), str) else tok.decode(tokens)

        def probs(toks: list[GenToken]) -> list[dict[str, Any]]:
            def entry(tid: int, logprob: float) -> dict[str, Any]:
                piece = tok.token_to_piece(tid, True)
                text = piece.decode("utf-8", errors="replace")
                return {"id": tid, "token": text, "logprob": logprob, "bytes": list(piece)}

            return [
                {**entry(t.id, t.logprob or 0.0), "top_logprobs": [entry(i, v) for i, v in t.top]}
                for t in toks
            ]

        def partial(text: str, toks: list[GenToken], n_generated: int) -> dict[str, Any]:
            out: dict[str, Any] = {
                "index": 0,
                "content": text,
                "tokens": [t.id for t in toks] if return_tokens else [],
                "stop": False,
                "id_slot": -1,
                "tokens_predicted": n_generated,
                "tokens_evaluated": len(tokens),
            }
            if n_probs:
                out["completion_probabilities"] = probs(toks)
            return out

        def final(text: str, toks: list[GenToken], d: Finished, streamed: bool) -> dict[str, Any]:
            out: dict[str, Any] = {
                "index": 0,
                "content": text,
                "tokens": d.tokens if return_tokens and not streamed else [],
                "id_slot": d.slot_id,
                "stop": True,
                "model": config.alias,
                "tokens_predicted": d.n_generated,
                "tokens_evaluated": d.n_prompt,
                "generation_settings": {
                    **default_params(),
                    **{k: body[k] for k in default_params() if k in body},
                },
                "prompt": prompt_text,
                "has_new_line": "\n" in text,
                "truncated": False,
                "stop_type": d.stop_type,
                "stopping_word": d.stop_word,
                "tokens_cached": d.n_past,
                "timings": _timings(d),
            }
            if n_probs and not streamed:
                out["completion_probabilities"] = probs(toks)
            return out

        _submit([req])
        if stream:

            async def gen() -> AsyncIterator[str]:
                n_generated, t0 = 0, time.perf_counter()
                async for _, event in _events([req], q):
                    if event[0] == "text":
                        n_generated += len(event[2])
                        chunk = partial(event[1], event[2], n_generated)
                        if want_timings:
                            ms = (time.perf_counter() - t0) * 1e3
                            chunk["timings"] = {"predicted_n": n_generated, "predicted_ms": ms}
                        yield _sse(chunk)
                    elif event[0] == "done":
                        yield _sse(final("", [], event[1], True))
                    else:
                        yield _error_sse(event)

            return StreamingResponse(gen(), media_type="text/event-stream")
        ((text, toks, done),) = await _collect(request, [req], q)
        return final(text, toks, done, False)

    # ---- embeddings ----------------------------------------------------------------------------

    @app.post("/v1/embeddings", openapi_extra=schemas.body(schemas.EMBEDDINGS))
    @app.post("/embeddings", openapi_extra=schemas.body(schemas.EMBEDDINGS))
    async def embeddings(request: Request) -> Any:
        if not config.embeddings:
            raise APIError(
                501, "embeddings are off: start the server with --embeddings", "not_supported_error"
            )
        body = await _json_body(request)
        inp = body.get("input")
        texts = [inp] if isinstance(inp, str) else inp
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise APIError(400, "'input' must be a string or a non-empty list of strings")
        token_lists = [tok.encode(t, add_special=True, parse_special=False) for t in texts]
        for i, ids in enumerate(token_lists):
            if not ids:
                raise APIError(400, f"input {i} has no tokens")
            if len(ids) > engine.n_ctx_slot:
                raise APIError(
                    400,
                    f"input {i} has {len(ids)} tokens, but a slot's context holds {engine.n_ctx_slot}",
                    "exceed_context_size_error",
                    n_prompt_tokens=len(ids),
                    n_ctx=engine.n_ctx_slot,
                )
        q, emitter = _queue()
        req = EmbedRequest(token_lists, emitter(0))
        engine.submit(req)
        try:
            _, event = await q.get()
        finally:
            req.cancel()
        if event[0] == "error":
            raise APIError(500, event[1], "server_error")
        _, vectors, n_tokens = event
        return {
            "object": "list",
            "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)],
            "model": config.alias,
            "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens},
        }

    return app
