"""`gguflm chat`: an interactive terminal chat, like `llama-cli -cnv`.

The reply streams to stdout; notes and errors go to stderr. Input:

- a terminal: a "> " prompt. A line ending in a backslash continues on the next line, and a line
  that is just `\"\"\"` opens a block that runs to the next such line (both join lines with "\\n").
  Ctrl-C during a reply stops that reply (what was said stays in the conversation); Ctrl-C or
  Ctrl-D at the prompt exits.
- `-p MSG`: send one message, print the reply, exit.
- stdin not a terminal: each line is one message (with the same continuation rules, and the
  commands), each reply is printed followed by a newline.

Commands: /reset (back to just the system prompt), /save FILE (the conversation as a JSON list of
messages), /load FILE (replace the conversation with a saved one), /help, /exit.

The KV cache: every turn renders the whole conversation with the chat template and hands it to
`LLM.chat`, which keeps the longest cached prefix and decodes only the rest, i.e. the new turn.
When the conversation (plus room for a reply) outgrows the context, the oldest turns after the
system prompt are dropped: their token span is cut out of the KV cache with seq_rm and the later
tokens are moved down with seq_add (llama.cpp's context shift, `LLM.discard`), so nothing is decoded
again; a template for which that span cannot be found falls back to re-decoding from where the
cached tokens and the new prompt differ.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from gguflm.sampling_args import add_sampling_args, grammar_from_args, sampler_params

# the engine is imported when a chat starts: `gguflm` builds this parser for every subcommand
if TYPE_CHECKING:
    from gguflm.llm import LLM
    from gguflm.model import Model

log = logging.getLogger("gguflm")

COMMANDS = ("/reset", "/save", "/load", "/help", "/exit", "/quit")
HELP = """commands:
  /reset       forget the conversation (the system prompt stays)
  /save FILE   write the conversation to FILE as JSON
  /load FILE   replace the conversation with one saved by /save
  /exit        quit (also Ctrl-D, or Ctrl-C at the prompt)
input: end a line with \\ to continue it; or put a message between two lines of \"\"\"
Ctrl-C while the model is answering stops the answer."""


@dataclass
class TurnStats:
    """What one turn cost, in tokens: `decoded` - (`prompt_tokens` - `reused`) went to the reply."""

    prompt_tokens: int  # the whole rendered conversation
    cached: int  # tokens in the KV cache when the turn started (after any context shift)
    reused: int  # of those, the prefix the prompt shares (not decoded again)
    decoded: int  # tokens decoded during the turn: the prompt's new tokens and the reply's
    generated: int  # reply tokens sampled
    finish_reason: str | None
    dropped: int = 0  # messages dropped to fit the context


class ChatSession:
    """A conversation over an LLM whose KV cache follows it turn by turn.

    `sampling` holds LLM.chat's sampling arguments (temperature, top_k, ...); `max_tokens` None
    lets a reply run until the end of its turn or of the context. `reserve` tokens are kept free
    for the reply when deciding whether old turns must go.
    """

    def __init__(
        self,
        llm: LLM,
        system: str | None = None,
        *,
        sampling: dict[str, Any] | None = None,
        max_tokens: int | None = None,
        reserve: int | None = None,
        err: TextIO | None = None,
    ) -> None:
        self.llm = llm
        self.system = system
        self.sampling = dict(sampling or {})
        self.max_tokens = max_tokens
        default_reserve = max_tokens if max_tokens else llm.n_ctx // 4
        self.reserve = min(reserve if reserve is not None else default_reserve, llm.n_ctx - 1)
        self.err = err
        self.messages: list[dict[str, Any]] = []
        self.last: TurnStats | None = None
        self.reset()

    # ---- conversation state ------------------------------------------------------------------

    def reset(self) -> None:
        """Back to the system prompt alone; the cached tokens stay for prefix reuse."""
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def save(self, path: str | Path) -> None:
        Path(path).write_text(
            json.dumps(self.messages, ensure_ascii=False, indent=2) + "\n", encoding="utf-8"
        )

    def load(self, path: str | Path) -> None:
        """Replace the conversation with a saved one (a list of messages, or {"messages": [...]})."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not JSON: {e}") from None
        if isinstance(data, dict):
            data = data.get("messages")
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a list of messages")
        for i, m in enumerate(data):
            if not (
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            ):
                raise ValueError(f"{path}: message {i} needs a string 'role' and 'content'")
        self.llm.template.render(data, add_generation_prompt=True)  # fails now if the template refuses it
        self.messages = [{"role": m["role"], "content": m["content"]} for m in data]

    def _note(self, text: str) -> None:
        if self.err is not None:
            print(text, file=self.err, flush=True)

    def _tokens(self, messages: list[dict[str, Any]]) -> list[int]:
        text = self.llm.template.render(messages, add_generation_prompt=True)
        return self.llm.tokenize(text, add_bos=True, special=True)

    # ---- a turn ------------------------------------------------------------------------------

    def send(self, text: str) -> Iterator[str]:
        """Add a user message and stream the reply; the reply, even a cut one, joins the conversation.

        Close the iterator (or let it finish) to end the turn; Ctrl-C inside it ends the reply.
        """
        from gguflm.llm import common_prefix

        self.messages.append({"role": "user", "content": text})
        try:
            dropped = self._fit()
            prompt = self._tokens(self.messages)
            cached = self.llm.cached_tokens
            decoded_before = self.llm.ctx.n_decoded
            stream = self.llm.chat(self.messages, max_tokens=self.max_tokens, stream=True, **self.sampling)
        except BaseException:
            self.messages.pop()
            raise
        reply: list[str] = []
        finish, generated = None, 0
        try:
            for chunk in stream:
                choice = chunk["choices"][0]
                content = choice["delta"].get("content")
                if content:
                    reply.append(content)
                    yield content
                finish = choice["finish_reason"] or finish
                generated = chunk.get("usage", {}).get("completion_tokens", generated)
        finally:
            stream.close()
            self.messages.append({"role": "assistant", "content": "".join(reply)})
            reused = min(common_prefix(cached, prompt), len(prompt) - 1)
            self.last = TurnStats(
                prompt_tokens=len(prompt),
                cached=len(cached),
                reused=reused,
                decoded=self.llm.ctx.n_decoded - decoded_before,
                generated=generated,
                finish_reason=finish,
                dropped=dropped,
            )
            log.info(
                "turn: %d prompt tokens, %d of them cached; %d decoded; %d generated, finish %s",
                len(prompt),
                reused,
                self.last.decoded,
                generated,
                finish,
            )
        if finish == "length" and self.max_tokens is None:
            self._note("[the reply filled the context]")

    def _fit(self) -> int:
        """Drop the oldest turns (never the system prompt or the new message) until the prompt plus
        `reserve` tokens fit the context; returns how many messages went."""
        n_ctx = self.llm.n_ctx
        first = 1 if self.messages and self.messages[0]["role"] == "system" else 0
        dropped = 0
        full = self._tokens(self.messages)
        while len(full) + self.reserve > n_ctx:
            if len(self.messages) - 1 <= first:
                raise ValueError(
                    f"the message does not fit: the prompt would have {len(full)} tokens, plus {self.reserve} "
                    f"for the reply, in a context of {n_ctx} (use a larger -c or a shorter message)"
                )
            end = first + 1  # one turn: a user message and what follows it up to the next one
            while end < len(self.messages) - 1 and self.messages[end]["role"] != "user":
                end += 1
            kept_messages = self.messages[:first] + self.messages[end:]
            kept = self._tokens(kept_messages)
            self._shift_cache(full, kept)
            dropped += end - first
            self.messages, full = kept_messages, kept
        if dropped:
            kept_system = " (kept the system prompt)" if first else ""
            self._note(
                f"[context of {n_ctx} tokens full: dropped the {dropped} oldest messages{kept_system}]"
            )
        return dropped

    def _shift_cache(self, full: list[int], kept: list[int]) -> None:
        """Cut the tokens of the dropped messages out of the KV cache, when they sit there as one span."""
        cached = self.llm.cached_tokens
        p = 0
        while p < min(len(full), len(kept)) and full[p] == kept[p]:
            p += 1
        s = 0
        while s < len(kept) - p and full[-1 - s] == kept[-1 - s]:
            s += 1
        end = len(full) - s
        if p + s != len(kept) or end > len(cached) or cached[:end] != full[:end]:
            log.info("context shift: the dropped messages are not one cached span; decoding again")
            return
        self.llm.discard(p, end)


# ---- terminal loop -----------------------------------------------------------------------------


def read_message(next_line: Iterator[str]) -> str | None:
    """One message from a line source: backslash continuation and \"\"\" blocks; None at the end."""
    try:
        line = next(next_line)
    except StopIteration:
        return None
    if line.strip() == '"""':
        block = []
        for inner in next_line:
            if inner.strip() == '"""':
                break
            block.append(inner)
        return "\n".join(block)
    parts = []
    while line.endswith("\\"):
        parts.append(line[:-1])
        try:
            line = next(next_line)
        except StopIteration:
            line = ""
            break
    parts.append(line)
    return "\n".join(parts)


def _terminal_lines() -> Iterator[str]:
    """Lines typed at the terminal; the first of a message gets "> ", the rest "... "."""
    prompt = "> "
    while True:
        try:
            line = input(prompt)
        except EOFError:
            return
        prompt = "... " if line.endswith("\\") or line.strip() == '"""' else "> "
        yield line


def _pipe_lines(stream: TextIO) -> Iterator[str]:
    for line in stream:
        yield line.rstrip("\r\n")


def _command(session: ChatSession, text: str, err: TextIO) -> bool:
    """Run a /command; False when the chat should end."""
    name, _, arg = text.strip().partition(" ")
    arg = arg.strip()
    if name in ("/exit", "/quit"):
        return False
    if name == "/help":
        print(HELP, file=err)
    elif name == "/reset":
        session.reset()
        print("[conversation reset]", file=err)
    elif name in ("/save", "/load"):
        if not arg:
            print(f"usage: {name} FILE", file=err)
            return True
        try:
            if name == "/save":
                session.save(arg)
                print(f"[saved {len(session.messages)} messages to {arg}]", file=err)
            else:
                session.load(arg)
                print(f"[loaded {len(session.messages)} messages from {arg}]", file=err)
        except (OSError, ValueError) as e:
            print(f"error: {e}", file=err)
    return True


def _is_command(text: str) -> bool:
    return text.strip().split(" ", 1)[0] in COMMANDS


def _reply(session: ChatSession, text: str, out: TextIO, err: TextIO) -> bool:
    """Stream one reply to `out`; Ctrl-C stops it. False when the message was refused."""
    try:
        with contextlib.closing(session.send(text)) as pieces:
            for piece in pieces:
                out.write(piece)
                out.flush()
    except KeyboardInterrupt:
        out.write("\n")
        print("[reply stopped]", file=err, flush=True)
        return True
    except ValueError as e:
        print(f"error: {e}", file=err, flush=True)
        return False
    out.write("\n")
    out.flush()
    return True


def chat_loop(session: ChatSession, lines: Iterator[str], out: TextIO, err: TextIO) -> int:
    """Read messages and commands until the input ends or /exit; 1 if a message was refused."""
    status = 0
    while True:
        try:
            text = read_message(lines)
        except KeyboardInterrupt:
            out.write("\n")
            return status
        if text is None:
            return status
        if not text.strip():
            continue
        if _is_command(text):
            if not _command(session, text, err):
                return status
            continue
        if not _reply(session, text, out, err):
            status = 1


# ---- the subcommand ----------------------------------------------------------------------------


def load_model(args: argparse.Namespace) -> Model:
    """The model named by -m (or the default one); tests replace this to share a loaded model."""
    from gguflm.cli import load_model as cli_load_model  # late: gguflm.cli imports this module

    return cli_load_model(args)


def make_session(args: argparse.Namespace, err: TextIO) -> ChatSession:
    from gguflm.llm import LLM

    model = load_model(args)
    n_ctx = args.ctx_size or min(model.args.n_ctx_train, 4096)
    llm = LLM(
        model=model,
        n_ctx=n_ctx,
        n_batch=args.batch_size,
        n_ubatch=min(args.batch_size, 512),
        chat_template=args.chat_template,
        seed=args.seed,
        penalty_last_n=args.repeat_last_n,
    )
    # the same llama.cpp flags as `gguflm run`, checked before the first turn
    sampling = {"sampler_params": sampler_params(args), "grammar": grammar_from_args(args)}
    max_tokens = args.n_predict if args.n_predict > 0 else None
    return ChatSession(llm, args.system, sampling=sampling, max_tokens=max_tokens, err=err)


def cmd_chat(args: argparse.Namespace) -> int:
    """Run `gguflm chat`: one message with -p, else messages from the terminal or from stdin."""
    out, err = sys.stdout, sys.stderr
    session = make_session(args, err)
    if args.prompt is not None:
        return 0 if _reply(session, args.prompt, out, err) else 1
    if sys.stdin.isatty():
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401  (line editing and history for input())
        print(
            f"== chat with {session.llm.model.path.name} ({session.llm.n_ctx} tokens of context); "
            "/help for commands, Ctrl-C stops a reply, Ctrl-D exits ==",
            file=err,
        )
        return chat_loop(session, _terminal_lines(), out, err)
    return chat_loop(session, _pipe_lines(sys.stdin), out, err)


def build_chat_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add `gguflm chat`'s arguments (model, context, sampling, chat) to `p`; sets func=cmd_chat."""
    from gguflm.cli import add_model_args  # late: gguflm.cli imports this module

    add_model_args(p)
    p.add_argument("-p", "--prompt", help="send one message, print the reply and exit")
    p.add_argument("-sys", "--system", "--system-prompt", dest="system", help="system prompt")
    p.add_argument(
        "--chat-template", help="built-in template name, a file, or Jinja text (default: the GGUF's)"
    )
    p.add_argument("-n", "--n-predict", type=int, default=-1, help="most tokens per reply (-1: until done)")
    add_sampling_args(p)
    p.set_defaults(func=cmd_chat)
    return p


def add_chat_parser(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser], common_parent: argparse.ArgumentParser
) -> argparse.ArgumentParser:
    """Register `chat` on the `gguflm` command's subparsers."""
    p = subparsers.add_parser(
        "chat",
        parents=[common_parent],
        help="interactive chat with the model's chat template (llama-cli -cnv)",
    )
    return build_chat_parser(p)
