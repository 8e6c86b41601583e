"""The engine thread: one `Context`, `n_parallel` slots (sequence ids), continuous batching.

Every step builds ONE `Batch`: one token for each generating slot, plus prompt chunks of slots that
are still reading their prompt (llama-server's chunked prefill). A prompt is cut into chunks of
`chunk` tokens at fixed offsets, and a chunk joins a step only whole (else it waits a step), so a
request's batches, and with a batch-invariant Context its logits, do not depend on what else runs:
greedy output equals the output of the request sent alone.

The HTTP side never touches torch: it submits a `GenRequest` (tokens and a ready `Sampler`) or an
`EmbedRequest`; the engine answers through `emit`, a thread-safe callback (the server passes one
that hands events to an asyncio queue with `loop.call_soon_threadsafe`). `cancel()` from any
thread frees the slot at the start of the next step.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gguflm.model import Model
    from gguflm.sampling import Sampler

log = logging.getLogger("gguflm.server")

# events sent to a request's `emit`
# ("text", str)                     a piece of final text (never part of a possible stop string)
# ("done", finish_reason, n_prompt, n_generated)
# ("error", message)                the request failed inside the engine
# ("embeddings", list[list[float]], n_prompt_tokens)
Event = tuple[Any, ...]


@dataclass
class GenRequest:
    prompt: list[int]
    sampler: Sampler
    max_tokens: int  # already clipped to the slot's room
    stops: list[str]
    emit: Callable[[Event], None]
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
class _Slot:
    seq_id: int
    req: GenRequest | None = None
    n_fed: int = 0  # prompt tokens decoded so far
    next_token: int | None = None  # sampled, not yet decoded
    n_generated: int = 0
    text: str = ""
    emitted: int = 0
    decoder: Any = None

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
    ) -> None:
        from gguflm.context import Context

        if n_parallel < 1:
            raise ValueError(f"--parallel must be at least 1, got {n_parallel}")
        if n_ctx < n_parallel * 2:
            raise ValueError(f"--ctx-size {n_ctx} is too small for {n_parallel} slots")
        self.model = model
        self.tokenizer = model.tokenizer
        self.n_ctx = n_ctx
        self.n_parallel = n_parallel
        self.n_ctx_slot = n_ctx // n_parallel
        self.chunk = max(1, min(chunk, self.n_ctx_slot))
        n_batch = self.chunk + n_parallel
        # n_ubatch = n_batch: a step is never split, so a chunk never straddles micro-batches
        self.ctx = Context(model, n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch, n_seq_max=n_parallel)
        self.embeddings = embeddings
        self.pooling = pooling
        self.slots = [_Slot(i) for i in range(n_parallel)]
        self.waiting: deque[GenRequest] = deque()
        self.inbox: queue.Queue[GenRequest | EmbedRequest | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="gguflm-engine", daemon=True)
        self._stopping = False
        self.n_steps = 0
        self.threads = threads

    # ---- called from other threads ------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def submit(self, req: GenRequest | EmbedRequest) -> None:
        self.inbox.put(req)

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping = True
        self.inbox.put(None)
        self._thread.join(timeout)

    def n_busy(self) -> int:
        return sum(s.busy for s in self.slots)

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
        while self.waiting:
            self.waiting.popleft().emit(("error", "the server is shutting down"))

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
            vectors = embed(self.model, req.prompts, self.pooling, 2)
        except Exception as e:
            log.exception("embedding failed")
            req.emit(("error", f"embedding failed: {e}"))
            return
        req.emit(("embeddings", vectors, sum(map(len, req.prompts))))

    def _step(self) -> None:
        from gguflm.batch import Batch
        from gguflm.context import DECODE_OK

        # cancelled requests leave first; then waiting ones take free slots
        for slot in self.slots:
            if slot.busy and slot.req is not None and slot.req.cancelled.is_set():
                self._finish(slot, cancelled=True)
        self.waiting = deque(r for r in self.waiting if not r.cancelled.is_set())
        for slot in self.slots:
            if not slot.busy and self.waiting:
                self._assign(slot, self.waiting.popleft())

        tokens: list[int] = []
        pos: list[int] = []
        seqs: list[list[int]] = []
        outputs: list[bool] = []
        rows: list[tuple[_Slot, int]] = []  # slot, batch index of its output
        for slot in self.slots:  # generating slots: one token each
            if slot.busy and slot.next_token is not None:
                rows.append((slot, len(tokens)))
                tokens.append(slot.next_token)
                pos.append(len(slot.req.prompt) + slot.n_generated - 1)  # type: ignore[union-attr]
                seqs.append([slot.seq_id])
                outputs.append(True)
        budget = self.ctx.n_batch - len(tokens)
        for slot in self.slots:  # prompt chunks, whole or not at all
            req = slot.req
            if req is None or slot.next_token is not None or slot.n_fed >= len(req.prompt):
                continue
            part = req.prompt[slot.n_fed : slot.n_fed + self.chunk]
            if len(part) > budget:
                continue
            budget -= len(part)
            last = slot.n_fed + len(part) == len(req.prompt)
            for i, t in enumerate(part):
                tokens.append(t)
                pos.append(slot.n_fed + i)
                seqs.append([slot.seq_id])
                outputs.append(False)
            if last:
                outputs[-1] = True
                rows.append((slot, len(tokens) - 1))
            slot.n_fed += len(part)
        if not tokens:
            return
        status = self.ctx.decode(Batch.from_tokens(tokens, pos=pos, seq_ids=seqs, output=outputs))
        self.n_steps += 1
        if status != DECODE_OK:
            raise RuntimeError(f"decode failed with status {status} for a step of {len(tokens)} tokens")
        for slot, index in rows:
            self._advance(slot, self.ctx.logits(index))

    def _assign(self, slot: _Slot, req: GenRequest) -> None:
        from gguflm.tokenizer import StreamDecoder

        self.ctx.kv.seq_rm(slot.seq_id, 0, -1)  # no prefix reuse yet: a slot starts empty
        slot.req = req
        slot.n_fed = 0
        slot.next_token = None
        slot.n_generated = 0
        slot.text = ""
        slot.emitted = 0
        slot.decoder = StreamDecoder(self.tokenizer)

    def _advance(self, slot: _Slot, logits: Any) -> None:
        """Sample the slot's next token from its logits row; emit final text; finish when done."""
        from gguflm.llm import _find_stop, _held_back

        req = slot.req
        assert req is not None
        token = req.sampler(logits)
        if self.tokenizer.is_eog(token):
            self._finish(slot, reason="stop")
            return
        slot.n_generated += 1
        slot.text += slot.decoder.push(token)
        longest = max((len(s) for s in req.stops), default=0)
        cut = _find_stop(slot.text, req.stops, max(0, slot.emitted - longest))
        if cut is not None:
            slot.text = slot.text[:cut]
            self._finish(slot, reason="stop", flush=False)
            return
        if slot.n_generated >= req.max_tokens:
            self._finish(slot, reason="length")
            return
        safe = len(slot.text) - _held_back(slot.text, req.stops)
        self._send(slot, slot.text[slot.emitted : safe])
        slot.emitted = max(slot.emitted, safe)
        slot.next_token = token

    def _send(self, slot: _Slot, text: str) -> None:
        if text and slot.req is not None:
            slot.req.emit(("text", text))

    def _finish(
        self,
        slot: _Slot,
        reason: str = "stop",
        error: str | None = None,
        cancelled: bool = False,
        flush: bool = True,
    ) -> None:
        """Flush the slot's held-back text, tell the request how it ended, free the slot."""
        from gguflm.llm import _find_stop

        req = slot.req
        slot.req = None
        slot.next_token = None
        self.ctx.kv.seq_rm(slot.seq_id, 0, -1)
        if req is None or cancelled:
            return
        if error is not None:
            req.emit(("error", error))
            return
        text = slot.text + (slot.decoder.flush() if flush and slot.decoder is not None else "")
        cut = _find_stop(text, req.stops, 0)
        if cut is not None and cut >= slot.emitted:
            text, reason = text[:cut], "stop"
        if text[slot.emitted :]:
            req.emit(("text", text[slot.emitted :]))
        req.emit(("done", reason, len(req.prompt), slot.n_generated))
