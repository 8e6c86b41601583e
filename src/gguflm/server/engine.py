"""The engine thread: one `Context`, `n_parallel` slots (sequence ids), continuous batching.

Every step decodes one token for each generating slot plus prompt chunks of slots that are still
reading their prompt (llama-server's chunked prefill), in one `Context.decode` when the step has at
most `max_rows` rows (the per-row kernels' limit), else with each big chunk in a call of its own. A
prompt is cut into chunks at fixed offsets (multiples of `chunk`), and a chunk joins a step only
whole (else it waits a step), so a request's rows are always computed the same way and, with a
batch-invariant Context, its logits do not depend on what else runs: greedy output equals the
output of the request sent alone.

Prefix reuse: a slot keeps the tokens its sequence holds after a request ends. A new request goes
to the free slot whose tokens share the longest prefix with its prompt (ties: the slot used least
recently), which removes the rest (`seq_rm`) and decodes only the prompt after that prefix; at
least the last prompt token is always decoded, for its logits.

The HTTP side never touches torch: it submits a `GenRequest` (tokens and ready sampler and grammar)
or an `EmbedRequest`; the engine answers through `emit`, a thread-safe callback (the server passes
one that hands events to an asyncio queue with `loop.call_soon_threadsafe`). `cancel()` from any
thread frees the slot at the start of the next step. Each request's sampling, stop strings and
logprobs are a `gguflm.generate.Generation`, the same object `gguflm.LLM` uses.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gguflm.generate import Generation
    from gguflm.grammar import GrammarMatcher
    from gguflm.model import Model
    from gguflm.sampling import Sampler

log = logging.getLogger("gguflm.server")

# events sent to a request's `emit`
# ("text", str, list[GenToken])     final text and the tokens it completes (never part of a stop string)
# ("done", Finished)                how the request ended
# ("error", message)                the request failed inside the engine
# ("embeddings", list[list[float]], n_prompt_tokens)
Event = tuple[Any, ...]

_task_ids = itertools.count()


class QueueFull(RuntimeError):
    """The engine holds `max_queue` requests waiting for a slot already."""


@dataclass
class GenRequest:
    prompt: list[int]
    sampler: Sampler
    max_tokens: int  # already clipped to the slot's room
    stops: list[str]
    emit: Callable[[Event], None]
    n_probs: int | None = None  # logprobs of the chosen token and the n most likely ones
    matcher: GrammarMatcher | None = None
    cache_prompt: bool = True  # reuse a slot's cached prefix
    id: int = field(default_factory=lambda: next(_task_ids))
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.cancelled.set()


@dataclass
class EmbedRequest:
    prompts: list[list[int]]
    emit: Callable[[Event], None]
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.cancelled.set()


@dataclass
class Finished:
    """How a request ended, with llama-server's counts and timings."""

    finish_reason: str  # "stop" or "length"
    stop_type: str  # "eos", "word" or "limit"
    stop_word: str
    n_prompt: int
    n_generated: int
    n_cached: int  # prompt tokens reused from the slot's cache, not decoded
    slot_id: int
    t_prompt_ms: float  # from taking the slot to the first sampled token
    t_gen_ms: float  # from the first sampled token to the end
    tokens: list[int]  # the generated token ids
    n_past: int  # tokens the slot's sequence holds now (prompt and decoded reply)


@dataclass
class Metrics:
    """llama-server's /metrics counters (written by the engine thread only)."""

    n_prompt_tokens: int = 0  # prompt tokens decoded (cached ones are not)
    t_prompt_s: float = 0.0
    n_generated: int = 0
    t_gen_s: float = 0.0
    n_decode: int = 0
    n_busy_slots: int = 0  # summed over decode calls
    n_requests: int = 0  # finished generation requests


@dataclass
class _Slot:
    seq_id: int
    req: GenRequest | None = None
    gen: Generation | None = None
    cache: list[int] = field(default_factory=list)  # the tokens the sequence holds, by position
    n_cached: int = 0  # prompt tokens taken from the cache for the current request
    next_token: int | None = None  # sampled, not yet decoded
    last_used: int = 0
    t_start: float = 0.0
    t_first: float = 0.0

    @property
    def busy(self) -> bool:
        return self.req is not None


class Engine:
    """Owns the model's Context on one thread; see the module docstring."""

    def __init__(
        self,
        model: Model,
        n_ctx: int,
        n_parallel: int,
        chunk: int = 256,
        embeddings: bool = False,
        pooling: str = "mean",
        threads: int | None = None,
        max_queue: int = 0,
        similarity: float = 0.5,
        max_rows: int | None = None,
    ) -> None:
        from gguflm.context import Context
        from gguflm.quants import NATIVE_MAX_ROWS

        if max_rows is None:
            max_rows = NATIVE_MAX_ROWS
        if max_rows < 1:
            raise ValueError(f"max_rows must be at least 1, got {max_rows}")
        if n_parallel < 1:
            raise ValueError(f"--parallel must be at least 1, got {n_parallel}")
        if n_ctx < n_parallel * 2:
            raise ValueError(f"--ctx-size {n_ctx} is too small for {n_parallel} slots")
        if not 0.0 <= similarity <= 1.0:
            raise ValueError(f"the slot prompt similarity must be between 0 and 1, got {similarity}")
        if max_queue < 0:
            raise ValueError(f"the queue limit must be >= 0 (0: none), got {max_queue}")
        self.model = model
        self.tokenizer = model.tokenizer
        self.n_ctx = n_ctx
        self.n_parallel = n_parallel
        self.n_ctx_slot = n_ctx // n_parallel
        self.chunk = max(1, min(chunk, self.n_ctx_slot))
        self.max_rows = max_rows  # rows per decode call (see _calls)
        n_batch = self.chunk + n_parallel
        # n_ubatch = n_batch: a step is never split, so a chunk never straddles micro-batches
        self.ctx = Context(model, n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch, n_seq_max=n_parallel)
        self.embeddings = embeddings
        self.pooling = pooling
        self.slots = [_Slot(i) for i in range(n_parallel)]
        self.waiting: deque[GenRequest] = deque()
        self.inbox: queue.Queue[GenRequest | EmbedRequest | None] = queue.Queue()
        self.max_queue = max_queue
        self.similarity = similarity
        self._n_queued = 0  # submitted generation requests not in a slot yet (any thread, under _lock)
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="gguflm-engine", daemon=True)
        self._stopping = False
        self._clock = itertools.count(1)
        self.metrics = Metrics()
        self._embed_contexts: dict[tuple[int, int, str], Context] = {}  # kept by gguflm.generate.embed
        self.threads = threads

    # ---- called from other threads ------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def submit(self, req: GenRequest | EmbedRequest) -> None:
        """Queue a request; QueueFull (nothing queued) when `max_queue` requests wait already or
        the engine is stopping."""
        if self._stopping:
            raise QueueFull("the server is shutting down")
        if isinstance(req, GenRequest):
            with self._lock:
                if self.max_queue and self._n_queued >= self.max_queue:
                    raise QueueFull(f"{self._n_queued} requests are waiting for a slot")
                self._n_queued += 1
        self.inbox.put(req)

    def request_stop(self) -> None:
        """End every request at the next step (streams get an error event) and refuse new ones;
        returns at once (safe in a signal handler)."""
        self._stopping = True
        self.inbox.put(None)

    def stop(self, timeout: float = 5.0) -> None:
        self.request_stop()
        self._thread.join(timeout)

    def n_busy(self) -> int:
        return sum(s.busy for s in self.slots)

    def n_deferred(self) -> int:
        """Generation requests waiting for a slot."""
        with self._lock:
            return self._n_queued

    def slot_info(self) -> list[dict[str, Any]]:
        """Each slot's state, shaped like llama-server's /slots (a racy read: for monitoring)."""
        out = []
        for s in self.slots:
            req, gen = s.req, s.gen
            n_decoded = gen.n_generated if req is not None and gen is not None else 0
            out.append(
                {
                    "id": s.seq_id,
                    "id_task": req.id if req is not None else -1,
                    "n_ctx": self.n_ctx_slot,
                    "speculative": False,
                    "is_processing": req is not None,
                    "n_past": len(s.cache),
                    "n_prompt_tokens_cache": s.n_cached if req is not None else 0,
                    "next_token": {
                        "has_next_token": req is not None,
                        "n_remain": req.max_tokens - n_decoded if req is not None else -1,
                        "n_decoded": n_decoded,
                    },
                }
            )
        return out

    # ---- the loop ------------------------------------------------------------------------------

    def _run(self) -> None:
        if self.threads:  # torch's intra-op threads are set per thread: set them where decode runs
            import torch

            torch.set_num_threads(self.threads)
        while not self._stopping:
            idle = not self.waiting and not any(s.busy for s in self.slots)
            try:
                item = self.inbox.get(timeout=0.5) if idle else self.inbox.get_nowait()
            except queue.Empty:
                item = None
            while item is not None:
                self._take(item)
                try:
                    item = self.inbox.get_nowait()
                except queue.Empty:
                    item = None
            if self._stopping:
                break
            try:
                self._step()
            except Exception as e:  # an engine bug must not leave slots busy or the server hung
                log.exception("engine step failed")
                for slot in self.slots:
                    if slot.busy:
                        self._finish(slot, error=f"internal error: {e}")
        for slot in self.slots:
            if slot.busy:
                self._finish(slot, error="the server is shutting down")
        while True:  # requests that arrived while stopping
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, GenRequest):
                self.waiting.append(item)
            elif item is not None:
                item.emit(("error", "the server is shutting down"))
        while self.waiting:
            self._dequeued(1)
            self.waiting.popleft().emit(("error", "the server is shutting down"))

    def _dequeued(self, n: int) -> None:
        with self._lock:
            self._n_queued -= n

    def _take(self, item: GenRequest | EmbedRequest) -> None:
        if isinstance(item, EmbedRequest):
            self._embed(item)
        else:
            self.waiting.append(item)

    def _embed(self, req: EmbedRequest) -> None:
        from gguflm.generate import embed

        if req.cancelled.is_set():
            return
        try:
            if len(self._embed_contexts) >= 4:  # a few shapes of request are kept, not every one
                self._embed_contexts.clear()
            vectors = embed(self.model, req.prompts, self.pooling, 2, contexts=self._embed_contexts)
        except Exception as e:
            log.exception("embedding failed")
            req.emit(("error", f"embedding failed: {e}"))
            return
        req.emit(("embeddings", vectors, sum(map(len, req.prompts))))

    def _pick_slot(self, req: GenRequest) -> _Slot | None:
        """The free slot whose cache shares the longest prefix with the prompt, when that prefix is
        more than `similarity` of the prompt (llama-server's --slot-prompt-similarity); else the
        least recently used free slot, so that a shared system prompt alone does not evict a
        conversation's cache."""
        from gguflm.generate import common_prefix

        free = [s for s in self.slots if not s.busy]
        if not free:
            return None
        lru = min(free, key=lambda s: s.last_used)
        if not req.cache_prompt:
            return lru
        best = max(free, key=lambda s: (common_prefix(s.cache, req.prompt), -s.last_used))
        if common_prefix(best.cache, req.prompt) > self.similarity * len(req.prompt):
            return best
        return lru

    def _step(self) -> None:
        # cancelled requests leave first; then waiting ones take free slots, oldest first
        for slot in self.slots:
            if slot.req is not None and slot.req.cancelled.is_set():
                self._finish(slot, cancelled=True)
        kept = deque(r for r in self.waiting if not r.cancelled.is_set())
        self._dequeued(len(self.waiting) - len(kept))
        self.waiting = kept
        while self.waiting:
            slot = self._pick_slot(self.waiting[0])
            if slot is None:
                break
            self._dequeued(1)
            self._assign(slot, self.waiting.popleft())

        # this step's segments: (slot, tokens, first position, whether its last row is an output)
        segments: list[tuple[_Slot, list[int], int, bool]] = []
        for slot in self.slots:  # generating slots: one token each
            if slot.req is not None and slot.next_token is not None:
                segments.append((slot, [slot.next_token], len(slot.cache), True))
        budget = self.ctx.n_batch - len(segments)
        for slot in self.slots:  # prompt chunks at fixed offsets, whole or not at all
            req = slot.req
            n_fed = len(slot.cache)
            if req is None or slot.next_token is not None or n_fed >= len(req.prompt):
                continue
            part = req.prompt[n_fed : (n_fed // self.chunk + 1) * self.chunk]
            if len(part) > budget:
                continue
            budget -= len(part)
            segments.append((slot, part, n_fed, n_fed + len(part) == len(req.prompt)))
        for call in self._calls(segments):
            self._decode(call)

    def _calls(
        self, segments: list[tuple[_Slot, list[int], int, bool]]
    ) -> list[list[tuple[_Slot, list[int], int, bool]]]:
        """Group a step's segments into decode calls of at most `max_rows` rows, a longer segment
        (a big prompt chunk) in a call of its own. Up to `max_rows` rows every matrix product runs
        on the per-row kernels, so a row's result does not depend on the rows beside it; a big
        chunk's products take another path, whose numbers may depend on the rows beside it: alone,
        its rows are always computed the same way, and the generating rows never go that way."""
        calls: list[list[tuple[_Slot, list[int], int, bool]]] = []
        current: list[tuple[_Slot, list[int], int, bool]] = []
        rows = 0
        for seg in segments:
            n = len(seg[1])
            if n > self.max_rows:
                calls.append([seg])
                continue
            if rows + n > self.max_rows:
                calls.append(current)
                current, rows = [], 0
            current.append(seg)
            rows += n
        if current:
            calls.append(current)
        return calls

    def _decode(self, call: list[tuple[_Slot, list[int], int, bool]]) -> None:
        """One Context.decode of the call's segments, then sample the slots whose last row is out."""
        from gguflm.batch import Batch
        from gguflm.context import DECODE_OK

        tokens: list[int] = []
        pos: list[int] = []
        seqs: list[list[int]] = []
        outputs: list[bool] = []
        rows: list[tuple[_Slot, int]] = []  # slot, batch index of its output
        for slot, part, start, out in call:
            tokens += part
            pos += range(start, start + len(part))
            seqs += [[slot.seq_id]] * len(part)
            outputs += [False] * (len(part) - 1) + [out]
            if out:
                rows.append((slot, len(tokens) - 1))
        status = self.ctx.decode(Batch.from_tokens(tokens, pos=pos, seq_ids=seqs, output=outputs))
        if status != DECODE_OK:
            raise RuntimeError(f"decode failed with status {status} for a step of {len(tokens)} tokens")
        self.metrics.n_decode += 1
        self.metrics.n_busy_slots += self.n_busy()
        for slot, part, _, _ in call:
            slot.cache.extend(part)
            slot.next_token = None
        for slot, index in rows:
            try:
                self._advance(slot, self.ctx.logits(index))
            except Exception as e:  # one request's sampler or grammar failing must not end the others
                log.exception("a request failed while sampling")
                self._finish(slot, error=f"generation failed: {e}")

    def _assign(self, slot: _Slot, req: GenRequest) -> None:
        from gguflm.generate import Generation, common_prefix

        keep = common_prefix(slot.cache, req.prompt) if req.cache_prompt else 0
        keep = min(keep, len(req.prompt) - 1)  # the last prompt token is decoded for its logits
        self.ctx.kv.seq_rm(slot.seq_id, keep, -1)
        del slot.cache[keep:]
        slot.req = req
        slot.gen = Generation(
            self.tokenizer, req.sampler, req.max_tokens, req.stops, req.n_probs, req.matcher
        )
        slot.n_cached = keep
        slot.next_token = None
        slot.last_used = next(self._clock)
        slot.t_start = time.perf_counter()
        slot.t_first = 0.0

    def _advance(self, slot: _Slot, logits: Any) -> None:
        """Sample the slot's next token from its logits row; emit final text; finish when done."""
        req, gen = slot.req, slot.gen
        assert req is not None and gen is not None
        if not slot.t_first:
            slot.t_first = time.perf_counter()
        pieces, token = gen.step(logits)
        for piece in pieces:
            req.emit(("text", piece.text, piece.tokens))
        if token is None:
            self._finish(slot)
        else:
            slot.next_token = token

    def _finish(self, slot: _Slot, error: str | None = None, cancelled: bool = False) -> None:
        """Tell the request how it ended and free the slot; its cache stays for the next request
        unless the step failed (then the sequence may hold cells its tokens do not list)."""
        req, gen = slot.req, slot.gen
        slot.req, slot.gen, slot.next_token = None, None, None
        slot.last_used = next(self._clock)
        if error is not None:
            self.ctx.kv.seq_rm(slot.seq_id, 0, -1)
            slot.cache.clear()
        if req is None or gen is None or cancelled:
            return
        if error is not None:
            req.emit(("error", error))
            return
        now = time.perf_counter()
        t_first = slot.t_first or now
        done = Finished(
            finish_reason=gen.finish_reason or "stop",
            stop_type=gen.stop_type,
            stop_word=gen.stop_word,
            n_prompt=len(req.prompt),
            n_generated=gen.n_generated,
            n_cached=slot.n_cached,
            slot_id=slot.seq_id,
            t_prompt_ms=(t_first - slot.t_start) * 1e3,
            t_gen_ms=(now - t_first) * 1e3,
            tokens=list(gen.tokens),
            n_past=len(slot.cache),
        )
        m = self.metrics
        m.n_prompt_tokens += done.n_prompt - done.n_cached
        m.t_prompt_s += done.t_prompt_ms / 1e3
        m.n_generated += done.n_generated
        m.t_gen_s += done.t_gen_ms / 1e3
        m.n_requests += 1
        req.emit(("done", done))
