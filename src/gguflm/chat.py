"""Chat templates: turn a list of messages into the prompt text a model was trained on.

A GGUF file carries its template as Jinja source in `tokenizer.chat_template`, written for Hugging
Face's `apply_chat_template`. We render it the way transformers does (same sandbox options, globals
and `tojson`) so the prompt matches what the model saw in training; llama.cpp's
`--chat-template NAME|FILE` is `ChatTemplate.from_metadata(metadata, override=...)`.

A template is untrusted input: anyone can publish a GGUF. It runs in jinja2's
`ImmutableSandboxedEnvironment`, which refuses access to Python internals; on top of that this module
bounds render time and the size of what a template builds (see `RenderLimits`), so a hostile template
fails with `ChatTemplateError` instead of hanging or filling memory.

Messages are OpenAI-style dicts. A list of content parts (`[{"type": "text", "text": ...}]`) is
joined with "\\n" into one string before rendering, as llama.cpp does for templates written for
string content; other part types (images) are refused, since these models read text only.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime
from functools import wraps
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar, NoReturn

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.parser import Parser
from jinja2.runtime import Context
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError
from jinja2.utils import Namespace, pass_context

__all__ = [
    "BUILTIN_TEMPLATES",
    "DEFAULT_TEMPLATE",
    "ChatTemplate",
    "ChatTemplateError",
    "RenderLimits",
]


class ChatTemplateError(ValueError):
    """A chat template that cannot be compiled or rendered: syntax, unsafe access, raise_exception, limits."""


@dataclass(frozen=True)
class RenderLimits:
    """Bounds on one render, so that a hostile template fails fast instead of hanging or filling memory.

    `max_length` caps the output and every string or list the template builds (a list counts its items
    plus the length of the strings inside it).
    """

    max_seconds: float = 5.0
    max_length: int = 4_000_000


_MAX_INT_BITS = 1 << 16  # integers a template may build with * and **
_MAX_JSON_INDENT = 64

# Built-in templates, written to give exactly llama.cpp's strings (src/llama-chat.cpp,
# llm_chat_apply_template). None of them writes BOS text: llama.cpp's tokenizer adds BOS itself.
_WS = r"' \t\n\v\f\r'"  # what C's isspace() strips in llama.cpp's trim()

_CHATML = (
    r"{%- for message in messages -%}"
    r"{{- '<|im_start|>' + message['role'] + '\n' + (message['content'] or '') + '<|im_end|>\n' -}}"
    r"{%- endfor -%}"
    r"{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"
)

# llama.cpp's "llama2-sys": [INST] turns with a <<SYS>> block, no BOS text between turns, content not
# stripped, and no generation prompt (the prompt already ends in [/INST]).
_LLAMA2 = (
    r"{{- '[INST] ' -}}"
    r"{%- set ns = namespace(in_turn=true) -%}"
    r"{%- for message in messages -%}"
    r"{%- set content = message['content'] or '' -%}"
    r"{%- if not ns.in_turn -%}{{- '[INST] ' -}}{%- set ns.in_turn = true -%}{%- endif -%}"
    r"{%- if message['role'] == 'system' -%}{{- '<<SYS>>\n' + content + '\n<</SYS>>\n\n' -}}"
    r"{%- elif message['role'] == 'user' -%}{{- content + ' [/INST]' -}}"
    r"{%- else -%}{{- content + '</s>' -}}{%- set ns.in_turn = false -%}"
    r"{%- endif -%}"
    r"{%- endfor -%}"
)

_LLAMA3 = (
    r"{%- for message in messages -%}"
    r"{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    r" + (message['content'] or '').strip(" + _WS + r") + '<|eot_id|>' -}}"
    r"{%- endfor -%}"
    r"{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}{%- endif -%}"
)

# llama.cpp's "mistral-v7" (Mistral Large 2411, Small 3): no generation prompt.
_MISTRAL_V7 = (
    r"{%- for message in messages -%}"
    r"{%- set content = message['content'] or '' -%}"
    r"{%- if message['role'] == 'system' -%}{{- '[SYSTEM_PROMPT] ' + content + '[/SYSTEM_PROMPT]' -}}"
    r"{%- elif message['role'] == 'user' -%}{{- '[INST] ' + content + '[/INST]' -}}"
    r"{%- else -%}{{- ' ' + content + '</s>' -}}"
    r"{%- endif -%}"
    r"{%- endfor -%}"
)

# llama.cpp's "mistral-v3" (Mistral 7B v0.3, Mistral Large 2407): the system prompt goes inside the
# turn, assistant replies are stripped; no generation prompt.
_MISTRAL_V3 = (
    r"{%- set ns = namespace(in_turn=false) -%}"
    r"{%- for message in messages -%}"
    r"{%- set content = message['content'] or '' -%}"
    r"{%- if not ns.in_turn -%}{{- '[INST] ' -}}{%- set ns.in_turn = true -%}{%- endif -%}"
    r"{%- if message['role'] == 'system' -%}{{- content + '\n\n' -}}"
    r"{%- elif message['role'] == 'user' -%}{{- content + '[/INST]' -}}"
    r"{%- else -%}{{- ' ' + content.strip(" + _WS + r") + '</s>' -}}{%- set ns.in_turn = false -%}"
    r"{%- endif -%}"
    r"{%- endfor -%}"
)

# llama.cpp's "gemma": no system turn (its text opens the next user turn), "model" for the assistant,
# every content trimmed.
_GEMMA = (
    r"{%- set ns = namespace(system='') -%}"
    r"{%- for message in messages -%}"
    r"{%- set content = (message['content'] or '').strip(" + _WS + r") -%}"
    r"{%- if message['role'] == 'system' -%}{%- set ns.system = ns.system + content -%}"
    r"{%- else -%}"
    r"{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    r"{{- '<start_of_turn>' + role + '\n' -}}"
    r"{%- if ns.system and role != 'model' -%}{{- ns.system + '\n\n' -}}{%- set ns.system = '' -%}{%- endif -%}"
    r"{{- content + '<end_of_turn>\n' -}}"
    r"{%- endif -%}"
    r"{%- endfor -%}"
    r"{%- if add_generation_prompt -%}{{- '<start_of_turn>model\n' -}}{%- endif -%}"
)

# llama.cpp's "phi3": <|role|> turns ended by <|end|>, content as given.
_PHI3 = (
    r"{%- for message in messages -%}"
    r"{{- '<|' + message['role'] + '|>\n' + (message['content'] or '') + '<|end|>\n' -}}"
    r"{%- endfor -%}"
    r"{%- if add_generation_prompt -%}{{- '<|assistant|>\n' -}}{%- endif -%}"
)

BUILTIN_TEMPLATES: Mapping[str, str] = MappingProxyType(
    {
        "chatml": _CHATML,
        "gemma": _GEMMA,
        "llama2": _LLAMA2,
        "llama3": _LLAMA3,
        "mistral": _MISTRAL_V7,
        "mistral-v3": _MISTRAL_V3,
        "mistral-v7": _MISTRAL_V7,
        "phi3": _PHI3,
    }
)
"""Built-in templates by name (Jinja source); `--chat-template NAME` picks one."""

DEFAULT_TEMPLATE = "chatml"
"""What a file without `tokenizer.chat_template` gets, as in llama.cpp."""

_RESERVED = frozenset({"messages", "tools", "add_generation_prompt", "bos_token", "eos_token"})


# ---- render guards -------------------------------------------------------------------------------

_DEADLINE: ContextVar[tuple[float, float] | None] = ContextVar("gguflm_chat_deadline", default=None)


def _check_time() -> None:
    """Called on every loop step, call and operator: a template that runs away stops here."""
    state = _DEADLINE.get()
    if state is not None and time.monotonic() > state[0]:
        raise ChatTemplateError(f"chat template ran longer than {state[1]:g} s (a loop that does not end?)")


def _size(value: Any, memo: dict[int, int] | None = None) -> int:
    """How big a value is once written out: string lengths, plus one per other item, shared parts each time."""
    if isinstance(value, str):
        return len(value)
    if not isinstance(value, (list, tuple, dict)):
        return 1
    memo = {} if memo is None else memo
    key = id(value)
    if key not in memo:
        memo[key] = 0  # containers here cannot be cyclic; this only stops a loop if one ever were
        parts = [*value.keys(), *value.values()] if isinstance(value, dict) else value
        memo[key] = len(value) + sum(_size(v, memo) for v in parts)
    return memo[key]


_PRINTF_SPEC = re.compile(r"%(?:\([^)]*\))?[#0\- +]*(\*|\d+)?(?:\.(\*|\d+))?")
_BRACE_SPEC = re.compile(r"\{[^{}]*?:([^{}]*)\}")


def _format_width(fmt: str, ints: list[int], printf: bool) -> int:
    """The widest field a format string asks for (widths given as arguments count as the largest int)."""
    widths, from_args = [0], False
    if printf:
        for match in _PRINTF_SPEC.finditer(fmt):
            for group in match.groups():
                from_args |= group == "*"
                widths.append(int(group) if group and group.isdigit() else 0)
    else:
        from_args = ":{" in fmt
        widths += [int(d) for spec in _BRACE_SPEC.findall(fmt) for d in re.findall(r"\d+", spec)]
    if from_args:
        widths += ints
    return max(widths)


def _ints(args: Any) -> list[int]:
    """The integers among format arguments (a tuple, a mapping or a single value)."""
    if isinstance(args, Mapping):
        args = list(args.values())
    values = args if isinstance(args, (list, tuple)) else [args]
    return [v for v in values if isinstance(v, int)]


def _too_big(limit: int) -> NoReturn:
    raise ChatTemplateError(f"chat template builds a value longer than {limit} characters")


class _Namespace(Namespace):
    """jinja2's `namespace()`, refusing underscore names so a template cannot shadow internals."""

    def __init__(self, /, *args: Any, **kwargs: Any) -> None:
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _check_namespace_name(name)
        Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _check_namespace_name(name)
        super().__setitem__(name, value)


def _check_namespace_name(name: Any) -> None:
    if isinstance(name, str) and name.startswith("_"):
        raise SecurityError(f"namespace attribute {name!r} starts with an underscore")


def _make_dict(*args: Any, **kwargs: Any) -> dict[Any, Any]:
    """`dict(...)` for templates, without the class object (and its `mro`, `fromkeys`) behind it."""
    return dict(*args, **kwargs)


def _raise_exception(message: Any) -> NoReturn:
    raise ChatTemplateError(str(message))


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | str | None = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    """transformers' `tojson`: plain json.dumps (no HTML escaping), non-ASCII kept, optional indent."""
    if isinstance(indent, (int, str)) and not isinstance(indent, bool):
        if (indent if isinstance(indent, int) else len(indent)) > _MAX_JSON_INDENT:
            raise ChatTemplateError(f"tojson indent is larger than {_MAX_JSON_INDENT}")
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


class _GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}` (transformers marks assistant text with it); renders its body."""

    tags: ClassVar[set[str]] = {"generation"}

    def parse(self, parser: Parser) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body, lineno=lineno)


_LOOP_GUARD = "gguflm.loop-guard"  # names no template can write, so only our AST rewrite uses them
_SIZE_GUARD = "gguflm.size-guard"


@pass_context  # pass_context keeps jinja2 from evaluating it at compile time
def _loop_guard(_context: Context, iterable: Any) -> Any:
    for item in iterable:
        _check_time()
        yield item


class _GuardedEnvironment(ImmutableSandboxedEnvironment):
    """The sandbox transformers uses, plus time and size bounds on loops, calls, operators and filters."""

    intercepted_binops = frozenset({"+", "*", "**", "%"})

    def __init__(self, limits: RenderLimits) -> None:
        super().__init__(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols", _GenerationTag]
        )
        self.limits = limits
        self.globals.pop("lipsum", None)  # random filler text; no template needs it
        self.globals.update(
            raise_exception=_raise_exception,
            strftime_now=_strftime_now,
            namespace=_Namespace,
            dict=_make_dict,
        )
        self.filters["tojson"] = _tojson
        self.filters = {name: self._guard_filter(name, f) for name, f in self.filters.items()}
        self.filters[_LOOP_GUARD] = _loop_guard
        self.filters[_SIZE_GUARD] = self._bounded

    def parse_guarded(self, source: str) -> nodes.Template:
        """Parse, then route every loop through `_loop_guard` and every `set` through a size check."""
        tree = self.parse(source)
        for loop in list(tree.find_all(nodes.For)):
            loop.iter = nodes.Filter(loop.iter, _LOOP_GUARD, [], [], None, None, lineno=loop.lineno)
        for assign in list(tree.find_all(nodes.Assign)):
            assign.node = nodes.Filter(assign.node, _SIZE_GUARD, [], [], None, None, lineno=assign.lineno)
        for block in list(tree.find_all(nodes.AssignBlock)):
            block.filter = nodes.Filter(block.filter, _SIZE_GUARD, [], [], None, None, lineno=block.lineno)
        return tree

    def unsafe_undefined(self, obj: Any, attribute: str) -> NoReturn:
        """Fail at once, not later when the value is printed: `{% if x.__class__ %}` must not pass silently."""
        raise SecurityError(
            f"access to attribute {attribute!r} of a {type(obj).__name__} object is not allowed"
        )

    def _bounded(self, value: Any) -> Any:
        if _size(value) > self.limits.max_length:
            _too_big(self.limits.max_length)
        return value

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        _check_time()
        limit = self.limits.max_length
        if operator == "*":
            seq, count = (right, left) if isinstance(left, int) else (left, right)
            if isinstance(seq, (str, list, tuple)) and isinstance(count, int) and _size(seq) * count > limit:
                _too_big(limit)
            if isinstance(left, int) and isinstance(right, int):
                if left.bit_length() + right.bit_length() > _MAX_INT_BITS:
                    raise ChatTemplateError("chat template builds an integer too large")
        elif operator == "**" and isinstance(left, int) and isinstance(right, int):
            if abs(left) > 1 and right * left.bit_length() > _MAX_INT_BITS:
                raise ChatTemplateError("chat template builds an integer too large")
        elif operator == "%" and isinstance(left, str) and _format_width(left, _ints(right), True) > limit:
            _too_big(limit)
        return self._bounded(self.binop_table[operator](left, right))

    def call(self, context: Context, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        _check_time()
        limit = self.limits.max_length
        memo: dict[int, int] = {}
        if sum(_size(v, memo) for v in (*args, *kwargs.values())) > limit:
            _too_big(limit)
        target = getattr(obj, "__wrapped__", obj)  # the sandbox wraps str.format
        owner = getattr(target, "__self__", None)
        if isinstance(owner, str):
            ints = _ints([*args, *kwargs.values()])
            name = getattr(target, "__name__", "")
            if name in ("center", "ljust", "rjust", "zfill") and max(ints, default=0) > limit:
                _too_big(limit)
            if name == "expandtabs" and owner.count("\t") * (ints[0] if ints else 8) > limit:
                _too_big(limit)
            if name == "replace" and len(args) >= 2:
                self._check_replace(owner, args[0], args[1])
            if name in ("format", "format_map"):
                values = _ints(args[0]) if name == "format_map" and args else ints
                if _format_width(owner, values, False) > limit:
                    _too_big(limit)
        return self._bounded(super().call(context, obj, *args, **kwargs))

    def _check_replace(self, text: Any, old: Any, new: Any) -> None:
        if isinstance(text, str) and isinstance(old, str) and isinstance(new, str):
            count = text.count(old) if old else len(text) + 1
            if len(text) + count * max(0, len(new) - len(old)) > self.limits.max_length:
                _too_big(self.limits.max_length)

    def _guard_filter(self, name: str, f: Callable[..., Any]) -> Callable[..., Any]:
        """Wrap a filter: time check, a size estimate before the filters that multiply text, size after."""
        first = 1 if getattr(f, "jinja_pass_arg", None) is not None else 0  # skip context/environment

        @wraps(f)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            _check_time()
            if name == "join" and len(args) > first and not isinstance(args[first], (list, tuple, str)):
                args = (*args[:first], list(args[first]), *args[first + 1 :])  # measure generators
            self._check_filter(name, args[first:], kwargs)
            return self._bounded(f(*args, **kwargs))

        return guarded

    def _check_filter(self, name: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> None:
        limit = self.limits.max_length
        value = args[0] if args else None
        option = args[1] if len(args) > 1 else None
        text = value if isinstance(value, str) else ""
        if name == "center":
            width = kwargs.get("width", option)
            if isinstance(width, int) and width > limit:
                _too_big(limit)
        elif name == "indent":
            width = kwargs.get("width", option if option is not None else 4)
            step = width if isinstance(width, int) else len(str(width))
            if len(text) + (text.count("\n") + 1) * step > limit:
                _too_big(limit)
        elif name == "replace" and len(args) >= 3:
            self._check_replace(value, args[1], args[2])
        elif name == "format":
            if _format_width(text, _ints(kwargs or list(args[1:])), True) > limit:
                _too_big(limit)
        elif name == "join" and isinstance(value, (list, tuple)):
            sep = kwargs.get("d", option if option is not None else "")
            if _size(value) + max(len(value) - 1, 0) * len(str(sep)) > limit:
                _too_big(limit)


# ---- inputs --------------------------------------------------------------------------------------


def _plain(value: Any, where: str) -> Any:
    """A copy made of JSON types only: what a template sees must not carry methods of rich objects."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        return str(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"{where}: keys must be strings, got {key!r}")
            out[str(key)] = _plain(item, f"{where}.{key}")
        return out
    if isinstance(value, (list, tuple)):
        return [_plain(item, f"{where}[{i}]") for i, item in enumerate(value)]
    raise ValueError(
        f"{where}: a {type(value).__name__} is not JSON data (use str, number, bool, None, list, dict)"
    )


def _content_text(content: Any, role: str, where: str) -> str | None:
    """A message's content as one string (text parts joined with "\\n"), or None for an assistant tool call."""
    if isinstance(content, str):
        return str(content)
    if content is None:
        if role == "assistant":
            return None
        raise ValueError(f"{where}: 'content' is None; only assistant messages (tool calls) may omit it")
    if isinstance(content, (list, tuple)):
        texts = []
        for j, part in enumerate(content):
            if (
                not isinstance(part, Mapping)
                or part.get("type") != "text"
                or not isinstance(part.get("text"), str)
            ):
                kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
                raise ValueError(
                    f"{where}: content part {j} is {kind!r}; only {{'type': 'text', 'text': str}} parts are supported"
                )
            texts.append(str(part["text"]))
        return "\n".join(texts)
    raise ValueError(
        f"{where}: 'content' must be a string, a list of text parts or None, not {type(content).__name__}"
    )


def _check_messages(messages: Any) -> list[dict[str, Any]]:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ValueError("messages must be a list of dicts like {'role': 'user', 'content': 'Hi'}")
    out = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, Mapping):
            raise ValueError(
                f"{where} must be a dict with 'role' and 'content', not {type(message).__name__}"
            )
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise ValueError(f"{where}: 'role' must be a non-empty string, got {role!r}")
        if "content" not in message and role != "assistant":
            raise ValueError(f"{where}: missing 'content'")
        plain = _plain(message, where)
        plain["content"] = _content_text(message.get("content"), role, where)
        out.append(plain)
    return out


def _token_text(metadata: Mapping[str, Any], key: str) -> str:
    tid, tokens = metadata.get(key), metadata.get("tokenizer.ggml.tokens")
    if isinstance(tid, int) and isinstance(tokens, Sequence) and 0 <= tid < len(tokens):
        text = tokens[tid]
        return text if isinstance(text, str) else ""
    return ""


def _resolve(override: str) -> tuple[str, str]:
    """(source, name) for `--chat-template NAME|FILE` or an inline template string."""
    if override in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[override], override
    if "{{" in override or "{%" in override:
        return override, "inline"
    try:
        is_file = Path(override).is_file()
    except (OSError, ValueError):  # names too long for the file system, NUL bytes
        is_file = False
    if is_file:
        try:
            return Path(override).read_text(encoding="utf-8"), override
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read chat template file {override}: {e}") from e
    raise ValueError(
        f"unknown chat template {override!r}: not a built-in name ({', '.join(BUILTIN_TEMPLATES)}), "
        "an existing file, or a Jinja template"
    )


# ---- the template --------------------------------------------------------------------------------


class ChatTemplate:
    """A compiled chat template; `render(messages)` gives the prompt text.

    `add_bos` / `add_eos`: whether the tokenizer adds BOS / EOS itself. If so, a leading BOS text (a
    trailing EOS text) that the template writes is dropped so the prompt does not get two, as in
    llama.cpp's common_chat_templates_apply. `name` says where the template came from.
    """

    def __init__(
        self,
        source: str,
        *,
        name: str = "inline",
        bos_token: str = "",
        eos_token: str = "",
        add_bos: bool = False,
        add_eos: bool = False,
        limits: RenderLimits | None = None,
    ) -> None:
        if not isinstance(source, str):
            raise ChatTemplateError(f"chat template must be a string, not {type(source).__name__}")
        self.source, self.name = source, name
        self.bos_token, self.eos_token = bos_token, eos_token
        self.add_bos, self.add_eos = add_bos, add_eos
        self.limits = limits or RenderLimits()
        self.is_builtin = name in BUILTIN_TEMPLATES and source == BUILTIN_TEMPLATES[name]
        self._env = _GuardedEnvironment(self.limits)
        try:
            self._template = self._env.from_string(self._env.parse_guarded(source))
        except jinja2.TemplateSyntaxError as e:
            lines = source.splitlines()
            line = lines[e.lineno - 1].strip() if 0 < e.lineno <= len(lines) else ""
            near = f" near {line[:80]!r}" if line else ""
            raise ChatTemplateError(
                f"chat template {name!r} syntax error, line {e.lineno}{near}: {e.message}"
            ) from e

    @classmethod
    def builtin(cls, name: str) -> ChatTemplate:
        """One of BUILTIN_TEMPLATES by name."""
        if name not in BUILTIN_TEMPLATES:
            raise ValueError(
                f"unknown built-in chat template {name!r}; known: {', '.join(BUILTIN_TEMPLATES)}"
            )
        return cls(BUILTIN_TEMPLATES[name], name=name)

    @classmethod
    def from_metadata(
        cls,
        metadata: Mapping[str, Any],
        override: str | None = None,
        *,
        add_bos: bool | None = None,
        add_eos: bool | None = None,
        limits: RenderLimits | None = None,
    ) -> ChatTemplate:
        """The template of a GGUF file, or `override` (built-in name, file path or Jinja source).

        A file without `tokenizer.chat_template` gets chatml, as in llama.cpp. `add_bos` / `add_eos`
        default to the file's `tokenizer.ggml.add_bos_token` / `add_eos_token` (False when absent);
        pass the tokenizer's own values when it decides differently.
        """
        bos, eos = (
            _token_text(metadata, "tokenizer.ggml.bos_token_id"),
            _token_text(metadata, "tokenizer.ggml.eos_token_id"),
        )
        if override is not None:
            source, name = _resolve(override)
        else:
            source, name = metadata.get("tokenizer.chat_template"), "gguf"
            if source is None or source == "":
                source, name = BUILTIN_TEMPLATES[DEFAULT_TEMPLATE], DEFAULT_TEMPLATE
            elif not isinstance(source, str):
                raise ChatTemplateError(f"tokenizer.chat_template is a {type(source).__name__}, not a string")
        if name in BUILTIN_TEMPLATES:  # llama.cpp's built-ins never strip BOS / EOS text
            add_bos = add_eos = False
        add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", False)) if add_bos is None else add_bos
        add_eos = bool(metadata.get("tokenizer.ggml.add_eos_token", False)) if add_eos is None else add_eos
        return cls(
            source, name=name, bos_token=bos, eos_token=eos, add_bos=add_bos, add_eos=add_eos, limits=limits
        )

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[Mapping[str, Any]] | None = None,
        **extra: Any,
    ) -> str:
        """The prompt for `messages`; `add_generation_prompt` opens the assistant's turn.

        `tools` (OpenAI function schemas) reach the template as `tools`, None when empty as in
        llama.cpp; `extra` adds variables (e.g. `enable_thinking=False`). Bad messages raise
        ValueError; a template that fails raises ChatTemplateError.
        """
        context: dict[str, Any] = {"messages": _check_messages(messages)}
        if tools is not None and not isinstance(tools, (list, tuple)):
            raise ValueError(f"tools must be a list of dicts or None, not {type(tools).__name__}")
        for i, tool in enumerate(tools or []):
            if not isinstance(tool, Mapping):
                raise ValueError(
                    f"tools[{i}] must be a dict (an OpenAI function schema), not {type(tool).__name__}"
                )
        if tools and self.is_builtin:
            raise ValueError(
                f"built-in chat template {self.name!r} cannot show tools; describe them in a system message"
            )
        context["tools"] = _plain(list(tools), "tools") if tools else None
        clash = _RESERVED & extra.keys()
        if clash:
            raise ValueError(
                f"render() sets {', '.join(sorted(clash))} itself; do not pass them as extra variables"
            )
        context.update({key: _plain(value, key) for key, value in extra.items()})
        context.update(
            add_generation_prompt=bool(add_generation_prompt),
            bos_token=self.bos_token,
            eos_token=self.eos_token,
        )

        text = self._render(context)
        if self.add_bos and self.bos_token and text.startswith(self.bos_token):
            text = text[len(self.bos_token) :]
        if self.add_eos and self.eos_token and text.endswith(self.eos_token):
            text = text[: -len(self.eos_token)]
        return text

    def _render(self, context: dict[str, Any]) -> str:
        limit = self.limits.max_length
        token = _DEADLINE.set((time.monotonic() + self.limits.max_seconds, self.limits.max_seconds))
        try:
            chunks, total = [], 0
            for chunk in self._template.generate(context):
                total += len(chunk)
                if total > limit:
                    raise ChatTemplateError(f"chat template output is longer than {limit} characters")
                chunks.append(chunk)
            return "".join(chunks)
        except ChatTemplateError:
            raise
        except SecurityError as e:
            raise ChatTemplateError(f"chat template {self.name!r} is unsafe: {e}") from e
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"chat template {self.name!r} failed: {e}") from e
        except RecursionError as e:
            raise ChatTemplateError(f"chat template {self.name!r} recursed too deeply") from e
        except MemoryError as e:
            raise ChatTemplateError(f"chat template {self.name!r} ran out of memory") from e
        except (ArithmeticError, LookupError, TypeError, ValueError, AttributeError) as e:
            raise ChatTemplateError(f"chat template {self.name!r} failed: {type(e).__name__}: {e}") from e
        finally:
            _DEADLINE.reset(token)

    def __repr__(self) -> str:
        return f"ChatTemplate(name={self.name!r})"
