"""`gguflm bench`: llama-bench's pp/tg and llama-batched-bench's parallel decode, through Context.decode."""

from __future__ import annotations

import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from gguflm.batch import Batch
from gguflm.context import DECODE_OK, Context
from gguflm.cpu import describe
from gguflm.generate import DecodeError
from gguflm.model import Model

TG_PROMPT = 16  # tokens cached before timing generation, so attention is not over an empty cache


@dataclass
class Measure:
    """Tokens per second over repetitions."""

    name: str
    n_tokens: int
    seconds: list[float] = field(default_factory=list)

    @property
    def tps(self) -> list[float]:
        return [self.n_tokens / s for s in self.seconds]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.tps)

    @property
    def std(self) -> float:
        return statistics.stdev(self.tps) if len(self.tps) > 1 else 0.0


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _decode(ctx: Context, batch: Batch) -> None:
    status = ctx.decode(batch)
    if status != DECODE_OK:
        raise DecodeError(status, "a benchmark batch")


def _tokens(model: Model, n: int, seed: int) -> list[int]:
    return torch.randint(0, model.n_vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def time_prefill(ctx: Context, tokens: list[int]) -> float:
    ctx.kv.clear()
    t0 = time.perf_counter()
    for start in range(0, len(tokens), ctx.n_batch):
        _decode(ctx, Batch.from_tokens(tokens[start : start + ctx.n_batch]))
    return time.perf_counter() - t0


def greedy_rows(logits: torch.Tensor) -> list[int]:
    """(n, n_vocab) logits -> each row's argmax, as the sampler picks greedily: numpy's
    on the CPU, where torch's reduction over a row is ~10x slower (16 x 262144 logits: 3.6 against
    0.32 ms, 1 thread, AMD EPYC Zen 4), a cost neither the sampler nor llama.cpp's harness pays."""
    if logits.device.type != "cpu":
        return logits.argmax(-1).tolist()
    return np.argmax(logits.numpy(), axis=-1).tolist()


def time_generation(ctx: Context, prompt: list[int], n: int) -> float:
    """n single-token decodes, each fed the argmax of the previous logits (a real generation loop)."""
    ctx.kv.clear()
    _decode(ctx, Batch.from_tokens(prompt))
    t0 = time.perf_counter()
    for _ in range(n):
        token = greedy_rows(ctx.logits(-1)[None])[0]
        _decode(ctx, Batch.from_tokens([token]))
    return time.perf_counter() - t0


def time_parallel(ctx: Context, prompt: list[int], n_seq: int, n: int) -> float:
    """n steps of one batch holding one new token for each of n_seq sequences that share a prompt."""
    ctx.kv.clear()
    _decode(ctx, Batch.from_tokens(prompt))
    for s in range(1, n_seq):
        ctx.kv.seq_cp(0, s)
    tokens = [prompt[-1]] * n_seq
    t0 = time.perf_counter()
    for _ in range(n):
        _decode(ctx, Batch.from_tokens(tokens, seq_ids=[[s] for s in range(n_seq)], output=[True] * n_seq))
        tokens = greedy_rows(ctx.all_logits())
    return time.perf_counter() - t0


def run_bench(
    model: Model,
    n_prompt: int = 512,
    n_gen: int = 128,
    repetitions: int = 3,
    parallel: tuple[int, ...] = (),
    n_parallel_steps: int = 32,
    exit_layer: int | None = None,
    progress: Callable[[str], None] = lambda _: None,
) -> dict[str, object]:
    n_seq_max = max((1, *parallel))
    n_ctx = max(n_prompt, TG_PROMPT + n_gen, TG_PROMPT * n_seq_max + n_seq_max * n_parallel_steps) + 16
    n_batch = max(n_prompt, TG_PROMPT, n_seq_max)
    ctx = Context(model, n_ctx=n_ctx, n_batch=n_batch, n_ubatch=512, exit_layer=exit_layer)
    parallel_ctx: list[Context] = []  # made after pp and tg ran: it gives the model a dense output copy

    def time_parallel_job(n_seq: int) -> float:
        if not parallel_ctx:
            parallel_ctx.append(
                Context(
                    model,
                    n_ctx=n_ctx,
                    n_batch=n_batch,
                    n_ubatch=512,
                    n_seq_max=n_seq_max,
                    exit_layer=exit_layer,
                )
            )
        return time_parallel(parallel_ctx[0], prompt, n_seq, n_parallel_steps)

    prompt = _tokens(model, TG_PROMPT, 1)
    jobs: list[tuple[Measure, Callable[[], float]]] = []
    if n_prompt > 0:
        tokens = _tokens(model, n_prompt, 0)
        jobs.append((Measure(f"pp{n_prompt}", n_prompt), lambda: time_prefill(ctx, tokens)))
    if n_gen > 0:
        jobs.append((Measure(f"tg{n_gen}", n_gen), lambda: time_generation(ctx, prompt, n_gen)))
    for n_seq in parallel:
        jobs.append(
            (
                Measure(f"npl{n_seq}", n_seq * n_parallel_steps),
                lambda n_seq=n_seq: time_parallel_job(n_seq),  # type: ignore[misc]
            )
        )
    for measure, job in jobs:
        progress(f"{measure.name}: warm-up")
        job()
        for r in range(repetitions):
            progress(f"{measure.name}: run {r + 1}/{repetitions}")
            measure.seconds.append(job())
    result: dict[str, object] = {
        "model": str(model.path.name),
        "mode": model.mode,
        "threads": torch.get_num_threads(),
        "exit_layer": exit_layer,
        "cpu": describe(),
    }
    by_name = {m.name: m for m, _ in jobs}
    if n_prompt > 0:
        m = by_name[f"pp{n_prompt}"]
        result.update(pp_tps=m.mean, pp_std=m.std)
    if n_gen > 0:
        m = by_name[f"tg{n_gen}"]
        result.update(tg_tps=m.mean, tg_std=m.std)
    result["npl"] = {str(n): by_name[f"npl{n}"].mean for n in parallel}
    result["npl_std"] = {str(n): by_name[f"npl{n}"].std for n in parallel}
    result["peak_rss_mb"] = peak_rss_mb()
    return result


def markdown(result: dict[str, object], n_prompt: int, n_gen: int) -> str:
    rows = ["| test | t/s |", "| --- | ---: |"]
    if "pp_tps" in result:
        rows.append(f"| pp{n_prompt} | {result['pp_tps']:.1f} ± {result['pp_std']:.1f} |")
    if "tg_tps" in result:
        rows.append(f"| tg{n_gen} | {result['tg_tps']:.1f} ± {result['tg_std']:.1f} |")
    npl: dict[str, float] = result["npl"]  # type: ignore[assignment]
    std: dict[str, float] = result["npl_std"]  # type: ignore[assignment]
    for n, tps in npl.items():
        rows.append(f"| decode, {n} parallel sequences | {tps:.1f} ± {std[n]:.1f} |")
    exit_at = f", exit after layer {result['exit_layer']}" if result.get("exit_layer") else ""
    header = f"model {result['model']} ({result['mode']} mode{exit_at}), {result['threads']} threads\n{result['cpu']}"
    return "\n".join([header, "", *rows, "", f"peak RSS {result['peak_rss_mb']:.0f} MB"])
