// lmforge web chat: streams answers from /v1/chat/completions and keeps conversations
// and ratings through /api/*. On a server with a knowledge base (--rag), an answer's
// sources arrive with its last chunk and are listed under it as links; its [n] markers
// link to them too. Plain browser JavaScript, no build step, no dependencies.
"use strict";

const DEFAULTS = { system_prompt: "", temperature: 0.7, top_p: 0.95, max_tokens: 512, use_rag: true };
const SETTINGS_KEY = "lmforge.chat.settings";
const API_KEY_KEY = "lmforge.chat.apiKey";

const state = {
  conversationId: null,
  messages: [],       // {id, role, content, feedback} as the server stored them
  model: null,
  knowledgeBase: false, // the server answers from a knowledge base (GET /health says so)
  streaming: null,    // AbortController of the answer being streamed
};

const $ = (id) => document.getElementById(id);
const el = {};

// ------------------------------------------------------------------ settings
function loadSettings() {
  let saved = {};
  try { saved = JSON.parse(localStorage.getItem(SETTINGS_KEY) || "{}"); } catch (_) { saved = {}; }
  const s = { ...DEFAULTS, ...saved };
  el.systemPrompt.value = s.system_prompt;
  el.temperature.value = s.temperature;
  el.topP.value = s.top_p;
  el.maxTokens.value = s.max_tokens;
  el.useRag.checked = s.use_rag !== false;
  el.apiKey.value = localStorage.getItem(API_KEY_KEY) || "";
  showSliderValues();
}

function readSettings() {
  const num = (input, fallback) => {
    const v = Number(input.value);
    return Number.isFinite(v) && input.value !== "" ? v : fallback;
  };
  const maxTokens = Math.round(num(el.maxTokens, DEFAULTS.max_tokens));
  return {
    system_prompt: el.systemPrompt.value,
    temperature: Math.min(2, Math.max(0, num(el.temperature, DEFAULTS.temperature))),
    top_p: Math.min(1, Math.max(0.05, num(el.topP, DEFAULTS.top_p))),
    max_tokens: Math.min(4096, Math.max(1, maxTokens)),
    use_rag: el.useRag.checked,
  };
}

function saveSettings() {
  localStorage.setItem(SETTINGS_KEY, JSON.stringify(readSettings()));
  showSliderValues();
}

function showSliderValues() {
  $("temperature-value").textContent = Number(el.temperature.value).toFixed(2);
  $("top-p-value").textContent = Number(el.topP.value).toFixed(2);
}

// ----------------------------------------------------------------------- api
function headers() {
  const h = { "Content-Type": "application/json" };
  const key = el.apiKey.value.trim();
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

class ApiError extends Error {
  constructor(message, status) { super(message); this.status = status; }
}

async function errorFrom(response) {
  let message = `${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) message = body.error.message;
  } catch (_) { /* not JSON */ }
  return new ApiError(message, response.status);
}

async function api(path, { method = "GET", body } = {}) {
  const response = await fetch(path, {
    method, headers: headers(), body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (!response.ok) {
    const error = await errorFrom(response);
    if (error.status === 401) askForKey();
    throw error;
  }
  return response.json();
}

// Server-sent events from a fetch response: yields the data of each event as it arrives.
async function* sseData(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    buffer += decoder.decode(value || new Uint8Array(), { stream: !done });
    let boundary;
    while ((boundary = buffer.search(/\r?\n\r?\n/)) >= 0) {
      const block = buffer.slice(0, boundary);
      buffer = buffer.slice(boundary).replace(/^\r?\n\r?\n/, "");
      const data = block.split(/\r?\n/)
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).replace(/^ /, ""))
        .join("\n");
      if (data) yield data;
    }
    if (done) return;
  }
}

// ------------------------------------------------------------------- notices
function notice(text) {
  el.notice.textContent = text;
  el.notice.hidden = !text;
}

function askForKey() {
  notice("This server needs an API key. Enter it under Settings; it stays in this browser.");
  el.settings.open = true;
  openMenu(true);
}

// --------------------------------------------------------------- rendering
function setTitle(text) {
  el.title.textContent = text || "New chat";
  document.title = (text ? text + " - " : "") + "lmforge chat";
}

function clearMessages() {
  el.messages.replaceChildren(el.empty);
  el.empty.hidden = false;
}

function nearBottom() {
  const m = el.messages;
  return m.scrollHeight - m.scrollTop - m.clientHeight < 80;
}

function scrollToEnd(force) {
  if (force || nearBottom()) el.messages.scrollTop = el.messages.scrollHeight;
}

const ROLE_NAMES = { user: "You", assistant: "Assistant", system: "System prompt" };

function renderMessage(message) {
  el.empty.hidden = true;
  const article = document.createElement("article");
  article.className = "message " + message.role;
  const role = document.createElement("div");
  role.className = "role";
  role.textContent = ROLE_NAMES[message.role] || message.role;
  const content = document.createElement("div");
  content.className = "content";
  content.textContent = message.content;
  article.append(role, content);
  const view = { article, content, message };
  if (message.role === "assistant" && message.sources) showSources(view, message.content, message.sources);
  if (message.role === "assistant") addFeedbackControls(view);
  el.messages.append(article);
  return view;
}

// The answer's [n] markers as links to its sources, and the sources listed under it. Built
// from DOM nodes and text only: nothing the server sends is parsed as HTML.
function sourceLink(source) {
  const a = document.createElement("a");
  a.href = "/rag/sources/" + encodeURIComponent(source.id);  // this server's page, whatever url says
  a.target = "_blank";
  a.rel = "noopener noreferrer";
  return a;
}

function linkMarkers(content, text, byNumber) {
  const nodes = [];
  let last = 0;
  for (const match of text.matchAll(/\[(\d+)\]/g)) {
    const source = byNumber.get(Number(match[1]));
    if (!source) continue;
    if (match.index > last) nodes.push(document.createTextNode(text.slice(last, match.index)));
    const a = sourceLink(source);
    a.className = "cite";
    a.textContent = match[0];
    a.title = sourceLabel(source);
    nodes.push(a);
    last = match.index + match[0].length;
  }
  if (!nodes.length) return;
  if (last < text.length) nodes.push(document.createTextNode(text.slice(last)));
  content.replaceChildren(...nodes);
}

function sourceLabel(source) {
  const lines = source.line_start === source.line_end
    ? `line ${source.line_start}` : `lines ${source.line_start}–${source.line_end}`;
  const path = (source.headings || []).slice(1).filter(Boolean).join(" › ");
  return `${source.source}, ${lines}` + (path ? ` (${path})` : "");
}

function showSources(view, text, sources) {
  if (!Array.isArray(sources) || !sources.length) return;
  const byNumber = new Map(sources.map((s) => [Number(s.number), s]));
  linkMarkers(view.content, text, byNumber);
  const nav = document.createElement("nav");
  nav.className = "sources";
  const id = "sources-" + ++sourceLists;
  nav.setAttribute("aria-labelledby", id);
  const heading = document.createElement("h3");
  heading.id = id;
  heading.textContent = "Sources";
  const list = document.createElement("ol");
  for (const source of sources) {
    const li = document.createElement("li");
    li.value = Number(source.number);
    const a = sourceLink(source);
    const title = document.createElement("span");
    title.className = "source-title";
    title.textContent = source.title || source.source;
    const where = document.createElement("span");
    where.className = "source-where";
    where.textContent = sourceLabel(source);
    a.append(title, where);
    li.append(a);
    list.append(li);
  }
  nav.append(heading, list);
  view.content.after(nav);
}

let sourceLists = 0;

function thumbButton(rating) {
  const b = document.createElement("button");
  b.type = "button";
  b.className = "thumb " + (rating > 0 ? "up" : "down");
  b.dataset.rating = String(rating);
  b.setAttribute("aria-pressed", "false");
  b.setAttribute("aria-label", rating > 0 ? "Good answer" : "Bad answer");
  b.title = rating > 0 ? "Good answer" : "Bad answer";
  const icon = document.createElement("span");
  icon.className = "icon";
  icon.setAttribute("aria-hidden", "true");
  b.append(icon);
  return b;
}

let commentIds = 0;

function addFeedbackControls(view) {
  const bar = document.createElement("div");
  bar.className = "feedback";
  bar.setAttribute("role", "group");
  bar.setAttribute("aria-label", "Rate this answer");
  const up = thumbButton(1);
  const down = thumbButton(-1);
  const status = document.createElement("span");
  status.className = "feedback-status";
  status.setAttribute("role", "status");

  const form = document.createElement("form");
  form.className = "feedback-comment";
  form.hidden = true;
  const id = "feedback-comment-" + ++commentIds;
  const label = document.createElement("label");
  label.className = "visually-hidden";
  label.htmlFor = id;
  label.textContent = "Comment on this answer (optional)";
  const comment = document.createElement("textarea");
  comment.id = id;
  comment.rows = 1;
  comment.maxLength = 4000;
  comment.placeholder = "What was good or wrong? (optional)";
  const submit = document.createElement("button");
  submit.type = "submit";
  submit.className = "button";
  submit.textContent = "Send comment";
  form.append(label, comment, submit);

  bar.append(up, down, status, form);
  view.article.append(bar);
  view.feedback = { bar, up, down, status, form, comment, submit };

  up.addEventListener("click", () => rate(view, 1, false));
  down.addEventListener("click", () => rate(view, -1, false));
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const rating = view.message.feedback ? view.message.feedback.rating : null;
    if (rating) rate(view, rating, true);
  });
  comment.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) { event.preventDefault(); form.requestSubmit(); }
  });
  showFeedback(view);
}

function showFeedback(view) {
  const fb = view.feedback;
  const rating = view.message.feedback ? view.message.feedback.rating : 0;
  const stored = Boolean(view.message.id);
  fb.up.disabled = fb.down.disabled = !stored;
  fb.up.setAttribute("aria-pressed", String(rating === 1));
  fb.down.setAttribute("aria-pressed", String(rating === -1));
  if (rating && view.message.feedback.comment && !fb.comment.value) fb.comment.value = view.message.feedback.comment;
}

async function rate(view, rating, withComment) {
  const fb = view.feedback;
  const comment = fb.comment.value.trim();
  fb.status.textContent = "Saving…";
  fb.submit.disabled = true;
  try {
    const saved = await api("/api/feedback", {
      method: "POST", body: { message_id: view.message.id, rating, comment },
    });
    view.message.feedback = saved;
    showFeedback(view);
    fb.form.hidden = false;
    fb.status.textContent = withComment ? "Comment saved. Thank you!" : "Thanks! Add a comment if you like.";
    fb.status.dataset.saved = withComment ? "comment" : "rating";
    if (!withComment) fb.comment.focus();
  } catch (error) {
    fb.status.textContent = "Could not save: " + error.message;
  } finally {
    fb.submit.disabled = false;
  }
}

// ------------------------------------------------------------ conversations
function formatTime(seconds) {
  const d = new Date(seconds * 1000);
  const today = new Date();
  return d.toDateString() === today.toDateString()
    ? d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" })
    : d.toLocaleDateString([], { year: "numeric", month: "short", day: "numeric" });
}

async function loadConversationList() {
  let list;
  try {
    list = (await api("/api/conversations?limit=100")).data;
  } catch (error) {
    if (error.status !== 401) notice("Could not load conversations: " + error.message);
    return;
  }
  el.list.replaceChildren();
  for (const conv of list) {
    const li = document.createElement("li");
    const b = document.createElement("button");
    b.type = "button";
    b.dataset.id = conv.id;
    if (conv.id === state.conversationId) b.setAttribute("aria-current", "true");
    const title = document.createElement("span");
    title.className = "title";
    title.textContent = conv.title || "Untitled";
    const time = document.createElement("time");
    time.dateTime = new Date(conv.updated * 1000).toISOString();
    time.textContent = formatTime(conv.updated);
    b.append(title, time);
    b.addEventListener("click", () => openConversation(conv.id));
    li.append(b);
    el.list.append(li);
  }
  el.historyEmpty.hidden = list.length > 0;
}

function markCurrent() {
  for (const b of el.list.querySelectorAll("button")) {
    if (b.dataset.id === state.conversationId) b.setAttribute("aria-current", "true");
    else b.removeAttribute("aria-current");
  }
}

async function openConversation(id) {
  stopStreaming();
  let conv;
  try {
    conv = await api("/api/conversations/" + encodeURIComponent(id));
  } catch (error) {
    notice("Could not open the conversation: " + error.message);
    return;
  }
  notice("");
  state.conversationId = conv.id;
  state.messages = conv.messages;
  clearMessages();
  for (const m of conv.messages) renderMessage(m);
  setTitle(conv.title);
  markCurrent();
  openMenu(false);
  scrollToEnd(true);
  el.prompt.focus();
}

function newChat() {
  stopStreaming();
  state.conversationId = null;
  state.messages = [];
  clearMessages();
  setTitle("");
  markCurrent();
  notice("");
  openMenu(false);
  el.prompt.focus();
}

// ----------------------------------------------------------------- sending
function setBusy(busy) {
  el.send.hidden = busy;
  el.stop.hidden = !busy;
  el.messages.setAttribute("aria-busy", String(busy));
}

function stopStreaming() {
  if (state.streaming) state.streaming.abort();
}

async function send(text) {
  if (state.streaming || !text.trim()) return;
  const settings = readSettings();
  notice("");
  el.prompt.value = "";
  autoGrow();
  const userView = renderMessage({ role: "user", content: text });
  scrollToEnd(true);
  try {
    if (!state.conversationId) {
      const system = settings.system_prompt.trim();
      const conv = await api("/api/conversations", {
        method: "POST",
        body: {
          model: state.model,
          settings: { temperature: settings.temperature, top_p: settings.top_p, max_tokens: settings.max_tokens },
          messages: system ? [{ role: "system", content: system }] : [],
        },
      });
      state.conversationId = conv.id;
      state.messages = conv.messages;
      for (const m of conv.messages) el.messages.insertBefore(renderMessage(m).article, userView.article);
    }
    const added = await api(`/api/conversations/${encodeURIComponent(state.conversationId)}/messages`, {
      method: "POST", body: { messages: [{ role: "user", content: text }] },
    });
    userView.message = added.data[0];
    state.messages.push(added.data[0]);
  } catch (error) {
    userView.article.remove();
    if (!el.messages.querySelector(".message")) el.empty.hidden = false;
    el.prompt.value = text;
    autoGrow();
    if (error.status !== 401) notice("Could not send: " + error.message);
    return;
  }
  if (state.messages.filter((m) => m.role === "user").length === 1) {
    setTitle(text.trim().replace(/\s+/g, " ").slice(0, 60));
    loadConversationList();
  }
  await streamAnswer(settings);
}

async function streamAnswer(settings) {
  const conversationId = state.conversationId;
  const view = renderMessage({ role: "assistant", content: "" });
  view.article.classList.add("streaming");
  const controller = new AbortController();
  state.streaming = controller;
  setBusy(true);
  let text = "";
  let sources = null;
  let failure = null;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: headers(),
      signal: controller.signal,
      body: JSON.stringify({
        model: state.model || undefined,
        messages: state.messages.map(({ role, content }) => ({ role, content })),
        stream: true,
        temperature: settings.temperature,
        top_p: settings.top_p,
        max_tokens: settings.max_tokens,
        rag: state.knowledgeBase ? settings.use_rag : undefined,
      }),
    });
    if (!response.ok) throw await errorFrom(response);
    for await (const data of sseData(response)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message || "generation failed");
      if (Array.isArray(chunk.sources)) sources = chunk.sources;
      const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
      if (delta && delta.content) {
        const follow = nearBottom();
        text += delta.content;
        view.content.append(delta.content);  // a text node per piece: never parsed as HTML
        if (follow) scrollToEnd(true);
      }
    }
  } catch (error) {
    if (error.name !== "AbortError") failure = error;
  } finally {
    state.streaming = null;
    view.article.classList.remove("streaming");
    setBusy(false);
  }
  if (failure) {
    const p = document.createElement("p");
    p.className = "error";
    p.textContent = "The answer stopped: " + failure.message;
    view.content.after(p);
    if (failure.status === 401) askForKey();
  }
  if (!text) {
    if (!failure) view.content.textContent = "(no answer)";
    view.feedback.bar.hidden = true;
    return;
  }
  if (!failure) showSources(view, text, sources);
  try {
    const answer = { role: "assistant", content: text };
    if (!failure && Array.isArray(sources) && sources.length) answer.sources = sources;  // shown again on reopening
    const added = await api(`/api/conversations/${encodeURIComponent(conversationId)}/messages`, {
      method: "POST", body: { messages: [answer] },
    });
    view.message = added.data[0];
    if (conversationId === state.conversationId) state.messages.push(added.data[0]);
    showFeedback(view);
    loadConversationList();
  } catch (error) {
    view.feedback.status.textContent = "Answer not saved: " + error.message;
  }
}

// --------------------------------------------------------------- composer
function autoGrow() {
  el.prompt.style.height = "auto";
  el.prompt.style.height = Math.min(el.prompt.scrollHeight + 2, window.innerHeight * 0.4) + "px";
}

function openMenu(open) {
  el.layout.classList.toggle("menu-open", open);
  el.menuToggle.setAttribute("aria-expanded", String(open));
}

async function loadKnowledgeBase() {
  try {
    const response = await fetch("/health");
    state.knowledgeBase = response.ok && (await response.json()).knowledge_base === true;
  } catch (_) {
    state.knowledgeBase = false;
  }
  el.ragField.hidden = !state.knowledgeBase;
  el.ragHint.hidden = !state.knowledgeBase;
}

async function loadModel() {
  try {
    const models = await api("/v1/models");
    state.model = models.data.length ? models.data[0].id : null;
    el.modelName.textContent = state.model || "";
    el.modelName.title = state.model ? "Model served here: " + state.model : "";
  } catch (_) { /* shown by api() when it is a missing key */ }
}

function init() {
  Object.assign(el, {
    layout: $("layout"), list: $("conversation-list"), historyEmpty: $("history-empty"), messages: $("messages"),
    empty: $("empty-state"), notice: $("notice"), title: $("chat-title"), prompt: $("prompt"), send: $("send"),
    stop: $("stop"), settings: $("settings"), systemPrompt: $("system-prompt"), temperature: $("temperature"),
    topP: $("top-p"), maxTokens: $("max-tokens"), apiKey: $("api-key"), modelName: $("model-name"),
    menuToggle: $("menu-toggle"), useRag: $("use-rag"), ragField: $("rag-field"), ragHint: $("rag-hint"),
  });
  loadSettings();
  for (const input of [el.systemPrompt, el.temperature, el.topP, el.maxTokens, el.useRag]) {
    input.addEventListener("input", saveSettings);
  }
  el.apiKey.addEventListener("change", () => {
    localStorage.setItem(API_KEY_KEY, el.apiKey.value.trim());
    notice("");
    loadModel();
    loadConversationList();
  });
  $("reset-settings").addEventListener("click", () => {
    localStorage.removeItem(SETTINGS_KEY);
    loadSettings();
  });
  $("new-chat").addEventListener("click", newChat);
  el.menuToggle.addEventListener("click", () => openMenu(!el.layout.classList.contains("menu-open")));
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    send(el.prompt.value);
  });
  el.prompt.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      send(el.prompt.value);
    }
  });
  el.prompt.addEventListener("input", autoGrow);
  el.stop.addEventListener("click", stopStreaming);
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && el.layout.classList.contains("menu-open")) {
      openMenu(false);
      el.menuToggle.focus();
    }
  });
  loadModel();
  loadKnowledgeBase();
  loadConversationList();
  el.prompt.focus();
}

document.addEventListener("DOMContentLoaded", init);
