// The hub's web UI: it renders the state the hub streams and sends the admin's commands. It holds no
// business logic: health, run outcomes and the rest come computed from the server.
//
// Stream protocol (/api/v1/stream): `init` {state, version, epoch}; `delta` {change, version}; `sync`
// {version} every few seconds. A delta that skips a version, a sync ahead of us or a new epoch
// means something was missed: ask for the whole state again (`get_state`).
//
// What agents report reaches this page as data of any shape the hub let through: every value is read
// through obj/list/text below, so a null where an object was expected shows as blank, never throws.
//
// Who is logged in comes from /api/v1/me: their role, and every operation it allows ("POST /api/v1/runs").
// The page shows only the forms and buttons of those (elements with data-needs, and the buttons drawn
// below); the hub checks each call again, whatever the page shows. A role changed meanwhile closes the
// stream, and the reconnect asks again.
//
// The run form (its steps made from the ops' schemas) is runform.js; a host's page (its snapshots and
// the actions on them, its boots, its jobs with their diffs) is hostpage.js; the event log with its
// filters is eventlog.js; the steps' output in the runs' view, live while a run executes, is liveoutput.js.
"use strict";

let state = null, version = -1, epoch = "", socket = null, selected = null, retry = 500, me = null;

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
const obj = (value) => value !== null && typeof value === "object" && !Array.isArray(value) ? value : {};
const list = (value) => Array.isArray(value) ? value : [];
const text = (value) => value === null || value === undefined ? ""
  : typeof value === "object" ? JSON.stringify(value) : String(value);
const when = (seconds) => {
  const date = typeof seconds === "number" && seconds > 0 ? new Date(seconds * 1000) : null;
  return date && !isNaN(date) ? date.toLocaleString() : "";
};
const size = (bytes) => {
  if (typeof bytes !== "number" || !isFinite(bytes) || bytes < 0) return "";
  const units = ["bytes", "KiB", "MiB", "GiB", "TiB"];
  let unit = 0;
  while (bytes >= 1024 && unit < units.length - 1) { bytes /= 1024; unit += 1; }
  return unit === 0 ? `${bytes} bytes` : `${bytes.toFixed(1)} ${units[unit]}`;
};
const may = (operation) => me !== null && list(me.may).includes(operation);
// A state's badge stays on one line: what an agent calls a health can be 4,096 characters, cut here.
const BADGE_CHARS = 40;
const badge = (value) => {
  const whole = text(value), cut = whole.length > BADGE_CHARS;
  return el("span", { class: `badge ${whole.replace(/[^A-Za-z0-9 _-]/g, "").replace(/\s+/g, "-").slice(0, 80)}`,
                      ...(cut ? { title: whole.slice(0, 2000) } : {}) }, cut ? `${whole.slice(0, BADGE_CHARS)}…` : whole);
};

function connect() {
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  socket = new WebSocket(`${scheme}://${location.host}/api/v1/stream`);
  socket.onopen = () => { retry = 500; setConnection(true); whoAmI(); };
  socket.onmessage = (message) => {
    try {
      receive(JSON.parse(message.data));
    } catch (error) {
      // A message this page cannot follow: say so, and start over from a fresh state.
      console.error("hub stream:", error);
      setConnection(false, "out of step");
      socket.send(JSON.stringify({ type: "get_state" }));
    }
  };
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

async function whoAmI() {
  try {
    me = obj(await request("GET", "/api/v1/me"));
  } catch (error) {
    me = null;  // the stream says what happened; until then, no action is offered
  }
  if (state) render(); else showRole();
}

function showRole() {
  $("who").textContent = me ? `${text(me.name)} (${text(me.role)})` : "";
  for (const node of document.querySelectorAll("[data-needs]")) node.hidden = !may(node.dataset.needs);
  if (may("POST /api/v1/runs")) loadOps();
}

async function loggedIn() {
  const answer = await fetch("/api/v1/state", { credentials: "same-origin" });
  return answer.status !== 401;
}

function receive(message) {
  if (message.type === "init") {
    const fresh = obj(message.state);
    state = { hosts: obj(fresh.hosts), runs: obj(fresh.runs), events: list(fresh.events),
              images: obj(fresh.images), rollouts: obj(fresh.rollouts) };
    ({ version, epoch } = message);
  } else if (message.epoch !== epoch || message.version > version + (message.type === "delta" ? 1 : 0)) {
    socket.send(JSON.stringify({ type: "get_state" }));
    return;
  } else if (message.type === "delta") {
    if (message.version <= version) return;  // older than our init
    version = message.version;
    applyChange(obj(message.change));
  } else {
    return;  // a sync beacon: we are current
  }
  setConnection(true);
  render();
}

function applyChange(change) {
  switch (change.kind) {
    case "host": state.hosts[text(obj(change.host).name)] = obj(change.host); break;
    case "host_removed": delete state.hosts[text(change.name)]; break;
    case "run": state.runs[text(obj(change.run).id)] = obj(change.run); break;
    case "run_removed": delete state.runs[text(change.id)]; break;
    case "event": state.events.push(obj(change.event)); state.events.splice(0, state.events.length - 100); break;
    case "image": state.images[text(obj(change.image).id)] = obj(change.image); break;
    case "image_removed": delete state.images[text(change.id)]; break;
    case "rollout": state.rollouts[text(obj(change.rollout).id)] = obj(change.rollout); break;
    case "rollout_removed": delete state.rollouts[text(change.id)]; break;
  }
}

function setConnection(up, why = "reconnecting") {
  $("connection").textContent = up ? "live" : why;
  $("connection").className = `badge ${up ? "online" : "offline"}`;
}

function render() {
  $("main").hidden = false;
  $("login").hidden = true;
  $("logout").hidden = false;
  $("version").textContent = `state version ${version}`;
  showRole();
  renderHosts();
  renderTarget();
  renderDetail();
  renderRuns();
  renderImages();
  renderRollouts();
  renderEvents();
}

// Hosts: counts of what needs a look, then the table, sorted and filtered in the page. A count is
// also a filter: choosing it shows those hosts.

let sorting = { key: "name", descending: false };

// Each host's command in the newest run that has one: its last run, as the table and counts show it.
function lastCommands() {
  const last = new Map();
  const runs = Object.values(state.runs).map(obj).sort((a, b) => (Number(a.created) || 0) - (Number(b.created) || 0));
  for (const run of runs) for (const command of list(run.commands).map(obj)) last.set(text(command.host), command);
  return last;
}

const FAILED_COMMANDS = ["failed", "interrupted"];
const GLANCE = [
  ["online", "online", (host) => host.online === true],
  ["offline", "offline", (host) => host.online !== true],
  ["healthy", "healthy", (host) => host.health === "good"],
  ["fallback", "in fallback", (host) => obj(obj(host.facts).boot_state).kind === "fallback"],
  // A new deployment or rollback booted on trial: it falls back by itself unless its boot is confirmed good.
  ["trial", "pending confirmation", (host) => host.boot_status === "on trial"],
  ["failed-run", "failed last run", (host, last) => FAILED_COMMANDS.includes(text(obj(last.get(text(host.name))).state))],
];

// What an agent says can be 4,096 characters long: a cell shows its start, and the rest on hover (up to
// EVENT_DETAIL_CHARS of it).
const CELL_CHARS = 100, EVENT_DETAIL_CHARS = 2000;
const short = (value) => {
  const whole = text(value);
  return whole.length <= CELL_CHARS ? whole : el("span", { title: whole.slice(0, EVENT_DETAIL_CHARS) },
    `${whole.slice(0, CELL_CHARS)}…`);
};
const bootText = (boot) => boot.kind ? `${text(boot.kind)} ${text(boot.root)}` : "";
// The last change the hub made there: what, by whom and when (hub/fleet.py's last_change).
const changeText = (change) => change.what === undefined ? ""
  : `${text(change.what)} by ${text(change.by)}, ${when(change.time)}`;
const SORT_KEYS = {
  name: (host) => text(host.name),
  health: (host) => text(host.health),
  hostname: (host) => text(obj(host.facts).hostname),
  boot: (host) => `${text(host.boot_status)} ${bootText(obj(obj(host.facts).boot_state))}`,
  image: (host) => text(obj(obj(host.facts).boot_state).image_version),
  run: (host, last) => text(obj(last.get(text(host.name))).state),
  rollback: (host) => Number(obj(host.last_rollback).time) || 0,
  change: (host) => Number(obj(host.last_change).time) || 0,
  groups: (host) => list(host.groups).map(text).join(", "),
  seen: (host) => Number(host.last_seen) || 0,
  // Hosts never scanned first (ascending), then by score: the least compliant are the ones to look at.
  compliance: (host) => complianceScore(host) ?? -1,
};

// A host's compliance score (0 to 1) if its report has one; the hub sends it, the page trusts only numbers.
function complianceScore(host) {
  const score = obj(host.compliance).score;
  return typeof score === "number" && score >= 0 && score <= 1 ? score : null;
}

// "90% (1 failed)", or what stands for no score: never scanned, or no check applies there.
function complianceText(host) {
  if (!host.compliance) return "";
  const score = complianceScore(host), failed = Number(obj(host.compliance).failed) || 0;
  if (score === null) return "no check applies";
  return `${Math.floor(score * 100)}%${failed ? ` (${failed} failed)` : ""}`;
}

function compareHosts(last) {
  const value = SORT_KEYS[sorting.key] || SORT_KEYS.name, sign = sorting.descending ? -1 : 1;
  const compare = (a, b) => typeof a === "number" && typeof b === "number" ? a - b
    : String(a).localeCompare(String(b), undefined, { numeric: true });
  return (a, b) => sign * compare(value(a, last), value(b, last)) || compare(text(a.name), text(b.name));
}

function sortBy(key) {
  sorting = { key, descending: sorting.key === key ? !sorting.descending : false };
  render();
}

function hostFilter(last) {
  const group = $("filter-group").value, health = $("filter-health").value;
  const words = $("filter-text").value.toLowerCase().split(/\s+/).filter(Boolean);
  const glance = GLANCE.find(([key]) => `is:${key}` === health);
  return (host) => {
    if (group && !list(host.groups).map(text).includes(group)) return false;
    if (glance ? !glance[2](host, last) : health && `health:${text(host.health)}` !== health) return false;
    const facts = obj(host.facts), boot = obj(facts.boot_state);
    const haystack = [host.name, host.health, host.boot_status, facts.hostname, boot.kind, boot.root,
                      boot.image_version, obj(host.last_change).by, ...list(host.groups)]
      .map(text).join(" ").toLowerCase();
    return words.every((word) => haystack.includes(word));
  };
}

function renderHosts() {
  const hosts = Object.values(state.hosts).map(obj), last = lastCommands();
  keepOptions($("filter-group"), [["", "any"], ...[...new Set(hosts.flatMap((host) => list(host.groups).map(text)))]
    .sort().map((group) => [group, group])]);
  const healths = [...new Set(hosts.map((host) => text(host.health)))].sort();
  keepOptions($("filter-health"), [["", "any"], ...GLANCE.map(([key, label]) => [`is:${key}`, label]),
    ...healths.map((health) => [`health:${health}`, `health: ${health}`])]);
  renderGlance(hosts, last);
  const header = $("hosts").tHead.rows[0].cells;
  for (const th of header) {
    th.setAttribute("aria-sort", th.dataset.sort !== sorting.key ? "none" : sorting.descending ? "descending" : "ascending");
  }
  const shown = hosts.filter(hostFilter(last)).sort(compareHosts(last));
  $("hosts-shown").textContent = shown.length === hosts.length ? `${hosts.length} hosts`
    : `${shown.length} of ${hosts.length} hosts`;
  const rows = shown.map((host) => {
    const name = text(host.name), facts = obj(host.facts), boot = obj(facts.boot_state);
    const rollback = host.last_rollback ? obj(host.last_rollback) : null, command = last.get(name);
    const status = text(host.boot_status), where = bootText(boot);
    const cells = [el("button", { type: "button", class: "link" }, name), badge(host.health), short(facts.hostname),
      el("span", {}, status ? badge(status) : "", status && where ? " " : "", short(where)),
      short(boot.image_version), complianceText(host), command ? badge(command.state) : "",
      rollback ? `${text(rollback.method)} ${when(rollback.time)}` : "", short(changeText(obj(host.last_change))),
      short(list(host.groups).map(text).join(", ")), when(host.last_seen)];
    // Each cell says what it is: on a phone each host is a card of labelled lines (hub.css).
    return el("tr", { class: `selectable ${name === selected ? "selected" : ""}`, "data-host": name,
                      onclick: () => { selected = name; render(); } },
      ...cells.map((cell, index) => el("td", index < 2 ? {} : { "data-label": header[index].textContent }, cell)));
  });
  if (hosts.length && !shown.length) {
    rows.push(el("tr", { class: "none" }, el("td", { colspan: "11" }, "No host matches these filters.")));
  }
  $("hosts").tBodies[0].replaceChildren(...rows);
}

// The count buttons are made once and updated in place: one the keyboard is on keeps its focus as
// the fleet changes.
function renderGlance(hosts, last) {
  if (!$("glance").children.length) {
    $("glance").replaceChildren(...GLANCE.map(([key, label]) => el("li", { "data-glance": key },
      el("button", { type: "button", onclick: () => {
        $("filter-health").value = $("filter-health").value === `is:${key}` ? "" : `is:${key}`;
        render();
      } }, el("strong"), ` ${label}`))));
  }
  for (const [index, [key, , counts]] of GLANCE.entries()) {
    const item = $("glance").children[index], count = hosts.filter((host) => counts(host, last)).length;
    item.querySelector("strong").textContent = String(count);
    item.className = count > 0 && !["online", "healthy"].includes(key) ? "attention" : "";
    item.querySelector("button").setAttribute("aria-pressed", String($("filter-health").value === `is:${key}`));
  }
}

const DRY_RUN = 1;  // a run's flags: dry-run 1, no-snapshot 2, restore 4 (hub/api.py)
const planOpen = new Map();  // command id -> its plan shown or not, as the admin left it, across renders

function renderRuns() {
  const runs = Object.values(state.runs).map(obj).sort((a, b) => (Number(b.created) || 0) - (Number(a.created) || 0));
  $("runs").replaceChildren(...runs.map((run) => {
    const dry = (Number(run.flags) & DRY_RUN) !== 0;
    return el("div", { class: "run", "data-run": text(run.id) },
      el("div", {}, badge(run.state), dry ? " " : "", dry ? el("span", { class: "badge dry-run" }, "dry run") : "",
        ` ${runWhat(run)} on ${targetText(run.target)}`,
        ` by ${text(run.admin)}, ${when(run.created)} `,
        run.state === "running" && may("POST /api/v1/runs/{id}/cancel")
          ? el("button", { class: "cancel-run", onclick: () => confirmCancel(run) }, "Cancel")
          : ""),
      runProgress(run),
      el("table", {}, el("tbody", {}, ...list(run.commands).map(obj).flatMap((c) => [
        el("tr", { class: "command", "data-host": text(c.host) },
          el("td", {}, text(c.host)), el("td", {}, badge(c.state)), el("td", {}, c.job_id ? `job ${text(c.job_id)}` : ""),
          el("td", {}, text(obj(c.result).error)), el("td", { class: "steps-done" }, hostProgress(run, c))),
        ...planRow(c, dry), ...outputRow(run, c)]))));
  }));
  runsRendered(runs);
}

// The states a command ends in (hub/store.py FINAL_COMMAND_STATES): its host is finished with the run.
const FINAL_COMMAND = new Set(["done", "failed", "cancelled", "interrupted"]);
// A step the host reports as got through, whether it changed anything or not (a dry run's: planned).
const STEP_THROUGH = new Set(["changed", "unchanged", "planned", "done"]);

function bar(label, done, total) {
  return el("span", { class: "progress" },
    el("progress", { max: String(Math.max(total, 1)), value: String(Math.min(done, total)), "aria-label": label }),
    ` ${Math.min(done, total)}/${total}`);
}

// Hosts finished of hosts: only the hub's own command states, which every agent reports.
function runProgress(run) {
  const commands = list(run.commands).map(obj);
  const finished = commands.filter((command) => FINAL_COMMAND.has(text(command.state))).length;
  return el("div", { class: "run-progress" }, "hosts finished", bar("hosts finished", finished, commands.length));
}

// What a run does: its steps, or its compliance scan or remediation.
function runWhat(run) {
  if (!run.compliance) return list(run.steps).map((s) => text(obj(s).op)).join(" && ");
  const compliance = obj(run.compliance), checks = list(compliance.checks).map(text);
  return `compliance ${text(compliance.action)}${checks.length ? ` (${checks.join(", ")})` : ""}`;
}

// Steps done of steps: all once its command is done; before, those its result reports got through. A
// compliance run has no steps of its own: its hosts' scans say how it went.
function hostProgress(run, command) {
  const counts = obj(obj(command.result).compliance);
  if (run.compliance && command.result) {
    return Object.keys(counts).length ? `${text(counts.passed)} passed, ${text(counts.failed)} failed` : "";
  }
  if (run.compliance) return "";
  const total = list(run.steps).length;
  const done = command.state === "done" ? total
    : list(obj(command.result).steps).filter((step) => STEP_THROUGH.has(text(obj(step).state))).length;
  return bar(`${text(command.host)}: steps done`, done, total);
}

// Like a host action's (hostpage.js): the modal dialog names what ends; only its OK button sends.
function confirmCancel(run) {
  const dialog = $("confirm"), what = runWhat(run);
  $("confirm-title").textContent = "Cancel this run?";
  $("confirm-text").textContent = `${what} on ${targetText(run.target)}: hosts that have not started it never `
    + "will; those running it are asked to stop, and what they changed so far stays.";
  $("confirm-ok").textContent = "Cancel the run";
  dialog.returnValue = "";
  dialog.onclose = async () => {
    if (dialog.returnValue !== "ok") return;
    try {
      await post(`/api/v1/runs/${encodeURIComponent(text(run.id))}/cancel`);
    } catch (error) {
      $("dispatch-error").textContent = error.message;
    }
  };
  dialog.showModal();
}

// What each step of a host's command planned (a dry run) or changed, with the diffs, as its result
// carries them; nothing when it carries none.
function planRow(command, dry) {
  const result = obj(command.result), id = text(command.id);
  const steps = list(result.steps).map(obj).filter((step) => step.state === "planned" || list(step.changes).length);
  if (!steps.length) return [];
  const changes = steps.reduce((sum, step) => sum + list(step.changes).length, 0);
  const details = el("details", { class: "plan", ontoggle: () => planOpen.set(id, details.open) },
    el("summary", {}, `${dry ? "plan" : "changes"}: ${changes === 1 ? "1 change" : `${changes} changes`}`),
    result.note ? el("p", { class: "help" }, text(result.note)) : "",
    ...steps.map((step) => el("div", { class: "plan-step" },
      el("div", {}, `${text(step.op)}: `, badge(step.state), list(step.changes).length ? "" : " nothing to change"),
      ...list(step.changes).map(obj).map((change) => el("div", { class: "change" },
        el("div", {}, `${dry ? "would " : ""}${text(change.action)} ${text(change.subject)}`),
        change.detail ? diffView(text(change.detail), text(change.action)) : "")))));
  details.open = planOpen.get(id) ?? dry;
  return [el("tr", { class: "plan-row" }, el("td", { colspan: "5" }, details))];
}

function diffView(detail, action) {
  if (action === "run") return el("pre", {}, `$ ${detail}`);
  const kind = (line) => line.startsWith("+") && !line.startsWith("+++") ? "add"
    : line.startsWith("-") && !line.startsWith("---") ? "del" : "";
  return el("pre", { class: "diff" }, ...detail.split("\n").map((line) => el("span", { class: kind(line) }, `${line}\n`)));
}

// Images and rollouts (docs/updates.md): the bundles the hub keeps, and each rollout wave by wave.

function renderImages() {
  const images = Object.values(state.images).map(obj)
    .sort((a, b) => (Number(b.uploaded_at) || 0) - (Number(a.uploaded_at) || 0));
  // Each cell says what it is: on a phone each image is a card of labelled lines (hub.css).
  const labelled = (label, value) => el("td", { "data-label": label }, value);
  $("images").tBodies[0].replaceChildren(...images.map((image) => el("tr", { "data-image": text(image.id) },
    el("td", {}, text(image.id)), labelled("Profile", text(image.profile)), labelled("Version", text(image.version)),
    labelled("Kind", image.delta === true ? `delta from ${text(image.parent)}` : "full"),
    labelled("Size", size(image.size)),
    labelled("Key", `${text(image.key_id)}${image.signature_checked === true ? " (checked)" : ""}`),
    labelled("Uploaded", `${when(image.uploaded_at)} by ${text(image.uploaded_by)}`),
    el("td", {}, may("DELETE /api/v1/images/{id}")
      ? el("button", { onclick: () => act(`/api/v1/images/${encodeURIComponent(text(image.id))}`, "images-error",
                                          "DELETE") }, "Remove")
      : ""))));
  // The form's choice of image, kept across renders: only a changed list of images redraws it.
  const choice = $("rollout-image"), ids = images.map((image) => text(image.id));
  if (choice.dataset.ids !== ids.join(" ")) {
    const chosen = choice.value;
    choice.replaceChildren(...images.map((image) => el("option", { value: text(image.id) },
      `${text(image.profile)} ${text(image.version)}${image.delta === true ? ` from ${text(image.parent)}` : ""}`
      + ` (${text(image.id)})`)));
    if (ids.includes(chosen)) choice.value = chosen;
    choice.dataset.ids = ids.join(" ");
  }
}

function renderRollouts() {
  const rollouts = Object.values(state.rollouts).map(obj)
    .sort((a, b) => (Number(b.created) || 0) - (Number(a.created) || 0));
  $("rollouts").replaceChildren(...rollouts.map((rollout) => {
    const id = text(rollout.id), path = `/api/v1/rollouts/${encodeURIComponent(id)}`, live = text(rollout.state);
    const button = (action, label) => may(`POST /api/v1/rollouts/{id}/${action}`)
      ? el("button", { class: action, onclick: () => act(`${path}/${action}`, "rollouts-error") }, label) : "";
    const waves = new Map();
    for (const host of list(rollout.hosts).map(obj)) {
      const wave = Number(host.wave) || 0;
      if (!waves.has(wave)) waves.set(wave, []);
      waves.get(wave).push(host);
    }
    const rows = [...waves.keys()].sort((a, b) => a - b).map((wave) => el("tr",
      { class: wave === Number(rollout.wave) && live !== "complete" ? "current" : "" },
      el("td", {}, wave === 0 ? "skipped"
        : `wave ${wave}${wave === 1 && Number(rollout.canary) > 0 ? " (canary)" : ""}`),
      el("td", {}, ...waves.get(wave).map((host) => el("span", { class: "host", "data-host": text(host.host) },
        `${text(host.host)} `, badge(host.state),
        host.state === "failed" && host.detail ? el("span", { class: "error" }, ` ${text(host.detail)}`) : "")))));
    return el("div", { class: "run rollout", "data-rollout": id },
      el("div", {}, badge(live), ` ${text(rollout.profile)} ${text(rollout.version)} to ${targetText(rollout.target)}`,
        ` · wave ${text(rollout.wave)} of ${text(rollout.waves)}`,
        ` · by ${text(rollout.admin)}, ${when(rollout.created)} `,
        live === "running" ? button("pause", "Pause") : "",
        live === "paused" || live === "halted" ? button("resume", "Resume") : "",
        ["running", "paused", "halted"].includes(live) ? button("abort", "Abort") : ""),
      rollout.reason ? el("p", { class: "error reason" }, `halted: ${text(rollout.reason)}`) : "",
      el("table", {}, el("tbody", {}, ...rows)),
      historyList(rollout));
  }));
}

// Each change of a rollout's state, oldest first: why it halted stays here after a resume clears
// `reason`, with who resumed, paused or aborted it.
function historyList(rollout) {
  const changes = list(rollout.history).map(obj);
  const word = (change, index) => change.state === "running" ? (index === 0 ? "started" : "resumed")
    : change.state === "complete" ? "finished" : text(change.state);
  return el("ol", { class: "history" }, ...changes.map((change, index) => el("li", { "data-state": text(change.state) },
    `${when(change.time)} ${word(change, index)} by ${text(change.by)}`,
    change.reason ? el("span", { class: "error" }, `: ${text(change.reason)}`) : "")));
}

function targetText(value) {
  const target = obj(value);
  if (Array.isArray(target.hosts)) return `hosts ${target.hosts.map(text).join(", ")}`;
  return "group" in target ? `group ${text(target.group)}` : target.all === true ? "all hosts" : text(value);
}

async function act(path, errorId, method = "POST") {
  try {
    await request(method, path);
    $(errorId).textContent = "";
  } catch (error) {
    $(errorId).textContent = error.message;
  }
}

const post = (path, body) => request("POST", path, body === undefined ? "{}" : JSON.stringify(body));

async function request(method, path, body, type = "application/json") {
  const answer = await fetch(path, { method, credentials: "same-origin",
    headers: body === undefined ? {} : { "Content-Type": type }, body });
  const text = await answer.text();
  if (!answer.ok) throw new Error(text ? (JSON.parse(text).error || text) : answer.statusText);
  return text ? JSON.parse(text) : null;
}

function showLogin() {
  $("main").hidden = true;
  $("login").hidden = false;
  $("logout").hidden = true;
}

$("login").onsubmit = async (event) => {
  event.preventDefault();
  try {
    await post("/api/v1/login", { token: $("token").value });
    $("token").value = "";
    $("login-error").textContent = "";
    connect();
  } catch (error) {
    $("login-error").textContent = error.message;
  }
};

$("image-upload").onsubmit = async (event) => {
  event.preventDefault();
  const file = $("bundle").files[0];
  if (!file) return;
  $("upload-error").textContent = `uploading ${file.name} (${size(file.size)})…`;
  try {
    await request("POST", "/api/v1/images", file, "application/octet-stream");
    $("upload-error").textContent = "";
    $("bundle").value = "";
  } catch (error) {
    $("upload-error").textContent = error.message;
  }
};

$("rollout-form").onsubmit = async (event) => {
  event.preventDefault();
  const kind = $("rollout-target-kind").value, value = $("rollout-target-value").value.trim();
  const target = kind === "all" ? { all: true }
    : kind === "group" ? { group: value } : { hosts: value.split(/[\s,]+/).filter(Boolean) };
  try {
    await post("/api/v1/rollouts", { image: $("rollout-image").value, target, canary: Number($("canary").value),
                                     wave_percent: Number($("wave-percent").value),
                                     health_timeout_s: Number($("health-timeout").value) });
    $("rollout-error").textContent = "";
  } catch (error) {
    $("rollout-error").textContent = error.message;
  }
};

$("logout").onclick = async () => {
  try {
    await post("/api/v1/logout");
  } finally {
    state = null;
    me = null;
    showRole();
    if (socket) { socket.onclose = null; socket.close(); }
    setConnection(false, "logged out");
    showLogin();
  }
};

for (const th of $("hosts").tHead.rows[0].cells) th.querySelector("button").onclick = () => sortBy(th.dataset.sort);
for (const id of ["filter-group", "filter-health", "filter-text"]) $(id).oninput = () => state && render();
initRunForm();
initHostPage();
initEventLog();
connect();
