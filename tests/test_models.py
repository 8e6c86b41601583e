"""One runner over every model family: a tiny random model of each, written by our GGUF writer,
against Hugging Face transformers loading the same file (fp32), alone and sharing a batch; plus what
every family must do: refuse a file of the wrong layout, run K-quant mixes, expose named points."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from hf_reference import hf_logits, hf_logits_with_config

from gguflm import LLM, Batch, Context, GGUFError, Model
from gguflm.cli import main
from gguflm.models import ARCHITECTURES
from gguflm.writer import make_tiny_model, write_gguf

T = gguf.GGMLQuantizationType
FAMILIES = sorted(ARCHITECTURES)
N_PROMPT = 24  # longer than the tiny models' sliding window (8): local layers must mask


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return float((ours - theirs).abs().max() / (theirs.max() - theirs.min()))


def tokens_of(n: int, seed: int, n_vocab: int) -> list[int]:
    return torch.randint(0, n_vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def all_logits(model: Model, tokens: list[int], n_ubatch: int = 512) -> torch.Tensor:
    ctx = Context(model, n_ctx=max(64, len(tokens)), n_batch=512, n_ubatch=n_ubatch)
    assert ctx.decode(Batch.from_tokens(tokens, output=[True] * len(tokens))) == 0
    return ctx.all_logits().clone()


@pytest.fixture(scope="module", params=FAMILIES)
def family_path(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    arch = request.param
    return make_tiny_model(tmp_path_factory.mktemp(arch) / f"{arch}.gguf", arch, seed=7)


def test_every_family_matches_transformers(family_path: Path) -> None:
    model = Model.load(family_path, mode="reference")
    tokens = tokens_of(N_PROMPT, 0, model.n_vocab)
    assert relative_error(all_logits(model, tokens), hf_logits(family_path, tokens)) < 1e-3


def test_every_family_prefill_in_pieces_equals_one_pass(family_path: Path) -> None:
    """Micro-batches of 5 over a window of 8: what each token sees does not depend on the split."""
    model = Model.load(family_path, mode="reference")
    tokens = tokens_of(N_PROMPT, 1, model.n_vocab)
    torch.testing.assert_close(all_logits(model, tokens, n_ubatch=5), all_logits(model, tokens))


def test_every_family_sequences_sharing_a_batch_match_transformers(family_path: Path) -> None:
    """Three sequences, interleaved token by token in one batch, each against HF run on it alone."""
    model = Model.load(family_path, mode="reference")
    seqs = [tokens_of(n, seed, model.n_vocab) for n, seed in ((N_PROMPT, 2), (5, 3), (13, 4))]
    order = sorted((i, s, t) for s, toks in enumerate(seqs) for i, t in enumerate(toks))
    ctx = Context(model, n_ctx=64, n_batch=64, n_ubatch=16, n_seq_max=3)
    batch = Batch.from_tokens(
        [t for _, _, t in order],
        pos=[i for i, _, _ in order],
        seq_ids=[[s] for _, s, _ in order],
        output=[True] * len(order),
    )
    assert ctx.decode(batch) == 0
    for s, toks in enumerate(seqs):
        rows = [k for k, (_, seq, _) in enumerate(order) if seq == s]
        ours = torch.stack([ctx.logits(k) for k in rows])
        assert relative_error(ours, hf_logits(family_path, toks)) < 1e-3


def test_every_family_decodes_step_by_step_like_transformers(family_path: Path) -> None:
    """Prompt, then one token at a time past the window: the KV cache and the window mask at decode."""
    model = Model.load(family_path, mode="reference")
    tokens = tokens_of(N_PROMPT, 5, model.n_vocab)
    ctx = Context(model, n_ctx=64)
    assert ctx.decode(Batch.from_tokens(tokens[:4])) == 0
    steps = [ctx.logits(-1).clone()]
    for t in tokens[4:]:
        assert ctx.decode(Batch.from_tokens([t])) == 0
        steps.append(ctx.logits(-1).clone())
    assert relative_error(torch.stack(steps), hf_logits(family_path, tokens)[3:]) < 1e-3


@pytest.mark.parametrize("arch", ["llama", "gemma3", "phi3"])
def test_k_quant_mix_runs_each_part_in_its_format(tmp_path: Path, arch: str) -> None:
    """attn_v and ffn_down in other formats than their layer-mates, as _K_M files have them."""
    if arch == "phi3":  # q/k/v and gate/up are one tensor each in the file
        mix = {"attn_qkv": T.Q8_0, "ffn_down": T.Q4_1}
    else:  # (gguf-py, which writes these, has no K-quant quantizer; the Gemma 3 test has real ones)
        mix = {"attn_v": T.Q8_0, "ffn_down": T.Q8_0, "ffn_up": T.Q4_1}
    path = make_tiny_model(
        tmp_path / "mix.gguf", arch, n_embd=256, n_ff=256, weight_type=T.Q5_0, tensor_types=mix, seed=9
    )
    tokens = tokens_of(N_PROMPT, 6, 300)
    reference = Model.load(path, mode="reference")
    expected = hf_logits(path, tokens)
    assert relative_error(all_logits(reference, tokens), expected) < 1e-3
    fast = Model.load(path, mode="fast")
    assert relative_error(all_logits(fast, tokens), expected) < 3e-2
    if arch != "phi3":
        assert len(fast.transformer.layers[0].attn.qkv.runs) == 2  # q, k fused; v alone
        assert len(fast.transformer.layers[0].gate_up.runs) == 2  # gate Q5_0, up Q4_1


def _rewrite(src: Path, dst: Path, change: dict[str, np.ndarray | None]) -> Path:
    """src's metadata and tensors (as F32) with tensors added, replaced or (None) dropped."""
    reader = gguf.GGUFReader(src)
    metadata = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    tensors = {
        t.name: (
            np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32).reshape(
                tuple(reversed(t.shape.tolist()))
            ),
            T.F32,
        )
        for t in reader.tensors
    }
    for name, value in change.items():
        if value is None:
            del tensors[name]
        else:
            tensors[name] = (value, T.F32)
    return write_gguf(dst, metadata, tensors)


def llama3_rope_factors(
    base: float, dim: int, factor: float, low: float, high: float, n_ctx_orig: int
) -> np.ndarray:
    """rope_freqs.weight as llama.cpp's converter writes it for Llama 3.1: per pair, how much its
    frequency is divided by (1 for short wavelengths, `factor` for long ones, smooth between)."""
    freqs = base ** (-np.arange(0, dim, 2, dtype=np.float64) / dim)
    wavelen = 2 * np.pi / freqs
    smooth = np.clip((n_ctx_orig / wavelen - low) / (high - low), 0, 1)
    return (1 / ((1 - smooth) / factor + smooth)).astype(np.float32)


@pytest.mark.parametrize("kind", ["linear", "yarn", "llama3"])
def test_rope_scaling_matches_transformers(tiny_llama_path: Path, tmp_path: Path, kind: str) -> None:
    """Linear, YaRN and Llama 3.1's frequency factors, over positions past the original context (16)."""
    hf_rope: dict[str, float | str] = {"rope_type": kind, "factor": 4.0, "rope_theta": 10000.0}
    if kind == "llama3":
        hf_rope |= {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
        factors = llama3_rope_factors(10000.0, 16, 4.0, 1.0, 4.0, 16)
        path = _rewrite(tiny_llama_path, tmp_path / "llama3.gguf", {"rope_freqs.weight": factors})
    else:
        meta = {"llama.rope.scaling.type": kind, "llama.rope.scaling.factor": 4.0}
        if kind == "yarn":
            hf_rope["original_max_position_embeddings"] = 16
            meta["llama.rope.scaling.original_context_length"] = 16
        path = make_tiny_model(tmp_path / f"{kind}.gguf", "llama", seed=1, extra_metadata=meta)
    tokens = tokens_of(40, 8, 300)
    ours = all_logits(Model.load(path, mode="reference"), tokens)
    assert relative_error(ours, hf_logits(tiny_llama_path, tokens)) > 1e-2  # the scaling changes something
    assert relative_error(ours, hf_logits_with_config(path, tokens, rope_parameters=hf_rope)) < 1e-3


@pytest.mark.parametrize(("n_tokens", "n_ctx"), [(12, 16), (40, 64)])
def test_longrope_short_and_long_factors_match_transformers(
    tmp_path: Path, n_tokens: int, n_ctx: int
) -> None:
    """Phi-3's LongRoPE: short factors while the context fits the original 16 positions, long ones
    beyond (llama.cpp picks by n_ctx, transformers by the prompt's length: equal here)."""
    attn_factor = math.sqrt(1 + math.log(256 / 16) / math.log(16))
    meta = {"phi3.rope.scaling.original_context_length": 16, "phi3.rope.scaling.attn_factor": attn_factor}
    plain = make_tiny_model(tmp_path / "phi3.gguf", "phi3", seed=4, extra_metadata=meta)
    rng = np.random.default_rng(0)
    short, long = (1 + rng.random(8)).astype(np.float32), (2 + 6 * rng.random(8)).astype(np.float32)
    path = _rewrite(
        plain,
        tmp_path / "longrope.gguf",
        {"rope_factors_short.weight": short, "rope_factors_long.weight": long},
    )
    tokens = tokens_of(n_tokens, 1, 300)
    ctx = Context(Model.load(path, mode="reference"), n_ctx=n_ctx)
    assert ctx.long_context == (n_ctx > 16)
    assert ctx.decode(Batch.from_tokens(tokens, output=[True] * n_tokens)) == 0
    rope = {"rope_type": "longrope", "short_factor": short.tolist(), "long_factor": long.tolist()}
    rope |= {"original_max_position_embeddings": 16, "rope_theta": 10000.0}
    expected = hf_logits_with_config(path, tokens, rope_parameters=rope, original_max_position_embeddings=16)
    assert relative_error(ctx.all_logits(), expected) < 1e-3


def test_a_tensor_no_layer_reads_is_refused_by_name(tiny_llama_path: Path, tmp_path: Path) -> None:
    path = _rewrite(
        tiny_llama_path, tmp_path / "extra.gguf", {"blk.0.attn_q_norm.weight": np.ones(16, np.float32)}
    )
    with pytest.raises(GGUFError, match=r"blk\.0\.attn_q_norm\.weight"):
        Model.load(path)


def test_a_missing_tensor_is_refused_by_name(tiny_llama_path: Path, tmp_path: Path) -> None:
    path = _rewrite(tiny_llama_path, tmp_path / "missing.gguf", {"blk.1.ffn_up.weight": None})
    with pytest.raises(GGUFError, match=r"missing tensor 'blk\.1\.ffn_up\.weight'"):
        Model.load(path)


def test_a_wrong_shape_is_refused_by_name(tiny_llama_path: Path, tmp_path: Path) -> None:
    path = _rewrite(
        tiny_llama_path, tmp_path / "shape.gguf", {"blk.0.ffn_norm.weight": np.ones(32, np.float32)}
    )
    with pytest.raises(GGUFError, match=r"'blk\.0\.ffn_norm\.weight' has shape \(32,\)"):
        Model.load(path)


def test_named_points_show_each_layer_and_cost_nothing_detached(tiny_llama: Model) -> None:
    """An observer sees every layer's output; the last one, normed, is what decode returns."""
    seen: dict[tuple[str, int], torch.Tensor] = {}
    transformer = tiny_llama.transformer
    transformer.observers.append(lambda name, il, x: seen.setdefault((name, il), x.clone()))
    try:
        ctx = Context(tiny_llama, n_ctx=32, embeddings=True)
        assert ctx.decode(Batch.from_tokens([5, 6, 7, 8])) == 0
    finally:
        transformer.observers.clear()
    n_layer = tiny_llama.args.n_layer
    assert {il for name, il in seen if name == "l_out"} == set(range(n_layer))
    assert {"attn_norm", "ffn_inp", "ffn_norm", "inp_embd", "result_norm"} <= {name for name, _ in seen}
    assert seen[("l_out", 0)].shape == (4, tiny_llama.n_embd)  # every row until the last layer
    last = seen[("l_out", n_layer - 1)]  # only the output row after it
    expected = transformer.norm(last, transformer.output_norm)[-1]
    torch.testing.assert_close(ctx.embeddings(-1), expected)


def test_every_public_path_runs_on_every_family(
    family_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """run, chat, embed, perplexity and bench, through gguflm.LLM and the CLI, on each family."""
    llm = LLM(family_path, n_ctx=128)
    text = llm.complete("Hello world", max_tokens=6, temperature=0)["choices"][0]["text"]
    assert text == llm.complete("Hello world", max_tokens=6, temperature=0)["choices"][0]["text"]
    reply = llm.chat([{"role": "user", "content": "Hi"}], max_tokens=4, seed=1)
    assert reply["choices"][0]["message"]["role"] == "assistant"
    vectors = llm.embed(["a cat", "a dog"])
    assert len(vectors) == 2 and all(abs(float(np.linalg.norm(v)) - 1) < 1e-4 for v in vectors)

    corpus = tmp_path / "text.txt"
    corpus.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    m = str(family_path)
    assert main(["run", "-m", m, "-p", "Hello", "-n", "4", "--temp", "0", "--no-display-prompt"]) == 0
    assert main(["perplexity", "-m", m, "-f", str(corpus), "-c", "64"]) == 0
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1].startswith("Final estimate: PPL = ")
    assert main(["bench", "-m", m, "-p", "16", "-n", "4", "-r", "1", "--npl", "2", "-o", "json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["tg_tps"] > 0 and result["npl"]["2"] > 0


@pytest.mark.parametrize("arch", FAMILIES)
def test_fused_decode_layer_gives_the_python_blocks_bits(
    arch: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Decode steps through kernels.decode_layer (one native call a layer) against the family's Python
    block: bit-identical logits for one sequence and for three decoding in one batch, on quantized weights
    with a second format in the fused q/k/v (two runs; phi3's is one tensor); and the fused path ran."""
    second = {"attn_qkv" if arch == "phi3" else "attn_v": T.Q8_0, "ffn_down": T.Q5_0}
    path = make_tiny_model(tmp_path / f"{arch}.gguf", arch, seed=11, weight_type=T.Q4_1, tensor_types=second)
    model = Model.load(path)
    transformer = model.transformer
    if transformer.kernels is None:
        pytest.fail("the native kernels did not build on this machine")
    fused_calls = 0
    original = transformer.fused_block

    def counted(*args: object) -> torch.Tensor | None:
        nonlocal fused_calls
        y = original(*args)  # type: ignore[arg-type]
        fused_calls += y is not None
        return y

    monkeypatch.setattr(transformer, "fused_block", counted)

    def decode_steps(fused: bool) -> torch.Tensor:
        monkeypatch.setattr(type(transformer), "fused_decode", fused)
        ctx = Context(model, n_ctx=128, n_seq_max=3, n_batch=64)
        steps = []
        for s in range(3):  # prompts longer than the sliding window (8) of the local layers
            prompt = tokens_of(12 + s, s, model.n_vocab)
            assert ctx.decode(Batch.from_tokens(prompt, seq_ids=[[s]] * len(prompt))) == 0
        for step in range(4):
            assert ctx.decode(Batch.from_tokens([step + 1], seq_ids=[[0]])) == 0
            steps.append(ctx.logits(-1)[None].clone())
            tokens = [step + 2, step + 3, step + 4]
            assert ctx.decode(Batch.from_tokens(tokens, seq_ids=[[0], [1], [2]], output=[True] * 3)) == 0
            steps.append(ctx.all_logits().clone())
        return torch.cat(steps)

    python_block = decode_steps(False)
    assert fused_calls == 0
    fused = decode_steps(True)
    # every layer of every step: the 4 one-row and 4 three-row steps, and the prompts (sets of 12-14 rows)
    assert fused_calls == 11 * model.args.n_layer
    assert torch.equal(fused, python_block)


def test_native_layers_are_held_while_their_handle_lives(tmp_path: Path) -> None:
    """The kernels keep a layer's weights under an id (NativeLayer) from its first decode step: an id
    not (or no longer) registered is a clear error, not a crash, and dropping the handle frees them."""
    path = make_tiny_model(tmp_path / "llama.gguf", "llama", seed=3, weight_type=T.Q8_0)
    model = Model.load(path)
    transformer = model.transformer
    if transformer.kernels is None:
        pytest.fail("the native kernels did not build on this machine")
    ctx = Context(model, n_ctx=32)
    assert ctx.decode(Batch.from_tokens([1, 2, 3])) == 0
    assert ctx.decode(Batch.from_tokens([4], pos=[3])) == 0
    handle = transformer._native_layers[0]
    assert handle is not None
    norm = transformer.layers[0].attn_norm
    held = sys.getrefcount(norm)
    x = torch.zeros(1, model.n_embd)
    keys, values = ctx.kv.layers[0]
    cells = torch.zeros(1, dtype=torch.long)
    rot = torch.zeros(1, transformer.args.head_dim // 2, 2)
    sets = ([torch.zeros(1, 1, dtype=torch.long)], [cells[None]], [torch.ones(1, 1, 1, dtype=torch.bool)])

    def step(layer_id: int) -> torch.Tensor:
        return transformer.kernels.decode_layer(x, layer_id, rot, keys, values, cells, *sets)

    assert step(handle.id).shape == x.shape
    with pytest.raises(RuntimeError, match="no layer with id"):
        step(handle.id + 10_000)
    layer_id = handle.id
    transformer._native_layers.clear()
    del handle
    with pytest.raises(RuntimeError, match="no layer with id"):
        step(layer_id)
    assert sys.getrefcount(norm) < held  # the registry's reference to the norm weight is gone
    assert ctx.decode(Batch.from_tokens([5], pos=[4])) == 0  # registered again at the next step
