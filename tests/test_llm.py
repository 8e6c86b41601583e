"""The high-level API on the real SmolLM2: llama-cpp-python's result shapes, stop strings (also across
tokens, also streamed), seeds, KV-cache prefix reuse, errors that leave the cache intact, chat,
constrained JSON, embeddings, tokens and logprobs checked against the logits the model produced."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest
import torch
from conftest import reference

from gguflm.llm import LLM
from gguflm.model import Model

FRANCE = reference("greedy.json")["cases"][0]  # " Paris.\n\nThe United States has ..."
PROMPT = FRANCE["prompt"]
GREEDY: dict[str, Any] = {"temperature": 0.0}
# Germany: SmolLM2's greedy reply to France's question starts at a near tie that llama.cpp takes to
# "L'Étoile, la Cité, ..."; to this one it answers "The capital of Germany is Berlin." and stops
USER = [{"role": "user", "content": "What is the capital of Germany?"}]


@pytest.fixture(scope="module")
def llm(smollm2: Model) -> LLM:
    return LLM(model=smollm2, n_ctx=512)


@pytest.fixture
def fresh(smollm2: Model) -> LLM:
    """An LLM with an empty cache, for tests that count decoded tokens."""
    return LLM(model=smollm2, n_ctx=128)


def consistent(llm: LLM) -> bool:
    """The token mirror and the KV cache agree: positions 0..n-1, nothing else."""
    n = len(llm.cached_tokens)
    return llm.ctx.kv.seq_pos_max(0) == n - 1 and llm.ctx.kv.n_used == n


# ---- completion shapes ---------------------------------------------------------------------------


def test_completion_has_llama_cpp_python_shape_and_usage(llm: LLM) -> None:
    out = llm.complete(PROMPT, max_tokens=4, **GREEDY)
    assert set(out) == {"id", "object", "created", "model", "choices", "usage"}
    assert out["object"] == "text_completion" and out["id"].startswith("cmpl-")
    assert isinstance(out["created"], int) and out["model"].endswith(".gguf")
    (choice,) = out["choices"]
    assert set(choice) == {"text", "index", "logprobs", "finish_reason"}
    assert choice["index"] == 0 and choice["logprobs"] is None and choice["finish_reason"] == "length"
    assert FRANCE["text"].startswith(choice["text"]) and len(choice["text"]) > 5  # llama.cpp's greedy start
    n_prompt = len(llm.tokenize(PROMPT, special=True))
    assert out["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": 4, "total_tokens": n_prompt + 4}


def test_prompt_as_token_ids_and_echo(llm: LLM) -> None:
    ids = llm.tokenize(PROMPT.encode())
    by_text = llm.complete(PROMPT, max_tokens=3, **GREEDY)["choices"][0]["text"]
    echoed = llm.complete(ids, max_tokens=3, echo=True, **GREEDY)["choices"][0]["text"]
    assert echoed == PROMPT + by_text


# ---- stop conditions -----------------------------------------------------------------------------


def test_stop_string_spanning_tokens_is_cut_and_not_returned(llm: LLM) -> None:
    out = llm.complete(PROMPT, max_tokens=8, stop=["\n\nThe"], logprobs=0, **GREEDY)
    choice = out["choices"][0]
    assert choice["text"] == " Paris." and choice["finish_reason"] == "stop"
    # the stop string took at least two generated tokens, none of which is reported
    assert choice["logprobs"]["tokens"] == [" Paris", "."]
    assert out["usage"]["completion_tokens"] >= len(choice["logprobs"]["tokens"]) + 2


def test_stop_as_a_string_and_at_the_start(llm: LLM) -> None:
    out = llm.complete(PROMPT, max_tokens=8, stop=" Paris", **GREEDY)
    assert out["choices"][0]["text"] == "" and out["choices"][0]["finish_reason"] == "stop"
    out = llm.complete(PROMPT, max_tokens=8, stop=["zzz", "."], **GREEDY)
    assert out["choices"][0]["text"] == " Paris"


def test_end_of_generation_token_stops_a_chat_reply(llm: LLM) -> None:
    out = llm.chat(USER, max_tokens=64, **GREEDY)
    assert out["choices"][0]["finish_reason"] == "stop"
    assert out["usage"]["completion_tokens"] < 64
    assert "<|im_end|>" not in out["choices"][0]["message"]["content"]


@pytest.mark.parametrize("stop", [None, ["\n\nThe"], ["."], ["answer is"]])
def test_stream_chunks_concatenate_to_the_text(llm: LLM, stop: list[str] | None) -> None:
    whole = llm.complete(PROMPT, max_tokens=12, stop=stop, **GREEDY)
    chunks = list(llm.complete(PROMPT, max_tokens=12, stop=stop, stream=True, **GREEDY))
    for chunk in chunks:
        assert {"id", "object", "created", "model", "choices"} <= set(chunk)
        assert chunk["object"] == "text_completion"
    texts = [c["choices"][0]["text"] for c in chunks]
    assert "".join(texts) == whole["choices"][0]["text"]
    finishes = [c["choices"][0]["finish_reason"] for c in chunks]
    assert (
        finishes[:-1] == [None] * (len(chunks) - 1) and finishes[-1] == whole["choices"][0]["finish_reason"]
    )
    assert chunks[-1]["usage"] == whole["usage"]
    assert all(t for t in texts[:-1])  # no empty chunks but the last
    if stop == ["\n\nThe"]:
        assert not any("\n" in t for t in texts)  # the held-back start of the stop string never leaks


# ---- seeds and the cache -------------------------------------------------------------------------


def test_same_seed_same_output_warm_or_cold(llm: LLM, smollm2: Model) -> None:
    args: dict[str, Any] = {"max_tokens": 12, "temperature": 0.9, "seed": 7}
    first = llm.complete("Once upon a time", **args)["choices"][0]["text"]
    again = llm.complete("Once upon a time", **args)["choices"][0]["text"]  # prefix from the cache
    cold = LLM(model=smollm2, n_ctx=128).complete("Once upon a time", **args)["choices"][0]["text"]
    assert first == again == cold
    others = {llm.complete("Once upon a time", **{**args, "seed": s})["choices"][0]["text"] for s in (1, 2)}
    assert len(others | {first}) > 1
    seeded = LLM(model=smollm2, n_ctx=128, seed=5)
    assert (
        seeded.complete("Hi", max_tokens=12)["choices"][0]["text"]
        == seeded.complete("Hi", max_tokens=12)["choices"][0]["text"]
    )


def test_prefix_reuse_decodes_only_the_new_suffix(fresh: LLM) -> None:
    llm = fresh
    short, longer = "The capital of France is", "The capital of France is Paris. The capital of Spain is"
    t_short, t_long = llm.tokenize(short), llm.tokenize(longer)
    assert t_long[: len(t_short)] == t_short
    n0 = llm.ctx.n_decoded
    llm.complete(short, max_tokens=1, **GREEDY)  # one token sampled, none decoded after it
    assert llm.ctx.n_decoded - n0 == len(t_short)
    assert llm.cached_tokens == t_short
    n0 = llm.ctx.n_decoded
    llm.complete(longer, max_tokens=1, **GREEDY)
    assert llm.ctx.n_decoded - n0 == len(t_long) - len(t_short)
    n0 = llm.ctx.n_decoded
    llm.complete(longer, max_tokens=1, **GREEDY)  # all cached: only the last token again, for its logits
    assert llm.ctx.n_decoded - n0 == 1
    n0 = llm.ctx.n_decoded
    llm.complete("The capital of Italy", max_tokens=1, **GREEDY)  # diverges after "The capital of"
    assert llm.ctx.n_decoded - n0 == len(llm.tokenize("The capital of Italy")) - 3
    assert consistent(llm)


def test_prompt_longer_than_the_context_leaves_the_cache_intact(fresh: LLM) -> None:
    llm = fresh
    llm.complete(PROMPT, max_tokens=4, **GREEDY)
    cached = llm.cached_tokens
    long_prompt = "word " * 200
    n_long = len(llm.tokenize(long_prompt))
    with pytest.raises(ValueError, match=f"{n_long} tokens.*{llm.n_ctx}"):
        llm.complete(long_prompt, max_tokens=4)
    with pytest.raises(ValueError, match=f"{n_long} tokens"):
        llm.complete(long_prompt, stream=True)  # raised at the call, not at the first chunk
    assert llm.cached_tokens == cached and consistent(llm)
    n0 = llm.ctx.n_decoded
    llm.complete(PROMPT, max_tokens=1, **GREEDY)
    assert llm.ctx.n_decoded - n0 == 1


def test_max_tokens_is_capped_by_the_context(smollm2: Model) -> None:
    llm = LLM(model=smollm2, n_ctx=40)
    out = llm.complete("word " * 32, max_tokens=None, temperature=1.0, seed=1)
    assert out["choices"][0]["finish_reason"] in ("stop", "length")
    assert out["usage"]["total_tokens"] <= llm.n_ctx
    assert consistent(llm)


@pytest.mark.parametrize(
    "bad",
    [
        {"temperature": float("nan")},
        {"top_p": 0.0},
        {"top_k": -5},
        {"max_tokens": "8"},
        {"logprobs": -1},
        {"stop": [1]},
        {"logit_bias": {"abc": 1.0}},
        {"logit_bias": {10**9: 1.0}},
        {"seed": -5},
    ],
)
def test_bad_parameters_raise_value_error(llm: LLM, bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        llm.complete(PROMPT, **bad)


def test_bad_chat_parameters_raise_value_error(llm: LLM) -> None:
    with pytest.raises(ValueError, match="logprobs"):
        llm.chat(USER, top_logprobs=2)
    with pytest.raises(ValueError):
        llm.chat([{"role": "user"}])
    with pytest.raises(ValueError, match="empty"):
        llm.complete("")


def test_interrupted_generation_leaves_cache_and_mirror_in_agreement(
    fresh: LLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    llm = fresh
    stream = llm.complete(PROMPT, max_tokens=20, stream=True, **GREEDY)
    next(stream), next(stream)
    llm.complete("Hello", max_tokens=2)  # closes the unfinished stream first
    assert consistent(llm)
    real = llm.ctx.decode
    calls = iter(range(100))

    def flaky(batch: Any) -> int:
        if next(calls) == 3:
            raise KeyboardInterrupt
        return real(batch)

    monkeypatch.setattr(llm.ctx, "decode", flaky)
    with pytest.raises(KeyboardInterrupt):
        llm.complete(PROMPT, max_tokens=20, **GREEDY)
    assert consistent(llm) and len(llm.cached_tokens) > 0
    assert (
        llm.complete(PROMPT, max_tokens=4, **GREEDY)["choices"][0]["text"]
        == llm.complete(PROMPT, max_tokens=4, **GREEDY)["choices"][0]["text"]
    )


def test_discard_shifts_the_cache_without_decoding(fresh: LLM) -> None:
    llm = fresh
    llm.complete("One two three four five six", max_tokens=1, **GREEDY)
    before = llm.cached_tokens
    llm.discard(1, 3)
    assert llm.cached_tokens == before[:1] + before[3:] and consistent(llm)
    with pytest.raises(ValueError):
        llm.discard(2, 99)


# ---- chat ----------------------------------------------------------------------------------------


def test_chat_returns_an_assistant_message(llm: LLM) -> None:
    out = llm.chat(USER, max_tokens=24, **GREEDY)
    assert set(out) == {"id", "object", "created", "model", "choices", "usage"}
    assert out["object"] == "chat.completion" and out["id"].startswith("chatcmpl-")
    (choice,) = out["choices"]
    assert set(choice) == {"index", "message", "logprobs", "finish_reason"}
    assert choice["message"]["role"] == "assistant" and "Berlin" in choice["message"]["content"]
    prompt = llm.template.render(USER, add_generation_prompt=True)
    assert out["usage"]["prompt_tokens"] == len(llm.tokenize(prompt, special=True))


def test_chat_stream_deltas(llm: LLM) -> None:
    whole = llm.chat(USER, max_tokens=24, **GREEDY)
    chunks = list(llm.chat(USER, max_tokens=24, stream=True, **GREEDY))
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert deltas[0] == {"role": "assistant"} and deltas[-1] == {}
    assert "".join(d["content"] for d in deltas[1:-1]) == whole["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]


def test_chat_json_schema_reply_validates(llm: LLM) -> None:
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer"}},
        "required": ["name", "age"],
        "additionalProperties": False,
    }
    messages = [{"role": "user", "content": "Describe a cat as JSON with its name and age."}]
    fmt = {"type": "json_schema", "json_schema": {"name": "cat", "schema": schema}}
    out = llm.chat(messages, max_tokens=80, response_format=fmt, **GREEDY)
    assert out["choices"][0]["finish_reason"] == "stop"
    data = json.loads(out["choices"][0]["message"]["content"])
    assert set(data) == {"name", "age"} and isinstance(data["name"], str) and isinstance(data["age"], int)
    messages = [
        {"role": "user", "content": 'Give the capital of France as a JSON object with the key "capital".'}
    ]
    out = llm.chat(messages, max_tokens=40, response_format={"type": "json_object"}, **GREEDY)
    assert json.loads(out["choices"][0]["message"]["content"]) == {"capital": "Paris"}


def test_gbnf_grammar_constrains_a_completion(llm: LLM) -> None:
    out = llm.complete(
        "Is Paris in France? Answer:", max_tokens=8, grammar='root ::= " yes" | " no"', **GREEDY
    )
    assert out["choices"][0]["text"] in (" yes", " no") and out["choices"][0]["finish_reason"] == "stop"
    with pytest.raises(ValueError):
        llm.complete("x", grammar="root ::= (")


# ---- embeddings and tokens -----------------------------------------------------------------------


def test_embed_shapes_and_unit_norms(llm: LLM) -> None:
    vectors = llm.embed(["a cat", "a dog", "the stock market"])
    assert len(vectors) == 3 and all(len(v) == llm.model.n_embd for v in vectors)
    norms = np.linalg.norm(np.array(vectors), axis=1)
    assert np.allclose(norms, 1.0, atol=1e-5)
    single = llm.embed("a cat")
    assert isinstance(single[0], float) and np.allclose(single, vectors[0], atol=1e-6)
    assert not math.isclose(float(np.linalg.norm(llm.embed("a cat", normalize=False))), 1.0, rel_tol=1e-3)
    a, b, c = (np.array(v) for v in vectors)
    assert a @ b > a @ c  # a cat is nearer a dog than the stock market


def test_tokenize_detokenize_round_trip(llm: LLM) -> None:
    text = "Hello wörld! 🦙 <|im_end|>"
    ids = llm.tokenize(text.encode())
    assert ids == llm.tokenize(text)  # bytes, as llama-cpp-python takes, or str
    assert llm.detokenize(ids) == text.encode()
    special = llm.tokenize("<|im_end|>", special=True)
    assert special == [llm.tokenizer.text_to_token("<|im_end|>")]
    assert llm.detokenize(special) == b"" and llm.detokenize(special, special=True) == b"<|im_end|>"
    with pytest.raises(ValueError):
        llm.detokenize([-1])


# ---- logprobs ------------------------------------------------------------------------------------


def recorded_logits(llm: LLM, monkeypatch: pytest.MonkeyPatch) -> list[torch.Tensor]:
    """Every logits row the LLM reads, in order."""
    seen: list[torch.Tensor] = []
    real = llm.ctx.logits

    def spy(i: int = -1) -> torch.Tensor:
        row = real(i)
        seen.append(row.clone())
        return row

    monkeypatch.setattr(llm.ctx, "logits", spy)
    return seen


def test_completion_logprobs_are_log_softmax_of_the_logits(llm: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = recorded_logits(llm, monkeypatch)
    no_end = dict.fromkeys(llm.tokenizer.eog_ids, float("-inf"))  # six tokens whatever the sampler draws
    out = llm.complete(PROMPT, max_tokens=6, logprobs=3, temperature=0.7, seed=3, logit_bias=no_end)
    lp = out["choices"][0]["logprobs"]
    assert set(lp) == {"tokens", "text_offset", "token_logprobs", "top_logprobs"}
    assert (
        len(lp["tokens"])
        == len(lp["text_offset"])
        == len(lp["token_logprobs"])
        == len(lp["top_logprobs"])
        == 6
    )
    assert "".join(lp["tokens"]) == out["choices"][0]["text"]
    offsets = [len(PROMPT) + len("".join(lp["tokens"][:i])) for i in range(6)]
    assert lp["text_offset"] == offsets
    for k in range(6):
        ref = torch.log_softmax(seen[k].double(), -1)
        token = llm.tokenize(lp["tokens"][k], add_bos=False)[0]
        assert lp["token_logprobs"][k] == pytest.approx(float(ref[token]), abs=1e-4)
        top = lp["top_logprobs"][k]
        best = torch.topk(ref, 3)
        assert len(top) in (3, 4) and lp["tokens"][k] in top
        for value, tid in zip(best.values.tolist(), best.indices.tolist(), strict=True):
            assert top[llm.tokenizer.token_to_piece(tid).decode()] == pytest.approx(value, abs=1e-4)


def test_echo_logprobs_cover_the_prompt(llm: LLM) -> None:
    out = llm.complete(PROMPT, max_tokens=2, logprobs=1, echo=True, **GREEDY)
    lp = out["choices"][0]["logprobs"]
    n_prompt = out["usage"]["prompt_tokens"]
    assert len(lp["tokens"]) == n_prompt + 2
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert all(x is not None and x <= 0 for x in lp["token_logprobs"][1:])
    assert "".join(lp["tokens"]) == out["choices"][0]["text"] and lp["text_offset"][0] == 0


def test_chat_logprobs_have_openai_shape(llm: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = recorded_logits(llm, monkeypatch)
    out = llm.chat(USER, max_tokens=5, logprobs=True, top_logprobs=2, **GREEDY)
    lp = out["choices"][0]["logprobs"]
    assert set(lp) == {"content", "refusal"} and lp["refusal"] is None
    assert "".join(e["token"] for e in lp["content"]) == out["choices"][0]["message"]["content"]
    for k, entry in enumerate(lp["content"]):
        assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"}
        assert bytes(entry["bytes"]).decode() == entry["token"]
        ref = torch.log_softmax(seen[k].double(), -1)
        assert entry["logprob"] == pytest.approx(float(ref.max()), abs=1e-4)  # greedy: the argmax
        assert [t["logprob"] for t in entry["top_logprobs"]] == pytest.approx(
            torch.topk(ref, 2).values.tolist(), abs=1e-4
        )
        assert all(set(t) == {"token", "logprob", "bytes"} for t in entry["top_logprobs"])
    streamed = list(llm.chat(USER, max_tokens=5, logprobs=True, top_logprobs=2, stream=True, **GREEDY))
    entries = [e for c in streamed[1:-1] for e in c["choices"][0]["logprobs"]["content"]]
    assert [e["token"] for e in entries] == [e["token"] for e in lp["content"]]


def test_exit_layer_gives_the_early_exit_logits(smollm2: Model, monkeypatch: pytest.MonkeyPatch) -> None:
    """LLM(exit_layer=L) samples from Context(exit_layer=L)'s logits, not the full model's."""
    from gguflm.batch import Batch
    from gguflm.context import Context

    layer = smollm2.args.n_layer // 2
    early = LLM(model=smollm2, n_ctx=128, exit_layer=layer)
    seen = recorded_logits(early, monkeypatch)
    early.complete(PROMPT, max_tokens=1, **GREEDY)
    prompt = early.tokenize(PROMPT)
    for exit_layer in (layer, None):
        ctx = Context(smollm2, n_ctx=128, n_batch=512, n_ubatch=512, exit_layer=exit_layer)
        assert ctx.decode(Batch.from_tokens(prompt)) == 0
        assert torch.equal(seen[0], ctx.logits(-1)) == (exit_layer == layer)
    with pytest.raises(ValueError, match="exit layer"):
        LLM(model=smollm2, n_ctx=128, exit_layer=smollm2.args.n_layer + 1)
