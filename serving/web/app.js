// The metarestore page: restore an image, compare, download; make an adapter from example pairs.
// Talks to the same server's API (relative URLs, so it also works under a route prefix); sends the
// bearer token the user entered with every API call. document.body.dataset.{restore,adapter} says
// "working", "done" or "error" (for people and for the browser test).
"use strict";

const $ = (id) => document.getElementById(id);
const base = location.pathname.endsWith("/") ? location.pathname : location.pathname + "/";
const TOKEN_KEY = "metarestore-token";
const state = { input: null, inputName: "image", afterUrl: null, beforeUrl: null, pairs: [], limits: {} };

// API ------------------------------------------------------------------------------------------------
class ApiError extends Error {
  constructor(status, code, message) { super(message); this.status = status; this.code = code; }
}

async function api(path, options = {}) {
  const headers = new Headers(options.headers || {});
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) headers.set("Authorization", "Bearer " + token);
  let response;
  try {
    response = await fetch(base + path, { ...options, headers });
  } catch (err) {
    throw new ApiError(0, "network_error", "The server cannot be reached (" + err.message + ").");
  }
  if (response.ok) return response;
  let code = "http_" + response.status, message = response.statusText || "request failed";
  try {
    const body = await response.json();
    if (body && body.error) ({ code, message } = body.error);
  } catch (_) { /* not JSON: keep the status line */ }
  throw new ApiError(response.status, code, message);
}

const HINTS = {
  unauthorized: "Enter the server's bearer token at the top of the page.",
  adapter_not_found: "The adapter has expired or was deleted: make it again.",
  adapter_model_mismatch: "The adapter was made for another model: make it again.",
  too_many_pixels: "Use a smaller image (or fewer pairs).",
  body_too_large: "Use a smaller file.",
  unsupported_format: "Send a PNG or JPEG.",
  unsupported_media_type: "Send a PNG or JPEG.",
  invalid_image: "The file is not a readable PNG or JPEG.",
  pair_size_mismatch: "Each degraded image must have the size of its clean image.",
  too_many_shots: "Use fewer pairs.",
  too_many_steps: "Use fewer steps.",
};

function showError(err, what) {
  const box = $("message");
  if (err instanceof ApiError) {
    const status = err.status ? `HTTP ${err.status}, ` : "";
    box.textContent = `${what} failed: ${err.message} (${status}${err.code}). ${HINTS[err.code] || ""}`.trim();
  } else {
    box.textContent = `${what} failed: ${err.message || err}`;
  }
  box.hidden = false;
}

function clearError() { $("message").hidden = true; $("message").textContent = ""; }

// model and token ------------------------------------------------------------------------------------
async function loadModel() {
  try {
    const info = await (await api("v1/model")).json();
    state.limits = info.limits || {};
    const fam = info.families || {};
    $("model-info").textContent = `${info.name} version ${info.version} · ${info.algorithm} · trained on ` +
      `${(fam.train || []).join(", ")}` + (fam.held_out && fam.held_out.length ? `; held out ${fam.held_out.join(", ")}` : "");
    const told = $("degradation-select");
    for (const option of [...told.options]) if (option.value) option.remove();
    for (const name of info.degradations || []) told.add(new Option(name.replace(/_/g, " "), name));
    $("degradation-field").hidden = !(info.degradations || []).length;
    if (state.limits.max_steps) $("steps").max = state.limits.max_steps;
    if (state.limits.adapt_steps) $("steps").value = state.limits.adapt_steps;
    clearError();
  } catch (err) {
    $("model-info").textContent = "The model's description is not available.";
    showError(err, "Loading the model");
  }
}

function showTokenState() {
  $("token-state").textContent = sessionStorage.getItem(TOKEN_KEY) ? "token set for this tab" : "";
}

$("token-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const token = $("token").value.trim();
  if (token) sessionStorage.setItem(TOKEN_KEY, token); else sessionStorage.removeItem(TOKEN_KEY);
  $("token").value = "";
  showTokenState();
  loadModel();
});

// restore --------------------------------------------------------------------------------------------
function setInput(blob, name) {
  state.input = blob;
  state.inputName = name || "image";
  if (state.beforeUrl) URL.revokeObjectURL(state.beforeUrl);
  state.beforeUrl = URL.createObjectURL(blob);
  $("before").src = state.beforeUrl;
  $("after").removeAttribute("src");
  $("after").hidden = true;  // no result yet: nothing rather than a broken image
  $("compare").hidden = false;
  $("download").hidden = true;
  $("restore-button").disabled = false;
  $("restore-state").textContent = `${state.inputName}: ready`;
}

async function restore() {
  if (!state.input) return;
  clearError();
  const input = state.input, adapter = $("adapter-select").value, degradation = $("degradation-select").value;
  document.body.dataset.restore = "working";
  $("restore-button").disabled = true;
  $("restore-state").textContent = "restoring…";
  $("found").textContent = "";
  const started = performance.now();
  try {
    // an adapter already says what the degradation is: the server takes one or the other
    const query = adapter ? "?adapter=" + encodeURIComponent(adapter)
      : degradation ? "?degradation=" + encodeURIComponent(degradation) : "";
    const response = await api("v1/restore" + query, {
      method: "POST", body: input, headers: { "Content-Type": input.type || "application/octet-stream" },
    });
    const blob = await response.blob();
    if (state.input !== input) {  // another image was chosen meanwhile: never show a result beside the wrong input
      $("restore-state").textContent = "the image changed while it was restored: restore again";
      document.body.dataset.restore = "stale";
      return;
    }
    if (state.afterUrl) URL.revokeObjectURL(state.afterUrl);
    state.afterUrl = URL.createObjectURL(blob);
    $("after").src = state.afterUrl;
    $("after").hidden = false;
    const link = $("download");
    link.href = state.afterUrl;
    link.download = state.inputName.replace(/\.[^.]*$/, "") + "-restored.png";
    link.hidden = false;
    const seconds = ((performance.now() - started) / 1000).toFixed(1);
    $("restore-state").textContent = `restored in ${seconds} s (model ${response.headers.get("X-Model-Version") || "?"}` +
      `, adapter ${response.headers.get("X-Adapter") || "none"})`;
    // a blind restore says what the estimator found and what was undone (nothing: the image as it was)
    const found = response.headers.get("X-Degradation");
    const undone = response.headers.get("X-Restored-As");
    $("found").textContent = found ? `found: ${found}; ${undone === "none" ? "left as it is" : "undid " +
      undone.split(",").join(" then ")}` : "";
    document.body.dataset.restore = "done";
  } catch (err) {
    $("restore-state").textContent = "";
    showError(err, "Restoring");
    if (err.code === "adapter_not_found") forgetAdapter(adapter);
    document.body.dataset.restore = "error";
  } finally {
    $("restore-button").disabled = false;
  }
}

function pickFile(file) {
  if (!file) return;
  setInput(file, file.name);
}

$("file").addEventListener("change", (event) => pickFile(event.target.files[0]));
$("restore-button").addEventListener("click", restore);
const drop = $("drop");
drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  drop.classList.remove("over");
  pickFile(event.dataTransfer.files[0]);
});

function setSplit() {
  const value = $("slider").value;
  $("after-clip").style.clipPath = `inset(0 0 0 ${value}%)`;
}
$("slider").addEventListener("input", setSplit);
$("side-by-side").addEventListener("change", (event) => {
  $("compare").classList.toggle("side", event.target.checked);
  $("slider").disabled = event.target.checked;
});

// samples (public files of the page, no token needed) -------------------------------------------------
async function fetchBlob(url) {
  const response = await fetch(base + url);
  if (!response.ok) throw new Error(`sample ${url}: HTTP ${response.status}`);
  return response.blob();
}

async function loadSamples() {
  try {
    state.catalogue = await (await fetch(base + "web/samples.json")).json();
  } catch (_) { return; }
  for (const sample of state.catalogue.restore) {
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = sample.title;
    button.addEventListener("click", async () => {
      try { setInput(await fetchBlob(sample.url), sample.url.split("/").pop()); } catch (err) { showError(err, "Loading the sample"); }
    });
    $("samples").appendChild(button);
  }
}

// adapters -------------------------------------------------------------------------------------------
function thumbnail(img, blob) {
  if (img.dataset.url) URL.revokeObjectURL(img.dataset.url);
  img.dataset.url = URL.createObjectURL(blob);
  img.src = img.dataset.url;
  img.hidden = false;
}

function addPair(degraded = null, clean = null) {
  const pair = { degraded, clean };
  const row = document.createElement("div");
  row.className = "pair";
  for (const role of ["degraded", "clean"]) {
    const label = document.createElement("label");
    label.textContent = role;
    const input = document.createElement("input");
    input.type = "file";
    input.accept = "image/png,image/jpeg";
    input.className = "pair-" + role;
    const img = document.createElement("img");
    img.alt = role;
    img.hidden = true;  // shown once there is an image: an <img> without one would show as broken
    if (pair[role]) thumbnail(img, pair[role]);
    input.addEventListener("change", () => {
      if (input.files[0]) { pair[role] = input.files[0]; thumbnail(img, input.files[0]); }
    });
    label.appendChild(img);
    row.append(label, input);
  }
  const remove = document.createElement("button");
  remove.type = "button";
  remove.className = "plain";
  remove.textContent = "remove";
  remove.addEventListener("click", () => {
    state.pairs = state.pairs.filter((p) => p !== pair);
    row.remove();
  });
  row.appendChild(remove);
  $("pairs").appendChild(row);
  state.pairs.push(pair);
}

async function samplePairs() {
  clearError();
  if (!state.catalogue) return showError(new Error("no samples on this server"), "Loading the samples");
  try {
    const { pairs, query } = state.catalogue.pairs;
    const blobs = await Promise.all(pairs.map(async (p) => [await fetchBlob(p.degraded), await fetchBlob(p.clean)]));
    $("pairs").replaceChildren();
    state.pairs = [];
    for (const [degraded, clean] of blobs) addPair(degraded, clean);
    setInput(await fetchBlob(query), "sample-query.png");
  } catch (err) { showError(err, "Loading the samples"); }
}

function forgetAdapter(id) {
  for (const option of [...$("adapter-select").options]) if (option.value === id && id) option.remove();
}

async function makeAdapter() {
  clearError();
  const complete = state.pairs.filter((p) => p.degraded && p.clean);
  if (!complete.length) {
    return showError(new Error("give at least one pair with both a degraded and a clean image"), "Making the adapter");
  }
  const form = new FormData();
  complete.forEach((pair, i) => {
    form.append("degraded", pair.degraded, `degraded-${i}.png`);
    form.append("clean", pair.clean, `clean-${i}.png`);
  });
  if ($("steps").value) form.append("steps", $("steps").value);
  form.append("path", $("path").value || "auto");
  document.body.dataset.adapter = "working";
  $("adapt-button").disabled = true;
  $("adapt-progress").hidden = false;
  const started = performance.now();
  const tick = setInterval(() => {
    $("adapt-elapsed").textContent = `${((performance.now() - started) / 1000).toFixed(0)} s, adapting on ` +
      `${complete.length} pair${complete.length > 1 ? "s" : ""}…`;
  }, 250);
  try {
    const info = await (await api("v1/adapters", { method: "POST", body: form })).json();
    // the gain over the input first: an adapter is worth keeping only if it beats leaving the image alone
    const held = info.psnr_adapted !== null && info.psnr_input !== null;
    const gain = held ? (info.psnr_adapted - info.psnr_input).toFixed(2) : null;
    const signed = held ? `${gain >= 0 ? "+" : ""}${gain} dB` : "not validated";
    const figures = held
      ? `PSNR on held-out pairs ${info.psnr_input} → ${info.psnr_adapted} dB (${signed} over the input; ` +
        `zero-shot: ${info.psnr_zero_shot} dB)`
      : "too few pixels to hold any out: not validated";
    $("adapter-summary").textContent = `Adapter ${info.adapter_id}, path ${info.path} (asked: ${info.kind}): ` +
      `${figures}, ${info.shots} pairs, ${(info.elapsed_ms / 1000).toFixed(1)} s. Expires ${info.expires_at}.`;
    $("adapter-info").textContent = JSON.stringify(info, null, 1);
    $("adapter-info").hidden = false;
    const option = document.createElement("option");
    option.value = info.adapter_id;
    option.textContent = `${info.adapter_id} (${info.path}, ${signed} on ${info.shots} pairs)`;
    $("adapter-select").appendChild(option);
    $("adapter-select").value = info.adapter_id;
    document.body.dataset.adapter = "done";
  } catch (err) {
    showError(err, "Making the adapter");
    document.body.dataset.adapter = "error";
  } finally {
    clearInterval(tick);
    $("adapt-progress").hidden = true;
    $("adapt-button").disabled = false;
  }
}

$("add-pair").addEventListener("click", () => addPair());
$("sample-pairs").addEventListener("click", samplePairs);
$("adapt-button").addEventListener("click", makeAdapter);

// start ----------------------------------------------------------------------------------------------
addPair();
showTokenState();
loadSamples();
loadModel();
