// The event log: filtered by host, actor, kind and time, each event's detail shown as fields (a key and
// its value a line, nested ones indented, long values cut with the whole on hover), always as text.
//
// Without a filter it shows the newest events the stream carries. With one, it asks the hub for the
// newest events that match (GET /api/v1/events, up to EVENTS_ASKED) and shows those together with the
// ones the stream brings from then on that match too. The helpers (el, obj, text, when...) are hub.js's.
"use strict";

const EVENTS_ASKED = 200;
const FIELD_CHARS = 120;  // a value longer than this is cut; its title has up to EVENT_DETAIL_CHARS of it
const FIELDS_SHOWN = 12;  // of one object; the rest are named in a last line's title
const FIELD_DEPTH = 4;  // nested deeper than this, an object is summed up, not shown
let eventPage = { key: "", events: [] };  // what the hub answered for the filters of `key`
let eventRequest = 0, eventTimer = null;

function eventFilters() {
  const range = $("event-range").value, seconds = (id) => {
    const value = $(id).value ? new Date($(id).value).getTime() / 1000 : NaN;
    return isFinite(value) && value >= 0 ? value : null;
  };
  const custom = range === "range";
  return { host: $("event-host").value, actor: $("event-actor").value.trim(), method: $("event-kind").value.trim(),
           range, since: custom ? seconds("event-from") : range ? Date.now() / 1000 - Number(range) : null,
           until: custom ? seconds("event-to") : null };
}

// What the hub's answer depends on: a relative range ("last hour") is asked for again only when chosen.
const filterKey = (f) => JSON.stringify([f.host, f.actor, f.method, f.range,
  f.range === "range" ? [f.since, f.until] : null]);
const filtered = (f) => Boolean(f.host || f.actor || f.method || f.since !== null || f.until !== null);

const eventMatches = (f) => (e) => (!f.host || text(e.host) === f.host) && (!f.actor || text(e.actor) === f.actor)
  && (!f.method || text(e.method) === f.method) && (f.since === null || Number(e.time) >= f.since)
  && (f.until === null || Number(e.time) <= f.until);

async function loadEvents() {
  const f = eventFilters(), key = filterKey(f), asked = ++eventRequest;
  $("event-from-label").hidden = $("event-to-label").hidden = f.range !== "range";
  if (!filtered(f)) {
    eventPage = { key: "", events: [] };
    $("events-error").textContent = "";
    return renderEvents();
  }
  const query = new URLSearchParams({ limit: String(EVENTS_ASKED) });
  for (const name of ["host", "actor", "method"]) if (f[name]) query.set(name, f[name]);
  for (const name of ["since", "until"]) if (f[name] !== null) query.set(name, f[name].toFixed(3));
  try {
    const found = list(await request("GET", `/api/v1/events?${query}`));
    if (asked !== eventRequest) return;  // the filters changed again meanwhile: that answer wins
    eventPage = { key, events: found };
    $("events-error").textContent = "";
  } catch (error) {
    if (asked === eventRequest) $("events-error").textContent = error.message;
  }
  renderEvents();
}

function renderEvents() {
  if (!state) return;
  const f = eventFilters(), pool = new Map();
  const asked = filtered(f) && eventPage.key === filterKey(f) ? eventPage.events : [];
  for (const e of [...asked, ...list(state.events)].map(obj)) pool.set(text(e.id), e);
  updateEventChoices([...pool.values()]);
  const shown = [...pool.values()].filter(eventMatches(f))
    .sort((a, b) => (Number(b.id) || 0) - (Number(a.id) || 0)).slice(0, EVENTS_ASKED);
  $("events-shown").textContent = filtered(f) ? `${shown.length} matching` : `the newest ${shown.length}`;
  const rows = shown.map((e) => el("tr", { "data-event": text(e.id) },
    el("td", {}, when(e.time)), el("td", {}, text(e.host)), el("td", {}, text(e.actor)),
    el("td", {}, text(e.method)), el("td", { class: "detail" }, fieldsView(e.detail, 1))));
  if (!rows.length) rows.push(el("tr", { class: "none" }, el("td", { colspan: "5" }, "No event matches these filters.")));
  $("events").tBodies[0].replaceChildren(...rows);
}

// The choices of each filter: the hosts the hub has, and the actors and kinds seen. A list is redrawn
// only when it changed, and a choice made stays.
function updateEventChoices(events) {
  const sorted = (values) => [...new Set(values.filter(Boolean))].sort();
  const hosts = sorted([...Object.keys(state.hosts), ...events.map((e) => text(e.host))]);
  const choice = $("event-host");
  if (choice.dataset.hosts !== hosts.join(" ")) {
    const chosen = choice.value;
    choice.replaceChildren(el("option", { value: "" }, "any"), ...hosts.map((h) => el("option", { value: h }, h)));
    choice.value = hosts.includes(chosen) ? chosen : "";
    choice.dataset.hosts = hosts.join(" ");
  }
  for (const [id, key] of [["event-actors", "actor"], ["event-kinds", "method"]]) {
    const values = sorted(events.map((e) => text(e[key]))), list_ = $(id);
    if (list_.dataset.values !== values.join("\n")) {
      list_.replaceChildren(...values.map((value) => el("option", { value })));
      list_.dataset.values = values.join("\n");
    }
  }
}

// A detail as fields: a key and its value a line; an object's fields indented under its key; a list of
// plain values on one line; a long value cut, with the whole (up to EVENT_DETAIL_CHARS) on hover.
function fieldsView(value, depth) {
  const entries = Array.isArray(value) ? value.map((item, index) => [`${index + 1}`, item]) : Object.entries(obj(value));
  if (!entries.length) return el("span", { class: "help" }, "no details");
  const rest = entries.slice(FIELDS_SHOWN);
  return el("dl", { class: "fields" },
    ...entries.slice(0, FIELDS_SHOWN).flatMap(([key, item]) => [el("dt", {}, key), el("dd", {}, fieldValue(item, depth))]),
    ...(rest.length ? [el("dt", {}, "…"), el("dd", { title: rest.map(([key]) => key).join(", ").slice(0, EVENT_DETAIL_CHARS) },
      `${rest.length} more`)] : []));
}

const plain = (value) => value === null || typeof value !== "object";

function fieldValue(item, depth) {
  if (plain(item)) return cutValue(item === null ? "none" : text(item));
  if (Array.isArray(item) && item.every(plain)) return item.length ? cutValue(item.map(text).join(", ")) : "none";
  const size = Array.isArray(item) ? item.length : Object.keys(item).length;
  if (depth >= FIELD_DEPTH) return el("span", { class: "help" }, `${size} ${Array.isArray(item) ? "items" : "fields"}`);
  return fieldsView(item, depth + 1);
}

function cutValue(whole) {
  return whole.length <= FIELD_CHARS ? whole
    : el("span", { class: "cut", title: whole.slice(0, EVENT_DETAIL_CHARS) }, `${whole.slice(0, FIELD_CHARS)}…`);
}

// hub.js calls this at its end, once its helpers exist.
function initEventLog() {
  for (const id of ["event-host", "event-range", "event-from", "event-to"]) $(id).onchange = loadEvents;
  for (const id of ["event-actor", "event-kind"]) {
    $(id).oninput = () => { clearTimeout(eventTimer); eventTimer = setTimeout(loadEvents, 250); };
  }
}
