"""Phi-3 and Phi-4-mini: Llama's block with q/k/v fused in one tensor (attn_qkv) and gate/up in one
(ffn_up: gate rows, then up rows), NEOX rope with LongRoPE frequency factors.

x -> RMSNorm -> attn_qkv -> rope -> attention -> + x -> RMSNorm -> ffn_up -> SwiGLU -> ffn_down -> +
"""

from __future__ import annotations

import dataclasses

from gguflm.config import ModelArgs
from gguflm.gguf_file import GGUFFile
from gguflm.models.base import Weights
from gguflm.models.llama import Llama, LlamaLayer


class Phi3(Llama):
    rope_neox = True

    @classmethod
    def configure(cls, args: ModelArgs, file: GGUFFile) -> ModelArgs:
        # llama.cpp turns Phi-3's sliding window off: converted files do not describe it faithfully
        return dataclasses.replace(args, n_swa=0, swa_layers=())

    def load_layer(self, w: Weights, i: int) -> LlamaLayer:
        a, p = self.args, f"blk.{i}"
        return LlamaLayer(
            attn_norm=w.vector(f"{p}.attn_norm.weight", a.n_embd),
            attn=self.attention_weights(w, i, fused=True),
            ffn_norm=w.vector(f"{p}.ffn_norm.weight", a.n_embd),
            gate_up=w.linear([(f"{p}.ffn_up", 2 * a.n_ff)], a.n_embd),
            down=w.linear([(f"{p}.ffn_down", a.n_embd)], a.n_ff),
        )
