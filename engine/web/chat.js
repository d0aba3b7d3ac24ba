// The chat page: talks to /v1/chat/completions with stream: true and renders tokens as they arrive.
// Model output is only ever put into the page as text (textContent), never parsed as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORAGE = "engine-chat-api-key";

const state = {
  model: null,
  history: [],        // [{role, content}] of the conversation so far
  conversation: 0,    // bumped by New chat, so an answer still streaming does not land in the next one
  controller: null,   // AbortController of the answer being streamed
  apiKey: localStorage.getItem(KEY_STORAGE) || "",
};

function headers() {
  const h = { "Content-Type": "application/json" };
  if (state.apiKey) h["Authorization"] = `Bearer ${state.apiKey}`;
  return h;
}

// -- rendering -------------------------------------------------------------------------------------

// Text with ``` fences becomes paragraphs and <pre><code> blocks; line breaks are kept by CSS.
function renderBody(container, text) {
  container.replaceChildren();
  const parts = text.split("```");
  parts.forEach((part, i) => {
    if (i % 2 === 1) {
      const newline = part.indexOf("\n");
      const code = newline >= 0 && /^[\w+#.-]*$/.test(part.slice(0, newline)) ? part.slice(newline + 1) : part;
      const pre = document.createElement("pre");
      const el = document.createElement("code");
      el.textContent = code;
      pre.appendChild(el);
      container.appendChild(pre);
    } else if (part.length) {
      for (const para of part.split(/\n{2,}/)) {
        if (!para.trim()) continue;
        const p = document.createElement("p");
        p.textContent = para.replace(/^\n+|\n+$/g, "");
        container.appendChild(p);
      }
    }
  });
}

function addMessage(role, text = "") {
  const msg = document.createElement("div");
  msg.className = `msg ${role}`;
  msg.dataset.role = role;
  const body = document.createElement("div");
  body.className = "body";
  msg.appendChild(body);
  renderBody(body, text);
  $("messages").appendChild(msg);
  msg.scrollIntoView({ block: "end" });
  return msg;
}

function showError(text) {
  addMessage("error", text);
}

function setStats(msg, fields) {
  let stats = msg.querySelector(".stats");
  if (!stats) {
    stats = document.createElement("div");
    stats.className = "stats";
    msg.appendChild(stats);
  }
  stats.textContent = fields.filter(Boolean).join(" · ");
}

// -- server calls ----------------------------------------------------------------------------------

async function errorText(response) {
  let message = response.statusText;
  try {
    const body = await response.json();
    message = (body.error && body.error.message) || JSON.stringify(body);
  } catch (_) { /* not JSON */ }
  return `Error ${response.status}: ${message}`;
}

function askForKey(reason) {
  $("settings").hidden = false;
  $("settings-toggle").setAttribute("aria-expanded", "true");
  $("key-row").hidden = false;
  $("api-key").focus();
  showError(reason);
}

async function loadModel() {
  try {
    const response = await fetch("v1/models", { headers: headers() });
    if (response.status === 401) {
      $("model").textContent = "API key needed";
      askForKey(`This server needs an API key (${await errorText(response)}): enter it in Settings.`);
      return;
    }
    if (!response.ok) throw new Error(await errorText(response));
    const body = await response.json();
    state.model = body.data[0].id;
    $("model").textContent = state.model;
  } catch (e) {
    $("model").textContent = "server unreachable";
    showError(String(e.message || e));
  }
}

function requestBody() {
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push(...state.history);
  const body = { messages, stream: true, stream_options: { include_usage: true } };
  if (state.model) body.model = state.model;
  for (const [id, name, parse] of [["temperature", "temperature", parseFloat], ["top-p", "top_p", parseFloat],
                                   ["max-tokens", "max_tokens", (v) => parseInt(v, 10)]]) {
    const value = parse($(id).value);
    if (!Number.isNaN(value)) body[name] = value;
  }
  return body;
}

// Yields the JSON payload of each server-sent event until [DONE].
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

async function send(text) {
  const conversation = state.conversation;
  state.history.push({ role: "user", content: text });
  addMessage("user", text);
  const answer = addMessage("assistant");
  const body = answer.querySelector(".body");
  const controller = new AbortController();
  state.controller = controller;
  setBusy(true);
  const started = performance.now();
  let firstAt = null, content = "", usage = null, finish = null;
  try {
    const response = await fetch("v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(requestBody()), signal: controller.signal,
    });
    if (!response.ok) {
      answer.remove();
      state.history.pop();
      if (response.status === 401) askForKey(await errorText(response));
      else showError(await errorText(response));
      return;
    }
    for await (const chunk of events(response)) {
      if (chunk.error) throw new Error(`Error from the server: ${chunk.error.message}`);
      if (chunk.usage) usage = chunk.usage;
      const choice = chunk.choices && chunk.choices[0];
      if (!choice) continue;
      if (choice.finish_reason) finish = choice.finish_reason;
      const delta = choice.delta && choice.delta.content;
      if (delta) {
        if (firstAt === null) firstAt = performance.now();
        content += delta;
        renderBody(body, content);
        answer.scrollIntoView({ block: "end" });
      }
    }
  } catch (e) {
    if (e.name !== "AbortError") showError(String(e.message || e));
  } finally {
    const stopped = controller.signal.aborted;
    if ((content || stopped) && conversation === state.conversation) state.history.push({ role: "assistant", content });
    const end = performance.now();
    const decodeS = firstAt === null ? 0 : (end - firstAt) / 1000;
    const tokens = usage ? usage.completion_tokens : null;
    setStats(answer, [
      stopped ? "stopped" : finish && `finish: ${finish}`,
      firstAt !== null && `first token ${((firstAt - started) / 1000).toFixed(2)} s`,
      tokens !== null && decodeS > 0 && `${(Math.max(tokens - 1, 0) / decodeS).toFixed(1)} tok/s`,
      usage && `${usage.prompt_tokens} prompt + ${usage.completion_tokens} completion tokens`,
    ]);
    if (state.controller === controller) state.controller = null;
    setBusy(false);
  }
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

// -- wiring ----------------------------------------------------------------------------------------

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || state.controller) return;
  $("prompt").value = "";
  send(text);
});
$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
});
$("stop").addEventListener("click", () => state.controller && state.controller.abort());
$("new-chat").addEventListener("click", () => {
  if (state.controller) state.controller.abort();
  state.conversation += 1;
  state.history = [];
  $("messages").replaceChildren();
  $("prompt").focus();
});
$("settings-toggle").addEventListener("click", () => {
  const open = $("settings").hidden;
  $("settings").hidden = !open;
  $("settings-toggle").setAttribute("aria-expanded", String(open));
});
$("save-key").addEventListener("click", () => {
  state.apiKey = $("api-key").value.trim();
  localStorage.setItem(KEY_STORAGE, state.apiKey);
  loadModel();
});
$("api-key").value = state.apiKey;
loadModel();
