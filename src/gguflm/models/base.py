"""The blocks every family is built from: strict tensor loading, fused linears, rope'd multi-sequence
attention over the KV cache, and the forward loop with named observation points.

A family module (llama.py, gemma3.py, ...) subclasses `Transformer`, declares its layer dataclass,
loads a layer in `load_layer` and writes its block in `block`, like llama.cpp's `src/models/*.cpp`
over `llm_graph_context`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F

from gguflm import kernels
from gguflm.config import ModelArgs
from gguflm.cpu import activation_levels, prefill_dtype, use_native_kernels
from gguflm.gguf_file import GGUFError, GGUFFile, TensorInfo
from gguflm.kv_cache import KVCache
from gguflm.models.rope import Rope, neox_head_order, neox_to_pairs, rope_frequencies
from gguflm.quants import NATIVE_MAX_ROWS, QT, QuantizedLinear, dequantize

PREFILL_ROWS = 64  # micro-batches of at least this many rows count as prefill
# sequence sets of up to this many rows attend through the native kernel (decode), more through torch's
NATIVE_ATTENTION_ROWS = 16
NATIVE_CACHE_DTYPES = (torch.float32, torch.float16)  # KV caches the native attention kernels read

# observer(name, layer, tensor): sees a named intermediate (llama.cpp's cb(cur, "attn_norm", il));
# layer is -1 for tensors outside the layers. Observers must not change the tensor in place.
Observer = Callable[[str, int, torch.Tensor], None]


# ---- loading ------------------------------------------------------------------------------------


class Linear:
    """y = x W^T (+ b) for W stacked from parts along the output dim (fused q/k/v, gate/up).

    Parts stored in one format share one packed matrix and one kernel call; a part in another format
    (K-quant mixes: attn_v Q8_0 beside attn_q Q5_0) gets its own, and the outputs are concatenated.
    """

    def __init__(self, runs: list[QuantizedLinear], names: tuple[str, ...] = ()) -> None:
        self.runs = runs
        self.out_features = sum(r.out_features for r in runs)
        self.in_features = runs[0].in_features
        self.names = names  # the GGUF tensors stacked here: ("blk.0.attn_q.weight", ...)
        # sees (names, x) before each product: llama-imatrix's callback on a matmul (gguflm imatrix)
        self.input_observer: Callable[[tuple[str, ...], torch.Tensor], None] | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(T, in) float -> (T, out): the kernel's dtype for one run, float32 for several."""
        if self.input_observer is not None:
            self.input_observer(self.names, x)
        if len(self.runs) == 1:
            run = self.runs[0]
            return run.mm(x.to(run.input_dtype(x.shape[0])))
        return torch.cat([r.mm(x.to(r.input_dtype(x.shape[0]))).float() for r in self.runs], dim=-1)

    def native_runs(self) -> tuple[list[torch.Tensor], list[int], torch.Tensor | None] | None:
        """The runs as kernels.decode_layer takes a linear: weights, 3 ints per run (QuantizedLinear.native_run)
        and the runs' biases concatenated; None where a run is not on the native kernels."""
        runs = [r.native_run() for r in self.runs]
        if any(run is None for run in runs):
            return None
        biases = [r.bias for r in self.runs if r.bias is not None]
        if biases and len(biases) != len(self.runs):
            return None
        weights = [w for w, _ in runs]  # type: ignore[misc]
        specs = [i for _, spec in runs for i in spec]  # type: ignore[misc]
        return weights, specs, torch.cat(biases) if biases else None

    def __repr__(self) -> str:
        return " + ".join(f"{r.qtype.name}({r.out_features}x{r.in_features})" for r in self.runs)


def linears_of(layer: object) -> list[Linear]:
    """The Linears of one layer: its fields' and those of its parts (the attention's)."""
    found: list[Linear] = []

    def walk(obj: object, depth: int) -> None:
        if isinstance(obj, Linear):
            found.append(obj)
        elif depth < 3 and hasattr(obj, "__dict__"):
            for value in vars(obj).values():
                walk(value, depth + 1)

    walk(layer, 0)
    return found


class Weights:
    """A GGUF file's tensors as a family reads them: shapes checked, every tensor read exactly once.

    `finish()` refuses a file holding tensors the family does not read (llama.cpp: "wrong number of
    tensors"), so a file of another layout is never run half-understood.
    """

    def __init__(self, file: GGUFFile, args: ModelArgs, mode: str, device: torch.device) -> None:
        self.file = file
        self.args = args
        self.mode = mode
        self.device = device
        self.read: set[str] = set()

    def has(self, name: str) -> bool:
        return name in self.file.tensors

    def tensor(self, name: str, shape: tuple[int, ...]) -> TensorInfo:
        info = self.file.tensors.get(name)
        if info is None:
            raise GGUFError(f"{self.file.path}: missing tensor {name!r} ({self.args.arch} needs it)")
        if info.shape != shape:
            raise GGUFError(f"{self.file.path}: tensor {name!r} has shape {info.shape}, expected {shape}")
        self.read.add(name)
        return info

    def vector(self, name: str, n: int) -> torch.Tensor:
        """(n,) float32: norms, biases, rope factors."""
        info = self.tensor(name, (n,))
        return dequantize(info.data, info.qtype, info.shape).to(self.device)

    def linear(
        self,
        parts: Sequence[tuple[str, int]],
        n_in: int,
        *,
        bias: bool | None = False,
        row_order: Sequence[torch.Tensor | None] = (),
    ) -> Linear:
        """W from the parts `(name, n_out)` (names without ".weight"), stacked along the output dim.

        bias: True required, None optional, False none. row_order[i] permutes part i's rows (NEOX rope).
        """
        infos = [self.tensor(f"{name}.weight", (n_out, n_in)) for name, n_out in parts]
        has_bias = bias is True or (bias is None and self.has(f"{parts[0][0]}.bias"))
        runs: list[QuantizedLinear] = []
        run: list[tuple[torch.Tensor, QT, tuple[int, ...]]] = []
        run_bias: list[torch.Tensor] = []

        def close_run() -> None:
            b = torch.cat(run_bias) if has_bias else None
            runs.append(QuantizedLinear.concat(run, mode=self.mode, bias=b, device=self.device))
            run.clear()
            run_bias.clear()

        for j, ((name, n_out), info) in enumerate(zip(parts, infos, strict=True)):
            data = info.data
            b = self.vector(f"{name}.bias", n_out) if has_bias else None
            order = row_order[j] if j < len(row_order) else None
            if order is not None:
                data = data.view(n_out, -1)[order].reshape(-1)
                b = b[order] if b is not None else None
            if run and run[0][1] != info.qtype:
                close_run()
            run.append((data, info.qtype, info.shape))
            if b is not None:
                run_bias.append(b)
        close_run()
        return Linear(runs, tuple(f"{name}.weight" for name, _ in parts))

    def matrix(self, name: str, n_out: int, n_in: int) -> QuantizedLinear:
        """One unfused matrix kept as QuantizedLinear: embeddings (rows()) and the output head."""
        info = self.tensor(f"{name}.weight", (n_out, n_in))
        return QuantizedLinear(
            info.data,
            info.qtype,
            (n_out, n_in),
            mode=self.mode,
            device=self.device,
            release=self.file.release_range,
        )

    def finish(self) -> None:
        unread = sorted(set(self.file.tensors) - self.read)
        if unread:
            shown = ", ".join(unread[:5]) + (" ..." if len(unread) > 5 else "")
            raise GGUFError(
                f"{self.file.path}: {len(unread)} tensor(s) that a {self.args.arch} model does not have: "
                f"{shown} (wrong number of tensors: the file is not the layout its architecture says)"
            )


# ---- one micro-batch ----------------------------------------------------------------------------


class SequenceGroup(NamedTuple):
    """Sequence sets of a micro-batch attended alone (Context._sequence_groups): B sets with R rows and
    C cells each, stacked."""

    rows: torch.Tensor  # (B, R) rows of the micro-batch
    cells: torch.Tensor  # (B, C) KV cells each set's rows may see, in position order
    masks: dict[int, torch.Tensor | None]  # by window: (B, R, C) bool, True = may attend; None: causal


@dataclass
class UBatch:
    """What one forward pass needs besides the input vectors: where the tokens are and what they see."""

    pos: torch.Tensor  # (T,) positions
    cells: torch.Tensor  # (T,) KV cells the tokens are written to
    kv: KVCache
    n_kv: int  # cells [0, n_kv) hold everything attention may read
    masks: dict[int, torch.Tensor | None]  # by window (0: global): (T, n_kv) bool, or None: causal
    out_rows: torch.Tensor  # (n_out,) rows of the micro-batch whose output is wanted
    groups: list[SequenceGroup] | None = None  # several sequence sets, each attended alone
    from_tokens: bool = True  # the input rows are token embeddings (not vectors given by the caller)
    long_context: bool = False  # the context's per-sequence length exceeds the original (LongRoPE)
    n_layer_run: int = 0  # run layers [0, n_layer_run), then the final norm (early exit); 0: all
    _rotations: dict[int, torch.Tensor] = field(default_factory=dict)
    _rotation_pairs: dict[int, torch.Tensor] = field(default_factory=dict)
    _cell_sets: dict[int, list[SequenceGroup]] = field(default_factory=dict)

    def rotation(self, rope: Rope) -> torch.Tensor:
        """(T, 1, rope_dim/2) complex: computed once per rope per micro-batch."""
        r = self._rotations.get(id(rope))
        if r is None:
            r = self._rotations[id(rope)] = rope.rotation(self.pos)
        return r

    def rotation_pairs(self, rope: Rope) -> torch.Tensor:
        """(T, rope_dim/2, 2) float32: rotation() as (cos, sin) pairs, what the native kernel reads."""
        r = self._rotation_pairs.get(id(rope))
        if r is None:
            r = torch.view_as_real(self.rotation(rope)).view(len(self.pos), -1, 2)
            self._rotation_pairs[id(rope)] = r
        return r

    def cell_sets(self, window: int) -> list[SequenceGroup]:
        """`groups` (or the whole micro-batch as one set over cells 0..n_kv-1) with every mask made
        explicit, (B, R, C): what the native attention kernel reads. Once per window per micro-batch."""
        sets = self._cell_sets.get(window)
        if sets is None:
            device = self.cells.device
            if self.groups is None:
                T, mask = len(self.pos), self.masks[window]
                if mask is None:  # causal: row i sees cells 0..i
                    mask = torch.ones(T, self.n_kv, dtype=torch.bool, device=device).tril()
                everything = torch.arange(self.n_kv, device=device)[None]
                sets = [SequenceGroup(torch.arange(T, device=device)[None], everything, {window: mask[None]})]
            else:
                sets = []
                for g in self.groups:
                    mask = g.masks[window]
                    if mask is None:
                        (n_sets, n_rows), n_cells = g.rows.shape, g.cells.shape[1]
                        mask = torch.ones(n_rows, n_cells, dtype=torch.bool, device=device).tril()
                        mask = mask.expand(n_sets, n_rows, n_cells)
                    sets.append(SequenceGroup(g.rows, g.cells, {window: mask}))
            self._cell_sets[window] = sets
        return sets


# ---- attention ----------------------------------------------------------------------------------


@dataclass
class Attention:
    """One layer's attention weights and settings."""

    qkv: Linear  # n_embd -> (n_head + 2 n_head_kv) head_dim, q/k rows in rope pair order
    wo: Linear  # n_head head_dim -> n_embd
    rope: Rope
    window: int = 0  # 0: global; else the layer sees the last `window` positions
    q_norm: torch.Tensor | None = None  # (head_dim,) RMSNorm of each query head (Qwen 3, Gemma 3)
    k_norm: torch.Tensor | None = None  # (head_dim,)


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    softcap: float = 0.0,
) -> torch.Tensor:
    """q (B, n_head, R, hd), k and v (B, n_head_kv, C, hd), mask (B, R, C) or None (causal)
    -> (B, n_head, R, hd). Each of the B problems gets the arithmetic it gets alone (B = 1).
    softcap (Gemma 2): scores -> softcap tanh(scores / softcap) before the mask and softmax."""
    if not softcap:
        return F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=None if mask is None else mask[:, None],
            is_causal=mask is None,
            scale=scale,
            enable_gqa=True,
        )
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # (B, n_head, C, hd)
    scores = (q @ k.transpose(-1, -2)) * scale  # (B, n_head, R, C)
    scores = torch.tanh(scores / softcap) * softcap
    if mask is None:
        mask = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).tril()[None]
    scores = scores.masked_fill(~mask[:, None], float("-inf"))
    return scores.softmax(dim=-1) @ v


# ---- the forward loop ---------------------------------------------------------------------------


class Transformer:
    """Token embeddings -> the family's blocks -> final norm -> output head, over one micro-batch.

    Subclasses set `rope_neox` and implement `load_layer` and `block`; what differs in the input
    (Gemma's embedding scale) or the logits (soft-capping) is a field, not a fork.
    """

    rope_neox: ClassVar[bool] = False  # NEOX rope (halves): q/k rows are permuted into pairs at load
    # the family's block is kernels.decode_layer's: pre-norm attention and gated FFN (each optionally
    # post-normed), layers with attn_norm, attn, ffn_norm, gate_up, down (and attn_post_norm, ffn_post_norm)
    fused_decode: ClassVar[bool] = False
    gelu_ffn: ClassVar[bool] = False  # the gated FFN's activation: GELU (tanh), else SiLU
    embd_scale: ClassVar[bool] = False  # token embeddings times sqrt(n_embd) (Gemma)
    qkv_bias: ClassVar[bool | None] = None  # q/k/v biases: True required, None optional, False none
    qk_norm: ClassVar[bool] = False  # attn_q_norm and attn_k_norm: an RMSNorm per head (Qwen 3, Gemma 3)

    def __init__(self, args: ModelArgs, w: Weights) -> None:
        self.args = args
        self.device = w.device
        # fast mode runs prefill attention in bf16 where the CPU has bf16 arithmetic: 3x faster at 512
        # tokens than fp32 (AMX); 5x slower without it
        self.attn_dtype_prefill = prefill_dtype() if w.mode == "fast" else torch.float32
        self.observers: list[Observer] = []
        # by layer: its weights registered with the kernels (_register_layer), at its first decode step
        self._native_layers: dict[int, kernels.NativeLayer | None] = {}
        # native kernels for the decode attention (and, in QuantizedLinear, the matmuls); None: torch's
        use_native = w.mode == "fast" and use_native_kernels() and w.device.type == "cpu"
        self.kernels = kernels.native() if use_native else None
        # prefill sets attend through kernels.attend_prefill where it has SIMD products (AVX2, AVX512), but
        # soft-capped scores (Gemma 2) through torch's attention
        self.native_prefill = (
            self.kernels is not None
            and self.kernels.attend_prefill_isa() != "generic"
            and not args.attn_softcap
        )
        a = args
        self.tok_embd = w.matrix("token_embd", a.n_vocab, a.n_embd)
        # frequency factors: Llama 3.1's rope_freqs; LongRoPE's (Phi-3) short ones, and long ones for
        # contexts longer than the original (llama.cpp's get_rope_factors: n_ctx / n_seq > n_ctx_orig)
        factors = next((n for n in ("rope_freqs.weight", "rope_factors_short.weight") if w.has(n)), None)
        self.rope_global = self.make_rope(w, a.rope_freq_base, a.rope_freq_scale, factors)
        self.rope_long: Rope | None = None
        if w.has("rope_factors_long.weight"):
            self.rope_long = self.make_rope(
                w, a.rope_freq_base, a.rope_freq_scale, "rope_factors_long.weight"
            )
        self.rope_local = self.rope_global  # sliding-window layers may have their own (Gemma 3)
        if a.n_swa and (a.rope_freq_base_swa, a.rope_freq_scale_swa) != (a.rope_freq_base, a.rope_freq_scale):
            self.rope_local = self.make_rope(w, a.rope_freq_base_swa, a.rope_freq_scale_swa)
        self.layers: list[Any] = []
        for i in range(a.n_layer):
            w.file.release_pages()  # packing reads every page; keep the peak resident memory down
            self.layers.append(self.load_layer(w, i))
        self.output_norm = w.vector("output_norm.weight", a.n_embd)
        self.output = self.tok_embd if a.tied_output else w.matrix("output", a.n_vocab, a.n_embd)
        w.finish()
        self.refine_near_logits()

    def refine_near_logits(self) -> None:
        """Give the products nearest the logits their activation levels (cpu.activation_levels): the
        last layer's, and the head's unless it outweighs all the layers' products together. A second
        level doubles a product's integer work, which only shows with many rows: Gemma 3 270M's
        262144-row head is 1.7x its 18 layers, and refining it made a 16-sequence step 27% longer (AMD
        EPYC Zen 4), for KL 0.00207 -> 0.00164 on GPL-3; SmolLM2's head is a quarter of its layers, and
        without it the same top token stays under 97% (96.7%)."""
        runs = [run for layer in self.layers for lin in linears_of(layer) for run in lin.runs]
        last = [run for lin in linears_of(self.layers[-1]) for run in lin.runs]
        head = self.output
        layer_weights = sum(run.out_features * run.in_features for run in runs)
        if head.out_features * head.in_features <= layer_weights:
            last.append(head)
        for run in last:
            if isinstance(run, QuantizedLinear) and run.kernel == "native":  # not training's dense layers
                run.levels = activation_levels(near_logits=True)

    # -- what a family provides --

    @classmethod
    def configure(cls, args: ModelArgs, file: GGUFFile) -> ModelArgs:
        """Hyper-parameters llama.cpp sets per architecture rather than reading them from the file."""
        return args

    def load_layer(self, w: Weights, i: int) -> Any:
        raise NotImplementedError

    def block(self, layer: Any, il: int, x: torch.Tensor, ub: UBatch) -> torch.Tensor:
        """(T, n_embd) -> (T', n_embd); T' = len(ub.out_rows) after the last layer (keep_outputs)."""
        raise NotImplementedError

    # -- shared pieces a family's load_layer and block use --

    def make_rope(self, w: Weights, base: float, freq_scale: float, factors: str | None = None) -> Rope:
        """A rope of this model; `factors` names a tensor of per-pair frequency divisors."""
        a = self.args
        divisors = w.vector(factors, a.rope_dim // 2) if factors else None
        theta, mscale = rope_frequencies(a, base, freq_scale, divisors)
        return Rope(theta, mscale, a.rope_dim, self.device)

    def attention_weights(self, w: Weights, i: int, *, fused: bool = False) -> Attention:
        """blk.i's attention: attn_q/k/v (or fused attn_qkv), attn_output, optional q/k norms and biases."""
        a = self.args
        p, hd = f"blk.{i}", a.head_dim
        n_q, n_kv = a.n_embd_head_q, a.n_embd_kv
        q_order = k_order = None
        if self.rope_neox:
            q_order = neox_to_pairs(a.n_head, hd, a.rope_dim)
            k_order = neox_to_pairs(a.n_head_kv, hd, a.rope_dim)
        if fused:
            order = None
            if q_order is not None and k_order is not None:
                order = torch.cat((q_order, k_order + n_q, torch.arange(n_q + n_kv, n_q + 2 * n_kv)))
            qkv = w.linear(
                [(f"{p}.attn_qkv", n_q + 2 * n_kv)], a.n_embd, bias=self.qkv_bias, row_order=[order]
            )
        else:
            qkv = w.linear(
                [(f"{p}.attn_q", n_q), (f"{p}.attn_k", n_kv), (f"{p}.attn_v", n_kv)],
                a.n_embd,
                bias=self.qkv_bias,
                row_order=[q_order, k_order],
            )
        q_norm = k_norm = None
        if self.qk_norm:
            q_norm = w.vector(f"{p}.attn_q_norm.weight", hd)
            k_norm = w.vector(f"{p}.attn_k_norm.weight", hd)
        if self.rope_neox and q_norm is not None and k_norm is not None:
            within = neox_head_order(hd, a.rope_dim)
            q_norm, k_norm = q_norm[within], k_norm[within]
        return Attention(
            qkv=qkv,
            wo=w.linear([(f"{p}.attn_output", a.n_embd)], n_q),
            rope=self.rope_local if a.window(i) else self.rope_global,
            window=a.window(i),
            q_norm=q_norm,
            k_norm=k_norm,
        )

    def norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """RMSNorm over the last dim."""
        if self.kernels is not None and x.dim() == 2 and x.dtype == torch.float32:
            return self.kernels.rms_norm(x, weight, self.args.norm_eps)
        return F.rms_norm(x, (x.shape[-1],), weight, self.args.norm_eps)

    def gated_ffn(
        self, gate_up: Linear, down: Linear, h: torch.Tensor, *, gelu: bool = False
    ) -> torch.Tensor:
        """(T, n_embd) -> (T, n_embd) float32: down(act(gate h) * up h), gate being gate_up's first half;
        act SiLU (SwiGLU) or tanh-approximated GELU (GeGLU, Gemma)."""
        both = gate_up(h).float()  # (T, 2 n_ff)
        # one native call for chunk, act and mul, each row alone (a decode row's result does not depend on
        # what shares its step); also 2-4x faster than torch's three ops over a 512-row prefill
        if self.kernels is not None:
            return down(self.kernels.gated(both, gelu)).float()
        gate, up = both.chunk(2, dim=-1)  # (T, n_ff) each
        act = F.gelu(gate, approximate="tanh") if gelu else F.silu(gate)
        return down(act * up).float()

    def observe(self, name: str, il: int, x: torch.Tensor) -> torch.Tensor:
        """A named point in the forward: observers see x; returns x unchanged."""
        for observer in self.observers:
            observer(name, il, x)
        return x

    def keep_outputs(self, il: int, ub: UBatch, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """After the last layer's attention only the requested rows go on (llama.cpp's inp_out_ids);
        the last layer run is the exit layer when the micro-batch exits early."""
        if il != (ub.n_layer_run or self.args.n_layer) - 1:
            return tensors
        return tuple(t[ub.out_rows] for t in tensors)

    def attention(self, at: Attention, h: torch.Tensor, il: int, ub: UBatch) -> torch.Tensor:
        """h (T, n_embd) normed -> (T, n_head head_dim): q/k/v, q/k norms, rope, KV cache write, attention
        over the cells each row may see (before the output projection).

        With native kernels (fast mode), q/k norms, rope and the cache write are one call, and sequence
        sets of at most NATIVE_ATTENTION_ROWS rows (decode) attend in another, each row computed alone;
        larger sets (prefill) in one call each (attend_prefill), or torch's attention where
        `native_prefill` is off."""
        a = self.args
        T, hd = h.shape[0], a.head_dim
        n_head, n_head_kv = a.n_head, a.n_head_kv
        qkv = at.qkv(h).float()  # (T, (n_head + 2 n_head_kv) hd)
        rope = self.rope_of(at, ub.long_context)
        kv = ub.kv
        native = self.kernels if kv.k.dtype in NATIVE_CACHE_DTYPES else None
        if native is not None:
            keys, values = kv.layers[il]  # (n_ctx, n_head_kv, hd)
            rotation = ub.rotation_pairs(rope)
            q = native.rope_store(
                qkv, rotation, at.q_norm, at.k_norm, a.norm_eps, keys, values, ub.cells, n_head
            )  # (T, n_head, hd)
            if not self.native_prefill and ub.groups is None and T > NATIVE_ATTENTION_ROWS:
                return self.attend_torch(q.transpose(0, 1), at, il, ub)
            out = torch.empty_like(q)
            if ub.groups is None and T > NATIVE_ATTENTION_ROWS:  # one set, a prefill: over cells 0..n_kv-1
                all_cells = torch.arange(ub.n_kv)
                self.attend_prefill(q, keys, values, all_cells[:T], all_cells, ub.masks[at.window], out)
                return out.view(T, n_head * hd)
            sets = ub.cell_sets(at.window)  # ub.groups (same order), or the whole micro-batch
            small = [s.rows.shape[1] <= NATIVE_ATTENTION_ROWS for s in sets]
            few = [s for s, is_small in zip(sets, small, strict=True) if is_small]
            if few:  # every small set in one call
                native.attend_cells(
                    q,
                    keys,
                    values,
                    [s.rows for s in few],
                    [s.cells for s in few],
                    [s.masks[at.window] for s in few],
                    a.attn_scale,
                    a.attn_softcap,
                    out,
                )
            # a prompt chunk beside decoding sequences (the server): each such set alone, as when prefilled alone
            for g in [g for is_small, g in zip(small, ub.groups or sets, strict=True) if not is_small]:
                if not self.native_prefill:
                    by_head = self.attend_group(q.transpose(0, 1), g, at, il, ub)  # (n_head, B R, hd)
                    out[g.rows.flatten()] = by_head.transpose(0, 1)
                    continue
                mask = g.masks[at.window]  # (B, R, C) or None: causal
                for b in range(g.rows.shape[0]):
                    rows, cells = g.rows[b], g.cells[b]
                    self.attend_prefill(q, keys, values, rows, cells, None if mask is None else mask[b], out)
            return out.view(T, n_head * hd)
        else:
            qk = qkv[:, : (n_head + n_head_kv) * hd].view(T, n_head + n_head_kv, hd)
            v = qkv[:, (n_head + n_head_kv) * hd :].view(T, n_head_kv, hd)  # (T, n_head_kv, hd)
            if at.q_norm is not None and at.k_norm is not None:
                qk = torch.cat(
                    (self.norm(qk[:, :n_head], at.q_norm), self.norm(qk[:, n_head:], at.k_norm)), dim=1
                )
            qk = rope(qk, ub.rotation(rope))  # (T, n_head + n_head_kv, hd)
            k_new = qk[:, n_head:]  # (T, n_head_kv, hd)
            if kv.k.dtype != torch.float32:
                k_new, v = k_new.to(kv.k.dtype), v.to(kv.k.dtype)
            kv.k[il].index_copy_(0, ub.cells, k_new)
            kv.v[il].index_copy_(0, ub.cells, v)
            q = qk[:, :n_head].transpose(0, 1)  # (n_head, T, hd)
        return self.attend_torch(q, at, il, ub)

    def attend_prefill(
        self,
        q: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        rows: torch.Tensor,
        cells: torch.Tensor,
        mask: torch.Tensor | None,
        out: torch.Tensor,
    ) -> None:
        """The native prefill attention (kernels/prefill_attention.cpp) of one sequence set: q (T, n_head, hd),
        the layer's cache (n_ctx, n_head_kv, hd), the set's rows (R,) and cells (C,) in position order, mask
        (R, C) or None (causal) -> out[rows]. Its products in bf16 where torch's attention would run in bf16
        (attn_input). 512 causal rows of SmolLM2 on AMD EPYC Zen 4: 3.3x faster than torch's bf16 attention
        (AVX512-BF16), 2x its fp32 attention with fp32 products (AVX512)."""
        assert self.kernels is not None
        bf16 = self.attn_dtype_prefill == torch.bfloat16 and len(rows) >= PREFILL_ROWS
        self.kernels.attend_prefill(q, keys, values, rows, cells, mask, self.args.attn_scale, bf16, out)

    def attend_torch(self, q: torch.Tensor, at: Attention, il: int, ub: UBatch) -> torch.Tensor:
        """q (n_head, T, hd) rope'd, the micro-batch's keys and values in the cache -> (T, n_head hd)
        through torch's fused attention, each sequence set alone (ub.groups) or all rows at once."""
        n_head, T, hd = q.shape
        if ub.groups is None:
            cached_k, cached_v = self.cached_kv(q, il, ub)
            keys, values = cached_k.transpose(0, 1), cached_v.transpose(0, 1)  # (n_head_kv, n_kv, hd)
            mask = ub.masks[at.window]
            out = attend(
                self.attn_input(q)[None],
                keys[None],
                values[None],
                None if mask is None else mask[None],
                self.args.attn_scale,
                self.args.attn_softcap,
            )
            return out[0].transpose(0, 1).reshape(T, n_head * hd)
        out = torch.empty_like(q)  # (n_head, T, hd)
        for g in ub.groups:
            out[:, g.rows.flatten()] = self.attend_group(q, g, at, il, ub)
        return out.transpose(0, 1).reshape(T, n_head * hd)

    def attn_input(self, q: torch.Tensor, rows: int | None = None) -> torch.Tensor:
        """q (n_head, T, hd) in the dtype torch's attention runs in for a set of `rows` query rows (T by
        default): bf16 for a prefill where the CPU has bf16 arithmetic (fast mode), else as it is. Decided
        by the set's own rows, not by what shares its micro-batch."""
        return q.to(self.attn_dtype_prefill) if (rows or q.shape[1]) >= PREFILL_ROWS else q

    def cached_kv(self, q: torch.Tensor, il: int, ub: UBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer il's cached keys and values of cells [0, n_kv), (n_kv, n_head_kv, hd), in q's dtype
        for torch's attention (attn_input)."""
        kv, dtype = ub.kv, self.attn_input(q).dtype
        cached_k, cached_v = kv.k[il, : ub.n_kv], kv.v[il, : ub.n_kv]
        if cached_k.dtype != dtype:
            cached_k, cached_v = cached_k.to(dtype), cached_v.to(dtype)
        return cached_k, cached_v

    def attend_group(
        self, q: torch.Tensor, g: SequenceGroup, at: Attention, il: int, ub: UBatch
    ) -> torch.Tensor:
        """q (n_head, T, hd) -> (n_head, B R, hd): the B sets of group g, each alone over its own cells
        (the same strides as the cache's own keys: the same arithmetic as when decoded alone)."""
        n_head, _, hd = q.shape
        n_head_kv = self.args.n_head_kv
        (n_sets, n_rows), n_cells = g.rows.shape, g.cells.shape[1]
        g_rows, g_cells = g.rows.flatten(), g.cells.flatten()
        # the group's rows and cells first, then the dtype: only they are converted, never the cache
        q_g = self.attn_input(q[:, g_rows], n_rows)
        dtype = q_g.dtype
        # (B, n_head, R, hd) queries, (B, n_head_kv, C, hd) keys and values
        q_g = q_g.view(n_head, n_sets, n_rows, hd).transpose(0, 1)
        k_g, v_g = (
            cache[il].index_select(0, g_cells).to(dtype).view(n_sets, n_cells, n_head_kv, hd).transpose(1, 2)
            for cache in (ub.kv.k, ub.kv.v)
        )
        o = attend(q_g, k_g, v_g, g.masks[at.window], self.args.attn_scale, self.args.attn_softcap)
        return o.transpose(0, 1).reshape(n_head, n_sets * n_rows, hd).to(q.dtype)

    # -- the engine's entry points --

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """(n,) token ids -> (n, n_embd) float32 rows of the embedding matrix (llama.cpp's get_rows)."""
        return self.tok_embd.rows(tokens.to(self.device))

    def rope_of(self, at: Attention, long_context: bool) -> Rope:
        """The layer's rope; LongRoPE's long factors replace the short ones in a long context."""
        if long_context and self.rope_long is not None and at.rope is self.rope_global:
            return self.rope_long
        return at.rope

    def shift_keys(
        self, layer: int, k: torch.Tensor, delta: torch.Tensor, long_context: bool = False
    ) -> torch.Tensor:
        """Cached keys k (n, n_head_kv, head_dim) of a layer re-rotated by a position change delta (n,)."""
        rope = self.rope_of(self.layers[layer].attn, long_context)
        return rope(k.float(), rope.rotation(delta, shift=True))

    def forward(self, x: torch.Tensor, ub: UBatch) -> torch.Tensor:
        """x (T, n_embd) input vectors -> (n_out, n_embd): final-normed hidden states of ub.out_rows,
        after every layer or, with ub.n_layer_run, after the first n_layer_run (early exit).

        With `ub.groups` (several sequence sets), attention runs for each set alone over its own cells
        in position order, the very call it gets when decoded alone (the kernel's sums depend on where
        keys sit and on how many there are, masked or not), so a sequence samples the same tokens
        whatever shares its batch.
        """
        if self.embd_scale and ub.from_tokens:  # llama.cpp scales token rows only, not given vectors
            x = x * self.args.n_embd**0.5
        self.observe("inp_out_ids", -1, ub.out_rows)  # (n_out,) the rows the last layer keeps (a lens)
        x = self.observe("inp_embd", -1, x)
        layers = self.layers[: ub.n_layer_run] if ub.n_layer_run else self.layers
        fused = self.fused_decode and self.kernels is not None and not self.observers and self.decode_step(ub)
        for il, layer in enumerate(layers):
            y = self.fused_block(layer, il, x, ub) if fused else None
            x = self.observe("l_out", il, self.block(layer, il, x, ub) if y is None else y)
        return self.observe("result_norm", -1, self.norm(x, self.output_norm))

    def decode_step(self, ub: UBatch) -> bool:
        """Whether every sequence set of the micro-batch is small enough for the native attention (decode)
        and the cache is one the kernels read (fp32, fp16): what kernels.decode_layer takes."""
        if ub.kv.k.dtype not in NATIVE_CACHE_DTYPES or len(ub.pos) > NATIVE_MAX_ROWS:
            return False
        return all(
            s.rows.shape[1] <= NATIVE_ATTENTION_ROWS for w in self.args.windows for s in ub.cell_sets(w)
        )

    def fused_block(self, layer: Any, il: int, x: torch.Tensor, ub: UBatch) -> torch.Tensor | None:
        """`block` as one native call (kernels.decode_layer): the same kernels in the same order, so the
        same bits, for a fraction of the Python (decode). None where a linear is not on the native
        kernels or is observed (gguflm imatrix): then `block` runs."""
        at: Attention = layer.attn
        if any(lin.input_observer is not None for lin in (at.qkv, at.wo, layer.gate_up, layer.down)):
            return None
        if il not in self._native_layers:
            self._native_layers[il] = self._register_layer(layer)
        native = self._native_layers[il]
        if native is None:
            return None
        assert self.kernels is not None
        keys, values = ub.kv.layers[il]  # (n_ctx, n_head_kv, hd)
        sets = ub.cell_sets(at.window)
        rotation = ub.rotation_pairs(self.rope_of(at, ub.long_context))
        x = self.kernels.decode_layer(
            x,
            native.id,
            rotation,
            keys,
            values,
            ub.cells,
            [s.rows for s in sets],
            [s.cells for s in sets],
            [s.masks[at.window] for s in sets],
        )
        return self.keep_outputs(il, ub, x)[0]

    def _register_layer(self, layer: Any) -> kernels.NativeLayer | None:
        """A layer's weights and settings registered once with the kernels, what decode_layer takes besides
        the step's own arguments (rotation, cache, cells, sequence sets). None where a linear is not on the
        native kernels or a bias is elsewhere than on q/k/v."""
        at: Attention = layer.attn
        runs = [lin.native_runs() for lin in (at.qkv, at.wo, layer.gate_up, layer.down)]
        if any(r is None for r in runs) or any(r[2] is not None for r in runs[1:]):  # type: ignore[index]
            return None
        (qkv_w, qkv_spec, qkv_bias), (wo_w, wo_spec, _), (gu_w, gu_spec, _), (down_w, down_spec, _) = runs  # type: ignore[misc]
        a = self.args
        assert self.kernels is not None
        return self.kernels.layer(
            layer.attn_norm,
            qkv_w,
            qkv_spec,
            qkv_bias,
            at.q_norm,
            at.k_norm,
            wo_w,
            wo_spec,
            getattr(layer, "attn_post_norm", None),
            layer.ffn_norm,
            gu_w,
            gu_spec,
            down_w,
            down_spec,
            getattr(layer, "ffn_post_norm", None),
            a.norm_eps,
            a.attn_scale,
            a.attn_softcap,
            a.n_head,
            self.gelu_ffn,
        )

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """(n, n_embd) normed hidden states -> (n, n_vocab) float32 logits."""
        logits = self.output(h)
        cap = self.args.final_softcap
        return torch.tanh(logits / cap) * cap if cap else logits
