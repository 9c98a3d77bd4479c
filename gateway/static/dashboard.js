// Twinkle's dashboard: polls the JSON API under twinkle/v1/dashboard (relative, so it works under a
// proxy's root path) every POLL_MS and redraws. No framework, no CDN: the page's CSP allows only
// this file, its stylesheet and this origin. Every value from the server goes in as text, never HTML.
"use strict";

const POLL_MS = 2000;
const KEY_SLOT = "twinkle.dashboard.key";
const API = "twinkle/v1/dashboard/";
const PER_TOKEN = "loss per token";

const state = { key: null, timer: null, run: null, points: [], after: -1, metric: null };

function $(id) { return document.getElementById(id); }

function cell(text) {
  const td = document.createElement("td");
  td.textContent = text === null || text === undefined ? "" : String(text);
  return td;
}

function fillTable(id, rows, columns, decorate) {
  const body = $(id).tBodies[0];
  const fresh = document.createElement("tbody");
  for (const row of rows) {
    const tr = document.createElement("tr");
    for (const column of columns) tr.appendChild(cell(column(row)));
    if (decorate) decorate(tr, row);
    fresh.appendChild(tr);
  }
  body.replaceWith(fresh);
}

function when(iso) { return iso ? new Date(iso).toLocaleString() : ""; }
function bytes(n) {
  if (n >= 1 << 20) return (n / (1 << 20)).toFixed(1) + " MiB";
  if (n >= 1 << 10) return (n / (1 << 10)).toFixed(1) + " KiB";
  return n + " B";
}
function number(x) { return Number.isFinite(x) ? (Math.abs(x) >= 1000 ? x.toFixed(0) : x.toPrecision(4)) : ""; }

async function api(path) {
  const answer = await fetch(API + path, { headers: { Authorization: "Bearer " + state.key }, cache: "no-store" });
  let body = null;
  try { body = await answer.json(); } catch (e) { body = null; }
  if (!answer.ok) {
    const error = new Error((body && (body.error || body.detail)) || answer.statusText);
    error.status = answer.status;
    throw error;
  }
  return body;
}

// ----- login ----------------------------------------------------------------------------------
function keyFromFragment() {
  const match = /(?:^#|&)key=([^&]+)/.exec(window.location.hash);
  if (!match) return null;
  history.replaceState(null, "", window.location.pathname + window.location.search);  // out of the URL bar and history
  return decodeURIComponent(match[1]);
}

function showLogin(message) {
  stopPolling();
  state.key = null;
  sessionStorage.removeItem(KEY_SLOT);
  $("app").hidden = true;
  $("logout").hidden = true;
  $("login-panel").hidden = false;
  $("login-error").textContent = message || "";
  $("viewer").textContent = "";
}

async function logIn(key) {
  state.key = key;
  try {
    const overview = await api("overview");
    sessionStorage.setItem(KEY_SLOT, key);
    $("login-panel").hidden = true;
    $("app").hidden = false;
    $("logout").hidden = false;
    render(overview);
    startPolling();
  } catch (error) {
    showLogin(error.status === 401 ? "That key was not accepted." : "The server did not answer: " + error.message);
  }
}

// ----- polling --------------------------------------------------------------------------------
function startPolling() {
  stopPolling();
  state.timer = setInterval(refresh, POLL_MS);
}

function stopPolling() {
  if (state.timer !== null) clearInterval(state.timer);
  state.timer = null;
}

async function refresh() {
  try {
    render(await api("overview"));
    if (state.run) await loadCurve();
  } catch (error) {
    if (error.status === 401) showLogin("The key is no longer accepted.");
    else $("status-line").textContent = "last refresh failed: " + error.message;
  }
}

// ----- the overview ---------------------------------------------------------------------------
function render(o) {
  $("viewer").textContent = o.viewer.admin ? "admin: every tenant" : "tenant " + o.viewer.tenant;
  $("server-info").textContent = o.base_models.join(", ") + " · up " + Math.round(o.uptime_seconds) + " s";
  $("status-line").textContent = "updated " + new Date().toLocaleTimeString();
  const pools = Object.values(o.pools);
  $("queue-depth").textContent = o.queue_depth;
  $("samples-pending").textContent = o.samples_pending;
  $("adapters-resident").textContent = pools.reduce((n, p) => n + p.resident_adapters, 0);
  $("adapters-paged").textContent = pools.reduce((n, p) => n + p.paged_in_host + p.paged_on_disk, 0);

  fillTable("runs", o.runs, [
    (r) => r.model_id, (r) => r.tenant, (r) => r.base_model, (r) => r.lora_rank, (r) => r.steps, (r) => r.points,
    (r) => lastLoss(r.last_metrics), (r) => r.queue_depth, (r) => when(r.last_request_at),
  ], (tr, r) => {
    tr.dataset.modelId = r.model_id;
    tr.className = "clickable" + (r.model_id === state.run ? " selected" : "");
    tr.addEventListener("click", () => selectRun(r.model_id));
  });
  fillTable("checkpoints", o.checkpoints, [
    (c) => c.tinker_path, (c) => c.tenant, (c) => c.kind, (c) => bytes(c.size_bytes), (c) => when(c.created_at),
    (c) => when(c.expires_at),
  ], (tr, c) => {
    const td = document.createElement("td");
    const link = document.createElement("a");
    link.href = "#";
    link.className = "download";
    link.dataset.path = c.tinker_path;
    link.textContent = "download";
    link.addEventListener("click", (event) => { event.preventDefault(); download(c.tinker_path); });
    td.appendChild(link);
    tr.appendChild(td);
  });
  fillTable("samplers", o.samplers, [
    (x) => x.sampler_id, (x) => x.tenant, (x) => x.base_model,
    (x) => x.model_path || (x.version ? "version " + x.version : "base model"), (x) => when(x.created_at),
  ]);
  fillTable("versions", o.versions, [(v) => v.model_id, (v) => v.tenant, (v) => v.step, (v) => bytes(v.nbytes),
    (v) => v.in_flight]);
  fillTable("sessions", o.sessions, [
    (x) => x.session_id, (x) => x.tenant, (x) => x.sdk_version, (x) => when(x.created_at),
    (x) => when(x.last_heartbeat_at), (x) => when(x.finished_at),
  ]);
  fillTable("tenants", o.tenants, [
    (t) => t.name, (t) => t.queue_depth, (t) => t.inflight_requests, (t) => t.live_models,
    (t) => Object.entries(t.limits).map(([k, v]) => k + " " + v).join(", "),
  ]);
}

function lastLoss(metrics) {
  const key = Object.keys(metrics).find((k) => k.startsWith("loss"));
  return key === undefined ? "" : number(metrics[key]);
}

async function download(path) {
  try {
    const link = await api("checkpoint_link?path=" + encodeURIComponent(path));
    window.location.assign(link.url);  // a signed link: the browser downloads the tar
  } catch (error) {
    $("status-line").textContent = "download failed: " + error.message;
  }
}

// ----- a run's curve --------------------------------------------------------------------------
async function selectRun(modelId) {
  Object.assign(state, { run: modelId, points: [], after: -1 });
  for (const tr of $("runs").tBodies[0].rows) tr.classList.toggle("selected", tr.dataset.modelId === modelId);
  $("curve-panel").hidden = false;
  $("curve-run").textContent = modelId;
  await loadCurve();
}

async function loadCurve() {
  const run = state.run;
  const answer = await api("runs/" + encodeURIComponent(run) + "/curve?after=" + state.after);
  if (run !== state.run) return;  // another run was picked meanwhile
  state.points.push(...answer.points);
  state.after = answer.next_after;
  fillMetricChoices();
  drawCurve();
}

function series(metric) {
  const out = [];
  for (const p of state.points) {
    if (metric === PER_TOKEN) {
      if ("loss:sum" in p.metrics && p.tokens > 0) out.push([p.idx, p.metrics["loss:sum"] / p.tokens, p.step]);
    } else if (metric in p.metrics) {
      out.push([p.idx, p.metrics[metric], p.step]);
    }
  }
  return out;
}

function fillMetricChoices() {
  const names = new Set();
  for (const p of state.points) for (const k of Object.keys(p.metrics)) names.add(k);
  const choices = (names.has("loss:sum") ? [PER_TOKEN] : []).concat([...names].sort());
  const select = $("metric");
  if ([...select.options].map((o) => o.value).join("|") !== choices.join("|")) {
    select.replaceChildren(...choices.map((name) => new Option(name, name)));
  }
  if (!choices.includes(state.metric)) state.metric = choices[0] || null;
  select.value = state.metric || "";
}

function svg(name, attributes, text) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", name);
  for (const [k, v] of Object.entries(attributes)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

function drawCurve() {
  const chart = $("curve");
  const data = state.metric ? series(state.metric) : [];
  $("curve-points").textContent = data.length + " points";
  chart.dataset.points = String(data.length);
  const [w, h, left, bottom, pad] = [640, 260, 64, 28, 12];
  const parts = [svg("rect", { x: left, y: pad, width: w - left - pad, height: h - bottom - pad, class: "frame" })];
  if (data.length > 0) {
    const xs = data.map((d) => d[0]);
    const ys = data.map((d) => d[1]);
    const [x0, x1] = [Math.min(...xs), Math.max(...xs)];
    let [y0, y1] = [Math.min(...ys), Math.max(...ys)];
    if (y0 === y1) { y0 -= 1; y1 += 1; }
    const px = (x) => left + (x1 === x0 ? 0.5 : (x - x0) / (x1 - x0)) * (w - left - pad);
    const py = (y) => pad + (1 - (y - y0) / (y1 - y0)) * (h - bottom - pad);
    parts.push(svg("polyline", { class: "line", points: data.map(([x, y]) => px(x) + "," + py(y)).join(" ") }));
    for (const [x, y] of data) parts.push(svg("circle", { class: "point", cx: px(x), cy: py(y), r: 2.5 }));
    parts.push(svg("text", { x: left - 6, y: pad + 10, class: "tick end" }, number(y1)));
    parts.push(svg("text", { x: left - 6, y: h - bottom, class: "tick end" }, number(y0)));
    parts.push(svg("text", { x: left, y: h - 8, class: "tick" }, "step " + data[0][2]));
    parts.push(svg("text", { x: w - pad, y: h - 8, class: "tick end" }, "step " + data[data.length - 1][2]));
  }
  chart.replaceChildren(...parts);
}

// ----- start ----------------------------------------------------------------------------------
document.addEventListener("DOMContentLoaded", () => {
  $("login-form").addEventListener("submit", (event) => {
    event.preventDefault();
    logIn($("key").value.trim());
    $("key").value = "";
  });
  $("logout").addEventListener("click", () => showLogin(""));
  $("metric").addEventListener("change", () => { state.metric = $("metric").value; drawCurve(); });
  const key = keyFromFragment() || sessionStorage.getItem(KEY_SLOT);
  if (key) logIn(key); else showLogin("");
});
