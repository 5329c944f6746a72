// The re-ID console: plain JavaScript over the service's own API (no framework, no build step).
// Everything a user or the gallery wrote (identities, cameras, metadata) is put on the page as text
// (textContent), never as HTML. The API key lives in this tab's sessionStorage and travels only in the
// X-API-Key header; thumbnails are fetched with it and shown as blob: URLs, since an <img src> request
// could not carry the header.
"use strict";

const KEY_STORAGE = "reid-console-api-key";
const $ = (selector, root = document) => root.querySelector(selector);

const state = {
  key: sessionStorage.getItem(KEY_STORAGE) || "",
  groups: {}, // attribute group -> classes, from GET /models
  queryFile: null,
  browseOffset: 0,
  browseNext: null,
  statsTimer: null,
};

class ApiError extends Error {
  constructor(status, detail) {
    super(detail);
    this.status = status;
  }
}

// -- talking to the API ------------------------------------------------------------------------------

async function api(path, { method = "GET", body = null, raw = false } = {}) {
  const headers = {};
  if (state.key) headers["X-API-Key"] = state.key;
  const response = await fetch(path, { method, body, headers, cache: "no-store" });
  if (response.status === 401) {
    askForKey(state.key ? "That key was refused: type a valid one." : null);
    throw new ApiError(401, "this service needs an API key");
  }
  if (!response.ok) {
    let detail = `${response.status} ${response.statusText}`;
    try {
      detail = (await response.json()).detail || detail;
    } catch (_) {
      /* not JSON: keep the status line */
    }
    throw new ApiError(response.status, detail);
  }
  return raw ? response : response.json();
}

function askForKey(message) {
  $("#key-form").hidden = false;
  const help = $("#key-help");
  help.hidden = false;
  if (message) help.textContent = message;
  $("#api-key").focus();
}

function toast(text, kind = "info") {
  const box = $("#toast");
  box.textContent = text;
  box.dataset.kind = kind;
  box.hidden = false;
  clearTimeout(box.timer);
  box.timer = setTimeout(() => (box.hidden = true), kind === "error" ? 8000 : 4000);
}

function fail(error) {
  if (error instanceof ApiError && error.status === 401) return;
  toast(error.message || String(error), "error");
}

// -- thumbnails --------------------------------------------------------------------------------------

// Object URLs of each result list, revoked when the list is replaced (they hold the image bytes).
const objectUrls = new WeakMap();

function releaseImages(container) {
  for (const url of objectUrls.get(container) || []) URL.revokeObjectURL(url);
  objectUrls.set(container, []);
}

async function showImage(img, imageUrl, container) {
  const response = await api(imageUrl, { raw: true });
  const url = URL.createObjectURL(await response.blob());
  objectUrls.get(container).push(url);
  img.src = url;
}

// -- result cards ------------------------------------------------------------------------------------

function formatTime(text) {
  if (!text) return "";
  const moment = new Date(text);
  return moment.toISOString().slice(0, 16).replace("T", " ") + " UTC";
}

function card(item, container, { score = null, isMatch = null } = {}) {
  const node = $("#card").content.firstElementChild.cloneNode(true);
  const id = item.entry_id ?? item.id;
  node.dataset.entryId = id;
  node.dataset.identity = item.identity ?? "";
  node.dataset.collection = item.collection;
  const img = $(".thumb img", node);
  img.alt = `entry ${id}`;
  if (item.image_url) {
    showImage(img, item.image_url, container).catch(() => ($(".no-image", node).hidden = false));
  } else {
    img.hidden = true;
    $(".no-image", node).hidden = false;
  }
  const badge = $(".badge", node);
  if (score !== null) {
    badge.textContent = isMatch ? "match" : "no match";
    badge.classList.add(isMatch ? "match" : "no-match");
    $(".score", node).textContent = score.toFixed(3);
  } else {
    badge.textContent = item.searchable === false ? "not searchable" : `#${id}`;
    if (item.searchable === false) badge.classList.add("no-match");
    if (item.status) $(".score", node).textContent = item.status;
  }
  $(".identity", node).textContent = item.identity || "unknown identity";
  const where = [item.camera_id, formatTime(item.captured_at), item.track_id && `track ${item.track_id}`];
  $(".where", node).textContent = where.filter(Boolean).join(" · ") || "no camera or time";
  const chips = $(".chips", node);
  for (const [group, { value, score: p }] of Object.entries(item.attributes || {})) {
    const chip = document.createElement("li");
    chip.textContent = `${group.replaceAll("_", " ")}: ${value}`;
    chip.title = `probability ${p.toFixed(2)}`;
    chips.append(chip);
  }
  $(".delete", node).addEventListener("click", () => deleteEntry(id));
  const erase = $(".erase", node);
  if (item.identity) erase.addEventListener("click", () => eraseIdentity(item.identity, item.collection));
  else erase.hidden = true;
  return node;
}

function fill(container, items, options = () => ({})) {
  releaseImages(container);
  container.replaceChildren(...items.map((item) => card(item, container, options(item))));
}

function removeCards(predicate) {
  for (const node of document.querySelectorAll(".card")) {
    if (predicate(node)) node.remove();
  }
}

// -- actions on entries ------------------------------------------------------------------------------

async function deleteEntry(id) {
  if (!confirm(`Delete entry ${id} (its embedding, attributes and stored crop)?`)) return;
  try {
    await api(`/gallery/${id}`, { method: "DELETE" });
    removeCards((node) => node.dataset.entryId === String(id));
    toast(`Entry ${id} deleted.`);
    refreshStats();
  } catch (error) {
    fail(error);
  }
}

async function eraseIdentity(identity, collection) {
  if (!confirm(`Erase "${identity}": every entry of this identity in collection "${collection}"?`)) return;
  try {
    const params = new URLSearchParams({ identity, collection });
    const result = await api(`/gallery?${params}`, { method: "DELETE" });
    removeCards((node) => node.dataset.identity === identity && node.dataset.collection === collection);
    toast(`Erased "${identity}": ${result.deleted} entries deleted.`);
    refreshStats();
  } catch (error) {
    fail(error);
  }
}

// -- search ------------------------------------------------------------------------------------------

function utc(localValue) {
  // datetime-local has no zone ("2024-05-01T12:30"); the labels say UTC, so it is sent as UTC.
  return localValue ? `${localValue}Z` : "";
}

function chooseQuery(file) {
  if (!file) return;
  if (!file.type.startsWith("image/") && file.type !== "") {
    toast(`${file.name} is not an image.`, "error");
    return;
  }
  state.queryFile = file;
  const preview = $("#query-preview");
  if (preview.src) URL.revokeObjectURL(preview.src);
  preview.src = URL.createObjectURL(file);
  preview.hidden = false;
  $("#drop-text").textContent = file.name;
  search();
}

async function search() {
  if (!state.queryFile) {
    toast("Drop or choose a crop first.", "error");
    return;
  }
  const form = $("#search-form");
  const values = new FormData(form);
  const body = new FormData();
  body.append("image", state.queryFile, state.queryFile.name);
  body.append("collection", values.get("collection") || "default");
  body.append("top_k", values.get("top_k") || "20");
  for (const camera of (values.get("cameras") || "").split(",")) {
    if (camera.trim()) body.append("camera_id", camera.trim());
  }
  for (const name of ["captured_after", "captured_before"]) {
    if (values.get(name)) body.append(name, utc(values.get(name)));
  }
  for (const select of form.querySelectorAll("#attribute-filters select")) {
    if (select.value) body.append("attribute", `${select.name}=${select.value}`);
  }
  if (values.get("group_by_identity")) body.append("group_by", "identity");
  const summary = $("#search-summary");
  summary.textContent = "Searching…";
  try {
    const result = await api("/reid/query", { method: "POST", body });
    const matches = result.matches;
    const threshold = result.model.match_threshold;
    summary.textContent =
      `${matches.length} of ${result.candidates} candidates` +
      (threshold !== null ? ` · match at score ≥ ${threshold.toFixed(3)}` : "") +
      ` · ${result.model.name} ${result.model.version}`;
    fill($("#search-results"), matches, (m) => ({ score: m.score, isMatch: m.is_match }));
  } catch (error) {
    summary.textContent = "";
    fail(error);
  }
}

function buildAttributeFilters() {
  const box = $("#attribute-filters");
  box.replaceChildren(box.querySelector("legend") || document.createElement("legend"));
  $("legend", box).textContent = "Attributes";
  for (const [group, classes] of Object.entries(state.groups)) {
    const label = document.createElement("label");
    label.textContent = group.replaceAll("_", " ") + " ";
    const select = document.createElement("select");
    select.name = group;
    select.append(new Option("any", ""));
    for (const value of classes) select.append(new Option(value, value));
    label.append(select);
    box.append(label);
  }
}

// -- browse ------------------------------------------------------------------------------------------

async function browse(offset = 0) {
  const values = new FormData($("#browse-form"));
  const params = new URLSearchParams({ limit: values.get("limit") || "48", offset: String(offset) });
  for (const name of ["collection", "identity", "camera_id"]) {
    if (values.get(name)) params.set(name, values.get(name));
  }
  try {
    const page = await api(`/gallery?${params}`);
    state.browseOffset = offset;
    state.browseNext = page.next_offset;
    const last = offset + page.items.length;
    $("#browse-summary").textContent = page.total
      ? `${offset + 1}–${last} of ${page.total}`
      : "No entries.";
    $("#browse-prev").disabled = offset === 0;
    $("#browse-next").disabled = page.next_offset === null;
    fill($("#browse-results"), page.items);
  } catch (error) {
    fail(error);
  }
}

// -- enroll ------------------------------------------------------------------------------------------

async function enroll(event) {
  event.preventDefault();
  const form = event.target;
  const values = new FormData(form);
  const body = new FormData();
  for (const file of form.elements.images.files) body.append("images", file, file.name);
  for (const name of ["identity", "camera_id", "track_id", "collection", "metadata"]) {
    if (values.get(name)) body.append(name, values.get(name));
  }
  if (values.get("captured_at")) body.append("captured_at", utc(values.get("captured_at")));
  try {
    const result = await api("/gallery", { method: "POST", body });
    $("#enroll-summary").textContent =
      `${result.created} created, ${result.existing} already enrolled, in "${result.collection}".`;
    fill($("#enroll-results"), result.entries);
    form.elements.images.value = "";
    refreshStats();
  } catch (error) {
    fail(error);
  }
}

// -- status line and re-embedding --------------------------------------------------------------------

async function refreshStats() {
  let stats;
  try {
    stats = await api("/gallery/stats");
  } catch (error) {
    fail(error);
    return;
  }
  const run = stats.reembed;
  let text = `${stats.searchable} of ${stats.entries} entries searchable`;
  if (run && run.state === "running") {
    text += ` · re-embedding ${run.processed}/${run.total} (${Math.round(run.crops_per_second)} crops/s)`;
  } else if (stats.outdated) {
    text += ` · ${stats.outdated} made by other bundles`;
    if (stats.outdated_without_image) text += ` (${stats.outdated_without_image} without a stored crop)`;
  }
  $("#gallery-status").textContent = text;
  const reembed = $("#reembed");
  reembed.hidden = !(stats.outdated > stats.outdated_without_image) || (run && run.state === "running");
  const list = $("#collections");
  list.replaceChildren(...Object.keys(stats.collections).map((name) => new Option(name)));
  clearTimeout(state.statsTimer);
  if (run && run.state === "running") state.statsTimer = setTimeout(refreshStats, 2000);
}

async function startReembed() {
  try {
    const result = await api("/admin/reembed", { method: "POST" });
    toast(result.started ? "Re-embedding started." : "A re-embedding run is already going.");
    refreshStats();
  } catch (error) {
    fail(error);
  }
}

// -- wiring ------------------------------------------------------------------------------------------

function showTab(name) {
  for (const tab of document.querySelectorAll("[role=tab]")) {
    tab.setAttribute("aria-selected", String(tab.dataset.tab === name));
  }
  for (const panel of document.querySelectorAll("[role=tabpanel]")) {
    panel.hidden = panel.id !== `tab-${name}`;
  }
  if (name === "browse") browse(state.browseOffset);
}

async function start() {
  try {
    const models = await api("/models");
    state.groups = models.attributes.groups || {};
    buildAttributeFilters();
    $("#key-form").hidden = !state.key;
    $("#key-help").hidden = true;
    refreshStats();
  } catch (error) {
    fail(error);
  }
}

function wire() {
  for (const tab of document.querySelectorAll("[role=tab]")) {
    tab.addEventListener("click", () => showTab(tab.dataset.tab));
  }
  $("#key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    state.key = $("#api-key").value.trim();
    sessionStorage.setItem(KEY_STORAGE, state.key);
    start();
  });
  const drop = $("#drop");
  for (const name of ["dragenter", "dragover"]) {
    drop.addEventListener(name, (event) => {
      event.preventDefault();
      drop.classList.add("over");
    });
  }
  for (const name of ["dragleave", "drop"]) {
    drop.addEventListener(name, () => drop.classList.remove("over"));
  }
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    chooseQuery(event.dataTransfer.files[0]);
  });
  drop.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") $("#search-file").click();
  });
  $("#search-file").addEventListener("change", (event) => chooseQuery(event.target.files[0]));
  $("#search-form").addEventListener("submit", (event) => {
    event.preventDefault();
    search();
  });
  $("#browse-form").addEventListener("submit", (event) => {
    event.preventDefault();
    browse(0);
  });
  $("#browse-prev").addEventListener("click", () => {
    const limit = Number(new FormData($("#browse-form")).get("limit") || 48);
    browse(Math.max(0, state.browseOffset - limit));
  });
  $("#browse-next").addEventListener("click", () => state.browseNext !== null && browse(state.browseNext));
  $("#enroll-form").addEventListener("submit", enroll);
  $("#reembed").addEventListener("click", startReembed);
  for (const container of document.querySelectorAll(".cards")) objectUrls.set(container, []);
  // A file dropped beside the drop zone would make the browser open it and leave the console.
  for (const name of ["dragover", "drop"]) window.addEventListener(name, (event) => event.preventDefault());
}

wire();
start();
