// The hub's web UI: it renders the state the hub streams and sends the admin's commands. It holds no
// business logic: health, run outcomes and the rest come computed from the server.
//
// Stream protocol (/api/v1/stream): `init` {state, version, epoch}; `delta` {change, version}; `sync`
// {version} every few seconds. A delta that skips a version, a sync ahead of us or a new epoch
// means something was missed: ask for the whole state again (`get_state`).
"use strict";

let state = null, version = -1, epoch = "", socket = null, selected = null, retry = 500;

const $ = (id) => document.getElementById(id);
const el = (tag, attributes = {}, ...children) => {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) {
    if (key === "class") node.className = value; else if (key.startsWith("on")) node[key] = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child instanceof Node ? child : document.createTextNode(child ?? ""));
  return node;
};
const when = (seconds) => seconds ? new Date(seconds * 1000).toLocaleString() : "";
const badge = (text) => el("span", { class: `badge ${String(text).replace(/\s+/g, "-")}` }, text);

function connect() {
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  socket = new WebSocket(`${scheme}://${location.host}/api/v1/stream`);
  socket.onopen = () => { retry = 500; setConnection(true); };
  socket.onmessage = (message) => receive(JSON.parse(message.data));
  socket.onclose = async (event) => {
    setConnection(false);
    try {
      if (event.code === 1006 && !(await loggedIn())) return showLogin();
    } catch (error) {
      // The hub is away (restarting): keep trying, a reload is never needed.
    }
    setTimeout(connect, retry);
    retry = Math.min(retry * 2, 10000);
  };
}

async function loggedIn() {
  const answer = await fetch("/api/v1/state", { credentials: "same-origin" });
  return answer.status !== 401;
}

function receive(message) {
  if (message.type === "init") {
    ({ state, version, epoch } = message);
  } else if (message.epoch !== epoch || message.version > version + (message.type === "delta" ? 1 : 0)) {
    socket.send(JSON.stringify({ type: "get_state" }));
    return;
  } else if (message.type === "delta") {
    if (message.version <= version) return;  // older than our init
    version = message.version;
    applyChange(message.change);
  } else {
    return;  // a sync beacon: we are current
  }
  render();
}

function applyChange(change) {
  switch (change.kind) {
    case "host": state.hosts[change.host.name] = change.host; break;
    case "host_removed": delete state.hosts[change.name]; break;
    case "run": state.runs[change.run.id] = change.run; break;
    case "run_removed": delete state.runs[change.id]; break;
    case "event": state.events.push(change.event); state.events.splice(0, state.events.length - 200); break;
  }
}

function setConnection(up) {
  $("connection").textContent = up ? "live" : "reconnecting";
  $("connection").className = `badge ${up ? "online" : "offline"}`;
}

function render() {
  $("main").hidden = false;
  $("login").hidden = true;
  $("version").textContent = `state version ${version}`;
  renderHosts();
  renderDetail();
  renderRuns();
  renderEvents();
}

function renderHosts() {
  const rows = Object.values(state.hosts).sort((a, b) => a.name.localeCompare(b.name)).map((host) => {
    const facts = host.facts || {}, boot = facts.boot_state || {}, rollback = host.last_rollback;
    return el("tr", { class: `selectable ${host.name === selected ? "selected" : ""}`, "data-host": host.name,
                      onclick: () => { selected = host.name; render(); } },
      el("td", {}, host.name), el("td", {}, badge(host.health)), el("td", {}, facts.hostname || ""),
      el("td", {}, boot.kind ? `${boot.kind} ${boot.root || ""} (${boot.health || ""})` : ""),
      el("td", {}, rollback ? `${rollback.method} ${when(rollback.time)}` : ""),
      el("td", {}, host.groups.join(", ")), el("td", {}, when(host.last_seen)));
  });
  $("hosts").tBodies[0].replaceChildren(...rows);
}

function renderDetail() {
  const host = selected && state.hosts[selected];
  $("host-detail").hidden = !host;
  if (!host) return;
  $("detail-name").textContent = host.name;
  const snapshots = ((host.facts || {}).snapshots || []).map((s) =>
    el("tr", {}, el("td", {}, s.id), el("td", {}, s.kind), el("td", {}, when(s.created)),
      el("td", {}, s.description), el("td", {}, s.known_good ? "yes" : "")));
  $("snapshots").tBodies[0].replaceChildren(...snapshots);
  const jobs = [...host.jobs].reverse().map((job) => el("div", { class: "run" },
    el("div", {}, `job ${job.id} `, badge(job.state), ` ${(job.ops || []).join(" && ")} · ${when(job.time)}`),
    ...((job.result || {}).steps || []).map((step) => el("div", {},
      `${step.op}: `, badge(step.state), step.error ? el("span", { class: "error" }, ` ${step.error}`) : "",
      (step.output || []).length ? el("pre", {}, step.output.join("\n")) : ""))));
  $("jobs").replaceChildren(...jobs);
}

function renderRuns() {
  const runs = Object.values(state.runs).sort((a, b) => b.created - a.created).map((run) => el("div", { class: "run" },
    el("div", {}, badge(run.state), ` ${run.steps.map((s) => s.op).join(" && ")} on ${JSON.stringify(run.target)}`,
      ` by ${run.admin}, ${when(run.created)} `,
      run.state === "running" ? el("button", { onclick: () => post(`/api/v1/runs/${run.id}/cancel`) }, "Cancel") : ""),
    el("table", {}, el("tbody", {}, ...run.commands.map((c) => el("tr", {},
      el("td", {}, c.host), el("td", {}, badge(c.state)), el("td", {}, c.job_id ? `job ${c.job_id}` : ""),
      el("td", {}, (c.result || {}).error || "")))))));
  $("runs").replaceChildren(...runs);
}

function renderEvents() {
  const rows = [...state.events].reverse().slice(0, 100).map((e) => el("tr", {},
    el("td", {}, when(e.time)), el("td", {}, e.host || ""), el("td", {}, e.actor), el("td", {}, e.method),
    el("td", {}, JSON.stringify(e.detail).slice(0, 160))));
  $("events").tBodies[0].replaceChildren(...rows);
}

async function post(path, body) {
  const answer = await fetch(path, { method: "POST", credentials: "same-origin",
    headers: { "Content-Type": "application/json" }, body: body === undefined ? "{}" : JSON.stringify(body) });
  const text = await answer.text();
  if (!answer.ok) throw new Error(text ? (JSON.parse(text).error || text) : answer.statusText);
  return text ? JSON.parse(text) : null;
}

function showLogin() {
  $("main").hidden = true;
  $("login").hidden = false;
}

$("login").onsubmit = async (event) => {
  event.preventDefault();
  try {
    await post("/api/v1/login", { token: $("token").value });
    $("login-error").textContent = "";
    connect();
  } catch (error) {
    $("login-error").textContent = error.message;
  }
};

$("dispatch").onsubmit = async (event) => {
  event.preventDefault();
  const kind = $("target-kind").value, value = $("target-value").value.trim();
  const target = kind === "all" ? { all: true }
    : kind === "group" ? { group: value } : { hosts: value.split(/[\s,]+/).filter(Boolean) };
  try {
    const steps = JSON.parse($("steps").value);
    await post("/api/v1/runs", { target, steps, flags: $("dry-run").checked ? 1 : 0,
                                 parallelism: Number($("parallelism").value) });
    $("dispatch-error").textContent = "";
  } catch (error) {
    $("dispatch-error").textContent = error.message;
  }
};

connect();
