"""The logit lens, early exit and the vocab comparison: against the model's own logits, against Hugging
Face transformers' hidden states through its final norm and head, and against numpy cosines computed
from gguf-py's dequantization of the same file."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from hf_reference import hf_model

from gguflm import Batch, Context, Model
from gguflm.cli import main
from gguflm.lens import Lens, lens_prompt, lens_text, parse_layers
from gguflm.models import ARCHITECTURES
from gguflm.vocab import Matrices, compare, token_neighbours
from gguflm.writer import make_tiny_model

T = gguf.GGMLQuantizationType
FAMILIES = sorted(ARCHITECTURES)


def tokens_of(n: int, seed: int, n_vocab: int) -> list[int]:
    return torch.randint(0, n_vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module", params=FAMILIES)
def family_path(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    arch = request.param
    return make_tiny_model(tmp_path_factory.mktemp(arch) / f"{arch}.gguf", arch, seed=11)


def three_sequences(n_vocab: int) -> Batch:
    """Three sequences interleaved token by token in one batch, every token an output."""
    seqs = [tokens_of(n, seed, n_vocab) for n, seed in ((20, 2), (5, 3), (11, 4))]
    order = sorted((i, s, t) for s, toks in enumerate(seqs) for i, t in enumerate(toks))
    return Batch.from_tokens(
        [t for _, _, t in order],
        pos=[i for i, _, _ in order],
        seq_ids=[[s] for _, s, _ in order],
        output=[True] * len(order),
    )


def lens_and_logits(model: Model, batch: Batch, n_seq: int = 3, exit_layer: int | None = None):
    ctx = Context(model, n_ctx=64, n_batch=64, n_ubatch=16, n_seq_max=n_seq, exit_layer=exit_layer)
    with Lens(model) as lens:
        assert ctx.decode(batch) == 0
    return lens, ctx.all_logits().clone()


@pytest.mark.parametrize("mode", ["fast", "reference"])
def test_lens_at_the_last_layer_is_the_model_logits_and_early_exit_is_the_lens(
    family_path: Path, mode: str
) -> None:
    """Several sequences in micro-batches of 16: the lens at n_layer is exactly the logits; an early
    exit at L is exactly the lens at L; an exit at n_layer is exactly the normal run."""
    model = Model.load(family_path, mode=mode)
    n_layer = model.args.n_layer
    batch = three_sequences(model.n_vocab)
    lens, logits = lens_and_logits(model, batch)
    assert lens.n_rows == batch.n_tokens
    assert torch.equal(lens.logits(n_layer), logits)
    for layer in sorted({1, n_layer // 2, n_layer}):
        _, early = lens_and_logits(model, batch, exit_layer=layer)
        torch.testing.assert_close(early, lens.logits(layer), rtol=0, atol=0)
    # a one-sequence decode with only the last row as output: the lens keeps that row, in order
    ctx = Context(model, n_ctx=32)
    with Lens(model, [0, n_layer]) as last_only:
        assert ctx.decode(Batch.from_tokens(tokens_of(9, 5, model.n_vocab))) == 0
    assert last_only.n_rows == 1
    assert torch.equal(last_only.logits(n_layer)[0], ctx.logits(-1))


def test_lens_matches_transformers_hidden_states(family_path: Path) -> None:
    """Every layer, every position, against HF's output_hidden_states through its final norm and
    lm_head (and Gemma 2's final soft-capping); HF's last hidden state is normed already."""
    model = Model.load(family_path, mode="reference")
    tokens = tokens_of(24, 0, model.n_vocab)
    n_layer = model.args.n_layer
    hf = hf_model(family_path)
    with torch.no_grad():
        out = hf(input_ids=torch.tensor([tokens]), output_hidden_states=True, use_cache=False)
        cap = getattr(hf.config, "final_logit_softcapping", None)
        expected = []
        for layer in range(n_layer):
            x = hf.lm_head(hf.model.norm(out.hidden_states[layer]))[0]
            expected.append(torch.tanh(x / cap) * cap if cap else x)
        expected.append(out.logits[0])
    ctx = Context(model, n_ctx=64)
    with Lens(model) as lens:
        assert ctx.decode(Batch.from_tokens(tokens, output=[True] * len(tokens))) == 0
    for layer in range(n_layer + 1):
        theirs = expected[layer].float()
        error = float((lens.logits(layer) - theirs).abs().max() / (theirs.max() - theirs.min()))
        assert error < 1e-3, (layer, error)


def test_prompt_lens_ranks_and_top_tokens(tiny_llama: Model) -> None:
    tokens = tokens_of(7, 1, tiny_llama.n_vocab)
    n_layer = tiny_llama.args.n_layer
    result = lens_prompt(tiny_llama, tokens, [0, 1, n_layer], top_k=3)
    ctx = Context(tiny_llama, n_ctx=32)
    assert ctx.decode(Batch.from_tokens(tokens, output=[True] * len(tokens))) == 0
    probs = torch.softmax(ctx.all_logits(), -1)
    torch.testing.assert_close(result.top_probs[-1], probs.topk(3, -1).values)
    assert (result.final_rank[-1] == 1).all()
    lens = Lens(tiny_llama, [1])
    with lens:
        ctx.kv.clear()
        assert ctx.decode(Batch.from_tokens(tokens, output=[True] * len(tokens))) == 0
    p1 = torch.softmax(lens.logits(1), -1)
    final_top = probs.argmax(-1)
    rank = (p1 > p1.gather(1, final_top[:, None])).sum(-1) + 1
    assert torch.equal(result.final_rank[1], rank)


def test_text_stats_are_zero_at_the_last_layer(tiny_llama: Model) -> None:
    tokens = tokens_of(64, 3, tiny_llama.n_vocab)
    n_layer = tiny_llama.args.n_layer
    stats = lens_text(tiny_llama, tokens, [0, 1, n_layer], n_ctx=16, max_chunks=3)
    last = stats[-1]
    assert last.n_positions == 48 and last.top1_agreement == 1.0 and abs(last.kl_to_final) < 1e-5
    assert stats[0].kl_to_final > 0.01


def test_bad_layers_and_exit_layers_are_clear_errors(tiny_llama: Model) -> None:
    n_layer = tiny_llama.args.n_layer
    with pytest.raises(
        ValueError, match=rf"exit layer {n_layer + 1} is out of range: .* has layers 1..{n_layer}"
    ):
        Context(tiny_llama, exit_layer=n_layer + 1)
    with pytest.raises(ValueError, match="exit layer 0 is out of range"):
        Context(tiny_llama, exit_layer=0)
    with pytest.raises(ValueError, match=rf"layer {n_layer + 1} is out of range"):
        parse_layers(f"0,{n_layer + 1}", n_layer)
    with pytest.raises(ValueError, match="comma-separated"):
        parse_layers("1,x", n_layer)
    assert parse_layers("all", n_layer) == list(range(n_layer + 1))


# ---- the commands -------------------------------------------------------------------------------


def test_lens_command_table_json_and_png(
    tiny_llama_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    m = str(tiny_llama_path)
    png = tmp_path / "heat.png"
    assert main(["lens", "-m", m, "-p", "Hello world, hello", "--png", str(png)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("layer |") and table[-1].lstrip().startswith("emb |")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000
    assert main(["lens", "-m", m, "-p", "Hello world", "--layers", "0,2", "--top-k", "2", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [layer["layer"] for layer in data["layers"]] == [0, 2]
    last = data["layers"][-1]["positions"]
    assert len(last) == len(data["tokens"]) and all(p["final_top1_rank"] == 1 for p in last)
    assert all(len(p["top"]) == 2 and p["top"][0]["prob"] >= p["top"][1]["prob"] for p in last)

    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    plot = tmp_path / "layers.png"
    assert main(["lens", "-m", m, "-f", str(text), "-c", "32", "--png", str(plot), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)["layers"]
    assert [s["layer"] for s in stats] == [0, 1, 2] and stats[-1]["top1_agreement"] == 1.0
    assert plot.stat().st_size > 1000


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["-p", ""], "the prompt is empty"),
        (["-p", "hi", "--layers", "0,9"], "layer 9 is out of range"),
        ([], "give a prompt with -p"),
        (["-p", "hi", "--top-k", "0"], "--top-k must be at least 1"),
        (["-f", "/nonexistent/text"], "cannot read /nonexistent/text"),
    ],
)
def test_lens_command_errors(
    tiny_llama_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    assert main(["lens", "-m", str(tiny_llama_path), *argv]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_exit_layer_flags(tiny_llama_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    m = str(tiny_llama_path)
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    assert main(["perplexity", "-m", m, "-f", str(text), "-c", "32", "--exit-layer", "1"]) == 0
    one = capsys.readouterr().out.strip().splitlines()[-1]
    assert main(["perplexity", "-m", m, "-f", str(text), "-c", "32", "--exit-layer", "2"]) == 0
    two = capsys.readouterr().out.strip().splitlines()[-1]
    assert main(["perplexity", "-m", m, "-f", str(text), "-c", "32"]) == 0
    full = capsys.readouterr().out.strip().splitlines()[-1]
    assert one.startswith("Final estimate: PPL = ") and one != two and two == full
    assert main(["bench", "-m", m, "-p", "8", "-n", "2", "-r", "1", "--exit-layer", "1", "-o", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["exit_layer"] == 1
    assert main(["perplexity", "-m", m, "-f", str(text), "-c", "32", "--exit-layer", "3"]) == 1
    assert "error: exit layer 3 is out of range" in capsys.readouterr().err


# ---- vocab --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def untied_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(
        tmp_path_factory.mktemp("untied") / "untied.gguf",
        "llama",
        tied_output=False,
        embedding_type=T.Q8_0,
        seed=4,
    )


def numpy_matrices(path: Path) -> dict[str, np.ndarray]:
    """token_embd, output (token_embd when absent) and output_norm, dequantized by gguf-py."""
    reader = gguf.GGUFReader(path)
    found = {
        t.name: gguf.quants.dequantize(t.data, t.tensor_type).reshape(-1, int(t.shape[0])).astype(np.float64)
        for t in reader.tensors
        if t.name in ("token_embd.weight", "output.weight", "output_norm.weight")
    }
    return {
        "input": found["token_embd.weight"],
        "output": found.get("output.weight", found["token_embd.weight"]),
        "gain": found["output_norm.weight"].reshape(-1),
    }


def numpy_neighbours(m: np.ndarray, i: int, k: int) -> tuple[list[int], np.ndarray]:
    unit = m / np.linalg.norm(m, axis=1, keepdims=True)
    cos = unit @ unit[i]
    cos[i] = -np.inf
    order = np.argsort(-cos, kind="stable")[:k]
    return order.tolist(), cos[order]


@pytest.mark.parametrize("raw", [False, True])
def test_vocab_neighbours_and_cosines_against_numpy(untied_path: Path, raw: bool) -> None:
    model = Model.load(untied_path)
    mats = Matrices.of(model, raw=raw)
    assert not mats.tied
    ref = numpy_matrices(untied_path)
    out = ref["output"] if raw else ref["output"] * ref["gain"]
    for token in (3, 100, 383):
        found = token_neighbours(mats, token, 5, chunk=50)  # chunks: the top-k merges across them
        for name, matrix in (("input", ref["input"]), ("output", out)):
            ids, cos = numpy_neighbours(matrix, token, 5)
            assert [i for i, _ in found[name]] == ids
            np.testing.assert_allclose([c for _, c in found[name]], cos, atol=1e-5)
    result = compare(mats, k=5, chunk=50)
    unit_in = ref["input"] / np.linalg.norm(ref["input"], axis=1, keepdims=True)
    unit_out = out / np.linalg.norm(out, axis=1, keepdims=True)
    np.testing.assert_allclose(result.cos_in_out, (unit_in * unit_out).sum(1), atol=1e-5)
    overlap = [
        len(set(numpy_neighbours(ref["input"], i, 5)[0]) & set(numpy_neighbours(out, i, 5)[0])) / 5
        for i in range(model.n_vocab)
    ]
    np.testing.assert_allclose(result.overlap, overlap)


def test_vocab_of_a_tied_model(tiny_llama: Model) -> None:
    raw = compare(Matrices.of(tiny_llama, raw=True), k=5, sample=40)
    assert Matrices.of(tiny_llama).tied and len(raw.sampled) == 40
    np.testing.assert_allclose(raw.cos_in_out, 1.0, atol=1e-5)
    assert (raw.overlap == 1.0).all()
    gained = compare(Matrices.of(tiny_llama), k=5, sample=40)  # the final norm's gain is not uniform
    assert gained.cos_in_out.max() < 1.0


def test_vocab_command(untied_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    m = str(untied_path)
    png = tmp_path / "hist.png"
    assert main(["vocab", "-m", m, "--token", "#100", "--neighbours", "4", "--png", str(png)]) == 0
    out = capsys.readouterr().out
    assert "untied" in out and "nearest to" in out and "neighbour lists shared" in out
    assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 1000
    assert main(["vocab", "-m", m, "--token", "#7", "--neighbours", "3", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["tied"] is False and len(data["neighbours"][0]["input"]) == 3
    assert "whole_vocabulary" not in data
    assert main(["vocab", "-m", m, "--token", "Hello world"]) == 1
    assert "give one token, or #ID" in capsys.readouterr().err
    assert main(["vocab", "-m", m, "--token", "#999"]) == 1
    assert "error: token id 999 is out of range" in capsys.readouterr().err
