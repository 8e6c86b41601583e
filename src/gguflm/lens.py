"""The logit lens: what the model would predict after each layer.

The hidden state after layer L, put through the model's own final norm and output head (soft-capping
included, Gemma 2), is a next-token distribution; at L = n_layer it is the model's. `Lens` records
those hidden states through the transformer's named points ("inp_embd", "l_out", "inp_out_ids"), so
the forward is the one every decode runs: a context without a lens attached pays nothing.

Layers are counted as `Context(exit_layer=L)` counts them: layer 0 is the input embeddings (after
Gemma's scale), layer L the output of the L-th block, so the lens at L equals an early exit at L.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import torch

from gguflm.batch import Batch
from gguflm.context import DECODE_OK, Context
from gguflm.generate import DecodeError
from gguflm.model import Model


def parse_layers(spec: str, n_layer: int) -> list[int]:
    """ "all" or comma-separated layer numbers in 0..n_layer -> sorted unique layers."""
    if spec.strip() == "all":
        return list(range(n_layer + 1))
    try:
        layers = sorted({int(part) for part in spec.split(",") if part.strip()})
    except ValueError:
        raise ValueError(f"--layers takes 'all' or comma-separated layer numbers, got {spec!r}") from None
    if not layers:
        raise ValueError("--layers names no layer")
    bad = [layer for layer in layers if not 0 <= layer <= n_layer]
    if bad:
        raise ValueError(f"layer {bad[0]} is out of range: the model has layers 0 (embeddings) .. {n_layer}")
    return layers


class Lens:
    """Records, while attached (a `with` block), the hidden states (n_out, n_embd) of every decode's
    output rows after each layer in `layers`, in the order of `Context.all_logits` (batch order,
    decodes appended). `logits(L)` turns layer L's into next-token logits."""

    def __init__(self, model: Model, layers: Sequence[int] | None = None) -> None:
        n_layer = model.args.n_layer
        self.model = model
        self.layers = list(range(n_layer + 1)) if layers is None else list(layers)
        bad = [layer for layer in self.layers if not 0 <= layer <= n_layer]
        if bad:
            raise ValueError(f"layer {bad[0]} is out of range: the model has layers 0 .. {n_layer}")
        self._wanted = set(self.layers)
        self._rows: torch.Tensor | None = None  # (n_out,) output rows of the micro-batch in flight
        self._hidden: dict[int, list[torch.Tensor]] = {layer: [] for layer in self.layers}

    def __enter__(self) -> Lens:
        self.model.transformer.observers.append(self._observe)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.model.transformer.observers.remove(self._observe)

    def _observe(self, name: str, il: int, x: torch.Tensor) -> None:
        if name == "inp_out_ids":
            self._rows = x
            return
        layer = 0 if name == "inp_embd" else il + 1 if name == "l_out" else -1
        if layer not in self._wanted:
            return
        assert self._rows is not None, "inp_out_ids is observed before the layers"
        # the exit layer keeps the output rows only (keep_outputs); before it every row is there
        kept = x if x.shape[0] == len(self._rows) else x[self._rows]
        self._hidden[layer].append(kept.float().clone())  # (n_out, n_embd)

    def clear(self) -> None:
        for parts in self._hidden.values():
            parts.clear()

    @property
    def n_rows(self) -> int:
        return sum(len(h) for h in self._hidden[self.layers[0]]) if self.layers else 0

    def hidden(self, layer: int) -> torch.Tensor:
        """(n_rows, n_embd) hidden states after `layer`, before the final norm."""
        if layer not in self._wanted:
            raise ValueError(f"layer {layer} is not recorded by this lens (it records {self.layers})")
        parts = self._hidden[layer]
        if not parts:
            raise ValueError("the lens has recorded nothing: decode a batch with outputs while attached")
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def logits(self, layer: int, rows: slice | torch.Tensor | None = None) -> torch.Tensor:
        """(n_rows, n_vocab) float32: layer's hidden states (or those of `rows`) through the final
        norm and the output head."""
        t = self.model.transformer
        h = self.hidden(layer) if rows is None else self.hidden(layer)[rows]
        with torch.inference_mode():
            return t.logits(t.norm(h, t.output_norm)).float()


def decode_with_lens(
    model: Model,
    tokens: list[int],
    layers: Sequence[int],
    n_ubatch: int = 512,
    embeddings: torch.Tensor | None = None,
) -> Lens:
    """One sequence decoded from an empty context with every position an output, under a lens: the
    token ids, or (embeddings, (n, n_embd)) vectors in their place, `tokens` then only naming them."""
    if not tokens:
        raise ValueError("the prompt is empty")
    if embeddings is not None and embeddings.shape[0] != len(tokens):
        raise ValueError(f"{embeddings.shape[0]} embedding rows for {len(tokens)} tokens")
    n = len(tokens)
    ctx = Context(model, n_ctx=max(n, 16), n_batch=n, n_ubatch=n_ubatch)
    output = [True] * n
    if embeddings is None:
        batch = Batch.from_tokens(tokens, output=output)
    else:
        batch = Batch.from_embeddings(embeddings, output=output)
    with Lens(model, layers) as lens:
        status = ctx.decode(batch)
    if status != DECODE_OK:
        raise DecodeError(status, "the lens prompt")
    return lens


# ---- a prompt: layers x positions ---------------------------------------------------------------


@dataclass
class PromptLens:
    """The lens of one prompt: per layer and position, the top-k tokens and their probabilities, and
    the rank (1 = top) of the final layer's top-1 token in that layer's distribution."""

    tokens: list[int]  # the prompt
    layers: list[int]
    top_ids: torch.Tensor  # (n_layers, n_pos, k)
    top_probs: torch.Tensor  # (n_layers, n_pos, k)
    final_rank: torch.Tensor  # (n_layers, n_pos)

    def to_json(self, model: Model) -> dict[str, Any]:
        tok = model.tokenizer
        return {
            "model": model.path.name,
            "n_layer": model.args.n_layer,
            "tokens": [{"id": t, "piece": tok.piece(t)} for t in self.tokens],
            "layers": [
                {
                    "layer": layer,
                    "positions": [
                        {
                            "top": [
                                {"id": int(i), "piece": tok.piece(int(i)), "prob": float(p)}
                                for i, p in zip(self.top_ids[li, pos], self.top_probs[li, pos], strict=True)
                            ],
                            "final_top1_rank": int(self.final_rank[li, pos]),
                        }
                        for pos in range(len(self.tokens))
                    ],
                }
                for li, layer in enumerate(self.layers)
            ],
        }


def lens_prompt(
    model: Model,
    tokens: list[int],
    layers: Sequence[int],
    top_k: int = 5,
    embeddings: torch.Tensor | None = None,
) -> PromptLens:
    """The lens of a prompt given as token ids, or as embedding vectors (n, n_embd) named by tokens."""
    n_layer = model.args.n_layer
    lens = decode_with_lens(model, tokens, sorted({*layers, n_layer}), embeddings=embeddings)
    final_top = lens.logits(n_layer).argmax(-1)  # (n_pos,)
    top_ids, top_probs, ranks = [], [], []
    for layer in layers:
        probs = torch.softmax(lens.logits(layer), dim=-1)  # (n_pos, n_vocab)
        p, i = probs.topk(min(top_k, probs.shape[-1]), dim=-1)
        top_ids.append(i)
        top_probs.append(p)
        p_final = probs.gather(1, final_top[:, None])  # (n_pos, 1)
        ranks.append((probs > p_final).sum(-1) + 1)
    return PromptLens(
        list(tokens), list(layers), torch.stack(top_ids), torch.stack(top_probs), torch.stack(ranks)
    )


def shown(piece: str, width: int = 0) -> str:
    """A token piece made visible: escapes (\\n), spaces as ␣, cut to width (0: whole)."""
    text = repr(piece)[1:-1].replace(" ", "␣") or "∅"
    return text if not width or len(text) <= width else text[: width - 1] + "…"


def format_table(model: Model, lens: PromptLens, width: int = 8) -> str:
    """Layers (rows, last on top) x positions (columns): top-1 piece, its probability, and [rank of
    the final top-1] where that is not the top-1 itself."""
    tok = model.tokenizer
    cell = width + 12
    head = "layer | " + " ".join(f"{shown(tok.piece(t), cell):<{cell}}" for t in lens.tokens)
    lines = [head, "-" * len(head)]
    for li in reversed(range(len(lens.layers))):
        cells = []
        for pos in range(len(lens.tokens)):
            piece = shown(tok.piece(int(lens.top_ids[li, pos, 0])), width)
            rank = int(lens.final_rank[li, pos])
            text = f"{piece} {float(lens.top_probs[li, pos, 0]):.2f}" + (f" [{rank}]" if rank > 1 else "")
            cells.append(f"{text:<{cell}}")
        name = "emb" if lens.layers[li] == 0 else str(lens.layers[li])
        lines.append(f"{name:>5} | " + " ".join(cells))
    return "\n".join(lines)


# ---- a text: per-layer averages -----------------------------------------------------------------


@dataclass
class LayerStats:
    """Per layer, averaged over every scored position of a text."""

    layer: int
    kl_to_final: float  # KL(final || layer) in nats
    top1_agreement: float  # fraction of positions whose top-1 is the final layer's
    entropy: float  # nats
    n_positions: int


def lens_text(
    model: Model,
    tokens: list[int],
    layers: Sequence[int],
    n_ctx: int = 512,
    max_chunks: int = 0,
    bos: int | None = None,
) -> list[LayerStats]:
    """KL to the final distribution, top-1 agreement and entropy per layer, over chunks of n_ctx
    tokens (BOS first, as perplexity cuts them), every position of a chunk counted."""
    from gguflm.perplexity import chunks

    n_layer = model.args.n_layer
    all_chunks = list(chunks(tokens, n_ctx, bos))
    if not all_chunks:
        raise ValueError(f"the text has {len(tokens)} tokens, fewer than one chunk of {n_ctx}")
    if max_chunks > 0:
        all_chunks = all_chunks[:max_chunks]
    sums = {layer: [0.0, 0.0, 0.0] for layer in layers}
    count = 0
    for chunk in all_chunks:
        lens = decode_with_lens(model, chunk, sorted({*layers, n_layer}))
        final = torch.log_softmax(lens.logits(n_layer), dim=-1)  # (n_pos, n_vocab)
        p_final, final_top = final.exp(), final.argmax(-1)
        for layer in layers:
            logp = torch.log_softmax(lens.logits(layer), dim=-1)  # (n_pos, n_vocab)
            kl = (p_final * (final - logp)).sum(-1)
            entropy = -(logp.exp() * logp).sum(-1)
            agree = (logp.argmax(-1) == final_top).float()
            s = sums[layer]
            s[0] += float(kl.double().sum())
            s[1] += float(agree.double().sum())
            s[2] += float(entropy.double().sum())
        count += len(chunk)
    return [LayerStats(layer, s[0] / count, s[1] / count, s[2] / count, count) for layer, s in sums.items()]


def format_stats(stats: list[LayerStats]) -> str:
    lines = ["layer | KL(final||layer) | top-1 = final | entropy", "--- | ---: | ---: | ---:"]
    for s in stats:
        name = "emb" if s.layer == 0 else str(s.layer)
        lines.append(f"{name} | {s.kl_to_final:.4f} | {100 * s.top1_agreement:.1f}% | {s.entropy:.3f}")
    lines.append(f"({stats[0].n_positions} positions; KL and entropy in nats)")
    return "\n".join(lines)
