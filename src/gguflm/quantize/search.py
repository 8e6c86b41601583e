"""llama.cpp's scale searches (ggml-quants.c), vectorized over groups, in its float32 order of operations.

Each function takes `x` as (G, n): G independent groups of n values, and returns what the C function
returns for every group at once. Sums run element by element in index order (`seq_sum`), products are
grouped as the C source writes them, and ties round half to even as `nearest_int` does, so the codes
and scales match llama.cpp's bit for bit (its ggml-base is built without FMA contraction).
"""

from __future__ import annotations

import numpy as np
import torch

GROUP_MAX_EPS = 1e-15  # ggml-quants.c: groups with a largest |x| below this are all zero


def f32(v: float) -> float:
    """A C float constant (0.1f): the Python float holding exactly the float32 value."""
    return float(np.float32(v))


def seq_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over the last dim in index order, as a C loop `s += t[i]` does (torch's sum reorders)."""
    cols = t.movedim(-1, 0).contiguous()  # (n, ...): each step adds one contiguous slice
    acc = cols[0].clone()
    for i in range(1, cols.shape[0]):
        acc += cols[i]
    return acc


def rdiv(num: float, t: torch.Tensor) -> torch.Tensor:
    """num / t correctly rounded (torch's `num / t` is reciprocal-then-multiply, off by an ulp)."""
    return torch.div(torch.full_like(t, num), t)


def sqrtf(v: torch.Tensor) -> torch.Tensor:
    """C's sqrtf, correctly rounded (torch's vectorized float32 sqrt may be off by an ulp): the float64
    root of a float32 rounds to the same float32 as the exact root."""
    return torch.sqrt(v.double()).float()


def nearest_int(v: torch.Tensor) -> torch.Tensor:
    """llama.cpp's nearest_int: round half to even (its 1.5 * 2**23 trick), as int32."""
    return torch.round(v).to(torch.int32)


def f16_round(v: torch.Tensor) -> torch.Tensor:
    """GGML_FP16_TO_FP32(GGML_FP32_TO_FP16(v)): the value a stored f16 scale reads back as."""
    return v.to(torch.float16).to(torch.float32)


def first_absmax(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(|x| max, the x holding it): the first one, as a loop with `if (ax > amax)` keeps it."""
    ax = x.abs()
    idx = ax.argmax(dim=-1, keepdim=True)  # first maximal index
    return ax.gather(-1, idx).squeeze(-1), x.gather(-1, idx).squeeze(-1)


def make_qx_quants(
    nmax: int, x: torch.Tensor, rmse_type: int, qw: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric codes L in 0..2 nmax - 1 (value L - nmax) and a scale per group (rmse_type 1 only).

    Weights are qw, or x^2 without them; tries 18 scales around -nmax / max and keeps the one that
    maximizes (sum w x l)^2 / sum w l^2, the least-squares fit. -> (scale (G,), L (G, n) int32)."""
    if rmse_type != 1:
        raise ValueError("only rmse_type 1 is used by the quantizers")
    amax, vmax = first_absmax(x)
    zero = amax < GROUP_MAX_EPS
    vmax = torch.where(zero, torch.ones_like(vmax), vmax)
    w = qw if qw is not None else x * x
    wx = w * x

    def codes(iscale: torch.Tensor) -> torch.Tensor:
        return nearest_int(iscale.unsqueeze(-1) * x).clamp_(-nmax, nmax - 1)

    def sums(ls: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lf = ls.float()
        both = seq_sum(torch.stack((wx * lf, w * lf * lf)))  # (2, G)
        return both[0], both[1]

    ls = codes(rdiv(-nmax, vmax))
    sumlx, suml2 = sums(ls)
    scale = torch.where(suml2 != 0, sumlx / suml2, torch.zeros_like(sumlx))
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = rdiv(-f32(nmax + f32(f32(0.1) * step)), vmax)
        trial = codes(iscale)
        sumlx, suml2 = sums(trial)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        ls = torch.where(better.unsqueeze(-1), trial, ls)
        scale = torch.where(better, sumlx / suml2, scale)
        best = torch.where(better, scale * sumlx, best)
    ls = torch.where(zero.unsqueeze(-1), -nmax, ls)
    return torch.where(zero, 0.0, scale), ls + nmax


def _greedy_refine(
    x: torch.Tensor,
    w: torch.Tensor,
    ls: torch.Tensor,
    lo: int | None,
    hi: int,
    need_sl2: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Up to 5 passes of one-code-at-a-time changes that raise (sum w x l)^2 / sum w l^2.

    make_q3_quants (need_sl2=False: the step is tried whenever slx > 0) and make_qp_quants
    (need_sl2=True, no lower clamp). A pass that changes nothing leaves the state as it was, so
    running all 5 passes for every group equals llama.cpp's early stop. -> (ls, sumlx, suml2)."""
    wx = w * x
    lf = ls.float()
    both = seq_sum(torch.stack((wx * lf, w * lf * lf)))
    sumlx, suml2 = both[0], both[1]
    ls = ls.clone()
    for _ in range(5):
        for i in range(x.shape[-1]):
            xi, wi, wxi = x[:, i], w[:, i], wx[:, i]
            li = ls[:, i].float()
            slx = sumlx - wxi * li
            sl2 = suml2 - wi * li * li
            ok = (slx > 0) & (sl2 > 0) if need_sl2 else slx > 0
            new_l = nearest_int(xi * sl2 / slx)
            new_l = new_l.clamp(min=lo, max=hi) if lo is not None else new_l.clamp(max=hi)
            nl = new_l.float()
            slx2 = slx + wxi * nl
            sl22 = sl2 + wi * nl * nl
            take = ok & (new_l != ls[:, i]) & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22)
            if not need_sl2:
                take &= sl22 > 0
            ls[:, i] = torch.where(take, new_l, ls[:, i])
            sumlx = torch.where(take, slx2, sumlx)
            suml2 = torch.where(take, sl22, suml2)
    return ls, sumlx, suml2


def make_q3_quants(nmax: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """make_q3_quants(do_rmse=true): x^2-weighted codes, refined greedily -> (scale (G,), L 0..2nmax-1)."""
    amax, vmax = first_absmax(x)
    zero = amax < GROUP_MAX_EPS
    vmax = torch.where(zero, torch.ones_like(vmax), vmax)
    iscale = rdiv(-nmax, vmax)
    ls = nearest_int(iscale.unsqueeze(-1) * x).clamp_(-nmax, nmax - 1)
    ls, sumlx, suml2 = _greedy_refine(x, x * x, ls, -nmax, nmax - 1, need_sl2=False)
    scale = torch.where(suml2 > 0, sumlx / suml2, torch.zeros_like(sumlx))
    ls = torch.where(zero.unsqueeze(-1), -nmax, ls)
    return torch.where(zero, 0.0, scale), ls + nmax


def make_qp_quants(nmax: int, x: torch.Tensor, qw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes 0..nmax for non-negative x (the sub-block scales of a K-quant with an imatrix)."""
    vmax = x.clamp(min=0).max(dim=-1).values
    zero = vmax < GROUP_MAX_EPS
    vmax = torch.where(zero, torch.ones_like(vmax), vmax)
    iscale = rdiv(nmax, vmax)
    ls0 = nearest_int(iscale.unsqueeze(-1) * x)
    scale = rdiv(1.0, iscale)
    diff = x - scale.unsqueeze(-1) * ls0.float()
    best = seq_sum(qw * diff * diff)
    for step in range(-4, 5):
        if step == 0:
            continue
        iscale_is = rdiv(f32(f32(f32(0.1) * step) + nmax), vmax)
        scale_is = rdiv(1.0, iscale_is)
        lt = nearest_int(iscale_is.unsqueeze(-1) * x).clamp_(max=nmax)
        diff = x - scale_is.unsqueeze(-1) * lt.float()
        mse = seq_sum(qw * diff * diff)
        better = mse < best
        best = torch.where(better, mse, best)
        iscale = torch.where(better, iscale_is, iscale)
    ls = nearest_int(iscale.unsqueeze(-1) * x).clamp_(max=nmax)
    ls, sumlx, suml2 = _greedy_refine(x, qw, ls, None, nmax, need_sl2=True)
    scale = torch.where(suml2 > 0, sumlx / suml2, torch.zeros_like(sumlx))
    ls = torch.where(zero.unsqueeze(-1), 0, ls)
    return torch.where(zero, 0.0, scale), ls


def make_qkx_quants(
    nmax: int,
    x: torch.Tensor,
    weights: torch.Tensor,
    rmin: float,
    rdelta: float,
    nstep: int,
    use_mad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """make_qkx2_quants / make_qkx3_quants (the same search): codes 0..nmax with a scale and a min.

    Fits (scale, min) by weighted least squares for nstep + 1 code assignments and keeps the one of
    least weighted error (|err| with use_mad, err^2 without). -> (scale (G,), -min (G,), L (G, n))."""
    vmin = x.min(dim=-1).values.clamp(max=0)
    vmax = x.max(dim=-1).values
    flat = vmax == vmin
    span = torch.where(flat, torch.ones_like(vmax), vmax - vmin)
    sums_w = seq_sum(torch.stack((weights, weights * x)))
    sum_w, sum_x = sums_w[0], sums_w[1]

    def error(scale: torch.Tensor, mn: torch.Tensor, lf: torch.Tensor) -> torch.Tensor:
        diff = scale.unsqueeze(-1) * lf + mn.unsqueeze(-1) - x
        diff = diff.abs() if use_mad else diff * diff
        return seq_sum(weights * diff)

    iscale = rdiv(nmax, span)
    scale = rdiv(1.0, iscale)
    ls = nearest_int(iscale.unsqueeze(-1) * (x - vmin.unsqueeze(-1))).clamp_(0, nmax)
    best = error(scale, vmin, ls.float())
    mn = vmin
    for step in range(nstep + 1):
        # the min found so far moves the grid: llama.cpp reads `min` after updating it
        span = torch.where(flat, torch.ones_like(vmax), vmax - mn)
        iscale = rdiv(f32(f32(f32(rmin) + f32(f32(rdelta) * step)) + nmax), span)
        trial = nearest_int(iscale.unsqueeze(-1) * (x - mn.unsqueeze(-1))).clamp_(0, nmax)
        lf = trial.float()
        wl = weights * lf
        s = seq_sum(torch.stack((wl, wl * lf, wl * x)))
        sum_l, sum_l2, sum_xl = s[0], s[1], s[2]
        det = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
        positive = this_min > 0
        this_scale = torch.where(positive, sum_xl / sum_l2, this_scale)
        this_min = torch.where(positive, 0.0, this_min)
        cur = error(this_scale, this_min, lf)
        better = (det > 0) & (cur < best)
        ls = torch.where(better.unsqueeze(-1), trial, ls)
        best = torch.where(better, cur, best)
        scale = torch.where(better, this_scale, scale)
        mn = torch.where(better, this_min, mn)
    ls = torch.where(flat.unsqueeze(-1), 0, ls)
    return torch.where(flat, 0.0, scale), torch.where(flat, -vmin, -mn), ls
