"""Context.decode semantics (llama_decode's contract) on a tiny random model in fp32 reference mode."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gguflm import Batch, Context, Model, normalize

TOL = 1e-4  # of the logit range, for results that differ only in summation order


def close(a: torch.Tensor, b: torch.Tensor, tol: float = TOL) -> bool:
    scale = float(b.max() - b.min())
    return float((a - b).abs().max()) <= tol * scale


def tokens_of(n: int, seed: int, n_vocab: int) -> list[int]:
    return torch.randint(0, n_vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def fresh_logits(model: Model, tokens: list[int], start: int = 0) -> torch.Tensor:
    """(n, n_vocab) logits of a sequence decoded alone, in one batch, from an empty context."""
    ctx = Context(model, n_ctx=256, n_batch=256, n_ubatch=256)
    pos = list(range(start, start + len(tokens)))
    assert ctx.decode(Batch.from_tokens(tokens, pos=pos, output=[True] * len(tokens))) == 0
    return ctx.all_logits().clone()


def cache_state(ctx: Context) -> tuple[list[int], list[list[bool]]]:
    return ctx.kv.pos.tolist(), ctx.kv.seq.tolist()


# ---- invalid batches -------------------------------------------------------------------------


def invalid_batches(model: Model) -> dict[str, Batch]:
    n_embd = model.n_embd
    return {
        "empty": Batch.from_tokens([]),
        "negative token": Batch.from_tokens([1, -1]),
        "token >= n_vocab": Batch.from_tokens([1, model.n_vocab]),
        "tokens and embeddings": Batch(tokens=torch.tensor([1]), embd=torch.zeros(1, n_embd)),
        "neither": Batch(),
        "embeddings too narrow": Batch.from_embeddings(torch.zeros(2, n_embd - 1)),
        "more than n_batch": Batch.from_tokens([1] * 17),
        "sequence id too large": Batch.from_tokens([1, 2], seq_ids=[[0], [4]]),
        "negative sequence id": Batch.from_tokens([1], seq_ids=[[-1]]),
        "gap after the cache": Batch.from_tokens([1], pos=[5]),
        "gap inside the batch": Batch.from_tokens([1, 2], pos=[3, 5]),
        "repeats a cached position": Batch.from_tokens([1], pos=[2]),
        "pos of the wrong length": Batch.from_tokens([1, 2], pos=[3]),
        "a token per sequence, one out of place": Batch.from_tokens([1, 2], seq_ids=[[1], [0]], pos=[0, 7]),
    }


INVALID_CASES = [
    "empty",
    "negative token",
    "token >= n_vocab",
    "tokens and embeddings",
    "neither",
    "embeddings too narrow",
    "more than n_batch",
    "sequence id too large",
    "negative sequence id",
    "gap after the cache",
    "gap inside the batch",
    "repeats a cached position",
    "pos of the wrong length",
    "a token per sequence, one out of place",
]


@pytest.mark.parametrize("case", INVALID_CASES)
def test_invalid_batch_returns_minus_one_and_leaves_cache(
    tiny_llama: Model, case: str, caplog: pytest.LogCaptureFixture
) -> None:
    ctx = Context(tiny_llama, n_ctx=32, n_batch=16, n_seq_max=4)
    assert ctx.decode(Batch.from_tokens([5, 6, 7])) == 0  # sequence 0 holds positions 0..2
    before = cache_state(ctx)
    logits_before = ctx.logits(-1).clone()
    with caplog.at_level(logging.ERROR, logger="gguflm"):
        assert ctx.decode(invalid_batches(tiny_llama)[case]) == -1
    assert caplog.records, "the reason is logged"
    assert cache_state(ctx) == before
    assert torch.equal(ctx.logits(-1), logits_before)


def test_invalid_token_is_logged_like_llama_cpp(tiny_llama: Model, caplog: pytest.LogCaptureFixture) -> None:
    ctx = Context(tiny_llama, n_ctx=32)
    with caplog.at_level(logging.ERROR, logger="gguflm"):
        assert ctx.decode(Batch.from_tokens([3, 99999])) == -1
    assert "invalid token[1] = 99999" in caplog.text


def test_no_room_returns_one_and_leaves_cache(tiny_llama: Model) -> None:
    ctx = Context(tiny_llama, n_ctx=8, n_batch=8, n_ubatch=2)
    assert ctx.decode(Batch.from_tokens([1, 2, 3, 4, 5])) == 0
    before = cache_state(ctx)
    assert ctx.decode(Batch.from_tokens([6, 7, 8, 9])) == 1
    assert cache_state(ctx) == before
    assert ctx.decode(Batch.from_tokens([6, 7, 8])) == 0  # exactly fills the cache


# ---- micro-batches and sequences ---------------------------------------------------------------


def test_outputs_do_not_depend_on_n_ubatch(tiny_llama: Model) -> None:
    tokens = tokens_of(40, 0, tiny_llama.n_vocab)
    results = []
    for n_ubatch in (1, 7, 512):
        ctx = Context(tiny_llama, n_ctx=64, n_batch=64, n_ubatch=n_ubatch)
        assert ctx.decode(Batch.from_tokens(tokens, output=[True] * 40)) == 0
        results.append(ctx.all_logits().clone())
    assert close(results[0], results[2]) and close(results[1], results[2])


def test_default_output_is_last_token_only(tiny_llama: Model) -> None:
    ctx = Context(tiny_llama, n_ctx=16)
    assert ctx.decode(Batch.from_tokens([1, 2, 3])) == 0
    assert ctx.all_logits().shape == (1, tiny_llama.n_vocab)
    with pytest.raises(ValueError, match="not marked for output"):
        ctx.logits(0)
    assert torch.equal(ctx.logits(2), ctx.logits(-1))


def test_sequences_in_one_batch_equal_each_alone(tiny_llama: Model) -> None:
    a, b, c = (tokens_of(n, s, tiny_llama.n_vocab) for n, s in ((9, 1), (5, 2), (12, 3)))
    ctx = Context(tiny_llama, n_ctx=64, n_batch=64, n_ubatch=8, n_seq_max=3)
    # interleave the three sequences token by token
    order = sorted(
        [(i, 0, t) for i, t in enumerate(a)]
        + [(i, 1, t) for i, t in enumerate(b)]
        + [(i, 2, t) for i, t in enumerate(c)]
    )
    batch = Batch.from_tokens(
        [t for _, _, t in order],
        pos=[i for i, _, _ in order],
        seq_ids=[[s] for _, s, _ in order],
        output=[True] * len(order),
    )
    assert ctx.decode(batch) == 0
    for s, toks in enumerate((a, b, c)):
        idx = [k for k, (_, seq, _) in enumerate(order) if seq == s]
        got = torch.stack([ctx.logits(k) for k in idx])
        assert close(got, fresh_logits(tiny_llama, toks))


def test_parallel_decode_steps_give_each_sequence_its_alone_logits_exactly(smollm2: Model) -> None:
    """Fast mode, bf16 activations: any difference in attention's sums grows through the layers (it
    reached 0.3 in the logits), so sequences that share decode steps must get bit-identical logits.
    Three prompts, two of one length (stacked into one attention call), one longer."""
    prompts = [tokens_of(n, seed, smollm2.n_vocab) for n, seed in ((6, 1), (6, 2), (11, 3))]
    steps = [tokens_of(4, seed, smollm2.n_vocab) for seed in (4, 5, 6)]  # each sequence's next tokens

    def alone(prompt: list[int], nexts: list[int]) -> list[torch.Tensor]:
        ctx = Context(smollm2, n_ctx=64)
        assert ctx.decode(Batch.from_tokens(prompt)) == 0
        out = [ctx.logits(-1).clone()]
        for t in nexts:
            assert ctx.decode(Batch.from_tokens([t])) == 0
            out.append(ctx.logits(-1).clone())
        return out

    ctx = Context(smollm2, n_ctx=64, n_seq_max=3)
    together: list[list[torch.Tensor]] = [[], [], []]
    for s, prompt in enumerate(prompts):  # a shared cache: each prompt decoded into its own sequence
        assert ctx.decode(Batch.from_tokens(prompt, seq_ids=[[s]] * len(prompt))) == 0
        together[s].append(ctx.logits(-1).clone())
    for i in range(4):
        step = Batch.from_tokens([st[i] for st in steps], seq_ids=[[0], [1], [2]], output=[True] * 3)
        assert ctx.decode(step) == 0
        for s in range(3):
            together[s].append(ctx.logits(s).clone())
    for s in range(3):
        want = alone(prompts[s], steps[s])
        assert all(torch.equal(g, w) for g, w in zip(together[s], want, strict=True)), f"sequence {s}"


def test_one_row_sets_give_each_row_what_the_per_set_loop_gives_it(
    tiny_gemma3: Model, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Parallel decoding's grouping (Context._one_row_sets: every set at once) against the per-set loop it
    stands in for: the same cells in the same order and the same masks for every row, with sliding-window
    layers and cells out of position order (a removed tail refilled after another sequence grew)."""
    import gguflm.context as context_module

    ctx = Context(tiny_gemma3, n_ctx=64, n_seq_max=4)
    for s, n in enumerate((5, 12, 3, 9)):
        assert ctx.decode(Batch.from_tokens(tokens_of(n, s, tiny_gemma3.n_vocab), seq_ids=[[s]] * n)) == 0
    assert ctx.kv.seq_rm(1, 4, -1)  # frees cells 9..16; sequence 3 takes some of them next
    assert ctx.decode(Batch.from_tokens(tokens_of(4, 7, tiny_gemma3.n_vocab), seq_ids=[[3]] * 4)) == 0
    checked = ctx._check(Batch.from_tokens([1, 2, 3, 4], seq_ids=[[2], [0], [3], [1]]))
    assert checked is not None
    pos, seq, _ = checked
    cells = ctx.kv.find_slots(4)
    assert cells is not None
    ctx.kv.occupy(cells, pos, seq)
    n_kv = ctx.kv.n_span()
    mask = ctx.kv.attention_mask(pos, seq, n_kv)
    masks = {w: ctx.kv.window_mask(mask, pos, w) if w else mask for w in tiny_gemma3.args.windows}

    def per_row(groups: list | None) -> dict[int, tuple[list[int], dict[int, list[bool] | None]]]:
        assert groups is not None
        out = {}
        for g in groups:
            for b, rows in enumerate(g.rows.tolist()):
                (row,) = rows
                seen = {w: None if m is None else m[b, 0].tolist() for w, m in g.masks.items()}
                out[row] = (g.cells[b].tolist(), seen)
        return out

    fast = per_row(ctx._sequence_groups(seq, masks, n_kv))
    monkeypatch.setattr(context_module, "_seq_keys", lambda seq: None)  # past 64 sequences: the loop
    assert fast == per_row(ctx._sequence_groups(seq, masks, n_kv))
    assert sorted(fast) == [0, 1, 2, 3]
    assert any(cs != sorted(cs) for cs, _ in fast.values())  # some row's cells are out of cell order


def test_a_decoding_sequence_beside_a_prompt_chunk_gets_its_alone_logits_exactly(smollm2: Model) -> None:
    """A server step: one sequence's next token and another's 30-token prompt in one micro-batch. The
    decoding row attends through the per-row kernel, the prompt through the prefill kernel, each set
    alone: the decoding sequence's logits equal those it gets decoded alone, bit for bit."""
    prompt, chunk, nxt = tokens_of(6, 7, smollm2.n_vocab), tokens_of(30, 8, smollm2.n_vocab), 42
    alone = Context(smollm2, n_ctx=64)
    assert alone.decode(Batch.from_tokens(prompt)) == 0
    assert alone.decode(Batch.from_tokens([nxt])) == 0
    ctx = Context(smollm2, n_ctx=128, n_seq_max=2)
    assert ctx.decode(Batch.from_tokens(prompt, seq_ids=[[0]] * len(prompt))) == 0
    step = Batch.from_tokens(
        [nxt, *chunk], seq_ids=[[0]] + [[1]] * len(chunk), output=[True] + [False] * (len(chunk) - 1) + [True]
    )
    assert ctx.decode(step) == 0
    assert torch.equal(ctx.logits(0), alone.logits(-1))
    fresh = Context(smollm2, n_ctx=64)  # the prompt chunk's own logits: close to it decoded alone
    assert fresh.decode(Batch.from_tokens(chunk)) == 0
    assert close(ctx.logits(len(chunk)), fresh.logits(-1))


def test_pos_none_continues_each_sequence(tiny_llama: Model) -> None:
    ctx = Context(tiny_llama, n_ctx=32, n_seq_max=2)
    assert ctx.decode(Batch.from_tokens([1, 2, 3], seq_ids=[[0]] * 3)) == 0
    assert ctx.decode(Batch.from_tokens([4, 5, 6], seq_ids=[[1], [0], [1]])) == 0
    assert (ctx.kv.seq_pos_max(0), ctx.kv.seq_pos_max(1)) == (3, 1)
    assert ctx.decode(Batch.from_tokens([7, 8], seq_ids=[[1], [0]])) == 0  # a token per sequence
    assert (ctx.kv.seq_pos_max(0), ctx.kv.seq_pos_max(1)) == (4, 2)


def test_a_token_per_sequence_out_of_place_names_its_sequence(
    tiny_llama: Model, caplog: pytest.LogCaptureFixture
) -> None:
    ctx = Context(tiny_llama, n_ctx=32, n_seq_max=3)
    assert ctx.decode(Batch.from_tokens([1, 2, 3], seq_ids=[[0], [1], [2]])) == 0
    with caplog.at_level(logging.ERROR, logger="gguflm"):
        assert ctx.decode(Batch.from_tokens([4, 5, 6], seq_ids=[[2], [1], [0]], pos=[4, 5, 1])) == -1
    assert (
        "sequence 1 continues at position 5, but its last cached position is 0" in caplog.text
    )  # the lowest bad id


def test_seq_cp_then_diverging_continuations_are_independent_runs(tiny_llama: Model) -> None:
    prefix = tokens_of(10, 4, tiny_llama.n_vocab)
    ctx = Context(tiny_llama, n_ctx=64, n_seq_max=2)
    assert ctx.decode(Batch.from_tokens(prefix)) == 0
    ctx.kv.seq_cp(0, 1)
    assert ctx.decode(Batch.from_tokens([7, 8, 11, 12], seq_ids=[[0], [0], [1], [1]], output=[True] * 4)) == 0
    assert close(ctx.logits(1), fresh_logits(tiny_llama, [*prefix, 7, 8])[-1])
    assert close(ctx.logits(3), fresh_logits(tiny_llama, [*prefix, 11, 12])[-1])


def test_seq_rm_of_a_tail_then_redecode_equals_never_decoded(tiny_llama: Model) -> None:
    tokens = tokens_of(12, 5, tiny_llama.n_vocab)
    ctx = Context(tiny_llama, n_ctx=64)
    assert ctx.decode(Batch.from_tokens(tokens)) == 0
    assert ctx.kv.seq_rm(0, 8, -1)
    assert ctx.decode(Batch.from_tokens([3, 4])) == 0
    assert close(ctx.logits(-1), fresh_logits(tiny_llama, [*tokens[:8], 3, 4])[-1])


def test_seq_add_re_rotates_keys_so_a_shifted_sequence_predicts_the_same(tiny_llama: Model) -> None:
    """RoPE attention depends on position differences only: shifting a whole sequence must not change
    the next prediction, which holds only if the cached keys are rotated along (llama.cpp's K-shift)."""
    tokens = tokens_of(10, 6, tiny_llama.n_vocab)
    ctx = Context(tiny_llama, n_ctx=64)
    assert ctx.decode(Batch.from_tokens(tokens)) == 0
    ctx.kv.seq_add(0, -1, -1, 7)
    assert (ctx.kv.seq_pos_min(0), ctx.kv.seq_pos_max(0)) == (7, 16)
    assert ctx.decode(Batch.from_tokens([9])) == 0
    assert close(ctx.logits(-1), fresh_logits(tiny_llama, [*tokens, 9])[-1])


def test_context_shift_keys_equal_keys_computed_at_the_new_positions(tiny_llama: Model) -> None:
    """Drop positions [2, 6), shift the rest down by 4: first-layer keys equal a fresh decode of the kept
    tokens (deeper layers legitimately remember the dropped tokens, as in llama.cpp)."""
    tokens = tokens_of(14, 6, tiny_llama.n_vocab)
    ctx = Context(tiny_llama, n_ctx=64)
    assert ctx.decode(Batch.from_tokens(tokens)) == 0
    ctx.kv.seq_rm(0, 2, 6)
    ctx.kv.seq_add(0, 6, -1, -4)
    assert (ctx.kv.seq_pos_min(0), ctx.kv.seq_pos_max(0)) == (0, 9)
    fresh = Context(tiny_llama, n_ctx=64)
    assert fresh.decode(Batch.from_tokens([*tokens[:2], *tokens[6:]])) == 0
    cells = np.flatnonzero(ctx.kv.pos >= 0)
    cells = cells[np.argsort(ctx.kv.pos[cells])]
    assert torch.allclose(ctx.kv.k[0][cells], fresh.kv.k[0][:10], atol=1e-5)
    assert ctx.decode(Batch.from_tokens([9])) == 0  # and decoding goes on after the shift


def test_seq_keep_drops_the_others(tiny_llama: Model) -> None:
    ctx = Context(tiny_llama, n_ctx=32, n_seq_max=3)
    assert ctx.decode(Batch.from_tokens([1, 2, 3], seq_ids=[[0, 1], [1], [2]], pos=[0, 1, 0])) == 0
    ctx.kv.seq_keep(1)
    assert (ctx.kv.seq_pos_max(0), ctx.kv.seq_pos_max(1), ctx.kv.seq_pos_max(2)) == (-1, 1, -1)
    assert ctx.kv.n_used == 2


def test_seq_div_halves_positions(tiny_llama: Model) -> None:
    ctx = Context(tiny_llama, n_ctx=32)
    assert ctx.decode(Batch.from_tokens(list(range(1, 9)))) == 0
    ctx.kv.seq_div(0, 0, -1, 2)
    assert ctx.kv.seq_pos_max(0) == 3 and ctx.kv.n_used == 8


# ---- random programs against a naive model ----------------------------------------------------

N_SEQ = 3


@st.composite
def programs(draw: st.DrawFn) -> list[tuple]:
    ops = []
    for _ in range(draw(st.integers(2, 7))):
        kind = draw(st.sampled_from(["decode", "decode", "decode", "rm_tail", "cp", "keep", "shift"]))
        if kind == "decode":
            n_seqs = draw(st.integers(1, N_SEQ))
            seqs = draw(st.lists(st.integers(0, N_SEQ - 1), min_size=n_seqs, max_size=n_seqs, unique=True))
            ops.append(
                ("decode", [(s, draw(st.lists(st.integers(0, 383), min_size=1, max_size=4))) for s in seqs])
            )
        elif kind == "rm_tail":
            ops.append(("rm_tail", draw(st.integers(0, N_SEQ - 1)), draw(st.integers(0, 6))))
        elif kind == "cp":
            ops.append(("cp", draw(st.integers(0, N_SEQ - 1)), draw(st.integers(0, N_SEQ - 1))))
        elif kind == "keep":
            ops.append(("keep", draw(st.integers(0, N_SEQ - 1))))
        else:
            ops.append(("shift", draw(st.integers(0, N_SEQ - 1)), draw(st.integers(-3, 3))))
    return ops


@pytest.fixture(params=["tiny_llama", "tiny_gemma3"])
def program_model(request: pytest.FixtureRequest) -> Model:
    """A plain model, and one whose local layers see the last 8 positions only."""
    return request.getfixturevalue(request.param)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(program=programs())
def test_random_programs_match_recomputing_from_scratch(program_model: Model, program: list[tuple]) -> None:
    """Each sequence is a contiguous run of positions; the naive model keeps (start, tokens) per sequence
    and recomputes the last token's logits from scratch after every decode."""
    ctx = Context(program_model, n_ctx=96, n_batch=32, n_ubatch=5, n_seq_max=N_SEQ)
    naive: dict[int, tuple[int, list[int]]] = {s: (0, []) for s in range(N_SEQ)}
    for op in program:
        if op[0] == "decode":
            toks, pos, seqs = [], [], []
            for s, new in op[1]:
                start, hist = naive[s]
                toks += new
                pos += list(range(start + len(hist), start + len(hist) + len(new)))
                seqs += [[s]] * len(new)
                naive[s] = (start, hist + new)
            assert ctx.decode(Batch.from_tokens(toks, pos=pos, seq_ids=seqs, output=[True] * len(toks))) == 0
            end = 0
            for s, new in op[1]:
                end += len(new)
                start, hist = naive[s]
                assert close(ctx.logits(end - 1), fresh_logits(program_model, hist, start)[-1])
        elif op[0] == "rm_tail":
            _, s, keep = op
            start, hist = naive[s]
            ctx.kv.seq_rm(s, start + keep, -1)
            naive[s] = (start, hist[:keep]) if keep else (0, [])
        elif op[0] == "cp":
            _, src, dst = op
            if src != dst:
                ctx.kv.seq_rm(dst)
                ctx.kv.seq_cp(src, dst)
                naive[dst] = naive[src]
        elif op[0] == "keep":
            ctx.kv.seq_keep(op[1])
            naive = {s: (naive[s] if s == op[1] else (0, [])) for s in range(N_SEQ)}
        else:  # shift a sequence that shares no cells: keep it alone first
            _, s, delta = op
            start, hist = naive[s]
            ctx.kv.seq_keep(s)
            naive = {t: (naive[t] if t == s else (0, [])) for t in range(N_SEQ)}
            if hist and start + delta >= 0:
                ctx.kv.seq_add(s, -1, -1, delta)
                naive[s] = (start + delta, hist)
        for s in range(N_SEQ):
            start, hist = naive[s]
            assert ctx.kv.seq_pos_max(s) == (start + len(hist) - 1 if hist else -1)


# ---- embeddings in and out ---------------------------------------------------------------------


def test_embeddings_input_equals_token_input(tiny_llama: Model) -> None:
    tokens = tokens_of(11, 7, tiny_llama.n_vocab)
    by_tokens = fresh_logits(tiny_llama, tokens)
    ctx = Context(tiny_llama, n_ctx=32)
    batch = Batch.from_embeddings(tiny_llama.token_embeddings(tokens), output=[True] * len(tokens))
    assert ctx.decode(batch) == 0
    assert close(ctx.all_logits(), by_tokens, 1e-5)


def test_output_embeddings_fed_back_do_not_reproduce_the_prompt(tiny_llama: Model) -> None:
    """The output embedding is the final hidden state, not an input vector: feeding it back is a different input."""
    tokens = tokens_of(8, 8, tiny_llama.n_vocab)
    ctx = Context(tiny_llama, n_ctx=32, embeddings=True)
    assert ctx.decode(Batch.from_tokens(tokens)) == 0
    hidden = torch.stack([ctx.embeddings(i) for i in range(len(tokens))])
    back = Context(tiny_llama, n_ctx=32)
    assert back.decode(Batch.from_embeddings(hidden, output=[True] * len(tokens))) == 0
    assert not close(back.all_logits(), fresh_logits(tiny_llama, tokens), 1e-2)


@pytest.mark.parametrize("pooling", ["mean", "cls", "last"])
def test_pooling(tiny_llama: Model, pooling: str) -> None:
    a, b = tokens_of(6, 9, tiny_llama.n_vocab), tokens_of(4, 10, tiny_llama.n_vocab)
    per_token = []
    for toks in (a, b):
        ctx = Context(tiny_llama, n_ctx=32, embeddings=True)
        assert ctx.decode(Batch.from_tokens(toks)) == 0
        per_token.append(torch.stack([ctx.embeddings(i) for i in range(len(toks))]))
    pooled = Context(tiny_llama, n_ctx=32, n_seq_max=2, embeddings=True, pooling=pooling)
    batch = Batch.from_tokens(a + b, pos=[*range(6), *range(4)], seq_ids=[[0]] * 6 + [[1]] * 4)
    assert pooled.decode(batch) == 0
    for s, rows in enumerate(per_token):
        expected = {"mean": rows.mean(0), "cls": rows[0], "last": rows[-1]}[pooling]
        assert torch.allclose(pooled.embeddings_seq(s), expected, atol=1e-5)


def test_rank_pooling_without_classifier_is_an_error(tiny_llama: Model) -> None:
    with pytest.raises(ValueError, match="classification head"):
        Context(tiny_llama, embeddings=True, pooling="rank")


def test_normalize_matches_llama_cpp_formulas() -> None:
    v = np.array([3.0, -4.0, 0.5], dtype=np.float32)
    assert np.array_equal(normalize(v, -1), v)
    assert np.allclose(normalize(v, 0), v * np.float32(32760.0 / 4.0))
    assert np.allclose(normalize(v, 1), v / 7.5)
    assert np.allclose(normalize(v, 2), v / np.sqrt(25.25))
    assert np.allclose(normalize(v, 3), v / (27 + 64 + 0.125) ** (1 / 3))
    assert np.array_equal(normalize(np.zeros(3, dtype=np.float32), 2), np.zeros(3, dtype=np.float32))
