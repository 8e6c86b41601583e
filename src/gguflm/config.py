"""ModelArgs: the hyper-parameters of a model, read from the `{arch}.*` GGUF keys (llama.cpp's llama_hparams).

One dataclass for every family: keys a family does not use keep their neutral defaults. What the file
does not say but llama.cpp knows per architecture (Gemma's sliding-window pattern, its local rope base)
is filled by the family module (`models/*.py`, `configure`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from gguf import Keys

from gguflm.gguf_file import GGUFError, GGUFFile

ROPE_SCALINGS = ("none", "linear", "yarn", "longrope")


@dataclass(frozen=True)
class ModelArgs:
    arch: str
    n_vocab: int
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    n_ff: int
    n_ctx_train: int
    norm_eps: float
    head_dim: int = 0  # 0: n_embd / n_head (`attention.key_length` says otherwise for Gemma)
    rope_freq_base: float = 10000.0
    rope_dim: int = 0  # 0: the whole head
    rope_scaling: str = "none"  # one of ROPE_SCALINGS
    rope_freq_scale: float = 1.0  # 1 / rope.scaling.factor
    rope_attn_factor: float = 1.0  # rope.scaling.attn_factor: scales cos and sin (YaRN, LongRoPE)
    n_ctx_orig: int = 0  # rope.scaling.original_context_length; 0: n_ctx_train
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    n_swa: int = 0  # attention.sliding_window: local layers see the last n_swa positions; 0: none
    swa_layers: tuple[bool, ...] = ()  # which layers are local; () with n_swa: every layer (filled below)
    rope_freq_base_swa: float = 0.0  # rope base of local layers; 0: rope_freq_base
    rope_freq_scale_swa: float = 0.0  # and their frequency scale; 0: rope_freq_scale
    attn_scale: float = 0.0  # query scale; 0: 1 / sqrt(head_dim)
    attn_softcap: float = 0.0  # attn_logit_softcapping: scores -> c tanh(scores / c); 0: none
    final_softcap: float = 0.0  # final_logit_softcapping, the same on the logits
    tied_output: bool = False
    n_embd_head_q: int = field(init=False)  # n_head * head_dim: the attention width (not always n_embd)

    def __post_init__(self) -> None:
        for name in ("n_vocab", "n_embd", "n_layer", "n_head", "n_head_kv", "n_ff"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.head_dim == 0:
            if self.n_embd % self.n_head:
                raise ValueError(f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}")
            object.__setattr__(self, "head_dim", self.n_embd // self.n_head)
        if self.n_head % self.n_head_kv:
            raise ValueError(f"n_head {self.n_head} is not a multiple of n_head_kv {self.n_head_kv}")
        object.__setattr__(self, "n_embd_head_q", self.n_head * self.head_dim)
        if self.rope_dim == 0:
            object.__setattr__(self, "rope_dim", self.head_dim)
        if self.rope_dim > self.head_dim or self.rope_dim % 2:
            raise ValueError(f"rope dimension {self.rope_dim} does not fit head_dim {self.head_dim}")
        if self.rope_scaling not in ROPE_SCALINGS:
            raise ValueError(
                f"rope scaling {self.rope_scaling!r} is not supported ({', '.join(ROPE_SCALINGS)})"
            )
        if self.n_ctx_orig == 0:
            object.__setattr__(self, "n_ctx_orig", self.n_ctx_train)
        if self.n_swa and not self.swa_layers:
            object.__setattr__(self, "swa_layers", (True,) * self.n_layer)
        if self.swa_layers and len(self.swa_layers) != self.n_layer:
            raise ValueError(f"swa_layers has {len(self.swa_layers)} entries for {self.n_layer} layers")
        if self.rope_freq_base_swa == 0.0:
            object.__setattr__(self, "rope_freq_base_swa", self.rope_freq_base)
        if self.rope_freq_scale_swa == 0.0:
            object.__setattr__(self, "rope_freq_scale_swa", self.rope_freq_scale)
        if self.attn_scale == 0.0:
            object.__setattr__(self, "attn_scale", 1.0 / math.sqrt(self.head_dim))

    @property
    def n_embd_kv(self) -> int:
        return self.n_head_kv * self.head_dim

    def window(self, layer: int) -> int:
        """The attention window of a layer: n_swa for a local (sliding-window) layer, 0 for a global one."""
        return self.n_swa if self.swa_layers and self.swa_layers[layer] else 0

    @property
    def windows(self) -> tuple[int, ...]:
        """The distinct windows of the layers (0 = global), each needing its own attention mask."""
        return tuple(sorted({self.window(i) for i in range(self.n_layer)}))

    @classmethod
    def from_gguf(cls, f: GGUFFile) -> ModelArgs:
        """The keys every family shares, by gguf's own key names. Raises GGUFError naming what is wrong."""
        arch = str(f.require("general.architecture"))

        def get(key: str, default: Any = None) -> Any:
            return f.get(key.format(arch=arch), default)

        def require(key: str) -> Any:
            return f.require(key.format(arch=arch))

        n_head = int(require(Keys.Attention.HEAD_COUNT))
        n_vocab = get(Keys.LLM.VOCAB_SIZE)
        if n_vocab is None:
            n_vocab = len(f.require("tokenizer.ggml.tokens"))
        scaling = str(get(Keys.Rope.SCALING_TYPE, "none") or "none")
        factor = float(get(Keys.Rope.SCALING_FACTOR, 1.0) or 1.0)
        if scaling not in ROPE_SCALINGS:
            raise GGUFError(
                f"{f.path}: rope scaling {scaling!r} is not supported ({', '.join(ROPE_SCALINGS)})"
            )
        try:
            return cls(
                arch=arch,
                n_vocab=int(n_vocab),
                n_embd=int(require(Keys.LLM.EMBEDDING_LENGTH)),
                n_layer=int(require(Keys.LLM.BLOCK_COUNT)),
                n_head=n_head,
                n_head_kv=int(get(Keys.Attention.HEAD_COUNT_KV, n_head)),
                n_ff=int(require(Keys.LLM.FEED_FORWARD_LENGTH)),
                n_ctx_train=int(require(Keys.LLM.CONTEXT_LENGTH)),
                norm_eps=float(require(Keys.Attention.LAYERNORM_RMS_EPS)),
                head_dim=int(get(Keys.Attention.KEY_LENGTH, 0)),
                rope_freq_base=float(get(Keys.Rope.FREQ_BASE, 10000.0)),
                rope_dim=int(get(Keys.Rope.DIMENSION_COUNT, 0)),
                rope_scaling=scaling,
                rope_freq_scale=1.0 / factor if scaling in ("linear", "yarn") else 1.0,
                rope_attn_factor=float(get(Keys.Rope.SCALING_ATTN_FACTOR, 1.0)),
                n_ctx_orig=int(get(Keys.Rope.SCALING_ORIG_CTX_LEN, 0)),
                yarn_beta_fast=float(get(Keys.Rope.SCALING_YARN_BETA_FAST, 32.0)),
                yarn_beta_slow=float(get(Keys.Rope.SCALING_YARN_BETA_SLOW, 1.0)),
                n_swa=int(get(Keys.Attention.SLIDING_WINDOW, 0)),
                rope_freq_base_swa=float(get(Keys.Rope.FREQ_BASE_SWA, 0.0)),
                attn_softcap=float(get(Keys.LLM.ATTN_LOGIT_SOFTCAPPING, 0.0)),
                final_softcap=float(get(Keys.LLM.FINAL_LOGIT_SOFTCAPPING, 0.0)),
                tied_output="output.weight" not in f.tensors,
            )
        except GGUFError:
            raise
        except (ValueError, TypeError) as e:
            raise GGUFError(f"{f.path}: inconsistent hyper-parameters: {e}") from e
