// lmforge serve: the little JavaScript the pages need. No framework, no build step.
// Every page is usable without it except the chat playground and live charts.
"use strict";

const csrf = () => document.body.dataset.csrf || "";

function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined) node.textContent = text; // textContent: never parsed as HTML
  return node;
}

// ---------------------------------------------------------------- sign-in
function initLogin() {
  // The printed sign-in link carries the token in the #fragment, which never reaches the server log.
  const m = location.hash.match(/token=([^&]+)/);
  if (m) {
    document.getElementById("token").value = decodeURIComponent(m[1]);
    history.replaceState(null, "", location.pathname);
  }
}

// ---------------------------------------------------------------- study progress
function initStudy() {
  const card = document.getElementById("progress-card");
  if (!card || card.dataset.status !== "generating") return;
  const poll = async () => {
    try {
      const res = await fetch(`/api/studies/${card.dataset.study}/progress`);
      const p = await res.json();
      document.getElementById("progress").value = p.done;
      document.getElementById("progress").max = p.total;
      document.getElementById("progress-text").textContent = `${p.done} / ${p.total} generated`;
      if (p.status !== "generating") { location.reload(); return; }
    } catch (e) { /* the server restarted: keep polling */ }
    setTimeout(poll, 1000);
  };
  setTimeout(poll, 1000);
}

// ---------------------------------------------------------------- arena
function initVote() {
  const form = document.getElementById("vote-form");
  if (!form) return;
  let sent = false;
  form.addEventListener("submit", (ev) => {
    // One submission per page; the server also ignores duplicates (vote_uid, annotator+item).
    if (sent) { ev.preventDefault(); return; }
    sent = true;
    form.classList.add("sending");
  });
  const keys = { "1": "choose-a", "2": "choose-tie", "3": "choose-b", "4": "choose-bad" };
  document.addEventListener("keydown", (ev) => {
    if (ev.target.closest("textarea, input") || ev.ctrlKey || ev.metaKey || ev.altKey) return;
    const id = keys[ev.key];
    if (id) form.requestSubmit(document.getElementById(id));
  });
}

function initResults() {
  setInterval(() => { if (document.visibilityState === "visible") location.reload(); }, 10000);
}

// ---------------------------------------------------------------- chat playground
async function streamChat(body, onPiece, signal) {
  const res = await fetch("/api/chat/stream", {
    method: "POST",
    headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf() },
    body: JSON.stringify(body),
    signal,
  });
  if (!res.ok) {
    let msg = `HTTP ${res.status}`;
    try { msg = (await res.json()).error || msg; } catch (e) { /* not JSON */ }
    throw new Error(msg);
  }
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "", done = null;
  for (;;) {
    const { value, done: end } = await reader.read();
    if (end) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let event = "message", data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event: ")) event = line.slice(7);
        else if (line.startsWith("data: ")) data += line.slice(6);
      }
      const payload = JSON.parse(data || "{}");
      if (event === "error") throw new Error(payload.error);
      if (event === "done") done = payload;
      else onPiece(payload.text);
    }
  }
  return done;
}

// A panel's setting: its parsed value, or `empty` when the field is blank (the server
// checks the ranges and names a bad field in its error).
function setting(panel, cls, parse, empty) {
  const v = panel.querySelector(cls).value.trim();
  return v === "" ? empty : parse(v);
}

function addPanel(index) {
  const tpl = document.getElementById("panel-template");
  const panel = tpl.content.firstElementChild.cloneNode(true);
  const select = panel.querySelector(".checkpoint");
  if (select.options.length) select.selectedIndex = index % select.options.length;
  const messages = panel.querySelector(".messages");
  const input = panel.querySelector(".input");
  const sendBtn = panel.querySelector(".send"), stopBtn = panel.querySelector(".stop");
  const statsLine = panel.querySelector(".stats");
  const history = [];
  let controller = null;

  panel.send = async (text) => {
    if (!text || controller) return;
    const format = panel.querySelector(".format").value;
    history.push({ role: "user", content: text });
    messages.appendChild(el("div", "msg user", text));
    const reply = el("div", "msg assistant", "");
    messages.appendChild(reply);
    controller = new AbortController();
    sendBtn.disabled = true; stopBtn.disabled = false;
    const t0 = performance.now();
    let n = 0;
    try {
      const done = await streamChat({
        checkpoint: select.value,
        messages: history,
        prompt_format: format,
        temperature: parseFloat(panel.querySelector(".temperature").value),
        top_p: parseFloat(panel.querySelector(".top-p").value),
        top_k: setting(panel, ".top-k", (v) => parseInt(v, 10), 0),
        min_p: setting(panel, ".min-p", parseFloat, 0),
        repetition_penalty: setting(panel, ".repetition-penalty", parseFloat, 1),
        stop: panel.querySelector(".stop-strings").value.split("|").filter((s) => s),
        seed: setting(panel, ".seed", (v) => parseInt(v, 10), null),
        max_tokens: parseInt(panel.querySelector(".max-tokens").value, 10),
      }, (piece) => {
        n += 1;
        reply.textContent += piece;
        messages.scrollTop = messages.scrollHeight;
      }, controller.signal);
      const s = (performance.now() - t0) / 1000;
      statsLine.textContent = done ? `${n} pieces in ${s.toFixed(1)} s` : "";
    } catch (e) {
      if (e.name !== "AbortError") {
        reply.classList.add("error");
        reply.textContent += (reply.textContent ? "\n" : "") + "Error: " + e.message;
      }
    } finally {
      history.push({ role: "assistant", content: reply.textContent });
      controller = null;
      sendBtn.disabled = false; stopBtn.disabled = true;
    }
  };
  panel.querySelector(".composer").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const text = input.value;
    input.value = "";
    panel.send(text);
  });
  input.addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); panel.querySelector(".composer").requestSubmit(); }
  });
  stopBtn.addEventListener("click", () => controller && controller.abort());
  panel.querySelector(".clear").addEventListener("click", () => { history.length = 0; messages.textContent = ""; statsLine.textContent = ""; });
  panel.querySelector(".remove").addEventListener("click", () => { if (controller) controller.abort(); panel.remove(); });
  document.getElementById("panels").appendChild(panel);
  return panel;
}

function initChat() {
  addPanel(0);
  addPanel(1);
  document.getElementById("add-panel").addEventListener("click", () => addPanel(document.querySelectorAll(".panel").length));
  document.getElementById("send-all").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const box = document.getElementById("send-all-text");
    const text = box.value;
    box.value = "";
    // One after another: the server generates one reply at a time anyway.
    for (const panel of document.querySelectorAll(".panel")) await panel.send(text);
  });
}

// ---------------------------------------------------------------- run dashboard charts
function drawChart(canvas, series, opts = {}) {
  const ctx = canvas.getContext("2d");
  const W = canvas.width, H = canvas.height, L = 58, R = 12, T = 10, B = 28;
  ctx.clearRect(0, 0, W, H);
  ctx.font = "11px system-ui, sans-serif";
  const pts = series.flatMap((s) => s.points);
  if (!pts.length) { ctx.fillStyle = "#667085"; ctx.fillText("no data yet", L, H / 2); return; }
  let x0 = Math.min(...pts.map((p) => p[0])), x1 = Math.max(...pts.map((p) => p[0]));
  let y0 = Math.min(...pts.map((p) => p[1])), y1 = Math.max(...pts.map((p) => p[1]));
  if (x1 === x0) x1 = x0 + 1;
  if (y1 === y0) { y0 -= Math.abs(y0) * 0.1 || 1; y1 += Math.abs(y1) * 0.1 || 1; }
  const pad = (y1 - y0) * 0.05; y0 -= pad; y1 += pad;
  const X = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
  const Y = (y) => T + (1 - (y - y0) / (y1 - y0)) * (H - T - B);
  ctx.strokeStyle = "#e3e6eb"; ctx.fillStyle = "#667085"; ctx.lineWidth = 1;
  for (let i = 0; i <= 4; i++) {
    const y = y0 + ((y1 - y0) * i) / 4;
    ctx.beginPath(); ctx.moveTo(L, Y(y)); ctx.lineTo(W - R, Y(y)); ctx.stroke();
    ctx.fillText(opts.format ? opts.format(y) : y.toPrecision(3), 4, Y(y) + 4);
  }
  ctx.fillText(`step ${Math.round(x0)}`, L, H - 8);
  const last = `step ${Math.round(x1)}`;
  ctx.fillText(last, W - R - ctx.measureText(last).width, H - 8);
  let legendX = L + 80;
  for (const s of series) {
    if (!s.points.length) continue;
    ctx.strokeStyle = s.color; ctx.lineWidth = 1.6;
    ctx.beginPath();
    s.points.forEach(([x, y], i) => (i ? ctx.lineTo(X(x), Y(y)) : ctx.moveTo(X(x), Y(y))));
    ctx.stroke();
    if (s.points.length === 1) { ctx.fillStyle = s.color; ctx.fillRect(X(s.points[0][0]) - 2, Y(s.points[0][1]) - 2, 4, 4); }
    ctx.fillStyle = s.color; ctx.fillText(s.label, legendX, H - 8); legendX += ctx.measureText(s.label).width + 16;
  }
}

function initRun() {
  const box = document.getElementById("charts");
  if (!box) return;
  const run = box.dataset.run;
  const records = [];
  let next = 0;
  const pick = (key) => records.filter((r) => typeof r[key] === "number").map((r) => [r.step, r[key]]);
  const redraw = () => {
    drawChart(document.getElementById("chart-loss"), [
      { label: "train", color: "#2f5fd0", points: pick("loss") },
      { label: "validation", color: "#d0452f", points: pick("val_loss") },
    ]);
    drawChart(document.getElementById("chart-lr"), [{ label: "lr", color: "#1f7a4d", points: pick("lr") }],
      { format: (v) => v.toExponential(1) });
    drawChart(document.getElementById("chart-tps"), [{ label: "tokens/s", color: "#8a4fd0", points: pick("tokens_per_s") }],
      { format: (v) => (v >= 1000 ? (v / 1000).toFixed(1) + "k" : v.toFixed(0)) });
  };
  const status = document.getElementById("metrics-status");
  const poll = async () => {
    let running = false;
    try {
      const path = run.split("/").map(encodeURIComponent).join("/");
      const res = await fetch(`/api/metrics/${path}?since=${next}`);
      const data = await res.json();
      records.push(...data.records);
      next = data.next;
      running = data.running;
      redraw();
      status.textContent = `${records.length} records` + (running ? " · training is running: updating every 3 s" : "");
    } catch (e) {
      status.textContent = "could not load metrics: " + e.message;
    }
    if (running) setTimeout(poll, 3000);
  };
  poll();
}

document.addEventListener("DOMContentLoaded", () => {
  const page = document.body.dataset.page;
  const init = { login: initLogin, study: initStudy, vote: initVote, results: initResults, chat: initChat, run: initRun }[page];
  if (init) init();
});
