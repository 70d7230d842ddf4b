// The agents' desk: the hand-off queue, taking a conversation with its transcript,
// replying to the customer (they see it in their chat) and resolving the ticket.
"use strict";
const queueBody = document.querySelector("#queue tbody");
const log = document.getElementById("log");
const title = document.getElementById("title");
let current = null;  // {ticket, conversation}
let lastIndex = -1;

function agent() { return document.getElementById("agent").value.trim() || "agent"; }

async function api(path, body) {
  const r = await fetch(path, body === undefined ? {} :
    {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)});
  const data = await r.json();
  if (!r.ok) throw new Error((data.error && data.error.message) || r.status);
  return data;
}

function show(m) {
  const div = document.createElement("div");
  div.className = "msg " + (m.role === "user" ? "user" : m.role === "agent" ? "agent" : "assistant");
  div.textContent = (m.role === "user" ? "customer: " : m.role === "agent" ? (m.author || "agent") + ": " : "bot: ") + m.content;
  log.appendChild(div);
  log.scrollTop = log.scrollHeight;
  lastIndex = Math.max(lastIndex, m.idx);
}

async function refresh() {
  const data = await api("/v1/assistant/handoffs");
  queueBody.textContent = "";
  for (const t of data.queue) {
    const tr = document.createElement("tr");
    for (const v of [t.id, t.reason, t.last_message]) {
      const td = document.createElement("td");
      td.textContent = v;
      tr.appendChild(td);
    }
    const td = document.createElement("td");
    const b = document.createElement("button");
    b.className = "small take";
    b.textContent = t.agent ? "open (" + t.agent + ")" : "take";
    b.addEventListener("click", () => take(t.id));
    td.appendChild(b);
    tr.appendChild(td);
    queueBody.appendChild(tr);
  }
}

async function take(ticket) {
  try {
    const data = await api("/v1/assistant/handoffs/" + ticket + "/take", {agent: agent()});
    current = {ticket: ticket, conversation: data.ticket.conversation_id};
    title.textContent = "Conversation #" + ticket + " (" + data.ticket.reason + ")";
    log.textContent = "";
    lastIndex = -1;
    data.messages.forEach(show);
  } catch (e) { alert(e.message); }
  refresh();
}

async function poll() {
  if (!current) return;
  const data = await api("/v1/assistant/conversations/" + current.conversation + "?after=" + lastIndex);
  data.messages.forEach(show);
}

document.getElementById("reply").addEventListener("submit", async (e) => {
  e.preventDefault();
  const input = document.getElementById("text");
  if (!current || !input.value.trim()) return;
  try {
    await api("/v1/assistant/handoffs/" + current.ticket + "/reply", {agent: agent(), text: input.value.trim()});
    input.value = "";
    await poll();
  } catch (err) { alert(err.message); }
});
document.getElementById("resolve").addEventListener("submit", async (e) => {
  e.preventDefault();
  const resolution = document.getElementById("resolution").value.trim() || "resolved";
  if (!current) return;
  try {
    await api("/v1/assistant/handoffs/" + current.ticket + "/resolve",
              {resolution: resolution, back_to_bot: document.getElementById("back").checked});
    title.textContent = "Resolved #" + current.ticket;
    current = null;
  } catch (err) { alert(err.message); }
  refresh();
});
document.getElementById("refresh").addEventListener("click", refresh);
refresh();
setInterval(() => { refresh(); poll(); }, 3000);
