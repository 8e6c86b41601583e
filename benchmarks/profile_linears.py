"""Where gguflm's time goes: each linear layer timed in place, inside real decodes.

    python benchmarks/profile_linears.py [-m MODEL] [-t 2] [--npl 16] [-p 512]

For tg (one sequence, one token a step), decode with --npl sequences, and a prefill of -p tokens, it
prints the time per step and how much of it each weight matrix (by shape) takes, summed over the
layers. The rest of the step is attention, norms, RoPE, casts and bookkeeping. Timing wraps
`QuantizedLinear.mm`, which adds about a microsecond per call. Run it on an idle machine.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from collections.abc import Callable

import torch

from gguflm import Batch, Context, Model
from gguflm.cli import default_model_path
from gguflm.quants import QuantizedLinear

spent: defaultdict[tuple[int, int], float] = defaultdict(float)
_mm = QuantizedLinear.mm


def _timed_mm(self: QuantizedLinear, x2: torch.Tensor) -> torch.Tensor:
    t0 = time.perf_counter()
    y = _mm(self, x2)
    spent[(self.out_features, self.in_features)] += time.perf_counter() - t0
    return y


def profile(name: str, setup: Callable[[], None], run: Callable[[], int], repeats: int = 3) -> None:
    """After setup() (untimed), run() does the work and returns how many steps it took; the fastest
    repeat is reported."""
    setup()
    run()
    best: tuple[float, dict[tuple[int, int], float]] | None = None
    for _ in range(repeats):
        setup()
        spent.clear()
        t0 = time.perf_counter()
        steps = run()
        per_step = (time.perf_counter() - t0) / steps
        if best is None or per_step < best[0]:
            best = (per_step, {k: v / steps for k, v in spent.items()})
    assert best is not None
    per_step, shares = best
    print(f"\n{name}: {per_step * 1e3:.2f} ms per step")
    for (n_out, n_in), s in sorted(shares.items(), key=lambda kv: -kv[1]):
        print(f"  {n_out:>6} x {n_in:<5} {s * 1e3:7.2f} ms  {100 * s / per_step:5.1f}%")
    linear = sum(shares.values())
    print(f"  {'other':<14} {(per_step - linear) * 1e3:7.2f} ms  {100 * (1 - linear / per_step):5.1f}%")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-m", "--model", default=None)
    parser.add_argument("-t", "--threads", type=int, default=2)
    parser.add_argument("--npl", type=int, default=16, help="parallel sequences (0: skip that profile)")
    parser.add_argument("-p", "--n-prompt", type=int, default=512)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = Model.load(args.model or default_model_path())
    QuantizedLinear.mm = _timed_mm  # type: ignore[method-assign]
    prompt = list(range(100, 116))

    single = Context(model, n_ctx=max(args.n_prompt, 256))

    def tg_prompt() -> None:
        single.kv.clear()
        single.decode(Batch.from_tokens(prompt))

    def tg() -> int:
        for _ in range(64):
            single.decode(Batch.from_tokens([int(single.logits(-1).argmax())]))
        return 64

    tokens = torch.randint(0, model.n_vocab, (args.n_prompt,), generator=torch.Generator().manual_seed(0))

    def pp() -> int:
        single.decode(Batch.from_tokens(tokens.tolist()))
        return 1

    profile("tg (one token a step)", tg_prompt, tg)
    profile(f"pp{args.n_prompt} (one prefill a step)", single.kv.clear, pp)
    n = args.npl
    if n < 1:  # --npl 0: no parallel decode
        return
    parallel = Context(model, n_ctx=len(prompt) + 64 * n, n_batch=max(n, len(prompt)), n_seq_max=n)

    def shared_prompt() -> None:
        parallel.kv.clear()
        parallel.decode(Batch.from_tokens(prompt))
        for s in range(1, n):
            parallel.kv.seq_cp(0, s)

    def npl() -> int:
        step = [prompt[-1]] * n
        for _ in range(32):
            parallel.decode(Batch.from_tokens(step, seq_ids=[[s] for s in range(n)], output=[True] * n))
            step = parallel.all_logits().argmax(-1).tolist()
        return 32

    profile(f"decode x{n} (one token per sequence a step)", shared_prompt, npl)


if __name__ == "__main__":
    main()
