"""Rotary position embeddings: llama.cpp's ggml_rope_ext (normal and NEOX, linear, YaRN, frequency factors).

Every variant is a frequency per rotated pair and one magnitude: angle_j = pos * theta_j, then
(x_2j, x_2j+1) rotated by angle_j and scaled by mscale. Scaling schemes only change theta and mscale,
so they are computed once here and the forward pass does one complex product.
"""

from __future__ import annotations

import math

import torch

from gguflm.config import ModelArgs


def _yarn_corr_dim(n_dims: int, n_ctx_orig: int, n_rot: float, base: float) -> float:
    """The pair index whose wavelength makes n_rot turns over the original context (ggml's corr_dim)."""
    return n_dims * math.log(n_ctx_orig / (n_rot * 2 * math.pi)) / (2 * math.log(base))


def rope_frequencies(
    args: ModelArgs, base: float, freq_scale: float, freq_factors: torch.Tensor | None = None
) -> tuple[torch.Tensor, float]:
    """-> (theta (rope_dim/2,) float64, mscale): ggml_rope_ext's per-pair frequency and cos/sin scale.

    freq_factors (rope_freqs.weight of Llama 3.1, rope_factors_* of LongRoPE) divide the frequencies.
    YaRN mixes interpolated and extrapolated frequencies by a ramp over the pair index and raises mscale.
    """
    rd = args.rope_dim
    theta = base ** (-torch.arange(0, rd, 2, dtype=torch.float64) / rd)  # (rd/2,)
    if freq_factors is not None:
        theta = theta / freq_factors.to(torch.float64)
    mscale = args.rope_attn_factor
    if args.rope_scaling == "yarn" and freq_scale != 1.0:
        low = max(0.0, math.floor(_yarn_corr_dim(rd, args.n_ctx_orig, args.yarn_beta_fast, base)))
        high = min(rd - 1.0, math.ceil(_yarn_corr_dim(rd, args.n_ctx_orig, args.yarn_beta_slow, base)))
        pair = torch.arange(rd // 2, dtype=torch.float64)
        extrapolate = 1 - ((pair - low) / max(0.001, high - low)).clamp(0, 1)  # 1: keep theta, 0: scale it
        theta = theta * (freq_scale * (1 - extrapolate) + extrapolate)
        mscale *= 1.0 + 0.1 * math.log(1.0 / freq_scale)
    else:
        theta = theta * freq_scale
    return theta, mscale


class Rope:
    """Rotation of adjacent pairs (llama.cpp's "normal" rope) as one complex product.

    NEOX-style models rotate the two halves of a head instead; their q/k weight rows are permuted at
    load (`neox_to_pairs`) so that the same code serves both: q.k is unchanged when q and k are
    permuted alike, and the permuted keys never leave the KV cache.
    """

    def __init__(self, theta: torch.Tensor, mscale: float, rope_dim: int, device: torch.device) -> None:
        self.inv_freq = theta.to(device=device, dtype=torch.float32)  # (rope_dim/2,)
        self.mscale = mscale
        self.rope_dim = rope_dim

    def rotation(self, pos: torch.Tensor, *, shift: bool = False) -> torch.Tensor:
        """(n,) positions -> (n, 1, rope_dim/2) complex mscale e^(i pos theta_j), one per pair.

        shift: a pure rotation (for moving cached keys, which carry their magnitude already)."""
        angle = pos.to(torch.float32)[:, None, None] * self.inv_freq
        magnitude = torch.full_like(angle, 1.0 if shift else self.mscale)
        return torch.polar(magnitude, angle)

    def __call__(self, x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
        """x (n, heads, head_dim) float32 rotated by rotation (n, 1, rope_dim/2)."""
        n, heads, hd = x.shape
        rd = self.rope_dim
        part = x if rd == hd else x[..., :rd]
        pairs = torch.view_as_complex(part.reshape(n, heads, rd // 2, 2))  # (n, heads, rd/2)
        rotated = torch.view_as_real(pairs * rotation).view(n, heads, rd)
        return rotated if part is x else torch.cat((rotated, x[..., rd:]), dim=-1)


def neox_head_order(head_dim: int, rope_dim: int) -> torch.Tensor:
    """(head_dim,) order within a head that turns NEOX halves (x_j, x_{j+rd/2}) into adjacent pairs."""
    half = rope_dim // 2
    pairs = torch.stack((torch.arange(half), torch.arange(half) + half), dim=1).flatten()
    return torch.cat((pairs, torch.arange(rope_dim, head_dim)))


def neox_to_pairs(n_heads: int, head_dim: int, rope_dim: int) -> torch.Tensor:
    """(n_heads * head_dim,) row order applying neox_head_order to every head of a q or k matrix."""
    within = neox_head_order(head_dim, rope_dim)
    return (torch.arange(n_heads)[:, None] * head_dim + within[None, :]).flatten()
