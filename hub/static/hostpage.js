// A host's page: its boot, its snapshots as a timeline (newest first, the booted one and the known-good
// ones marked), its jobs with each step's changes and diffs, its boot history, and what an operator
// may do with its snapshots: take a snapshot, roll back to one, boot one
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
  const jobs = list(host.jobs).map(obj).reverse().map(jobItem);
  $("jobs").replaceChildren(...(jobs.length ? jobs : [el("p", { class: "none" }, "No jobs reported yet.")]));
  const boots = list(host.boots).map(obj).reverse().map((boot, index) => bootItem(boot, index === 0));
  $("boots").replaceChildren(...(boots.length ? boots : [el("li", { class: "none" }, "No boots reported yet.")]));
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

// A job as its agent reported its end: who asked (a run of the hub's, or someone on the host), each step
// with its state, what it changed or (a dry run) planned with the diffs, its error and its output.
const jobOpen = new Map();  // host and job -> its steps shown or not, as the admin left them, across renders

function jobItem(job) {
  const result = obj(job.result), steps = list(result.steps).map(obj), key = `${selected} ${text(job.id)}`;
  const dry = result.dry_run === true, changes = steps.reduce((sum, step) => sum + list(step.changes).length, 0);
  const details = el("details", { class: "job-steps", ontoggle: () => jobOpen.set(key, details.open) },
    el("summary", {}, `${steps.length === 1 ? "1 step" : `${steps.length} steps`}, `
      + `${changes === 1 ? "1 change" : `${changes} changes`}${dry ? " planned" : ""}`),
    result.note ? el("p", { class: "help" }, text(result.note)) : "",
    ...steps.map((step) => el("div", { class: "plan-step", "data-op": text(step.op) },
      el("div", {}, `${text(step.op)}: `, badge(step.state),
        step.error ? el("span", { class: "error" }, ` ${short(step.error)}`) : "",
        list(step.changes).length || !["changed", "unchanged", "planned"].includes(text(step.state))
          ? "" : " nothing to change"),
      ...list(step.changes).map(obj).map((change) => el("div", { class: "change" },
        el("div", {}, `${dry ? "would " : ""}${text(change.action)} ${text(change.subject)}`),
        change.detail ? diffView(text(change.detail), text(change.action)) : "")),
      list(step.output).length ? el("pre", { class: "output" }, list(step.output).map(text).join("\n")) : "")));
  details.open = jobOpen.get(key) ?? false;
  return el("div", { class: "run job", "data-job": text(job.id) },
    el("div", {}, `job ${text(job.id)} `, badge(job.state), dry ? " " : "",
      dry ? el("span", { class: "badge dry-run" }, "dry run") : "",
      ` ${list(job.ops).map(text).join(" && ")} · ${when(job.time)} · ${jobAuthor(job)}`),
    result.error ? el("div", { class: "error" }, short(result.error)) : "",
    job.result_omitted || result.omitted
      ? el("p", { class: "help" }, `steps not kept: ${text(job.result_omitted || result.omitted)}`) : "",
    steps.length ? details : "");
}

// Who asked for a job: the run of the hub's that sent it (by its admin) when the hub still has it,
// a run of the hub's, or the uid that asked on the host itself.
function jobAuthor(job) {
  if (job.hub_command) {
    const run = Object.values(state.runs).map(obj)
      .find((r) => list(r.commands).some((c) => text(obj(c).id) === text(job.hub_command)));
    return run ? `run by ${text(run.admin)}` : "a run of the hub's";
  }
  if (job.uid === undefined || job.uid === null) return "on the host";
  return job.uid === 0 ? "on the host, by root" : `on the host, by uid ${text(job.uid)}`;
}

// A boot as the agent reported it, newest first: what booted (an image version's deployment, a
// rollback to a snapshot, a read-only snapshot), whether it was confirmed good, and what it fell back
// from when a new deployment did not come up.
const BOOT_KINDS = { deployment: "deployment", rollback: "rollback to snapshot", snapshot: "read-only snapshot",
                     fallback: "fallback" };

function bootItem(boot, newest) {
  const kind = text(boot.kind), fell = Boolean(boot.failed_entry), named = kind === "rollback" || kind === "snapshot";
  const what = named ? `${BOOT_KINDS[kind]} ${text(boot.snapshot)}`
    : boot.image_version ? `image ${text(boot.image_version)}`
    : kind === "fallback" ? "the deployment before" : BOOT_KINDS[kind] || kind || "a boot";
  const health = fell ? el("span", { class: "badge fell-back" }, "fell back")
    : boot.health === "good" ? el("span", { class: "badge good" }, "good")
    : el("span", { class: "badge pending" }, newest ? "on trial" : "not confirmed good");
  const version = boot.image_version && named ? ` (image ${text(boot.image_version)})` : "";
  return el("li", { class: fell ? "boot fell" : "boot", "data-kind": kind },
    el("div", { class: "when" }, when(boot.time)),
    el("div", { class: "what" }, el("strong", {}, what), version, " ", health),
    el("div", { class: "description" }, boot.root ? "root " : "", boot.root ? short(boot.root) : "",
      boot.entry ? ", entry " : "", boot.entry ? short(boot.entry) : ""),
    fell ? el("div", { class: "error" }, short(boot.failed_entry), boot.failed_root ? " (" : "",
      boot.failed_root ? short(boot.failed_root) : "", boot.failed_root ? ")" : "",
      " did not boot: its tries were used up, and the deployment before it booted again") : "");
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
      // The booted snapshot runs already: a rollback to it is not offered (booting it once read-only is).
      acting ? el("div", { class: "snapshot-buttons" }, booted ? "" : button("rollback", "Roll back…"), " ",
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
