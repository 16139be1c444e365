// The run form: a run's target, and its steps as forms made from each op's JSON Schema as the hub
// publishes it (GET /api/v1/ops: the schemas the hub, and every host's rastosd, check params with).
//
// The page checks what those schemas say (required, type, enum, pattern, length, range) before
// anything is sent, and names the step and field it refuses; the hub checks again, and its answer,
// which names the field too, shows under the form. The steps as raw JSON stay as an advanced mode, for
// what a form cannot say (an empty required text, a parameter of no simple type).
//
// A run may instead name a workflow (GET /api/v1/workflows): its variables get the same forms, made
// from the schema of the parameter each fills, and the hub expands it into steps, checking the
// variables itself and naming the one it refuses.
//
// Or a run may be a compliance scan or remediation: no steps, each host scans itself (and remediates
// the failed checks an op can fix, only those named if any) and its report comes back to the fleet.
//
// Loaded before hub.js, whose helpers (el, obj, list, text, $) it uses once the page runs;
// hub.js calls initRunForm() at its end.
"use strict";

let ops = null;  // op name -> {description, schema}, once /api/v1/ops answered
let opsLoading = null;
let stepCount = 0;  // ids of each step's inputs, never reused: a label stays tied to its input
const steps = [];  // the steps in the form, in order: {id, node, op, fields}
let workflows = null;  // workflow name -> {description, variables}, once /api/v1/workflows answered
let workflowFields = [];  // the chosen workflow's variables, as paramField makes them

function initRunForm() {
  $("target-kind").onchange = renderTarget;
  $("target-value").oninput = renderTarget;
  $("target-group").onchange = renderTarget;
  $("add-step").onclick = () => addStep().choice.focus();
  $("advanced").onchange = switchMode;
  $("dispatch").onsubmit = dispatch;
  for (const radio of document.getElementsByName("run-kind")) radio.onchange = showRunKind;
  $("workflow-name").onchange = showWorkflow;
  $("compliance-action").onchange = showRunKind;
  // As with a step's field: its complaint goes once the person changes it.
  $("compliance-checks").oninput = () => { $("compliance-checks-error").textContent = ""; };
}

const workflowChosen = () => $("kind-workflow").checked;
const complianceChosen = () => $("kind-compliance").checked;
const CHECK_ID = /^[a-z0-9][a-z0-9-]{0,63}$/;  // a compliance check's id (hub/protocol.py)

function showRunKind() {
  $("dispatch-error").textContent = "";
  $("compliance-checks-error").textContent = "";
  $("workflow-form").hidden = !workflowChosen();
  $("compliance-form").hidden = !complianceChosen();
  $("compliance-checks-field").hidden = $("compliance-action").value !== "remediate";
  $("ops-form").hidden = workflowChosen() || complianceChosen();
  if (workflowChosen()) loadWorkflows();
}

// The compliance run the form describes; `errors` names a check id that cannot be one.
function formCompliance() {
  const action = $("compliance-action").value;
  if (action !== "remediate") return { compliance: { action }, errors: [] };
  const checks = [...new Set($("compliance-checks").value.split(/[\s,]+/).filter(Boolean))];
  const bad = checks.find((check) => !CHECK_ID.test(check));
  const message = bad === undefined ? "" : `compliance.checks: ${JSON.stringify(bad)} is not a check's id `
    + "(lower case letters, digits and -)";
  $("compliance-checks-error").textContent = message;
  return { compliance: { action, checks }, errors: message ? [{ message, input: $("compliance-checks") }] : [] };
}

// Asked for once a role that may start runs is logged in; until it answers, only the JSON mode works.
function loadOps() {
  opsLoading ??= request("GET", "/api/v1/ops").then((answer) => {
    ops = Object.fromEntries(list(answer).map(obj).map((op) => [text(op.name), op]));
    if (steps.length === 0 && !$("advanced").checked) addStep();
  }).catch((error) => {
    opsLoading = null;
    $("dispatch-error").textContent = `the hub's ops: ${error.message}; the steps can be written as JSON`;
    $("advanced").checked = true;
    showMode();
  });
  return opsLoading;
}

// Asked for when a workflow is first chosen; a failure says so and leaves the ops to choose.
function loadWorkflows() {
  if (workflows) return;
  request("GET", "/api/v1/workflows").then((answer) => {
    workflows = Object.fromEntries(list(answer).map(obj).map((workflow) => [text(workflow.name), workflow]));
    keepOptions($("workflow-name"), Object.keys(workflows).sort().map((name) => [name, name]));
    showWorkflow();
  }).catch((error) => {
    $("dispatch-error").textContent = `the hub's workflows: ${error.message}`;
  });
}

function showWorkflow() {
  const workflow = obj(workflows && workflows[$("workflow-name").value]);
  $("workflow-help").textContent = text(workflow.description);
  workflowFields = list(workflow.variables).map(obj).map((variable) => {
    const schema = obj(variable.schema), fills = list(variable.fills).map(text).join(", ");
    const spec = { ...schema, description: `${text(schema.description)}${fills ? `; fills ${fills}` : ""}` };
    return paramField(`variable-${text(variable.name)}`, text(variable.name), spec, variable.required === true);
  });
  $("workflow-variables").replaceChildren(...workflowFields.map((field) => field.node));
}

// The chosen workflow and the variables the form sets (those equal to their default left out, as a
// step's params are); `errors` names each refused variable.
function formWorkflow() {
  const name = $("workflow-name").value, variables = {}, errors = [];
  if (!name) return { errors: [{ message: "workflow: choose one", input: $("workflow-name") }] };
  for (const field of workflowFields) {
    const got = field.read(), error = got.error || (field.required && empty(got.value) ? "required" : "");
    field.show(error);
    if (error) errors.push({ message: `workflow ${name}: ${field.name}: ${error}`, input: field.input });
    else if (got.value !== undefined && JSON.stringify(got.value) !== JSON.stringify(field.spec.default)) {
      variables[field.name] = got.value;
    }
  }
  return { workflow: { name, variables }, errors };
}

// Target

function targetHosts() {
  const kind = $("target-kind").value, hosts = Object.values(state ? state.hosts : {}).map(obj);
  if (kind === "all") return { names: hosts.map((host) => text(host.name)), unknown: [] };
  if (kind === "group") {
    const group = $("target-group").value;
    return { names: hosts.filter((host) => list(host.groups).includes(group)).map((host) => text(host.name)),
             unknown: [] };
  }
  const named = [...new Set($("target-value").value.split(/[\s,]+/).filter(Boolean))];
  const known = new Set(hosts.map((host) => text(host.name)));
  return { names: named.filter((name) => known.has(name)), unknown: named.filter((name) => !known.has(name)) };
}

// How many hosts the target names, from the live state: it follows hosts joining, leaving and going offline.
function renderTarget() {
  const kind = $("target-kind").value;
  $("target-value").hidden = kind !== "hosts";
  $("target-group").hidden = kind !== "group";
  const groups = [...new Set(Object.values(state ? state.hosts : {}).flatMap((host) => list(obj(host).groups)
    .map(text)))].sort();
  keepOptions($("target-group"), groups.map((group) => [group, group]));
  const { names, unknown } = targetHosts();
  if (kind === "hosts" && !names.length && !unknown.length) {
    $("target-count").textContent = "name the hosts, separated by commas or spaces";
    $("target-count").classList.remove("error");
    return;
  }
  const offline = names.filter((name) => obj(state.hosts[name]).online !== true).length;
  $("target-count").textContent = (names.length === 1 ? "1 host" : `${names.length} hosts`)
    + (offline ? ` (${offline} offline: they run it when they come back)` : "")
    + (unknown.length ? `; no host named ${unknown.join(", ")}` : "");
  $("target-count").classList.toggle("error", names.length === 0 || unknown.length > 0);
}

// A select's options redrawn only when they changed, its choice kept: a render must not undo a pick.
function keepOptions(select, options) {
  const key = JSON.stringify(options);
  if (select.dataset.options === key) return;
  const chosen = select.value;
  select.replaceChildren(...options.map(([value, label]) => el("option", { value }, label)));
  if (options.some(([value]) => value === chosen)) select.value = chosen;
  select.dataset.options = key;
}

// Steps

function addStep(op = "", params = {}) {
  const id = ++stepCount;
  const choice = el("select", { id: `step-${id}-op`, class: "op" }, el("option", { value: "" }, "choose an op"),
    ...Object.keys(ops || {}).sort().map((name) => el("option", { value: name }, name)));
  const step = { id, choice, op: "", fields: [], legend: el("legend"),
                 description: el("p", { class: "help", id: `step-${id}-help` }), params: el("div", { class: "params" }),
                 error: el("p", { class: "error", id: `step-${id}-error` }) };
  step.remove = el("button", { type: "button", class: "remove", onclick: () => removeStep(step) }, "Remove");
  choice.setAttribute("aria-describedby", `${step.description.id} ${step.error.id}`);
  choice.onchange = () => showOp(step, choice.value, {});
  step.node = el("fieldset", { class: "step", "data-step": String(id) }, step.legend,
    el("div", { class: "op-line" }, el("label", { for: choice.id }, "Op"), choice, step.remove),
    step.description, step.error, step.params);
  steps.push(step);
  $("step-list").append(step.node);
  choice.value = op;
  showOp(step, op, params);
  numberSteps();
  return step;
}

function removeStep(step) {
  steps.splice(steps.indexOf(step), 1);
  step.node.remove();
  numberSteps();
  (steps.at(-1)?.remove ?? $("add-step")).focus();
}

function numberSteps() {
  steps.forEach((step, index) => {
    step.legend.textContent = `Step ${index + 1}`;
    step.remove.setAttribute("aria-label", `Remove step ${index + 1}`);
  });
}

function showOp(step, name, values) {
  const op = ops && name ? obj(ops[name]) : null, schema = obj(op && op.schema);
  const required = list(schema.required);
  step.op = op ? name : "";
  step.error.textContent = "";
  step.description.textContent = op ? text(op.description) : "";
  step.fields = Object.entries(obj(schema.properties)).map(([param, spec]) =>
    paramField(`step-${step.id}-${param}`, param, obj(spec), required.includes(param), values[param]));
  step.params.replaceChildren(...step.fields.map((field) => field.node));
}

// One parameter's input, made from its schema: how it shows, and how it reads back, checked.
function paramField(id, name, spec, required, value) {
  const kind = fieldKind(spec), initial = value !== undefined ? value : spec.default;
  const help = el("p", { class: "help", id: `${id}-help` }, helpText(spec, kind));
  const error = el("p", { class: "error", id: `${id}-error` });
  const label = el("label", { for: id }, name, required ? el("abbr", { title: "required" }, " *") : "");
  const described = { id, name, "aria-describedby": `${help.id} ${error.id}`,
                      ...(required ? { "aria-required": "true" } : {}) };
  let input, read, node;
  if (kind === "flag") {
    input = el("input", { ...described, type: "checkbox" });
    input.checked = initial === true;
    read = () => ({ value: input.checked });
    node = el("div", { class: "field flag" }, input, label, help, error);
  } else if (kind === "choices") {
    const boxes = list(obj(spec.items).enum).map(text).map((choice, index) => {
      const box = el("input", { type: "checkbox", id: `${id}-${index}`, name, value: choice });
      box.checked = list(initial).includes(choice);
      return box;
    });
    input = boxes[0] || el("span");
    read = () => ({ value: boxes.filter((box) => box.checked).map((box) => box.value) });
    node = el("fieldset", { class: "field choices", "aria-describedby": described["aria-describedby"] },
      el("legend", {}, name, required ? el("abbr", { title: "required" }, " *") : ""),
      ...boxes.map((box) => el("label", { class: "choice" }, box, ` ${box.value}`)), help, error);
  } else {
    if (kind === "choice") {
      input = el("select", described, ...(required || spec.default !== undefined ? [] : [el("option", { value: "" }, "")]),
        ...list(spec.enum).map(text).map((choice) => el("option", { value: choice }, choice)));
    } else if (kind === "number") {
      input = el("input", { ...described, type: "number", step: spec.type === "integer" ? "1" : "any",
                            ...(typeof spec.minimum === "number" ? { min: String(spec.minimum) } : {}),
                            ...(typeof spec.maximum === "number" ? { max: String(spec.maximum) } : {}) });
    } else if (kind === "line") {
      input = el("input", { ...described, type: "text", spellcheck: "false" });
    } else {
      input = el("textarea", { ...described, rows: kind === "text" ? "3" : "2", spellcheck: "false" });
    }
    input.value = shownValue(kind, initial);
    read = () => readValue(kind, spec, input);
    node = el("div", { class: `field ${kind}` }, label, input, help, error);
  }
  const show = (message) => {
    error.textContent = message;
    input.setAttribute("aria-invalid", message ? "true" : "false");
  };
  // A field's complaint is about what was there at the last Run: once the person changes it, it goes
  // (it is checked again at the next Run), so a filled-in field never still says "required".
  for (const kind of ["input", "change"]) node.addEventListener(kind, () => { if (error.textContent) show(""); });
  return { name, spec, required, input, node, read, show };
}

function fieldKind(spec) {
  const items = obj(spec.items), values = obj(spec.additionalProperties);
  switch (spec.type) {
    case "string": return Array.isArray(spec.enum) ? "choice" : spec.maxLength > 4096 ? "text" : "line";
    case "integer": case "number": return "number";
    case "boolean": return "flag";
    case "array": return items.type !== "string" ? "json" : Array.isArray(items.enum) ? "choices" : "lines";
    case "object": return values.type === "string" ? "pairs" : "json";
    default: return "json";
  }
}

function helpText(spec, kind) {
  const how = { lines: "one a line", pairs: "NAME=VALUE, one a line", json: "as JSON" }[kind];
  const range = typeof spec.minimum === "number" && typeof spec.maximum === "number"
    ? `${spec.minimum} to ${spec.maximum}` : "";
  const fallback = empty(spec.default) ? "" : `default ${JSON.stringify(spec.default)}`;
  const extra = [how, range, fallback].filter(Boolean).join("; ");
  return `${text(spec.description)}${extra ? ` (${extra})` : ""}`;
}

function shownValue(kind, value) {
  if (value === undefined || value === null) return "";
  if (kind === "lines") return list(value).map(text).join("\n");
  if (kind === "pairs") return Object.entries(obj(value)).map(([key, item]) => `${key}=${text(item)}`).join("\n");
  if (kind === "json") return JSON.stringify(value, null, 2);
  return typeof value === "object" ? JSON.stringify(value) : String(value);
}

// {value} read from an input, {error} if the schema refuses it, {} for nothing given.
function readValue(kind, spec, input) {
  const raw = input.value;
  if (kind === "number") {
    if (raw.trim() === "") return input.validity.badInput ? { error: "must be a number" } : {};
    const number = Number(raw);
    if (!isFinite(number)) return { error: "must be a number" };
    if (spec.type === "integer" && !Number.isInteger(number)) return { error: `must be a whole number, got ${raw}` };
    if (typeof spec.minimum === "number" && number < spec.minimum) return { error: `must be at least ${spec.minimum}` };
    if (typeof spec.maximum === "number" && number > spec.maximum) return { error: `must be at most ${spec.maximum}` };
    return { value: number };
  }
  if (kind === "lines" || kind === "pairs") {
    const lines = raw.split("\n").map((line) => line.trim()).filter(Boolean);
    return kind === "lines" ? listValue(spec, lines) : mapValue(spec, lines);
  }
  if (kind === "json") {
    if (raw.trim() === "") return {};
    try {
      return { value: JSON.parse(raw) };
    } catch (error) {
      return { error: `not valid JSON: ${error.message}` };
    }
  }
  if (raw === "") return {};
  const problem = stringProblem(spec, raw);
  return problem ? { error: problem } : { value: raw };
}

function listValue(spec, lines) {
  if (typeof spec.maxItems === "number" && lines.length > spec.maxItems) {
    return { error: `at most ${spec.maxItems} lines, got ${lines.length}` };
  }
  for (const [index, line] of lines.entries()) {
    const problem = stringProblem(obj(spec.items), line);
    if (problem) return { error: `line ${index + 1}: ${problem}` };
  }
  return { value: lines };
}

function mapValue(spec, lines) {
  const entries = {};
  if (typeof spec.maxProperties === "number" && lines.length > spec.maxProperties) {
    return { error: `at most ${spec.maxProperties} lines, got ${lines.length}` };
  }
  for (const [index, line] of lines.entries()) {
    const split = line.indexOf("="), key = line.slice(0, split).trim(), value = line.slice(split + 1).trim();
    const where = `line ${index + 1}`;
    if (split < 1 || !key) return { error: `${where}: write NAME=VALUE` };
    if (Object.hasOwn(entries, key)) return { error: `${where}: ${key} is given twice` };
    const problem = stringProblem({ type: "string", ...obj(spec.propertyNames) }, key)
      || stringProblem(obj(spec.additionalProperties), value);
    if (problem) return { error: `${where}: ${problem}` };
    entries[key] = value;
  }
  return { value: entries };
}

const patterns = new Map();

function stringProblem(spec, value) {
  if (typeof spec.maxLength === "number" && value.length > spec.maxLength) {
    return `at most ${spec.maxLength} characters, got ${value.length}`;
  }
  if (Array.isArray(spec.enum) && !spec.enum.includes(value)) return `must be one of ${spec.enum.join(", ")}`;
  if (typeof spec.pattern === "string") {
    if (!patterns.has(spec.pattern)) {
      // The hub's patterns are Python's: one JavaScript cannot read is left to the hub to check.
      try { patterns.set(spec.pattern, new RegExp(spec.pattern)); } catch (error) { patterns.set(spec.pattern, null); }
    }
    const pattern = patterns.get(spec.pattern);
    if (pattern && !pattern.test(value)) {
      return `${JSON.stringify(value.length > 60 ? `${value.slice(0, 60)}…` : value)} does not match ${spec.pattern}`;
    }
  }
  return "";
}

const empty = (value) => value === undefined || value === "" || (Array.isArray(value) && value.length === 0)
  || (value !== null && typeof value === "object" && !Array.isArray(value) && Object.keys(value).length === 0);

// The steps as the form holds them: params that equal their default are left out (the host applies
// the default all the same), so a run reads as what its admin chose. `errors` names each refused field.
function formSteps() {
  const errors = [], collected = [];
  for (const [index, step] of steps.entries()) {
    const where = `step ${index + 1}${step.op ? ` (${step.op})` : ""}`;
    step.error.textContent = step.op ? "" : "choose an op";
    if (!step.op) {
      errors.push({ message: `${where}: choose an op`, input: step.choice });
      continue;
    }
    const params = {};
    for (const field of step.fields) {
      const got = field.read(), error = got.error || (field.required && empty(got.value) ? "required" : "");
      field.show(error);
      if (error) errors.push({ message: `${where}: ${field.name}: ${error}`, input: field.input });
      else if (field.required || (got.value !== undefined
                                  && JSON.stringify(got.value) !== JSON.stringify(field.spec.default))) {
        params[field.name] = got.value;
      }
    }
    collected.push({ op: step.op, params });
  }
  if (steps.length === 0) errors.push({ message: "steps: add a step", input: $("add-step") });
  return { steps: collected, errors };
}

// Advanced mode: the steps as JSON. Switching to it writes what the form holds; switching back reads
// the JSON into forms, or stays and says why it cannot.
function switchMode() {
  $("dispatch-error").textContent = "";
  if ($("advanced").checked) {
    $("steps").value = JSON.stringify(formSteps().steps, null, 2);
    for (const step of steps) for (const field of step.fields) field.show("");
  } else {
    const problem = loadJsonSteps();
    if (problem) {
      $("advanced").checked = true;
      $("dispatch-error").textContent = `${problem}; fix the JSON, or run it as it is`;
    }
  }
  showMode();
}

function showMode() {
  const advanced = $("advanced").checked;
  $("steps-json").hidden = !advanced;
  $("steps-form").hidden = advanced;
}

function loadJsonSteps() {
  if (!ops) return "the hub's ops are not known yet";
  let parsed;
  try {
    parsed = JSON.parse($("steps").value);
  } catch (error) {
    return `steps: not valid JSON: ${error.message}`;
  }
  if (!Array.isArray(parsed)) return "steps: must be a list of {\"op\", \"params\"}";
  for (const [index, step] of parsed.entries()) {
    const name = text(obj(step).op), properties = obj(obj(obj(ops[name]).schema).properties);
    if (!Object.hasOwn(ops, name)) return `steps[${index}].op: the hub knows no op ${JSON.stringify(name)}`;
    const unknown = Object.keys(obj(obj(step).params)).find((key) => !Object.hasOwn(properties, key));
    if (unknown) return `steps[${index}].params.${unknown}: ${name} has no such parameter`;
  }
  for (const step of steps.splice(0)) step.node.remove();
  for (const step of parsed) addStep(step.op, obj(step.params));
  return "";
}

async function dispatch(event) {
  event.preventDefault();
  const kind = $("target-kind").value, value = $("target-value").value.trim();
  const target = kind === "all" ? { all: true }
    : kind === "group" ? { group: $("target-group").value } : { hosts: value.split(/[\s,]+/).filter(Boolean) };
  const errors = [];
  if (kind === "hosts" && target.hosts.length === 0) errors.push({ message: "target: name a host", input: $("target-value") });
  if (kind === "group" && !target.group) errors.push({ message: "target: no group to choose", input: $("target-group") });
  const parallelism = Number($("parallelism").value);
  if (!Number.isInteger(parallelism) || parallelism < 1) {
    errors.push({ message: "parallelism: must be a whole number of at least 1", input: $("parallelism") });
  }
  let chosen, workflow, compliance;
  if (complianceChosen()) {
    const form = formCompliance();
    errors.push(...form.errors);
    compliance = form.compliance;
  } else if (workflowChosen()) {
    const form = formWorkflow();
    errors.push(...form.errors);
    workflow = form.workflow;
  } else if ($("advanced").checked) {
    try {
      chosen = JSON.parse($("steps").value);
    } catch (error) {
      errors.push({ message: `steps: not valid JSON: ${error.message}`, input: $("steps") });
    }
  } else {
    const form = formSteps();
    errors.push(...form.errors);
    chosen = form.steps;
  }
  if (errors.length) {
    $("dispatch-error").textContent = errors.map((error) => error.message).join("; ");
    errors[0].input.focus();
    return;
  }
  $("run-button").disabled = true;  // a second click while the first is on its way would start a second run
  try {
    const what = compliance ? { compliance } : workflow ? { workflow } : { steps: chosen };
    await post("/api/v1/runs", { target, ...what, flags: $("dry-run").checked ? 1 : 0, parallelism });
    $("dispatch-error").textContent = "";
  } catch (error) {
    $("dispatch-error").textContent = error.message;
  } finally {
    $("run-button").disabled = false;
  }
}
