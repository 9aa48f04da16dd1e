// The chat page: conversations (kept in localStorage, listed in the sidebar) sent to
// /v1/chat/completions with stream: true; replies rendered as markdown while they stream in.
import { loadConversations, loadSettings, newConversation, saveConversations, saveSettings, titleOf }
  from "/static/store.js";
import { copyButton, renderMarkdown } from "/static/render.js";
import { errorText, serverEvents } from "/static/sse.js";

const $ = (id) => document.getElementById(id);
const ui = {
  messages: $("messages"), form: $("composer"), prompt: $("prompt"), send: $("send"), stop: $("stop"),
  newChat: $("new-chat"), list: $("conversation-list"), modelName: $("model-name"),
  settings: $("settings"), toggleSettings: $("toggle-settings"), system: $("system-prompt"),
  temperature: $("temperature"), temperatureValue: $("temperature-value"), topP: $("top-p"),
  maxTokens: $("max-tokens"), seed: $("seed"), apiKey: $("api-key"),
};
const SETTINGS = { temperature: ui.temperature, topP: ui.topP, maxTokens: ui.maxTokens, seed: ui.seed,
                   apiKey: ui.apiKey };
const state = { model: null, context: null, conversations: loadConversations(), current: null, controller: null,
                tokensPerByte: 1 };  // until the server reports a prompt's size: a byte-level tokenizer's worst case

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function button(className, text, onClick) {
  const node = element("button", className, text);
  node.type = "button";
  node.addEventListener("click", onClick);
  return node;
}

// ---- settings ----------------------------------------------------------------------

function initSettings() {
  const saved = loadSettings();
  for (const [key, input] of Object.entries(SETTINGS)) {
    if (saved[key] !== undefined) input.value = saved[key];
    input.addEventListener("change", () => {
      saveSettings(Object.fromEntries(Object.entries(SETTINGS).map(([k, i]) => [k, i.value])));
    });
  }
  const showTemperature = () => { ui.temperatureValue.textContent = Number(ui.temperature.value).toFixed(2); };
  ui.temperature.addEventListener("input", showTemperature);
  showTemperature();
  ui.toggleSettings.addEventListener("click", () => { ui.settings.hidden = !ui.settings.hidden; });
  ui.system.addEventListener("input", () => {
    state.current.system = ui.system.value;
    if (state.current.messages.length) persist();
  });
}

function samplingFields() {
  const fields = { temperature: Number(ui.temperature.value) };
  const maxTokens = parseInt(ui.maxTokens.value, 10);
  if (maxTokens >= 1) fields.max_tokens = maxTokens;  // else the server's default: the rest of the context
  const topP = Number(ui.topP.value);
  if (ui.topP.value !== "" && topP >= 0 && topP <= 1) fields.top_p = topP;
  if (ui.seed.value !== "" && Number.isInteger(Number(ui.seed.value))) fields.seed = Number(ui.seed.value);
  return fields;
}

// ---- fitting the context ----------------------------------------------------------

const encoder = new TextEncoder();
const TEMPLATE_BYTES = 8;  // a message's share of the chat template, roughly
const sizeOf = (messages) => messages.reduce((n, m) => n + encoder.encode(m.content).length + TEMPLATE_BYTES, 0);

// The messages and sampling fields for a reply. As `llmkit chat` does, the oldest exchanges are left out
// of the request (not the conversation; the system prompt stays) until the prompt, estimated from its
// size and the tokens per byte the server last reported, leaves the reply its room: max tokens, at most
// half the context. A max_tokens larger than the room left is not sent: the server then lets the reply
// take what is left.
function request(conversation) {
  const system = conversation.system ? [{ role: "system", content: conversation.system }] : [];
  let kept = conversation.messages.map(({ role, content }) => ({ role, content }));
  const fields = samplingFields();
  let dropped = 0;
  if (state.context) {
    const estimate = () => Math.ceil(state.tokensPerByte * sizeOf([...system, ...kept]));
    const room = Math.min(fields.max_tokens || state.context, Math.floor(state.context / 2));
    while (estimate() + room > state.context) {
      const next = kept.findIndex((m, i) => i > 0 && m.role === "user");  // where the second exchange starts
      if (next < 0) break;  // the last question is all that is left
      kept = kept.slice(next);
      dropped += 1;
    }
    if (fields.max_tokens && estimate() + fields.max_tokens > state.context) delete fields.max_tokens;
  }
  return { messages: [...system, ...kept], fields, dropped };
}

function headers() {
  const h = { "Content-Type": "application/json" };
  if (ui.apiKey.value) h["Authorization"] = "Bearer " + ui.apiKey.value;
  return h;
}

async function loadModel() {
  try {
    const response = await fetch("/v1/models", { headers: headers() });
    if (!response.ok) throw new Error(await errorText(response));
    const card = (await response.json()).data[0];
    state.model = card ? card.id : null;
    state.context = card && card.context_length ? card.context_length : null;
    ui.modelName.textContent = state.model || "(no model)";
  } catch (e) {
    ui.modelName.textContent = "(offline)";
    showError("Could not list models: " + e.message);
  }
}

// ---- conversations -----------------------------------------------------------------

function persist(conversation = state.current) {
  conversation.title = titleOf(conversation);
  conversation.updated = Date.now();
  if (!state.conversations.includes(conversation)) state.conversations.unshift(conversation);
  state.conversations.sort((a, b) => b.updated - a.updated);
  try {
    saveConversations(state.conversations);
  } catch (e) {
    showError("Could not save the conversation in this browser: " + e.message);
  }
  renderList();
}

function open(conversation) {
  if (state.controller) state.controller.abort();
  state.current = conversation;
  ui.system.value = conversation.system || "";
  renderList();
  renderMessages();
}

function remove(conversation) {
  state.conversations = state.conversations.filter((c) => c !== conversation);
  saveConversations(state.conversations);
  if (conversation === state.current) open(state.conversations[0] || newConversation());
  else renderList();
}

function renderList() {
  ui.list.replaceChildren(...state.conversations.map((conversation) => {
    const item = element("li", conversation === state.current ? "active" : "");
    item.append(button("conversation", conversation.title, () => open(conversation)),
                button("delete-conversation", "×", () => remove(conversation)));
    item.lastChild.title = "Delete this conversation";
    return item;
  }));
}

// ---- messages ----------------------------------------------------------------------

function metaElement(meta) {
  const node = element("div", "meta");
  const parts = [];
  if (meta.tokens !== undefined) parts.push(["tokens", meta.tokens + " tokens"]);
  if (meta.speed) parts.push(["speed", meta.speed.toFixed(1) + " tok/s"]);
  if (meta.used !== undefined && meta.context) {
    parts.push(["context-use", `context ${meta.used}/${meta.context} (${Math.round(100 * meta.used / meta.context)}%)`]);
  }
  if (meta.dropped) {
    parts.push(["dropped", `${meta.dropped} older exchange${meta.dropped > 1 ? "s" : ""} left out to fit the context`]);
  }
  if (meta.note) parts.push(["note", meta.note]);
  parts.forEach(([name, text], i) => {
    if (i) node.append(" · ");
    node.append(element("span", name, text));
  });
  return node;
}

function messageElement(message, index) {
  const node = element("div", "message " + message.role);
  const body = element("div", "content");
  if (message.role === "assistant") renderMarkdown(body, message.content);
  else body.textContent = message.content;
  node.append(body);
  if (message.meta) node.append(metaElement(message.meta));
  const actions = element("div", "actions");
  actions.append(copyButton("copy-message", () => message.content));
  if (message.role === "user") actions.append(button("edit", "Edit", () => startEdit(node, index)));
  const last = index === state.current.messages.length - 1;
  if (message.role === "assistant" && last) actions.append(button("regenerate", "Regenerate", regenerate));
  node.append(actions);
  return node;
}

function renderMessages() {
  ui.messages.replaceChildren(...state.current.messages.map(messageElement));
  ui.messages.scrollTop = ui.messages.scrollHeight;
}

function showError(text) {
  ui.messages.append(element("div", "message error", text));
}

function startEdit(node, index) {
  if (state.controller) return;
  const box = element("textarea", "edit-box");
  box.value = state.current.messages[index].content;
  box.rows = Math.min(10, box.value.split("\n").length + 1);
  const save = button("save-edit", "Send", () => {
    const text = box.value.trim();
    if (!text) return;
    // everything after the edited message belonged to the old question
    state.current.messages = state.current.messages.slice(0, index);
    state.current.messages.push({ role: "user", content: text });
    generate();
  });
  const cancel = button("cancel-edit", "Cancel", renderMessages);
  node.replaceChildren(box, element("div", "actions"));
  node.lastChild.append(save, cancel);
  box.focus();
}

function regenerate() {
  if (state.controller) return;
  const messages = state.current.messages;
  if (messages.length && messages[messages.length - 1].role === "assistant") messages.pop();
  generate();
}

// ---- one reply ---------------------------------------------------------------------

function setBusy(busy) {
  ui.send.disabled = busy;
  ui.stop.hidden = !busy;
}

async function generate() {
  const conversation = state.current;
  if (!state.model) await loadModel();
  const { messages, fields, dropped } = request(conversation);
  const reply = { role: "assistant", content: "", meta: null };
  conversation.messages.push(reply);
  persist();
  renderMessages();
  const node = ui.messages.lastElementChild;
  node.classList.add("streaming");
  const body = node.querySelector(".content");
  let painting = false;
  const paint = () => {  // at most once a frame: markdown and highlighting redo the whole reply
    if (painting) return;
    painting = true;
    requestAnimationFrame(() => {
      painting = false;
      renderMarkdown(body, reply.content);
      ui.messages.scrollTop = ui.messages.scrollHeight;
    });
  };
  const meta = { tokens: 0, context: state.context, dropped };
  const controller = state.controller = new AbortController();
  setBusy(true);
  const started = performance.now();
  let first = null;
  let error = null;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), signal: controller.signal,
      body: JSON.stringify({ model: state.model, messages, stream: true, stream_options: { include_usage: true },
                             ...fields }),
    });
    if (!response.ok) throw new Error(await errorText(response));
    for await (const chunk of serverEvents(response)) {
      if (chunk.error) throw new Error(chunk.error.message);
      for (const choice of chunk.choices) {
        meta.tokens += 1;  // the server sends one chunk per generated token
        if (first === null) first = performance.now();
        if (choice.delta && choice.delta.content) {
          reply.content += choice.delta.content;
          paint();
        }
        if (choice.finish_reason === "length") meta.note = "stopped at max tokens";
      }
      if (chunk.usage) {
        meta.tokens = chunk.usage.completion_tokens;
        meta.used = chunk.usage.total_tokens;
        if (chunk.usage.prompt_tokens) state.tokensPerByte = chunk.usage.prompt_tokens / sizeOf(messages);
      }
    }
  } catch (e) {
    if (e.name === "AbortError") meta.note = "stopped";
    else error = e.message;
  }
  const seconds = (performance.now() - (first || started)) / 1000;
  if (meta.tokens > 1 && seconds > 0) meta.speed = (meta.tokens - 1) / seconds;  // decoding rate, after the first token
  if (first !== null) meta.firstToken = (first - started) / 1000;
  reply.meta = meta;
  if (!reply.content) conversation.messages.pop();  // nothing came: the question stays, ready to edit or resend
  if (state.controller === controller) {
    state.controller = null;
    setBusy(false);
  }
  persist(conversation);
  if (conversation === state.current) {
    renderMessages();
    if (error) showError(error);
  }
  ui.prompt.focus();
}

// ---- wiring ------------------------------------------------------------------------

ui.form.addEventListener("submit", (event) => {
  event.preventDefault();
  const text = ui.prompt.value.trim();
  if (!text || state.controller) return;
  ui.prompt.value = "";
  state.current.messages.push({ role: "user", content: text });
  generate();
});
ui.prompt.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    ui.form.requestSubmit();
  }
});
ui.stop.addEventListener("click", () => state.controller && state.controller.abort());
ui.newChat.addEventListener("click", () => {
  open(newConversation());
  ui.prompt.focus();
});

initSettings();
open(state.conversations[0] || newConversation());
loadModel();
