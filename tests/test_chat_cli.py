"""`gguflm chat` on the real SmolLM2: piped stdin, -p, commands, multi-line input, Ctrl-C, and the KV
cache following the conversation: each turn decodes only its new tokens, also after old turns were
dropped to fit a small context."""

from __future__ import annotations

import argparse
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gguflm import chat_cli
from gguflm.chat_cli import ChatSession, TurnStats, add_chat_parser, chat_loop, cmd_chat, read_message
from gguflm.cli import main as cli_main
from gguflm.llm import LLM
from gguflm.model import Model

GREEDY = ["--temp", "0"]


@pytest.fixture(autouse=True)
def shared_model(smollm2: Model, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI loads the session's model instead of reading the file again."""
    monkeypatch.setattr(chat_cli, "load_model", lambda args: smollm2)


def run(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], stdin: str, *argv: str
) -> tuple[int, str, str]:
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    code = cli_main(["chat", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def saved(path: Path) -> list[dict[str, Any]]:
    return json.loads(path.read_text())


def new_tokens_only(stats: TurnStats) -> bool:
    """The turn decoded the prompt's uncached tokens and the reply (the last reply token is not
    decoded when the reply stops for length), and every cached token was reused."""
    reply = stats.generated - (stats.finish_reason == "length")
    return stats.reused == stats.cached and stats.decoded == stats.prompt_tokens - stats.cached + reply


# ---- the command line ----------------------------------------------------------------------------


def test_prompt_flag_prints_the_reply(
    smollm2: Model, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Germany, not France: SmolLM2's first reply token to France is a near tie ("The" 25.33, "L" 25.24 in
    # fp32) that llama.cpp itself takes the other way ("L'Étoile, la Cité, ...")
    code, out, _ = run(monkeypatch, capsys, "", "-p", "What is the capital of Germany?", "-n", "12", *GREEDY)
    assert code == 0
    messages = [{"role": "user", "content": "What is the capital of Germany?"}]
    expected = LLM(model=smollm2, n_ctx=512).chat(messages, max_tokens=12, temperature=0)
    assert out == expected["choices"][0]["message"]["content"] + "\n"
    assert "Berlin" in out


def test_piped_stdin_is_one_message_per_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    log = tmp_path / "chat.json"
    stdin = f"Hi!\n\nWhat is 2+2?\n/save {log}\n"
    code, out, err = run(monkeypatch, capsys, stdin, "-n", "6", "-sys", "Be brief.", *GREEDY)
    assert code == 0
    messages = saved(log)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant"]
    assert messages[0]["content"] == "Be brief." and messages[3]["content"] == "What is 2+2?"
    assert out == messages[2]["content"] + "\n" + messages[4]["content"] + "\n"
    assert f"saved 5 messages to {log}" in err


def test_save_reset_load_round_trip(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b, c = (tmp_path / f"{n}.json" for n in "abc")
    stdin = f"Hello\n/save {a}\n/reset\n/save {b}\n/load {a}\n/save {c}\n/load {tmp_path / 'missing.json'}\n"
    code, _, err = run(monkeypatch, capsys, stdin, "-n", "4", "--system", "You are terse.", *GREEDY)
    assert code == 0
    assert len(saved(a)) == 3 and saved(c) == saved(a)
    assert saved(b) == [{"role": "system", "content": "You are terse."}]
    assert "error:" in err and "missing.json" in err  # a bad /load is reported, the chat goes on


def test_load_continues_a_saved_conversation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    conv = tmp_path / "conv.json"
    conv.write_text(
        json.dumps(
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}
        )
    )
    after = tmp_path / "after.json"
    code, _, _ = run(monkeypatch, capsys, f"/load {conv}\nHow are you?\n/save {after}\n", "-n", "4", *GREEDY)
    assert code == 0
    assert [m["content"] for m in saved(after)[:3]] == ["Hi", "Hello!", "How are you?"]
    bad = tmp_path / "bad.json"
    bad.write_text('[{"role": "user"}]')
    code, _, err = run(monkeypatch, capsys, f"/load {bad}\n", "-n", "4")
    assert code == 0 and "message 0" in err


def test_multi_line_input() -> None:
    lines = iter(["first \\", "second", '"""', "block a", "", "block b", '"""', "last"])
    assert read_message(lines) == "first \nsecond"
    assert read_message(lines) == "block a\n\nblock b"
    assert read_message(lines) == "last"
    assert read_message(lines) is None


def test_message_too_long_for_the_context_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    log = tmp_path / "c.json"
    stdin = "word " * 80 + f"\n/save {log}\n"
    code, out, err = run(monkeypatch, capsys, stdin, "-c", "64", "-n", "8", "-sys", "S.")
    assert code == 1
    assert "error: the message does not fit" in err and out == ""
    assert saved(log) == [{"role": "system", "content": "S."}]


def test_exit_command_and_parser_wiring(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(monkeypatch, capsys, "/exit\nHello\n", "-n", "4")
    assert code == 0 and out == ""
    parser = argparse.ArgumentParser(prog="gguflm")
    common = argparse.ArgumentParser(add_help=False)
    add_chat_parser(parser.add_subparsers(dest="command"), common)
    args = parser.parse_args(["chat", "-p", "hi", "--temp", "0.5", "-c", "128", "-sys", "S", "-s", "3"])
    assert args.func is cmd_chat and args.temp == 0.5 and args.ctx_size == 128
    assert args.system == "S" and args.seed == 3 and args.prompt == "hi"


# ---- the session and the KV cache ----------------------------------------------------------------


def session(smollm2: Model, n_ctx: int, err: io.StringIO | None = None, **kw: Any) -> ChatSession:
    llm = LLM(model=smollm2, n_ctx=n_ctx)
    return ChatSession(
        llm, "You are a terse assistant.", sampling={"temperature": 0}, max_tokens=8, err=err, **kw
    )


def say(chat: ChatSession, text: str) -> str:
    return "".join(chat.send(text))


def test_each_turn_decodes_only_its_new_tokens(smollm2: Model) -> None:
    chat = session(smollm2, 512)
    say(chat, "What is the capital of France?")
    assert chat.last is not None and chat.last.cached == 0
    for text in ("And of Germany?", "Name a color."):
        cached = len(chat.llm.cached_tokens)
        say(chat, text)
        stats = chat.last
        assert stats is not None and stats.cached == cached > 0
        assert new_tokens_only(stats), stats
        assert stats.prompt_tokens - stats.cached < 30  # the new turn, not the conversation


def test_overflow_drops_oldest_turns_keeps_system_and_shifts_the_cache(smollm2: Model) -> None:
    err = io.StringIO()
    chat = session(smollm2, 112, err)
    questions = [
        "What is the capital of France?",
        "And of Germany?",
        "And of Italy?",
        "And of Spain?",
        "And of Peru?",
    ]
    dropped_turns = []
    for q in questions:
        say(chat, q)
        assert chat.last is not None
        assert new_tokens_only(chat.last), chat.last  # also right after a drop: the rest was shifted
        if chat.last.dropped:
            dropped_turns.append(chat.last)
        assert chat.last.prompt_tokens + chat.reserve <= 112
    assert dropped_turns, "the conversation never outgrew the context"
    assert chat.messages[0] == {"role": "system", "content": "You are a terse assistant."}
    assert chat.messages[1]["content"] != questions[0] and chat.messages[-2]["content"] == questions[-1]
    assert "dropped the 2 oldest messages (kept the system prompt)" in err.getvalue()


def test_ctrl_c_stops_the_reply_not_the_chat(smollm2: Model) -> None:
    chat = session(smollm2, 256)

    class Out(io.StringIO):
        """A terminal where Ctrl-C arrives while the first reply is being printed."""

        interrupted = False

        def write(self, s: str) -> int:
            if s and not self.interrupted:
                self.interrupted = True
                super().write(s)
                raise KeyboardInterrupt
            return super().write(s)

    out, err = Out(), io.StringIO()
    lines: Iterator[str] = iter(["Tell me a long story about a dragon.", "Thanks!"])
    assert chat_loop(chat, lines, out, err) == 0
    assert "[reply stopped]" in err.getvalue()
    first_reply, second_reply = chat.messages[2]["content"], chat.messages[4]["content"]
    assert first_reply and out.getvalue().startswith(first_reply)  # what was said stays
    assert second_reply and out.getvalue().endswith(second_reply + "\n")
    llm = chat.llm
    assert llm.ctx.kv.seq_pos_max(0) == len(llm.cached_tokens) - 1


def test_ctrl_c_or_end_of_input_at_the_prompt_exits(smollm2: Model) -> None:
    chat = session(smollm2, 128)

    def interrupted() -> Iterator[str]:
        raise KeyboardInterrupt
        yield ""

    assert chat_loop(chat, interrupted(), io.StringIO(), io.StringIO()) == 0
    assert chat_loop(chat, iter([]), io.StringIO(), io.StringIO()) == 0
    assert chat.messages == [{"role": "system", "content": "You are a terse assistant."}]
