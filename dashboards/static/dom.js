// TIDE feature browser, shared helpers: DOM building, number formatting, URLs, fetching, page state
// and lookups into data/site.json. Loaded first; charts.js and app.js use these names.
// Data is only ever inserted as text (textContent / text nodes / setAttribute), never parsed as HTML,
// so labels, class names and prompts cannot inject markup: `el` and `svg` are the only builders.
"use strict";

// ------------------------------------------------------------------------------------- helpers

const params = new URLSearchParams(location.search);
const main = document.getElementById("main");
const PALETTE = { tide: "#1f77b4", topk: "#ff7f0e", relu: "#2ca02c" };
const EXTRA_COLORS = ["#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f"];

function el(tag, props, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(props || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") e.className = v;
    else if (k === "text") e.textContent = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v === true ? "" : String(v));
  }
  for (const kid of kids.flat(Infinity)) {
    if (kid === undefined || kid === null || kid === false) continue;
    e.append(kid instanceof Node ? kid : String(kid));
  }
  return e;
}

const SVG = "http://www.w3.org/2000/svg";
function svg(tag, attrs, ...kids) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) if (v !== undefined && v !== null) e.setAttribute(k, String(v));
  for (const kid of kids.flat(Infinity)) if (kid !== undefined && kid !== null) e.append(kid instanceof Node ? kid : String(kid));
  return e;
}

function url(page, query) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(query || {})) if (v !== undefined && v !== null && v !== "") q.set(k, v);
  const s = q.toString();
  return s ? `${page}?${s}` : page;
}

const link = (href, text, props) => el("a", { href, ...(props || {}) }, text);

async function getJSON(path) {
  const r = await fetch(path, { cache: "no-cache" });
  if (!r.ok) throw new Error(`${path}: HTTP ${r.status}`);
  return r.json();
}

function fmt(v, digits = 3) {
  if (v === null || v === undefined || Number.isNaN(v)) return "–";
  if (typeof v !== "number") return String(v);
  if (v === 0) return "0";
  const a = Math.abs(v);
  if (Number.isInteger(v) && a < 1e5) return String(v);
  if (a >= 1e5 && a < 1e12) return a >= 1e9 ? `${Number((v / 1e9).toPrecision(3))}G` : a >= 1e6 ? `${Number((v / 1e6).toPrecision(3))}M` : `${Number((v / 1e3).toPrecision(3))}k`;
  if (a >= 1e4 || a < 1e-3) return v.toExponential(2);
  return Number(v.toPrecision(digits)).toString();
}
const pct = (v) => (v === null || v === undefined ? "–" : `${fmt(v * 100, 3)}%`);

function crumbs(...items) {
  const nav = document.getElementById("crumbs");
  nav.replaceChildren();
  items.forEach((it, i) => {
    if (i) nav.append(el("span", { class: "sep", text: "›" }));
    nav.append(it.href ? link(it.href, it.text) : el("span", { text: it.text }));
  });
}

function done(title) {
  if (title) document.title = `TIDE · ${title}`;
  document.body.dataset.ready = "1";
}

function fail(message) {
  main.replaceChildren(el("p", { class: "error", text: message }));
  document.body.dataset.ready = "error";
}

function variantColor(variant, i) {
  return PALETTE[variant] || EXTRA_COLORS[i % EXTRA_COLORS.length];
}

// flow-matching runs (SD3, FLUX) label a step with the model's own time, sigma; the others with t
function stepLabel(run, step) {
  if (step === null || step === undefined) return "–";
  const sigma = run && run.sigmas ? run.sigmas[step] : undefined;
  if (sigma !== undefined) return `step ${step} (σ=${sigma.toFixed(3)})`;
  const t = run && run.timesteps ? run.timesteps[step] : undefined;
  return t === undefined ? `step ${step}` : `step ${step} (t=${t})`;
}

// {column: [values]} (how the site stores per-feature tables) -> [{column: value}]
function rowsOf(cols) {
  const keys = Object.keys(cols || {});
  const n = keys.length ? cols[keys[0]].length : 0;
  return Array.from({ length: n }, (_, i) => Object.fromEntries(keys.map((k) => [k, cols[k][i]])));
}

function kvTable(rows) {
  return el("table", { class: "kv" },
    rows.filter((r) => r).map(([k, v]) => el("tr", {}, el("th", { text: k }), el("td", {}, v instanceof Node ? v : fmt(v)))));
}

// ------------------------------------------------------------------------------------- site

let SITE = null;
const saeById = (id) => SITE.saes.find((s) => s.sae_id === id);
const runById = (id) => SITE.runs.find((r) => r.run_id === id);
const saeUrl = (sae) => url("sae.html", { sae: sae.sae_id });
const featureUrl = (saeId, f) => url("feature.html", { sae: saeId, f });
const sampleUrl = (runId, s) => url("sample.html", { run: runId, s });
// class id -> its name in `run` (the id when unnamed, "–" when missing)
function classNameOf(run, cid) {
  const c = run ? run.classes.find((k) => k.class_id === cid) : null;
  return c ? (c.class_name ?? String(cid)) : (cid === null || cid === undefined ? "–" : String(cid));
}
// The judge's verdict by name: its own classes where the run records them (a text run's conditions are
// prompts, while its judge predicts a digit), else the run's classes.
function judgeName(run, pred) {
  if (pred === null || pred === undefined) return "–";
  return run && run.judge_classes ? (run.judge_classes[pred] ?? String(pred)) : classNameOf(run, pred);
}
// What a run's conditions are called: its prompts (a text-conditional run) or its classes.
const conditionNoun = (run) => (run && run.sampling && run.sampling.prompts ? "prompt" : "class");
const saeTitle = (s) => `layer ${s.layer} · ${s.site} · ${s.variant} (${s.n_latents} latents${s.k ? `, k=${s.k}` : ""})`;

function requireSae() {
  const id = params.get("sae");
  const sae = id === null ? null : saeById(id);
  if (!sae) {
    const known = SITE.saes.map((s) => s.sae_id).join(", ") || "none";
    throw new Error(`unknown SAE ${JSON.stringify(id)}; this site has: ${known}`);
  }
  return sae;
}
