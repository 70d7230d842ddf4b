// lmforge dashboard: polls /dashboard/data and draws tiles, line charts and tables. No libraries.
"use strict";

const REFRESH_MS = 5000;

function fmt(value, digits = 2) {
  if (value === null || value === undefined || Number.isNaN(value)) return "–";
  if (Math.abs(value) >= 1000) return value.toFixed(0);
  return Number(value).toFixed(digits);
}

function pct(value) {
  return value === null || value === undefined ? "–" : (100 * value).toFixed(1) + "%";
}

function cssVar(name) {
  return getComputedStyle(document.documentElement).getPropertyValue(name).trim();
}

function tile(label, value, alert = false) {
  const div = document.createElement("div");
  div.className = "tile" + (alert ? " alert" : "");
  div.dataset.label = label;
  const l = document.createElement("div");
  l.className = "label";
  l.textContent = label;
  const v = document.createElement("div");
  v.className = "value";
  v.textContent = value;
  div.append(l, v);
  return div;
}

// Lines over per-minute buckets: series = [{values, color}], x from the bucket times; `top` fixes
// the scale (rates: 1), else it follows the data.
function lineChart(canvas, times, series, fixedTop = null) {
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth || canvas.width, height = canvas.clientHeight || canvas.height;
  canvas.width = width * ratio;
  canvas.height = height * ratio;
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, width, height);
  const left = 44, bottom = 18, top = 8, right = 8;
  const all = series.flatMap(s => s.values.filter(v => v !== null && v !== undefined));
  const highest = Math.max(0, ...all);
  const max = fixedTop !== null ? fixedTop : (highest > 0 ? highest * 1.1 : 1);
  ctx.strokeStyle = cssVar("--border");
  ctx.fillStyle = cssVar("--muted");
  ctx.font = "11px system-ui, sans-serif";
  ctx.lineWidth = 1;
  for (let i = 0; i <= 4; i++) {
    const y = top + (height - top - bottom) * i / 4;
    ctx.beginPath(); ctx.moveTo(left, y); ctx.lineTo(width - right, y); ctx.stroke();
    ctx.fillText(fmt(max * (1 - i / 4), max < 1 ? 3 : 1), 2, y + 4);
  }
  if (!times.length) {
    ctx.fillText("no traffic yet", left + 8, top + 20);
    return;
  }
  const t0 = times[0], t1 = Math.max(times[times.length - 1], t0 + 60);
  const x = t => left + (width - left - right) * (t - t0) / (t1 - t0);
  const y = v => top + (height - top - bottom) * (1 - v / max);
  ctx.fillText(new Date(t0 * 1000).toLocaleTimeString(), left, height - 4);
  for (const s of series) {
    ctx.strokeStyle = cssVar(s.color);
    ctx.fillStyle = cssVar(s.color);
    ctx.lineWidth = 2;
    ctx.beginPath();
    let started = false;
    s.values.forEach((v, i) => {
      if (v === null || v === undefined) { started = false; return; }
      if (!started) { ctx.moveTo(x(times[i]), y(v)); started = true; } else ctx.lineTo(x(times[i]), y(v));
      ctx.fillRect(x(times[i]) - 2, y(v) - 2, 4, 4);
    });
    ctx.stroke();
  }
}

function table(id, entries) {
  const el = document.getElementById(id);
  el.replaceChildren();
  if (!entries.length) {
    const row = el.insertRow();
    const cell = row.insertCell();
    cell.className = "empty";
    cell.textContent = "none yet";
    return;
  }
  for (const [name, value] of entries) {
    const row = el.insertRow();
    row.insertCell().textContent = name;
    row.insertCell().textContent = value;
  }
}

function counterEntries(counter) {
  return Object.entries(counter || {}).sort((a, b) => b[1] - a[1]).map(([k, v]) => [k, fmt(v, 0)]);
}

function render(data) {
  const t = data.totals, c = data.counters;
  document.getElementById("model").textContent = data.model;
  document.getElementById("history").textContent = Math.round(data.history_seconds / 60) + " min";
  const up = (c.feedback_ratings || {}).up || 0, down = (c.feedback_ratings || {}).down || 0;
  const drift = data.drift;
  const drifting = drift && (drift.drifting.mmd || drift.drifting.psi);
  document.getElementById("tiles").replaceChildren(
    tile("requests", fmt(t.requests, 0)),
    tile("server error rate", pct(t.error_rate), t.error_rate > 0.01),
    tile("latency p50 / p95 (s)", fmt(t.latency_p50) + " / " + fmt(t.latency_p95)),
    tile("latency p99 (s)", fmt(t.latency_p99)),
    tile("time to first token p95 (s)", fmt(t.ttft_p95)),
    tile("tokens/s now", fmt(data.live.tokens_per_second, 1)),
    tile("queue / running", data.live.queue_depth + " / " + data.live.running),
    tile("cost (USD)", fmt(t.cost, 4)),
    tile("cost per generation", fmt(t.cost_per_generation, 5)),
    tile("refusal rate", pct(t.refusal_rate), t.refusal_rate > 0.2),
    tile("thumbs up", up + down ? pct(up / (up + down)) + " of " + (up + down) : "–"),
    tile("groundedness", pct(data.groundedness_mean), data.groundedness_mean !== null && data.groundedness_mean < 0.8),
    tile("drift", drift ? (drifting ? "DRIFTING" : "stable") : "not watched", Boolean(drifting)),
  );
  const s = data.series, times = s.map(b => b.time);
  lineChart(document.getElementById("chart-requests"), times, [
    {values: s.map(b => b.requests), color: "--accent"},
    {values: s.map(b => b.server_errors + b.client_errors), color: "--bad"}]);
  lineChart(document.getElementById("chart-latency"), times, [
    {values: s.map(b => b.latency_p50), color: "--accent"}, {values: s.map(b => b.latency_p95), color: "--second"}]);
  lineChart(document.getElementById("chart-ttft"), times, [
    {values: s.map(b => b.ttft_p50), color: "--accent"}, {values: s.map(b => b.ttft_p95), color: "--second"}]);
  lineChart(document.getElementById("chart-tokens"), times, [{values: s.map(b => b.tokens_per_second), color: "--accent"}]);
  lineChart(document.getElementById("chart-cost"), times, [{values: s.map(b => b.cost), color: "--accent"}]);
  lineChart(document.getElementById("chart-refusals"), times, [
    {values: s.map(b => b.generations ? b.refusals / b.generations : null), color: "--bad"}], 1);
  for (const name of ["intents", "escalations", "blocked_requests", "moderation_hits", "rag_answers"]) {
    table("table-" + name, counterEntries(c[name]));
  }
  table("table-drift", drift ? [
    ["checks", String(drift.checks)], ["MMD p-value", fmt(drift.mmd_p_value, 4)], ["PSI", fmt(drift.psi, 3)],
    ["alerts (MMD / PSI)", drift.alerts.mmd + " / " + drift.alerts.psi]] : []);
  const updated = document.getElementById("updated");
  updated.textContent = "updated " + new Date(data.now * 1000).toLocaleTimeString();
  updated.dataset.loaded = "true";
}

async function refresh() {
  try {
    const response = await fetch("/dashboard/data", {cache: "no-store"});
    if (!response.ok) throw new Error("HTTP " + response.status);
    render(await response.json());
  } catch (err) {
    document.getElementById("updated").textContent = "cannot load the data: " + err.message;
  }
}

refresh();
setInterval(refresh, REFRESH_MS);
