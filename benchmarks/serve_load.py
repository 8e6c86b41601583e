"""Load test for `gguflm serve`, side by side with llama-server on the same GGUF file and slots.

    python benchmarks/serve_load.py [-m MODEL] [--clients 1,4,16] [--max-tokens 64]
                                    [--llama-server PATH] [--threads N]

For each client count N it starts the server with `-np N` (and `-c` = N x --slot-ctx), then N
clients each stream `--requests` chat completions (fixed prompts, temperature 0, `ignore_eos` so
every reply has `--max-tokens` tokens) one after another. Reported per server and N: total generated
tokens/s over the run's wall time, time to first token (p50, p99) and inter-token latency (p50),
measured by the clients on the streamed chunks. Prints a markdown table; `--json` writes the rows.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how a bicycle stays upright.",
    "List some facts about the moon.",
    "Describe a walk through a forest in autumn.",
    "What makes bread rise? Explain simply.",
    "Tell me about the history of the printing press.",
    "How do bees communicate with each other?",
    "Give advice for learning a new language.",
]


@dataclass
class Row:
    server: str
    clients: int
    requests: int
    tokens: int
    wall_s: float
    tokens_per_s: float
    ttft_p50_s: float
    ttft_p99_s: float
    itl_p50_ms: float


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]); nan for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[k]


def start(cmd: list[str], port: int, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[0]} exited with {proc.returncode}; see {log}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"{cmd[0]} did not become healthy; see {log}")


async def one_stream(
    client: httpx.AsyncClient, prompt: str, max_tokens: int
) -> tuple[float, list[float], int]:
    """(time to first token, gaps between content chunks, completion tokens) of one chat stream."""
    body = {
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    arrivals: list[float] = []
    n_tokens = 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                n_tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices", []):
                if choice.get("delta", {}).get("content"):
                    arrivals.append(time.perf_counter())
    if not arrivals:
        raise RuntimeError("a stream carried no content")
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    return arrivals[0] - t0, gaps, n_tokens


async def load(url: str, n_clients: int, n_requests: int, max_tokens: int) -> tuple[float, list]:
    # a fresh connection per request, for both servers: llama-server may close a kept-alive connection
    # just as the next request goes out on it ("Server disconnected without sending a response")
    limits = httpx.Limits(max_connections=n_clients + 4, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        await one_stream(client, "warm up", 4)

        async def worker(i: int) -> list[tuple[float, list[float], int]]:
            return [
                await one_stream(client, PROMPTS[(i + k) % len(PROMPTS)], max_tokens)
                for k in range(n_requests)
            ]

        t0 = time.perf_counter()
        results = await asyncio.gather(*(worker(i) for i in range(n_clients)))
        return time.perf_counter() - t0, [r for rs in results for r in rs]


def run_one(name: str, cmd: list[str], port: int, n: int, args: argparse.Namespace, log: Path) -> Row:
    proc = start(cmd, port, log)
    try:
        wall, results = asyncio.run(load(f"http://127.0.0.1:{port}", n, args.requests, args.max_tokens))
    finally:
        proc.terminate()
        proc.wait(30)
    tokens = sum(r[2] for r in results)
    ttfts = [r[0] for r in results]
    gaps = [g for r in results for g in r[1]]
    return Row(
        name,
        n,
        len(results),
        tokens,
        wall,
        tokens / wall,
        percentile(ttfts, 50),
        percentile(ttfts, 99),
        1e3 * percentile(gaps, 50),
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-m", "--model", help="GGUF file (default: gguflm's default model)")
    p.add_argument("--clients", default="1,4,16", help="client counts, comma-separated")
    p.add_argument("--requests", type=int, default=2, help="requests per client")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--slot-ctx", type=int, default=512, help="KV cache tokens per slot")
    p.add_argument("--threads", type=int, help="-t for both servers (default: each server's own)")
    p.add_argument("--llama-server", help="path to a llama-server binary to compare with")
    p.add_argument("--json", help="also write the rows to this file")
    p.add_argument("--logs", default="/tmp", help="folder for the servers' logs")
    args = p.parse_args()
    if args.model is None:
        from gguflm.paths import default_model_path

        args.model = str(default_model_path())
    rows: list[Row] = []
    for n in [int(x) for x in args.clients.split(",")]:
        common = ["-m", args.model, "-np", str(n), "-c", str(n * args.slot_ctx)]
        if args.threads:
            common += ["-t", str(args.threads)]
        servers = [("gguflm serve", [sys.executable, "-m", "gguflm", "serve", *common])]
        if args.llama_server:
            servers.append(("llama-server", [args.llama_server, *common]))
        for name, cmd in servers:
            port = free_port()
            log = Path(args.logs) / f"serve_load_{name.split()[0]}_{n}.log"
            row = run_one(name, [*cmd, "--port", str(port)], port, n, args, log)
            rows.append(row)
            print(f"{name} x{n}: {row.tokens_per_s:.1f} t/s", file=sys.stderr, flush=True)
    print("| server | clients | requests | tokens | tokens/s | TTFT p50 s | TTFT p99 s | ITL p50 ms |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {r.server} | {r.clients} | {r.requests} | {r.tokens} | {r.tokens_per_s:.1f} | "
            f"{r.ttft_p50_s:.2f} | {r.ttft_p99_s:.2f} | {r.itl_p50_ms:.1f} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in rows], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
