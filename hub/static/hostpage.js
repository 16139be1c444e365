// A host's page: its boot, its snapshots as a timeline (newest first, the booted one and the known-good
// ones marked), and what an operator may do with them: take a snapshot, roll back to one, boot one
// once. Each asks first in a dialog naming the host and the snapshot; the hub sends it to the host's
// agent (POST /api/v1/hosts/{name}/actions) and its outcome comes back in the host's `actions`, on the
// stream like every other change. The helpers (el, obj, text, badge, may, post...) are hub.js's.
"use strict";

const ACTION_OPERATION = "POST /api/v1/hosts/{name}/actions";
const ACTION_WORDS = { snapshot: "take a snapshot", rollback: "roll back", boot_once: "boot once" };

function renderDetail() {
  const host = selected && state.hosts[selected] ? obj(state.hosts[selected]) : null;
  $("host-detail").hidden = !host;
  if (!host) return;
  const name = text(host.name), online = host.online === true, facts = obj(host.facts);
  const boot = obj(facts.boot_state), acting = may(ACTION_OPERATION);
  $("detail-name").textContent = name;
  $("detail-online").replaceChildren(badge(online ? "online" : "offline"));
  $("detail-boot").textContent = boot.kind
    ? `Running ${text(boot.kind)} ${text(boot.root)}${boot.snapshot ? ` (snapshot ${text(boot.snapshot)})` : ""}, `
      + `boot health ${text(boot.health)}${boot.image_version ? `, image ${text(boot.image_version)}` : ""}`
    : "";
  $("snapshot-form").hidden = !acting;
  $("snapshot-button").disabled = !online;
  $("snapshot-button").title = online ? "" : `${name} is offline: actions need it online`;
  const actions = list(host.actions).map(obj);
  $("snapshots").replaceChildren(...snapshotItems(name, online, acting, facts, actions));
  $("actions").replaceChildren(...actions.slice().reverse().map(actionItem));
  const jobs = list(host.jobs).map(obj).reverse().map((job) => el("div", { class: "run" },
    el("div", {}, `job ${text(job.id)} `, badge(job.state),
      ` ${list(job.ops).map(text).join(" && ")} · ${when(job.time)}`),
    ...list(obj(job.result).steps).map(obj).map((step) => el("div", {},
      `${text(step.op)}: `, badge(step.state), step.error ? el("span", { class: "error" }, ` ${text(step.error)}`) : "",
      list(step.output).length ? el("pre", {}, list(step.output).map(text).join("\n")) : ""))));
  $("jobs").replaceChildren(...jobs);
  renderCompliance(host);
}

// The host's newest compliance report: its score, when it was scanned, and each failed check.
function renderCompliance(host) {
  const report = host.compliance ? obj(host.compliance) : null;
  $("detail-compliance").textContent = !report ? "Not scanned yet."
    : `Score ${complianceText(host)}: ${text(report.passed)} passed, ${text(report.failed)} failed, `
      + `${text(report.not_applicable)} not applicable; scanned ${when(report.time)}`;
  $("failed-checks").replaceChildren(...list(report && report.failed_checks).map(obj).map((check) =>
    el("li", { class: "check", "data-check": text(check.id) },
      el("span", { class: `badge severity-${text(check.severity)}` }, text(check.severity)), " ",
      el("code", {}, text(check.id)), ` ${text(check.title)}`,
      el("div", { class: "help" }, short(check.finding)))));
}

// The snapshot the next boot starts, as far as the hub knows: the newest rollback or one-shot boot
// done from here, unless the host runs that snapshot already.
function nextBoot(boot, actions) {
  const done = actions.filter((a) => a.state === "done" && ["rollback", "boot_once"].includes(a.action)).pop();
  return done && text(done.snapshot) !== text(boot.snapshot) ? done : null;
}

function snapshotItems(name, online, acting, facts, actions) {
  const boot = obj(facts.boot_state), snapshots = list(facts.snapshots).map(obj)
    .sort((a, b) => (Number(b.created) || 0) - (Number(a.created) || 0) || (Number(b.id) || 0) - (Number(a.id) || 0));
  if (!snapshots.length) return [el("li", { class: "none" }, "No snapshots.")];
  const next = nextBoot(boot, actions);
  return snapshots.map((snapshot) => {
    const id = text(snapshot.id), booted = boot.snapshot !== undefined && text(boot.snapshot) === id;
    const marks = [booted ? el("span", { class: "badge booted" }, "booted") : "",
      snapshot.known_good === true ? el("span", { class: "badge good" }, "known good") : "",
      next && text(next.snapshot) === id
        ? el("span", { class: "badge pending" }, next.action === "rollback" ? "next boot" : "next boot, once") : ""];
    const button = (action, label) => el("button", { type: "button", class: action,
      ...(online ? {} : { disabled: "", title: `${name} is offline: actions need it online` }),
      onclick: () => confirmAction(name, { action, snapshot: Number(snapshot.id) }, snapshot) }, label);
    return el("li", { class: booted ? "snapshot booted" : "snapshot", "data-snapshot": id },
      el("div", { class: "when" }, when(snapshot.created)),
      el("div", { class: "what" }, el("strong", {}, `#${id}`), ` ${text(snapshot.kind)} `, ...marks),
      el("div", { class: "description" }, short(snapshot.description)),
      acting ? el("div", { class: "snapshot-buttons" }, button("rollback", "Roll back…"), " ",
        button("boot_once", "Boot once…")) : "");
  });
}

function actionItem(action) {
  const result = obj(action.result), what = ACTION_WORDS[text(action.action)] || text(action.action);
  const target = action.snapshot !== null && action.snapshot !== undefined ? ` snapshot ${text(action.snapshot)}` : "";
  let outcome = "";
  if (action.state === "done" && action.action === "snapshot") outcome = `snapshot ${text(result.snapshot)} taken`;
  else if (action.state === "done") {
    outcome = `${action.action === "rollback" ? "boots next" : "boots next, once"} (entry ${text(result.entry)})`
      + (result.reboot_needed === true ? ": reboot needed" : "");
  } else if (action.state === "failed") outcome = text(result.error);
  else if (action.state === "lost") outcome = "the connection ended before the host answered; its event log will tell";
  return el("li", { "data-action": text(action.id), "data-state": text(action.state) },
    `${when(action.time)} ${what}${target} by ${text(action.admin)} `, badge(action.state),
    outcome ? el("span", { class: action.state === "failed" ? "error outcome" : "outcome" }, ` ${outcome}`) : "");
}

// The confirmation: a modal <dialog> (Escape or Cancel closes it, and nothing is sent; the focus
// starts on Cancel), naming the host and the snapshot. Only its OK button sends the action.
function confirmAction(host, body, snapshot) {
  const dialog = $("confirm"), id = text(body.snapshot);
  const about = snapshot ? ` (${text(snapshot.kind)}, ${when(snapshot.created)}: ${text(snapshot.description)})` : "";
  const words = {
    snapshot: [`Take a snapshot of ${host}?`, `Host ${host} snapshots its running root as “${text(body.description)}”.`,
               "Take the snapshot"],
    rollback: [`Roll ${host} back to snapshot ${id}?`,
               `Host ${host} makes a writable copy of snapshot ${id}${about} and boots it from its next boot on. `
               + "Nothing changes until it reboots; the hub does not reboot it.", "Roll back"],
    boot_once: [`Boot snapshot ${id} on ${host} once?`,
                `Host ${host} boots snapshot ${id}${about} read-only at its next boot only; the boot after is the `
                + "usual one again. The hub does not reboot it.", "Boot once"],
  }[body.action];
  $("confirm-title").textContent = words[0];
  $("confirm-text").textContent = words[1];
  $("confirm-ok").textContent = words[2];
  dialog.returnValue = "";
  dialog.onclose = async () => {
    if (dialog.returnValue !== "ok") return;
    try {
      await post(`/api/v1/hosts/${encodeURIComponent(host)}/actions`, body);
      $("action-error").textContent = "";
      if (body.action === "snapshot") $("snapshot-description").value = "";
    } catch (error) {
      $("action-error").textContent = error.message;
    }
  };
  dialog.showModal();
}

// hub.js calls this at its end, once its helpers exist.
function initHostPage() {
  $("snapshot-form").onsubmit = takeSnapshot;
}

function takeSnapshot(event) {
  event.preventDefault();
  const description = $("snapshot-description").value.trim();
  if (!description) {
    $("action-error").textContent = "description: say what the snapshot is for";
    $("snapshot-description").focus();
    return;
  }
  $("action-error").textContent = "";
  confirmAction(selected, { action: "snapshot", description });
}
