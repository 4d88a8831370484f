// The operator's page: polls the admin API every few seconds and renders what
// it answers. Plain DOM calls and textContent only: room keys and user agents
// come from clients, so nothing they send is ever parsed as HTML.
"use strict";

const REFRESH_MS = 3000;
const TOKEN_KEY = "croupier.adminToken";
const HISTORY_SHOWN = 100;

const $ = (id) => document.getElementById(id);

const state = {
  token: null,
  timer: null,
  selectedRoom: null,
  // Instance name → {health, heardAt}: /health reaches one instance per call.
  instances: new Map(),
  // The previous /metrics sample, for rates; null when /metrics is not reachable.
  lastMetrics: null,
};

// --- Signing in -------------------------------------------------------------

// `#token=…` signs in. The fragment never leaves the browser, and it is removed
// from the address bar (and from history) at once, before anything is fetched.
function tokenFromFragment() {
  const params = new URLSearchParams(location.hash.slice(1));
  const token = params.get("token");
  if (token !== null) {
    history.replaceState(null, "", location.pathname + location.search);
  }
  return token;
}

function signIn(token) {
  sessionStorage.setItem(TOKEN_KEY, token);
  state.token = token;
  $("sign-in").hidden = true;
  $("sign-in-error").textContent = "";
  $("dashboard").hidden = false;
  $("sign-out").hidden = false;
  refresh();
}

function signOut(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  state.token = null;
  clearTimeout(state.timer);
  $("dashboard").hidden = true;
  $("sign-out").hidden = true;
  $("sign-in").hidden = false;
  $("sign-in-error").textContent = message || "";
  $("status").textContent = "";
  $("token").focus();
}

// --- Talking to the server -------------------------------------------------

class HttpError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function call(path, options = {}) {
  const response = await fetch(path, {
    ...options,
    cache: "no-store",
    headers: { Authorization: `Bearer ${state.token}` },
  });
  const text = await response.text();
  if (!response.ok) {
    let message = `${response.status}`;
    try {
      message = JSON.parse(text).error || message;
    } catch (_) {
      // Not JSON (a proxy's page): the status says enough.
    }
    throw new HttpError(response.status, message);
  }
  return options.raw ? text : JSON.parse(text);
}

// /health answers 503 with a body when a dependency is down: keep the body.
async function health() {
  const response = await fetch("/health", { cache: "no-store" });
  return response.json();
}

// /metrics is per instance and usually not exposed through the load balancer;
// when it is reachable, it gives this instance's message and error rates.
async function metrics() {
  try {
    const text = await call("/metrics", { raw: true });
    return parseMetrics(text);
  } catch (_) {
    return null;
  }
}

function parseMetrics(text) {
  const sums = { wsIn: 0, wsOut: 0, http: 0, http5xx: 0, redisErrors: 0 };
  for (const line of text.split("\n")) {
    if (line.startsWith("#")) continue;
    const match = /^([a-z_]+)(\{[^}]*\})?\s+([0-9.e+-]+)/.exec(line);
    if (!match) continue;
    const [, name, labels = "", raw] = match;
    const value = Number(raw);
    if (name === "croupier_ws_messages_received_total") sums.wsIn += value;
    if (name === "croupier_ws_messages_sent_total") sums.wsOut += value;
    if (name === "croupier_redis_errors_total") sums.redisErrors += value;
    if (name === "croupier_http_requests_total") {
      sums.http += value;
      if (/status="5/.test(labels)) sums.http5xx += value;
    }
  }
  return { at: Date.now(), sums };
}

// --- The refresh loop --------------------------------------------------------

async function refresh() {
  clearTimeout(state.timer);
  if (!state.token) return;
  try {
    const [rooms, stats, served, sample] = await Promise.all([
      call("/api/admin/sessions"),
      call("/api/admin/stats"),
      health().catch(() => null),
      metrics(),
    ]);
    if (served && served.instance) {
      state.instances.set(served.instance, { health: served, heardAt: new Date() });
    }
    render(rooms, stats, sample);
    if (state.selectedRoom) await showHistory(state.selectedRoom);
    $("status").textContent = `updated ${new Date().toLocaleTimeString()}`;
    $("status").className = "muted";
  } catch (err) {
    if (err instanceof HttpError && err.status === 401) {
      signOut("The admin token was refused.");
      return;
    }
    if (err instanceof HttpError && err.status === 404) {
      signOut("The admin API is not enabled on this server (ADMIN_TOKEN is unset).");
      return;
    }
    $("status").textContent = `refresh failed: ${err.message}`;
    $("status").className = "error";
  }
  state.timer = setTimeout(refresh, REFRESH_MS);
}

async function disconnect(id, button) {
  button.disabled = true;
  try {
    await call(`/api/admin/connections/${encodeURIComponent(id)}/disconnect`, { method: "POST" });
    button.textContent = "Disconnecting…";
  } catch (err) {
    button.disabled = false;
    $("status").textContent = `disconnect ${id}: ${err.message}`;
    $("status").className = "error";
  }
  setTimeout(refresh, 500);
}

async function showHistory(key) {
  const note = $("room-history-note");
  const list = $("room-history");
  $("room-detail").hidden = false;
  $("room-title").textContent = `Room ${key}`;
  let numbers = [];
  try {
    numbers = await call(`/api/admin/sessions/${encodeURIComponent(key)}/history`);
    note.textContent = numbers.length > HISTORY_SHOWN
      ? `${numbers.length} numbers, newest first; the last ${HISTORY_SHOWN} are shown.`
      : `${numbers.length} numbers, newest first.`;
  } catch (err) {
    note.textContent = err.status === 404 ? "Nothing stored yet." : `history: ${err.message}`;
  }
  list.replaceChildren(
    ...numbers.slice(-HISTORY_SHOWN).reverse().map((n) => el("li", { className: colour(n) }, String(n))),
  );
}

// --- Rendering ------------------------------------------------------------------

const RED = new Set([1, 3, 5, 7, 9, 12, 14, 16, 18, 19, 21, 23, 25, 27, 30, 32, 34, 36]);

function colour(n) {
  if (n === 0 || n === "00") return "green";
  return RED.has(n) ? "red" : "black";
}

function el(tag, { dataset = {}, ...props } = {}, ...children) {
  const node = document.createElement(tag);
  Object.assign(node, props);
  Object.assign(node.dataset, dataset);
  node.append(...children.map((c) => (c instanceof Node ? c : String(c ?? ""))));
  return node;
}

function time(iso) {
  if (!iso) return "";
  const date = new Date(iso);
  return el("time", { dateTime: iso, title: iso }, date.toLocaleString());
}

function render(rooms, stats, sample) {
  const connections = uniqueConnections(rooms);
  renderCounters(stats, sample);
  renderInstances(connections);
  renderRooms(rooms);
  renderConnections(connections);
}

function renderCounters(stats, sample) {
  const rows = [
    ["live connections", stats.activeConnections],
    ["live rooms", stats.activeSessions],
    ["stored rooms", stats.totalSessions],
    ["joins counted", stats.totalConnections],
    ["average history", stats.averageHistoryLength.toFixed(1)],
  ];
  const previous = state.lastMetrics;
  if (sample && previous) {
    const seconds = Math.max((sample.at - previous.at) / 1000, 0.001);
    const rate = (name) => ((sample.sums[name] - previous.sums[name]) / seconds).toFixed(1);
    rows.push(
      ["ws messages in/s (this instance)", rate("wsIn")],
      ["ws frames out/s (this instance)", rate("wsOut")],
      ["HTTP requests/s (this instance)", rate("http")],
      ["HTTP 5xx total (this instance)", sample.sums.http5xx],
      ["Redis errors total (this instance)", sample.sums.redisErrors],
    );
  }
  state.lastMetrics = sample;
  $("counters").replaceChildren(
    ...rows.map(([label, value]) => el("div", {}, el("dt", {}, label), el("dd", {}, value))),
  );
}

function uniqueConnections(rooms) {
  const byId = new Map();
  for (const room of rooms) {
    for (const c of room.connections) {
      const known = byId.get(c.id);
      if (known) known.rooms.push(room.key);
      else byId.set(c.id, { ...c, rooms: [room.key] });
    }
  }
  return [...byId.values()].sort((a, b) => a.connectedAt.localeCompare(b.connectedAt));
}

function renderInstances(connections) {
  const counts = new Map();
  for (const c of connections) counts.set(c.instance, (counts.get(c.instance) || 0) + 1);
  const names = new Set([...state.instances.keys(), ...counts.keys()]);
  const rows = [...names].sort().map((name) => {
    const seen = state.instances.get(name);
    const checks = seen ? seen.health.checks : null;
    return el(
      "tr", { dataset: { instance: name } },
      el("td", {}, name),
      el("td", {}, badge(seen ? seen.health.status : "not heard yet")),
      el("td", {}, checks ? dependency(checks.database) : ""),
      el("td", {}, checks ? dependency(checks.redis) : ""),
      el("td", {}, seen ? seen.health.version : ""),
      el("td", {}, counts.get(name) || 0),
      el("td", {}, seen ? seen.heardAt.toLocaleTimeString() : ""),
    );
  });
  $("instances").tBodies[0].replaceChildren(...rows);
}

function dependency(check) {
  if (typeof check === "string") return badge(check);
  const latency = check.latency_ms === undefined ? "" : ` ${check.latency_ms} ms`;
  return el("span", {}, badge(check.status), latency);
}

function badge(status) {
  const good = status === "ok" || status === "up";
  const bad = status === "degraded" || status === "down";
  return el("span", { className: `badge ${good ? "good" : bad ? "bad" : ""}` }, status);
}

function renderRooms(rooms) {
  const rows = rooms.map((room) => {
    const perInstance = new Map();
    for (const c of room.connections) {
      perInstance.set(c.instance, (perInstance.get(c.instance) || 0) + 1);
    }
    const row = el(
      "tr",
      { className: room.key === state.selectedRoom ? "selected" : "", tabIndex: 0, dataset: { room: room.key } },
      el("td", {}, room.key),
      el("td", {}, room.activeConnections),
      el("td", {}, [...perInstance].map(([name, n]) => `${name}: ${n}`).join(", ")),
      el("td", {}, room.historyLength),
      el("td", {}, room.protected ? "yes" : "no"),
      el("td", {}, room.totalConnections),
      el("td", {}, time(room.createdAt)),
      el("td", {}, time(room.lastActivity)),
    );
    const select = () => {
      state.selectedRoom = room.key;
      for (const other of row.parentNode.rows) other.classList.toggle("selected", other === row);
      showHistory(room.key);
    };
    row.addEventListener("click", select);
    row.addEventListener("keydown", (e) => e.key === "Enter" && select());
    return row;
  });
  if (rows.length === 0) rows.push(el("tr", {}, el("td", { colSpan: 8, className: "muted" }, "no rooms")));
  $("rooms").tBodies[0].replaceChildren(...rows);
}

function renderConnections(connections) {
  const rows = connections.map((c) => {
    const button = el("button", { type: "button", className: "danger" }, "Disconnect");
    button.addEventListener("click", () => disconnect(c.id, button));
    return el(
      "tr", { dataset: { connection: c.id } },
      el("td", {}, c.id),
      el("td", {}, c.rooms.join(", ")),
      el("td", {}, c.instance),
      el("td", {}, c.ipAddress),
      el("td", { className: "agent", title: c.userAgent }, c.userAgent),
      el("td", {}, time(c.connectedAt)),
      el("td", {}, time(c.lastActivity)),
      el("td", {}, button),
    );
  });
  if (rows.length === 0) rows.push(el("tr", {}, el("td", { colSpan: 8, className: "muted" }, "no live connections")));
  $("connections").tBodies[0].replaceChildren(...rows);
}

// --- Start ----------------------------------------------------------------------

$("sign-in").addEventListener("submit", (event) => {
  event.preventDefault();
  const token = $("token").value.trim();
  $("token").value = "";
  if (token) signIn(token);
});
$("sign-out").addEventListener("click", () => signOut());

const initial = tokenFromFragment() || sessionStorage.getItem(TOKEN_KEY);
if (initial) signIn(initial);
else signOut();
