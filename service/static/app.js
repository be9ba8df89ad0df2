// SKDCGN playground: the gateway's own API (GET /models, POST /counterfactual, /jobs) from one page.
// Plain JavaScript, no build step. Every error the server answers ({"error": "..."}) is shown in the page.
"use strict";

const MECHANISMS = ["shape", "texture", "background"]; // core/vocabulary.py's MECHANISMS
// double_colored_mnist: shape 3 in texture 2 (lime) on background 5 (burlywood) shows the digit clearly.
const DEFAULT_LABELS = { shape: 3, texture: 2, background: 5 };
const MODIFIERS = ["transparency", "rotation_deg", "noise_std"];
const KEY_STORAGE = "skdcgn.apiKey";
const ACTIVE = new Set(["queued", "running"]); // core/vocabulary.py's ACTIVE_STATES
const POLL_ACTIVE_MS = 1000;
const POLL_IDLE_MS = 5000;
const RENDER_DELAY_MS = 200;

const $ = (id) => document.getElementById(id);
const state = {
  models: [], defaultModel: null, renderSeq: 0, renderTimer: null, pollTimer: null, pollBusy: false,
  jobRows: new Map(), lastRenderBody: null,
};

// --- talking to the gateway -----------------------------------------------------------------------------------

class ApiError extends Error {}

function apiKey() {
  try { return localStorage.getItem(KEY_STORAGE) || ""; } catch (_) { return $("api-key").value; }
}

/** fetch() with the API key; throws ApiError carrying the server's {"error"} message on any non-2xx answer. */
async function api(path, { method = "GET", body, accept = "application/json" } = {}) {
  const headers = { Accept: accept };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const key = apiKey();
  if (key) headers["X-API-Key"] = key;
  let response;
  try {
    response = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  } catch (err) {
    throw new ApiError(`${method} ${path}: the gateway did not answer (${err.message})`);
  }
  if (!response.ok) {
    let message = response.statusText || "error";
    try {
      const data = await response.json();
      if (data && typeof data.error === "string") message = data.error;
    } catch (_) { /* not JSON: keep the status text */ }
    throw new ApiError(`${method} ${path} → ${response.status}: ${message}`);
  }
  return response;
}

/** Shows an error in the tab's error box; `source` is "poll" for the background polling of GET /jobs. */
function showError(where, err, source = "action") {
  const box = $(`${where}-error`);
  box.textContent = err instanceof Error ? err.message : String(err);
  box.dataset.source = source;
  box.hidden = false;
}

/** Hides the tab's error after a success; a poll's success hides only a poll's error, never an action's. */
function clearError(where, source = "action") {
  const box = $(`${where}-error`);
  if (source !== "poll" || box.dataset.source === "poll") box.hidden = true;
}

/** Saves a blob under a file name through a temporary link. */
function saveBlob(blob, name) {
  const url = URL.createObjectURL(blob);
  const link = document.createElement("a");
  link.href = url;
  link.download = name;
  document.body.appendChild(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60000);
}

// --- models and controls --------------------------------------------------------------------------------------

function family() {
  return state.models.find((model) => model.name === $("family").value);
}

/** The version the controls point at: the one chosen, else the family's LATEST (else its first servable one). */
function versionInfo() {
  const fam = family();
  if (!fam) return null;
  const chosen = $("version").value || fam.latest;
  return fam.versions.find((v) => v.version === chosen && v.labels)
    || fam.versions.find((v) => v.status === "available" && v.labels) || null;
}

function option(value, text, { disabled = false, title = "" } = {}) {
  const element = document.createElement("option");
  element.value = value;
  element.textContent = text;
  element.disabled = disabled;
  if (title) element.title = title;
  return element;
}

async function loadModels() {
  const data = await (await api("/models")).json();
  state.models = data.models || [];
  state.defaultModel = data.default_model;
  const select = $("family");
  select.replaceChildren(...state.models.map((model) => option(model.name, model.name)));
  if (state.models.some((model) => model.name === state.defaultModel)) select.value = state.defaultModel;
  fillVersions();
  if (!state.models.length) throw new ApiError("GET /models lists no model family: the model repository is empty");
}

function fillVersions() {
  const fam = family();
  const select = $("version");
  if (!fam) { select.replaceChildren(); fillLabels(); return; }
  const items = [option("", `latest${fam.latest ? ` (${fam.latest})` : ""}`)];
  for (const v of fam.versions) {
    const unavailable = v.status !== "available";
    items.push(option(v.version, `${v.version}${unavailable ? " (unavailable)" : ""}`,
      { disabled: unavailable, title: unavailable ? v.reason || "" : v.created || "" }));
  }
  select.replaceChildren(...items);
  fillLabels();
}

/** What the labels of a mechanism mean: its colour or texture names (GET /models `label_names`, from
 * core/vocabulary.py), else the class names of the manifest (`labels.names`). */
function labelNames(info, mechanism) {
  if (!info) return [];
  return (info.label_names && info.label_names[mechanism]) || info.labels.names || [];
}

/** Label k's name, "" when it has none but its number. */
function labelName(info, mechanism, k) {
  const name = labelNames(info, mechanism)[k];
  return name !== undefined && name !== String(k) ? name : "";
}

function fillLabels() {
  const info = versionInfo();
  const count = info ? info.labels.count : 0;
  for (const mechanism of MECHANISMS) {
    const select = $(mechanism);
    const previous = select.value === "" ? DEFAULT_LABELS[mechanism] : Number(select.value);
    const items = [];
    const named = [];
    for (let k = 0; k < count; k++) {
      const name = labelName(info, mechanism, k);
      items.push(option(String(k), name ? `${k} · ${name}` : String(k)));
      if (name) named.push(`${k} ${name}`);
    }
    select.replaceChildren(...items);
    if (count) select.value = String(Math.min(previous, count - 1));
    // The jobs tab takes label numbers: its field names them on hover (short tables only, not ImageNet's 1000).
    $(`job-${mechanism}`).title = named.length && count <= 32 ? named.join(", ") : "";
  }
  if (info) {
    const zoom = $("zoom");
    if (!zoom.dataset.touched) zoom.value = String(Math.max(1, Math.min(8, Math.round(128 / info.image_size))));
  }
  describeJobModel();
}

function modifierValues() {
  return Object.fromEntries(MODIFIERS.map((name) => [name, Number($(name).value)]));
}

function showModifierValues() {
  $("transparency-out").textContent = Number($("transparency").value).toFixed(2);
  $("rotation_deg-out").textContent = `${$("rotation_deg").value}°`;
  $("noise_std-out").textContent = Number($("noise_std").value).toFixed(2);
}

function integerField(id, name) {
  const text = $(id).value.trim();
  if (text === "") return null;
  const value = Number(text);
  if (!Number.isSafeInteger(value) || value < 0) throw new ApiError(`${name}: ${JSON.stringify(text)} is not a whole number ≥ 0`);
  return value;
}

/** The body of POST /counterfactual from the controls. */
function renderBody() {
  const body = { model: $("family").value };
  if ($("version").value) body.version = $("version").value;
  for (const mechanism of MECHANISMS) body[mechanism] = Number($(mechanism).value);
  body.n = integerField("n", "n") ?? 1;
  const seed = integerField("seed", "seed");
  if (seed !== null) body.seed = seed;
  body.mask = modifierValues();
  if ($("components").checked) body.return_components = true;
  return body;
}

function curlOf(body, accept) {
  const origin = window.location.origin;
  return `curl -s -X POST '${origin}/counterfactual${accept ? "?scale=" + $("zoom").value : ""}' \\\n`
    + "  -H 'Content-Type: application/json'"
    + (accept ? ` -H 'Accept: image/png' -o cf.png` : "")
    + (apiKey() ? " -H 'X-API-Key: …'" : "")
    + ` \\\n  -d '${JSON.stringify(body)}'`;
}

// --- rendering ------------------------------------------------------------------------------------------------

function scheduleRender() {
  clearTimeout(state.renderTimer);
  state.renderTimer = setTimeout(renderNow, RENDER_DELAY_MS);
}

function setPlayStatus(html, busy = false) {
  const status = $("play-status");
  status.innerHTML = "";
  const span = document.createElement("span");
  if (busy) span.className = "busy";
  span.innerHTML = html;
  status.appendChild(span);
}

function escapeHtml(text) {
  return String(text).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}

async function renderNow() {
  clearTimeout(state.renderTimer);
  const seq = ++state.renderSeq;
  let body;
  try {
    body = renderBody();
  } catch (err) {
    showError("play", err, "render");
    return;
  }
  if (!body.model) return;
  $("rows").classList.add("stale");
  setPlayStatus("Rendering…", true);
  const started = performance.now();
  try {
    const data = await (await api("/counterfactual", { method: "POST", body })).json();
    if (seq !== state.renderSeq) return; // a newer request superseded this one
    clearError("play", "render");
    if (body.seed === undefined) $("seed").value = String(data.seed); // the seed the server drew: reproducible
    state.lastRenderBody = { ...body, seed: data.seed };
    showImages(data);
    const ms = Math.round(performance.now() - started);
    setPlayStatus(`<b>${escapeHtml(data.model)}</b> ${escapeHtml(data.version)} · seed ${data.seed} · `
      + `${data.n} image${data.n === 1 ? "" : "s"} · ${data.cached ? "cached" : "rendered"} by `
      + `${escapeHtml(data.provider)} · ${ms} ms`);
    $("curl").textContent = curlOf(state.lastRenderBody, false);
  } catch (err) {
    if (seq !== state.renderSeq) return;
    showError("play", err, "render");
    setPlayStatus("The last request failed; the images below are from the one before.");
  } finally {
    if (seq === state.renderSeq) $("rows").classList.remove("stale");
  }
}

/** The mechanism whose output each component row shows. */
const COMPONENT_MECHANISM = { mask: "shape", texture: "texture", background: "background" };

function showImages(data) {
  const info = versionInfo();
  const size = (info ? info.image_size : 32) * Number($("zoom").value);
  const body = state.lastRenderBody || {};
  const rows = [["counterfactual", "images", data.images, ""]];
  if (data.components) {
    for (const [name, mechanism] of Object.entries(COMPONENT_MECHANISM)) {
      if (!data.components[name]) continue;
      rows.push([name, name, data.components[name], labelName(info, mechanism, body[mechanism])]);
    }
  }
  const container = $("rows");
  container.replaceChildren(...rows.map(([label, key, images, labelTitle]) => {
    const row = document.createElement("div");
    row.className = "row";
    row.dataset.row = key;
    const caption = document.createElement("div");
    caption.className = "row-label";
    caption.textContent = label;
    if (labelTitle) caption.appendChild(textDiv(labelTitle, "row-name")); // e.g. texture: lime
    const tiles = document.createElement("div");
    tiles.className = "tiles";
    images.forEach((b64, i) => {
      const img = document.createElement("img");
      img.className = "tile";
      img.src = `data:image/png;base64,${b64}`;
      img.width = size;
      img.height = size;
      img.alt = `${label} ${i}`;
      img.title = `sample ${i}`;
      tiles.appendChild(img);
    });
    row.append(caption, tiles);
    return row;
  }));
}

async function downloadPng() {
  try {
    const body = renderBody();
    const nrow = Math.min(body.n, 8);
    const response = await api(`/counterfactual?scale=${$("zoom").value}&nrow=${nrow}`,
      { method: "POST", body, accept: "image/png" });
    const seed = response.headers.get("X-Seed") ?? body.seed;
    saveBlob(await response.blob(), `counterfactual_${body.shape}-${body.texture}-${body.background}_seed${seed}.png`);
    clearError("play");
  } catch (err) {
    showError("play", err);
  }
}

// --- jobs -----------------------------------------------------------------------------------------------------

function describeJobModel() {
  const m = modifierValues();
  $("job-model").textContent = `${$("family").value || "?"} ${$("version").value || "(latest)"}, `
    + `mask a=${m.transparency} r=${m.rotation_deg}° σ=${m.noise_std}`;
}

/** "0, 2, 5-7" → [0, 2, 5, 6, 7]; empty → null (every label). */
function parseLabels(text, mechanism) {
  const trimmed = text.trim();
  if (!trimmed) return null;
  const labels = [];
  for (const part of trimmed.split(",").map((p) => p.trim()).filter(Boolean)) {
    const range = part.match(/^(\d+)\s*-\s*(\d+)$/);
    if (range) {
      const [low, high] = [Number(range[1]), Number(range[2])];
      if (high < low || high - low > 100000) throw new ApiError(`labels.${mechanism}: ${part} is not a range low-high`);
      for (let k = low; k <= high; k++) labels.push(k);
    } else if (/^\d+$/.test(part)) {
      labels.push(Number(part));
    } else {
      throw new ApiError(`labels.${mechanism}: ${JSON.stringify(part)} is not a label number or range`);
    }
  }
  return labels;
}

async function createJob(event) {
  event.preventDefault();
  const button = $("create-job");
  button.disabled = true;
  try {
    const body = { model: $("family").value, n: integerField("job-n", "n") ?? 1, format: $("job-format").value };
    if ($("version").value) body.version = $("version").value;
    const seed = integerField("job-seed", "seed");
    if (seed !== null) body.seed = seed;
    const labels = {};
    for (const mechanism of MECHANISMS) {
      const chosen = parseLabels($(`job-${mechanism}`).value, mechanism);
      if (chosen) labels[mechanism] = chosen;
    }
    if (Object.keys(labels).length) body.labels = labels;
    body.mask = modifierValues();
    const job = await (await api("/jobs", { method: "POST", body })).json();
    clearError("jobs");
    $("jobs-status").textContent = `Job ${job.id.slice(0, 8)} queued: ${job.progress.total} samples, seed ${job.seed}.`;
    await refreshJobs();
  } catch (err) {
    showError("jobs", err);
  } finally {
    button.disabled = false;
  }
}

function humanBytes(bytes) {
  if (bytes < 1024) return `${bytes} B`;
  const units = ["KiB", "MiB", "GiB", "TiB"];
  let value = bytes / 1024, unit = 0;
  while (value >= 1024 && unit < units.length - 1) { value /= 1024; unit++; }
  return `${value.toFixed(value < 10 ? 1 : 0)} ${units[unit]}`;
}

/** The job's result files: each file the server lists, or the data files from result_url and shards. */
function downloadsOf(job) {
  if (job.files && job.files.length) {
    return job.files.map((file) => ({ url: file.url, name: file.name, label: `${file.name} (${humanBytes(file.bytes)})` }));
  }
  if (!job.result_url) return [];
  const suffix = job.format === "npz" ? "npz" : "tar";
  if (job.shards <= 1) return [{ url: job.result_url, name: `${job.id}.${suffix}`, label: `result.${suffix}` }];
  return Array.from({ length: job.shards }, (_, i) => ({
    url: `${job.result_url}?shard=${i}`, name: `${job.id}-${String(i).padStart(5, "0")}.${suffix}`, label: `shard ${i}`,
  }));
}

/** A download link; with an API key the file is fetched with the X-API-Key header (a plain link cannot send it). */
function downloadLink(item) {
  const link = document.createElement("a");
  link.href = item.url;
  link.download = item.name;
  link.textContent = `⤓ ${item.label}`;
  link.className = "download";
  link.addEventListener("click", async (event) => {
    if (!apiKey()) return;
    event.preventDefault();
    try {
      saveBlob(await (await api(item.url, { accept: "*/*" })).blob(), item.name);
    } catch (err) {
      showError("jobs", err);
    }
  });
  return link;
}

async function jobAction(job) {
  const active = ACTIVE.has(job.state);
  if (!active && !window.confirm(`Delete job ${job.id.slice(0, 8)} and its result files?`)) return;
  try {
    await api(`/jobs/${job.id}`, { method: "DELETE" });
    clearError("jobs");
    $("jobs-status").textContent = `Job ${job.id.slice(0, 8)} ${active ? "cancelled" : "deleted"}.`;
  } catch (err) {
    showError("jobs", err);
  }
  await refreshJobs();
}

function textDiv(text, className = "") {
  const div = document.createElement("div");
  div.textContent = text;
  if (className) div.className = className;
  return div;
}

/** A job's creation time: the time of day when it is today, else the date and time. */
function when(iso) {
  const date = new Date(iso);
  if (Number.isNaN(date.getTime())) return iso;
  const today = date.toDateString() === new Date().toDateString();
  return today ? date.toLocaleTimeString() : date.toLocaleString([], { dateStyle: "short", timeStyle: "short" });
}

function cell(className = "") {
  const td = document.createElement("td");
  if (className) td.className = className;
  return td;
}

/** One table row per job, updated in place so that a click is never lost to a redraw. */
function jobRow(job) {
  let entry = state.jobRows.get(job.id);
  if (!entry) {
    const tr = document.createElement("tr");
    tr.dataset.job = job.id;
    const cells = { id: cell(), model: cell(), progress: cell(), state: cell(), actions: cell("actions-cell") };
    cells.id.append(textDiv(job.id.slice(0, 8), "mono"), textDiv(when(job.created), "sub"));
    cells.id.title = `${job.id}, created ${job.created}`;
    cells.model.append(textDiv(job.model), textDiv(`${job.version} · ${job.format} · seed ${job.seed}`, "sub"));
    cells.progress.innerHTML = '<div class="progress"><div class="bar"><span></span></div><span class="count"></span></div>';
    tr.append(...Object.values(cells));
    entry = { tr, cells, signature: "" };
    state.jobRows.set(job.id, entry);
  }
  const signature = JSON.stringify([job.state, job.progress, job.error, job.files, job.shards]);
  if (signature !== entry.signature) {
    entry.signature = signature;
    const { done, total } = job.progress;
    const bar = entry.cells.progress.querySelector(".bar");
    bar.className = `bar ${job.state}`;
    bar.firstElementChild.style.width = `${total ? (100 * done) / total : 0}%`;
    entry.cells.progress.querySelector(".count").textContent = `${done} / ${total}`;
    entry.tr.dataset.state = job.state;
    const badge = document.createElement("span");
    badge.className = `state ${job.state}`;
    badge.textContent = job.state;
    entry.cells.state.replaceChildren(badge);
    if (job.error) {
      const error = document.createElement("div");
      error.className = "job-error";
      error.textContent = job.error;
      entry.cells.state.appendChild(error);
    }
    const actions = [];
    if (job.state === "succeeded") {
      const downloads = document.createElement("div");
      downloads.className = "downloads";
      downloads.append(...downloadsOf(job).map(downloadLink));
      actions.push(downloads);
    }
    const button = document.createElement("button");
    button.type = "button";
    const active = ACTIVE.has(job.state);
    button.className = active ? "small danger" : "small secondary";
    button.textContent = active ? "Cancel" : "Delete";
    button.title = active ? `DELETE /jobs/${job.id}: stop it` : `DELETE /jobs/${job.id}: remove it and its files`;
    button.addEventListener("click", () => jobAction(job));
    actions.push(button);
    entry.cells.actions.replaceChildren(...actions);
  }
  return entry.tr;
}

function showJobs(jobs) {
  const body = $("jobs-body");
  const rows = jobs.map(jobRow);
  const listed = new Set(jobs.map((job) => job.id));
  for (const [id, entry] of state.jobRows) {
    if (!listed.has(id)) { entry.tr.remove(); state.jobRows.delete(id); }
  }
  rows.forEach((tr, i) => { if (body.children[i] !== tr) body.insertBefore(tr, body.children[i] || null); });
  $("jobs-empty").hidden = jobs.length > 0;
  $("jobs-table").hidden = jobs.length === 0;
  const active = jobs.filter((job) => ACTIVE.has(job.state)).length;
  const badge = $("jobs-badge");
  badge.hidden = active === 0;
  badge.textContent = `${active} running`;
  return active;
}

function jobsVisible() {
  return !$("panel-jobs").hidden;
}

/** GET /jobs; polls again soon while a job is queued or running, slowly while the tab is open, else stops. */
async function refreshJobs() {
  clearTimeout(state.pollTimer);
  if (state.pollBusy) return;
  state.pollBusy = true;
  let active = 0;
  try {
    const data = await (await api("/jobs?limit=50")).json();
    active = showJobs(data.jobs);
    clearError("jobs", "poll");
  } catch (err) {
    if (jobsVisible()) showError("jobs", err, "poll");
  } finally {
    state.pollBusy = false;
  }
  const delay = active ? POLL_ACTIVE_MS : jobsVisible() ? POLL_IDLE_MS : 0;
  if (delay) state.pollTimer = setTimeout(refreshJobs, delay);
}

// --- tabs, key and wiring -------------------------------------------------------------------------------------

function selectTab(button) {
  for (const tab of document.querySelectorAll('[role="tab"]')) {
    const selected = tab === button;
    tab.setAttribute("aria-selected", String(selected));
    $(tab.dataset.panel).hidden = !selected;
  }
  if (button.id === "tab-jobs") { describeJobModel(); refreshJobs(); }
}

function wire() {
  for (const tab of document.querySelectorAll('[role="tab"]')) tab.addEventListener("click", () => selectTab(tab));

  const key = $("api-key");
  key.value = apiKey();
  key.addEventListener("change", () => {
    try { localStorage.setItem(KEY_STORAGE, key.value.trim()); } catch (_) { /* storage disabled */ }
    start(); // the key may unlock models, renders and jobs
  });

  $("family").addEventListener("change", () => { $("version").value = ""; fillVersions(); scheduleRender(); });
  $("version").addEventListener("change", () => { fillLabels(); scheduleRender(); });
  for (const id of [...MECHANISMS, "n", "seed", "components"]) $(id).addEventListener("change", scheduleRender);
  for (const name of MODIFIERS) {
    $(name).addEventListener("input", () => { showModifierValues(); describeJobModel(); scheduleRender(); });
  }
  $("zoom").addEventListener("change", () => {
    $("zoom").dataset.touched = "1";
    const size = (versionInfo()?.image_size ?? 32) * Number($("zoom").value);
    for (const img of document.querySelectorAll("img.tile")) { img.width = size; img.height = size; }
  });
  $("new-seed").addEventListener("click", () => {
    $("seed").value = String(crypto.getRandomValues(new Uint32Array(1))[0]);
    renderNow();
  });
  $("controls").addEventListener("submit", (event) => { event.preventDefault(); renderNow(); });
  $("download-png").addEventListener("click", downloadPng);
  $("job-form").addEventListener("submit", createJob);
  showModifierValues();
}

async function start() {
  try {
    await loadModels();
    clearError("play", "models");
    await renderNow();
  } catch (err) {
    showError("play", err, "models");
    setPlayStatus("");
  }
  refreshJobs(); // shows the badge when jobs are running, and keeps polling while they do
}

wire();
start();
