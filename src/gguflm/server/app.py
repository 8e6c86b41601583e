"""The HTTP side of `gguflm serve`: llama-server's OpenAI-compatible routes on FastAPI.

Handlers parse and check requests, tokenize and render chat templates (pure Python), then hand a
`GenRequest` to the engine thread and read its events from an asyncio queue. They never touch torch.
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
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from gguflm.server.engine import EmbedRequest, Engine, Event, GenRequest

OPEN_ROUTES = frozenset({"/health", "/v1/models", "/models"})
POLL_S = 0.25


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"code", "message", "type"}}."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", **extra: Any):
        super().__init__(message)
        self.status, self.message, self.type, self.extra = status, message, type_, extra


def error_response(status: int, message: str, type_: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": {"code": status, "message": message, "type": type_, **extra}}, status)


@dataclass
class ServerConfig:
    alias: str
    api_key: str | None
    embeddings: bool


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


# ---- the app ----------------------------------------------------------------------------------------


def build_app(engine: Engine, config: ServerConfig) -> FastAPI:
    from gguflm.chat import ChatTemplate
    from gguflm.sampling import Sampler, SamplerParams

    tok = engine.tokenizer
    metadata = engine.model.file.metadata
    template = ChatTemplate.from_metadata(metadata, add_bos=tok.add_bos, add_eos=tok.add_eos)
    app = FastAPI(title="gguflm serve", docs_url=None, redoc_url=None)
    if config.api_key is not None:
        app.add_middleware(BearerAuth, key=config.api_key)
    # browsers' preflight (OPTIONS) and cross-origin calls, as llama-server allows them; added
    # last, so outermost: a 401 carries the CORS headers too
    app.add_middleware(
        CORSMiddleware, allow_origins=["*"], allow_methods=["*"], allow_headers=["*"], max_age=600
    )

    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError) -> JSONResponse:
        return error_response(e.status, e.message, e.type, **e.extra)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        if e.status_code == 404:
            return error_response(404, f"no route {request.url.path}", "not_found_error")
        return error_response(e.status_code, str(e.detail), "invalid_request_error")

    # ---- simple routes -------------------------------------------------------------------------

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    @app.get("/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{"id": config.alias, "object": "model", "created": 0, "owned_by": "gguflm"}],
        }

    @app.get("/slots")
    async def slots() -> list[dict[str, Any]]:
        # a racy read of the engine's slots: good enough for monitoring
        return [{"id": s.seq_id, "is_processing": s.busy} for s in engine.slots]

    @app.post("/tokenize")
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

    @app.post("/detokenize")
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

    def _sampler(body: dict[str, Any]) -> Sampler:
        seed = _integer(body, "seed", None)
        bias = _logit_bias(body)
        try:
            params = SamplerParams(
                seed=0xFFFFFFFF if seed is None else seed,
                temp=_number(body, "temperature", 0.8),
                top_k=_integer(body, "top_k", 40),  # type: ignore[arg-type]
                top_p=_number(body, "top_p", 0.95),
                min_p=_number(body, "min_p", 0.05),
                penalty_repeat=_number(body, "repeat_penalty", 1.0),
                penalty_present=_number(body, "presence_penalty", 0.0),
                penalty_freq=_number(body, "frequency_penalty", 0.0),
                logit_bias=bias,
            )
        except ValueError as e:
            raise APIError(400, str(e)) from None
        return Sampler(params, n_ctx=engine.n_ctx_slot, tokenizer=tok)

    def _gen_request(body: dict[str, Any], prompt: list[int], emit: Callable[[Event], None]) -> GenRequest:
        n_prompt = len(prompt)
        if n_prompt == 0:
            raise APIError(400, "the prompt is empty")
        limit = engine.n_ctx_slot
        if n_prompt >= limit:
            raise APIError(
                400,
                f"the request has {n_prompt} prompt tokens, but a slot's context holds {limit} "
                f"(at most {limit - 1} prompt tokens; -c {engine.n_ctx} shared by -np {engine.n_parallel})",
                "exceed_context_size_error",
                n_prompt_tokens=n_prompt,
                n_ctx=limit,
            )
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
        room = limit - n_prompt
        max_tokens = room if max_tokens < 0 else min(max_tokens, room)
        stops = _stops(body)
        sampler = _sampler(body)
        sampler.accept_prompt(prompt[-64:])  # penalties see the prompt (penalty_last_n 64)
        return GenRequest(prompt, sampler, max_tokens, stops, emit)

    def _queue() -> tuple[asyncio.Queue[Event], Callable[[Event], None]]:
        loop = asyncio.get_running_loop()
        q: asyncio.Queue[Event] = asyncio.Queue()
        return q, lambda event: loop.call_soon_threadsafe(q.put_nowait, event)

    async def _collect(request: Request, req: GenRequest, q: asyncio.Queue[Event]) -> tuple[str, Event]:
        """Wait for a non-streamed request's end; a client that leaves cancels it."""
        parts: list[str] = []
        watch = asyncio.ensure_future(_until_disconnect(request))
        try:
            while True:
                getter = asyncio.ensure_future(q.get())
                await asyncio.wait({getter, watch}, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    raise APIError(499, "client closed the request")
                event = getter.result()
                if event[0] == "text":
                    parts.append(event[1])
                elif event[0] == "error":
                    raise APIError(500, event[1], "server_error")
                else:
                    return "".join(parts), event
        finally:
            watch.cancel()
            req.cancel()  # a no-op once finished; frees the slot on any other way out

    def _usage(event: Event) -> dict[str, int]:
        _, _, n_prompt, n_gen = event
        return {"prompt_tokens": n_prompt, "completion_tokens": n_gen, "total_tokens": n_prompt + n_gen}

    def _sse(data: Any) -> str:
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    async def _stream(
        req: GenRequest,
        q: asyncio.Queue[Event],
        first: dict[str, Any] | None,
        piece: Callable[[str], dict[str, Any]],
        last: Callable[[str], dict[str, Any]],
        include_usage: bool,
        head: dict[str, Any],
    ) -> AsyncIterator[str]:
        try:
            if first is not None:
                yield _sse(first)
            while True:
                event = await q.get()
                if event[0] == "text":
                    yield _sse(piece(event[1]))
                elif event[0] == "error":
                    yield _sse({"error": {"code": 500, "message": event[1], "type": "server_error"}})
                    break
                else:
                    yield _sse(last(event[1]))
                    if include_usage:
                        yield _sse({**head, "choices": [], "usage": _usage(event)})
                    break
            yield "data: [DONE]\n\n"
        finally:
            req.cancel()  # a disconnect lands here too: the slot is freed at the next step

    def _include_usage(body: dict[str, Any]) -> bool:
        opts = body.get("stream_options")
        if opts is None:
            return False
        if not isinstance(opts, dict):
            raise APIError(400, "'stream_options' must be an object")
        return _boolean(opts, "include_usage", False)

    @app.post("/v1/completions")
    @app.post("/completions")
    async def completions(request: Request) -> Any:
        body = await _json_body(request)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, str):
            tokens = tok.encode(prompt, add_special=True, parse_special=True)
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            tokens = _token_ids(prompt, "prompt")
        else:
            raise APIError(400, "'prompt' must be a string or a list of token ids")
        stream = _boolean(body, "stream", False)
        include_usage = _include_usage(body)
        q, emit = _queue()
        req = _gen_request(body, tokens, emit)
        head = {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": config.alias,
        }

        def choice(text: str, finish: str | None) -> dict[str, Any]:
            return {
                **head,
                "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}],
            }

        engine.submit(req)
        if stream:
            gen = _stream(
                req, q, None, lambda t: choice(t, None), lambda f: choice("", f), include_usage, head
            )
            return StreamingResponse(gen, media_type="text/event-stream")
        text, done = await _collect(request, req, q)
        return {**choice(text, done[1]), "usage": _usage(done)}

    @app.post("/v1/chat/completions")
    @app.post("/chat/completions")
    async def chat_completions(request: Request) -> Any:
        body = await _json_body(request)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise APIError(400, "'messages' must be a non-empty list of messages")
        try:
            prompt_text = template.render(messages, add_generation_prompt=True)
        except ValueError as e:
            raise APIError(400, str(e)) from None
        tokens = tok.encode(prompt_text, add_special=True, parse_special=True)
        stream = _boolean(body, "stream", False)
        include_usage = _include_usage(body)
        q, emit = _queue()
        req = _gen_request(body, tokens, emit)
        head = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": config.alias,
        }

        def delta(d: dict[str, Any], finish: str | None) -> dict[str, Any]:
            return {**head, "choices": [{"index": 0, "delta": d, "logprobs": None, "finish_reason": finish}]}

        engine.submit(req)
        if stream:
            gen = _stream(
                req,
                q,
                delta({"role": "assistant", "content": ""}, None),
                lambda t: delta({"content": t}, None),
                lambda f: delta({}, f),
                include_usage,
                head,
            )
            return StreamingResponse(gen, media_type="text/event-stream")
        text, done = await _collect(request, req, q)
        return {
            **head,
            "object": "chat.completion",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": None,
                    "finish_reason": done[1],
                }
            ],
            "usage": _usage(done),
        }

    # ---- embeddings ----------------------------------------------------------------------------

    @app.post("/v1/embeddings")
    @app.post("/embeddings")
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
        q, emit = _queue()
        req = EmbedRequest(token_lists, emit)
        engine.submit(req)
        try:
            event = await q.get()
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
