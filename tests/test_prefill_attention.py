"""The prefill attention kernel (kernels/prefill_attention.cpp) against a float64 softmax(q k^T) v and
torch's fused attention, on every kernel path this CPU runs (auto = -march=native, avx2, generic).

fp32 products: the kernel only reorders fp32 sums and rounds exp differently (~2 ulp), so it matches
float64 to ~1e-5. bf16 products (the auto build on a CPU with AVX512_BF16, when asked): q, k, v and the
softmax weights are rounded to bf16 (8 significant bits) before the products, as torch's bf16 attention
rounds them; against float64 of the bf16-rounded q, k, v the error is then that of rounding the weights,
at most 2^-8 of max |v| per output, and the kernel must be as close to float64 as torch's bf16 attention is.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gguflm import Batch, Context, Model, kernels
from gguflm.models.base import Transformer, attend
from gguflm.writer import make_tiny_model


def _paths() -> list[str]:
    flags = kernels.cpu_flags()
    if flags[0] not in ("x86_64", "AMD64"):
        return ["auto"]
    return ["auto", "generic"] + (["avx2"] if "avx2" in flags else [])


_BUILT: dict[str, kernels.NativeKernels] = {}


def _module(path: str) -> kernels.NativeKernels:
    """The build for `path`; a failed build raises here and fails the test with its error."""
    if path not in _BUILT:
        _BUILT[path] = kernels.build(path)
    return _BUILT[path]


def _reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rows: torch.Tensor,
    cells: torch.Tensor,
    mask: torch.Tensor,
) -> torch.Tensor:
    """(R, n_head, hd) float64: each row's softmax over the cells it sees, zeros where it sees none."""
    n_head, n_kv, hd = q.shape[1], k.shape[1], q.shape[2]
    group = n_head // n_kv
    qr = q[rows].double()  # (R, n_head, hd)
    kc = k[cells].double().repeat_interleave(group, dim=1)  # (C, n_head, hd)
    vc = v[cells].double().repeat_interleave(group, dim=1)
    scores = torch.einsum("rhd,chd->hrc", qr, kc) / hd**0.5
    scores = scores.masked_fill(~mask[None], float("-inf"))
    weights = scores.softmax(dim=-1).nan_to_num(0.0)  # a row that sees nothing: all -inf -> nan -> 0
    return torch.einsum("hrc,chd->rhd", weights, vc)


def _call(
    mod: kernels.NativeKernels,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rows: torch.Tensor,
    cells: torch.Tensor,
    mask: torch.Tensor | None,
    bf16: bool = False,
) -> torch.Tensor:
    out = torch.full_like(q, 7.0)
    mod.attend_prefill(q, k, v, rows, cells, mask, q.shape[2] ** -0.5, bf16, out)
    return out


def _causal(n: int) -> torch.Tensor:
    return torch.ones(n, n, dtype=torch.bool).tril()


SHAPES = [  # (T, n_head, n_head_kv, head_dim): GQA 1, 3, 4; SmolLM2, Llama/Qwen, Gemma 3 head dims
    (1, 3, 3, 64),
    (7, 9, 3, 64),
    (65, 4, 1, 256),
    (130, 8, 2, 128),
    (300, 9, 3, 64),
    (97, 6, 2, 48),  # a head dim the kernel pads
]


@pytest.mark.parametrize("path", _paths())
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_causal_matches_float64_and_torch(path: str, shape: tuple[int, int, int, int]) -> None:
    mod = _module(path)
    T, n_head, n_kv, hd = shape
    g = torch.Generator().manual_seed(T + hd)
    q, k, v = (torch.randn(T, n, hd, generator=g) for n in (n_head, n_kv, n_kv))
    rows = cells = torch.arange(T)
    out = _call(mod, q, k, v, rows, cells, None)
    torch.testing.assert_close(
        out.double(), _reference(q, k, v, rows, cells, _causal(T)), rtol=1e-5, atol=2e-6
    )
    sdpa = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True, enable_gqa=True
    ).transpose(0, 1)
    torch.testing.assert_close(out, sdpa, rtol=1e-5, atol=2e-6)
    # the causal call and the same mask given explicitly: the same bits
    assert torch.equal(_call(mod, q, k, v, rows, cells, _causal(T)), out)


@pytest.mark.parametrize("path", _paths())
@pytest.mark.parametrize("bf16", [False, True])
def test_an_fp16_cache_gives_the_bits_of_its_fp32_copy(path: str, bf16: bool) -> None:
    """The engine's default cache is fp16: its rows convert to fp32 exactly, so the kernel must give the
    same bits as on the same values in an fp32 cache (causal and masked, GQA 3, a padded head dim)."""
    mod = _module(path)
    g = torch.Generator().manual_seed(11)
    for T, n_head, n_kv, hd in ((130, 9, 3, 64), (37, 6, 2, 48)):
        q = torch.randn(T, n_head, hd, generator=g)
        k16, v16 = (torch.randn(T + 10, n_kv, hd, generator=g).half() for _ in range(2))
        rows, cells = torch.arange(T), torch.randperm(T + 10, generator=g)[:T]
        for mask in (None, torch.rand(T, T, generator=g) < 0.5):
            out = _call(mod, q, k16, v16, rows, cells, mask, bf16)
            assert torch.equal(out, _call(mod, q, k16.float(), v16.float(), rows, cells, mask, bf16))
    with pytest.raises(RuntimeError, match="one dtype"):
        _call(mod, q, k16, v16.float(), rows, cells, None)


def _masks(T: int, g: torch.Generator) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(cells, mask (T, C)) for the micro-batches a prefill meets besides a fresh causal one."""
    seq = torch.arange(T) % 2  # two sequences' tokens interleaved, each causal over its own cells
    pos = torch.arange(T) // 2
    interleaved = (seq[:, None] == seq[None]) & (pos[None] <= pos[:, None])
    window = _causal(T) & (torch.arange(T)[None] > torch.arange(T)[:, None] - 40)  # sliding window 40
    prefix = 150  # a prompt continuing a cached prefix: every row sees the prefix, then causally
    continued = torch.cat((torch.ones(T, prefix, dtype=torch.bool), _causal(T)), dim=1)
    holes = torch.rand(T, T + 20, generator=g) < 0.3  # scattered cells, a row seeing nothing
    holes[T // 2] = False
    return {
        "interleaved": (torch.arange(T), interleaved),
        "window": (torch.arange(T), window),
        "continued": (torch.arange(T + prefix), continued),
        "holes": (torch.randperm(T + 40, generator=g)[: T + 20], holes),
    }


@pytest.mark.parametrize("path", _paths())
@pytest.mark.parametrize("kind", ["interleaved", "window", "continued", "holes"])
@pytest.mark.parametrize("shape", [(300, 9, 3, 64), (77, 4, 1, 256), (130, 8, 2, 128)], ids=str)
def test_masks_match_float64(path: str, kind: str, shape: tuple[int, int, int, int]) -> None:
    """Masked rows and cells, cells scattered in a larger cache, the set's rows a shuffled part of q: the
    rows named are written, the others left as they were."""
    mod = _module(path)
    T, n_head, n_kv, hd = shape
    g = torch.Generator().manual_seed(11)
    cells, mask = _masks(T, g)[kind]
    n_ctx = int(cells.max()) + 5
    q = torch.randn(T + 3, n_head, hd, generator=g)
    k, v = torch.randn(n_ctx, n_kv, hd, generator=g), torch.randn(n_ctx, n_kv, hd, generator=g)
    rows = torch.randperm(T + 3, generator=g)[:T]
    out = _call(mod, q, k, v, rows, cells, mask)
    torch.testing.assert_close(
        out[rows].double(), _reference(q, k, v, rows, cells, mask), rtol=1e-5, atol=2e-6
    )
    others = torch.tensor(sorted(set(range(T + 3)) - set(rows.tolist())))
    assert (out[others] == 7.0).all()


@pytest.mark.parametrize("shape", [(512, 9, 3, 64), (130, 4, 1, 256), (67, 8, 2, 128)], ids=str)
@pytest.mark.parametrize("masked", [False, True])
def test_bf16_products_as_close_as_torchs_bf16_attention(
    shape: tuple[int, int, int, int], masked: bool
) -> None:
    """The auto build on a CPU with AVX512_BF16; elsewhere bf16=True must give the fp32 path's result."""
    mod = _module("auto")
    T, n_head, n_kv, hd = shape
    g = torch.Generator().manual_seed(12)
    q, k, v = (torch.randn(T, n, hd, generator=g) * 2 for n in (n_head, n_kv, n_kv))
    rows = cells = torch.arange(T)
    mask = _masks(T, g)["window"][1] if masked else None
    out = _call(mod, q, k, v, rows, cells, mask, bf16=True)
    if mod.attend_prefill_isa() != "avx512_bf16":
        assert "avx512_bf16" not in kernels.cpu_flags()
        assert torch.equal(_call(mod, q, k, v, rows, cells, mask), out)
        return
    rounded = [x.bfloat16().float() for x in (q, k, v)]
    want = _reference(*rounded, rows, cells, _causal(T) if mask is None else mask)
    err = (out.double() - want).abs()
    assert err.max() <= 2**-8 * v.abs().max()
    sdpa = F.scaled_dot_product_attention(
        *(x.bfloat16().transpose(0, 1) for x in (q, k, v)),
        attn_mask=mask,
        is_causal=mask is None,
        enable_gqa=True,
    ).transpose(0, 1)
    torch_err = (sdpa.double() - want).abs()
    assert err.mean() <= 1.5 * torch_err.mean() and err.max() <= 1.5 * torch_err.max()
    # and it is not the fp32 path: asked for fp32, the same build gives another result
    assert not torch.equal(_call(mod, q, k, v, rows, cells, mask), out)


@pytest.mark.parametrize("path", _paths())
def test_isa_of_each_path(path: str) -> None:
    """The products each build runs; bf16 ones exactly where the CPU has AVX512_BF16 (the auto build)."""
    got = _module(path).attend_prefill_isa()
    flags = kernels.cpu_flags()
    if path == "auto":
        want = "avx512_bf16" if "avx512_bf16" in flags else "avx512" if "avx512f" in flags else "avx2"
        assert got == want or ("avx2" not in flags and got == "generic")
    else:
        assert got == path


def test_prefill_attention_refuses_bad_inputs() -> None:
    mod = _module("auto")
    q, k, v = torch.randn(4, 4, 8), torch.randn(10, 2, 8), torch.randn(10, 2, 8)
    out = torch.zeros(4, 4, 8)
    rows, cells = torch.arange(4), torch.arange(4)
    with pytest.raises(RuntimeError, match="outside the cache"):
        mod.attend_prefill(q, k, v, rows, torch.tensor([0, 1, 2, 10]), None, 1.0, False, out)
    with pytest.raises(RuntimeError, match="outside q"):
        mod.attend_prefill(q, k, v, torch.tensor([0, 1, 2, 4]), cells, None, 1.0, False, out)
    with pytest.raises(RuntimeError, match="one cell per row"):
        mod.attend_prefill(q, k, v, rows, torch.arange(5), None, 1.0, False, out)
    with pytest.raises(RuntimeError, match="mask must be"):
        mod.attend_prefill(q, k, v, rows, cells, torch.ones(4, 5, dtype=torch.bool), 1.0, False, out)
    with pytest.raises(RuntimeError, match="multiple of n_head_kv"):
        mod.attend_prefill(torch.randn(4, 3, 8), k, v, rows, cells, None, 1.0, False, torch.zeros(4, 3, 8))
    assert out.eq(0).all()  # nothing written on refusal


@pytest.mark.parametrize("path", _paths())
def test_a_sets_result_does_not_depend_on_where_its_cells_sit(path: str) -> None:
    """A prompt beside others (the server's groups): its rows among other rows of q, its cells scattered in
    the cache, give the bits it gets alone over cells 0..C-1 (bf16 products where the build has them)."""
    mod = _module(path)
    g = torch.Generator().manual_seed(13)
    R, n_head, n_kv, hd = 150, 9, 3, 64
    q = torch.randn(R, n_head, hd, generator=g)
    k, v = torch.randn(R, n_kv, hd, generator=g), torch.randn(R, n_kv, hd, generator=g)
    for bf16 in (False, True):
        alone = torch.empty_like(q)
        mod.attend_prefill(q, k, v, torch.arange(R), torch.arange(R), None, 0.125, bf16, alone)
        rows, cells = torch.randperm(R + 40, generator=g)[:R], torch.randperm(2 * R, generator=g)[:R]
        q_mixed, out = torch.randn(R + 40, n_head, hd, generator=g), torch.zeros(R + 40, n_head, hd)
        k_mixed, v_mixed = (
            torch.randn(2 * R, n_kv, hd, generator=g),
            torch.randn(2 * R, n_kv, hd, generator=g),
        )
        q_mixed[rows], k_mixed[cells], v_mixed[cells] = q, k, v
        mod.attend_prefill(q_mixed, k_mixed, v_mixed, rows, cells, None, 0.125, bf16, out)
        assert torch.equal(out[rows], alone)


def _torch_prefill(
    self: Transformer,
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    rows: torch.Tensor,
    cells: torch.Tensor,
    mask: torch.Tensor | None,
    out: torch.Tensor,
) -> None:
    """Transformer.attend_prefill through the torch path's attention (base.attend), in attn_input's dtype."""
    q_set = self.attn_input(q[rows].transpose(0, 1))  # (n_head, R, hd)
    k_set, v_set = (c[cells].transpose(0, 1).to(q_set.dtype) for c in (keys, values))  # (n_head_kv, C, hd)
    o = attend(
        q_set[None], k_set[None], v_set[None], None if mask is None else mask[None], self.args.attn_scale
    )
    out[rows] = o[0].transpose(0, 1).float()


@pytest.mark.parametrize("arch", ["llama", "gemma3", "qwen3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tiny_models_prompt_logits_equal_torch_attentions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, arch: str, dtype: torch.dtype
) -> None:
    """Fast mode, fp32 weights: a 150-token prompt continuing a 40-token one (a mask over cells before
    the rows; Gemma 3's sliding window), a fresh 100-token one (causal), and two prompts of 70 and 30
    tokens in one batch (the server's groups, each set alone): logits with the native prefill attention
    and with torch's. (A quantized model is no test of this: its 8-bit activation codes turn differences
    of 1e-7 into ones of ~0.2 in the logits, torch's fp32 against fp64 attention alike.)"""
    model = Model.load(make_tiny_model(tmp_path / f"{arch}.gguf", arch, n_layer=3, seed=5), mode="fast")
    transformer = model.transformer
    assert transformer.kernels is not None
    monkeypatch.setattr(transformer, "attn_dtype_prefill", dtype)
    tokens = torch.randint(0, model.n_vocab, (190,), generator=torch.Generator().manual_seed(14)).tolist()

    def logits() -> torch.Tensor:
        ctx = Context(model, n_ctx=256, n_batch=256, n_ubatch=256, n_seq_max=2)
        assert ctx.decode(Batch.from_tokens(tokens[:40])) == 0
        assert ctx.decode(Batch.from_tokens(tokens[40:], output=[True] * 150)) == 0
        continued = ctx.all_logits().clone()
        fresh = Context(model, n_ctx=256, n_batch=256, n_ubatch=256)
        assert fresh.decode(Batch.from_tokens(tokens[:100], output=[True] * 100)) == 0
        two = Context(model, n_ctx=256, n_batch=256, n_ubatch=256, n_seq_max=2)
        seq_ids = [[0]] * 70 + [[1]] * 30
        assert (
            two.decode(Batch.from_tokens(tokens[:70] + tokens[100:130], seq_ids=seq_ids, output=[True] * 100))
            == 0
        )
        return torch.cat((continued, fresh.all_logits(), two.all_logits()))

    native = logits()
    with monkeypatch.context() as m:
        m.setattr(Transformer, "attend_prefill", _torch_prefill)
        reference = logits()
    spread = float(reference.max() - reference.min())
    err = (native - reference).abs()
    assert err.max() <= (1e-4 if dtype == torch.float32 else 2e-2) * spread, (err.max(), spread)
