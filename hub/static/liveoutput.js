// Step output in the runs' view: a pane per host and step, which grows while the run executes.
//
// A running run's lines come from its own stream (/api/v1/runs/ID/stream, hub/runs_api.py), opened for
// the LIVE_RUNS newest running runs only, not the fleet's stream: output is no state, and goes only to
// those watching. Each `output` message numbers its first line among all its step printed on its
// host, so a line is added once however often the stream is opened again, and a jump in numbers is
// shown as the lines not shown. A finished run's panes show the output its stored result keeps.
//
// The panes are kept across renders (the runs' view is redrawn on every change of the fleet) and
// scroll to their newest line as it comes, unless the reader has scrolled up: then they stay put.
// Every line is a text node: what a host prints is never markup.
"use strict";

const LIVE_RUNS = 6;  // streams open at once; a busier hub's older running runs show their output at the end
const PANE_LINES = 2000;  // lines a pane keeps; older ones leave it
const STUCK_PIXELS = 8;  // this close to the bottom counts as at the bottom
const outputs = new Map();  // run id -> Map(`HOST\nSTEP` -> {pane, next, lines, stuck, top})
const outputOpen = new Map();  // command id -> its output shown or not, as the reader left it
const liveStreams = new Map();  // run id -> its WebSocket
let outputRender = 0;  // a frame is asked for to draw panes that are new

function outputEntry(runId, host, step) {
  if (!outputs.has(runId)) outputs.set(runId, new Map());
  const entries = outputs.get(runId), key = `${host}\n${step}`;
  if (!entries.has(key)) {
    const pane = el("pre", { class: "output-pane", tabindex: "0", "aria-label": `${host}: output of step ${step + 1}` });
    const entry = { pane, next: 0, lines: 0, stuck: true, top: 0 };
    pane.onscroll = () => {
      if (!pane.isConnected || pane.clientHeight === 0) return;
      entry.top = pane.scrollTop;
      entry.stuck = pane.scrollHeight - pane.scrollTop - pane.clientHeight < STUCK_PIXELS;
    };
    entries.set(key, entry);
  }
  return entries.get(key);
}

function takeOutput(runId, message) {
  const host = text(message.host), step = Number(message.step), first = Number(message.first);
  const lines = list(message.lines);
  if (!Number.isInteger(step) || step < 0 || !Number.isInteger(first) || first < 0) return;
  const entry = outputEntry(runId, host, step), fresh = lines.slice(Math.max(0, entry.next - first));
  if (!fresh.length) return;
  const start = Math.max(first, entry.next), pane = entry.pane;
  if (start > entry.next) pane.append(el("span", { class: "gap" }, `… ${start - entry.next} lines not shown\n`));
  pane.append(document.createTextNode(fresh.map((line) => `${text(line)}\n`).join("")));
  entry.lines += fresh.length;
  entry.next = start + fresh.length;
  while (entry.lines > PANE_LINES && pane.firstChild) {
    const gone = pane.firstChild;
    entry.lines -= gone.nodeType === Node.TEXT_NODE ? (gone.textContent.match(/\n/g) || []).length : 0;
    gone.remove();
  }
  if (!pane.isConnected) {
    if (!outputRender) outputRender = requestAnimationFrame(() => { outputRender = 0; if (state) renderRuns(); });
  } else if (entry.stuck) {
    pane.scrollTop = pane.scrollHeight;
  }
}

// The row under a host's command: its steps' output, live while it runs, as stored once it ended.
function outputRow(run, command) {
  const runId = text(run.id), id = text(command.id), host = text(command.host), live = outputs.get(runId);
  const stored = list(obj(command.result).steps).map(obj);
  const sections = list(run.steps).map(obj).map((step, index) => {
    const entry = live && live.get(`${host}\n${index}`), kept = list(obj(stored[index]).output);
    if (!entry && !kept.length) return null;
    const pane = entry ? entry.pane
      : el("pre", { class: "output-pane", tabindex: "0" }, kept.map((line) => `${text(line)}\n`).join(""));
    return el("div", { class: "output-step", "data-step": String(index) },
      el("div", { class: "output-title" }, `${index + 1}. ${text(step.op)}`), pane);
  }).filter(Boolean);
  if (!sections.length) return [];
  const details = el("details", { class: "output", ontoggle: () => {
    outputOpen.set(id, details.open);
    if (details.open) keepScroll();
  } }, el("summary", {}, run.state === "running" && live ? "output (live)" : "output"), ...sections);
  details.open = outputOpen.get(id) ?? (run.state === "running" || Boolean(live));
  return [el("tr", { class: "output-row", "data-host": host }, el("td", { colspan: "5" }, details))];
}

// After the runs are drawn: each pane where its reader left it (or at its end), and the streams of
// the running runs open.
function runsRendered(runs) {
  keepScroll();
  const known = new Set(runs.map((run) => text(run.id)));
  for (const runId of outputs.keys()) if (!known.has(runId)) outputs.delete(runId);
  const wanted = runs.filter((run) => run.state === "running").slice(0, LIVE_RUNS).map((run) => text(run.id));
  for (const [runId, stream] of liveStreams) {
    if (!wanted.includes(runId)) { stream.onclose = null; stream.close(); liveStreams.delete(runId); }
  }
  for (const runId of wanted) if (!liveStreams.has(runId)) openRunStream(runId);
}

function keepScroll() {
  for (const entries of outputs.values()) {
    for (const entry of entries.values()) {
      if (entry.pane.isConnected) entry.pane.scrollTop = entry.stuck ? entry.pane.scrollHeight : entry.top;
    }
  }
}

function openRunStream(runId) {
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const stream = new WebSocket(`${scheme}://${location.host}/api/v1/runs/${encodeURIComponent(runId)}/stream`);
  liveStreams.set(runId, stream);
  stream.onmessage = (message) => {
    let parsed;
    try {
      parsed = obj(JSON.parse(message.data));
    } catch (error) {
      return;  // the run itself comes through the fleet's stream; only its output is read here
    }
    if (parsed.type === "output") takeOutput(runId, parsed);
  };
  stream.onclose = () => {
    liveStreams.delete(runId);
    // Cut while the run still runs (the hub restarted): opened again, and what it kept is sent again.
    setTimeout(() => { if (state && obj(state.runs[runId]).state === "running") renderRuns(); }, 2000);
  };
}
