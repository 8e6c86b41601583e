"""examples/soft_prompts.py (docs/embeddings.md's worked example) on SmolLM2: embedding input read
through the lens, against the token-id run and against what the mix's ends must give."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from gguflm import Batch, Context, Model
from gguflm.lens import lens_prompt

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "soft_prompts.py"


@pytest.fixture(scope="module")
def example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("soft_prompts", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["soft_prompts"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_vectors_equal_to_token_rows_give_the_token_lens(smollm2: Model) -> None:
    """The lens of token-row vectors is the lens of the token ids, at every layer and position."""
    tokens = smollm2.tokenizer.encode("The capital of France is")
    layers = [0, 10, 20, smollm2.args.n_layer]
    by_ids = lens_prompt(smollm2, tokens, layers)
    by_vectors = lens_prompt(smollm2, tokens, layers, embeddings=smollm2.token_embeddings(tokens))
    assert torch.equal(by_ids.top_ids, by_vectors.top_ids)
    torch.testing.assert_close(by_ids.top_probs, by_vectors.top_probs, atol=1e-5, rtol=0)


def test_a_mix_of_two_countries_moves_the_answer(example: ModuleType, smollm2: Model) -> None:
    paris = example.single_token(smollm2, " Paris")
    berlin = example.single_token(smollm2, " Berlin")
    tokens = smollm2.tokenizer.encode(example.PROMPT.format("France"))
    readings = {
        a: example.read(smollm2, tokens, example.mixed(smollm2, a), [paris, berlin]) for a in (0, 0.5, 1)
    }
    # the ends are the plain prompts, decoded from token ids
    for a, country in ((0, "France"), (1, "Germany")):
        ctx = Context(smollm2, n_ctx=32)
        assert ctx.decode(Batch.from_tokens(smollm2.tokenizer.encode(example.PROMPT.format(country)))) == 0
        assert readings[a].top1 == int(ctx.logits(-1).argmax())
    assert readings[0].top1 == paris and readings[1].top1 == berlin
    assert readings[0].probs[berlin] < readings[0.5].probs[berlin] < readings[1].probs[berlin]
    # the lens: the answer comes on top at some layer, and stays the final layer's
    assert readings[0].first_on_top[paris] is not None and readings[0].first_on_top[berlin] is None


def test_noise_on_the_rows_grows_the_divergence(example: ModuleType, smollm2: Model) -> None:
    tokens = smollm2.tokenizer.encode(example.PROMPT.format("France"))
    rows = smollm2.token_embeddings(tokens)
    paris = example.single_token(smollm2, " Paris")
    clean = example.read(smollm2, tokens, rows, [paris])

    def kl(size: float) -> float:
        r = example.read(smollm2, tokens, example.perturbed(rows, size), [paris])
        return float((clean.logprobs.exp() * (clean.logprobs - r.logprobs)).sum())

    assert example.perturbed(rows, 0.0).equal(rows)
    small, large = kl(0.05), kl(2.0)
    assert 0 < small < 0.1 < large
