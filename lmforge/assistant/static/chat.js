// The customer's chat: messages go to /v1/chat/completions as model "assistant"; the
// conversation id the server returns names the conversation from then on. While a person
// handles the conversation, their replies are fetched from the conversation's messages.
"use strict";
const log = document.getElementById("log");
const state = document.getElementById("state");
const input = document.getElementById("text");
let conversation = sessionStorage.getItem("assistant-conversation");
let lastIndex = -1;

function add(role, text, meta) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.textContent = text;
  if (meta) {
    const m = document.createElement("div");
    m.className = "meta";
    m.textContent = meta;
    div.appendChild(m);
  }
  log.appendChild(div);
  log.scrollTop = log.scrollHeight;
  return div;
}

function rateButtons(div, index) {
  for (const [label, rating] of [["helpful", 1], ["not helpful", -1]]) {
    const b = document.createElement("button");
    b.className = "small";
    b.textContent = label;
    b.title = "rate this answer";
    b.addEventListener("click", async () => {
      const r = await fetch("/v1/assistant/feedback", {method: "POST", headers: {"Content-Type": "application/json"},
        body: JSON.stringify({conversation_id: conversation, message_index: index, rating: rating})});
      b.parentElement.querySelectorAll("button").forEach(x => x.disabled = true);
      b.textContent += r.ok ? " thanks" : " failed";
    });
    div.appendChild(b);
  }
}

async function send(text) {
  add("user", text);
  const body = {model: "assistant", messages: [{role: "user", content: text}]};
  if (conversation) body.conversation_id = conversation;
  const r = await fetch("/v1/chat/completions", {method: "POST", headers: {"Content-Type": "application/json"},
    body: JSON.stringify(body)});
  const data = await r.json();
  if (!r.ok) { add("assistant", (data.error && data.error.message) || "Something went wrong."); return; }
  conversation = data.conversation_id;
  sessionStorage.setItem("assistant-conversation", conversation);
  if (data.message_index !== null && data.message_index !== undefined) lastIndex = data.message_index;
  const text_ = data.choices[0].message.content;
  if (text_) {
    const div = add("assistant", text_);
    if (data.citations && data.citations.length) {
      const s = document.createElement("div");
      s.className = "sources";
      s.textContent = "Sources: " + data.citations.map(c => "[" + c.number + "] " + c.source).join(", ");
      div.appendChild(s);
    }
    if (data.message_index !== null && data.state === "bot") rateButtons(div, data.message_index);
  }
  showState(data.state);
}

function showState(s) {
  state.textContent = s === "waiting" ? "Waiting for a member of our team..." :
    s === "human" ? "You are talking with a member of our team." :
    s === "closed" ? "This conversation has ended." : "You are talking with our assistant.";
  state.dataset.state = s;
}

async function poll() {
  if (!conversation) return;
  const r = await fetch("/v1/assistant/conversations/" + encodeURIComponent(conversation) + "?after=" + lastIndex);
  if (!r.ok) return;
  const data = await r.json();
  for (const m of data.messages) {
    lastIndex = Math.max(lastIndex, m.idx);
    if (m.role === "agent") add("agent", m.content, m.author ? "from " + m.author : "");
  }
  showState(data.state);
}

document.getElementById("ask").addEventListener("submit", async (e) => {
  e.preventDefault();
  const text = input.value.trim();
  if (!text) return;
  input.value = "";
  await send(text);
});
setInterval(poll, 2000);
