"""`gguflm train`'s settings, importable without torch (the CLI builds its parser from them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gguflm.config import ModelArgs

OUTTYPES = ("f32", "f16", "q8_0")  # matrix types of the exported GGUF (gguflm.train.export)


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides the run's numbers (stored in checkpoints)."""

    vocab_size: int = 4096
    n_embd: int = 256
    n_layer: int = 6
    n_head: int = 8
    n_head_kv: int = 4
    n_ff: int = 688
    ctx: int = 256
    tie_embeddings: bool = False
    steps: int = 2000
    batch: int = 16
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # the cosine ends at lr * min_lr_ratio
    warmup: int = -1  # steps of linear warm-up; -1: 5% of steps (at most 200)
    weight_decay: float = 0.1  # on matrices only, not on norms
    grad_clip: float = 1.0
    seed: int = 0
    eval_every: int = 100
    eval_windows: int = 64  # validation windows of ctx tokens (at most: fewer when the text is short)
    val_fraction: float = 0.1  # the last lines of the text, held back from tokenizer and model
    rope_freq_base: float = 10000.0
    norm_eps: float = 1e-5
    bf16: str = "auto"  # auto: bf16 autocast where the CPU (AVX512-BF16, AMX) or GPU computes in it

    def __post_init__(self) -> None:
        for name in ("n_embd", "n_layer", "n_head", "n_head_kv", "n_ff", "ctx", "steps", "batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"the validation fraction must be in (0, 1), got {self.val_fraction}")
        if self.lr <= 0:
            raise ValueError(f"--lr must be positive, got {self.lr}")
        if self.bf16 not in ("auto", "on", "off"):
            raise ValueError(f"bf16 must be auto, on or off, got {self.bf16!r}")

    @property
    def warmup_steps(self) -> int:
        return self.warmup if self.warmup >= 0 else min(200, self.steps // 20)

    def model_args(self, n_vocab: int) -> ModelArgs:
        from gguflm.config import ModelArgs

        return ModelArgs(
            arch="llama",
            n_vocab=n_vocab,
            n_embd=self.n_embd,
            n_layer=self.n_layer,
            n_head=self.n_head,
            n_head_kv=self.n_head_kv,
            n_ff=self.n_ff,
            n_ctx_train=self.ctx,
            norm_eps=self.norm_eps,
            rope_freq_base=self.rope_freq_base,
            tied_output=self.tie_embeddings,
        )
