"""Qwen 3: Llama's block with NEOX rope, no biases, and an RMSNorm on every query and key head.

x -> RMSNorm -> q, k, v; RMSNorm(q), RMSNorm(k) per head; rope -> attention -> + x
  -> RMSNorm -> SwiGLU -> +
"""

from __future__ import annotations

from gguflm.models.llama import Llama


class Qwen3(Llama):
    rope_neox = True
    qkv_bias = False
    qk_norm = True
