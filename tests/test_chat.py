"""Chat templates: built-ins against llama.cpp's strings, SmolLM2's own template against hand-written
prompts and against transformers, and hostile templates that must fail with ChatTemplateError."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from gguflm.chat import BUILTIN_TEMPLATES, ChatTemplate, ChatTemplateError, RenderLimits
from gguflm.gguf_file import GGUFFile

SYSTEM = {"role": "system", "content": "You are a helpful assistant"}
SUAU = [
    SYSTEM,
    {"role": "user", "content": "Hello"},
    {"role": "assistant", "content": "Hi there"},
    {"role": "user", "content": "Who are you"},
]
# llama.cpp's tests/test-chat-template.cpp conversation: the padded reply shows who trims.
LLAMA_CPP_CONVERSATION = [
    *SUAU,
    {"role": "assistant", "content": "   I am an assistant   "},
    {"role": "user", "content": "Another question"},
]

CHATML_SUAU = (
    "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n"
    "<|im_start|>user\nHello<|im_end|>\n"
    "<|im_start|>assistant\nHi there<|im_end|>\n"
    "<|im_start|>user\nWho are you<|im_end|>\n"
)
LLAMA2_SUAU = "[INST] <<SYS>>\nYou are a helpful assistant\n<</SYS>>\n\nHello [/INST]Hi there</s>[INST] Who are you [/INST]"
LLAMA3_SUAU = (
    "<|start_header_id|>system<|end_header_id|>\n\nYou are a helpful assistant<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nHello<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\nHi there<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nWho are you<|eot_id|>"
)
MISTRAL_V7_SUAU = "[SYSTEM_PROMPT] You are a helpful assistant[/SYSTEM_PROMPT][INST] Hello[/INST] Hi there</s>[INST] Who are you[/INST]"
MISTRAL_V3_SUAU = "[INST] You are a helpful assistant\n\nHello[/INST] Hi there</s>[INST] Who are you[/INST]"

BUILTIN_CASES = [
    # (name, add_generation_prompt, expected)
    ("chatml", True, CHATML_SUAU + "<|im_start|>assistant\n"),
    ("chatml", False, CHATML_SUAU),
    ("llama2", True, LLAMA2_SUAU),  # llama.cpp's llama2 flavours have no generation prompt
    ("llama2", False, LLAMA2_SUAU),
    ("llama3", True, LLAMA3_SUAU + "<|start_header_id|>assistant<|end_header_id|>\n\n"),
    ("llama3", False, LLAMA3_SUAU),
    ("mistral", True, MISTRAL_V7_SUAU),
    ("mistral", False, MISTRAL_V7_SUAU),
    ("mistral-v7", True, MISTRAL_V7_SUAU),
    ("mistral-v3", True, MISTRAL_V3_SUAU),
    ("mistral-v3", False, MISTRAL_V3_SUAU),
]

# Expected outputs from llama.cpp's tests/test-chat-template.cpp (chatml, llama2-sys, llama3,
# mistral-v3) and from reading llm_chat_apply_template (mistral-v7), add_generation_prompt = true.
LLAMA_CPP_EXPECTED = {
    "chatml": "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n<|im_start|>user\nHello<|im_end|>\n"
    "<|im_start|>assistant\nHi there<|im_end|>\n<|im_start|>user\nWho are you<|im_end|>\n"
    "<|im_start|>assistant\n   I am an assistant   <|im_end|>\n<|im_start|>user\nAnother question<|im_end|>\n"
    "<|im_start|>assistant\n",
    "llama2": "[INST] <<SYS>>\nYou are a helpful assistant\n<</SYS>>\n\nHello [/INST]Hi there</s>"
    "[INST] Who are you [/INST]   I am an assistant   </s>[INST] Another question [/INST]",
    "llama3": "<|start_header_id|>system<|end_header_id|>\n\nYou are a helpful assistant<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nHello<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    "Hi there<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nWho are you<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\nI am an assistant<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nAnother question<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "mistral-v3": "[INST] You are a helpful assistant\n\nHello[/INST] Hi there</s>[INST] Who are you[/INST]"
    " I am an assistant</s>[INST] Another question[/INST]",
    "mistral-v7": "[SYSTEM_PROMPT] You are a helpful assistant[/SYSTEM_PROMPT][INST] Hello[/INST] Hi there</s>"
    "[INST] Who are you[/INST]    I am an assistant   </s>[INST] Another question[/INST]",
    "gemma": "<start_of_turn>user\nYou are a helpful assistant\n\nHello<end_of_turn>\n"
    "<start_of_turn>model\nHi there<end_of_turn>\n<start_of_turn>user\nWho are you<end_of_turn>\n"
    "<start_of_turn>model\nI am an assistant<end_of_turn>\n<start_of_turn>user\nAnother question<end_of_turn>\n"
    "<start_of_turn>model\n",
    "phi3": "<|system|>\nYou are a helpful assistant<|end|>\n<|user|>\nHello<|end|>\n<|assistant|>\nHi there<|end|>\n"
    "<|user|>\nWho are you<|end|>\n<|assistant|>\n   I am an assistant   <|end|>\n<|user|>\nAnother question<|end|>\n"
    "<|assistant|>\n",
}

SMOL_SYSTEM = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
)


@pytest.fixture(scope="module")
def smollm2_metadata(smollm2_path: Path) -> dict[str, Any]:
    return GGUFFile(smollm2_path).metadata


@pytest.fixture(scope="module")
def smollm2_template(smollm2_metadata: dict[str, Any]) -> ChatTemplate:
    return ChatTemplate.from_metadata(smollm2_metadata)


def render(source: str, messages: list[dict[str, Any]] | None = None, **kwargs: Any) -> str:
    return ChatTemplate(source).render(messages or [{"role": "user", "content": "hi"}], **kwargs)


# ---- built-ins -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "add_generation_prompt", "expected"), BUILTIN_CASES)
def test_builtin_system_user_assistant_user(name: str, add_generation_prompt: bool, expected: str) -> None:
    assert ChatTemplate.builtin(name).render(SUAU, add_generation_prompt=add_generation_prompt) == expected


@pytest.mark.parametrize("name", sorted(LLAMA_CPP_EXPECTED))
def test_builtin_matches_llama_cpp(name: str) -> None:
    assert ChatTemplate.builtin(name).render(LLAMA_CPP_CONVERSATION) == LLAMA_CPP_EXPECTED[name]


def test_builtin_names() -> None:
    assert set(BUILTIN_TEMPLATES) == {
        *("chatml", "gemma", "llama2", "llama3", "mistral", "mistral-v3", "mistral-v7", "phi3")
    }
    assert BUILTIN_TEMPLATES["mistral"] == BUILTIN_TEMPLATES["mistral-v7"]
    with pytest.raises(ValueError, match="chatml, gemma, llama2, llama3"):
        ChatTemplate.builtin("vicuna")


def test_builtin_edge_cases() -> None:
    assert ChatTemplate.builtin("llama2").render([]) == "[INST] "
    assert ChatTemplate.builtin("chatml").render([]) == "<|im_start|>assistant\n"
    # An assistant tool call without content renders as empty content, not "None".
    call = {
        "role": "assistant",
        "content": None,
        "tool_calls": [{"type": "function", "function": {"name": "f"}}],
    }
    assert ChatTemplate.builtin("chatml").render([call], add_generation_prompt=False) == (
        "<|im_start|>assistant\n<|im_end|>\n"
    )
    # llama.cpp's trim() strips C whitespace only, not e.g. a no-break space.
    msg = {"role": "user", "content": "\u00a0 x \t\n"}
    assert "\n\n\u00a0 x<|eot_id|>" in ChatTemplate.builtin("llama3").render([msg])
    with pytest.raises(ValueError, match="cannot show tools"):
        ChatTemplate.builtin("chatml").render(SUAU, tools=[{"type": "function", "function": {"name": "f"}}])


# ---- SmolLM2's own template ----------------------------------------------------------------------


def test_smollm2_template_from_file(smollm2_template: ChatTemplate) -> None:
    t = smollm2_template
    assert (t.name, t.bos_token, t.eos_token, t.add_bos) == ("gguf", "<|im_start|>", "<|im_end|>", False)
    assert t.render(SUAU) == CHATML_SUAU + "<|im_start|>assistant\n"
    assert t.render(SUAU, add_generation_prompt=False) == CHATML_SUAU
    # Without a system message first, the template inserts its own.
    assert t.render([{"role": "user", "content": "Hi"}]) == (
        SMOL_SYSTEM + "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert t.render(SUAU[1:3], add_generation_prompt=False) == (
        SMOL_SYSTEM + "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\nHi there<|im_end|>\n"
    )
    # Content parts are joined with a newline before the template sees them.
    parts = {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}
    assert t.render([SYSTEM, parts], add_generation_prompt=False).endswith(
        "<|im_start|>user\na\nb<|im_end|>\n"
    )


HF_CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    SUAU,
    LLAMA_CPP_CONVERSATION,
    [{"role": "user", "content": "Grüße, 日本語 🙂\nzweite Zeile\n"}, {"role": "assistant", "content": ""}],
    [{"role": "system", "content": ""}, {"role": "user", "content": "  {{ not jinja }} {% raw %}"}],
]


def test_smollm2_template_matches_transformers(smollm2_path: Path, smollm2_template: ChatTemplate) -> None:
    """transformers rebuilds the tokenizer, template included, from the GGUF and renders it its own way."""
    from hf_reference import hf_tokenizer

    tok = hf_tokenizer(smollm2_path)
    for conversation in HF_CONVERSATIONS:
        for gen in (True, False):
            expected = tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=gen)
            assert smollm2_template.render(conversation, add_generation_prompt=gen) == expected


TOOLS_TEMPLATE = """\
{%- set ns = namespace(n=0) -%}
{%- if tools %}{{ tools | tojson(indent=2) }}
{% endif -%}
{%- for message in messages -%}
  {%- if message.role == 'system' %}{% continue %}{% endif -%}
  {%- set ns.n = ns.n + 1 -%}
  {{ bos_token }}{{ message.role | upper }}: {{ message.content if message.content is not none else message.tool_calls | tojson }}{{ eos_token }}
{% endfor -%}
{{ ns.n }} {{ {'ä': [1, 'x']} | tojson }} {{ dict(a=1) | tojson(sort_keys=true) }}
{%- if add_generation_prompt %}ASSISTANT:{% endif %}"""


def test_globals_and_tojson_match_transformers() -> None:
    from transformers.utils.chat_template_utils import render_jinja_template

    tools = [{"type": "function", "function": {"name": "wetter", "description": "Grad °C", "parameters": {}}}]
    call = {"type": "function", "function": {"name": "wetter", "arguments": {"ort": "Zürich"}}}
    messages = [*SUAU, {"role": "assistant", "content": None, "tool_calls": [call]}]
    for gen in (True, False):
        ours = ChatTemplate(TOOLS_TEMPLATE, bos_token="<s>", eos_token="</s>").render(
            messages, add_generation_prompt=gen, tools=tools
        )
        (theirs,), _ = render_jinja_template(
            conversations=[messages],
            tools=tools,
            chat_template=TOOLS_TEMPLATE,
            add_generation_prompt=gen,
            bos_token="<s>",
            eos_token="</s>",
        )
        assert ours == theirs
    assert '"Grad °C"' in ours and '{"ä": [1, "x"]}' in ours


# ---- choosing a template -------------------------------------------------------------------------


def test_override_by_name_file_and_string(smollm2_metadata: dict[str, Any], tmp_path: Path) -> None:
    by_name = ChatTemplate.from_metadata(smollm2_metadata, "llama3")
    assert by_name.name == "llama3" and by_name.render(SUAU) == BUILTIN_CASES[4][2]
    path = tmp_path / "t.jinja"
    path.write_text("{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}{{ eos_token }}\n")
    by_file = ChatTemplate.from_metadata(smollm2_metadata, str(path))
    assert by_file.name == str(path)
    assert by_file.render(SUAU[:2]) == "[system]You are a helpful assistant[user]Hello<|im_end|>"
    inline = ChatTemplate.from_metadata(smollm2_metadata, "{{ messages | length }}{{ bos_token }}")
    assert inline.name == "inline" and inline.render(SUAU) == "4<|im_start|>"


def test_unknown_override_lists_builtin_names(smollm2_metadata: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="unknown chat template 'chatml2'") as e:
        ChatTemplate.from_metadata(smollm2_metadata, "chatml2")
    assert all(name in str(e.value) for name in BUILTIN_TEMPLATES)
    with pytest.raises(ValueError, match="unknown chat template"):
        ChatTemplate.from_metadata(smollm2_metadata, "/no/such/file.jinja")


def test_no_template_in_file_falls_back_to_chatml() -> None:
    meta = {"tokenizer.ggml.tokens": ["<unk>", "<s>", "</s>"], "tokenizer.ggml.bos_token_id": 1}
    t = ChatTemplate.from_metadata(meta)
    assert (t.name, t.bos_token, t.eos_token) == ("chatml", "<s>", "")
    assert t.render(SUAU) == CHATML_SUAU + "<|im_start|>assistant\n"
    with pytest.raises(ChatTemplateError, match="not a string"):
        ChatTemplate.from_metadata({"tokenizer.chat_template": 5})


def test_bos_written_by_template_is_dropped_when_tokenizer_adds_it() -> None:
    meta = {
        "tokenizer.ggml.tokens": ["<unk>", "<s>", "</s>"],
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.chat_template": "{{ bos_token }}{% for m in messages %}{{ m.content }}{{ eos_token }}{% endfor %}",
    }
    msgs = [{"role": "user", "content": "a"}]
    assert ChatTemplate.from_metadata(meta).render(msgs) == "a</s>"
    assert ChatTemplate.from_metadata(meta, add_bos=False).render(msgs) == "<s>a</s>"
    assert ChatTemplate.from_metadata(meta, add_eos=True).render(msgs) == "a"


# ---- messages ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ("hello", "must be a list"),
        ([["user", "hi"]], r"messages\[0\] must be a dict"),
        ([{"content": "hi"}], "'role' must be a non-empty string"),
        ([{"role": 1, "content": "hi"}], "'role' must be a non-empty string"),
        ([{"role": "user"}], "missing 'content'"),
        ([{"role": "user", "content": None}], "only assistant messages"),
        ([SYSTEM, {"role": "user", "content": 3}], r"messages\[1\]: 'content' must be a string"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], "'image_url'"),
        ([{"role": "user", "content": "x", "meta": object()}], r"messages\[0\]\.meta: a object is not JSON"),
    ],
)
def test_bad_messages(messages: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ChatTemplate.builtin("chatml").render(messages)


def test_messages_reach_template_as_plain_copies() -> None:
    content = [{"type": "text", "text": "x"}]
    msgs = [{"role": "user", "content": content, "name": "bob"}, {"role": "assistant", "tool_calls": []}]
    out = render("{% for m in messages %}{{ m.name }}:{{ m.content }}:{{ m.tool_calls }};{% endfor %}", msgs)
    assert out == "bob:x:;:None:[];"
    assert msgs[0]["content"] is content  # the caller's messages are untouched


def test_tools_and_extra_variables() -> None:
    src = "{{ tools | tojson }}|{{ enable_thinking }}|{{ foo.bar }}"
    assert (
        render(src, tools=[{"name": "f"}], enable_thinking=False, foo={"bar": 2}) == '[{"name": "f"}]|False|2'
    )
    # Empty tools reach the template as None, as in llama.cpp.
    assert render("{{ tools | tojson }}", tools=[]) == "null"
    with pytest.raises(ValueError, match="tools must be a list"):
        render(src, tools={"name": "f"})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="sets bos_token"):
        render(src, bos_token="x")


# ---- untrusted templates -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "source",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{% if ''.__class__ %}found{% endif %}",
        "{{ cycler.__init__.__globals__.os.system('true') }}",
        "{{ joiner.__init__.__globals__ }}",
        "{{ namespace.__init__ }}",
        "{{ self._TemplateReference__context }}",
        "{{ ''|attr('__class__') }}",
        "{{ messages|map(attribute='__class__')|list }}",
        "{{ '{0.__class__.__base__}'.format('') }}",
        "{{ messages.__getitem__(0) }}",
        "{{ raise_exception.__globals__ }}",
        "{% set ns = namespace() %}{% set ns.__dict__ = 1 %}",
        "{{ messages.append(1) }}",
    ],
)
def test_template_cannot_reach_python_internals(source: str) -> None:
    with pytest.raises(ChatTemplateError, match="unsafe"):
        render(source)


@pytest.mark.parametrize(
    "source", ["{{ os.system('true') }}", "{{ open('/etc/passwd').read() }}", "{{ __import__('os') }}"]
)
def test_template_has_no_os_or_open(source: str) -> None:
    with pytest.raises(ChatTemplateError, match="undefined"):
        render(source)


@pytest.mark.parametrize(
    "source",
    [
        "{{ 'a' * 10**9 }}",
        "{{ 10 ** (10 ** 10) }}",
        "{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
        "{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s %}{{ ns.s }}{{ ns.s }}{% endset %}{% endfor %}",
        "{% set ns = namespace(l=[1]) %}{% for i in range(99) %}{% set ns.l = [ns.l, ns.l] %}{% endfor %}",
        "{{ '%0999999999d' % 1 }}",
        "{{ '%0999999999d' | format(1) }}",
        "{{ '{:>999999999}'.format(1) }}",
        "{{ 'x'.center(999999999) }}",
        "{{ 'x' | indent(999999999) }}",
        "{{ ('a' * 1000) | replace('a', 'b' * 100000) }}",
        "{{ range(1000000) | list }}",
        "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}",
        "{% for x in [1] recursive %}{{ loop([1]) }}{% endfor %}",
    ],
)
def test_runaway_templates_fail_fast(source: str) -> None:
    with pytest.raises(ChatTemplateError):
        render(source)


def test_render_time_and_output_are_bounded() -> None:
    forever = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    with pytest.raises(ChatTemplateError, match=r"ran longer than 0\.2 s"):
        ChatTemplate(forever, limits=RenderLimits(max_seconds=0.2)).render([])
    big = "{% for i in range(2000) %}x{% endfor %}"
    with pytest.raises(ChatTemplateError, match="longer than 1000 characters"):
        ChatTemplate(big, limits=RenderLimits(max_length=1000)).render([])
    assert len(ChatTemplate(big).render([])) == 2000


def test_raise_exception_gives_its_message() -> None:
    src = "{% if messages[0].role != 'system' %}{{ raise_exception('System message first, please') }}{% endif %}"
    with pytest.raises(ChatTemplateError) as e:
        render(src)
    assert str(e.value) == "System message first, please"
    assert render(src, [SYSTEM]) == ""


def test_syntax_error_names_line_and_problem() -> None:
    with pytest.raises(
        ChatTemplateError,
        match=r"syntax error, line 2 near '\{% for m in %\}\{% endfor %\}': Expected an expression",
    ):
        ChatTemplate("ok\n{% for m in %}{% endfor %}")
    with pytest.raises(ChatTemplateError, match=r"syntax error, line 1.*endfor"):
        ChatTemplate("{% for m in messages %}")
    with pytest.raises(ChatTemplateError, match=r"syntax error.*'do'"):
        ChatTemplate("{% do messages.append(1) %}")  # the `do` extension is not enabled, as in transformers


def test_hugging_face_extras() -> None:
    before = datetime.now().strftime("%Y-%m-%d")
    today = render("{{ strftime_now('%Y-%m-%d') }}")
    assert today in (before, datetime.now().strftime("%Y-%m-%d"))
    src = "{% for i in range(5) %}{% if i == 3 %}{% break %}{% endif %}{% generation %}{{ i }}{% endgeneration %}{% endfor %}"
    assert render(src) == "012"
    assert render("{{ 'é' | tojson }} {{ [1] | tojson(indent=1) }}") == '"é" [\n 1\n]'
    # trim_blocks and lstrip_blocks, as transformers sets them.
    assert render("  {% if true %}\nA\n  {% endif %}\nB") == "A\nB"
