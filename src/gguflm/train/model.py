"""The engine's own Llama, made trainable: fp32 nn.Parameters behind the engine's Linear, and a forward
over a batch of sequences through `Transformer.forward` (no second transformer).

The engine reads its weights through `Weights` (from a GGUF file) into `Linear`s of `QuantizedLinear`
runs. Here `TrainableWeights` hands it `DenseLinear` runs over parameters named as in GGUF instead, so
the family's `load_layer` and `block` build and run the very model that `gguflm run` loads from the
exported file. Attention writes a fresh KV cache of the micro-batch's own cells each step (autograd
follows the copy), with each sequence as its own causal set (`SequenceGroup`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from gguflm.config import ModelArgs
from gguflm.gguf_file import GGUFError
from gguflm.kv_cache import KVCache
from gguflm.models.base import Linear, SequenceGroup, UBatch, Weights
from gguflm.models.llama import Llama
from gguflm.quants import QT


class DenseLinear(torch.nn.Module):
    """y = x W^T with W the fp32 parameters `parts` stacked along the output dim (fused q/k/v,
    gate/up): the QuantizedLinear interface the engine's Linear and Transformer call (mm, rows,
    input_dtype), differentiable. Under autocast the matmul runs in its dtype (bf16)."""

    qtype = QT.F32

    def __init__(self, parts: Sequence[torch.nn.Parameter]) -> None:
        super().__init__()
        self.parts = torch.nn.ParameterList(parts)
        self.in_features = int(parts[0].shape[1])
        self.out_features = sum(int(p.shape[0]) for p in parts)

    @property
    def weight(self) -> torch.Tensor:
        """(out, in): the parts stacked (a copy when there are several, so that autograd splits it)."""
        return self.parts[0] if len(self.parts) == 1 else torch.cat(list(self.parts))

    def input_dtype(self, m: int) -> torch.dtype:
        return torch.float32

    def mm(self, x2: torch.Tensor) -> torch.Tensor:
        """(M, in) -> (M, out)."""
        return F.linear(x2, self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """(n,) ids -> (n, in) rows of W: token embeddings."""
        return F.embedding(ids.reshape(-1), self.weight)

    def keep_dense_copy(self) -> None:
        """Already dense (Context asks for it when several sequences decode)."""


class _ParameterFile:
    """What `Weights` reads of a GGUF file (tensors by name, a path for messages), over parameters."""

    def __init__(self, params: dict[str, torch.nn.Parameter]) -> None:
        self.path = Path("<trainable parameters>")
        self.tensors = params

    def release_pages(self) -> None:
        """Nothing is memory-mapped."""


class TrainableWeights(Weights):
    """`Weights` whose tensors are trainable fp32 parameters named as in GGUF (llama layout only:
    no biases, no NEOX row permutation, which the llama family never asks for)."""

    def __init__(self, params: dict[str, torch.nn.Parameter], args: ModelArgs, device: torch.device) -> None:
        super().__init__(_ParameterFile(params), args, "reference", device)  # type: ignore[arg-type]
        self.params = params

    def parameter(self, name: str, shape: tuple[int, ...]) -> torch.nn.Parameter:
        p = self.params.get(name)
        if p is None:
            raise GGUFError(f"missing parameter {name!r}")
        if tuple(p.shape) != shape:
            raise GGUFError(f"parameter {name!r} has shape {tuple(p.shape)}, expected {shape}")
        self.read.add(name)
        return p

    def vector(self, name: str, n: int) -> torch.Tensor:
        return self.parameter(name, (n,))

    def linear(
        self,
        parts: Sequence[tuple[str, int]],
        n_in: int,
        *,
        bias: bool | None = False,
        row_order: Sequence[torch.Tensor | None] = (),
    ) -> Linear:
        if bias is True or any(order is not None for order in row_order):
            raise ValueError("trainable weights have no biases and no row permutation (llama layout)")
        dense = DenseLinear([self.parameter(f"{name}.weight", (n_out, n_in)) for name, n_out in parts])
        return Linear([dense])  # type: ignore[list-item]

    def matrix(self, name: str, n_out: int, n_in: int) -> DenseLinear:  # type: ignore[override]
        return DenseLinear([self.parameter(f"{name}.weight", (n_out, n_in))])


def parameter_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """GGUF tensor name -> shape (torch order) of a llama model, in llama.cpp's converter's order."""
    a = args
    shapes: dict[str, tuple[int, ...]] = {"token_embd.weight": (a.n_vocab, a.n_embd)}
    for i in range(a.n_layer):
        p = f"blk.{i}"
        shapes |= {
            f"{p}.attn_norm.weight": (a.n_embd,),
            f"{p}.attn_q.weight": (a.n_embd_head_q, a.n_embd),
            f"{p}.attn_k.weight": (a.n_embd_kv, a.n_embd),
            f"{p}.attn_v.weight": (a.n_embd_kv, a.n_embd),
            f"{p}.attn_output.weight": (a.n_embd, a.n_embd_head_q),
            f"{p}.ffn_norm.weight": (a.n_embd,),
            f"{p}.ffn_gate.weight": (a.n_ff, a.n_embd),
            f"{p}.ffn_up.weight": (a.n_ff, a.n_embd),
            f"{p}.ffn_down.weight": (a.n_embd, a.n_ff),
        }
    shapes["output_norm.weight"] = (a.n_embd,)
    if not a.tied_output:
        shapes["output.weight"] = (a.n_vocab, a.n_embd)
    return shapes


def init_parameters(args: ModelArgs, generator: torch.Generator) -> dict[str, torch.nn.Parameter]:
    """Fresh weights: norms 1, matrices normal with std 0.02, the projections back into the residual
    stream (attn_output, ffn_down) scaled by 1/sqrt(2 n_layer) (GPT-2's scheme)."""
    params: dict[str, torch.nn.Parameter] = {}
    residual_std = 0.02 / (2 * args.n_layer) ** 0.5
    for name, shape in parameter_shapes(args).items():
        if len(shape) == 1:
            value = torch.ones(shape)
        else:
            std = residual_std if name.endswith(("attn_output.weight", "ffn_down.weight")) else 0.02
            value = torch.randn(shape, generator=generator) * std
        params[name] = torch.nn.Parameter(value)
    return params


class TrainableLlama(torch.nn.Module):
    """The engine's `Llama` over trainable parameters; `forward` takes (B, T) token ids."""

    def __init__(self, args: ModelArgs, params: dict[str, torch.nn.Parameter]) -> None:
        super().__init__()
        if args.arch != "llama":
            raise ValueError(f"training builds llama models, not {args.arch!r}")
        self.args = args
        device = next(iter(params.values())).device
        self.params = torch.nn.ParameterDict({_key(n): p for n, p in params.items()})
        self.transformer = Llama(args, TrainableWeights(params, args, device))

    def named_gguf_parameters(self) -> dict[str, torch.nn.Parameter]:
        """GGUF tensor name -> parameter."""
        return {_name(k): p for k, p in self.params.items()}

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, T) -> logits (B, T, n_vocab), each row of tokens a sequence at positions 0..T-1."""
        B, T = tokens.shape
        a, tr = self.args, self.transformer
        device = tokens.device
        kv = KVCache(
            n_layer=a.n_layer,
            n_ctx=B * T,
            n_head_kv=a.n_head_kv,
            head_dim=a.head_dim,
            n_seq_max=1,
            shift_keys=tr.shift_keys,
            device=device,
        )
        cells = torch.arange(B * T, device=device)
        sets = cells.view(B, T)  # (B, T): sequence b's rows are its cells, in position order
        ub = UBatch(
            pos=torch.arange(T, device=device).repeat(B),
            cells=cells,
            kv=kv,
            n_kv=B * T,
            masks={w: None for w in a.windows},
            out_rows=cells,
            groups=[SequenceGroup(sets, sets, {w: None for w in a.windows})],
        )
        hidden = tr.forward(tr.embed(tokens.reshape(-1)), ub)  # (B T, n_embd)
        return tr.logits(hidden).view(B, T, a.n_vocab)


def _key(name: str) -> str:
    """A GGUF name as a ParameterDict key (no dots)."""
    return name.replace(".", "__")


def _name(key: str) -> str:
    return key.replace("__", ".")
