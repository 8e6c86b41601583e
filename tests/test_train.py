"""`gguflm train`: a tiny llama trained on the GPL-3 text learns (validation loss far below the text's
unigram entropy), and the GGUF it writes holds that very model: its tokenizer is the `tokenizers` one,
gguflm's reference mode, Hugging Face transformers and llama.cpp compute its logits, and a run stopped
by Ctrl-C resumes bit for bit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import textwrap
from collections.abc import Iterator
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from hf_reference import hf_logits

from gguflm import Batch, Context, Model
from gguflm.cli import main
from gguflm.gguf_file import GGUFFile
from gguflm.perplexity import perplexity
from gguflm.train.bpe import END_OF_TEXT
from gguflm.train.config import TrainConfig
from gguflm.train.export import export_gguf
from gguflm.train.run import TrainResult, train

GPL3 = Path("/usr/share/common-licenses/GPL-3")
GPL2 = Path("/usr/share/common-licenses/GPL-2")
LLAMA_CPP_PYTHON = Path("/tmp/lcpvenv/bin/python")
T = gguf.GGMLQuantizationType

# A tiny model that learns the GPL-3 text in ~10 s on one core. n_ff 176 is not a multiple of 32, so
# a Q8_0 export writes ffn_down (rows of n_ff) in F16, as llama.cpp's converter would.
TINY = TrainConfig(
    vocab_size=512, n_embd=64, n_layer=2, n_head=4, n_head_kv=2, n_ff=176, ctx=64,
    steps=200, batch=8, lr=3e-3, eval_every=50,
)  # fmt: skip
# The bar: 20% below the unigram entropy of the training tokens, which no model that ignores the
# context can beat (a bigram-free model's best loss). The run reaches ~0.76 of it.
ENTROPY_FRACTION = 0.8


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """The tiny model's ops take microseconds: on a shared 2-core machine, OpenMP's barriers between
    two threads cost more than the work (a 1024x192 multiply: 20 ms on 2 threads, 0.1 ms on 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> TrainResult:
    out = tmp_path_factory.mktemp("train") / "gpl3.gguf"
    return train([GPL3], out, TINY, progress=False)


def model_logits(result: TrainResult, tokens: list[int]) -> torch.Tensor:
    """(n, n_vocab) fp32 logits of the training model (no autocast) for one sequence."""
    with torch.no_grad():
        return result.trainer.model(torch.tensor([tokens]))[0]


def gguflm_logits(model: Model, tokens: list[int]) -> torch.Tensor:
    ctx = Context(model, n_ctx=len(tokens), n_batch=len(tokens), n_ubatch=len(tokens))
    assert ctx.decode(Batch.from_tokens(tokens, output=[True] * len(tokens))) == 0
    return ctx.all_logits().clone()


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return float((ours - theirs).abs().max() / (theirs.max() - theirs.min()))


def held_back_tokens(result: TrainResult, n: int) -> list[int]:
    """BOS then the first n - 1 held-back tokens (text neither the tokenizer nor the model saw)."""
    return [result.trainer.corpus.bos, *result.trainer.corpus.val_ids[: n - 1].tolist()]


def test_validation_loss_falls_well_below_unigram_entropy(trained: TrainResult) -> None:
    val = [loss for _, loss in trained.history.val]
    assert len(val) == TINY.steps // TINY.eval_every
    assert val[-1] < ENTROPY_FRACTION * trained.unigram_entropy, (val, trained.unigram_entropy)
    assert val[-1] < val[0]
    assert len(trained.history.train) == TINY.steps
    assert trained.plot is not None and trained.plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_gguf_tokenizer_equals_tokenizers_on_held_back_lines(trained: TrainResult) -> None:
    """gguflm's llama.cpp-style tokenizer, reading the GGUF, against the `tokenizers` encoder it came
    from, on 100 lines neither saw in training (the held-back GPL-3 tail, then GPL-2)."""
    lines = [line for line in trained.trainer.corpus.val_lines if line.strip()]
    lines += [line for line in GPL2.read_text().splitlines(keepends=True) if line.strip()]
    lines = lines[:100]
    assert len(lines) == 100
    tokenizer = Model.load(trained.gguf, mode="reference").tokenizer
    expected = trained.trainer.tokenizer
    for line in lines:
        assert tokenizer.encode(line, add_special=False) == expected.encode(line).ids, line
    # digits split one by one, as the smollm pre-tokenizer does
    assert tokenizer.encode("2024", add_special=False) == expected.encode("2024").ids
    assert len(expected.encode("2024").ids) == 4
    bos = expected.token_to_id(END_OF_TEXT)
    assert tokenizer.encode("This License")[0] == bos  # add_bos_token


def test_exported_logits_equal_the_training_model(trained: TrainResult) -> None:
    tokens = held_back_tokens(trained, TINY.ctx)
    expected = model_logits(trained, tokens)
    assert trained.gguf is not None
    ours = gguflm_logits(Model.load(trained.gguf, mode="reference"), tokens)
    assert relative_error(ours, expected) < 1e-4
    # an implementation we did not write: transformers reads the GGUF (undoing llama.cpp's q/k order)
    assert relative_error(hf_logits(trained.gguf, tokens), expected) < 1e-4


def test_gguf_metadata_and_types(trained: TrainResult, tmp_path: Path) -> None:
    assert trained.gguf is not None
    f = GGUFFile(trained.gguf)
    a = trained.trainer.args
    expected = {
        "general.architecture": "llama",
        "llama.context_length": TINY.ctx,
        "llama.embedding_length": a.n_embd,
        "llama.block_count": a.n_layer,
        "llama.feed_forward_length": a.n_ff,
        "llama.attention.head_count": a.n_head,
        "llama.attention.head_count_kv": a.n_head_kv,
        "llama.rope.dimension_count": a.head_dim,
        "llama.vocab_size": a.n_vocab,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "smollm",
    }
    assert {k: f.get(k) for k in expected} == expected
    assert f.get("llama.rope.freq_base") == pytest.approx(TINY.rope_freq_base)
    assert f.get("llama.attention.layer_norm_rms_epsilon") == pytest.approx(TINY.norm_eps)
    assert "output.weight" in f.tensors  # untied
    params = trained.trainer.model.named_gguf_parameters()
    for outtype, matrix_type in (("f16", T.F16), ("q8_0", T.Q8_0)):
        path = export_gguf(tmp_path / f"{outtype}.gguf", a, params, trained.trainer.tokenizer, outtype)
        q = GGUFFile(path).tensors
        assert q["blk.0.attn_q.weight"].qtype == matrix_type
        assert q["blk.0.ffn_down.weight"].qtype == T.F16  # rows of 176: no Q8_0 blocks
        assert q["blk.0.attn_norm.weight"].qtype == T.F32
        # the bytes are gguf-py's own quantization of the trained weight
        weight = params["blk.0.attn_q.weight"].detach().numpy()
        reference = gguf.quants.quantize(weight, matrix_type)
        assert np.array_equal(q["blk.0.attn_q.weight"].data.numpy(), reference.reshape(-1).view(np.uint8))
        tokens = held_back_tokens(trained, 32)
        logits = gguflm_logits(Model.load(path, mode="reference"), tokens)
        assert relative_error(logits, model_logits(trained, tokens)) < 2e-2


def test_tied_embeddings_train_export_and_run(tmp_path: Path) -> None:
    config = TrainConfig(**{**TINY.__dict__, "steps": 30, "tie_embeddings": True})
    result = train([GPL3], tmp_path / "tied.gguf", config, progress=False, plot=False)
    assert result.gguf is not None
    assert "output.weight" not in GGUFFile(result.gguf).tensors
    model = Model.load(result.gguf, mode="reference")
    assert model.args.tied_output
    tokens = held_back_tokens(result, 48)
    assert relative_error(gguflm_logits(model, tokens), model_logits(result, tokens)) < 1e-4


def test_ctrl_c_saves_a_checkpoint_that_resumes_bit_for_bit(tmp_path: Path) -> None:
    config = TrainConfig(**{**TINY.__dict__, "steps": 12, "eval_every": 4, "ctx": 32, "batch": 4})
    whole = train([GPL3], tmp_path / "whole.gguf", config, progress=False, plot=False)

    def ctrl_c(step: int) -> None:
        if step == 5:
            os.kill(os.getpid(), signal.SIGINT)

    stopped = train([GPL3], tmp_path / "part.gguf", config, progress=False, plot=False, on_step=ctrl_c)
    assert not stopped.finished and stopped.gguf is None and stopped.trainer.step == 5
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back
    resumed = train([GPL3], tmp_path / "part.gguf", resume=stopped.checkpoint, progress=False, plot=False)
    assert resumed.finished and resumed.trainer.step == 12
    assert resumed.history.train == whole.history.train
    assert resumed.history.val == whole.history.val
    assert resumed.history.grad_norm == whole.history.grad_norm
    ours = resumed.trainer.model.named_gguf_parameters()
    for name, p in whole.trainer.model.named_gguf_parameters().items():
        assert torch.equal(p, ours[name]), name
    # resuming on other data is refused
    with pytest.raises(ValueError, match="data differs"):
        train([GPL2], tmp_path / "x.gguf", resume=stopped.checkpoint, progress=False)


_LLAMA_CPP_SCRIPT = textwrap.dedent(
    """
    import json, math, sys
    import numpy as np
    import llama_cpp

    path, n_ctx, prompt, n_gen = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3]), int(sys.argv[4])
    tokens = json.loads(sys.stdin.read())
    llm = llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, verbose=False,
                          n_threads=1)
    out = list(prompt)
    llm.eval(prompt)
    for _ in range(n_gen):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval(out[-1:])
    # llama-perplexity's protocol: chunks of n_ctx, BOS first, second half scored
    bos, first, nll, count = llm.token_bos(), n_ctx // 2, 0.0, 0
    for i in range(len(tokens) // n_ctx):
        chunk = [bos, *tokens[i * n_ctx + 1 : (i + 1) * n_ctx]]
        llm.reset()
        llm.eval(chunk)
        logits = np.asarray(llm.scores[: n_ctx], dtype=np.float64)
        for j in range(first, n_ctx - 1):
            row = logits[j]
            top = row.max()
            nll += top + math.log(np.exp(row - top).sum()) - row[tokens[i * n_ctx + j + 1]]
            count += 1
    print(json.dumps({"greedy": out[len(prompt):], "ppl": math.exp(nll / count)}))
    """
)


def test_llama_cpp_runs_the_exported_file(trained: TrainResult) -> None:
    """llama.cpp (llama-cpp-python, when installed at /tmp/lcpvenv) loads the file: the same greedy
    tokens and the same perplexity on the held-back text as gguflm."""
    if not LLAMA_CPP_PYTHON.exists():
        pytest.skip(f"llama-cpp-python is not installed at {LLAMA_CPP_PYTHON}: llama.cpp comparison skipped")
    assert trained.gguf is not None
    n_ctx, n_gen = TINY.ctx, 24
    model = Model.load(trained.gguf, mode="reference")
    prompt = model.tokenizer.encode("This License")
    tokens = trained.trainer.corpus.val_ids[: 8 * n_ctx].tolist()  # 8 chunks
    proc = subprocess.run(
        [str(LLAMA_CPP_PYTHON), "-c", _LLAMA_CPP_SCRIPT, str(trained.gguf), str(n_ctx), json.dumps(prompt),
         str(n_gen)],
        input=json.dumps(tokens), capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    theirs = json.loads(proc.stdout)
    ctx = Context(model, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx)
    greedy = list(prompt)
    assert ctx.decode(Batch.from_tokens(prompt)) == 0
    for _ in range(n_gen):
        greedy.append(int(ctx.logits(-1).argmax()))
        assert ctx.decode(Batch.from_tokens(greedy[-1:])) == 0
    assert greedy[len(prompt) :] == theirs["greedy"]
    *_, last = perplexity(ctx, tokens, n_ctx, model.tokenizer.bos_id)
    ppl, _ = last.final()
    assert ppl == pytest.approx(theirs["ppl"], rel=1e-3)


def test_cli_reports_bad_input_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--data", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "m.gguf")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: cannot read") and err.count("\n") == 1
    short = tmp_path / "short.txt"
    short.write_text("one line\ntwo lines\n")
    assert main(["train", "--data", str(short), "--ctx", "64", "--out", str(tmp_path / "m.gguf")]) == 1
    assert "fewer than one window" in capsys.readouterr().err
    assert (
        main(["train", "--data", str(GPL3), "--resume", str(short), "--out", str(tmp_path / "m.gguf")]) == 1
    )
    assert "not a gguflm training checkpoint" in capsys.readouterr().err
    assert main(["train", "--data", str(GPL3), "--n-head", "3", "--out", str(tmp_path / "m.gguf")]) == 1
    assert "error:" in capsys.readouterr().err


def test_validation_holds_back_the_tail_of_every_file(tmp_path: Path) -> None:
    from gguflm.train.loop import Corpus
    from gguflm.train.run import read_data

    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("".join(f"a{i}\n" for i in range(10)))
    b.write_text("".join(f"b{i}\n" for i in range(20)))
    (tmp_path / "link.txt").symlink_to(a)
    texts = read_data([a, b, tmp_path / "link.txt"])  # the link names a file already read
    assert len(texts) == 2
    train_text, val_lines = Corpus.split(texts, 0.1)
    assert val_lines == ["a9\n", "b18\n", "b19\n"]
    assert "a8\n" in train_text and "a9" not in train_text and "b18" not in train_text
