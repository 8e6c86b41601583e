"""Gemma 3 (text) and Gemma 2: Llama's block with a norm after attention and after the FFN, a GELU
gate, embeddings scaled by sqrt(n_embd), and local (sliding-window) layers between global ones.

x*sqrt(n_embd) -> RMSNorm -> attention (q/k norms in Gemma 3; local or global) -> RMSNorm -> + x
               -> RMSNorm -> GELU-tanh gated FFN -> RMSNorm -> + -> next layer
Gemma 2 has no q/k norms and soft-caps attention scores (50) and final logits (30).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from gguf import Keys

from gguflm.config import ModelArgs
from gguflm.gguf_file import GGUFFile
from gguflm.models.base import Attention, Linear, Transformer, UBatch, Weights
from gguflm.models.llama import load_swiglu


@dataclass
class GemmaLayer:
    attn_norm: torch.Tensor  # (n_embd,)
    attn: Attention
    attn_post_norm: torch.Tensor  # (n_embd,)
    ffn_norm: torch.Tensor  # (n_embd,)
    gate_up: Linear  # n_embd -> 2 n_ff
    down: Linear  # n_ff -> n_embd
    ffn_post_norm: torch.Tensor  # (n_embd,)


def _swa_pattern(n_layer: int, period: int) -> tuple[bool, ...]:
    """llama.cpp's set_swa_pattern: in every `period` layers all but the last are local."""
    return tuple(il % period < period - 1 for il in range(n_layer))


class Gemma3(Transformer):
    fused_decode = True
    gelu_ffn = True
    rope_neox = True
    embd_scale = True
    qkv_bias = False
    qk_norm = True
    swa_period = 6  # 5 local : 1 global
    n_layer_27b = 62  # the 27B model scales queries by n_embd / n_head, not head_dim

    @classmethod
    def configure(cls, args: ModelArgs, file: GGUFFile) -> ModelArgs:
        period = file.get(Keys.Attention.SLIDING_WINDOW_PATTERN.format(arch=args.arch), cls.swa_period)
        # an int period, or (some converters) one flag per layer
        swa = _swa_pattern(args.n_layer, period) if isinstance(period, int) else tuple(map(bool, period))
        scale_dim = args.n_embd // args.n_head if args.n_layer == cls.n_layer_27b else args.head_dim
        base = file.get(Keys.Rope.FREQ_BASE_SWA.format(arch=args.arch), 10000.0)
        return dataclasses.replace(
            args,
            swa_layers=swa,
            attn_scale=1.0 / math.sqrt(scale_dim),
            rope_freq_base_swa=float(base),  # local layers: base 10000 and no scaling
            rope_freq_scale_swa=1.0,
        )

    def load_layer(self, w: Weights, i: int) -> GemmaLayer:
        a, p = self.args, f"blk.{i}"
        gate_up, down = load_swiglu(w, i, a.n_embd, a.n_ff)
        return GemmaLayer(
            attn_norm=w.vector(f"{p}.attn_norm.weight", a.n_embd),
            attn=self.attention_weights(w, i),
            attn_post_norm=w.vector(f"{p}.post_attention_norm.weight", a.n_embd),
            ffn_norm=w.vector(f"{p}.ffn_norm.weight", a.n_embd),
            gate_up=gate_up,
            down=down,
            ffn_post_norm=w.vector(f"{p}.post_ffw_norm.weight", a.n_embd),
        )

    def block(self, layer: GemmaLayer, il: int, x: torch.Tensor, ub: UBatch) -> torch.Tensor:
        h = self.observe("attn_norm", il, self.norm(x, layer.attn_norm))
        attn = self.attention(layer.attn, h, il, ub)  # (T, n_head head_dim)
        attn, x = self.keep_outputs(il, ub, attn, x)
        attn = self.observe(
            "attn_post_norm", il, self.norm(layer.attn.wo(attn).float(), layer.attn_post_norm)
        )
        x = self.observe("ffn_inp", il, x + attn)
        h = self.observe("ffn_norm", il, self.norm(x, layer.ffn_norm))
        ffn = self.gated_ffn(layer.gate_up, layer.down, h, gelu=self.gelu_ffn)
        return x + self.observe("ffn_post_norm", il, self.norm(ffn, layer.ffn_post_norm))


class Gemma2(Gemma3):
    qk_norm = False
    swa_period = 2  # local and global alternate
    n_layer_27b = 46

    @classmethod
    def configure(cls, args: ModelArgs, file: GGUFFile) -> ModelArgs:
        scale_dim = args.n_embd // args.n_head if args.n_layer == cls.n_layer_27b else args.head_dim
        return dataclasses.replace(
            args,
            n_swa=args.n_swa or 4096,
            swa_layers=_swa_pattern(args.n_layer, cls.swa_period),
            attn_scale=1.0 / math.sqrt(scale_dim),
            attn_softcap=args.attn_softcap or 50.0,  # llama.cpp's defaults when the file is silent
            final_softcap=args.final_softcap or 30.0,
        )
