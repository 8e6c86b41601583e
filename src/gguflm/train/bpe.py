"""A byte-level BPE vocabulary learned from the training text with Hugging Face `tokenizers`, and its
GGUF form: a `gpt2` tokenizer with the `smollm` pre-tokenizer, which llama.cpp and gguflm split the
same way as the pre-tokenizer trained with here (each digit alone, then GPT-2's pattern).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import gguf
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

END_OF_TEXT = "<|endoftext|>"  # id 0: BOS (each training window starts with it) and EOS
GGUF_PRE_TOKENIZER = "smollm"  # llama.cpp: \p{N} alone, then GPT-2's split; spaces kept as they are


def train_bpe(lines: Iterable[str], vocab_size: int) -> Tokenizer:
    """Learn at most vocab_size tokens (END_OF_TEXT, the 256 byte symbols, then merges) from lines.

    A small text may run out of pairs to merge first: the vocabulary is then smaller."""
    if vocab_size <= 257:
        raise ValueError(f"vocab size {vocab_size} must exceed 257 (end-of-text + 256 bytes) to hold a merge")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(lines, trainer)
    return tokenizer


def tokenizer_metadata(tokenizer: Tokenizer) -> dict[str, Any]:
    """The `tokenizer.*` GGUF keys llama.cpp reads for a gpt2 (byte-level BPE) vocabulary."""
    model = json.loads(tokenizer.to_str())["model"]
    vocab: dict[str, int] = model["vocab"]
    tokens = [""] * len(vocab)
    for text, tid in vocab.items():
        tokens[tid] = text
    # tokenizers writes a merge as [left, right] (0.20+) or as "left right" (earlier)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    eot = vocab[END_OF_TEXT]
    types = [int(gguf.TokenType.NORMAL)] * len(tokens)
    types[eot] = int(gguf.TokenType.CONTROL)
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": GGUF_PRE_TOKENIZER,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.bos_token_id": eot,
        "tokenizer.ggml.eos_token_id": eot,
        "tokenizer.ggml.padding_token_id": eot,
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_eos_token": False,
        "tokenizer.ggml.add_space_prefix": False,
    }
