// Conversations and settings kept in this browser's localStorage; nothing leaves the browser
// except to this server.
const CONVERSATIONS = "llmkit.conversations";
const SETTINGS = "llmkit.settings";

function read(key, fallback) {
  try {
    const value = JSON.parse(localStorage.getItem(key));
    return value === null ? fallback : value;
  } catch (e) {
    return fallback;  // a damaged entry must not keep the page from starting
  }
}

export function loadConversations() {
  const list = read(CONVERSATIONS, []);
  return Array.isArray(list) ? list.filter((c) => c && Array.isArray(c.messages)) : [];
}

export function saveConversations(list) {
  localStorage.setItem(CONVERSATIONS, JSON.stringify(list));
}

export function newConversation() {
  const id = Date.now().toString(36) + Math.random().toString(36).slice(2, 7);
  return { id, title: "New chat", system: "", messages: [], updated: Date.now() };
}

export function titleOf(conversation) {
  const first = conversation.messages.find((m) => m.role === "user");
  if (!first) return "New chat";
  const line = first.content.trim().split("\n")[0];
  return line.length > 40 ? line.slice(0, 39) + "…" : line;
}

export function loadSettings() {
  return read(SETTINGS, {});
}

export function saveSettings(settings) {
  localStorage.setItem(SETTINGS, JSON.stringify(settings));
}
