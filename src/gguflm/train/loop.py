"""The training loop: AdamW with warm-up and cosine decay, gradient clipping, bf16 autocast where the
hardware computes in it, validation on held-back text, checkpoints that resume bit for bit.

Bit for bit: a checkpoint holds the weights, AdamW's moments, the schedule's position, the RNG states
and the data sampler's generator, and every batch is drawn from that generator only; so a run resumed
at step k computes the same batches, losses and weights as one that never stopped.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from gguflm.cpu import has_fast_bf16
from gguflm.train.bpe import END_OF_TEXT
from gguflm.train.config import TrainConfig
from gguflm.train.model import TrainableLlama, init_parameters

CHECKPOINT_FORMAT = "gguflm-train-1"


def learning_rate_factor(step: int, config: TrainConfig) -> float:
    """lr multiplier for the update after `step` updates: linear warm-up, then cosine to min_lr_ratio."""
    warmup, total = config.warmup_steps, config.steps
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass
class Corpus:
    """The text split into training tokens and held-back validation lines and tokens."""

    train_ids: torch.Tensor  # (N,) int64
    val_ids: torch.Tensor  # (M,) int64
    val_lines: list[str]
    bos: int

    @classmethod
    def split(cls, texts: Sequence[str], val_fraction: float) -> tuple[str, list[str]]:
        """(training text, held-back lines): the last val_fraction of each text's lines are held back,
        so that validation samples every file (a text of one line gives none)."""
        train_parts, val_lines = [], []
        for text in texts:
            lines = text.splitlines(keepends=True)
            n_val = min(len(lines) - 1, max(1, round(len(lines) * val_fraction))) if len(lines) > 1 else 0
            train_parts.append("".join(lines[: len(lines) - n_val]))
            val_lines += lines[len(lines) - n_val :]
        if not val_lines:
            raise ValueError("the text needs at least two lines (training and held-back validation)")
        return "\n".join(train_parts), val_lines

    @classmethod
    def encode(cls, tokenizer: Tokenizer, train_text: str, val_lines: list[str], ctx: int) -> Corpus:
        train_ids = torch.tensor(tokenizer.encode(train_text).ids, dtype=torch.long)
        val_ids = torch.tensor(tokenizer.encode("".join(val_lines)).ids, dtype=torch.long)
        if len(train_ids) < ctx:
            raise ValueError(
                f"the training text is {len(train_ids)} tokens, fewer than one window of --ctx {ctx}: "
                "give more text or a smaller --ctx"
            )
        if len(val_ids) < 2:
            raise ValueError("the held-back validation text is shorter than 2 tokens: give more text")
        bos = tokenizer.token_to_id(END_OF_TEXT)
        return cls(train_ids, val_ids, val_lines, bos)

    def unigram_entropy(self) -> float:
        """Entropy (nats/token) of the training tokens' frequencies: the loss of the best model that
        ignores context, the bar a trained model must go well below."""
        counts = torch.bincount(self.train_ids).double()
        p = counts[counts > 0] / counts.sum()
        return float(-(p * p.log()).sum())

    def windows(self, ids: torch.Tensor, starts: torch.Tensor, ctx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """-> inputs (B, ctx): BOS then the window's first ctx-1 tokens; targets (B, ctx): the window."""
        targets = torch.stack([ids[s : s + ctx] for s in starts.tolist()])  # (B, ctx)
        bos = torch.full((len(starts), 1), self.bos, dtype=torch.long)
        return torch.cat((bos, targets[:, :-1]), dim=1), targets


@dataclass
class History:
    train: list[float] = field(default_factory=list)  # loss of each step (step i+1 at index i)
    val: list[tuple[int, float]] = field(default_factory=list)  # (step, validation loss)
    tokens_per_s: list[float] = field(default_factory=list)
    grad_norm: list[float] = field(default_factory=list)  # before clipping: spikes show instability


class Trainer:
    """One model, its optimizer and schedule, and the data sampler; `run` trains to config.steps."""

    def __init__(
        self, config: TrainConfig, corpus: Corpus, tokenizer: Tokenizer, data_sha256: str, device: str = "cpu"
    ) -> None:
        self.config = config
        self.corpus = corpus
        self.tokenizer = tokenizer
        self.data_sha256 = data_sha256  # resuming on other data is refused
        self.device = torch.device(device)
        self.args = config.model_args(tokenizer.get_vocab_size())
        torch.manual_seed(config.seed)
        params = init_parameters(self.args, torch.Generator().manual_seed(config.seed))
        params = {n: torch.nn.Parameter(p.detach().to(self.device)) for n, p in params.items()}
        self.model = TrainableLlama(self.args, params)
        matrices = [p for p in params.values() if p.dim() == 2]
        vectors = [p for p in params.values() if p.dim() < 2]
        self.optimizer = torch.optim.AdamW(
            [
                {"params": matrices, "weight_decay": config.weight_decay},
                {"params": vectors, "weight_decay": 0.0},
            ],
            lr=config.lr,
            betas=(0.9, 0.95),
            eps=1e-8,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: learning_rate_factor(step, config)
        )
        self.data_rng = torch.Generator().manual_seed(config.seed + 1)
        self.step = 0
        self.history = History()
        self.autocast_dtype = self._autocast_dtype()
        self.interrupted = False

    def _autocast_dtype(self) -> torch.dtype | None:
        if self.config.bf16 == "off":
            return None
        if self.config.bf16 == "on":
            return torch.bfloat16
        if self.device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
        return torch.bfloat16 if self.device.type == "cpu" and has_fast_bf16() else None

    def autocast(self) -> torch.autocast:
        dtype = self.autocast_dtype or torch.bfloat16
        return torch.autocast(self.device.type, dtype=dtype, enabled=self.autocast_dtype is not None)

    # ---- steps ------------------------------------------------------------------------------

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A training batch: config.batch windows at random positions (from data_rng only)."""
        ids, ctx = self.corpus.train_ids, self.config.ctx
        starts = torch.randint(0, len(ids) - ctx + 1, (self.config.batch,), generator=self.data_rng)
        x, y = self.corpus.windows(ids, starts, ctx)
        return x.to(self.device), y.to(self.device)

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            logits = self.model(x)  # (B, T, n_vocab)
        return F.cross_entropy(logits.float().view(-1, self.args.n_vocab), y.reshape(-1))

    def train_step(self) -> float:
        x, y = self.batch()
        loss = self.loss(x, y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        self.history.grad_norm.append(norm.item())
        value = loss.item()
        if not math.isfinite(value):
            raise ValueError(f"the loss became {value} at step {self.step}: try a lower --lr")
        return value

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss over fixed windows of the held-back tokens (all of them when few)."""
        ids = self.corpus.val_ids
        ctx = min(self.config.ctx, len(ids))
        starts = torch.arange(0, len(ids) - ctx + 1, ctx)[: self.config.eval_windows]
        total, count = 0.0, 0
        for i in range(0, len(starts), self.config.batch):
            x, y = self.corpus.windows(ids, starts[i : i + self.config.batch], ctx)
            loss = self.loss(x.to(self.device), y.to(self.device))
            total += float(loss) * y.numel()
            count += y.numel()
        return total / count

    # ---- the loop -----------------------------------------------------------------------------

    def run(
        self,
        checkpoint: Path | None = None,
        *,
        save_every: int = 0,
        progress: bool = True,
        on_step: Callable[[int], None] | None = None,
    ) -> bool:
        """Train up to config.steps; True when done, False when Ctrl-C stopped it (a checkpoint was
        saved after the last whole step). Checkpoints every save_every steps and at the end."""
        from tqdm import tqdm

        cfg = self.config
        tokens_per_step = cfg.batch * cfg.ctx
        restore = self._catch_interrupt()
        bar = tqdm(
            total=cfg.steps, initial=self.step, unit="step", file=sys.stderr, disable=not progress, leave=True
        )
        rate = 0.0
        try:
            while self.step < cfg.steps and not self.interrupted:
                t0 = time.perf_counter()
                loss = self.train_step()
                dt = time.perf_counter() - t0
                rate = tokens_per_step / dt if rate == 0.0 else 0.9 * rate + 0.1 * tokens_per_step / dt
                self.history.train.append(loss)
                self.history.tokens_per_s.append(tokens_per_step / dt)
                if self.step % cfg.eval_every == 0 or self.step == cfg.steps:
                    self.history.val.append((self.step, self.evaluate()))
                postfix = {"loss": f"{loss:.3f}", "tok/s": f"{rate:.0f}"}
                if self.history.val:
                    postfix["val"] = f"{self.history.val[-1][1]:.3f}"
                bar.set_postfix(postfix, refresh=False)
                bar.update(1)
                if on_step is not None:
                    on_step(self.step)
                if checkpoint is not None and save_every and self.step % save_every == 0:
                    self.save(checkpoint)
        finally:
            bar.close()
            restore()
        if checkpoint is not None:
            self.save(checkpoint)
        return not self.interrupted

    def _catch_interrupt(self) -> Callable[[], None]:
        """Ctrl-C sets `interrupted` (the loop stops after the step in progress); a second one stops
        at once. Returns what puts the previous handler back."""
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        previous = signal.getsignal(signal.SIGINT)

        def handler(signum: int, frame: Any) -> None:
            self.interrupted = True
            signal.signal(signal.SIGINT, signal.default_int_handler)
            print(
                "\ninterrupted: saving a checkpoint after this step (Ctrl-C again to stop now)",
                file=sys.stderr,
            )

        signal.signal(signal.SIGINT, handler)
        return lambda: signal.signal(signal.SIGINT, previous)

    # ---- checkpoints --------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "model": {n: p.detach().cpu() for n, p in self.model.named_gguf_parameters().items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "data_rng": self.data_rng.get_state(),
            "torch_rng": torch.get_rng_state(),
            "history": asdict(self.history),
        }

    def save(self, path: Path) -> None:
        """Write atomically (a stopped write never leaves half a checkpoint)."""
        state = self.state() | {
            "format": CHECKPOINT_FORMAT,
            "config": asdict(self.config),
            "tokenizer": self.tokenizer.to_str(),
            "data_sha256": self.data_sha256,
        }
        tmp = path.with_name(path.name + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)

    def load_state(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            for name, p in self.model.named_gguf_parameters().items():
                p.copy_(state["model"][name])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.data_rng.set_state(state["data_rng"])
        torch.set_rng_state(state["torch_rng"])
        self.step = int(state["step"])
        h = state["history"]
        self.history = History(
            list(h["train"]), [tuple(v) for v in h["val"]], list(h["tokens_per_s"]), list(h["grad_norm"])
        )


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"checkpoint {path} does not exist") from None
    except Exception as e:  # torch raises several kinds on a file that is not one of its archives
        raise ValueError(f"{path} is not a gguflm training checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a gguflm training checkpoint (format {CHECKPOINT_FORMAT})")
    return state
