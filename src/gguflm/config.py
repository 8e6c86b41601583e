"""ModelArgs: the hyper-parameters of a LLaMA-family model, read from the `{arch}.*` GGUF keys.

Architecture differences are fields (rope type, QKV bias, tied output), not forks of the model code.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gguflm.gguf_file import GGUFError, GGUFFile


@dataclass(frozen=True)
class ArchTraits:
    """What distinguishes one LLaMA-family architecture from another (llama.cpp's llm_arch)."""

    rope_type: str  # "normal": rotate adjacent pairs (llama.cpp LLAMA_ROPE_TYPE_NORM); "neox": halves
    qkv_bias: bool


ARCHITECTURES: dict[str, ArchTraits] = {
    "llama": ArchTraits(rope_type="normal", qkv_bias=False),
    "qwen2": ArchTraits(rope_type="neox", qkv_bias=True),
}


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
    rope_freq_base: float = 10000.0
    rope_freq_scale: float = 1.0
    rope_dim: int = 0  # 0: the whole head
    rope_type: str = "normal"
    qkv_bias: bool = False
    tied_output: bool = False
    head_dim: int = field(init=False)

    def __post_init__(self) -> None:
        if self.n_head <= 0 or self.n_embd % self.n_head:
            raise ValueError(f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}")
        if self.n_head_kv <= 0 or self.n_head % self.n_head_kv:
            raise ValueError(f"n_head {self.n_head} is not a multiple of n_head_kv {self.n_head_kv}")
        object.__setattr__(self, "head_dim", self.n_embd // self.n_head)
        if self.rope_dim == 0:
            object.__setattr__(self, "rope_dim", self.head_dim)
        if self.rope_dim > self.head_dim or self.rope_dim % 2:
            raise ValueError(f"rope dimension {self.rope_dim} does not fit head_dim {self.head_dim}")

    @property
    def n_embd_kv(self) -> int:
        return self.n_head_kv * self.head_dim

    @classmethod
    def from_gguf(cls, f: GGUFFile) -> ModelArgs:
        arch = f.require("general.architecture")
        if arch not in ARCHITECTURES:
            raise GGUFError(
                f"{f.path}: unknown architecture {arch!r} (supported: {', '.join(sorted(ARCHITECTURES))})"
            )
        traits = ARCHITECTURES[arch]

        def key(name: str) -> str:
            return f"{arch}.{name}"

        n_head = int(f.require(key("attention.head_count")))
        n_vocab = f.get(key("vocab_size"))
        if n_vocab is None:
            n_vocab = len(f.require("tokenizer.ggml.tokens"))
        scaling = f.get(key("rope.scaling.type"), "none")
        freq_scale = 1.0
        if scaling == "linear":
            freq_scale = 1.0 / float(f.require(key("rope.scaling.factor")))
        elif scaling not in ("none", None):
            raise GGUFError(f"{f.path}: rope scaling {scaling!r} is not supported")
        try:
            return cls(
                arch=arch,
                n_vocab=int(n_vocab),
                n_embd=int(f.require(key("embedding_length"))),
                n_layer=int(f.require(key("block_count"))),
                n_head=n_head,
                n_head_kv=int(f.get(key("attention.head_count_kv"), n_head)),
                n_ff=int(f.require(key("feed_forward_length"))),
                n_ctx_train=int(f.require(key("context_length"))),
                norm_eps=float(f.require(key("attention.layer_norm_rms_epsilon"))),
                rope_freq_base=float(f.get(key("rope.freq_base"), 10000.0)),
                rope_freq_scale=freq_scale,
                rope_dim=int(f.get(key("rope.dimension_count"), 0)),
                rope_type=traits.rope_type,
                qkv_bias=traits.qkv_bias,
                tied_output="output.weight" not in f.tensors,
            )
        except GGUFError:
            raise
        except ValueError as e:
            raise GGUFError(f"{f.path}: inconsistent hyper-parameters: {e}") from e
