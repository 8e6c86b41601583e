"""The sampler chain: each stage on small hand-made distributions, then the chain as a whole.

Several cases are the ones llama.cpp's tests/test-sampling.cpp checks (same inputs, same expected
probabilities), so the two implementations agree on them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import pytest
import torch

from gguflm.sampling import (
    DEFAULT_SAMPLERS,
    DEFAULT_SEED,
    Candidates,
    Sampler,
    SamplerParams,
    dist,
    dry,
    dry_breaker_sequences,
    dry_repeat_lengths,
    dynamic_temperature,
    greedy,
    log_softmax,
    logit_bias,
    min_p,
    mirostat_v1,
    mirostat_v1_truncate,
    mirostat_v2,
    mirostat_v2_truncate,
    parse_samplers,
    penalties,
    samplers_to_letters,
    temperature,
    top_k,
    top_n_sigma,
    top_p,
    typical,
    xtc,
)


def from_probs(probs: list[float]) -> Candidates:
    return Candidates.from_logits(np.log(np.array(probs, dtype=np.float32)))


def ids(cand: Candidates) -> list[int]:
    return cand.token_ids().tolist()


def probs_by_id(cand: Candidates) -> dict[int, float]:
    return dict(zip(ids(cand), cand.probs().tolist(), strict=True))


def assert_probs(cand: Candidates, expected: dict[int, float], tol: float = 1e-5) -> None:
    got = probs_by_id(cand)
    assert sorted(got) == sorted(expected)
    for tid, p in expected.items():
        assert got[tid] == pytest.approx(p, abs=tol), (tid, got)


P4 = [0.1, 0.2, 0.3, 0.4]


class FixedRandom:
    """A stand-in generator whose draws are given, to pick a known token."""

    def __init__(self, *values: float) -> None:
        self.values = list(values)

    def random(self) -> float:
        return self.values.pop(0)


# ---- truncation ---------------------------------------------------------------------------------------


def test_top_k_keeps_the_k_best_sorted() -> None:
    out = top_k(Candidates.from_logits([1.0, 3.0, 2.0, 0.0]), 2)
    assert ids(out) == [1, 2]
    assert out.sorted
    assert out.logits.tolist() == [3.0, 2.0]
    assert_probs(top_k(from_probs(P4), 3), {3: 4 / 9, 2: 3 / 9, 1: 2 / 9})
    assert_probs(top_k(from_probs(P4), 1), {3: 1.0})


@pytest.mark.parametrize("k", [0, -1, 4, 10])
def test_top_k_off_or_wider_than_the_set_keeps_everything(k: int) -> None:
    assert ids(top_k(from_probs(P4), k)) == [0, 1, 2, 3]


@pytest.mark.parametrize(
    ("p", "expected"),
    [
        (0.7, {3: 0.4 / 0.7, 2: 0.3 / 0.7}),  # the sum reaches p exactly at the second token: it is kept
        (0.71, {3: 0.4 / 0.9, 2: 0.3 / 0.9, 1: 0.2 / 0.9}),
        (0.8, {3: 0.4 / 0.9, 2: 0.3 / 0.9, 1: 0.2 / 0.9}),
        (1e-6, {3: 1.0}),  # the best token alone is always kept
        (1.0, {0: 0.1, 1: 0.2, 2: 0.3, 3: 0.4}),
    ],
)
def test_top_p(p: float, expected: dict[int, float]) -> None:
    assert_probs(top_p(from_probs(P4), p), expected)


def test_top_p_min_keep_and_sorted_input() -> None:
    assert ids(top_p(from_probs(P4), 0.3, min_keep=3)) == [3, 2, 1]
    presorted = top_k(from_probs(P4), 3)
    assert presorted.sorted
    assert ids(top_p(presorted, 0.7)) == [3, 2]


@pytest.mark.parametrize("scale", [0.5, 3.0, 30.0])  # flat: needs a full sort; peaked: the top 256 do
def test_top_p_on_a_large_vocabulary_matches_a_full_sort(scale: float) -> None:
    logits = (np.random.default_rng(0).standard_normal(20000) * scale).astype(np.float32)
    out = top_p(Candidates.from_logits(logits), 0.9)
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    order = np.argsort(-probs)
    n_keep = int(np.searchsorted(np.cumsum(probs[order]), 0.9)) + 1
    assert set(ids(out)) == set(order[:n_keep].tolist())
    assert out.sorted and np.all(np.diff(out.logits) <= 0)


@pytest.mark.parametrize(
    ("p", "kept"),
    [
        (0.0, [0, 1, 2, 3]),
        (0.24, [0, 1, 2, 3]),
        (0.26, [1, 2, 3]),
        (0.49, [1, 2, 3]),
        (0.51, [2, 3]),
        (0.74, [2, 3]),
        (0.76, [3]),
        (1.0, [3]),
    ],
)
def test_min_p(p: float, kept: list[int]) -> None:
    out = min_p(from_probs(P4), p)
    assert sorted(ids(out)) == kept
    total = sum(P4[i] for i in kept)
    assert_probs(out, {i: P4[i] / total for i in kept})


def test_min_p_min_keep_falls_back_to_the_best_tokens() -> None:
    assert ids(min_p(from_probs(P4), 0.76, min_keep=3)) == [3, 2, 1]


def test_typical_keeps_tokens_near_the_entropy() -> None:
    assert ids(typical(from_probs([0.97, 0.01, 0.01, 0.01]), 0.5)) == [0]
    # entropy 1.33 nats: the 0.2 tokens (surprise 1.61) are closer to it than the 0.4 one (0.92)
    assert sorted(ids(typical(from_probs([0.4, 0.2, 0.2, 0.2]), 0.5))) == [1, 2, 3]
    assert ids(typical(from_probs(P4), 1.0)) == [0, 1, 2, 3]


def test_top_n_sigma() -> None:
    # logits ln(0.1..0.4): mean -1.40, std 0.53; max - 1 std = -1.45 keeps ln 0.3 and ln 0.4
    assert_probs(top_n_sigma(from_probs(P4), 1.0), {2: 3 / 7, 3: 4 / 7})
    assert ids(top_n_sigma(from_probs(P4), 3.0)) == [0, 1, 2, 3]
    assert ids(top_n_sigma(from_probs(P4), 0.0)) == [0, 1, 2, 3]  # <= 0 is off


@pytest.mark.parametrize(
    ("threshold", "expected"),
    [
        (0.09, {3: 1.0}),  # all four are above: all but the least likely are dropped
        (0.19, {2: 2 / 3, 3: 1 / 3}),
        (0.29, {1: 3 / 6, 2: 2 / 6, 3: 1 / 6}),
        (0.39, {0: 0.4, 1: 0.3, 2: 0.2, 3: 0.1}),  # only one above: nothing to exclude
        (0.6, {0: 0.4, 1: 0.3, 2: 0.2, 3: 0.1}),  # above 0.5: off
    ],
)
def test_xtc_with_probability_one(threshold: float, expected: dict[int, float]) -> None:
    out = xtc(from_probs([0.4, 0.3, 0.2, 0.1]), 1.0, threshold, np.random.default_rng(0))
    assert_probs(out, expected)


def test_xtc_probability_is_a_coin_flip_and_zero_draws_nothing() -> None:
    cand = from_probs([0.4, 0.3, 0.2, 0.1])
    assert len(xtc(cand, 0.5, 0.09, FixedRandom(0.7))) == 4  # 0.7 > 0.5: not this time
    assert len(xtc(cand, 0.5, 0.09, FixedRandom(0.3))) == 1
    assert len(xtc(cand, 0.0, 0.09, FixedRandom())) == 4  # off: no draw at all


# ---- logit changes ------------------------------------------------------------------------------------


def test_logit_bias() -> None:
    out = logit_bias(Candidates.from_logits([1.0, 2.0, 3.0]), {0: 5.0, 2: -math.inf, 7: 1.0})
    assert out.logits.tolist() == [6.0, 2.0, -math.inf]
    subset = logit_bias(Candidates(np.array([3.0, 1.0], np.float32), np.array([2, 0])), {0: 5.0})
    assert subset.logits.tolist() == [3.0, 6.0]


def test_repeat_penalty_divides_positive_and_multiplies_negative_logits() -> None:
    out = penalties(Candidates.from_logits([2.0, -2.0, 1.0]), {0: 1, 1: 1}, repeat=2.0)
    assert out.logits.tolist() == [1.0, -4.0, 1.0]
    # llama.cpp's case: uniform over 5, tokens 0 1 2 seen, repeat 50: they all but vanish
    out = penalties(from_probs([0.2] * 5), {0: 3, 1: 1, 2: 1}, repeat=50.0)
    assert_probs(out, {0: 0.0, 1: 0.0, 2: 0.0, 3: 0.5, 4: 0.5})


def test_frequency_and_presence_penalties_use_counts() -> None:
    out = penalties(Candidates.from_logits([1.0, 1.0, 1.0]), {0: 3, 1: 1}, freq=0.5, present=0.25)
    assert out.logits.tolist() == [1.0 - 1.5 - 0.25, 1.0 - 0.5 - 0.25, 1.0]
    # llama.cpp's case: history 0 1 2 0 0, frequency 5, presence 5
    out = penalties(from_probs([0.2] * 5), {0: 3, 1: 1, 2: 1}, freq=5.0, present=5.0)
    assert_probs(out, {0: 0.0, 1: 0.000023, 2: 0.000023, 3: 0.499977, 4: 0.499977}, tol=2e-6)


def test_penalties_on_a_candidate_subset() -> None:
    cand = Candidates(np.array([4.0, 2.0], np.float32), np.array([7, 3]))
    assert penalties(cand, {3: 1, 9: 2}, repeat=2.0).logits.tolist() == [4.0, 1.0]


def test_temperature() -> None:
    assert temperature(Candidates.from_logits([1.0, 2.0, 3.0]), 2.0).logits.tolist() == [0.5, 1.0, 1.5]
    assert ids(temperature(Candidates.from_logits([1.0, 3.0, 2.0]), 0.0)) == [1]
    assert_probs(temperature(from_probs(P4), 1.0), dict(enumerate(P4)))


def test_dynamic_temperature_scales_with_entropy() -> None:
    # a uniform distribution has the maximum entropy: the temperature is temp + delta
    out = dynamic_temperature(Candidates.from_logits([0.5, 0.5]), 1.0, 0.5)
    assert out.logits.tolist() == pytest.approx([0.5 / 1.5, 0.5 / 1.5])
    probs = [0.7, 0.2, 0.1]
    entropy = -sum(p * math.log(p) for p in probs)  # 0.8018 nats, normalized by ln 3: 0.7298
    for exponent in (1.0, 2.0):
        t = 0.5 + 1.0 * (entropy / math.log(3)) ** exponent
        out = dynamic_temperature(from_probs(probs), 1.0, 0.5, exponent)
        assert out.logits == pytest.approx(np.log(probs) / t, rel=1e-5)
    # delta 0 is plain temperature, and t_min is clamped at 0
    assert dynamic_temperature(from_probs(probs), 2.0, 0.0).logits == pytest.approx(np.log(probs) / 2)
    t = 0.0 + 1.5 * entropy / math.log(3)
    assert dynamic_temperature(from_probs(probs), 0.5, 1.0).logits == pytest.approx(
        np.log(probs) / t, rel=1e-5
    )


# ---- DRY ------------------------------------------------------------------------------------------------


def test_dry_repeat_lengths_on_the_documented_example() -> None:
    a, b, c, y = 0, 1, 2, 3
    history = [a, b, c, c, b, c, y, a, b, c]  # ends with "a b c", seen before followed by c
    assert dry_repeat_lengths(history, 1, {}) == {c: 3, b: 1, y: 2}
    assert dry_repeat_lengths(history, 2, {}) == {c: 3, y: 2}
    assert dry_repeat_lengths(history[:2], 2, {}) == {}  # no longer than allowed_length


@pytest.mark.parametrize(
    ("probs", "history", "expected", "multiplier", "allowed", "breakers"),
    [
        ([0.25] * 4, [0, 1], [0.25] * 4, 1.0, 2, {}),
        ([0.25] * 4, [0, 1, 2, 0, 1], [0.296923, 0.296923, 0.109232, 0.296923], 1.0, 2, {}),
        ([0.2] * 5, [0, 1, 3, 4, 0, 1], [0.2] * 5, 1.0, 2, {3: [()]}),  # "0 1" continues with breaker 3
        ([0.2] * 5, [0, 1, 2, 0, 1], [0.241818, 0.241818, 0.032727, 0.241818, 0.241818], 2.0, 2, {}),
        ([0.2] * 5, [0, 1, 2, 3, 4, 0, 1], [0.2] * 5, 1.0, 4, {}),  # repeat of 2 < allowed 4
    ],
)
def test_dry_matches_llama_cpp(
    probs: list[float],
    history: list[int],
    expected: list[float],
    multiplier: float,
    allowed: int,
    breakers: dict[int, list[tuple[int, ...]]],
) -> None:
    out = dry(from_probs(probs), history, multiplier, 1.1, allowed, breakers)
    assert out.probs().tolist() == pytest.approx(expected, abs=1e-5)


def test_dry_penalty_grows_with_the_repeat_length() -> None:
    history = [5, 0, 1, 2, 3, 0, 1, 2]  # "0 1 2" repeats, and was followed by 3
    out = dry(Candidates.from_logits([0.0] * 6), history, 0.8, 1.75, 2, {})
    assert out.logits.tolist() == pytest.approx([0, 0, 0, -0.8 * 1.75, 0, 0])


def test_dry_multi_token_breaker_limits_the_repeat() -> None:
    history = [5, 0, 1, 2, 3, 0, 1, 2]
    # the breaker "0 1" (head 0, tail 1) occurs two tokens back: repeats are cut to 1 < allowed 2
    assert dry_repeat_lengths(history, 2, {0: [(1,)]}) == {}
    assert dry_repeat_lengths(history, 1, {0: [(1,)]}) == {3: 1}  # was 3 without the breaker
    assert dry_repeat_lengths(history, 1, {}) == {3: 3}


class CharVocab:
    """A tokenizer stub: one token per piece, text encoded character by character."""

    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = pieces

    @property
    def n_vocab(self) -> int:
        return len(self.pieces)

    def decode_bytes(self, ids: Iterable[int], special: bool = False) -> bytes:
        return b"".join(self.pieces[i] for i in ids)

    def encode(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        return [self.pieces.index(ch.encode()) for ch in text]


def test_dry_breaker_strings_become_token_sequences() -> None:
    vocab = CharVocab([b"a", b"x", b"y", b"z", b"ax", b"xyzw", b"\n"])
    assert dry_breaker_sequences(["xyz", "\n"], vocab) == {1: [(2, 3)], 4: [(2, 3)], 5: [()], 6: [()]}


def test_sampler_dry_needs_a_tokenizer_for_string_breakers() -> None:
    params = SamplerParams(dry_multiplier=0.8, samplers=["dry"], seed=1)
    with pytest.raises(ValueError, match="tokenizer"):
        Sampler(params)
    Sampler(SamplerParams(dry_multiplier=0.8, dry_sequence_breakers=()))  # no strings: no tokenizer needed
    vocab = CharVocab([b"a", b"b", b"c", b"\n", b"d"])
    sampler = Sampler(params, tokenizer=vocab)
    sampler.accept_prompt([0, 1, 2, 3, 0, 1])  # "a b" was followed by c
    assert sampler.candidates(np.zeros(5, np.float32)).logits.tolist() == pytest.approx([0, 0, -0.8, 0, 0])
    sampler.reset()
    sampler.accept_prompt([0, 1, 3, 0, 1])  # "a b" was followed by the breaker "\n": never penalized
    assert sampler.candidates(np.zeros(5, np.float32)).logits.tolist() == [0, 0, 0, 0, 0]


# ---- mirostat -------------------------------------------------------------------------------------------


def test_mirostat_v2_truncates_by_surprise_and_updates_mu() -> None:
    uniform = Candidates.from_logits([0.0] * 4)  # surprise 2 bits each
    assert len(mirostat_v2_truncate(uniform, 10.0)) == 4
    token, mu = mirostat_v2(uniform, 10.0, tau=5.0, eta=0.1, rng=np.random.default_rng(0))
    assert token in range(4)
    assert mu == pytest.approx(10.0 - 0.1 * (2.0 - 5.0))
    # surprises 1, 2, 2 bits; mu 1.5 keeps only the first, which then has probability 1
    peaked = from_probs([0.5, 0.25, 0.25])
    assert ids(mirostat_v2_truncate(peaked, 1.5)) == [0]
    assert mirostat_v2(peaked, 1.5, 5.0, 0.1, FixedRandom()) == (0, pytest.approx(1.5 + 0.5))
    assert ids(mirostat_v2_truncate(peaked, 0.5)) == [0]  # nothing that unsurprising: keep the best


def test_mirostat_v1_estimates_zipf_exponent_and_updates_mu() -> None:
    # p_i ~ (i+1)^-2: s_hat = 2, so k = (1 * 2^mu / (1 - 10^-1)) ^ (1/2) = 2.108 for mu = 2
    zipf = from_probs([(i + 1) ** -2.0 for i in range(10)])
    assert ids(mirostat_v1_truncate(zipf, 2.0, m=100, n_vocab=10)) == [0, 1]
    assert len(mirostat_v1_truncate(zipf, 10.0, m=100, n_vocab=10)) == 10  # k = 33.7: everything
    # truncated to probabilities 0.8 and 0.2; a draw of 0.1 takes the first
    token, mu = mirostat_v1(zipf, 2.0, 5.0, 0.1, FixedRandom(0.1), m=100, n_vocab=10)
    assert token == 0
    assert mu == pytest.approx(2.0 - 0.1 * (-math.log2(0.8) - 5.0), rel=1e-6)
    token, mu = mirostat_v1(zipf, 2.0, 5.0, 0.1, FixedRandom(0.9), m=100, n_vocab=10)
    assert token == 1
    assert mu == pytest.approx(2.0 - 0.1 * (-math.log2(0.2) - 5.0), rel=1e-6)


def test_sampler_mirostat_replaces_the_chain() -> None:
    sampler = Sampler(SamplerParams(mirostat=2, seed=3, top_k=1))  # top_k is not used by mirostat
    assert sampler.chain == ["logit-bias", "temperature", "mirostat-v2"]
    assert sampler.mu == 10.0
    logits = np.log(np.array([0.5, 0.3, 0.2], np.float32))
    seen = {sampler(logits) for _ in range(50)}
    assert len(seen) > 1
    assert sampler.mu != 10.0
    sampler.reset()
    assert sampler.mu == 10.0


# ---- picking --------------------------------------------------------------------------------------------


def test_greedy_takes_the_first_best() -> None:
    assert greedy(Candidates.from_logits([1.0, 3.0, 3.0, 2.0])) == 1
    assert greedy(Candidates(np.array([1.0, 5.0], np.float32), np.array([9, 4]))) == 4


def test_dist_follows_the_distribution() -> None:
    rng = np.random.default_rng(0)
    cand = from_probs(P4)
    counts = np.bincount([dist(cand, rng) for _ in range(20000)], minlength=4) / 20000
    assert counts == pytest.approx(P4, abs=0.015)
    assert dist(Candidates(np.array([0.0], np.float32), np.array([7])), FixedRandom()) == 7  # no draw
    assert dist(cand, FixedRandom(0.0)) == 0 and dist(cand, FixedRandom(0.999)) == 3


# ---- order and parameters -------------------------------------------------------------------------------


def test_parse_samplers() -> None:
    assert parse_samplers("edskypmxt") == list(DEFAULT_SAMPLERS)
    assert samplers_to_letters(DEFAULT_SAMPLERS) == "edskypmxt"
    assert parse_samplers("penalties;dry;top_k;temperature") == ["penalties", "dry", "top_k", "temperature"]
    assert parse_samplers("top-k;nucleus;typical;min-p;temp") == [
        "top_k",
        "top_p",
        "typ_p",
        "min_p",
        "temperature",
    ]
    assert parse_samplers("kt") == ["top_k", "temperature"]
    assert parse_samplers("xtc") == ["xtc"]  # a whole name wins over letters
    for bad in ("top_k;bogus", "ekz", "", "infill"):
        with pytest.raises(ValueError):
            parse_samplers(bad)


def test_params_defaults_are_llama_cpp_s() -> None:
    p = SamplerParams()
    assert (p.temp, p.top_k, p.top_p, p.min_p, p.typ_p, p.penalty_last_n) == (0.8, 40, 0.95, 0.05, 1.0, 64)
    assert (p.dry_base, p.dry_allowed_length, p.mirostat_tau, p.mirostat_eta) == (1.75, 2, 5.0, 0.1)
    assert p.samplers == list(DEFAULT_SAMPLERS) and p.seed == DEFAULT_SEED
    assert SamplerParams(seed=-1).seed == DEFAULT_SEED
    assert SamplerParams(samplers=["top-k", "temp"]).samplers == ["top_k", "temperature"]


@pytest.mark.parametrize(
    "bad",
    [
        {"top_k": -2},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"min_p": -0.1},
        {"samplers": ["top_k", "bogus"]},
        {"mirostat": 3},
        {"penalty_repeat": 0.0},
        {"temp": math.nan},
        {"seed": 2**32},
        {"logit_bias": {-1: 1.0}},
    ],
)
def test_bad_parameters_raise(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        SamplerParams(**bad)  # type: ignore[arg-type]


# ---- the whole chain --------------------------------------------------------------------------------------


def test_temp_zero_is_greedy_after_bias_and_penalties() -> None:
    sampler = Sampler(SamplerParams(temp=0.0, penalty_repeat=10.0, seed=1))
    assert sampler.chain[-1] == "greedy"
    logits = torch.tensor([1.0, 3.0, 2.5, 0.0])
    assert sampler(logits) == 1
    assert sampler(logits) == 2  # 1 was accepted: 3 / 10 now loses to 2.5
    biased = Sampler(SamplerParams(temp=0.0, logit_bias={3: 10.0}))
    assert biased(logits) == 3


def test_same_seed_same_tokens_and_different_seeds_differ() -> None:
    flat = torch.zeros(1000)
    params = SamplerParams(seed=42, top_k=0, top_p=1.0, min_p=0.0)
    a, b = Sampler(params), Sampler(params)
    seq_a = [a(flat) for _ in range(50)]
    assert seq_a == [b(flat) for _ in range(50)]
    c = Sampler(SamplerParams(seed=43, top_k=0, top_p=1.0, min_p=0.0))
    assert seq_a != [c(flat) for _ in range(50)]
    a.reset()
    assert seq_a == [a(flat) for _ in range(50)]  # reset re-seeds
    assert Sampler().seed != DEFAULT_SEED  # a random seed is drawn and kept


def test_accept_prompt_and_penalty_window() -> None:
    sampler = Sampler(SamplerParams(temp=0.0, penalty_repeat=10.0, penalty_last_n=2))
    logits = np.array([3.0, 2.0, 1.0], np.float32)
    sampler.accept_prompt([0, 2, 2])  # the window of 2 holds only 2, 2
    assert sampler.sample(logits) == 0
    sampler.accept_prompt([0])
    assert sampler.sample(logits) == 1
    sampler.reset()
    assert sampler.sample(logits) == 0
    # -1 is the context size
    long = Sampler(SamplerParams(temp=0.0, penalty_repeat=10.0, penalty_last_n=-1), n_ctx=3)
    long.accept_prompt([0, 1, 2, 2])
    assert long.sample(logits) == 0


def test_logprobs_are_log_softmax_of_the_raw_logits() -> None:
    logits = torch.randn(500, generator=torch.Generator().manual_seed(0)) * 3
    sampler = Sampler(SamplerParams(seed=5, logit_bias={0: 100.0}))
    token, logprob, top = sampler.sample_with_logprobs(logits.to(torch.bfloat16).float(), 5)
    expected = torch.log_softmax(logits.to(torch.bfloat16).float(), -1)
    assert token == 0  # the bias decides the draw but not the reported probabilities
    assert logprob == pytest.approx(float(expected[0]), abs=1e-5)
    values, indices = torch.topk(expected, 5)
    assert [i for i, _ in top] == indices.tolist()
    assert [lp for _, lp in top] == pytest.approx(values.tolist(), abs=1e-5)
    assert log_softmax(logits) == pytest.approx(torch.log_softmax(logits, -1).numpy(), abs=1e-5)
    assert sampler.sample_with_logprobs(logits, 0)[2] == []


def test_chain_on_a_full_vocabulary_cuts_like_top_k() -> None:
    """The default chain's candidates are a subset of the top 40 (its speed: benchmarks, not tests)."""
    logits = torch.randn(49152, generator=torch.Generator().manual_seed(1)) * 3
    sampler = Sampler(SamplerParams(seed=1))
    cand = sampler.candidates(logits)
    assert set(ids(cand)) <= set(torch.topk(logits, 40).indices.tolist())
    top40 = set(torch.topk(logits, 40).indices.tolist())
    assert all(sampler(logits) in top40 for _ in range(50))


def test_same_seed_same_tokens_whatever_shares_the_batch(smollm2) -> None:  # type: ignore[no-untyped-def]
    """Two sequences sampled in one batch give each the tokens it gets when decoded alone."""
    from gguflm import Batch, Context

    tok = smollm2.tokenizer
    prompts = [tok.encode("Once upon a time"), tok.encode("The best way to cook rice is")]
    params = SamplerParams(temp=0.9, seed=1234)

    def alone(prompt: list[int]) -> list[int]:
        ctx = Context(smollm2, n_ctx=128)
        sampler = Sampler(params)
        assert ctx.decode(Batch.from_tokens(prompt)) == 0
        out = []
        for _ in range(12):
            out.append(sampler(ctx.logits(-1)))
            assert ctx.decode(Batch.from_tokens([out[-1]])) == 0
        return out

    ctx = Context(smollm2, n_ctx=128, n_seq_max=2)
    samplers = [Sampler(params), Sampler(params)]
    tokens = [t for p in prompts for t in p]
    seq_ids = [[s] for s, p in enumerate(prompts) for _ in p]
    pos = [i for p in prompts for i in range(len(p))]
    last = [len(prompts[0]) - 1, len(tokens) - 1]
    output = [i in last for i in range(len(tokens))]
    assert ctx.decode(Batch.from_tokens(tokens, pos=pos, seq_ids=seq_ids, output=output)) == 0
    together: list[list[int]] = [[], []]
    rows = last
    for _ in range(12):
        step = [samplers[s](ctx.logits(rows[s])) for s in range(2)]
        for s in range(2):
            together[s].append(step[s])
        assert ctx.decode(Batch.from_tokens(step, seq_ids=[[0], [1]], output=[True, True])) == 0
        rows = [0, 1]
    assert together == [alone(p) for p in prompts]


@pytest.mark.parametrize(
    ("params", "shortcut"),
    [
        (SamplerParams(temp=0.0), True),
        (SamplerParams(temp=0.0, top_k=1, top_p=0.5, min_p=0.3, top_n_sigma=1.0, logit_bias={7: 50.0}), True),
        (SamplerParams(temp=-1.0, logit_bias={3: -1e9}), True),
        (SamplerParams(temp=0.0, typ_p=0.2), False),  # typical may drop the most likely token
        (SamplerParams(temp=0.0, xtc_probability=1.0, xtc_threshold=0.01), False),  # so may XTC
        (SamplerParams(temp=0.0, penalty_repeat=1.5), False),
        (SamplerParams(temp=0.0, dry_multiplier=0.8, dry_sequence_breakers=()), False),
        (SamplerParams(temp=0.7), False),
    ],
)
def test_greedy_shortcut_picks_what_the_whole_chain_picks(params: SamplerParams, shortcut: bool) -> None:
    """At temperature <= 0 the sampler skips the chain when every stage keeps the most likely token
    and changes no logit; its pick must be the chain's on any logits, with any history."""
    rng = np.random.default_rng(3)
    chained, quick = Sampler(params), Sampler(params)
    assert quick._argmax_only == shortcut
    for step in range(30):
        logits = rng.standard_normal(500).astype(np.float32) * (1 + step % 4)
        if params.temp > 0:
            break
        want = greedy(chained.candidates(logits))
        assert quick.sample(logits) == want
        chained.accept(want)
        quick.accept(want)
