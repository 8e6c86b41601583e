"""End-to-end tests of the `gguflm` command on the real SmolLM2 model, against llama.cpp's outputs."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import reference

from gguflm.cli import main
from gguflm.generate import embed
from gguflm.model import Model

TOKENIZE = reference("tokenize.json")["cases"]
GREEDY = reference("greedy.json")["cases"]
EMBEDDINGS = reference("embeddings.json")["cases"]
GPL3 = Path("/usr/share/common-licenses/GPL-3")


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_tokenize_ids_like_llama_tokenize(capsys: pytest.CaptureFixture[str]) -> None:
    case = next(c for c in TOKENIZE if c["text"] == "What is LoRA?" and not c["parse_special"])
    code, out, _ = run_cli(capsys, "tokenize", "-p", case["text"], "--ids", "--no-bos", "--no-parse-special")
    assert code == 0
    assert json.loads(out) == case["ids"]


def test_tokenize_pieces(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "tokenize", "-p", "Hello world")
    assert code == 0
    assert out.splitlines() == [" 19556 -> 'Hello'", "   905 -> ' world'"]


def test_run_streams_greedy_text_like_llama_cpp() -> None:
    """A real process: the continuation on stdout, nothing else there; the first words match llama.cpp."""
    case = GREEDY[0]
    proc = subprocess.run(
        [sys.executable, "-m", "gguflm.cli", "run", "-p", case["prompt"], "-n", "4", "--temp", "0"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(case["prompt"])
    continuation = proc.stdout[len(case["prompt"]) :].rstrip("\n")
    assert len(continuation) > 5
    assert case["text"].startswith(continuation)


def test_run_without_prompt_display(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(
        capsys, "run", "-p", "The capital of France is", "-n", "2", "--temp", "0", "--no-display-prompt"
    )
    assert code == 0
    assert out.startswith(" Paris")


def test_run_prints_what_the_library_generates(capsys: pytest.CaptureFixture[str], smollm2: Model) -> None:
    """gguflm run and gguflm.LLM share one generation loop: a seeded sampled continuation and a grammar
    give the same text through either."""
    from gguflm.llm import LLM

    llm = LLM(model=smollm2, n_ctx=256)
    for extra, kwargs in (
        (["--temp", "0.8", "--seed", "5"], {"temperature": 0.8, "seed": 5}),
        (
            ["--temp", "0", "--grammar", 'root ::= " yes" | " no"'],
            {"temperature": 0.0, "grammar": 'root ::= " yes" | " no"'},
        ),
    ):
        code, out, _ = run_cli(
            capsys,
            "run",
            "-p",
            "Is Paris in France? Answer:",
            "-n",
            "10",
            "-c",
            "256",
            "--no-display-prompt",
            *extra,
        )
        assert code == 0
        want = llm.complete("Is Paris in France? Answer:", max_tokens=10, **kwargs)["choices"][0]["text"]
        assert out == want + "\n", (extra, out, want)


def test_run_fills_the_context_and_stops(capsys: pytest.CaptureFixture[str]) -> None:
    """-n -1: until the end of generation or a full context (the last token sampled from the last cell,
    not decoded), then a clean exit."""
    code, out, _ = run_cli(
        capsys,
        "run",
        "-p",
        "One two three",
        "-c",
        "16",
        "-n",
        "-1",
        "--temp",
        "0",
        "--no-display-prompt",
    )
    assert code == 0 and out.endswith("\n") and len(out.strip()) > 0


def test_inspect(capsys: pytest.CaptureFixture[str], smollm2_path: Path) -> None:
    code, out, _ = run_cli(capsys, "inspect", str(smollm2_path))
    assert code == 0
    assert "general.architecture = 'llama'" in out
    assert any(line.split()[:3] == ["token_embd.weight", "Q8_0", "49152x576"] for line in out.splitlines())
    assert "272 tensors" in out


def test_missing_model_is_one_clear_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out, err = run_cli(capsys, "run", "-m", str(tmp_path / "nope.gguf"), "-p", "hi")
    assert code == 1 and out == ""
    assert err.strip() == f"error: {tmp_path / 'nope.gguf'}: no such file"


def test_not_a_gguf_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGML" + bytes(100))
    code, _, err = run_cli(capsys, "inspect", str(bad))
    assert code == 1 and "not a GGUF file" in err and "Traceback" not in err


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.parametrize("case", EMBEDDINGS, ids=[f"{c['prompt'][:12]}-{c['pooling']}" for c in EMBEDDINGS])
def test_embeddings_match_llama_embedding(smollm2: Model, case: dict) -> None:
    tokens = smollm2.tokenizer.encode(case["prompt"], add_special=True, parse_special=True)
    ours = np.array(embed(smollm2, [tokens], case["pooling"], case["embd_normalize"]))
    theirs = np.array(case["embeddings"])
    assert ours.shape == theirs.shape
    assert min(cosine(a, b) for a, b in zip(ours, theirs, strict=True)) >= 0.99


@pytest.mark.parametrize("pooling", ["mean", "none"])
def test_packed_prompts_embed_like_each_alone(smollm2: Model, pooling: str) -> None:
    """Prompts packed into shared batches (and spilling into a second one) keep their order and
    their vectors: up to the kernels' rounding (int4 rows alone, bf16 matmuls for a big batch)."""
    texts = ["Hello world", "The capital of France is Paris.", "a", "GGUF files keep weights quantized"] * 5
    prompts = [smollm2.tokenizer.encode(t, add_special=True, parse_special=True) for t in texts]
    packed = np.array(embed(smollm2, prompts, pooling, n_batch=64))
    alone = np.array([v for p in prompts for v in embed(smollm2, [p], pooling)])
    assert packed.shape == alone.shape
    assert min(cosine(a, b) for a, b in zip(packed, alone, strict=True)) > 0.999


def test_embed_array_output_is_what_llama_embedding_prints(capsys: pytest.CaptureFixture[str]) -> None:
    case = next(c for c in EMBEDDINGS if c["pooling"] == "last")
    code, out, _ = run_cli(
        capsys, "embed", "-p", case["prompt"], "--pooling", "last", "--embd-output-format", "array"
    )
    assert code == 0
    ours = np.array(json.loads(out))
    assert ours.shape == (1, 576) and cosine(ours[0], np.array(case["embeddings"][0])) >= 0.99


def test_embed_json_plus_has_openai_shape_and_similarities(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(
        capsys, "embed", "-p", "a cat\na kitten\nthe stock market", "--embd-output-format", "json+"
    )
    assert code == 0
    doc = json.loads(out)
    assert doc["object"] == "list" and [d["index"] for d in doc["data"]] == [0, 1, 2]
    assert all(len(d["embedding"]) == 576 for d in doc["data"])
    assert all(abs(np.linalg.norm(d["embedding"]) - 1) < 1e-4 for d in doc["data"])
    sim = np.array(doc["cosineSimilarity"])
    assert sim.shape == (3, 3) and np.allclose(np.diag(sim), 1.0, atol=0.01)


def test_embed_verbose_prompt_lists_tokens(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys, "embed", "-p", "Hello world", "--verbose-prompt")
    assert code == 0
    assert "19556 -> 'Hello'" in err and "905 -> ' world'" in err


def test_perplexity_gpl3_within_one_percent_of_llama_cpp(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "perplexity", "-f", str(GPL3), "-c", "512", "-b", "512")
    assert code == 0
    final = out.strip().splitlines()[-1]
    assert final.startswith("Final estimate: PPL = ")
    ppl = float(final.split()[4])
    assert abs(ppl / 18.3914 - 1) < 0.01, ppl
    assert out.count("[") == 14  # one running value per chunk


def test_kl_divergence_is_zero_against_itself_and_small_for_the_fast_mode(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    text = tmp_path / "gpl3-head.txt"
    text.write_text(GPL3.read_text()[:6000])  # about 5 chunks of 256 tokens

    def kl(mode: str) -> tuple[float, float]:
        code, out, _ = run_cli(
            capsys, "perplexity", "-f", str(text), "-c", "256", "--mode", mode, "--kl-divergence", "reference"
        )
        assert code == 0
        kl_line = next(line for line in out.splitlines() if line.startswith("KL divergence"))
        top_line = next(line for line in out.splitlines() if line.startswith("Same top token"))
        return float(kl_line.split("mean ")[1].split(",")[0]), float(top_line.split()[-1].rstrip("%"))

    assert kl("reference") == (0.0, 100.0)
    mean, top = kl("fast")
    assert 0 < mean < 0.01 and top > 90


def test_embeddings_doc_example_runs(capsys: pytest.CaptureFixture[str]) -> None:
    """docs/embeddings.md promises a runnable example: run it."""
    doc = (Path(__file__).resolve().parents[1] / "docs" / "embeddings.md").read_text()
    code = doc.split("```python\n", 1)[1].split("```", 1)[0]
    exec(compile(code, "docs/embeddings.md", "exec"), {})
    assert capsys.readouterr().out.strip() == "Paris"


def test_over_long_prompt_is_refused_before_anything_is_printed(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(capsys, "run", "-p", "word " * 100, "-c", "32", "-n", "4")
    assert code == 1 and out == ""
    assert re.fullmatch(r"error: the prompt has 1\d\d tokens, the context holds 32 \(raise -c\)", err.strip())


def test_bench_json_reports_every_measure(capsys: pytest.CaptureFixture[str], tiny_llama_path: Path) -> None:
    code, out, _ = run_cli(
        capsys,
        "bench",
        "-m",
        str(tiny_llama_path),
        "-p",
        "8",  # shorter than tg's 16-token prompt: the batch size must still fit that
        "-n",
        "8",
        "-r",
        "2",
        "--npl",
        "1,4",
        "-o",
        "json",
    )
    assert code == 0
    result = json.loads(out)
    assert result["model"] == tiny_llama_path.name
    assert result["cpu"].startswith("cpu: ") and "prefill in " in result["cpu"]
    assert set(result["npl"]) == {"1", "4"}
    speeds = [result["pp_tps"], result["tg_tps"], *result["npl"].values()]
    assert all(isinstance(v, float) and v > 0 for v in speeds)
    assert result["peak_rss_mb"] > 50  # the interpreter and torch alone take more


def test_bench_greedy_rows_is_torchs_argmax_ties_included() -> None:
    """The benchmark's greedy pick (numpy's argmax) is torch's: the first of equal maxima, row by row."""
    import torch

    from gguflm.bench import greedy_rows

    logits = torch.randn(16, 262144, generator=torch.Generator().manual_seed(3))
    logits[0, [7, 9]] = 100.0  # a tie: the lower id wins
    logits[1, -1] = 100.0
    assert greedy_rows(logits) == logits.argmax(-1).tolist()
    assert greedy_rows(logits)[:2] == [7, 262143]


@pytest.mark.parametrize("argv", [["-t", "0"], ["--npl", "100000000"]])
def test_bench_bad_threads_or_impossible_context_is_an_error(
    capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    code, _, err = run_cli(capsys, "bench", "-p", "8", "-n", "4", "-r", "1", *argv)
    assert code == 1 and err.startswith("error: ") and "Traceback" not in err


def test_inspect_system_names_the_paths(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GGUFLM_KERNELS", "avx2")
    code, out, _ = run_cli(capsys, "inspect", "--system")
    assert code == 0
    lines = out.splitlines()
    assert (
        lines[0].startswith("cpu: ") and "kernels=avx2" in lines[0] and "prefill in native int8" in lines[0]
    )
    assert lines[1].startswith("native kernels: avx2, in use for products of any number of rows")
    monkeypatch.setenv("GGUFLM_KERNELS", "torch")
    code, out, _ = run_cli(capsys, "inspect", "--system")
    assert code == 0 and "native kernels: none" in out
    code, _, err = run_cli(capsys, "inspect")
    assert code == 1 and "give a GGUF file" in err


def test_perplexity_chunks_scores_only_the_first_n(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """--chunks 2 gives the perplexity of the first two chunks of five, recomputed here."""
    import torch

    from gguflm.batch import Batch
    from gguflm.context import Context
    from gguflm.paths import default_model_path

    text = tmp_path / "gpl3-head.txt"
    text.write_text(GPL3.read_text()[:3000])  # about 5 chunks of 128 tokens
    code, out, _ = run_cli(capsys, "perplexity", "-f", str(text), "-c", "128", "--chunks", "2")
    assert code == 0 and out.count("[") == 2
    ppl = float(out.strip().splitlines()[-1].split()[4])

    model = Model.load(default_model_path())
    tokens = model.tokenizer.encode(text.read_text(), add_special=True, parse_special=False)
    assert len(tokens) // 128 > 2  # the limit, not the text, stops it
    ctx = Context(model, n_ctx=128, n_batch=128)
    nll = []
    for i in range(2):
        chunk = tokens[i * 128 : (i + 1) * 128]
        if model.tokenizer.add_bos:
            chunk[0] = model.tokenizer.bos_id  # llama-perplexity: every chunk starts with BOS
        ctx.kv.clear()
        # logits rows of positions 64..126 only (llama-perplexity's rows; the kernels' sums depend on
        # the row count, so all 128 rows give a perplexity about 1% off)
        ctx.decode(Batch.from_tokens(chunk, output=[64 <= p < 127 for p in range(128)]))
        logits = ctx.all_logits().double()  # (63, n_vocab)
        targets = torch.tensor(tokens[i * 128 + 65 : (i + 1) * 128])  # the second half, as scored
        nll.append(torch.nn.functional.cross_entropy(logits, targets, reduction="none"))
    assert abs(ppl / float(torch.cat(nll).mean().exp()) - 1) < 1e-4


def test_perplexity_zero_chunks_is_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys, "perplexity", "-f", str(GPL3), "--chunks", "0")
    assert code == 1 and err.startswith("error: ") and "--chunks" in err and "Traceback" not in err
