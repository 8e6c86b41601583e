"""SmolLM2-135M quantized by `gguflm quantize` to each type: size, time, perplexity in gguflm and llama.cpp.

There is no Hugging Face checkpoint here: the shipped Q4_1 file is first turned into F32
(`gguflm quantize ... F32`, a dequantization), and every type is made from that F32 file.
Perplexity follows llama-perplexity (GPL-3, -c 512, BOS first, each chunk scored on its second half)
over the first --chunks chunks, the same token ids in both engines; llama.cpp runs in a child
process of /tmp/lcpvenv/bin/python (llama-cpp-python), on the very file gguflm wrote.

    python benchmarks/quantize_table.py [--chunks 4] [--types Q8_0,Q4_K_M,...] [--imatrix-types Q4_K_M,Q2_K]

With --imatrix-types, an importance matrix is collected by `gguflm imatrix` on other text (the
Apache-2.0 and MPL-2.0 licence texts, not GPL-3) and those types are made again with it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

GPL3 = Path("/usr/share/common-licenses/GPL-3")
CALIBRATION = [Path("/usr/share/common-licenses/Apache-2.0"), Path("/usr/share/common-licenses/MPL-2.0")]
LCP_PYTHON = Path("/tmp/lcpvenv/bin/python")
TYPES = "F32,Q8_0,Q6_K,Q5_K_M,Q5_K_S,Q5_1,Q5_0,Q4_K_M,Q4_K_S,Q4_1,Q4_0,Q3_K_L,Q3_K_M,Q3_K_S,Q2_K"

LLAMA_CHILD = r"""
import json, sys, numpy as np, llama_cpp as lc
path, tokens_file, n_ctx = sys.argv[1], sys.argv[2], int(sys.argv[3])
tokens = json.load(open(tokens_file))
lc.llama_backend_init()
model = lc.llama_model_load_from_file(path.encode(), lc.llama_model_default_params())
n_vocab = int(lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(model)))
p = lc.llama_context_default_params()
p.n_ctx = p.n_batch = p.n_ubatch = n_ctx
p.n_threads = p.n_threads_batch = 2
ctx = lc.llama_init_from_model(model, p)
batch = lc.llama_batch_init(n_ctx, 0, 1)
nll, count, first = 0.0, 0, n_ctx // 2
for chunk in tokens:
    lc.llama_memory_clear(lc.llama_get_memory(ctx), True)
    for i, t in enumerate(chunk):
        batch.token[i], batch.pos[i], batch.n_seq_id[i] = t, i, 1
        batch.seq_id[i][0] = 0
        batch.logits[i] = 1 if first <= i < n_ctx - 1 else 0
    batch.n_tokens = len(chunk)
    assert lc.llama_decode(ctx, batch) == 0
    for i in range(first, n_ctx - 1):
        row = np.ctypeslib.as_array(lc.llama_get_logits_ith(ctx, i), shape=(n_vocab,)).astype(np.float64)
        m = row.max()
        nll -= row[chunk[i + 1]] - m - np.log(np.exp(row - m).sum())
        count += 1
print(json.dumps({"ppl": float(np.exp(nll / count))}))
"""


def gguflm(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"))
    return subprocess.run(
        [sys.executable, "-m", "gguflm", *args], env=env, capture_output=True, text=True, check=True
    )


def chunks(model: Path, n_chunks: int, n_ctx: int) -> list[list[int]]:
    """GPL-3's tokens in chunks of n_ctx, BOS first, as llama-perplexity cuts them (gguflm's tokenizer,
    which the tests hold equal to llama.cpp's)."""
    from gguflm.gguf_file import GGUFFile
    from gguflm.tokenizer import Tokenizer

    tok = Tokenizer.from_metadata(GGUFFile(model).metadata, str(model))
    ids = tok.encode(GPL3.read_text(), add_special=True, parse_special=False)
    out = []
    for i in range(min(n_chunks, len(ids) // n_ctx)):
        chunk = ids[i * n_ctx : (i + 1) * n_ctx]
        out.append([tok.bos_id, *chunk[1:]] if tok.add_bos else chunk)
    return out


def gguflm_ppl(model: Path, token_chunks: list[list[int]], n_ctx: int, n_ubatch: int) -> float:
    from gguflm.context import Context
    from gguflm.model import Model
    from gguflm.perplexity import chunk_logits

    m = Model.load(model)
    ctx = Context(m, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ubatch)
    nll, count, first = 0.0, 0, n_ctx // 2
    for chunk in token_chunks:
        import torch

        logits = chunk_logits(ctx, chunk, first).double()
        targets = torch.tensor(chunk[first + 1 :])
        nll -= float(torch.log_softmax(logits, dim=-1).gather(1, targets[:, None]).sum())
        count += len(targets)
    return math.exp(nll / count)


def llama_ppl(model: Path, tokens_file: Path, n_ctx: int) -> float | None:
    if not LCP_PYTHON.exists():
        return None
    done = subprocess.run(
        [str(LCP_PYTHON), "-c", LLAMA_CHILD, str(model), str(tokens_file), str(n_ctx)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        print(done.stderr[-1500:], file=sys.stderr)
        return None
    return float(json.loads(done.stdout.strip().splitlines()[-1])["ppl"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--types", default=TYPES)
    ap.add_argument("--imatrix-types", default="")
    ap.add_argument("--workdir", default="/tmp/gguflm-quantize-table")
    ap.add_argument(
        "--ubatch",
        type=int,
        default=512,
        help="gguflm's micro-batch: 512 runs the prefill path (weights dequantized); 64 or fewer rows run the"
        " native kernels, which round activations to 8 bits inside each product as llama.cpp does",
    )
    a = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from gguflm.paths import default_model_path

    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    shipped = default_model_path()
    f32 = work / "smollm2-f32.gguf"
    if not f32.exists():
        gguflm("quantize", str(shipped), str(f32), "F32")
    n_ctx = 512
    token_chunks = chunks(f32, a.chunks, n_ctx)
    tokens_file = work / "gpl3-chunks.json"
    tokens_file.write_text(json.dumps(token_chunks))
    jobs = [(t, None) for t in a.types.split(",") if t]
    imatrix = None
    if a.imatrix_types:
        calib = work / "calibration.txt"
        calib.write_text("\n\n".join(p.read_text() for p in CALIBRATION))
        imatrix = work / "imatrix.gguf"
        if not imatrix.exists():  # kept between runs: it takes minutes on 2 shared cores
            t0 = time.perf_counter()
            gguflm("imatrix", "-m", str(f32), "-f", str(calib), "-o", str(imatrix), "-c", "512")
            print(
                f"imatrix: {time.perf_counter() - t0:.1f} s on {calib.stat().st_size} bytes", file=sys.stderr
            )
        jobs += [(t, imatrix) for t in a.imatrix_types.split(",") if t]
    print(
        f"SmolLM2-135M-Instruct (F32 dequantized from the shipped Q4_1), GPL-3 -c {n_ctx}, first {len(token_chunks)} chunks,"
        f" gguflm micro-batches of {a.ubatch}\n"
    )
    print("| type | imatrix | size MiB | quantize s | PPL gguflm | PPL llama.cpp | gguflm / llama.cpp |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for type_name, im in jobs:
        out = f32 if type_name == "F32" else work / f"smollm2-{type_name}{'-imatrix' if im else ''}.gguf"
        seconds = 0.0
        if type_name != "F32":
            t0 = time.perf_counter()
            gguflm("quantize", str(f32), str(out), type_name, *(["--imatrix", str(im)] if im else []))
            seconds = time.perf_counter() - t0
        ours = gguflm_ppl(out, token_chunks, n_ctx, a.ubatch)
        theirs = llama_ppl(out, tokens_file, n_ctx)
        ratio = f"{ours / theirs:.4f}" if theirs else "-"
        print(
            f"| {type_name} | {'yes' if im else 'no'} | {out.stat().st_size / 2**20:.1f} | "
            f"{seconds:.1f} | {ours:.4f} | {theirs:.4f} | {ratio} |"
            if theirs
            else f"| {type_name} | {'yes' if im else 'no'} | {out.stat().st_size / 2**20:.1f} | {seconds:.1f} | {ours:.4f} | - | - |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
