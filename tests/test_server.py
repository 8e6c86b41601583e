"""`gguflm serve`: a real server process on 127.0.0.1 over a tiny model, called with httpx and the
official `openai` client. No mocks of the engine; every request has a timeout."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

KEY = "sk-test-key"
N_CTX, N_PARALLEL = 4096, 4  # 1024 tokens per slot (past the tiny model's 256: a warning only)
N_SLOT = N_CTX // N_PARALLEL
TIMEOUT = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_is_free(port: int) -> bool:
    """Nobody listens, and a new server could listen there (with SO_REUSEADDR, as servers bind:
    closed connections may leave the port in TIME_WAIT)."""
    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", port)) == 0:
            return False
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


class Server:
    def __init__(self, proc: subprocess.Popen[bytes], port: int) -> None:
        self.proc, self.port = proc, port
        self.url = f"http://127.0.0.1:{port}"

    def client(self, key: str | None = KEY) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=TIMEOUT)

    def openai(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=KEY, timeout=TIMEOUT, max_retries=0)


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread() -> Iterator[None]:
    """This module's in-process model work on one thread, as its servers run (-t 1): on shared
    cores two spinning threads make a step many times slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def start_server(model: Path, log_dir: Path, *args: str) -> Server:
    port = free_port()
    log = log_dir / "server.log"
    # one decode thread: on a shared 2-core machine two spinning threads can make a step 10x slower
    cmd = [sys.executable, "-m", "gguflm", "serve", "-m", str(model), "--port", str(port), "-t", "1", *args]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    srv = Server(proc, port)
    deadline = time.monotonic() + 180  # a busy shared machine can take minutes to load torch
    with srv.client(None) as c:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the server exited with {proc.returncode}: {log.read_text()}")
            try:
                if c.get("/health", timeout=2).status_code == 200:
                    return srv
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                proc.kill()
                pytest.fail("the server did not become healthy in 180 s")
            time.sleep(0.1)


def stop_server(srv: Server) -> None:
    if srv.proc.poll() is None:
        srv.proc.kill()
        srv.proc.wait(10)


@pytest.fixture(scope="module")
def server(tiny_llama_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    args = ["-np", str(N_PARALLEL), "-c", str(N_CTX), "--api-key", KEY, "--embeddings", "-a", "tiny"]
    args += ["--chunk", "16"]  # small chunks: prompts are read over several steps
    srv = start_server(tiny_llama_path, tmp_path_factory.mktemp("serve"), *args)
    yield srv
    stop_server(srv)


SMALL_TIMEOUT, SMALL_BODY = 3, 4096


@pytest.fixture(scope="module")
def small(tiny_llama_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One slot with a long context, one waiting request at most, a short timeout, small bodies."""
    args = ["-np", "1", "-c", "16384", "--api-key", KEY, "-a", "tiny", "--max-queue", "1"]
    args += ["--timeout", str(SMALL_TIMEOUT), "--max-body-bytes", str(SMALL_BODY)]
    srv = start_server(tiny_llama_path, tmp_path_factory.mktemp("small"), *args)
    yield srv
    stop_server(srv)


def completion(srv: Server, prompt: str | list, **extra: object) -> dict:
    with srv.client() as c:
        r = c.post("/v1/completions", json={"prompt": prompt, "temperature": 0, **extra})
    assert r.status_code == 200, r.text
    return r.json()


def all_slots_idle(srv: Server, within: float = 5.0) -> bool:
    deadline = time.monotonic() + within
    with srv.client() as c:
        while time.monotonic() < deadline:
            if not any(s["is_processing"] for s in c.get("/slots").json()):
                return True
            time.sleep(0.05)
    return False


# ---- basic routes ----------------------------------------------------------------------------------


def test_health_and_models_are_open(server: Server) -> None:
    with server.client(None) as c:
        assert c.get("/health").json() == {"status": "ok"}
        models = c.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["tiny"]


def test_chat_page_is_served_without_a_key(server: Server) -> None:
    with server.client(None) as c:
        r = c.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "<form" in r.text and "/v1/chat/completions" in r.text and "stream: true" in r.text


NODE_SHIM = r"""
// the page's script in node: a few DOM stand-ins, fetch aimed at the server; prints the reply
const base = process.argv[1], key = process.argv[2], script = require("fs").readFileSync(0, "utf8");
const els = {}, log = [];
function el(id) {
  return els[id] || (els[id] = {
    id, value: "", textContent: "", className: "", disabled: false, handlers: {},
    addEventListener(type, f) { this.handlers[type] = f; },
    appendChild(child) { log.push(child); }, focus() {},
  });
}
globalThis.document = { getElementById: el, createElement: () => el("new" + log.length) };
globalThis.localStorage = { getItem: () => key, setItem() {} };
const realFetch = fetch;
globalThis.fetch = (url, opts) => realFetch(base + url, opts);
eval(script);
el("temp").value = "0";
el("max").value = "8";
el("input").value = "Say hello.";
el("form").handlers.submit({ preventDefault() {} }).then(() => {
  const reply = log[log.length - 1];
  process.stdout.write(JSON.stringify({ className: reply.className, text: reply.textContent }));
});
"""


def test_chat_page_script_streams_a_reply(server: Server) -> None:
    """The page's own script, run by node against the server, shows the streamed reply."""
    import re
    import shutil

    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: the chat page's script cannot run")
    with server.client(None) as c:
        page = c.get("/").text
    script = re.search(r"<script>(.*)</script>", page, re.S)
    assert script is not None
    with server.client() as c:
        body = {"messages": [{"role": "user", "content": "Say hello."}], "temperature": 0, "max_tokens": 8}
        want = c.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
    run = subprocess.run(
        [node, "-e", NODE_SHIM, server.url, KEY],
        input=script.group(1),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert run.returncode == 0, run.stderr
    shown = json.loads(run.stdout)
    assert shown == {"className": "msg assistant", "text": want}


def test_chat_page_in_a_headless_browser(server: Server) -> None:
    """A real browser (Debian's chromium, driven by selenium) loads `/`, a message is typed and sent,
    and the streamed reply the page shows is the server's reply to the same conversation."""
    import shutil

    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if browser is None or driver_path is None:
        pytest.skip("chromium and chromedriver are not installed (.ci/run installs Debian's packages)")
    with server.client() as c:
        body = {"messages": [{"role": "user", "content": "Say hello."}], "temperature": 0, "max_tokens": 8}
        want = c.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver_path))
    try:
        driver.get(server.url + "/")
        driver.find_element(By.ID, "key").send_keys(KEY)
        for field, value in (("temp", "0"), ("max", "8")):
            driver.find_element(By.ID, field).clear()
            driver.find_element(By.ID, field).send_keys(value)
        driver.find_element(By.ID, "input").send_keys("Say hello.", Keys.ENTER)

        def reply_done(d: object) -> bool:  # the submit handler re-enables Send when the stream ends
            bubbles = driver.find_elements(By.CSS_SELECTOR, ".msg.assistant, .msg.error")
            return bool(bubbles) and driver.find_element(By.ID, "send").is_enabled()

        WebDriverWait(driver, TIMEOUT).until(reply_done)
        bubbles = driver.find_elements(By.CSS_SELECTOR, "#log .msg")
        shown = [(b.get_attribute("class"), b.get_attribute("textContent")) for b in bubbles]
    finally:
        driver.quit()
    assert shown == [("msg user", "Say hello."), ("msg assistant", want)]


def test_tokenize_detokenize_round_trip(server: Server) -> None:
    text = "Hello, world! héllo 123"
    with server.client() as c:
        ids = c.post("/tokenize", json={"content": text}).json()["tokens"]
        assert ids and all(isinstance(i, int) for i in ids)
        pieces = c.post("/tokenize", json={"content": text, "with_pieces": True}).json()["tokens"]
        assert [p["id"] for p in pieces] == ids
        assert c.post("/detokenize", json={"tokens": ids}).json()["content"] == text


# ---- completions and chat ---------------------------------------------------------------------------


def test_completion_with_httpx(server: Server) -> None:
    out = completion(server, "Once upon a time", max_tokens=10)
    assert out["object"] == "text_completion"
    assert out["model"] == "tiny"
    choice = out["choices"][0]
    assert choice["finish_reason"] in ("length", "stop")
    assert out["usage"]["completion_tokens"] <= 10
    assert out["usage"]["total_tokens"] == out["usage"]["prompt_tokens"] + out["usage"]["completion_tokens"]
    if choice["finish_reason"] == "length":
        assert out["usage"]["completion_tokens"] == 10


def test_openai_completions_streamed_equals_not_streamed(server: Server) -> None:
    client = server.openai()
    full = client.completions.create(model="tiny", prompt="The cat", max_tokens=12, temperature=0)
    chunks = list(
        client.completions.create(model="tiny", prompt="The cat", max_tokens=12, temperature=0, stream=True)
    )
    assert "".join(c.choices[0].text for c in chunks) == full.choices[0].text
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_openai_chat_streamed_equals_not_streamed(server: Server) -> None:
    client = server.openai()
    messages = [{"role": "user", "content": "Say something."}]
    full = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    assert full.object == "chat.completion"
    assert full.choices[0].message.role == "assistant"
    assert full.usage is not None and full.usage.completion_tokens <= 10
    stream = client.chat.completions.create(
        model="tiny",
        messages=messages,
        max_completion_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    with_choices = [c for c in chunks if c.choices]
    assert with_choices[-1].choices[0].finish_reason == full.choices[0].finish_reason
    text = "".join(c.choices[0].delta.content or "" for c in with_choices)
    assert text == full.choices[0].message.content
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_raw_stream_ends_with_done(server: Server) -> None:
    body = {"prompt": "abc", "max_tokens": 4, "temperature": 0, "stream": True}
    with server.client() as c, c.stream("POST", "/v1/completions", json=body) as r:
        lines = [line for line in r.iter_lines() if line]
    assert r.headers["content-type"].startswith("text/event-stream")
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)
    json.loads(lines[-2][6:])  # the last chunk before [DONE] is JSON


def test_stop_strings_end_the_text_before_them(server: Server) -> None:
    free = completion(server, "a b c", max_tokens=16)["choices"][0]["text"]
    if len(free) < 4:
        pytest.skip("the tiny model's reply is too short to cut")
    stop = free[2:4]
    out = completion(server, "a b c", max_tokens=16, stop=[stop])
    assert out["choices"][0]["finish_reason"] == "stop"
    assert out["choices"][0]["text"] == free[: free.find(stop)]


def test_seeded_sampling_is_reproducible(server: Server) -> None:
    a = completion(server, "x y", max_tokens=12, temperature=1.0, seed=7, top_k=0, top_p=1.0, min_p=0.0)
    b = completion(server, "x y", max_tokens=12, temperature=1.0, seed=7, top_k=0, top_p=1.0, min_p=0.0)
    assert a["choices"][0]["text"] == b["choices"][0]["text"]


def test_concurrent_streams_equal_their_solo_output(server: Server) -> None:
    """16 streaming clients on 4 slots: each stream equals that request sent alone (greedy or seeded)."""
    prompts = [f"prompt number {i}: " + "word " * (3 * i) for i in range(16)]

    def params(i: int) -> dict:
        if i % 2:
            return {"temperature": 0.9, "seed": 100 + i, "top_k": 0, "top_p": 1.0, "min_p": 0.0}
        return {"temperature": 0}

    solo = [
        completion(server, p, max_tokens=12, **params(i))["choices"][0]["text"] for i, p in enumerate(prompts)
    ]
    client = server.openai()

    def stream(i: int) -> str:
        chunks = client.completions.create(
            model="tiny", prompt=prompts[i], max_tokens=12, stream=True, extra_body=params(i)
        )
        return "".join(c.choices[0].text for c in chunks)

    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(stream, range(16)))
    assert together == solo
    assert all_slots_idle(server)


def test_ignore_eos_and_logit_bias(server: Server) -> None:
    out = completion(server, "Hello", max_tokens=30, ignore_eos=True)
    assert out["usage"]["completion_tokens"] == 30
    assert out["choices"][0]["finish_reason"] == "length"
    with server.client() as c:
        first = c.post("/tokenize", json={"content": out["choices"][0]["text"]}).json()["tokens"][0]
    banned = completion(server, "Hello", max_tokens=30, ignore_eos=True, logit_bias={str(first): -1e9})
    with server.client() as c:
        ids = c.post("/tokenize", json={"content": banned["choices"][0]["text"]}).json()["tokens"]
    assert ids[0] != first


def test_llama_server_sampling_fields_take_effect(server: Server) -> None:
    greedy = native(server, prompt="Hello there", n_predict=4, ignore_eos=True)["content"]
    # top-k 1 then temperature 1: the likeliest token, whatever the seed
    top1 = {"temperature": 1.0, "top_k": 1, "samplers": ["top_k", "temperature"], "seed": 5}
    assert native(server, prompt="Hello there", n_predict=4, ignore_eos=True, **top1)["content"] == greedy
    # a huge repeat penalty bans the prompt's tokens; with repeat_last_n 0 it sees none of them
    words = set(greedy.split())
    if not words & {"Hello", "there"}:
        pytest.skip("the tiny model's greedy text repeats no prompt word")
    banned = native(server, prompt="Hello there", n_predict=4, ignore_eos=True, repeat_penalty=1e9)
    assert banned["content"] != greedy
    blind = {"repeat_penalty": 1e9, "repeat_last_n": 0}
    assert native(server, prompt="Hello there", n_predict=4, ignore_eos=True, **blind)["content"] == greedy
    with server.client() as c:
        assert_error(c.post("/completion", json={"prompt": "x", "samplers": ["nope"]}), 400)
        assert_error(c.post("/completion", json={"prompt": "x", "mirostat": 3}), 400)


def test_chat_content_as_text_parts_equals_a_string(server: Server) -> None:
    def reply(content: object) -> str:
        with server.client() as c:
            body = {"messages": [{"role": "user", "content": content}], "max_tokens": 8, "temperature": 0}
            r = c.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["message"]["content"]

    assert reply([{"type": "text", "text": "hi there"}]) == reply("hi there")


def test_cors_preflight_needs_no_key(server: Server) -> None:
    headers = {"Origin": "http://example.com", "Access-Control-Request-Method": "POST"}
    with server.client(None) as c:
        r = c.options("/v1/chat/completions", headers=headers)
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] in ("*", "http://example.com")


# ---- embeddings -------------------------------------------------------------------------------------


def test_embeddings_are_normalized_for_string_and_list(server: Server) -> None:
    client = server.openai()
    one = client.embeddings.create(model="tiny", input="hello world")
    many = client.embeddings.create(model="tiny", input=["hello world", "something else"])
    assert len(one.data) == 1 and len(many.data) == 2
    for item in [*one.data, *many.data]:
        assert abs(sum(x * x for x in item.embedding) - 1.0) < 1e-4
    assert one.data[0].embedding == pytest.approx(many.data[0].embedding, abs=1e-5)
    again = client.embeddings.create(model="tiny", input="hello world")  # on the kept context
    assert again.data[0].embedding == one.data[0].embedding


def test_embeddings_equal_the_library(server: Server, tiny_llama_path: Path) -> None:
    from gguflm.llm import LLM

    texts = ["first text", "a second, longer text to embed"]
    served = [d.embedding for d in server.openai().embeddings.create(model="tiny", input=texts).data]
    local = LLM(tiny_llama_path, n_ctx=N_SLOT).embed(texts)
    for s_vec, l_vec in zip(served, local, strict=True):
        assert s_vec == pytest.approx(l_vec, abs=1e-4)


# ---- errors -----------------------------------------------------------------------------------------


def assert_error(r: httpx.Response, status: int, type_: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) >= {"code", "message", "type"}
    if type_ is not None:
        assert err["type"] == type_
    return err


def test_errors_then_a_normal_request_still_works(server: Server) -> None:
    with server.client() as c:
        bad_json = c.post(
            "/v1/completions", content=b"{not json", headers={"content-type": "application/json"}
        )
        assert_error(bad_json, 400, "invalid_request_error")
        assert_error(c.post("/v1/completions", json={"prompt": "x", "max_tokens": "ten"}), 400)
        assert_error(c.post("/v1/completions", json={"prompt": "x", "temperature": "hot"}), 400)
        assert_error(c.post("/v1/completions", json={"prompt": 5}), 400)
        assert_error(c.post("/v1/chat/completions", json={"messages": "hi"}), 400)
        assert_error(c.post("/v1/chat/completions", json={"messages": []}), 400)
        assert_error(c.post("/v1/completions", json={"prompt": "x", "top_p": 3.0}), 400)
        assert_error(c.post("/v1/completions", json={"prompt": "x", "max_tokens": 0}), 400)
        assert_error(c.post("/v1/completions", json={"prompt": "x", "logit_bias": {"x": 1}}), 400)
        assert_error(c.post("/v1/completions", json={"prompt": [1, 99999]}), 400)
        long_prompt = "word " * N_SLOT
        err = assert_error(c.post("/v1/completions", json={"prompt": long_prompt}), 400)
        assert err["type"] == "exceed_context_size_error"
        assert str(N_SLOT) in err["message"] and err["n_ctx"] == N_SLOT
        assert_error(c.get("/no/such/route"), 404, "not_found_error")
    with server.client(None) as c:
        assert_error(c.post("/v1/completions", json={"prompt": "x"}), 401, "authentication_error")
        assert_error(c.post("/tokenize", json={"content": "x"}), 401, "authentication_error")
    with server.client("wrong-key") as c:
        assert_error(c.post("/v1/completions", json={"prompt": "x"}), 401, "authentication_error")
    assert all_slots_idle(server)
    out = completion(server, "still working", max_tokens=3)
    assert out["usage"]["completion_tokens"] <= 3


def slot_busy(srv: Server) -> bool:
    with srv.client() as c:
        return any(s["is_processing"] for s in c.get("/slots").json())


LONG = {"prompt": "go on", "max_tokens": N_SLOT - 10, "temperature": 0, "ignore_eos": True}


def test_a_disconnected_stream_frees_its_slot(server: Server) -> None:
    with server.client() as c, c.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as r:
        lines = r.iter_lines()  # kept open: closing the iterator closes the connection
        assert next(lines).startswith("data: ")
        assert slot_busy(server)  # ~1000 tokens to go; then the client leaves
    assert all_slots_idle(server)
    assert completion(server, "after", max_tokens=2)["usage"]["completion_tokens"] <= 2


def test_a_disconnected_plain_request_frees_its_slot(server: Server) -> None:
    body = json.dumps(LONG).encode()
    head = (
        "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) as sock:
        sock.sendall(head.encode() + body)
        deadline = time.monotonic() + 10
        while not slot_busy(server) and time.monotonic() < deadline:
            time.sleep(0.01)
    assert all_slots_idle(server)
    assert completion(server, "after", max_tokens=2)["usage"]["completion_tokens"] <= 2


# ---- prefix reuse -----------------------------------------------------------------------------------


def chat(srv: Server, messages: list[dict], **extra: object) -> dict:
    with srv.client() as c:
        r = c.post("/v1/chat/completions", json={"messages": messages, "temperature": 0, **extra})
    assert r.status_code == 200, r.text
    return r.json()


def test_next_chat_turn_reuses_the_cache_and_replies_as_a_fresh_server(server: Server, small: Server) -> None:
    first = [{"role": "user", "content": "Tell me about the weather in the mountains today."}]
    one = chat(server, first, max_tokens=8, ignore_eos=True)
    reply = one["choices"][0]["message"]["content"]
    turn = [*first, {"role": "assistant", "content": reply}, {"role": "user", "content": "And tomorrow?"}]
    two = chat(server, turn, max_tokens=8, ignore_eos=True)
    cached = two["usage"]["prompt_tokens_details"]["cached_tokens"]
    # the first turn's prompt is reused (but for its last tokens, which may tokenize otherwise
    # once the reply follows them)
    assert one["usage"]["prompt_tokens"] - 2 <= cached < two["usage"]["prompt_tokens"]
    assert two["timings"]["cache_n"] == cached
    assert two["timings"]["prompt_n"] == two["usage"]["prompt_tokens"] - cached
    again = chat(server, turn, max_tokens=8, ignore_eos=True)  # the same request: all but one token
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == two["usage"]["prompt_tokens"] - 1
    fresh = chat(small, turn, max_tokens=8, ignore_eos=True, cache_prompt=False)
    assert fresh["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    text = fresh["choices"][0]["message"]["content"]
    assert two["choices"][0]["message"]["content"] == text
    assert again["choices"][0]["message"]["content"] == text


def test_a_request_goes_to_the_slot_holding_its_prefix(server: Server) -> None:
    """Two conversations alternate over 4 slots: each next turn finds its own first turn cached."""
    starts = [
        [{"role": "user", "content": "Conversation A is about apples and their many colours."}],
        [{"role": "user", "content": "Conversation B is about boats, rivers and the sea."}],
    ]
    firsts = [chat(server, m, max_tokens=4, ignore_eos=True) for m in starts]
    for messages, first in zip(starts, firsts, strict=True):
        turn = [*messages, {"role": "assistant", "content": first["choices"][0]["message"]["content"]}]
        turn.append({"role": "user", "content": "More, please."})
        out = chat(server, turn, max_tokens=2)
        assert out["usage"]["prompt_tokens_details"]["cached_tokens"] >= first["usage"]["prompt_tokens"] - 2


# ---- llama-server's native routes ---------------------------------------------------------------------


def native(srv: Server, **body: object) -> dict:
    with srv.client() as c:
        r = c.post("/completion", json={"temperature": 0, **body})
    assert r.status_code == 200, r.text
    return r.json()


def test_native_completion_fields_and_tokens(server: Server) -> None:
    prompt = "The quick brown fox"
    with server.client() as c:
        prompt_ids = c.post("/tokenize", json={"content": prompt, "add_special": True}).json()["tokens"]
    out = native(server, prompt=prompt, n_predict=7, ignore_eos=True, return_tokens=True)
    assert out["stop"] is True and out["stop_type"] == "limit" and out["stopping_word"] == ""
    assert out["tokens_predicted"] == 7 == len(out["tokens"])
    assert out["tokens_evaluated"] == len(prompt_ids)
    assert out["prompt"] == prompt and out["model"] == "tiny"
    # the text is exactly the detokenized ids; the slot holds the prompt and all but the last token
    with server.client() as c:
        assert c.post("/detokenize", json={"tokens": out["tokens"]}).json()["content"] == out["content"]
    assert out["tokens_cached"] == len(prompt_ids) + 7 - 1
    t = out["timings"]
    assert t["predicted_n"] == 7 and t["prompt_n"] + t["cache_n"] == len(prompt_ids)
    # the same prompt as token ids, and as OpenAI's completion, give the same text
    by_ids = native(server, prompt=prompt_ids, n_predict=7, ignore_eos=True)
    assert by_ids["content"] == out["content"]
    assert by_ids["timings"]["cache_n"] == len(prompt_ids) - 1  # all but the last token reused
    no_cache = native(server, prompt=prompt_ids, n_predict=7, ignore_eos=True, cache_prompt=False)
    assert no_cache["timings"]["cache_n"] == 0 and no_cache["content"] == out["content"]
    oai = completion(server, prompt, max_tokens=7, ignore_eos=True)
    assert oai["choices"][0]["text"] == out["content"]


def test_native_stream_and_stop_word(server: Server) -> None:
    full = native(server, prompt="One two", n_predict=12, ignore_eos=True)
    body = {"prompt": "One two", "n_predict": 12, "ignore_eos": True, "temperature": 0, "stream": True}
    with server.client() as c, c.stream("POST", "/completion", json=body) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line]
    assert all(not e["stop"] for e in events[:-1]) and events[-1]["stop"] is True
    assert "".join(e["content"] for e in events) == full["content"]
    assert events[-1]["tokens_predicted"] == 12
    if len(full["content"]) < 4:
        pytest.skip("the tiny model's text is too short to cut")
    word = full["content"][2:4]
    cut = native(server, prompt="One two", n_predict=12, ignore_eos=True, stop=[word])
    assert cut["stop_type"] == "word" and cut["stopping_word"] == word
    assert cut["content"] == full["content"][: full["content"].find(word)]


def test_apply_template_props_and_slots(server: Server, tiny_llama_path: Path) -> None:
    from gguflm.chat import ChatTemplate
    from gguflm.gguf_file import GGUFFile

    metadata = GGUFFile(tiny_llama_path).metadata
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    with server.client() as c:
        rendered = c.post("/apply-template", json={"messages": messages}).json()["prompt"]
        props = c.get("/props").json()
        slots = c.get("/slots").json()
        assert_error(c.post("/apply-template", json={"messages": []}), 400)
    assert rendered == ChatTemplate.from_metadata(metadata).render(messages, add_generation_prompt=True)
    assert props["total_slots"] == N_PARALLEL
    assert props["default_generation_settings"]["n_ctx"] == N_SLOT
    assert props["chat_template"] == metadata["tokenizer.chat_template"]
    assert [s["id"] for s in slots] == list(range(N_PARALLEL))
    assert all(s["n_ctx"] == N_SLOT and not s["is_processing"] for s in slots)


def metrics(srv: Server) -> dict[str, float]:
    with srv.client() as c:
        text = c.get("/metrics").text
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.split()
            values[name.removeprefix("llamacpp:")] = float(value)
    return values


def test_metrics_count_the_tokens_of_a_request(server: Server) -> None:
    before = metrics(server)
    out = completion(server, "Counting tokens for the metrics", max_tokens=9, ignore_eos=True)
    after = metrics(server)
    usage = out["usage"]
    assert after["tokens_predicted_total"] - before["tokens_predicted_total"] == 9
    decoded = usage["prompt_tokens"] - usage["prompt_tokens_details"]["cached_tokens"]
    assert after["prompt_tokens_total"] - before["prompt_tokens_total"] == decoded
    assert after["n_decode_total"] - before["n_decode_total"] >= 9  # one decode per generated token at least
    assert after["requests_processing"] == 0 and after["requests_deferred"] == 0
    assert after["predicted_tokens_seconds"] > 0


# ---- choices, logprobs, formats ----------------------------------------------------------------------


def test_n_choices_streamed_and_not(server: Server) -> None:
    body = {"prompt": "Two answers", "max_tokens": 6, "ignore_eos": True, "n": 2}
    greedy = completion(server, **body)
    assert [c["index"] for c in greedy["choices"]] == [0, 1]
    assert greedy["choices"][0]["text"] == greedy["choices"][1]["text"]  # temperature 0
    assert greedy["usage"]["completion_tokens"] == 12
    seeded = {**body, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "seed": 11}
    plain = completion(server, **seeded)
    with server.client() as c, c.stream("POST", "/v1/completions", json={**seeded, "stream": True}) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line and line != "data: [DONE]"]
    texts = ["", ""]
    for chunk in chunks:
        for choice in chunk["choices"]:
            texts[choice["index"]] += choice["text"]
    assert texts == [c["text"] for c in plain["choices"]]
    finished = [c["choices"][0]["index"] for c in chunks if c["choices"][0]["finish_reason"]]
    assert sorted(finished) == [0, 1]


def test_a_batch_of_prompts_gives_each_its_choices(server: Server) -> None:
    prompts = ["The cat", "A dog and"]
    alone = [completion(server, p, max_tokens=5, ignore_eos=True)["choices"][0]["text"] for p in prompts]
    with server.client() as c:
        ids = [
            c.post("/tokenize", json={"content": p, "add_special": True}).json()["tokens"] for p in prompts
        ]
    batch = completion(server, [prompts[0], ids[1]], max_tokens=5, ignore_eos=True, n=2)
    assert [c["index"] for c in batch["choices"]] == [0, 1, 2, 3]
    assert [c["text"] for c in batch["choices"]] == [alone[0], alone[0], alone[1], alone[1]]
    assert batch["usage"]["prompt_tokens"] == len(ids[0]) + len(ids[1])
    assert batch["usage"]["completion_tokens"] == 20
    body = {"prompt": prompts, "max_tokens": 5, "ignore_eos": True, "temperature": 0, "stream": True}
    body["stream_options"] = {"include_usage": True}
    with server.client() as c, c.stream("POST", "/v1/completions", json=body) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line and line != "data: [DONE]"]
    texts = ["", ""]
    for chunk in chunks[:-1]:
        texts[chunk["choices"][0]["index"]] += chunk["choices"][0]["text"]
    assert texts == alone
    assert chunks[-1]["usage"]["prompt_tokens"] == len(ids[0]) + len(ids[1])
    with server.client() as c:
        assert_error(c.post("/v1/completions", json={"prompt": ["ok", [1, "x"]]}), 400)
        assert_error(c.post("/v1/completions", json={"prompt": ["a"] * 40, "n": 2}), 400)


def test_chat_logprobs_match_the_library(server: Server, tiny_llama_path: Path) -> None:
    """The served logprobs equal those gguflm.LLM computes in this process for the same chat."""
    from gguflm.llm import LLM

    messages = [{"role": "user", "content": "Log probabilities, please."}]
    out = chat(server, messages, max_tokens=5, ignore_eos=True, logprobs=True, top_logprobs=3)
    llm = LLM(tiny_llama_path, n_ctx=N_SLOT)
    ban = dict.fromkeys(llm.tokenizer.eog_ids, float("-inf"))
    ref = llm.chat(messages, max_tokens=5, temperature=0, logprobs=True, top_logprobs=3, logit_bias=ban)
    got = out["choices"][0]["logprobs"]["content"]
    want = ref["choices"][0]["logprobs"]["content"]  # type: ignore[index]
    assert [e["token"] for e in got] == [e["token"] for e in want]
    for g, w in zip(got, want, strict=True):
        assert g["logprob"] == pytest.approx(w["logprob"], abs=1e-3)
        assert g["bytes"] == list(g["token"].encode())
        assert [t["token"] for t in g["top_logprobs"]] == [t["token"] for t in w["top_logprobs"]]
        assert g["top_logprobs"][0]["token"] == g["token"]  # greedy: the chosen token is the likeliest
    with server.client() as c:
        body = {"messages": messages, "max_tokens": 2, "top_logprobs": 2}
        assert_error(c.post("/v1/chat/completions", json=body), 400)  # top_logprobs needs logprobs
        body = {**body, "logprobs": True, "top_logprobs": 99}
        assert_error(c.post("/v1/chat/completions", json=body), 400)


def test_completion_logprobs_cover_the_text(server: Server) -> None:
    out = completion(server, "Offsets", max_tokens=6, ignore_eos=True, logprobs=2)
    lp = out["choices"][0]["logprobs"]
    assert "".join(lp["tokens"]) == out["choices"][0]["text"]
    assert lp["text_offset"] == [len("".join(lp["tokens"][:i])) for i in range(6)]
    for token, value, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"], strict=True):
        assert value <= 0 and top[token] == value and max(top.values()) == value


def test_response_format_json_schema(server: Server) -> None:
    schema = {"type": "string", "enum": ["yes", "no"]}
    rf = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}
    out = chat(server, [{"role": "user", "content": "yes or no?"}], max_tokens=20, response_format=rf)
    assert out["choices"][0]["finish_reason"] == "stop"
    assert json.loads(out["choices"][0]["message"]["content"]) in ("yes", "no")
    native_out = native(server, prompt="x", n_predict=20, json_schema=schema)
    assert json.loads(native_out["content"]) in ("yes", "no")
    with server.client() as c:
        bad = {"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "xml"}}
        assert_error(c.post("/v1/chat/completions", json=bad), 400)


# ---- limits: body size, timeout, queue --------------------------------------------------------------


def test_oversized_body_gets_413(small: Server) -> None:
    with small.client() as c:
        assert_error(c.post("/v1/completions", json={"prompt": "x" * SMALL_BODY}), 413)
        chunked = c.post("/v1/completions", content=iter([b'{"prompt": "', b"x" * SMALL_BODY, b'"}']))
        assert_error(chunked, 413)
    out = completion(small, "fits", max_tokens=2)
    assert out["usage"]["completion_tokens"] <= 2


def test_a_request_past_the_timeout_gets_408_and_frees_its_slot(small: Server) -> None:
    body = {"prompt": "forever", "max_tokens": 16000, "ignore_eos": True, "temperature": 0}
    t0 = time.monotonic()
    with small.client() as c:
        r = c.post("/v1/completions", json=body)
    assert_error(r, 408, "timeout_error")
    assert SMALL_TIMEOUT - 0.5 < time.monotonic() - t0 < SMALL_TIMEOUT + 10
    assert all_slots_idle(small)


def test_a_full_queue_answers_503_with_retry_after(small: Server) -> None:
    long = {"prompt": "busy", "max_tokens": 16000, "ignore_eos": True, "temperature": 0, "stream": True}
    with small.client() as a, a.stream("POST", "/v1/completions", json=long) as ra:
        lines = ra.iter_lines()  # kept: closing the iterator closes the connection
        assert next(lines).startswith("data: ")  # A holds the only slot
        with small.client() as b, b.stream("POST", "/v1/completions", json=long):
            deadline = time.monotonic() + 10
            while metrics(small)["requests_deferred"] < 1 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert metrics(small)["requests_deferred"] == 1  # B waits
            with small.client() as c:
                r = c.post("/v1/completions", json={"prompt": "c", "max_tokens": 2})
            assert_error(r, 503, "unavailable_error")
            assert int(r.headers["retry-after"]) >= 1
            with small.client() as c:
                assert_error(c.get("/slots", params={"fail_on_no_slot": 1}), 503)
    assert all_slots_idle(small)
    deadline = time.monotonic() + 5
    while metrics(small)["requests_deferred"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert completion(small, "after", max_tokens=2)["usage"]["completion_tokens"] <= 2
    with small.client() as c:
        assert c.get("/slots", params={"fail_on_no_slot": 1}).status_code == 200


# ---- a bounded random run: no input makes a 5xx -----------------------------------------------------

ANY = [None, True, False, 0, 1, -3, 2**40, 1.5, -1e300, "", "x", [], [1, "a"], [7, 8], {}, {"a": 1}]
SMALL_INTS = [None, 0, 1, 3, -2, "3", 1.5, True, []]  # token counts: never an endless generation
FIELDS = {
    "prompt": [*ANY, [1, 2, 3], ["ab"], [[1, 2]]],
    "messages": [*ANY, [{"role": "user"}], [{"role": 5, "content": "x"}], [{"content": [{"type": "text"}]}]],
    "max_tokens": SMALL_INTS,
    "n_predict": SMALL_INTS,
    "max_completion_tokens": SMALL_INTS,
    "n": [None, 0, 1, 2, 17, -1, "2", 2.0],
    "temperature": [*ANY, float("nan"), float("inf")],
    "top_k": ANY,
    "top_p": [*ANY, float("nan")],
    "min_p": ANY,
    "typical_p": ANY,
    "repeat_penalty": ANY,
    "presence_penalty": ANY,
    "seed": ANY,
    "stop": [*ANY, ["a", 1], "\n"],
    "logprobs": ANY,
    "top_logprobs": ANY,
    "n_probs": ANY,
    "logit_bias": [*ANY, {"1": "x"}, {"1": None}, [[1, 2, 3]], [["a", 1]], {"1": False}],
    "ignore_eos": ANY,
    "samplers": [*ANY, "xyz", ["top_k", "nope"], "kt", ["top_k", "temperature"]],
    "mirostat": [*ANY, 2],
    "dry_multiplier": ANY,
    "dry_sequence_breakers": [*ANY, ["\\n"]],
    "repeat_last_n": ANY,
    "xtc_probability": ANY,
    "response_format": [
        *ANY,
        {"type": "json_object"},
        {"type": "json_schema"},
        {"type": "json_schema", "json_schema": 5},
    ],
    "json_schema": [*ANY, {"type": "nonsense"}],
    "grammar": [*ANY, "root ::= ", 'root ::= "a"'],
    "cache_prompt": ANY,
    "stream_options": ANY,
    "content": ANY,
    "tokens": [*ANY, [-1], [10**9]],
    "add_special": ANY,
    "with_pieces": ANY,
    "input": [*ANY, [""], ["a", 1]],
    "tools": ANY,
    "return_tokens": ANY,
}
ROUTES = {
    "/v1/completions": {"prompt": "fuzz", "max_tokens": 2},
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "fuzz"}], "max_tokens": 2},
    "/completion": {"prompt": "fuzz", "n_predict": 2},
    "/tokenize": {"content": "fuzz"},
    "/detokenize": {"tokens": [1, 2]},
    "/apply-template": {"messages": [{"role": "user", "content": "fuzz"}]},
    "/v1/embeddings": {"input": "fuzz"},
}


def test_random_bodies_never_get_a_server_error(server: Server) -> None:
    import random

    rng = random.Random(1234)
    names = sorted(FIELDS)
    with server.client() as c:
        for _ in range(200):
            route = rng.choice(sorted(ROUTES))
            body: dict = dict(ROUTES[route])
            for name in rng.sample(names, rng.randint(1, 3)):
                body[name] = rng.choice(FIELDS[name])
            r = c.post(route, content=json.dumps(body), headers={"content-type": "application/json"})
            assert r.status_code < 500, (route, body, r.text)
            if r.status_code >= 400:
                assert set(r.json()["error"]) >= {"code", "message", "type"}, (route, body, r.text)
    assert all_slots_idle(server)
    assert completion(server, "still fine", max_tokens=2)["usage"]["completion_tokens"] <= 2


# bodies generated from the served OpenAPI schema (schemathesis); token counts capped so the run stays short
SCHEMA_CAPS = {
    "max_tokens": 3,
    "max_completion_tokens": 3,
    "n_predict": 3,
    "n": 2,
    "top_logprobs": 3,
    "n_probs": 3,
}


def test_schema_driven_bodies_never_get_a_server_error(server: Server) -> None:
    """A bounded schemathesis run over every POST route of /openapi.json (both valid bodies and
    schema-violating ones): no 5xx, and the server still answers a plain request afterwards."""
    schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is not installed")
    from hypothesis import HealthCheck, given, settings

    with server.client() as c:
        spec = c.get("/openapi.json").json()
    posts = {path: ops["post"] for path, ops in spec["paths"].items() if "post" in ops}
    assert {"/v1/completions", "/v1/chat/completions", "/completion", "/tokenize"} <= posts.keys()
    for op in posts.values():  # the bodies the handlers accept are all described
        props = op["requestBody"]["content"]["application/json"]["schema"]["properties"]
        for name, cap in SCHEMA_CAPS.items():
            if name in props:
                props[name] = {"type": "integer", "maximum": cap}
    schema = schemathesis.openapi.from_dict(spec)
    headers = {"Authorization": f"Bearer {KEY}"}
    seen: list[tuple[str, int]] = []
    operations = [r.ok() for r in schema.get_all_operations()]
    for operation in (op for op in operations if op.method.upper() == "POST"):
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):

            @settings(
                max_examples=8,
                deadline=None,
                derandomize=True,
                database=None,
                suppress_health_check=list(HealthCheck),
            )
            @given(case=operation.as_strategy(generation_mode=mode))
            def no_server_error(case: Any) -> None:
                response = case.call(base_url=server.url, headers=headers, timeout=TIMEOUT)
                seen.append((case.operation.path, response.status_code))
                assert response.status_code < 500, (case.operation.path, case.body, response.text)

            no_server_error()
    assert {path for path, _ in seen} == set(posts)
    assert any(status == 200 for _, status in seen) and any(status == 400 for _, status in seen)
    with server.client() as c:
        r = c.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 2})
    assert r.status_code == 200


# ---- the real model ---------------------------------------------------------------------------------


def test_smollm2_answers_like_llama_cpp_and_reuses_the_first_turn(
    smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """SmolLM2's greedy answer (llama.cpp's too); the next turn reuses the cache and answers as a
    request that reuses nothing."""
    srv = start_server(
        smollm2_path, tmp_path_factory.mktemp("smol"), "-np", "2", "-c", "2048", "--api-key", KEY
    )
    try:
        client = srv.openai()
        messages = [{"role": "user", "content": "What is the capital of Germany?"}]
        first = client.chat.completions.create(model="m", messages=messages, temperature=0, max_tokens=16)
        assert first.choices[0].message.content == "The capital of Germany is Berlin."
        messages += [
            {"role": "assistant", "content": first.choices[0].message.content},
            {"role": "user", "content": "And of Italy?"},
        ]
        second = client.chat.completions.create(model="m", messages=messages, temperature=0, max_tokens=16)
        assert first.usage is not None and second.usage is not None
        details = second.usage.prompt_tokens_details
        assert details is not None and details.cached_tokens is not None
        assert details.cached_tokens >= first.usage.prompt_tokens - 2
        fresh = client.chat.completions.create(
            model="m", messages=messages, temperature=0, max_tokens=16, extra_body={"cache_prompt": False}
        )
        assert fresh.choices[0].message.content == second.choices[0].message.content
    finally:
        stop_server(srv)


# ---- loading ------------------------------------------------------------------------------------------


def test_routes_answer_503_until_the_model_is_loaded() -> None:
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    from gguflm.server.app import LoadingApp

    holder = LoadingApp()
    client = TestClient(holder)
    for path in ("/health", "/v1/chat/completions"):
        err = assert_error(client.get(path), 503, "unavailable_error")
        assert err["message"] == "Loading model"
    assert client.get("/health").headers["retry-after"] == "1"
    holder.ready(Starlette(routes=[Route("/health", lambda _: PlainTextResponse("ok"))]))
    assert client.get("/health").text == "ok"


def test_a_model_that_fails_to_load_ends_the_server_with_an_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 60)
    cmd = [sys.executable, "-m", "gguflm", "serve", "-m", str(bad), "--port", str(free_port())]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert run.returncode == 1
    assert "error: could not load" in run.stderr and str(bad) in run.stderr
    missing = subprocess.run(
        [*cmd[:5], str(tmp_path / "none.gguf")], capture_output=True, text=True, timeout=60
    )
    assert missing.returncode == 1 and "no model file" in missing.stderr


# ---- the engine alone ---------------------------------------------------------------------------------


def test_a_failing_sampler_ends_only_its_request(tiny_llama_path: Path) -> None:
    """In-process Engine: one request's sampler raises mid-generation; the other request in the
    same steps still gets all its tokens, and its slot keeps serving."""
    import threading

    from gguflm.model import Model
    from gguflm.sampling import Sampler, SamplerParams
    from gguflm.server.engine import Engine, GenRequest

    class Broken(Sampler):
        def __call__(self, logits: object) -> int:
            raise RuntimeError("sampler exploded")

    engine = Engine(Model.load(tiny_llama_path), n_ctx=512, n_parallel=2, chunk=16)
    events: dict[str, list] = {"good": [], "bad": []}
    finished = threading.Event()

    def emit(name: str) -> Callable[[tuple], None]:
        def put(event: tuple) -> None:
            events[name].append(event)
            if all(e and e[-1][0] in ("done", "error") for e in events.values()):
                finished.set()

        return put

    no_end = dict.fromkeys(engine.tokenizer.eog_ids, float("-inf"))
    good = GenRequest([1, 2, 3], Sampler(SamplerParams(temp=0, logit_bias=no_end)), 8, [], emit("good"))
    bad = GenRequest([1, 2, 3, 4], Broken(SamplerParams(temp=0)), 8, [], emit("bad"))
    engine.start()
    try:
        engine.submit(good)
        engine.submit(bad)
        assert finished.wait(30)
    finally:
        engine.stop()
    assert events["bad"][-1][0] == "error" and "sampler exploded" in events["bad"][-1][1]
    done = events["good"][-1]
    assert done[0] == "done" and done[1].n_generated == 8 and done[1].finish_reason == "length"


def test_a_generating_request_is_untouched_by_a_long_prompt_beside_it(smollm2: object) -> None:
    """In-process Engine on SmolLM2, stepped by hand: request A's logprobs while a 260-token prompt
    is read beside it (a 256-token chunk, then 4) equal A's logprobs alone, bit for bit."""
    from gguflm.sampling import Sampler, SamplerParams
    from gguflm.server.engine import Engine, GenRequest

    engine = Engine(smollm2, n_ctx=1024, n_parallel=2, chunk=256)  # type: ignore[arg-type]
    tok = engine.tokenizer
    a_prompt = tok.encode("The history of the lighthouse begins", add_special=True)
    b_prompt = tok.encode("word " * 400, add_special=True)[:260]

    def request(prompt: list[int], out: list) -> GenRequest:
        sampler = Sampler(SamplerParams(temp=0))
        return GenRequest(prompt, sampler, 6, [], out.append, n_probs=1, cache_prompt=False)

    def logprobs(events: list) -> list[float]:
        assert events[-1][0] == "done", events[-1]
        return [t.logprob for e in events if e[0] == "text" for t in e[2]]

    def run_until_idle() -> None:
        while engine.slots[0].busy or engine.slots[1].busy or engine.waiting:
            engine._step()

    alone: list = []
    engine._take(request(a_prompt, alone))
    run_until_idle()
    beside: list = []
    engine._take(request(a_prompt, beside))
    for _ in range(2):  # A reads its prompt and generates a token
        engine._step()
    engine._take(request(b_prompt, []))
    run_until_idle()
    assert len(logprobs(alone)) == 6
    assert logprobs(beside) == logprobs(alone)


# ---- shutdown (last: it stops the module's server) --------------------------------------------------


def test_zz_terminate_ends_streams_stops_cleanly_and_releases_the_port(server: Server) -> None:
    with server.client() as c, c.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        t0 = time.monotonic()
        server.proc.terminate()
        rest = [line for line in lines if line]
    assert time.monotonic() - t0 < 2  # the stream ends at once, not after uvicorn's grace period
    assert rest[-1] == "data: [DONE]"
    assert "shutting down" in json.loads(rest[-2][6:])["error"]["message"]
    assert server.proc.wait(15) == 0
    deadline = time.monotonic() + 5
    while not port_is_free(server.port) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert port_is_free(server.port)
