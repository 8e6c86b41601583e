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


def _cols(t: torch.Tensor) -> torch.Tensor:
    """(G, n) -> (n, G) contiguous: the searches work column by column, so that a sum in index order
    is n - 1 adds of contiguous (G,) rows and per-group values broadcast as (1, G)."""
    return t.t().contiguous()


def _sum_rows(t: torch.Tensor) -> torch.Tensor:
    """(n, G) -> (G,): t[0] + t[1] + ... in index order."""
    acc = t[0].clone()
    for i in range(1, t.shape[0]):
        acc += t[i]
    return acc


def _round(v: torch.Tensor) -> torch.Tensor:
    """nearest_int, kept in float32 (the codes are small integers, exact in float)."""
    return torch.round(v)


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
    xc = _cols(x)  # (n, G)
    w = _cols(qw) if qw is not None else xc * xc
    wx = w * xc

    def codes(iscale: torch.Tensor) -> torch.Tensor:
        return _round(iscale * xc).clamp_(-nmax, nmax - 1)  # (n, G)

    def sums(lf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _sum_rows(wx * lf), _sum_rows(w * lf * lf)

    ls = codes(rdiv(-nmax, vmax))
    sumlx, suml2 = sums(ls)
    scale = torch.where(suml2 != 0, sumlx / suml2, torch.zeros_like(sumlx))
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        trial = codes(rdiv(-f32(nmax + f32(f32(0.1) * step)), vmax))
        sumlx, suml2 = sums(trial)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        ls = torch.where(better, trial, ls)
        scale = torch.where(better, sumlx / suml2, scale)
        best = torch.where(better, scale * sumlx, best)
    ls = torch.where(zero, -nmax, ls)
    return torch.where(zero, 0.0, scale), (ls + nmax).t().to(torch.int32).contiguous()


def _greedy_refine(
    xc: torch.Tensor,
    w: torch.Tensor,
    ls: torch.Tensor,
    lo: int | None,
    hi: int,
    need_sl2: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Up to 5 passes of one-code-at-a-time changes that raise (sum w x l)^2 / sum w l^2, on (n, G)
    columns. make_q3_quants (need_sl2=False: the step is tried whenever slx > 0) and make_qp_quants
    (need_sl2=True, no lower clamp). A pass that changes nothing leaves the state as it was, so
    running all 5 passes for every group equals llama.cpp's early stop. -> (ls, sumlx, suml2)."""
    wx = w * xc
    sumlx, suml2 = _sum_rows(wx * ls), _sum_rows(w * ls * ls)
    ls = ls.clone()
    for _ in range(5):
        for i in range(xc.shape[0]):
            xi, wi, wxi, li = xc[i], w[i], wx[i], ls[i]
            slx = sumlx - wxi * li
            sl2 = suml2 - wi * li * li
            ok = (slx > 0) & (sl2 > 0) if need_sl2 else slx > 0
            new_l = _round(xi * sl2 / slx)
            new_l = new_l.clamp_(min=lo, max=hi) if lo is not None else new_l.clamp_(max=hi)
            slx2 = slx + wxi * new_l
            sl22 = sl2 + wi * new_l * new_l
            take = ok & (new_l != li) & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22)
            if not need_sl2:
                take &= sl22 > 0
            ls[i] = torch.where(take, new_l, li)
            sumlx = torch.where(take, slx2, sumlx)
            suml2 = torch.where(take, sl22, suml2)
    return ls, sumlx, suml2


def make_q3_quants(nmax: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """make_q3_quants(do_rmse=true): x^2-weighted codes, refined greedily -> (scale (G,), L 0..2nmax-1)."""
    amax, vmax = first_absmax(x)
    zero = amax < GROUP_MAX_EPS
    vmax = torch.where(zero, torch.ones_like(vmax), vmax)
    xc = _cols(x)
    ls = _round(rdiv(-nmax, vmax) * xc).clamp_(-nmax, nmax - 1)
    ls, sumlx, suml2 = _greedy_refine(xc, xc * xc, ls, -nmax, nmax - 1, need_sl2=False)
    scale = torch.where(suml2 > 0, sumlx / suml2, torch.zeros_like(sumlx))
    ls = torch.where(zero, -nmax, ls)
    return torch.where(zero, 0.0, scale), (ls + nmax).t().to(torch.int32).contiguous()


def make_qp_quants(nmax: int, x: torch.Tensor, qw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes 0..nmax for non-negative x (the sub-block scales of a K-quant with an imatrix)."""
    vmax = x.clamp(min=0).max(dim=-1).values
    zero = vmax < GROUP_MAX_EPS
    vmax = torch.where(zero, torch.ones_like(vmax), vmax)
    xc, w = _cols(x), _cols(qw)
    iscale = rdiv(nmax, vmax)
    diff = xc - rdiv(1.0, iscale) * _round(iscale * xc)
    best = _sum_rows(w * diff * diff)
    for step in range(-4, 5):
        if step == 0:
            continue
        iscale_is = rdiv(f32(f32(f32(0.1) * step) + nmax), vmax)
        diff = xc - rdiv(1.0, iscale_is) * _round(iscale_is * xc).clamp_(max=nmax)
        mse = _sum_rows(w * diff * diff)
        better = mse < best
        best = torch.where(better, mse, best)
        iscale = torch.where(better, iscale_is, iscale)
    ls = _round(iscale * xc).clamp_(max=nmax)
    ls, sumlx, suml2 = _greedy_refine(xc, w, ls, None, nmax, need_sl2=True)
    scale = torch.where(suml2 > 0, sumlx / suml2, torch.zeros_like(sumlx))
    ls = torch.where(zero, 0, ls)
    return torch.where(zero, 0.0, scale), ls.t().to(torch.int32).contiguous()


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
    xc, w = _cols(x), _cols(weights)  # (n, G)
    sum_w, sum_x = _sum_rows(w), _sum_rows(w * xc)

    def span(mn: torch.Tensor) -> torch.Tensor:
        return torch.where(flat, torch.ones_like(vmax), vmax - mn)

    def error(scale: torch.Tensor, mn: torch.Tensor, lf: torch.Tensor) -> torch.Tensor:
        diff = (lf * scale).add_(mn).sub_(xc)  # in place: the same roundings, fewer 4 MB temporaries
        diff = diff.abs_() if use_mad else diff.mul_(diff)
        return _sum_rows(diff.mul_(w))

    iscale = rdiv(nmax, span(vmin))
    scale = rdiv(1.0, iscale)
    ls = _round(iscale * (xc - vmin)).clamp_(0, nmax)
    best = error(scale, vmin, ls)
    mn = vmin
    for step in range(nstep + 1):
        # the min found so far moves the grid: llama.cpp reads `min` after updating it
        iscale = rdiv(f32(f32(f32(rmin) + f32(f32(rdelta) * step)) + nmax), span(mn))
        trial = (xc - mn).mul_(iscale).round_().clamp_(0, nmax)
        wl = w * trial
        sum_l = _sum_rows(wl)
        scratch = torch.mul(wl, trial)
        sum_l2 = _sum_rows(scratch)
        sum_xl = _sum_rows(torch.mul(wl, xc, out=scratch))
        det = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
        positive = this_min > 0
        this_scale = torch.where(positive, sum_xl / sum_l2, this_scale)
        this_min = torch.where(positive, 0.0, this_min)
        cur = error(this_scale, this_min, trial)
        better = (det > 0) & (cur < best)
        ls = torch.where(better, trial, ls)
        best = torch.where(better, cur, best)
        scale = torch.where(better, this_scale, scale)
        mn = torch.where(better, this_min, mn)
    ls = torch.where(flat, 0, ls)
    return torch.where(flat, 0.0, scale), torch.where(flat, -vmin, -mn), ls.t().to(torch.int32).contiguous()
