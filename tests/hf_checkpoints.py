"""Tiny Hugging Face checkpoint directories for the converter's tests: a random transformers model of
each family, saved with `save_pretrained` (safetensors), and a real tokenizer beside it.

Tokenizers, each of a kind llama.cpp's converter handles:
- "smollm2": SmolLM2's own byte-level BPE (49152 tokens), rebuilt with the `tokenizers` library from
  the vocabulary and merges in the default model's GGUF. Its check-text hash is in llama.cpp's table.
- "bpe-qwen2" / "bpe-llama3": a byte-level BPE trained here (the `tokenizers` trainer) behind Qwen 2's
  or Llama 3's split regex; no hash table knows these vocabularies.
- "spm-llama" / "spm-gemma": SentencePiece BPE models with byte fallback trained here (Llama 2's ids
  <unk> <s> </s> and dummy prefix; Gemma's <pad> <eos> <bos> <unk>, no dummy prefix).
"""

from __future__ import annotations

import copy
import functools
import json
import os
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import gguf
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

from gguflm.paths import default_model_path
from gguflm.writer import _BPE_CORPUS

hf_logging.set_verbosity_error()

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
QWEN2_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
LLAMA3_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
CORPUS = _BPE_CORPUS * 4


@functools.cache
def _smollm2_vocab() -> tuple[list[str], list[int], list[str], str]:
    fields = gguf.GGUFReader(default_model_path()).fields
    return (
        fields["tokenizer.ggml.tokens"].contents(),
        fields["tokenizer.ggml.token_type"].contents(),
        fields["tokenizer.ggml.merges"].contents(),
        fields["tokenizer.chat_template"].contents(),
    )


def _smollm2_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    tokens, types, merges, template = _smollm2_vocab()
    tok = Tokenizer(
        models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[tuple(m.split(" ")) for m in merges])
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types, strict=False) if k == 3]
    )
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|im_end|>",
        clean_up_tokenization_spaces=False,
    )
    hf.chat_template = template
    return hf


def _trained_bpe(
    split: str,
    vocab_size: int,
    specials: list[str],
    *,
    ignore_merges: bool = False,
    clean_up: bool = False,
    **special_map: str,
) -> PreTrainedTokenizerFast:
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.splitlines(keepends=True), trainer)
    tok.model.ignore_merges = ignore_merges
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    if bos := special_map.get("bos_token"):  # Llama 3's tokenizer.json adds BOS in its post-processor
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=clean_up, **special_map)
    hf.chat_template = CHATML
    return hf


def _trained_spm(tmp: Path, kind: str, vocab_size: int) -> Any:
    import sentencepiece as spm

    corpus = tmp / "corpus.txt"
    corpus.write_text(CORPUS, encoding="utf-8")
    extra: dict[str, Any]
    if kind == "gemma":
        extra = dict(
            pad_id=0, eos_id=1, bos_id=2, unk_id=3, bos_piece="<bos>", eos_piece="<eos>",
            add_dummy_prefix=False, control_symbols=["<mask>", "<start_of_turn>", "<end_of_turn>"],
        )  # fmt: skip
        config = {"tokenizer_class": "GemmaTokenizer", "bos_token": "<bos>", "eos_token": "<eos>",
                  "pad_token": "<pad>", "unk_token": "<unk>", "mask_token": "<mask>", "add_bos_token": True}  # fmt: skip
    else:
        extra = {}
        config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False}
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(tmp / kind), vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity",
        remove_extra_whitespaces=False, split_digits=True, allow_whitespace_only_pieces=True,
        minloglevel=2, **extra,
    )  # fmt: skip
    tok_dir = tmp / f"{kind}-tokenizer"
    tok_dir.mkdir(exist_ok=True)
    (tok_dir / "tokenizer.model").write_bytes((tmp / f"{kind}.model").read_bytes())
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(config))
    return AutoTokenizer.from_pretrained(tok_dir)


def make_tokenizer(kind: str, tmp: Path) -> Any:
    """A transformers tokenizer of one of the kinds in the module docstring."""
    if kind == "smollm2":
        return _smollm2_tokenizer()
    if kind == "bpe-qwen2":  # Qwen 2's layout: BOS-less, <|endoftext|> and the ChatML pair
        return _trained_bpe(
            QWEN2_SPLIT, 384, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
            eos_token="<|im_end|>", pad_token="<|endoftext|>",
        )  # fmt: skip
    if kind == "bpe-llama3":
        return _trained_bpe(
            LLAMA3_SPLIT, 384, ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"],
            ignore_merges=True, clean_up=True,  # as Llama 3's tokenizer files say
            bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
        )  # fmt: skip
    if kind in ("spm-llama", "spm-gemma"):
        return _trained_spm(tmp, kind.removeprefix("spm-"), 400)
    raise ValueError(f"unknown tokenizer kind {kind!r}")


# family -> (transformers config class, its arguments, tokenizer kind)
FAMILIES: dict[str, tuple[str, dict[str, Any], str]] = {
    # SmolLM-like: tied embeddings, SmolLM2's tokenizer
    "llama": ("LlamaConfig", {"tie_word_embeddings": True}, "smollm2"),
    # Llama 2 / Mistral-like: SentencePiece, untied output
    "mistral": ("MistralConfig", {"tie_word_embeddings": False, "sliding_window": None}, "spm-llama"),
    "qwen2": ("Qwen2Config", {"tie_word_embeddings": False}, "bpe-qwen2"),
    # head_dim 32 != hidden / heads = 16, as Qwen 3's real models differ too
    "qwen3": ("Qwen3Config", {"tie_word_embeddings": True, "head_dim": 32}, "bpe-llama3"),
    # 6 layers: 5 local (window 8) and 1 global; head_dim 32 != 64 / 4
    "gemma3": (
        "Gemma3TextConfig",
        {
            "num_hidden_layers": 6,
            "head_dim": 32,
            "query_pre_attn_scalar": 32,
            "sliding_window": 8,
            "rope_parameters": {
                "full_attention": {"rope_type": "default", "rope_theta": 1e6},
                "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
            },
        },
        "spm-gemma",
    ),
    "phi3": (
        "Phi3Config",
        {
            "tie_word_embeddings": False,
            "original_max_position_embeddings": 256,
            "sliding_window": None,
            "pad_token_id": 0,
        },
        "spm-llama",
    ),
}
_MODEL_CLASSES = {"Gemma3TextConfig": "Gemma3ForCausalLM"}


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights that make logits spread (std ~1/sqrt(fan_in)); norms near their neutral value."""
    gen = torch.Generator().manual_seed(seed)
    gemma = "Gemma" in type(model).__name__
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim == 2:
                gain = 3.0 if "embed" in name or "lm_head" in name else 1.0
                p.copy_(noise * gain / p.shape[1] ** 0.5)
            elif "norm" in name:  # Gemma scales by 1 + w, the others by w
                p.copy_((0.0 if gemma else 1.0) + 0.1 * noise)
            else:
                p.copy_(0.1 * noise)


def make_checkpoint(
    family: str,
    out_dir: Path,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    tokenizer: str | None = None,
    **config: Any,
) -> tuple[Path, Any]:
    """Save a random `family` model (FAMILIES) and a tokenizer (its own kind, or `tokenizer`) in
    `out_dir`, stored as `dtype`; return (dir, the HF model in float32)."""
    import transformers

    config_name, defaults, tok_kind = FAMILIES[family]
    tok_kind = tokenizer or tok_kind
    out_dir.mkdir(parents=True, exist_ok=True)
    hf_tokenizer = make_tokenizer(tok_kind, out_dir.parent)
    args: dict[str, Any] = dict(
        vocab_size=len(hf_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
        bos_token_id=hf_tokenizer.bos_token_id, eos_token_id=hf_tokenizer.eos_token_id,
    )  # fmt: skip
    args |= defaults | config
    hf_config = getattr(transformers, config_name)(**args)
    model_class = getattr(
        transformers, _MODEL_CLASSES.get(config_name, config_name.replace("Config", "ForCausalLM"))
    )
    torch.manual_seed(seed)
    model = model_class(hf_config)
    _randomize(model, seed)
    with torch.no_grad():  # the values `dtype` stores; buffers (rope inv_freq) keep float32
        for param in model.parameters():
            param.copy_(param.to(dtype))
    model.eval()
    copy.deepcopy(model).to(dtype).save_pretrained(out_dir, safe_serialization=True)
    hf_tokenizer.save_pretrained(out_dir)
    if tok_kind.startswith("spm-"):  # transformers 5 saves tokenizer.json only; real repos ship both
        (out_dir / "tokenizer.model").write_bytes((out_dir.parent / f"{tok_kind[4:]}.model").read_bytes())
    return out_dir, model
