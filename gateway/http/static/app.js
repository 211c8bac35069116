// Sluice's page: drop files, watch each one move through the pipeline, list jobs, search.
// Plain ES module, no build step; every text from the server goes into the DOM as text.

// A browser opens at most 6 HTTP/1.1 connections to one host. Uploads and live event
// streams share 4 of them, so a 500-file drop never opens 500 requests and the jobs list,
// search and retry always have a connection of their own.
const SLOTS = 4;
// A stream holds its slot at most this long while other rows wait for one; then it goes to
// the back of the line, so a stuck job cannot starve the rest.
const SLICE_MS = 15_000;
const KEY_STORE = "sluice.apiKey";
// The collection last uploaded to or searched, and the ones used before it (this browser).
const COLLECTION_STORE = "sluice.collection";
const RECENT_STORE = "sluice.recentCollections";
const RECENT_KEPT = 20;
const COLLECTION_PATTERN = /^[a-z0-9][a-z0-9_-]{0,62}$/;
// How often the pipeline panel asks for `/v1/pipeline` (the gateway samples every 2 s).
const PIPELINE_POLL_MS = 2000;
const LANE_NAMES = ["interactive", "bulk"];
const SVG = "http://www.w3.org/2000/svg";
const TERMINAL = new Set(["indexed", "failed"]);
// Stages whose progress a job counts in chunks (the API's progress fields), and the word for it.
const CHUNK_PROGRESS = {
  embed: { field: "chunks_embedded", done: "embedded" },
  index: { field: "chunks_indexed", done: "indexed" },
};
const STOP_WORDS = new Set(
  "the and for are but not you all any can had her was one our out has his how its may who did yet from that this with have into than then them they what when where which while will your been were".split(" "),
);

const $ = (id) => document.getElementById(id);
// The pipeline's stages and statuses come with the config, so an added stage shows up here.
let config = {
  auth_required: false,
  jaeger_ui_url: null,
  rabbitmq_ui_url: null,
  stages: [],
  statuses: [],
};
// A stage's job status → the stage, with its share of the progress bar (from `config.stages`).
let stageAt = new Map();

// ---- small helpers ------------------------------------------------------------------

/** An element with properties, attributes (`attrs`) and children (nodes or strings). */
function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  const { attrs = {}, ...rest } = props;
  Object.assign(node, rest);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
  node.append(...children.filter((c) => c !== null && c !== undefined && c !== false));
  return node;
}

const plural = (n, noun) => `${n} ${noun}${n === 1 ? "" : "s"}`;
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** Runs async tasks at most `size` at a time, first come first served. */
class Pool {
  constructor(size) {
    this.size = size;
    this.running = 0;
    this.queue = [];
  }

  get waiting() {
    return this.queue.length;
  }

  run(task) {
    return new Promise((resolve, reject) => {
      this.queue.push({ task, resolve, reject });
      this.#next();
    });
  }

  #next() {
    while (this.running < this.size && this.queue.length > 0) {
      const { task, resolve, reject } = this.queue.shift();
      this.running += 1;
      Promise.resolve()
        .then(task)
        .then(resolve, reject)
        .finally(() => {
          this.running -= 1;
          this.#next();
        });
    }
  }
}

const slots = new Pool(SLOTS);

// ---- the API, with the key asked for once on a 401 ----------------------------------

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

/** The gateway's `error.message` of a failed answer, as an ApiError. */
async function errorOf(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    // Not JSON (a proxy's page): fall back to the status line.
  }
  const error = body?.error ?? {};
  return new ApiError(
    response.status,
    error.code ?? "http_error",
    error.message ?? `The gateway answered ${response.status} ${response.statusText}.`,
  );
}

const auth = { key: sessionStorage.getItem(KEY_STORE), asking: null };

function authHeaders(headers = {}) {
  const all = new Headers(headers);
  if (auth.key) all.set("Authorization", `Bearer ${auth.key}`);
  return all;
}

/** fetch() with the session's key; on a 401 asks for a key (once for all callers) and retries. */
async function api(path, init = {}) {
  for (;;) {
    const keyUsed = auth.key;
    const response = await fetch(path, { ...init, headers: authHeaders(init.headers) });
    if (response.status !== 401) return response;
    if (!(await askForKey(keyUsed))) throw await errorOf(response);
  }
}

/** Resolves true once a key other than `keyUsed` is set; false if the person dismissed the form. */
function askForKey(keyUsed) {
  if (auth.key !== keyUsed) return Promise.resolve(true);
  if (auth.asking) return auth.asking;
  const dialog = $("key-dialog");
  $("key-reason").textContent = keyUsed
    ? "That API key was not accepted. Enter a valid one; it is kept in this browser tab only."
    : "This gateway asks for an API key. It is kept in this browser tab only.";
  $("key-input").value = "";
  auth.asking = new Promise((resolve) => {
    const onSubmit = async (event) => {
      // Closed by hand once the links that need the key are loaded, so rows drawn after
      // the retried calls can already link to their traces.
      event.preventDefault();
      const key = $("key-input").value.trim();
      if (!key) return;
      auth.key = key;
      sessionStorage.setItem(KEY_STORE, key);
      await loadConfig();
      dialog.close();
    };
    // Also when dismissed with Escape: the waiting calls then fail with the gateway's 401.
    const onClose = () => finish(auth.key !== keyUsed);
    const finish = (given) => {
      $("key-form").removeEventListener("submit", onSubmit);
      dialog.removeEventListener("close", onClose);
      auth.asking = null;
      resolve(given);
    };
    $("key-form").addEventListener("submit", onSubmit);
    dialog.addEventListener("close", onClose);
    dialog.showModal();
  });
  return auth.asking;
}

async function loadConfig() {
  try {
    const response = await fetch("/v1/config", { headers: authHeaders() });
    if (response.ok) config = await response.json();
  } catch {
    // The page still works without the operator links.
  }
  stageAt = stagesByStatus(config.stages ?? []);
  renderToolLinks();
  renderStatusFilter();
}

/** Each job status of a stage → the stage and its part of the progress bar: an equal share. */
function stagesByStatus(stages) {
  const share = 1 / Math.max(stages.length, 1);
  return new Map(stages.map((stage, i) => [stage.status, { ...stage, start: i * share, share }]));
}

/** The jobs filter offers this pipeline's statuses, keeping the one chosen. */
function renderStatusFilter() {
  if (!config.statuses?.length) return;
  const select = $("filter-status");
  const chosen = select.value;
  select.replaceChildren(
    el("option", { value: "", textContent: "any" }),
    ...config.statuses.map((status) => el("option", { textContent: status })),
  );
  select.value = chosen;
}

function renderToolLinks() {
  const links = [
    ["RabbitMQ management", config.rabbitmq_ui_url],
    ["Jaeger traces", config.jaeger_ui_url],
  ].filter(([, url]) => url);
  $("tool-links").replaceChildren(
    ...links.map(([text, url]) => el("li", {}, el("a", { href: url, textContent: text }))),
  );
}

function traceUrl(job) {
  if (!config.jaeger_ui_url || !job.trace_id) return null;
  return `${config.jaeger_ui_url.replace(/\/+$/, "")}/trace/${encodeURIComponent(job.trace_id)}`;
}

// ---- the live event stream, read with fetch() so it can carry the key ---------------

/** Calls `onEvent(type, data)` for each server-sent event until the stream ends. */
async function readEvents(response, onEvent) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = /\r\n\r\n|\n\n|\r\r/.exec(buffer))) {
      const block = buffer.slice(0, end.index);
      buffer = buffer.slice(end.index + end[0].length);
      let type = "message";
      const data = [];
      for (const line of block.split(/\r\n|\r|\n/)) {
        if (line === "" || line.startsWith(":")) continue; // a keepalive comment
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        const text = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
        if (field === "event") type = text;
        else if (field === "data") data.push(text);
      }
      if (data.length > 0) onEvent(type, data.join("\n"));
    }
  }
}

/** Shows a job's events on its row while holding a slot; "ended", "sliced" or "broken". */
async function streamJob(row) {
  const controller = new AbortController();
  const started = Date.now();
  const timer = setInterval(() => {
    if (slots.waiting > 0 && Date.now() - started > SLICE_MS) controller.abort();
  }, 1000);
  let job = null;
  try {
    const path = `/v1/jobs/${encodeURIComponent(row.jobId)}/events`;
    const response = await api(path, { signal: controller.signal });
    if (!response.ok) throw await errorOf(response);
    await readEvents(response, (type, data) => {
      if (type !== "status") return;
      job = JSON.parse(data);
      row.show(job);
    });
  } catch (error) {
    if (controller.signal.aborted) return "sliced";
    if (error instanceof ApiError) throw error;
    return "broken"; // the network or the gateway went away: try again later
  } finally {
    clearInterval(timer);
  }
  return job && TERMINAL.has(job.status) ? "ended" : "broken";
}

/** Follows a job live until it is indexed or failed. */
async function follow(row) {
  let failures = 0;
  for (;;) {
    let outcome;
    try {
      outcome = await slots.run(() => streamJob(row));
    } catch (error) {
      row.note(error.message);
      return;
    }
    if (outcome === "ended") {
      jobsChanged();
      return;
    }
    failures = outcome === "broken" ? failures + 1 : 0;
    if (failures > 0) await sleep(Math.min(30_000, 500 * 2 ** failures));
  }
}

// ---- rendering a job (shared by the live rows and the jobs list) --------------------

/** The stage a job is in, or failed in; undefined while queued or once indexed. */
function stageOfJob(job) {
  if (job.status !== "failed") return stageAt.get(job.status);
  return [...stageAt.values()].find((stage) => stage.name === job.error?.stage);
}

/** How far along the bar a job is: the stages it passed, and its chunks in a counting stage. */
function fraction(job) {
  if (job.status === "indexed") return 1;
  const stage = stageOfJob(job);
  if (!stage) return 0;
  const counted = CHUNK_PROGRESS[stage.name];
  const total = job.progress.chunks_total;
  const done = counted && total ? job.progress[counted.field] / total : 0;
  return stage.start + stage.share * Math.min(done, 1);
}

function countText(job) {
  const { chunks_total: total, pages } = job.progress;
  const counted = CHUNK_PROGRESS[stageAt.get(job.status)?.name];
  if (counted && total) return `${job.progress[counted.field]} / ${total} chunks ${counted.done}`;
  if (job.status === "indexed" && total !== null) {
    const chunks = plural(total, "chunk");
    return pages ? `${chunks}, ${plural(pages, "page")}` : chunks;
  }
  return null;
}

function statusCell(
  state,
  { count = null, stalled = false, duplicate = false, priority = null, waiting = null } = {},
) {
  return [
    el("span", { className: `state state-${state}`, textContent: state }),
    priority && el("span", { className: `tag priority priority-${priority}`, textContent: priority }),
    stalled && el("span", { className: "tag stalled", textContent: "stalled" }),
    duplicate && el("span", { className: "tag duplicate", textContent: "duplicate" }),
    waiting && el("span", { className: "queue", textContent: waiting }),
    count && el("span", { className: "count", textContent: count }),
  ].filter(Boolean);
}

/** "about 40 s" or "about 3 min": a person's reading of an estimate in seconds. */
function aboutText(seconds) {
  if (seconds < 120) return `about ${Math.max(1, Math.round(seconds))} s`;
  return `about ${Math.round(seconds / 60)} min`;
}

/** A waiting job's place in line, "position 3, about 40 s"; null once a stage works on it.
 * `queue.position` counts the jobs of its lane ahead of it in its stage (0 also once the
 * stage has it), so a queued job's place is one more, and a later stage's only counts while
 * someone is ahead. */
function waitingText(job) {
  const ahead = job.queue?.position;
  if (ahead === null || ahead === undefined || TERMINAL.has(job.status)) return null;
  if (job.status !== "queued" && ahead === 0) return null;
  const eta = job.queue.eta_s;
  const place = `position ${ahead + 1}`;
  return eta === null || eta === undefined ? place : `${place}, ${aboutText(eta)}`;
}

/** The job's lane, shown while it waits (which line it waits in is the point). */
function priorityOf(job) {
  return waitingText(job) && job.priority ? job.priority : null;
}

/** The options a status cell shows for a job. */
function jobState(job, extra = {}) {
  return {
    count: countText(job),
    stalled: job.stalled,
    priority: priorityOf(job),
    waiting: waitingText(job),
    ...extra,
  };
}

function progressBar(value, filename) {
  return el("progress", {
    max: 1,
    value,
    attrs: { "aria-label": `Progress of ${filename}` },
  });
}

/** The details cell of a job: the failure and what to do about it. */
function jobDetails(job, onRetry) {
  const parts = [];
  if (job.status === "failed" && job.error) {
    parts.push(
      el(
        "p",
        { className: "error" },
        el("strong", { textContent: `Failed in ${job.error.stage}: ` }),
        job.error.message,
      ),
    );
    if (job.error.retryable) {
      const retry = el("button", { type: "button", className: "small", textContent: "Retry" });
      retry.setAttribute("aria-label", `Retry ${job.filename}`);
      retry.addEventListener("click", () => {
        retry.disabled = true;
        onRetry(job);
      });
      parts.push(retry);
    } else {
      // The file itself is the problem: the same bytes would fail the same way again.
      parts.push(
        el("p", {
          className: "no-retry",
          textContent: "A retry cannot help with this file: upload a fixed file.",
        }),
      );
    }
  }
  const trace = traceUrl(job);
  if (trace && (job.status === "failed" || job.stalled)) {
    parts.push(el("a", { href: trace, textContent: "Trace in Jaeger", target: "_blank", rel: "noopener" }));
  }
  return parts;
}

// ---- live rows: this session's uploads ----------------------------------------------

class LiveRow {
  constructor(filename, collection) {
    this.filename = filename;
    this.jobId = null;
    this.duplicate = false;
    this.cells = {
      file: el("td", { className: "file", textContent: filename }),
      collection: el("td", { className: "collection", textContent: collection }),
      status: el("td", { className: "status" }),
      progress: el("td"),
      details: el("td", { className: "details" }),
    };
    this.tr = el("tr", {}, ...Object.values(this.cells));
    $("live-rows").append(this.tr);
    $("live-table").hidden = false;
    $("live-empty").hidden = true;
  }

  state(state, details = []) {
    this.tr.dataset.status = state;
    this.cells.status.replaceChildren(...statusCell(state, { duplicate: this.duplicate }));
    this.cells.progress.replaceChildren();
    this.cells.details.replaceChildren(...details);
  }

  show(job) {
    this.jobId = job.job_id;
    this.tr.dataset.status = job.status;
    this.tr.dataset.jobId = job.job_id;
    this.cells.status.replaceChildren(
      ...statusCell(job.status, jobState(job, { duplicate: this.duplicate })),
    );
    this.cells.progress.replaceChildren(progressBar(fraction(job), this.filename));
    this.cells.details.replaceChildren(...jobDetails(job, () => retryHere(this)));
  }

  note(message) {
    this.cells.details.append(el("p", { className: "error", textContent: message }));
  }
}

async function retryJob(jobId) {
  const response = await api(`/v1/jobs/${encodeURIComponent(jobId)}/retry`, { method: "POST" });
  if (!response.ok) throw await errorOf(response);
  return response.json();
}

async function retryHere(row) {
  try {
    row.show(await retryJob(row.jobId));
  } catch (error) {
    row.note(error.message);
    return;
  }
  follow(row);
}

// ---- uploads ------------------------------------------------------------------------

async function sendFile(file, collection) {
  const body = new FormData();
  body.append("collection", collection);
  // A person dropping files waits for them: the page's uploads always take the fast lane.
  body.append("priority", "interactive");
  body.append("file", file, file.name);
  const response = await api("/v1/documents", { method: "POST", body });
  if (!response.ok) throw await errorOf(response);
  return response.json();
}

/** Uploads one file in its turn, then follows its job. */
async function upload(row, file, collection) {
  row.state("waiting");
  let answer;
  try {
    answer = await slots.run(() => {
      row.state("uploading");
      return sendFile(file, collection);
    });
  } catch (error) {
    const message = error instanceof ApiError ? error.message : `Upload failed: ${error.message}`;
    const details = [el("p", { className: "error", textContent: message })];
    // Saturation and an absent broker pass; a network error may too.
    if (!(error instanceof ApiError) || [429, 503].includes(error.status)) {
      const again = el("button", { type: "button", className: "small", textContent: "Try again" });
      again.setAttribute("aria-label", `Upload ${file.name} again`);
      again.addEventListener("click", () => upload(row, file, collection));
      details.push(again);
    }
    row.state("rejected", details);
    return;
  }
  row.duplicate = Boolean(answer.duplicate);
  row.jobId = answer.job_id;
  row.state(answer.status);
  follow(row);
}

function addFiles(files) {
  const input = $("upload-collection");
  if (!input.checkValidity()) {
    input.reportValidity();
    return;
  }
  const collection = input.value;
  rememberCollection(collection);
  // Every row appears at once; the pool decides when each is sent.
  for (const file of files) upload(new LiveRow(file.name, collection), file, collection);
}

function wireUploads() {
  const zone = $("dropzone");
  const input = $("file-input");
  $("pick-files").addEventListener("click", () => input.click());
  input.addEventListener("change", () => {
    addFiles([...input.files]);
    input.value = "";
  });
  $("upload-form").addEventListener("submit", (event) => event.preventDefault());
  for (const type of ["dragenter", "dragover"]) {
    zone.addEventListener(type, (event) => {
      event.preventDefault();
      event.dataTransfer.dropEffect = "copy";
      zone.classList.add("over");
    });
  }
  zone.addEventListener("dragleave", (event) => {
    if (!zone.contains(event.relatedTarget)) zone.classList.remove("over");
  });
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("over");
    addFiles([...event.dataTransfer.files]);
  });
  // A file dropped next to the zone must not navigate away from the page.
  for (const type of ["dragover", "drop"]) window.addEventListener(type, (e) => e.preventDefault());
}

// ---- the jobs list, from the API, filters in the URL --------------------------------

const FILTERS = ["status", "collection", "stalled"];
let nextCursor = null;

function filtersFromUrl() {
  const query = new URLSearchParams(location.search);
  for (const name of FILTERS) $(`filter-${name}`).value = query.get(name) ?? "";
}

function filterParams() {
  const params = new URLSearchParams();
  for (const name of FILTERS) {
    const value = $(`filter-${name}`).value.trim();
    if (value) params.set(name, value);
  }
  return params;
}

function jobRow(job) {
  const cells = [
    el("td", { className: "file", textContent: job.filename }),
    el("td", { className: "collection", textContent: job.collection }),
    el("td", { className: "status" }, ...statusCell(job.status, jobState(job))),
    el("td", {}, progressBar(fraction(job), job.filename)),
    el("td", { className: "details" }, ...jobDetails(job, retryFromList)),
    el(
      "td",
      {},
      el("time", { dateTime: job.updated_at, textContent: new Date(job.updated_at).toLocaleString() }),
    ),
  ];
  const tr = el("tr", {}, ...cells);
  tr.dataset.status = job.status;
  tr.dataset.jobId = job.job_id;
  if (job.stalled) tr.classList.add("is-stalled");
  return tr;
}

async function loadJobs({ more = false } = {}) {
  const params = filterParams();
  params.set("limit", "50");
  if (more && nextCursor) params.set("cursor", nextCursor);
  const message = $("jobs-message");
  let page;
  try {
    const response = await api(`/v1/jobs?${params}`);
    if (!response.ok) throw await errorOf(response);
    page = await response.json();
  } catch (error) {
    message.textContent = `Could not list jobs: ${error.message}`;
    return;
  }
  offerCollections(page.jobs.map((job) => job.collection));
  const rows = page.jobs.map(jobRow);
  if (more) $("jobs-rows").append(...rows);
  else $("jobs-rows").replaceChildren(...rows);
  nextCursor = page.next_cursor;
  const shown = $("jobs-rows").children.length;
  $("jobs-table").hidden = shown === 0;
  $("jobs-more").hidden = !nextCursor;
  if (shown > 0) message.textContent = `${plural(shown, "job")} shown.`;
  else message.textContent = filterParams().size ? "No jobs match these filters." : "No jobs yet.";
}

async function retryFromList(job) {
  try {
    const retried = await retryJob(job.job_id);
    const row = new LiveRow(retried.filename, retried.collection);
    row.show(retried);
    follow(row);
  } catch (error) {
    $("jobs-message").textContent = `Retry of ${job.filename} failed: ${error.message}`;
  }
  loadJobs();
}

let refreshTimer = null;
/** A followed job ended: refresh the list soon (once for a burst of endings). */
function jobsChanged() {
  clearTimeout(refreshTimer);
  refreshTimer = setTimeout(() => loadJobs(), 1500);
}

function wireJobs() {
  $("jobs-form").addEventListener("submit", (event) => {
    event.preventDefault();
    if (!event.target.reportValidity()) return;
    const params = filterParams();
    const query = params.size ? `?${params}` : location.pathname;
    if (query !== location.search) history.pushState(null, "", query);
    loadJobs();
  });
  $("jobs-more").addEventListener("click", () => loadJobs({ more: true }));
  window.addEventListener("popstate", () => {
    filtersFromUrl();
    loadJobs();
  });
}

// ---- collections: remember the last one, offer the ones that exist -----------------

const offered = new Set();

function recentCollections() {
  try {
    const stored = JSON.parse(localStorage.getItem(RECENT_STORE) ?? "[]");
    return Array.isArray(stored) ? stored.filter((c) => COLLECTION_PATTERN.test(c)) : [];
  } catch {
    return [];
  }
}

/** The collection just used becomes every field's default, here and after a reload. */
function rememberCollection(collection) {
  if (!COLLECTION_PATTERN.test(collection ?? "")) return;
  localStorage.setItem(COLLECTION_STORE, collection);
  const recent = [collection, ...recentCollections().filter((c) => c !== collection)];
  localStorage.setItem(RECENT_STORE, JSON.stringify(recent.slice(0, RECENT_KEPT)));
  for (const id of ["upload-collection", "search-collection"]) $(id).value = collection;
  offerCollections([collection]);
}

/** Adds collections to the list the collection fields offer. */
function offerCollections(names) {
  const before = offered.size;
  for (const name of names) if (COLLECTION_PATTERN.test(name ?? "")) offered.add(name);
  if (offered.size === before) return;
  $("collection-options").replaceChildren(
    ...[...offered].sort().map((name) => el("option", { value: name })),
  );
}

/** Starts every collection field at the last collection used, so a newcomer who uploaded to
 * "papers" does not search an empty "default". */
function restoreCollection() {
  const last = localStorage.getItem(COLLECTION_STORE);
  if (last && COLLECTION_PATTERN.test(last)) {
    for (const id of ["upload-collection", "search-collection"]) $(id).value = last;
  }
  offerCollections(recentCollections());
}

/** The collections the gateway knows (`GET /v1/collections`). */
async function loadCollections() {
  try {
    const response = await api("/v1/collections");
    if (!response.ok) return; // an older gateway: the remembered ones and the jobs' still help
    const { collections = [] } = await response.json();
    offerCollections(collections.map((c) => (typeof c === "string" ? c : c?.collection ?? c?.name)));
  } catch {
    // Offered from what this browser remembers and the jobs listed instead.
  }
}

// ---- the pipeline panel: depth per lane, workers, throughput -------------------------

const pipelineView = { keyRefused: undefined };

/** "3 waiting · 2 in hand" for one lane of one stage. */
function laneText(lane) {
  if (!lane) return "—";
  return `${lane.ready} waiting · ${lane.unacked} in hand`;
}

function workersText(stage) {
  const total = stage.workers.length;
  if (total === 0) return "none running";
  const healthy = stage.workers.filter((w) => w.healthy).length;
  return healthy === total ? `${total} healthy` : `${healthy} of ${total} healthy`;
}

/** A small line chart of the last minute's in and out rates, drawn here (no library). */
function throughputChart(name, history) {
  const width = 160;
  const height = 36;
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.setAttribute("width", String(width));
  svg.setAttribute("height", String(height));
  svg.setAttribute("class", "chart");
  svg.setAttribute("role", "img");
  const peak = Math.max(0, ...history.flatMap((s) => [s.in_per_s, s.out_per_s]));
  const label = history.length
    ? `${name}: up to ${peak.toFixed(1)} messages a second over the last minute`
    : `${name}: no samples yet`;
  svg.setAttribute("aria-label", label);
  const title = document.createElementNS(SVG, "title");
  title.textContent = label;
  svg.append(title);
  const base = document.createElementNS(SVG, "line");
  for (const [k, v] of Object.entries({ x1: 0, x2: width, y1: height - 1, y2: height - 1 })) {
    base.setAttribute(k, String(v));
  }
  base.setAttribute("class", "axis");
  svg.append(base);
  if (history.length < 2) return svg;
  const scale = peak > 0 ? (height - 4) / peak : 0;
  const step = width / (history.length - 1);
  for (const [field, cls] of [["in_per_s", "in"], ["out_per_s", "out"]]) {
    const line = document.createElementNS(SVG, "polyline");
    const points = history.map((s, i) => `${(i * step).toFixed(1)},${(height - 2 - s[field] * scale).toFixed(1)}`);
    line.setAttribute("points", points.join(" "));
    line.setAttribute("class", `rate ${cls}`);
    svg.append(line);
  }
  return svg;
}

function pipelineRow(name, stage) {
  const lanes = LANE_NAMES.map((lane) => {
    const depth = stage.queues[lane];
    const cell = el("td", { className: `lane lane-${lane}`, textContent: laneText(depth) });
    cell.dataset.ready = String(depth?.ready ?? 0);
    cell.dataset.unacked = String(depth?.unacked ?? 0);
    return cell;
  });
  const unhealthy = stage.workers.some((w) => !w.healthy);
  const workers = el("td", { className: "workers", textContent: workersText(stage) });
  workers.dataset.healthy = String(stage.workers.filter((w) => w.healthy).length);
  workers.dataset.total = String(stage.workers.length);
  const rates = stage.rate_per_s;
  const tr = el(
    "tr",
    {},
    el(
      "th",
      { scope: "row", className: "stage" },
      name,
      stage.side && el("span", { className: "tag side", textContent: "side" }),
    ),
    ...lanes,
    workers,
    el("td", { className: "rates", textContent: `in ${rates.in.toFixed(1)} · out ${rates.out.toFixed(1)}` }),
    el("td", { className: "trend" }, throughputChart(name, stage.history ?? [])),
  );
  tr.dataset.stage = name;
  if (unhealthy || (!stage.side && stage.workers.length === 0)) tr.classList.add("is-unwell");
  return tr;
}

function renderPipeline(answer) {
  const rows = Object.entries(answer.stages).map(([name, stage]) => pipelineRow(name, stage));
  $("pipeline-rows").replaceChildren(...rows);
  $("pipeline-table").hidden = rows.length === 0;
  const message = $("pipeline-message");
  message.classList.toggle("error", Boolean(answer.stale));
  message.textContent = answer.stale
    ? "The gateway cannot reach RabbitMQ: these are the last numbers it had."
    : "";
}

async function refreshPipeline() {
  // A key that was refused is not sent again every two seconds: wait for a new one.
  if (pipelineView.keyRefused !== undefined && pipelineView.keyRefused === auth.key) return;
  try {
    const response = await api("/v1/pipeline");
    if (!response.ok) throw await errorOf(response);
    pipelineView.keyRefused = undefined;
    renderPipeline(await response.json());
  } catch (error) {
    if (error instanceof ApiError && error.status === 401) pipelineView.keyRefused = auth.key;
    $("pipeline-message").textContent = `Pipeline status unavailable: ${error.message}`;
  }
}

/** Polls the pipeline while the page is visible. */
async function pollPipeline() {
  for (;;) {
    if (!document.hidden) await refreshPipeline();
    await sleep(PIPELINE_POLL_MS);
  }
}

// ---- search -------------------------------------------------------------------------

function queryTerms(query) {
  const words = query.toLowerCase().match(/[\p{L}\p{N}]+/gu) ?? [];
  return [...new Set(words)].filter((w) => w.length >= 3 && !STOP_WORDS.has(w));
}

/** The text as DOM nodes, terms wrapped in <mark>; text nodes, so nothing is parsed as HTML. */
function highlighted(text, terms) {
  if (terms.length === 0) return [text];
  const escaped = terms
    .sort((a, b) => b.length - a.length)
    .map((t) => t.replace(/[.*+?^${}()|[\]\\]/g, "\\$&"));
  const pattern = new RegExp(`(?<![\\p{L}\\p{N}])(?:${escaped.join("|")})`, "giu");
  const nodes = [];
  let last = 0;
  for (const match of text.matchAll(pattern)) {
    nodes.push(text.slice(last, match.index), el("mark", { textContent: match[0] }));
    last = match.index + match[0].length;
  }
  nodes.push(text.slice(last));
  return nodes.filter((n) => n !== "");
}

function resultItem(hit, terms) {
  const meta = [el("strong", { textContent: hit.filename })];
  if (hit.page !== null) meta.push(` · page ${hit.page}`);
  meta.push(` · score ${hit.score.toFixed(3)}`);
  return el(
    "li",
    {},
    el("p", { className: "meta" }, ...meta),
    el("p", { className: "text" }, ...highlighted(hit.text, terms)),
  );
}

async function search(event) {
  event.preventDefault();
  const form = event.target;
  if (!form.reportValidity()) return;
  const params = new URLSearchParams(new FormData(form));
  rememberCollection(params.get("collection"));
  const message = $("search-message");
  message.textContent = "Searching…";
  try {
    const response = await api(`/v1/search?${params}`);
    if (!response.ok) throw await errorOf(response);
    const { results } = await response.json();
    const terms = queryTerms(params.get("q"));
    $("search-results").replaceChildren(...results.map((hit) => resultItem(hit, terms)));
    message.textContent = results.length ? `${results.length} results.` : "Nothing found.";
  } catch (error) {
    $("search-results").replaceChildren();
    message.textContent = `Search failed: ${error.message}`;
  }
}

// ---- start --------------------------------------------------------------------------

restoreCollection();
wireUploads();
wireJobs();
$("search-form").addEventListener("submit", search);
// The status filter's options come with the config, so the URL's filters are read after it.
await loadConfig();
filtersFromUrl();
loadJobs();
loadCollections();
pollPipeline();
