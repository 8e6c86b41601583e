"""Choosing the next token: llama.cpp's sampler chain, as small functions over a candidate set.

The chain follows `common_sampler_init` in llama.cpp's common/sampling.cpp: logit bias first, then
the configurable stages (default order: penalties, dry, top_n_sigma, top_k, typ_p, top_p, min_p, xtc,
temperature), then a seeded random draw (`dist`). Mirostat, when enabled, replaces everything after
the logit bias with temperature + mirostat, as llama.cpp does. A temperature <= 0 makes the last step
greedy (argmax of what the chain left), whatever the other settings.

Each stage is a function `Candidates -> Candidates` (plus the state llama.cpp gives it: the token
history for penalties and DRY, a random generator for XTC). `Candidates` is llama.cpp's
`llama_token_data_array`: token ids with their logits and a "sorted" flag. It starts as the whole
vocabulary (ids implicit) and shrinks as truncating stages cut it, so the stages after top-k work on
40 tokens instead of 49152 and no stage sorts the whole vocabulary in the default chain.

The work is done in numpy on the CPU: at this size numpy's single-threaded kernels take a few
microseconds, while torch's multi-threaded ones can stall for milliseconds when the cores are busy.
The default chain takes about 0.1 ms per token for a 49152-token vocabulary on 2 cores.
"""

from __future__ import annotations

import math
import secrets
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

DEFAULT_SEED = 0xFFFFFFFF  # llama.cpp's LLAMA_DEFAULT_SEED: draw a random seed
NEG_INF = float("-inf")

# llama.cpp's canonical sampler names (common_sampler_type_to_str), default order, and --sampling-seq letters
DEFAULT_SAMPLERS = (
    "penalties",
    "dry",
    "top_n_sigma",
    "top_k",
    "typ_p",
    "top_p",
    "min_p",
    "xtc",
    "temperature",
)
SAMPLER_LETTERS = {
    "e": "penalties",
    "d": "dry",
    "s": "top_n_sigma",
    "k": "top_k",
    "y": "typ_p",
    "p": "top_p",
    "m": "min_p",
    "x": "xtc",
    "t": "temperature",
}
_ALT_NAMES = {
    "top-k": "top_k",
    "top-p": "top_p",
    "nucleus": "top_p",
    "top-n-sigma": "top_n_sigma",
    "typical-p": "typ_p",
    "typical": "typ_p",
    "typ-p": "typ_p",
    "typ": "typ_p",
    "min-p": "min_p",
    "temp": "temperature",
}
_UNSUPPORTED = {"infill", "adaptive_p", "adaptive-p", "i", "a"}
DEFAULT_DRY_BREAKERS = ("\n", ":", '"', "*")


# ---- order parsing ----------------------------------------------------------------------------------


def canonical_sampler_name(name: str) -> str:
    """llama.cpp's canonical name for a sampler name or alias ("top-k" -> "top_k"); ValueError if unknown."""
    if name in DEFAULT_SAMPLERS:
        return name
    if name in _ALT_NAMES:
        return _ALT_NAMES[name]
    if name in _UNSUPPORTED:
        raise ValueError(f"sampler {name!r} is not supported by gguflm")
    known = ", ".join(DEFAULT_SAMPLERS)
    raise ValueError(f"unknown sampler {name!r}; known samplers: {known}")


def parse_samplers(text: str) -> list[str]:
    """Parse llama.cpp's `--samplers "penalties;dry;top_k;..."` or `--sampling-seq "edskypmxt"`.

    Names are separated by ';' (aliases such as "top-k", "nucleus", "temp" accepted). A string
    without ';' that is not itself a sampler name is read as letters (e d s k y p m x t).
    """
    text = text.strip()
    if not text:
        raise ValueError("empty sampler list")
    if ";" in text or text in DEFAULT_SAMPLERS or text in _ALT_NAMES or text in _UNSUPPORTED:
        return [canonical_sampler_name(name.strip()) for name in text.split(";") if name.strip()]
    out = []
    for letter in text:
        if letter not in SAMPLER_LETTERS:
            if letter in _UNSUPPORTED:
                raise ValueError(f"sampler letter {letter!r} is not supported by gguflm")
            raise ValueError(
                f"unknown sampler letter {letter!r} in {text!r}; letters: {''.join(SAMPLER_LETTERS)}"
            )
        out.append(SAMPLER_LETTERS[letter])
    return out


def samplers_to_letters(samplers: Iterable[str]) -> str:
    """The `--sampling-seq` string of a sampler list (the inverse of the letter form of parse_samplers)."""
    by_name = {name: letter for letter, name in SAMPLER_LETTERS.items()}
    return "".join(by_name[canonical_sampler_name(s)] for s in samplers)


# ---- parameters ---------------------------------------------------------------------------------------


def _integer(name: str, value: object, lo: int, hi: int | None = None) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < lo or (hi is not None and value > hi):
        bounds = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{name} must be an integer {bounds}, got {value!r}")


def _number(
    name: str, value: object, lo: float = -math.inf, hi: float = math.inf, open_low: bool = False
) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not ((value > lo if open_low else value >= lo) and value <= hi):  # type: ignore[operator]
        bounds = (
            "finite"
            if lo == -math.inf
            else f"in {'(' if open_low else '['}{lo}, {hi}{']' if hi < math.inf else ')'}"
        )
        raise ValueError(f"{name} must be a number {bounds}, got {value!r}")


@dataclass
class SamplerParams:
    """llama.cpp's `common_params_sampling`: same names, same defaults, same disabled values."""

    seed: int = DEFAULT_SEED
    temp: float = 0.8  # <= 0: greedy
    dynatemp_range: float = 0.0  # 0: off; else temperature in [temp - range, temp + range] by entropy
    dynatemp_exponent: float = 1.0
    top_k: int = 40  # 0 or -1: off
    top_p: float = 0.95  # 1: off
    min_p: float = 0.05  # 0: off
    typ_p: float = 1.0  # 1: off
    top_n_sigma: float = -1.0  # <= 0: off
    xtc_probability: float = 0.0  # 0: off
    xtc_threshold: float = 0.1  # > 0.5: off
    min_keep: int = 0  # truncating samplers keep at least this many tokens
    penalty_last_n: int = 64  # 0: off, -1: the context size
    penalty_repeat: float = 1.0  # 1: off
    penalty_freq: float = 0.0
    penalty_present: float = 0.0
    dry_multiplier: float = 0.0  # 0: off
    dry_base: float = 1.75
    dry_allowed_length: int = 2
    dry_penalty_last_n: int = -1  # 0: off, -1: the context size
    dry_sequence_breakers: tuple[str, ...] = DEFAULT_DRY_BREAKERS
    mirostat: int = 0  # 0: off, 1: mirostat, 2: mirostat 2.0
    mirostat_tau: float = 5.0
    mirostat_eta: float = 0.1
    logit_bias: dict[int, float] = field(default_factory=dict)
    samplers: list[str] = field(default_factory=lambda: list(DEFAULT_SAMPLERS))

    def __post_init__(self) -> None:
        self.samplers = [canonical_sampler_name(s) for s in self.samplers]
        self.dry_sequence_breakers = tuple(self.dry_sequence_breakers)
        if self.seed == -1:  # llama.cpp's command line and llama-cpp-python spell "random" -1
            self.seed = DEFAULT_SEED
        _integer("seed", self.seed, 0, DEFAULT_SEED)
        _integer("top_k", self.top_k, -1)  # 0 and -1: off
        _integer("min_keep", self.min_keep, 0)
        _integer("penalty_last_n", self.penalty_last_n, -1)
        _integer("dry_allowed_length", self.dry_allowed_length, 0)
        _integer("dry_penalty_last_n", self.dry_penalty_last_n, -1)
        _integer("mirostat", self.mirostat, 0, 2)
        _number("top_p", self.top_p, 0, 1, open_low=True)
        _number("typ_p", self.typ_p, 0, 1, open_low=True)
        _number("min_p", self.min_p, 0, 1)
        _number("xtc_probability", self.xtc_probability, 0, 1)
        _number("xtc_threshold", self.xtc_threshold, 0, 1)
        _number("dynatemp_range", self.dynatemp_range, 0)
        _number("penalty_repeat", self.penalty_repeat, 0, open_low=True)
        _number("dry_multiplier", self.dry_multiplier, 0)
        _number("dry_base", self.dry_base, 0, open_low=True)
        _number("mirostat_eta", self.mirostat_eta, 0)
        for name in (
            "temp",
            "dynatemp_exponent",
            "top_n_sigma",
            "penalty_freq",
            "penalty_present",
            "mirostat_tau",
        ):
            _number(name, getattr(self, name))
        for tid, bias in self.logit_bias.items():
            _integer("a logit_bias token id", tid, 0)
            if not isinstance(bias, int | float) or math.isnan(bias):
                raise ValueError(f"logit_bias for token {tid} must be a number (or -inf), got {bias!r}")

    @property
    def dry_enabled(self) -> bool:
        """llama.cpp's test for DRY being active (multiplier, base and window all meaningful)."""
        return self.dry_multiplier != 0.0 and self.dry_base >= 1.0 and self.dry_penalty_last_n != 0


# ---- the candidate set ----------------------------------------------------------------------------


def _as_logits(logits: torch.Tensor | np.ndarray | Sequence[float]) -> np.ndarray:
    """(n_vocab,) logits of any dtype/device -> a float32 numpy view (no copy for CPU float32)."""
    if isinstance(logits, torch.Tensor):
        arr = logits.detach().to("cpu", torch.float32).numpy()
    else:
        arr = np.asarray(logits, dtype=np.float32)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"expected a non-empty 1-D logits vector, got shape {tuple(arr.shape)}")
    return arr


@dataclass(frozen=True, slots=True)
class Candidates:
    """Token ids with their logits (llama.cpp's llama_token_data_array); stages never mutate one.

    `ids` None means the whole vocabulary in id order (saves building an arange each token);
    `sorted` means logits are in descending order, so stages can skip their own sort.
    """

    logits: np.ndarray  # (n,) float32
    ids: np.ndarray | None = None  # (n,) int64 token ids, or None for 0..n-1
    sorted: bool = False

    @classmethod
    def from_logits(cls, logits: torch.Tensor | np.ndarray | Sequence[float]) -> Candidates:
        return cls(_as_logits(logits))

    def __len__(self) -> int:
        return int(self.logits.shape[0])

    def token_ids(self) -> np.ndarray:
        return np.arange(len(self), dtype=np.int64) if self.ids is None else self.ids

    def token_at(self, i: int) -> int:
        return int(i) if self.ids is None else int(self.ids[i])

    def take(self, index: np.ndarray | slice, sorted: bool = False) -> Candidates:
        """The candidates at `index` (positions, boolean mask or slice); `sorted` says the result is."""
        ids = np.arange(len(self), dtype=np.int64)[index] if self.ids is None else self.ids[index]
        return Candidates(self.logits[index], ids, sorted)

    def with_logits(self, logits: np.ndarray, sorted: bool = False) -> Candidates:
        return Candidates(logits.astype(np.float32, copy=False), self.ids, sorted)

    def probs(self) -> np.ndarray:
        """Softmax of the logits, float32 like llama.cpp's llama_sampler_softmax_impl."""
        e = np.exp(self.logits - self.logits.max())
        return e / e.sum(dtype=np.float32)


def _top_positions(logits: np.ndarray, k: int) -> np.ndarray:
    """Positions of the k largest logits, largest first, without sorting the rest (ties in any order)."""
    n = logits.shape[0]
    if k >= n:
        return np.argsort(-logits)
    part = np.argpartition(logits, n - k)[n - k :]
    return part[np.argsort(-logits[part])]


def _locate(cand: Candidates, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where the (distinct) `tokens` sit in `cand`: (positions in cand, matching indices into tokens)."""
    if cand.ids is None:
        inside = np.flatnonzero((tokens >= 0) & (tokens < len(cand)))
        return tokens[inside], inside
    order = np.argsort(tokens)
    keys = tokens[order]
    pos = np.minimum(np.searchsorted(keys, cand.ids), keys.shape[0] - 1)
    hit = np.flatnonzero(keys[pos] == cand.ids)
    return hit, order[pos[hit]]


def _add_to_tokens(cand: Candidates, tokens: np.ndarray, delta: np.ndarray) -> Candidates:
    """Add delta[j] to the logit of tokens[j] wherever it is a candidate."""
    pos, which = _locate(cand, tokens)
    if pos.size == 0:
        return cand
    out = cand.logits.copy()
    out[pos] += delta[which].astype(np.float32)
    return cand.with_logits(out)


# ---- logit-changing stages ------------------------------------------------------------------------


def logit_bias(cand: Candidates, bias: Mapping[int, float]) -> Candidates:
    """Add a fixed bias to chosen tokens' logits (llama_sampler_init_logit_bias); -inf bans a token."""
    if not bias:
        return cand
    tokens = np.fromiter(bias.keys(), np.int64, len(bias))
    values = np.fromiter(bias.values(), np.float32, len(bias))
    return _add_to_tokens(cand, tokens, values)


def penalties(
    cand: Candidates, counts: Mapping[int, int], repeat: float = 1.0, freq: float = 0.0, present: float = 0.0
) -> Candidates:
    """Repeat / frequency / presence penalties for tokens seen in the recent history (counts by id).

    As llama.cpp: a repeated token's positive logit is divided by `repeat`, a negative one multiplied
    (dividing would make it more likely), then `count * freq + present` is subtracted.
    """
    if not counts or (repeat == 1.0 and freq == 0.0 and present == 0.0):
        return cand
    tokens = np.fromiter(counts.keys(), np.int64, len(counts))
    n = np.fromiter(counts.values(), np.float32, len(counts))
    pos, which = _locate(cand, tokens)
    if pos.size == 0:
        return cand
    logit = cand.logits[pos]
    logit = np.where(logit <= 0, logit * np.float32(repeat), logit / np.float32(repeat))
    c = n[which]
    logit = logit - (c * np.float32(freq) + (c > 0).astype(np.float32) * np.float32(present))
    out = cand.logits.copy()
    out[pos] = logit
    return cand.with_logits(out)


Breakers = Mapping[int, Sequence[Sequence[int]]]  # head token -> tails of the sequence breakers it starts


def dry_repeat_lengths(history: Sequence[int], allowed_length: int, breakers: Breakers) -> dict[int, int]:
    """DRY steps 1-3: for each token that would extend a repeat of the history's end, the longest repeat.

    A repeat cannot reach back past the latest sequence breaker. Uses llama.cpp's reversed
    Z-algorithm (from koboldcpp), including its clamping of lengths to the breaker limit.
    """
    n = len(history)
    if n <= allowed_length:
        return {}
    rev = list(history)[::-1]  # rev[i]: i tokens back from the end

    rep_limit = n
    for i, token in enumerate(rev):
        tails = breakers.get(token)
        if not tails:
            continue
        longest = -1
        for tail in tails:
            length = len(tail)
            if longest < length <= i and all(tail[o] == rev[i - o - 1] for o in range(length)):
                longest = length
        if longest >= 0:
            rep_limit = i - longest
            break
    if rep_limit < allowed_length:
        return {}

    counts = [0] * n  # counts[n-1-k]: length of the suffix that also ends k tokens back
    last = n - 1
    lt = rt = 0
    for k in range(1, n):
        if k > rt:
            m = 0
            while m + k < n and rev[m] == rev[m + k]:
                m += 1
            counts[last - k] = min(m, rep_limit)
            if m > 0:
                lt, rt = k, k + m - 1
        else:
            p = k - lt
            right_len = rt - k + 1
            if counts[last - p] < right_len:
                counts[last - k] = min(counts[last - p], rep_limit)
            else:
                i = rt + 1
                while i < n and rev[i] == rev[i - k]:
                    i += 1
                counts[last - k] = min(i - k, rep_limit)
                lt, rt = k, i - 1

    longest_by_token: dict[int, int] = {}
    for i in range(n - 1):
        length = counts[i]
        if length >= allowed_length:
            token = rev[n - 2 - i]  # the token that followed the earlier occurrence
            if longest_by_token.get(token, -1) < length:
                longest_by_token[token] = length
    return longest_by_token


def dry(
    cand: Candidates,
    history: Sequence[int],
    multiplier: float,
    base: float = 1.75,
    allowed_length: int = 2,
    breakers: Breakers | None = None,
) -> Candidates:
    """DRY ("don't repeat yourself"): penalize tokens that would extend a repeated sequence.

    Penalty = multiplier * base ** (repeat length - allowed_length), subtracted from the logit;
    `history` is the last dry_penalty_last_n tokens, oldest first. Single-token breakers are never
    penalized. As llama.cpp's llama_sampler_dry_apply.
    """
    if multiplier == 0.0 or base < 1.0:
        return cand
    breakers = breakers or {}
    lengths = dry_repeat_lengths(history, allowed_length, breakers)
    if not lengths:
        return cand
    # cap the exponent so that base ** exponent stays finite in float32
    max_exponent = int(88.7228391 / math.log(base)) if base > 1.000001 else 0
    tokens, penalty = [], []
    for token, length in lengths.items():
        if any(len(tail) == 0 for tail in breakers.get(token, ())):
            continue
        exponent = length - allowed_length
        if max_exponent > 0:
            exponent = min(exponent, max_exponent)
        tokens.append(token)
        penalty.append(-multiplier * base**exponent)
    if not tokens:
        return cand
    return _add_to_tokens(cand, np.array(tokens, np.int64), np.array(penalty, np.float64))


class VocabLike(Protocol):
    """What DRY needs from a tokenizer to turn breaker strings into token sequences."""

    @property
    def n_vocab(self) -> int: ...

    def decode_bytes(self, ids: Iterable[int], special: bool = False) -> bytes: ...

    def encode(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]: ...


def dry_breaker_sequences(
    breakers: Iterable[str], vocab: VocabLike, max_chars: int = 40, max_tail: int = 20
) -> dict[int, list[tuple[int, ...]]]:
    """Sequence-breaker strings -> {head token: [tail token sequences]} (llama.cpp's DRY init).

    A token whose text contains a breaker is a single-token breaker (empty tail); a token whose text
    ends with the start of a breaker heads a sequence whose tail is the tokenized rest of it.
    Scans the whole vocabulary once per call, so build it once per tokenizer and settings.
    """
    pieces = [vocab.decode_bytes([tid], special=True) for tid in range(vocab.n_vocab)]
    out: dict[int, list[tuple[int, ...]]] = {}

    def add(tid: int, tail: tuple[int, ...]) -> None:
        tails = out.setdefault(tid, [])
        if tail not in tails:
            tails.append(tail)

    for text in breakers:
        target = text.encode("utf-8")[:max_chars]
        if not target:
            continue
        first = target[:1]
        for tid, word in enumerate(pieces):
            if target in word:
                add(tid, ())
                continue
            pos = word.find(first)
            while pos != -1:
                rest = word[pos:]  # shorter than target, since target is not in word
                if target.startswith(rest):
                    tail_text = target[len(rest) :].decode("utf-8", "replace")
                    add(
                        tid, tuple(vocab.encode(tail_text, add_special=False, parse_special=False)[:max_tail])
                    )
                pos = word.find(first, pos + 1)
    return out


# ---- truncating stages ------------------------------------------------------------------------------


def top_k(cand: Candidates, k: int) -> Candidates:
    """Keep the k highest logits, sorted (k <= 0: off). As llama.cpp, k >= n keeps everything."""
    if k <= 0 or k >= len(cand):
        return cand
    if cand.sorted:
        return cand.take(slice(0, k), sorted=True)
    return cand.take(_top_positions(cand.logits, k), sorted=True)


def top_p(cand: Candidates, p: float, min_keep: int = 0) -> Candidates:
    """Nucleus: keep the most likely tokens until their probability reaches p (at least min_keep).

    The token that makes the sum reach p is kept. Unsorted input tries the top 256, then the top
    4096, and sorts everything only when those do not reach p (llama.cpp stops at 256).
    """
    if p >= 1.0:
        return cand
    probs = cand.probs()
    n = len(cand)

    def cut(order: np.ndarray) -> int | None:
        """Number of tokens to keep from `order`, or None if its mass never reaches p."""
        cum = np.cumsum(probs[order])
        ok = cum >= np.float32(p)
        ok[: max(min_keep - 1, 0)] = False
        return int(np.argmax(ok)) + 1 if ok.any() else None

    if cand.sorted:
        keep = cut(np.arange(n))
        return cand.take(slice(0, n if keep is None else keep), sorted=True)
    for size in (256, 4096, n):  # partial sorts first: the nucleus is usually small
        if size < n and n <= 4 * size:
            continue
        order = _top_positions(cand.logits, size)
        keep = cut(order)
        if keep is not None or size >= n:
            break
    return cand.take(order[: n if keep is None else keep], sorted=True)


def min_p(cand: Candidates, p: float, min_keep: int = 0) -> Candidates:
    """Keep tokens whose probability is at least p times the most likely token's (llama.cpp min-p)."""
    if p <= 0.0 or len(cand) == 0:
        return cand
    keep = cand.logits >= cand.logits.max() + np.float32(math.log(p))
    n_keep = int(keep.sum())
    if n_keep >= max(min_keep, 1):
        return cand if n_keep == len(cand) else cand.take(keep, sorted=cand.sorted)
    return top_k(cand, max(min_keep, 1))


def typical(cand: Candidates, p: float, min_keep: int = 0) -> Candidates:
    """Locally typical sampling: keep the tokens whose surprise is closest to the entropy, up to mass p.

    The result is in typicality order, not logit order, as in llama.cpp.
    """
    if p >= 1.0:
        return cand
    probs = cand.probs()
    with np.errstate(divide="ignore"):
        logp = np.log(probs)
    nonzero = probs > 0
    entropy = -np.sum(probs[nonzero] * logp[nonzero], dtype=np.float32)
    order = np.argsort(np.abs(-logp - entropy))
    cum = np.cumsum(probs[order])
    ok = cum > np.float32(p)
    ok[: max(min_keep - 1, 0)] = False
    keep = int(np.argmax(ok)) + 1 if ok.any() else len(cand)
    return cand.take(order[:keep])


def top_n_sigma(cand: Candidates, n: float) -> Candidates:
    """Keep tokens whose logit is within n standard deviations of the best (n <= 0: off).

    Mean and deviation are over the finite logits. Masked tokens are dropped (llama.cpp sets them to
    -inf, which gives them zero probability all the same).
    """
    if n <= 0.0 or len(cand) <= 1:
        return cand
    logits = cand.logits
    finite = logits[logits != NEG_INF]
    if finite.size == 0:
        return cand
    best = float(finite.max())
    std = float(finite.std(dtype=np.float64))
    keep = logits >= np.float32(best - n * std)
    return cand if keep.all() else cand.take(keep, sorted=cand.sorted)


def xtc(
    cand: Candidates, probability: float, threshold: float, rng: np.random.Generator, min_keep: int = 0
) -> Candidates:
    """Exclude Top Choices: with chance `probability`, drop every token at or above `threshold`
    probability except the least likely of them, so the model picks a less obvious continuation.

    Off when probability <= 0 or threshold > 0.5; draws from `rng` only when on, as llama.cpp.
    """
    n = len(cand)
    if probability <= 0.0 or threshold > 0.5 or n < 2:
        return cand
    if rng.random() > probability:
        return cand
    probs = cand.probs()
    above = probs >= np.float32(threshold)
    n_above = int(above.sum())
    if n_above < 2 or n - (n_above - 1) < min_keep:
        return cand
    keep = ~above
    above_pos = np.flatnonzero(above)
    keep[above_pos[np.argmin(probs[above_pos])]] = True
    return cand.take(keep, sorted=cand.sorted)


def temperature(cand: Candidates, temp: float) -> Candidates:
    """Divide logits by temp; temp <= 0 keeps only the most likely token (llama_sampler_temp_impl)."""
    if temp <= 0.0:
        return cand.take(np.array([int(np.argmax(cand.logits))]), sorted=True)
    if temp == 1.0:
        return cand
    return cand.with_logits(cand.logits / np.float32(temp), sorted=cand.sorted)


def dynamic_temperature(
    cand: Candidates, temp: float, delta: float = 0.0, exponent: float = 1.0
) -> Candidates:
    """Entropy-scaled temperature (llama.cpp's temp-ext); delta <= 0 is plain temperature.

    The temperature goes from max(0, temp - delta) for a certain distribution to temp + delta for a
    uniform one: t = t_min + (t_max - t_min) * (entropy / log(n)) ** exponent.
    """
    if delta <= 0.0:
        return temperature(cand, temp)
    n = len(cand)
    if n <= 1:
        return cand
    t_min, t_max = max(0.0, temp - delta), temp + delta
    probs = cand.probs()
    nonzero = probs[probs > 0]
    entropy = float(-np.sum(nonzero * np.log(nonzero), dtype=np.float32))
    normalized = entropy / math.log(n)
    return temperature(cand, t_min + (t_max - t_min) * normalized**exponent)


# ---- selecting stages -------------------------------------------------------------------------------


def _draw(probs: np.ndarray, rng: np.random.Generator) -> int:
    """Index drawn with probability proportional to probs (an inverse-CDF draw, as llama.cpp's dist)."""
    cum = np.cumsum(probs, dtype=np.float64)
    i = int(np.searchsorted(cum, cum[-1] * rng.random(), side="right"))
    return min(i, probs.shape[0] - 1)


def greedy(cand: Candidates) -> int:
    """The token with the highest logit (the first one on ties)."""
    return cand.token_at(int(np.argmax(cand.logits)))


def dist(cand: Candidates, rng: np.random.Generator) -> int:
    """A token drawn from softmax(logits) with the sampler's own generator; one candidate: no draw."""
    if len(cand) == 1:
        return cand.token_at(0)
    return cand.token_at(_draw(np.exp(cand.logits - cand.logits.max()), rng))


def mirostat_v1_truncate(cand: Candidates, mu: float, m: int = 100, n_vocab: int | None = None) -> Candidates:
    """Mirostat 1's cut: estimate the Zipf exponent s from the top m tokens, then keep the top k
    with k = (e * 2^mu / (1 - N^-e)) ^ (1/s), e = s - 1, N the vocabulary size.
    """
    n = len(cand)
    if n <= 1:
        return cand
    n_vocab = n_vocab or n
    order = _top_positions(cand.logits, min(m, n))
    top = cand.logits[order].astype(np.float64)
    i = np.arange(order.shape[0] - 1, dtype=np.float64)
    t = np.log((i + 2) / (i + 1))
    b = top[:-1] - top[1:]  # log(p_i / p_i+1)
    s_hat = float(np.dot(t, b) / np.dot(t, t))
    try:
        eps = s_hat - 1
        k = math.pow(eps * 2.0**mu / (1 - math.pow(n_vocab, -eps)), 1 / s_hat)
    except (ZeroDivisionError, OverflowError, ValueError):
        k = math.inf  # degenerate (flat) distribution: no cut
    k_int = max(int(k), 1) if math.isfinite(k) else n
    if k_int <= order.shape[0]:
        return cand.take(order[:k_int], sorted=True)
    return top_k(cand, k_int)


def _mirostat_finish(
    cand: Candidates, mu: float, tau: float, eta: float, rng: np.random.Generator
) -> tuple[int, float]:
    """Draw from the truncated set and move mu by eta times the surprise error."""
    probs = cand.probs()
    i = _draw(probs, rng) if len(cand) > 1 else 0
    surprise = -math.log2(float(probs[i]))
    return cand.token_at(i), mu - eta * (surprise - tau)


def mirostat_v1(
    cand: Candidates,
    mu: float,
    tau: float,
    eta: float,
    rng: np.random.Generator,
    m: int = 100,
    n_vocab: int | None = None,
) -> tuple[int, float]:
    """Mirostat 1 (llama_sampler_init_mirostat): returns (token, new mu); mu starts at 2 * tau."""
    return _mirostat_finish(mirostat_v1_truncate(cand, mu, m, n_vocab), mu, tau, eta, rng)


def mirostat_v2_truncate(cand: Candidates, mu: float) -> Candidates:
    """Mirostat 2's cut: keep tokens whose surprise -log2(p) is at most mu (at least the best one)."""
    probs = cand.probs()
    with np.errstate(divide="ignore"):
        keep = -np.log2(probs) <= np.float32(mu)
    if not keep.any():
        return top_k(cand, 1)
    return cand if keep.all() else cand.take(keep, sorted=cand.sorted)


def mirostat_v2(
    cand: Candidates, mu: float, tau: float, eta: float, rng: np.random.Generator
) -> tuple[int, float]:
    """Mirostat 2 (llama_sampler_init_mirostat_v2): returns (token, new mu); mu starts at 2 * tau."""
    return _mirostat_finish(mirostat_v2_truncate(cand, mu), mu, tau, eta, rng)


# ---- log-probabilities --------------------------------------------------------------------------------


def log_softmax(logits: torch.Tensor | np.ndarray | Sequence[float]) -> np.ndarray:
    """float32 log-probabilities of a logits vector."""
    x = _as_logits(logits)
    shifted = x - x.max()
    return shifted - np.log(np.exp(shifted).sum(dtype=np.float32))


def top_logprobs(logprobs: np.ndarray, n: int) -> list[tuple[int, float]]:
    """The n most likely (token id, logprob) pairs, most likely first."""
    if n <= 0:
        return []
    order = _top_positions(logprobs, min(n, logprobs.shape[0]))
    return [(int(i), float(logprobs[i])) for i in order]


# ---- the chain ----------------------------------------------------------------------------------------


def _new_seed(seed: int) -> int:
    return secrets.randbits(32) if seed == DEFAULT_SEED else seed


class Sampler:
    """llama.cpp's common_sampler: a chain built from SamplerParams, with its own state.

    State: the token history for penalties and DRY (fed by `accept`), mirostat's mu, and numpy
    generators for the draw and for XTC seeded from `params.seed` (a random seed when it is
    0xFFFFFFFF; the one used is `self.seed`). Nothing is shared between samplers, so one seed gives
    one output whatever else runs.

    `n_ctx` is the context size that -1 means for penalty_last_n and dry_penalty_last_n (None: the
    whole history). `tokenizer` maps DRY's sequence-breaker strings to tokens; it is needed only
    when DRY is on and there are breakers.
    """

    def __init__(
        self,
        params: SamplerParams | None = None,
        n_ctx: int | None = None,
        tokenizer: VocabLike | None = None,
    ) -> None:
        self.params = p = params or SamplerParams()
        self.n_ctx = n_ctx
        self.seed = _new_seed(p.seed)
        self._rng = np.random.default_rng(self.seed)
        self._xtc_rng = np.random.default_rng(self.seed)
        self.mu = 2.0 * p.mirostat_tau
        chain = p.samplers if p.mirostat == 0 else []
        self._use_penalties = "penalties" in chain and p.penalty_last_n != 0
        self._use_dry = "dry" in chain and p.dry_enabled
        self._prev: deque[int] = deque(maxlen=self._window(p.penalty_last_n))
        self._counts: dict[int, int] = {}
        self._dry_prev: deque[int] = deque(maxlen=self._window(p.dry_penalty_last_n))
        self._breakers: dict[int, list[tuple[int, ...]]] = {}
        if self._use_dry and p.dry_sequence_breakers:
            if tokenizer is None:
                raise ValueError(
                    "DRY sequence breakers are strings: pass tokenizer= to map them to tokens, "
                    "or set dry_sequence_breakers=()"
                )
            self._breakers = dry_breaker_sequences(p.dry_sequence_breakers, tokenizer)
        # greedy through stages that all keep the most likely token and change no logit (top-k, top-p,
        # min-p, top-n-sigma, temperature; penalties, DRY, typical and XTC off): the pick is the argmax
        # of the biased logits, without the chain's sorts (a server step's top-k alone: ~1 ms a request)
        stages = set(chain)
        self._argmax_only = (
            p.mirostat == 0
            and p.temp <= 0
            and not (
                self._use_dry
                or ("typ_p" in stages and p.typ_p < 1.0)
                or ("xtc" in stages and p.xtc_probability > 0 and p.xtc_threshold <= 0.5)
                or (
                    self._use_penalties
                    and (p.penalty_repeat, p.penalty_freq, p.penalty_present) != (1.0, 0.0, 0.0)
                )
            )
        )
        if p.mirostat == 0:
            self.chain = ["logit-bias", *chain, "dist" if p.temp > 0 else "greedy"]
        else:
            self.chain = ["logit-bias", "temperature", f"mirostat-v{p.mirostat}" if p.temp > 0 else "greedy"]

    def _window(self, last_n: int) -> int | None:
        return (self.n_ctx if self.n_ctx and self.n_ctx > 0 else None) if last_n < 0 else max(last_n, 1)

    def _stage(self, name: str, cand: Candidates) -> Candidates:
        p = self.params
        if name == "penalties":
            if not self._use_penalties:
                return cand
            return penalties(cand, self._counts, p.penalty_repeat, p.penalty_freq, p.penalty_present)
        if name == "dry":
            if not self._use_dry:
                return cand
            return dry(
                cand, self._dry_prev, p.dry_multiplier, p.dry_base, p.dry_allowed_length, self._breakers
            )
        if name == "top_n_sigma":
            return top_n_sigma(cand, p.top_n_sigma)
        if name == "top_k":
            return top_k(cand, p.top_k)
        if name == "typ_p":
            return typical(cand, p.typ_p, p.min_keep)
        if name == "top_p":
            return top_p(cand, p.top_p, p.min_keep)
        if name == "min_p":
            return min_p(cand, p.min_p, p.min_keep)
        if name == "xtc":
            return xtc(cand, p.xtc_probability, p.xtc_threshold, self._xtc_rng, p.min_keep)
        if name == "temperature":
            return dynamic_temperature(cand, p.temp, p.dynatemp_range, p.dynatemp_exponent)
        raise ValueError(f"unknown sampler {name!r}")

    def candidates(self, logits: torch.Tensor | np.ndarray | Sequence[float]) -> Candidates:
        """The candidate set the chain leaves before the final pick (greedy / dist); not for mirostat."""
        cand = logit_bias(Candidates.from_logits(logits), self.params.logit_bias)
        for name in self.params.samplers:
            cand = self._stage(name, cand)
        return cand

    def sample(self, logits: torch.Tensor | np.ndarray | Sequence[float]) -> int:
        """(n_vocab,) logits -> a token id, without recording it (llama.cpp's common_sampler_sample)."""
        p = self.params
        if self._argmax_only:
            return greedy(logit_bias(Candidates.from_logits(logits), p.logit_bias))
        if p.mirostat == 0:
            cand = self.candidates(logits)
            return greedy(cand) if p.temp <= 0 else dist(cand, self._rng)
        cand = logit_bias(Candidates.from_logits(logits), p.logit_bias)
        if p.temp <= 0:
            return greedy(cand)
        n_vocab = len(cand)
        cand = temperature(cand, p.temp)
        if p.mirostat == 1:
            token, self.mu = mirostat_v1(
                cand, self.mu, p.mirostat_tau, p.mirostat_eta, self._rng, 100, n_vocab
            )
        else:
            token, self.mu = mirostat_v2(cand, self.mu, p.mirostat_tau, p.mirostat_eta, self._rng)
        return token

    def accept(self, token: int) -> None:
        """Record a token in the penalty and DRY histories (llama.cpp's common_sampler_accept)."""
        if self._use_penalties:
            prev = self._prev
            if prev.maxlen is not None and len(prev) == prev.maxlen:
                old = prev[0]
                left = self._counts[old] - 1
                if left:
                    self._counts[old] = left
                else:
                    del self._counts[old]
            prev.append(token)
            self._counts[token] = self._counts.get(token, 0) + 1
        if self._use_dry:
            self._dry_prev.append(token)

    def accept_prompt(self, tokens: Iterable[int]) -> None:
        """Feed prompt tokens to the histories, as llama-cli and the server do before generating."""
        for token in tokens:
            self.accept(int(token))

    def __call__(self, logits: torch.Tensor | np.ndarray | Sequence[float]) -> int:
        """Sample a token and accept it."""
        token = self.sample(logits)
        self.accept(token)
        return token

    def sample_with_logprobs(
        self, logits: torch.Tensor | np.ndarray | Sequence[float], n_probs: int = 0
    ) -> tuple[int, float, list[tuple[int, float]]]:
        """Sample and accept a token; also return its logprob and the n_probs most likely tokens.

        Log-probabilities are those of the model's distribution, log_softmax of the raw logits
        before bias, penalties or truncation: what OpenAI's `logprobs`, llama-cpp-python and
        llama.cpp's server (without post_sampling_probs) report.
        """
        if n_probs < 0:
            raise ValueError(f"n_probs must be >= 0, got {n_probs}")
        x = _as_logits(logits)
        logprobs = log_softmax(x)
        token = self(x)
        return token, float(logprobs[token]), top_logprobs(logprobs, n_probs)

    def reset(self) -> None:
        """Forget the history, restart mirostat and re-seed (a new random seed if the seed is random)."""
        self._prev.clear()
        self._counts.clear()
        self._dry_prev.clear()
        self.mu = 2.0 * self.params.mirostat_tau
        self.seed = _new_seed(self.params.seed)
        self._rng = np.random.default_rng(self.seed)
        self._xtc_rng = np.random.default_rng(self.seed)

    def __repr__(self) -> str:
        return f"Sampler(seed={self.seed}, chain={' -> '.join(self.chain)})"
