"""JSON Schemas of the request bodies, published in `/openapi.json`.

The handlers read raw JSON and check each field themselves (so that a bad field gets the OpenAI
error shape and a message naming it); these schemas only describe what they accept, for clients,
generated SDKs and schema-driven testers (tests/test_server.py runs schemathesis against them).
"""

from __future__ import annotations

from typing import Any

_INT: dict[str, Any] = {"type": "integer"}
_NUM: dict[str, Any] = {"type": "number"}
_BOOL: dict[str, Any] = {"type": "boolean"}
_STR: dict[str, Any] = {"type": "string"}
_TOKENS: dict[str, Any] = {"type": "array", "items": {"type": "integer", "minimum": 0}}
_STRINGS: dict[str, Any] = {"type": "array", "items": _STR}

# a prompt: text, token ids, or (OpenAI completions) a batch of either
_PROMPT: dict[str, Any] = {"anyOf": [_STR, _TOKENS, {"type": "array", "items": {"anyOf": [_STR, _TOKENS]}}]}

# OpenAI's sampling fields and llama-server's extra ones, shared by every generating endpoint
_SAMPLING: dict[str, Any] = {
    "temperature": _NUM,
    "top_k": _INT,
    "top_p": _NUM,
    "min_p": _NUM,
    "typical_p": _NUM,
    "top_n_sigma": _NUM,
    "dynatemp_range": _NUM,
    "dynatemp_exponent": _NUM,
    "xtc_probability": _NUM,
    "xtc_threshold": _NUM,
    "min_keep": _INT,
    "repeat_last_n": _INT,
    "repeat_penalty": _NUM,
    "presence_penalty": _NUM,
    "frequency_penalty": _NUM,
    "dry_multiplier": _NUM,
    "dry_base": _NUM,
    "dry_allowed_length": _INT,
    "dry_penalty_last_n": _INT,
    "dry_sequence_breakers": _STRINGS,
    "mirostat": {"type": "integer", "enum": [0, 1, 2]},
    "mirostat_tau": _NUM,
    "mirostat_eta": _NUM,
    "samplers": {"anyOf": [_STR, _STRINGS]},
    "seed": _INT,
    "stop": {"anyOf": [_STR, _STRINGS]},
    "max_tokens": _INT,
    "max_completion_tokens": _INT,
    "n_predict": _INT,
    "ignore_eos": _BOOL,
    "logit_bias": {
        "anyOf": [
            {"type": "object", "additionalProperties": {"anyOf": [_NUM, _BOOL]}},
            {"type": "array", "items": {"type": "array", "items": {"anyOf": [_INT, _STR, _NUM, _BOOL]}}},
        ]
    },
    "stream": _BOOL,
    "stream_options": {"type": "object", "properties": {"include_usage": _BOOL}},
    "cache_prompt": _BOOL,
    "grammar": _STR,
    "json_schema": {"type": "object"},
    "response_format": {
        "type": "object",
        "properties": {"type": {"type": "string", "enum": ["text", "json_object", "json_schema"]}},
    },
}

_MESSAGE: dict[str, Any] = {
    "type": "object",
    "required": ["role"],
    "properties": {
        "role": {"type": "string", "enum": ["system", "user", "assistant", "tool", "developer"]},
        "content": {
            "anyOf": [
                _STR,
                {"type": "null"},
                {
                    "type": "array",
                    "items": {"type": "object", "properties": {"type": _STR, "text": _STR}},
                },
            ]
        },
        "name": _STR,
    },
}


def _object(properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {"type": "object", "required": required, "properties": properties}


COMPLETIONS = _object(
    {**_SAMPLING, "prompt": _PROMPT, "model": _STR, "n": _INT, "logprobs": _INT}, ["prompt"]
)
CHAT = _object(
    {
        **_SAMPLING,
        "messages": {"type": "array", "items": _MESSAGE},
        "model": _STR,
        "n": _INT,
        "logprobs": _BOOL,
        "top_logprobs": _INT,
        "tools": {"type": "array", "items": {"type": "object"}},
    },
    ["messages"],
)
COMPLETION = _object(  # llama-server's native /completion
    {**_SAMPLING, "prompt": _PROMPT, "n_probs": _INT, "return_tokens": _BOOL, "timings_per_token": _BOOL},
    ["prompt"],
)
TOKENIZE = _object(
    {"content": _STR, "add_special": _BOOL, "parse_special": _BOOL, "with_pieces": _BOOL}, ["content"]
)
DETOKENIZE = _object({"tokens": _TOKENS}, ["tokens"])
APPLY_TEMPLATE = _object(
    {
        "messages": {"type": "array", "items": _MESSAGE},
        "tools": {"type": "array", "items": {"type": "object"}},
    },
    ["messages"],
)
EMBEDDINGS = _object({"input": _PROMPT, "model": _STR}, ["input"])


def body(schema: dict[str, Any]) -> dict[str, Any]:
    """FastAPI's `openapi_extra` for a route whose JSON body follows `schema`."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}
