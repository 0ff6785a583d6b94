// The page's logic: send one image to /predict and draw the answer. No external code.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { result: null, selected: null, auth: false, heatmaps: true, maxBytes: null };

function el(tag, props = {}, children = []) {
  const node = document.createElement(tag);
  Object.assign(node, props);
  for (const child of children) node.append(child);
  return node;
}

function headers() {
  const token = $("token").value.trim();
  return token ? { Authorization: "Bearer " + token } : {};
}

function setStatus(text, kind = "") {
  const status = $("status");
  status.textContent = text;
  status.className = "status " + kind;
}

async function detail(response) {
  try {
    const body = await response.json();
    return typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
  } catch (_) {
    return response.statusText;
  }
}

async function loadHealth() {
  const response = await fetch("/health");
  const health = await response.json();
  state.auth = health.auth;
  state.heatmaps = health.heatmaps;
  state.maxBytes = health.max_upload_bytes;
  $("token-row").hidden = !health.auth;
  $("heatmap").disabled = !health.heatmaps;
  $("heatmap").checked = health.heatmaps;
  $("limit").textContent = " · up to\u00a0" + (health.max_upload_bytes / 1048576).toFixed(0) + "\u00a0MB";
}

async function loadCard() {
  const response = await fetch("/model", { headers: headers() });
  if (response.status === 401) {
    $("card-json").textContent = "Enter the access token to see the model card.";
    return;
  }
  if (!response.ok) return;
  renderCard(await response.json());
}

function ci(auc) {
  const value = auc.auc === null || auc.auc === undefined ? "n/a" : auc.auc.toFixed(3);
  if (auc.ci_low === null || auc.ci_low === undefined) return value;
  return value + " (95 % CI " + auc.ci_low.toFixed(3) + "–" + auc.ci_high.toFixed(3) + ")";
}

function cardRows(card) {
  const rows = [["Architecture", card.architecture + " · input " + card.input_size + " px"]];
  const splits = (card.training_data || {}).splits || {};
  const counts = Object.entries(splits).map(([name, s]) => name + " " + s.images.toLocaleString() + " images / " + s.patients.toLocaleString() + " patients");
  if (counts.length) rows.push(["Training data", counts.join(" · ")]);
  const evaluations = Object.entries(card.evaluations || {});
  for (const [split, metrics] of evaluations) {
    const parts = [];
    if (metrics.auc && metrics.auc.macro) parts.push("macro ROC-AUC " + ci(metrics.auc.macro));
    for (const [name, value] of Object.entries(metrics.calibration || {})) parts.push(name + " " + value.toFixed(3));
    rows.push(["Evaluated on " + split, parts.join(" · ")]);
  }
  if (!evaluations.length) rows.push(["Validation", "not evaluated yet (cxrfusion evaluate)"]);
  rows.push(["Review threshold", card.threshold.toFixed(3) + " (mean MC-dropout std; T = " + card.mc_samples + ")"]);
  rows.push(["Temperature scaling", card.temperatures ? "fitted per pathology" : "none"]);
  if (card.conformal) rows.push(["Conformal decisions", card.conformal.bound.replace("alpha", "alpha = " + card.conformal.alpha) + "; referral: retained miss rate <= " + card.conformal.referral_alpha + " (" + card.conformal.n_calibration.toLocaleString() + " + " + card.conformal.n_referral.toLocaleString() + " validation images, T = " + card.conformal.mc_samples + ")"]);
  rows.push(["Intended use", card.intended_use], ["Limits", card.limits]);
  return rows;
}

function renderCard(card) {
  $("card-json").textContent = JSON.stringify(card, null, 2);
  const items = cardRows(card).flatMap(([term, text]) => [el("dt", { textContent: term }), el("dd", { textContent: text })]);
  $("card").replaceChildren(...items);
  $("model-name").textContent = "model: " + card.architecture;
}

async function predict(file) {
  if (state.maxBytes && file.size > state.maxBytes) {
    setStatus(file.name + " is " + (file.size / 1048576).toFixed(1) + " MB; the limit is " + (state.maxBytes / 1048576).toFixed(0) + " MB.", "error");
    return;
  }
  setStatus("Analysing " + file.name + " …", "busy");
  const form = new FormData();
  form.append("file", file, file.name);
  const heatmap = state.heatmaps && $("heatmap").checked;
  const started = performance.now();
  let response;
  try {
    response = await fetch("/predict?image=true&heatmap=" + heatmap, { method: "POST", body: form, headers: headers() });
  } catch (error) {
    setStatus("The server could not be reached (" + error.message + ").", "error");
    return;
  }
  if (!response.ok) {
    let text = await detail(response);
    if (response.status === 503) text += " (server busy; retry after " + (response.headers.get("Retry-After") || "a few") + " s)";
    if (response.status === 401) { $("token-row").hidden = false; $("token").focus(); }
    setStatus(text, "error");
    return;
  }
  const result = await response.json();
  const seconds = ((performance.now() - started) / 1000).toFixed(1);
  setStatus(result.source + " · analysed in " + seconds + " s");
  render(result);
  if (state.auth) loadCard();
}

function render(result) {
  state.result = result;
  const flag = $("flag");
  flag.hidden = false;
  flag.dataset.flag = String(result.flag);
  flag.className = "flag " + (result.flag ? "review" : "clear");
  const comparison = "uncertainty " + result.uncertainty.toFixed(3) + (result.flag ? " exceeds" : " is within") + " the threshold " + result.threshold.toFixed(3);
  flag.replaceChildren(
    el("strong", { textContent: result.flag ? "Review recommended" : "No review flag" }),
    el("span", { textContent: comparison + " (mean MC-dropout std of the 14 pathologies)." }),
  );
  const conformal = result.conformal;
  $("referral").hidden = !conformal;
  if (conformal) {
    const referral = $("referral");
    referral.className = "referral " + (conformal.referred ? "review" : "clear");
    referral.textContent = (conformal.referred ? "Referred for review" : "Not referred") + " (conformal, alpha = " + conformal.referral_alpha + ")";
    referral.title = "Referral rule fitted with conformal risk control: the expected share of images the model keeps with a missed finding is at most " + conformal.referral_alpha + ".";
  }
  const positive = new Set(conformal ? conformal.positive : []);
  $("warning").hidden = !result.warning;
  $("warning").textContent = result.warning ? "Warning: " + result.warning : "";
  const rows = result.pathologies.map((p) => row(p, result.heatmaps && result.heatmaps[p.label], positive.has(p.label)));
  $("probs").tBodies[0].replaceChildren(...rows);
  $("probs").hidden = false;
  $("legend").hidden = false;
  $("legend-conformal").hidden = !conformal;
  if (conformal) $("conformal-alpha").textContent = String(conformal.alpha);
  const top = result.pathologies.reduce((a, b) => (b.probability > a.probability ? b : a));
  select(result.heatmaps ? top.label : null);
}

function row(p, hasHeatmap, positive) {
  const low = Math.max(0, p.probability - p.std);
  const high = Math.min(1, p.probability + p.std);
  const track = el("div", { className: "track" }, [
    el("div", { className: "fill" }),
    el("div", { className: "whisker" }),
  ]);
  track.firstChild.style.width = (100 * p.probability).toFixed(2) + "%";
  track.lastChild.style.left = (100 * low).toFixed(2) + "%";
  track.lastChild.style.width = (100 * (high - low)).toFixed(2) + "%";
  track.title = p.label + ": " + p.probability.toFixed(3) + " ± " + p.std.toFixed(3);
  const name = el("button", { type: "button", textContent: p.label.replace(/_/g, " "), disabled: !hasHeatmap });
  name.addEventListener("click", () => select(p.label));
  const cell = positive ? [name, el("span", { className: "positive", textContent: "positive", title: "conformal decision: positive" })] : [name];
  const tr = el("tr", {}, [
    el("td", {}, cell),
    el("td", {}, [track]),
    el("td", { className: "num value", textContent: p.probability.toFixed(3) }),
    el("td", { className: "num", textContent: p.std.toFixed(3) }),
  ]);
  tr.dataset.label = p.label;
  return tr;
}

function select(label) {
  state.selected = label;
  for (const tr of $("probs").tBodies[0].rows) tr.classList.toggle("selected", tr.dataset.label === label);
  showImage();
}

function showImage() {
  const result = state.result;
  if (!result || !result.image) return;
  const overlay = state.selected && result.heatmaps && result.heatmaps[state.selected];
  const showOverlay = Boolean(overlay) && $("overlay").checked;
  $("viewer").hidden = false;
  $("overlay-row").hidden = !overlay;
  $("view").src = "data:image/png;base64," + (showOverlay ? overlay : result.image);
  $("view-caption").textContent = showOverlay
    ? "Grad-CAM heatmap: " + state.selected.replace(/_/g, " ")
    : "Model input (" + result.source + ")";
}

function setup() {
  const drop = $("drop");
  $("file").addEventListener("change", (event) => {
    if (event.target.files.length) predict(event.target.files[0]);
    event.target.value = "";
  });
  for (const name of ["dragenter", "dragover"]) {
    drop.addEventListener(name, (event) => { event.preventDefault(); drop.classList.add("over"); });
  }
  for (const name of ["dragleave", "drop"]) {
    drop.addEventListener(name, (event) => { event.preventDefault(); drop.classList.remove("over"); });
  }
  drop.addEventListener("drop", (event) => {
    if (event.dataTransfer.files.length) predict(event.dataTransfer.files[0]);
  });
  $("overlay").addEventListener("change", showImage);
  $("token").addEventListener("change", loadCard);
  loadHealth().then(loadCard).catch((error) => setStatus("Cannot reach the server: " + error.message, "error"));
}

document.addEventListener("DOMContentLoaded", setup);
