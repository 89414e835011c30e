// The status page's live parts: rates and latency from /metrics, drift per version, reasons and
// routing with the admin token, and the one-row inference form. The credentials live in this
// script's memory only; they are sent as headers and never stored.
"use strict";

const REFRESH_MS = 3000;
let token = ""; // the admin token, sent as a bearer token to the repository endpoints
let apiKey = ""; // an API key, for inference, metadata, drift and /metrics when they need one
let previous = null; // the last scrape's request counts and its time

function headers(extra, admin) {
  const all = Object.assign({}, extra || {});
  if (apiKey && !admin) all["X-API-Key"] = apiKey;
  else if (token) all.Authorization = "Bearer " + token;
  return all;
}

// The page's periodic reads are marked so the server logs them at debug level, not info.
async function getJSON(path, options) {
  const merged = Object.assign({ headers: headers() }, options || {});
  if (!merged.method || merged.method === "GET") {
    merged.headers = Object.assign({ "X-Modelserve-Status-Page": "1" }, merged.headers);
  }
  const response = await fetch(path, merged);
  const body = await response.json();
  if (!response.ok) throw new Error(body.error || response.statusText);
  return body;
}

function element(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined) node.textContent = text;
  if (className) node.className = className;
  return node;
}

function parseLabels(text) {
  const labels = {};
  for (const match of text.matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)) labels[match[1]] = match[2];
  return labels;
}

// Prometheus text: request counts by (model, version), split into all and errors, and latency
// histogram buckets by (model, version) summed over protocols.
function parseMetrics(text) {
  const requests = {};
  const buckets = {};
  for (const line of text.split("\n")) {
    const match = line.match(/^(\w+)\{(.*)\} (\S+)$/);
    if (!match) continue;
    const [, name, rawLabels, rawValue] = match;
    const labels = parseLabels(rawLabels);
    const key = labels.model + "/" + labels.version;
    const value = Number(rawValue);
    if (name === "modelserve_requests_total") {
      const counts = (requests[key] = requests[key] || { all: 0, errors: 0 });
      counts.all += value;
      if (!labels.code.startsWith("2")) counts.errors += value;
    } else if (name === "modelserve_request_duration_seconds_bucket") {
      const byBound = (buckets[key] = buckets[key] || {});
      const bound = labels.le === "+Inf" ? Infinity : Number(labels.le);
      byBound[bound] = (byBound[bound] || 0) + value;
    }
  }
  return { requests, buckets, time: performance.now() };
}

// histogram_quantile's estimate: linear within the bucket the quantile falls in.
function quantile(q, byBound) {
  const bounds = Object.keys(byBound).map(Number).sort((a, b) => a - b);
  const total = byBound[Infinity] || 0;
  if (!total) return null;
  const rank = q * total;
  let lower = 0;
  let below = 0;
  for (const bound of bounds) {
    const count = byBound[bound];
    if (count >= rank) {
      if (bound === Infinity) return lower;
      return lower + ((bound - lower) * (rank - below)) / Math.max(count - below, 1e-9);
    }
    lower = bound;
    below = count;
  }
  return lower;
}

function milliseconds(seconds) {
  return seconds === null ? "" : (seconds * 1000).toFixed(1);
}

async function refreshRates() {
  if (document.body.dataset.metrics === "protected" && !token && !apiKey) return;
  const response = await fetch("/metrics", { headers: headers() });
  if (!response.ok) return;
  const now = parseMetrics(await response.text());
  for (const row of document.querySelectorAll("#model-rows tr")) {
    const key = row.dataset.model + "/" + row.dataset.version;
    const counts = now.requests[key] || { all: 0, errors: 0 };
    if (previous) {
      const before = previous.requests[key] || { all: 0, errors: 0 };
      const seconds = (now.time - previous.time) / 1000;
      row.querySelector(".rate").textContent = ((counts.all - before.all) / seconds).toFixed(2);
      row.querySelector(".errors").textContent = ((counts.errors - before.errors) / seconds).toFixed(2);
    }
    const byBound = now.buckets[key] || {};
    for (const [q, cell] of [[0.5, ".p50"], [0.95, ".p95"], [0.99, ".p99"]]) {
      row.querySelector(cell).textContent = milliseconds(quantile(q, byBound));
    }
  }
  previous = now;
}

function psiClass(psi) {
  if (psi === null) return "psi";
  if (psi < 0.1) return "psi ok";
  return psi <= 0.25 ? "psi warn" : "psi alert";
}

function driftTable(report) {
  const table = element("table");
  table.dataset.model = report.name;
  table.dataset.version = report.version;
  const caption = element("caption", `${report.name} version ${report.version}: ` +
    `${report.window_rows} of ${report.window_limit} rows`);
  table.append(caption);
  const head = element("tr");
  for (const title of ["Feature", "PSI", "Out of range", "Missing"]) head.append(element("th", title));
  table.append(head);
  const lines = report.features.map((f) => [f.name, f.psi, f.out_of_range, f.missing]);
  if (report.prediction) lines.push(["(prediction)", report.prediction.psi, "", ""]);
  for (const [name, psi, outside, missing] of lines) {
    const row = element("tr");
    row.append(element("td", name));
    row.append(element("td", psi === null ? "no rows yet" : psi.toFixed(3), psiClass(psi)));
    row.append(element("td", String(outside)));
    row.append(element("td", String(missing)));
    table.append(row);
  }
  return table;
}

async function refreshDrift() {
  const body = document.getElementById("drift-body");
  if (document.body.dataset.drift !== "on") {
    body.replaceChildren(element("p", "Drift is off (MODELSERVE_DRIFT_WINDOW_ROWS is 0).", "note"));
    return;
  }
  const tables = [];
  for (const row of document.querySelectorAll('#model-rows tr[data-drift="yes"]')) {
    const path = `/v2/models/${encodeURIComponent(row.dataset.model)}/versions/${row.dataset.version}/drift`;
    tables.push(driftTable(await getJSON(path)));
  }
  body.replaceChildren(...tables);
}

// With the admin token: every version with its state and reason, from the repository index.
async function refreshIndex() {
  const entries = await getJSON("/v2/repository/index", {
    method: "POST",
    headers: headers({ "Content-Type": "application/json" }, true),
    body: "{}",
  });
  const old = new Map();
  for (const row of document.querySelectorAll("#model-rows tr")) {
    old.set(row.dataset.model + "/" + row.dataset.version, row);
  }
  const rows = entries.map((entry) => {
    const version = entry.version || "";
    const existing = old.get(entry.name + "/" + version);
    const row = existing || element("tr");
    if (!existing) {
      row.dataset.model = entry.name;
      row.dataset.version = version;
      row.dataset.drift = "no";
      row.append(element("td", entry.name), element("td", version), element("td"));
      for (const name of ["reason", "rate", "errors", "p50", "p95", "p99"]) row.append(element("td", "", name));
    }
    const state = row.children[2];
    state.textContent = entry.state;
    state.className = "state " + entry.state.toLowerCase();
    row.querySelector(".reason").textContent = entry.reason;
    return row;
  });
  document.getElementById("model-rows").replaceChildren(...rows);
  return [...new Set(entries.map((entry) => entry.name))];
}

function describeRouting(name, routing) {
  const box = element("div", undefined, "routing");
  box.dataset.model = name;
  box.append(element("h3", name));
  const list = element("dl");
  const items = [
    ["Default version", routing.default_version === null ? "the newest" : String(routing.default_version)],
    ["Aliases", Object.entries(routing.aliases || {}).map(([a, v]) => `${a} → ${v}`).join(", ") || "none"],
    ["Traffic split", Object.entries(routing.traffic || {}).map(([v, w]) => `${v}: ${w}`).join(", ") || "none"],
    ["Shadow", routing.shadow ? `${routing.shadow.source} → ${routing.shadow.target} (${routing.shadow.fraction})` : "none"],
  ];
  for (const [term, value] of items) list.append(element("dt", term), element("dd", value));
  box.append(list);
  return box;
}

async function refreshRouting(names) {
  const boxes = [];
  for (const name of names) {
    const path = `/v2/repository/models/${encodeURIComponent(name)}/routing`;
    boxes.push(describeRouting(name, await getJSON(path, { headers: headers({}, true) })));
  }
  document.getElementById("routing-body").replaceChildren(...boxes);
  document.getElementById("routing").hidden = false;
}

// Models the server did not list (it needs a credential for that) join the form once known.
async function completeForm(names) {
  if (document.body.dataset.inference === "closed" && !apiKey) return;
  const select = document.getElementById("infer-model");
  const known = new Set([...select.options].map((option) => option.value));
  for (const name of names.filter((n) => !known.has(n))) {
    let metadata;
    try {
      metadata = await getJSON(`/v2/models/${encodeURIComponent(name)}`);
    } catch {
      continue; // not ready: nothing to send a row to
    }
    const option = element("option", name);
    option.value = name;
    option.dataset.input = metadata.inputs[0].name;
    option.dataset.datatype = metadata.inputs[0].datatype;
    option.dataset.features = (metadata.parameters.features || []).join(", ");
    select.append(option);
  }
  showFeatures();
}

// The admin parts: an API key (which the repository endpoints refuse) leaves them hidden.
async function refreshAdmin() {
  try {
    const names = await refreshIndex();
    await refreshRouting(names);
    await completeForm(names);
  } catch (error) {
    document.getElementById("routing").hidden = true;
    return "; reasons and routing need the admin token: " + error.message;
  }
  return "";
}

async function refresh() {
  const status = document.getElementById("updated");
  try {
    const admin = token ? await refreshAdmin() : "";
    await refreshRates();
    await refreshDrift();
    status.textContent = "updated " + new Date().toLocaleTimeString() + admin;
    status.className = admin ? "failed" : "";
  } catch (error) {
    status.textContent = "refresh failed: " + error.message;
    status.className = "failed";
  }
}

function showFeatures() {
  const option = document.getElementById("infer-model").selectedOptions[0];
  const row = document.getElementById("infer-row");
  row.placeholder = option ? option.dataset.features || "comma-separated numbers" : "";
}

async function infer(event) {
  event.preventDefault();
  const option = document.getElementById("infer-model").selectedOptions[0];
  const answer = document.getElementById("infer-answer");
  if (!option) return;
  const text = document.getElementById("infer-row").value;
  const values = text.split(",").map((cell) => Number(cell.trim()));
  const request = {
    inputs: [{ name: option.dataset.input, shape: [1, values.length], datatype: option.dataset.datatype, data: values }],
  };
  try {
    const response = await getJSON(`/v2/models/${encodeURIComponent(option.value)}/infer`, {
      method: "POST",
      headers: headers({ "Content-Type": "application/json" }),
      body: JSON.stringify(request),
    });
    answer.className = "";
    answer.textContent = `version ${response.model_version}\n` +
      response.outputs.map((output) => `${output.name}: ${JSON.stringify(output.data)}`).join("\n");
  } catch (error) {
    answer.className = "failed";
    answer.textContent = error.message;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("credential").addEventListener("submit", (event) => {
    event.preventDefault();
    token = document.getElementById("token").value.trim();
    apiKey = document.getElementById("api-key").value.trim();
    refresh();
  });
  document.getElementById("infer-model").addEventListener("change", showFeatures);
  document.getElementById("infer").addEventListener("submit", infer);
  showFeatures();
  // The next refresh is timed from the end of this one, so slow answers never pile up.
  const loop = () => refresh().finally(() => setTimeout(loop, REFRESH_MS));
  loop();
});
