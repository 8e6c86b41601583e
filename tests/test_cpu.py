"""The fast mode's choice of prefill dtype by CPU capability, and that the fp32 path stays exact enough."""

from __future__ import annotations

from pathlib import Path

import gguf
import pytest
import torch

from gguflm import Batch, Context, Model, kernels
from gguflm.cpu import (
    activation_levels,
    dequantized_prefill,
    describe,
    has_fast_bf16,
    kernel_choice,
    prefill_dtype,
)
from gguflm.writer import make_tiny_model

T = gguf.GGMLQuantizationType


def test_forced_choices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GGUFLM_KERNELS", "avx2")
    assert not has_fast_bf16() and prefill_dtype() == torch.float32 and not dequantized_prefill()
    assert "prefill in native int8" in describe()
    monkeypatch.setenv("GGUFLM_KERNELS", "avx512")  # bf16 arithmetic without AMX: still the int8 kernels
    assert has_fast_bf16() and not dequantized_prefill()
    monkeypatch.setenv("GGUFLM_KERNELS", "amx")
    assert has_fast_bf16() and prefill_dtype() == torch.bfloat16 and dequantized_prefill()
    monkeypatch.setenv("GGUFLM_KERNELS", "sse9")
    with pytest.raises(ValueError, match="GGUFLM_KERNELS='sse9'"):
        kernel_choice()


@pytest.mark.parametrize("choice", ["auto", "torch", "avx2", "amx", "native", "generic"])
def test_prefill_path_of_each_choice_stays_close_to_reference(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, choice: str
) -> None:
    """A 100-token prefill (many-row matmuls, prefill attention), single-token steps, and a dense
    F16 layer, on each path: torch's int4 kernel or the native kernels, bf16 or fp32 prefill."""
    monkeypatch.setenv("GGUFLM_KERNELS", choice)
    path = make_tiny_model(tmp_path / "m.gguf", "llama", weight_type=T.Q4_1, tensor_types={"ffn_down": T.F16})
    fast = Model.load(path, mode="fast")
    layer = fast.transformer.layers[0]
    bf16 = has_fast_bf16()
    assert bf16 == (
        choice == "amx" or (choice in ("auto", "torch", "native") and prefill_dtype() == torch.bfloat16)
    )
    expected = torch.bfloat16 if bf16 else torch.float32
    built = choice != "torch" and kernels.native() is not None
    assert layer.gate_up.runs[0].kernel == ("native" if built else "int4")
    assert (fast.transformer.kernels is not None) == built  # decode attention and norms
    # the native kernels take a prefill's rows too (fp32 in, int8 inside), but on AMX machines
    prefill_input = expected if not built or dequantized_prefill() else torch.float32
    assert layer.gate_up.runs[0].input_dtype(100) == prefill_input
    assert layer.down.runs[0].kernel == ("bf16" if bf16 else "f32")
    assert fast.transformer.attn_dtype_prefill == expected
    tokens = torch.randint(0, 300, (100,), generator=torch.Generator().manual_seed(0)).tolist()

    def logits(model: Model) -> torch.Tensor:
        ctx = Context(model, n_ctx=128)
        assert ctx.decode(Batch.from_tokens(tokens, output=[True] * len(tokens))) == 0
        return ctx.all_logits().float()

    ref = logits(Model.load(path, mode="reference"))
    assert float((logits(fast) - ref).abs().max() / (ref.max() - ref.min())) < 3e-2
    ctx = Context(fast, n_ctx=128)  # decode steps: one row through the int4 or native kernels
    for t in tokens[:6]:
        assert ctx.decode(Batch.from_tokens([t])) == 0
    assert float((ctx.logits(-1) - ref[5]).abs().max() / (ref.max() - ref.min())) < 3e-2


def test_fine_activations_bring_decode_closer_to_reference(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """GGUFLM_ACTIVATIONS=q8x2 quantizes what q8's rounding left over again: decode steps through the
    native kernels land far closer to the fp32 reference."""
    if kernels.native() is None:
        pytest.fail(f"the native kernels do not build here: {kernels.native_error}")
    path = make_tiny_model(tmp_path / "m.gguf", "llama", weight_type=T.Q4_1)
    tokens = torch.randint(0, 300, (8,), generator=torch.Generator().manual_seed(1)).tolist()

    def steps(mode: str) -> torch.Tensor:
        ctx = Context(Model.load(path, mode=mode), n_ctx=16)
        rows = []
        for t in tokens:  # one row per call: the native kernels' decode path
            assert ctx.decode(Batch.from_tokens([t])) == 0
            rows.append(ctx.logits(-1).float().clone())
        return torch.stack(rows)

    ref = steps("reference")
    errors = {}
    for value in ("q8", "q8x2"):
        monkeypatch.setenv("GGUFLM_ACTIVATIONS", value)
        errors[value] = float((steps("fast") - ref).abs().max())
    assert errors["q8x2"] < errors["q8"] / 4, errors
    monkeypatch.setenv("GGUFLM_ACTIVATIONS", "q4")
    with pytest.raises(ValueError, match="GGUFLM_ACTIVATIONS='q4'"):
        activation_levels()


def test_auto_activations_refine_only_the_products_nearest_the_logits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """GGUFLM_ACTIVATIONS=auto (the default): two levels for the last layer and the output head (unless it
    outweighs the layers), one elsewhere; a one-layer model with a small head is then all two-level, and its
    logits are q8x2's to the bit."""
    if kernels.native() is None:
        pytest.fail(f"the native kernels do not build here: {kernels.native_error}")
    from gguflm.models.base import linears_of

    monkeypatch.delenv("GGUFLM_ACTIVATIONS", raising=False)
    path = make_tiny_model(tmp_path / "m.gguf", "llama", n_layer=3, weight_type=T.Q4_1, tied_output=False)
    t = Model.load(path, mode="fast").transformer
    levels = [[run.levels for lin in linears_of(layer) for run in lin.runs] for layer in t.layers]
    assert levels[0] and levels[:-1] == [[1] * len(levels[0])] * 2 and levels[-1] == [2] * len(levels[0])
    assert t.output.levels == 2  # 384 x 64 weights against the layers' 3 x 36864
    big = make_tiny_model(tmp_path / "big.gguf", "llama", n_layer=1, n_vocab=1024, weight_type=T.Q4_1)
    t = Model.load(big, mode="fast").transformer  # a head that outweighs the layers keeps one level
    assert t.output.levels == 1 and {r.levels for lin in linears_of(t.layers[0]) for r in lin.runs} == {2}

    one = make_tiny_model(tmp_path / "one.gguf", "llama", n_layer=1, weight_type=T.Q4_1)
    tokens = [5, 17, 99, 3]

    def logits(value: str) -> torch.Tensor:
        monkeypatch.setenv("GGUFLM_ACTIVATIONS", value)
        ctx = Context(Model.load(one, mode="fast"), n_ctx=16)
        assert ctx.decode(Batch.from_tokens(tokens)) == 0
        return ctx.logits(-1).clone()

    assert torch.equal(logits("auto"), logits("q8x2"))
    assert not torch.equal(logits("auto"), logits("q8"))
