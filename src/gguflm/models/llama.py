"""Llama (Llama 2/3, Mistral, SmolLM, TinyLlama) and Qwen 2: the pre-norm block with SwiGLU.

x -> RMSNorm -> attention (rope, grouped KV heads) -> + x -> RMSNorm -> SwiGLU -> + -> next layer
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gguflm.models.base import Attention, Linear, Transformer, UBatch, Weights


@dataclass
class LlamaLayer:
    attn_norm: torch.Tensor  # (n_embd,)
    attn: Attention
    ffn_norm: torch.Tensor  # (n_embd,)
    gate_up: Linear  # n_embd -> 2 n_ff: gate and up fused
    down: Linear  # n_ff -> n_embd


def load_swiglu(w: Weights, i: int, n_embd: int, n_ff: int) -> tuple[Linear, Linear]:
    """ffn_gate and ffn_up as one matrix (where their formats match), ffn_down."""
    p = f"blk.{i}"
    return (
        w.linear([(f"{p}.ffn_gate", n_ff), (f"{p}.ffn_up", n_ff)], n_embd),
        w.linear([(f"{p}.ffn_down", n_embd)], n_ff),
    )


class Llama(Transformer):
    fused_decode = True

    def load_layer(self, w: Weights, i: int) -> LlamaLayer:
        a = self.args
        gate_up, down = load_swiglu(w, i, a.n_embd, a.n_ff)
        return LlamaLayer(
            attn_norm=w.vector(f"blk.{i}.attn_norm.weight", a.n_embd),
            attn=self.attention_weights(w, i),
            ffn_norm=w.vector(f"blk.{i}.ffn_norm.weight", a.n_embd),
            gate_up=gate_up,
            down=down,
        )

    def block(self, layer: LlamaLayer, il: int, x: torch.Tensor, ub: UBatch) -> torch.Tensor:
        h = self.observe("attn_norm", il, self.norm(x, layer.attn_norm))
        attn = self.attention(layer.attn, h, il, ub)  # (T, n_head head_dim)
        attn, x = self.keep_outputs(il, ub, attn, x)
        x = self.observe("ffn_inp", il, x + layer.attn.wo(attn))
        h = self.observe("ffn_norm", il, self.norm(x, layer.ffn_norm))
        return x + self.gated_ffn(layer.gate_up, layer.down, h)


class Qwen2(Llama):
    """Llama with NEOX rope and q/k/v biases."""

    rope_neox = True
    qkv_bias = True
