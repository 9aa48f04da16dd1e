// The chat page: keeps the conversation in memory, sends it to /v1/chat/completions with
// stream: true and appends each Server-Sent Event's text to the answer as it arrives.
"use strict";

const $ = (id) => document.getElementById(id);
const ui = {
  messages: $("messages"), form: $("composer"), prompt: $("prompt"), send: $("send"), stop: $("stop"),
  newChat: $("new-chat"), temperature: $("temperature"), temperatureValue: $("temperature-value"),
  maxTokens: $("max-tokens"), system: $("system-prompt"), apiKey: $("api-key"), modelName: $("model-name"),
};

let model = null;          // the first model /v1/models lists
let history = [];          // [{role, content}] of this conversation
let controller = null;     // AbortController of the answer being streamed

// Settings survive a reload; nothing leaves the browser except to this server.
for (const [key, input] of [["temperature", ui.temperature], ["maxTokens", ui.maxTokens],
                            ["system", ui.system], ["apiKey", ui.apiKey]]) {
  const saved = localStorage.getItem("llmkit." + key);
  if (saved !== null) input.value = saved;
  input.addEventListener("change", () => localStorage.setItem("llmkit." + key, input.value));
}
const showTemperature = () => { ui.temperatureValue.textContent = Number(ui.temperature.value).toFixed(2); };
ui.temperature.addEventListener("input", showTemperature);
showTemperature();

function headers() {
  const h = { "Content-Type": "application/json" };
  if (ui.apiKey.value) h["Authorization"] = "Bearer " + ui.apiKey.value;
  return h;
}

function addMessage(kind, text) {
  const div = document.createElement("div");
  div.className = "message " + kind;
  div.textContent = text;
  ui.messages.appendChild(div);
  ui.messages.scrollTop = ui.messages.scrollHeight;
  return div;
}

async function errorText(response) {
  try {
    const body = await response.json();
    return body.error && body.error.message ? body.error.message : response.statusText;
  } catch (e) {
    return response.status + " " + response.statusText;
  }
}

async function loadModel() {
  try {
    const response = await fetch("/v1/models", { headers: headers() });
    if (!response.ok) throw new Error(await errorText(response));
    const body = await response.json();
    model = body.data.length ? body.data[0].id : null;
    ui.modelName.textContent = model || "(no model)";
  } catch (e) {
    ui.modelName.textContent = "(offline)";
    addMessage("error", "Could not list models: " + e.message);
  }
}

function setBusy(busy) {
  ui.send.disabled = busy;
  ui.stop.hidden = !busy;
}

// Yields the parsed JSON of each `data:` event until `data: [DONE]`.
async function* serverEvents(response) {
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

// Ask for a reply; when the conversation no longer fits the model's context, drop the oldest
// exchange and ask again (then let the server size the reply), as `llmkit chat` does.
async function requestReply(options, notes) {
  let dropped = 0;
  let maxTokens = Math.max(1, parseInt(ui.maxTokens.value, 10) || 1);
  for (;;) {
    const kept = history.slice(2 * dropped);
    const messages = ui.system.value ? [{ role: "system", content: ui.system.value }, ...kept] : kept;
    const body = {
      model, messages, stream: true, stream_options: { include_usage: true },
      temperature: Number(ui.temperature.value), ...(maxTokens ? { max_tokens: maxTokens } : {}),
    };
    const response = await fetch("/v1/chat/completions", { ...options, body: JSON.stringify(body) });
    if (response.ok) {
      if (dropped) notes.push(`${dropped} older exchange${dropped > 1 ? "s" : ""} left out to fit the context`);
      history.splice(0, 2 * dropped);
      return response;
    }
    const error = await response.clone().json().catch(() => ({}));
    if (!(error.error && error.error.code === "context_length_exceeded")) throw new Error(await errorText(response));
    if (maxTokens) maxTokens = 0;  // first let the reply take what is left of the context
    else if (2 * (dropped + 1) < history.length) dropped += 1;
    else throw new Error(await errorText(response));
  }
}

async function send(text) {
  if (!model) await loadModel();
  history.push({ role: "user", content: text });
  addMessage("user", text);
  const answer = addMessage("assistant streaming", "");
  controller = new AbortController();
  setBusy(true);
  let content = "";
  let note = "";
  try {
    const notes = [];
    const response = await requestReply({ method: "POST", headers: headers(), signal: controller.signal }, notes);
    note = notes.join(", ");
    const trimmed = note;
    for await (const chunk of serverEvents(response)) {
      if (chunk.error) throw new Error(chunk.error.message);
      for (const choice of chunk.choices) {
        if (choice.delta && choice.delta.content) {
          content += choice.delta.content;
          answer.textContent = content;
          ui.messages.scrollTop = ui.messages.scrollHeight;
        }
        if (choice.finish_reason === "length") note = [trimmed, "stopped at max tokens"].filter(Boolean).join(", ");
      }
      if (chunk.usage) note = [note, chunk.usage.completion_tokens + " tokens"].filter(Boolean).join(", ");
    }
  } catch (e) {
    note = e.name === "AbortError" ? "stopped" : "";
    if (e.name !== "AbortError") addMessage("error", e.message);
  } finally {
    answer.classList.remove("streaming");
    if (note) {
      const meta = document.createElement("span");
      meta.className = "meta";
      meta.textContent = note;
      answer.appendChild(meta);
    }
    // A turn that got no answer leaves the history, so user and assistant turns keep alternating.
    if (content) history.push({ role: "assistant", content });
    else history.pop();
    controller = null;
    setBusy(false);
    ui.prompt.focus();
  }
}

ui.form.addEventListener("submit", (event) => {
  event.preventDefault();
  const text = ui.prompt.value.trim();
  if (!text || controller) return;
  ui.prompt.value = "";
  send(text);
});
ui.prompt.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    ui.form.requestSubmit();
  }
});
ui.stop.addEventListener("click", () => controller && controller.abort());
ui.newChat.addEventListener("click", () => {
  if (controller) controller.abort();
  history = [];
  ui.messages.replaceChildren();
  ui.prompt.focus();
});

loadModel();
