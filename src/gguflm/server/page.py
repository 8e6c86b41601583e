"""The chat page `GET /` serves: one static HTML file with its script, no build step.

Kept as a Python string so that it ships with the package whatever the packaging includes. The
script keeps the conversation in the page, sends it to /v1/chat/completions with `stream: true`
and appends the streamed deltas as they arrive (Server-Sent Events read from fetch's body).
"""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>gguflm serve</title>
<style>
  body { font-family: system-ui, sans-serif; max-width: 46rem; margin: 1rem auto; padding: 0 1rem; }
  #log { display: flex; flex-direction: column; gap: .5rem; margin-bottom: 1rem; }
  .msg { white-space: pre-wrap; padding: .5rem .75rem; border-radius: .5rem; }
  .user { background: #e8f0fe; align-self: flex-end; }
  .assistant { background: #f1f3f4; align-self: flex-start; }
  .error { background: #fce8e6; }
  form { display: flex; gap: .5rem; }
  #input { flex: 1; font: inherit; padding: .5rem; }
  #settings { margin-bottom: 1rem; font-size: .9rem; color: #555; }
</style>
</head>
<body>
<h1>gguflm serve</h1>
<div id="settings">
  <label>API key <input id="key" type="password" autocomplete="off" placeholder="(none)"></label>
  <label>temperature <input id="temp" type="number" min="0" max="2" step="0.1" value="0.7"></label>
  <label>max tokens <input id="max" type="number" min="1" step="1" value="512"></label>
  <button id="reset" type="button">new chat</button>
</div>
<div id="log" aria-live="polite"></div>
<form id="form">
  <input id="input" autocomplete="off" placeholder="Type a message" required>
  <button id="send" type="submit">Send</button>
</form>
<script>
const log = document.getElementById("log");
const form = document.getElementById("form");
const input = document.getElementById("input");
const key = document.getElementById("key");
const temp = document.getElementById("temp");
const send = document.getElementById("send");
const maxTokens = document.getElementById("max");
key.value = localStorage.getItem("gguflm-key") || "";
key.addEventListener("change", () => localStorage.setItem("gguflm-key", key.value));
let messages = [];

function bubble(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.textContent = text;
  log.appendChild(div);
  return div;
}

document.getElementById("reset").addEventListener("click", () => { messages = []; log.textContent = ""; });

form.addEventListener("submit", async (event) => {
  event.preventDefault();
  const text = input.value.trim();
  if (!text) return;
  input.value = "";
  send.disabled = true;
  messages.push({ role: "user", content: text });
  bubble("user", text);
  const out = bubble("assistant", "");
  const headers = { "Content-Type": "application/json" };
  if (key.value) headers["Authorization"] = "Bearer " + key.value;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers,
      body: JSON.stringify({
        messages, stream: true, temperature: Number(temp.value), max_tokens: Number(maxTokens.value),
      }),
    });
    if (!response.ok) {
      const body = await response.json().catch(() => ({}));
      throw new Error((body.error && body.error.message) || response.statusText);
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\\n\\n")) >= 0) {
        const line = buffer.slice(0, end).trim();
        buffer = buffer.slice(end + 2);
        if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
        const chunk = JSON.parse(line.slice(6));
        if (chunk.error) throw new Error(chunk.error.message);
        for (const choice of chunk.choices || []) {
          if (choice.delta && choice.delta.content) out.textContent += choice.delta.content;
        }
      }
    }
    messages.push({ role: "assistant", content: out.textContent });
  } catch (err) {
    messages.pop();
    out.className = "msg error";
    out.textContent = "error: " + err.message;
  } finally {
    send.disabled = false;
    input.focus();
  }
});
</script>
</body>
</html>
"""
