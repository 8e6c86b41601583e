"""`train()`: data files in; a checkpoint, a GGUF and a loss-curve PNG out (the whole `gguflm train`)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from gguflm.train.bpe import train_bpe
from gguflm.train.config import OUTTYPES, TrainConfig
from gguflm.train.export import export_gguf
from gguflm.train.loop import Corpus, History, Trainer, load_checkpoint


@dataclass
class TrainResult:
    trainer: Trainer
    finished: bool  # False: Ctrl-C stopped it (checkpoint saved, nothing exported)
    checkpoint: Path
    gguf: Path | None
    plot: Path | None
    unigram_entropy: float

    @property
    def history(self) -> History:
        return self.trainer.history


def read_data(paths: Sequence[str | os.PathLike[str]]) -> list[str]:
    """The files' texts; a file named twice (or through a link) is read once."""
    texts, seen = [], set()
    for p in paths:
        real = Path(p).resolve()
        if real in seen:
            continue
        seen.add(real)
        try:
            texts.append(Path(p).read_text(encoding="utf-8", errors="replace"))
        except OSError as e:
            raise ValueError(f"cannot read {p}: {e.strerror}") from None
    if not any(t.strip() for t in texts):
        raise ValueError("the training data is empty")
    return texts


def prepare(
    texts: Sequence[str], config: TrainConfig, device: str = "cpu", checkpoint: dict[str, Any] | None = None
) -> Trainer:
    """A trainer over `texts` (one per file): a new tokenizer and model, or the checkpoint's state to
    go on from."""
    digest = hashlib.sha256("\n".join(texts).encode("utf-8")).hexdigest()
    train_text, val_lines = Corpus.split(texts, config.val_fraction)
    if checkpoint is None:
        tokenizer = train_bpe(train_text.splitlines(keepends=True), config.vocab_size)
    else:
        if checkpoint["data_sha256"] != digest:
            raise ValueError("the data differs from the data the checkpoint was trained on")
        tokenizer = Tokenizer.from_str(checkpoint["tokenizer"])
    corpus = Corpus.encode(tokenizer, train_text, val_lines, config.ctx)
    trainer = Trainer(config, corpus, tokenizer, digest, device)
    if checkpoint is not None:
        trainer.load_state(checkpoint)
    return trainer


def config_from_checkpoint(state: dict[str, Any], steps: int | None) -> TrainConfig:
    """The checkpoint's config; `steps` may extend the run (the cosine schedule then stretches)."""
    known = {f.name for f in fields(TrainConfig)}
    config = TrainConfig(**{k: v for k, v in state["config"].items() if k in known})
    return replace(config, steps=steps) if steps is not None else config


def train(
    data: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    config: TrainConfig | None = None,
    *,
    resume: str | os.PathLike[str] | None = None,
    steps: int | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    outtype: str = "f32",
    device: str = "cpu",
    save_every: int = 0,
    progress: bool = True,
    plot: bool = True,
    on_step: Callable[[int], None] | None = None,
    log: Callable[[str], None] = lambda _: None,
) -> TrainResult:
    """Train a new model by `config` (or go on from the checkpoint `resume`, by its own config), to
    `steps` (default: the config's), then write `out` (GGUF) and `out`.png. A Ctrl-C stops it after
    the step in progress with a checkpoint written; so do checkpoints every save_every steps and at
    the end, to `checkpoint` (default: `out` with suffix .ckpt)."""
    if outtype not in OUTTYPES:
        raise ValueError(f"unknown --outtype {outtype!r} (expected one of {', '.join(OUTTYPES)})")
    out = Path(out)
    ckpt_path = Path(checkpoint) if checkpoint else out.with_suffix(".ckpt")
    texts = read_data(data)
    state = None
    if resume is not None:
        state = load_checkpoint(Path(resume))
        config = config_from_checkpoint(state, steps)
    elif config is None:
        raise ValueError("give a TrainConfig for a new run, or a checkpoint to resume")
    elif steps is not None:
        config = replace(config, steps=steps)
    trainer = prepare(texts, config, device, state)
    entropy = trainer.corpus.unigram_entropy()
    a = trainer.args
    n_params = sum(p.numel() for p in trainer.model.parameters())
    log(
        f"{n_params / 1e6:.2f} M parameters (n_vocab {a.n_vocab}, n_embd {a.n_embd}, n_layer {a.n_layer}, "
        f"{'tied' if a.tied_output else 'untied'} embeddings); {len(trainer.corpus.train_ids)} training "
        f"tokens, {len(trainer.corpus.val_ids)} held back; unigram entropy {entropy:.3f} nats/token; "
        f"{'bf16 autocast' if trainer.autocast_dtype else 'fp32'} on {trainer.device}"
        + (f"; resuming at step {trainer.step}" if state is not None else "")
    )
    finished = trainer.run(ckpt_path, save_every=save_every, progress=progress, on_step=on_step)
    gguf_path = png = None
    if finished:
        gguf_path = export_gguf(out, a, trainer.model.named_gguf_parameters(), trainer.tokenizer, outtype)
        if plot:
            from gguflm.plots import loss_curves

            png = loss_curves(out.with_suffix(".png"), {"": trainer.history}, entropy, title=out.name)
    return TrainResult(trainer, finished, ckpt_path, gguf_path, png, entropy)
