// TIDE feature browser. Every page is a shell that fetches JSON written by dashboards/site.py and
// renders it with DOM nodes. Data is only ever inserted as text (textContent / text nodes /
// setAttribute), never parsed as HTML, so labels, class names and prompts cannot inject markup.
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

function stepLabel(run, step) {
  if (step === null || step === undefined) return "–";
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

// -------------------------------------------------------------------------------------- charts

function niceTicks(lo, hi, n) {
  if (!(hi > lo)) { hi = lo + 1; }
  const span = hi - lo, raw = span / Math.max(1, n);
  const mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => span / s <= n) || 10 * mag;
  const ticks = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) ticks.push(Number(t.toPrecision(12)));
  return ticks;
}

// A line chart of several series over a shared x axis; `mark` draws a vertical line (e.g. peak step).
function lineChart({ title, series, xlabel, ylabel, width = 380, height = 220, zero = true, mark, logy = false }) {
  const m = { l: 56, r: 12, t: 24, b: 36 };
  const tr = (y) => (logy ? (y > 0 ? Math.log10(y) : null) : y);
  const pts = series.flatMap((s) => s.x.map((x, i) => [x, tr(s.y[i])])).filter(([x, y]) => y !== null && Number.isFinite(y) && Number.isFinite(x));
  const root = svg("svg", { class: "chart", width, height, viewBox: `0 0 ${width} ${height}`, role: "img" });
  root.append(svg("text", { x: m.l, y: 15, class: "title" }, title || ""));
  if (!pts.length) {
    root.append(svg("text", { x: width / 2, y: height / 2, "text-anchor": "middle" }, "no data"));
    return root;
  }
  let [x0, x1] = [Math.min(...pts.map((p) => p[0])), Math.max(...pts.map((p) => p[0]))];
  let [y0, y1] = [Math.min(...pts.map((p) => p[1])), Math.max(...pts.map((p) => p[1]))];
  if (zero && !logy) y0 = Math.min(0, y0);
  if (x1 === x0) x1 = x0 + 1;
  if (y1 === y0) { y1 = y0 + (Math.abs(y0) || 1) * 0.1; }
  const pad = (y1 - y0) * 0.05; y1 += pad; if (!(zero && !logy && y0 === 0)) y0 -= pad;
  const X = (x) => m.l + ((x - x0) / (x1 - x0)) * (width - m.l - m.r);
  const Y = (y) => height - m.b - ((y - y0) / (y1 - y0)) * (height - m.t - m.b);
  for (const t of niceTicks(y0, y1, 4)) {
    root.append(svg("line", { x1: m.l, x2: width - m.r, y1: Y(t), y2: Y(t), class: "grid" }));
    root.append(svg("text", { x: m.l - 5, y: Y(t) + 4, "text-anchor": "end" }, logy ? fmt(10 ** t, 2) : fmt(t, 3)));
  }
  const wholeX = pts.every(([x]) => Number.isInteger(x)); // steps: no tick at 0.5
  for (const t of niceTicks(x0, x1, 6).filter((t) => !wholeX || Number.isInteger(t))) {
    root.append(svg("text", { x: X(t), y: height - m.b + 14, "text-anchor": "middle" }, fmt(t)));
  }
  root.append(svg("line", { x1: m.l, x2: m.l, y1: m.t, y2: height - m.b, class: "axis" }));
  root.append(svg("line", { x1: m.l, x2: width - m.r, y1: height - m.b, y2: height - m.b, class: "axis" }));
  root.append(svg("text", { x: (m.l + width - m.r) / 2, y: height - 4, "text-anchor": "middle" }, xlabel || ""));
  root.append(svg("text", { x: 12, y: (m.t + height - m.b) / 2, "text-anchor": "middle",
    transform: `rotate(-90 12 ${(m.t + height - m.b) / 2})` }, ylabel || ""));
  if (mark !== undefined && mark !== null && mark >= x0 && mark <= x1) {
    root.append(svg("line", { x1: X(mark), x2: X(mark), y1: m.t, y2: height - m.b, class: "mark" }));
  }
  for (const s of series) {
    const p = s.x.map((x, i) => [x, tr(s.y[i])]).filter(([x, y]) => y !== null && Number.isFinite(y) && Number.isFinite(x));
    root.append(svg("polyline", { points: p.map(([x, y]) => `${X(x).toFixed(1)},${Y(y).toFixed(1)}`).join(" "),
      fill: "none", stroke: s.color, "stroke-width": 1.8, "stroke-dasharray": s.dash || null }));
    for (const [x, y] of p.length <= 80 ? p : []) {
      root.append(svg("circle", { cx: X(x), cy: Y(y), r: 2.2, fill: s.color },
        svg("title", {}, `${s.name}: ${xlabel || "x"} ${fmt(x)} → ${fmt(logy ? 10 ** y : y, 4)}`)));
    }
  }
  return root;
}

// Vertical bars, one per label.
function barChart({ title, labels, values, xlabel, ylabel, width = 380, height = 220, color = "#6f8fd8", rotate = false }) {
  const m = { l: 56, r: 12, t: 24, b: rotate ? 60 : 36 };
  const root = svg("svg", { class: "chart", width, height, viewBox: `0 0 ${width} ${height}`, role: "img" });
  root.append(svg("text", { x: m.l, y: 15, class: "title" }, title || ""));
  const finite = values.filter((v) => Number.isFinite(v));
  if (!finite.length) {
    root.append(svg("text", { x: width / 2, y: height / 2, "text-anchor": "middle" }, "no data"));
    return root;
  }
  const y1 = Math.max(...finite) * 1.05 || 1;
  const n = values.length, bw = (width - m.l - m.r) / n;
  const Y = (y) => height - m.b - (y / y1) * (height - m.t - m.b);
  for (const t of niceTicks(0, y1, 4)) {
    root.append(svg("line", { x1: m.l, x2: width - m.r, y1: Y(t), y2: Y(t), class: "grid" }));
    root.append(svg("text", { x: m.l - 5, y: Y(t) + 4, "text-anchor": "end" }, fmt(t, 3)));
  }
  const every = Math.ceil(n / (rotate ? 24 : 12));
  values.forEach((v, i) => {
    const x = m.l + i * bw;
    const h = Number.isFinite(v) ? height - m.b - Y(v) : 0;
    root.append(svg("rect", { x: x + bw * 0.1, y: height - m.b - h, width: Math.max(1, bw * 0.8), height: h, fill: color },
      svg("title", {}, `${labels[i]}: ${fmt(v, 4)}`)));
    if (i % every === 0) {
      const cx = x + bw / 2, cy = height - m.b + 13;
      const text = String(labels[i]);
      root.append(svg("text", { x: cx, y: cy, "text-anchor": rotate ? "end" : "middle",
        transform: rotate ? `rotate(-40 ${cx} ${cy})` : null }, text.length > 10 ? `${text.slice(0, 9)}…` : text,
      svg("title", {}, text)));
    }
  });
  root.append(svg("line", { x1: m.l, x2: width - m.r, y1: height - m.b, y2: height - m.b, class: "axis" }));
  root.append(svg("text", { x: (m.l + width - m.r) / 2, y: height - 3, "text-anchor": "middle" }, xlabel || ""));
  root.append(svg("text", { x: 12, y: (m.t + height - m.b) / 2, "text-anchor": "middle",
    transform: `rotate(-90 12 ${(m.t + height - m.b) / 2})` }, ylabel || ""));
  return root;
}

function legend(items) {
  return el("div", { class: "legend" }, items.map(([name, color]) =>
    el("span", {}, el("span", { class: "swatch", style: `background:${color}` }), name)));
}

// ---------------------------------------------------------------------------------- images

function imageAvailable(run) { return run && run.image && run.image.available; }
function imagePath(run, sid) { return `img/${encodeURIComponent(run.slug)}/${Number(sid)}.png`; }

// A sample image at `size` px, optionally with a patch heatmap (base64 uint8, grid_h x grid_w) over it.
function frame(run, sid, size, heat, grid) {
  const box = el("div", { class: "frame", style: `width:${size}px;height:${size}px` });
  if (imageAvailable(run)) {
    box.append(el("img", { class: "pix sample", src: imagePath(run, sid), alt: `sample ${sid}`, width: size, height: size }));
  }
  if (heat && grid) {
    const c = el("canvas", { class: "heat pix", width: grid[1], height: grid[0] });
    paintHeat(c, heat, grid);
    box.append(c);
  }
  return box;
}

function paintHeat(canvas, b64, grid) {
  const bytes = Uint8Array.from(atob(b64), (ch) => ch.charCodeAt(0));
  const [h, w] = grid;
  const ctx = canvas.getContext("2d");
  const img = ctx.createImageData(w, h);
  for (let i = 0; i < h * w && i < bytes.length; i++) {
    const v = bytes[i] / 255; // "hot" colormap; transparent where the feature is silent
    img.data[4 * i] = 255;
    img.data[4 * i + 1] = Math.round(255 * Math.min(1, Math.max(0, 1.6 * v - 0.45)));
    img.data[4 * i + 2] = Math.round(255 * Math.max(0, 2.2 * v - 1.6) * 0.6);
    img.data[4 * i + 3] = v > 0 ? Math.round(255 * (0.12 + 0.6 * v)) : 0;
  }
  ctx.putImageData(img, 0, 0);
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

// ---------------------------------------------------------------------------------- overview

function overview() {
  crumbs({ text: "Overview" });
  main.replaceChildren(el("h1", { text: "Overview" }));
  if (SITE.warnings && SITE.warnings.length) {
    main.append(el("div", { class: "note" }, SITE.warnings.map((w) => el("div", { text: w }))));
  }
  for (const run of SITE.runs) main.append(runCard(run));
  main.append(el("h2", { text: "Sparse autoencoders" }), saeTable());
  main.append(metricPlots());
  done("Overview");
}

function runCard(run) {
  const s = run.sampling || {}, m = run.model || {}, cap = run.capture || {}, sae = run.sae || {};
  const classes = run.classes.map((c) => c.class_name ?? String(c.class_id));
  const card = el("section", { class: "card run", id: `run-${run.slug}` },
    el("h2", {}, "Run ", el("code", { text: run.run_id })),
    el("div", { class: "row" },
      kvTable([
        ["model", String(run.model_source ?? m.source ?? "–")],
        ["sampler", `${s.scheduler ?? "?"}, ${s.num_steps ?? "?"} steps, guidance ${s.guidance_scale ?? "?"}`],
        ["samples", run.n_samples],
        ["classes", `${classes.length}: ${classes.slice(0, 12).join(", ")}${classes.length > 12 ? ", …" : ""}`],
        ["captured layers", (cap.layers || []).join(", ") || "–"],
        ["sites", (cap.sites || []).join(", ") || "–"],
        ["SAE", sae.n_latents ? `${(sae.variants || []).join(" / ")}, ${sae.n_latents} latents, k=${sae.k}` : "–"],
        ["timesteps", run.timesteps ? `${run.timesteps[0]} → ${run.timesteps[run.timesteps.length - 1]}` : "–"],
        ["created", run.created_at], ["code version", String(run.code_version ?? "–")],
      ]),
      el("div", {},
        el("h3", { text: "Sample grid" }),
        imageAvailable(run)
          ? el("div", { class: "grid-samples", style: `grid-template-columns: repeat(${Math.min(10, Math.max(1, run.classes.length))}, 64px)` }, run.grid.map((g) => el("div", { class: "tile" },
            link(sampleUrl(run.run_id, g.sample_id), frame(run, g.sample_id, 64)),
            el("div", { class: "caption", text: g.class_name ?? String(g.class_id) }))))
          : el("p", { class: "muted", text: run.image.reason || "no images" }))),
    el("details", {}, el("summary", { text: "full run config" }), el("pre", { class: "json", text: JSON.stringify(run.config, null, 2) })));
  return card;
}

function saeTable() {
  const cols = ["SAE", "layer", "site", "variant", "latents", "k", "tokens", "NMSE", "cosine", "expl. var.", "L0", "dead", "spliced acc.", "features"];
  const body = SITE.saes.map((s) => {
    const h = (s.metrics.heldout || s.metrics.train || { overall: {} }).overall;
    const sp = (s.splice.heldout || {});
    return el("tr", {},
      el("td", { class: "text" }, link(saeUrl(s), s.sae_id)),
      el("td", { text: s.layer }), el("td", { text: s.site }), el("td", { text: s.variant }),
      el("td", { text: s.n_latents }), el("td", { text: fmt(s.k) }), el("td", { text: fmt(s.tokens_seen) }),
      el("td", { text: fmt(h.nmse, 4) }), el("td", { text: fmt(h.cosine, 4) }), el("td", { text: fmt(h.explained_variance, 4) }),
      el("td", { text: fmt(h.l0, 3) }), el("td", { text: pct(h.dead_fraction) }),
      el("td", { text: sp.accuracy_spliced === undefined ? "–" : pct(sp.accuracy_spliced) }),
      el("td", {}, s.n_features ? link(saeUrl(s), String(s.n_features)) : el("span", { class: "muted", text: "not computed" })));
  });
  return el("div", {},
    el("table", { class: "data", id: "sae-table" },
      el("thead", {}, el("tr", {}, cols.map((c, i) => el("th", { class: i === 0 ? "text" : null, text: c })))),
      el("tbody", {}, body)),
    el("p", { class: "muted", text: "Metrics on held-out samples over all steps; dead = no firing on the evaluation tokens." }));
}

function metricPlots() {
  const box = el("section", { id: "plots" });
  const select = el("select", { id: "split" }, ["heldout", "train"].map((s) => el("option", { value: s, text: s })));
  const charts = el("div");
  box.append(el("h2", { text: "Metrics by diffusion step" }),
    el("div", { class: "controls" }, el("label", {}, "split", select)), charts);
  const groups = new Map();
  for (const s of SITE.saes) {
    const key = `${s.run_id}|${s.layer}|${s.site}`;
    if (!groups.has(key)) groups.set(key, []);
    groups.get(key).push(s);
  }
  const draw = () => {
    charts.replaceChildren();
    for (const saes of groups.values()) {
      const first = saes[0];
      const series = (key) => saes.map((s, i) => {
        const m = s.metrics[select.value];
        return { name: s.variant, color: variantColor(s.variant, i), x: m ? m.steps : [], y: m ? m.values[key] : [] };
      });
      charts.append(el("h3", { text: `layer ${first.layer} · ${first.site}` + (SITE.runs.length > 1 ? ` · run ${first.run_id}` : "") }),
        legend(saes.map((s, i) => [s.variant, variantColor(s.variant, i)])),
        el("div", { class: "row" },
          lineChart({ title: "normalised MSE", series: series("nmse"), xlabel: "step (0 = noisiest)", ylabel: "NMSE", zero: false }),
          lineChart({ title: "L0 (active latents per token)", series: series("l0"), xlabel: "step (0 = noisiest)", ylabel: "L0" }),
          lineChart({ title: "live features (evaluation tokens)", series: series("live_features"), xlabel: "step (0 = noisiest)", ylabel: "features firing" })));
    }
    if (!groups.size) charts.append(el("p", { class: "muted", text: "No SAEs yet." }));
  };
  select.addEventListener("change", draw);
  draw();
  return box;
}

// --------------------------------------------------------------------------------- SAE page

const LIST_COLUMNS = [
  // key, header, numeric
  ["feature_id", "feature", true],
  ["label", "label", false],
  ["fire_rate", "fire rate", true],
  ["mean_act", "mean act.", true],
  ["max_act", "max act.", true],
  ["peak_step", "peak step", true],
  ["top_class", "top class", true],
  ["class_selectivity", "selectivity", true],
];
const DEFAULT_STATE = { sort: "fire_rate", dir: "desc", q: "", fr_min: "", fr_max: "", peak_min: "", peak_max: "", cls: "", sel_min: "", live: "", page: "0", size: "100" };

async function saePage() {
  const sae = requireSae();
  const run = runById(sae.run_id);
  crumbs({ text: "Overview", href: "index.html" }, { text: sae.sae_id });
  const siblings = SITE.saes.filter((s) => s.run_id === sae.run_id && s.layer === sae.layer && s.site === sae.site && s.sae_id !== sae.sae_id);
  main.replaceChildren(el("h1", {}, "Features of ", el("code", { text: sae.sae_id })),
    el("p", { class: "muted" }, saeTitle(sae),
      siblings.length ? el("span", {}, " · same layer: ", siblings.map((s, i) => [i ? ", " : "", link(saeUrl(s), s.variant)])) : null));
  if (!sae.n_features) {
    main.append(el("p", { class: "note", text: "No feature statistics for this SAE yet: the feature pass has not run (tide run computes them)." }));
    done(sae.sae_id);
    return;
  }
  const data = await getJSON(`data/sae/${encodeURIComponent(sae.slug)}/features.json`);
  const C = data.columns, n = data.n;
  const state = { ...DEFAULT_STATE, ...Object.fromEntries(new URLSearchParams(location.hash.slice(1))) };
  const classes = run ? run.classes : [];
  const className = (cid) => classNameOf(run, cid);
  const maxOf = (xs) => xs.reduce((m, v) => (v !== null && v > m ? v : m), -Infinity); // no spread: 100k+ args overflow
  const lastStep = maxOf(C.peak_step || []);
  const input = (key, type, attrs) => {
    const e = el("input", { id: `f-${key}`, type, value: state[key], ...(attrs || {}) });
    e.addEventListener("input", () => { state[key] = e.value; state.page = "0"; schedule(); });
    return e;
  };
  const clsSelect = el("select", { id: "f-cls" }, el("option", { value: "", text: "any" }),
    classes.map((c) => el("option", { value: String(c.class_id), text: c.class_name ?? String(c.class_id), selected: String(c.class_id) === state.cls })));
  clsSelect.addEventListener("change", () => { state.cls = clsSelect.value; state.page = "0"; schedule(); });
  const live = el("input", { id: "f-live", type: "checkbox", checked: state.live === "1" });
  live.addEventListener("change", () => { state.live = live.checked ? "1" : ""; state.page = "0"; schedule(); });
  const size = el("select", { id: "f-size" }, ["50", "100", "250", "500"].map((v) => el("option", { value: v, text: v, selected: v === state.size })));
  size.addEventListener("change", () => { state.size = size.value; state.page = "0"; schedule(); });
  main.append(el("div", { class: "controls" },
    el("label", {}, "feature id or label", input("q", "search", { placeholder: "e.g. 42 or stroke" })),
    el("label", {}, "fire rate ≥ %", input("fr_min", "number", { step: "any", min: 0 })),
    el("label", {}, "fire rate ≤ %", input("fr_max", "number", { step: "any", min: 0 })),
    el("label", {}, "peak step ≥", input("peak_min", "number", { step: 1, min: 0 })),
    el("label", {}, "peak step ≤", input("peak_max", "number", { step: 1, min: 0, placeholder: Number.isFinite(lastStep) ? String(lastStep) : "" })),
    el("label", {}, "top class", clsSelect),
    el("label", {}, "selectivity ≥", input("sel_min", "number", { step: 0.05, min: 0, max: 1 })),
    el("label", { class: "check" }, live, "live only"),
    el("label", {}, "rows", size)));
  const count = el("span", { id: "count" });
  const prev = el("button", { id: "prev", text: "‹ prev" }), next = el("button", { id: "next", text: "next ›" });
  prev.addEventListener("click", () => { state.page = String(Number(state.page) - 1); render(); });
  next.addEventListener("click", () => { state.page = String(Number(state.page) + 1); render(); });
  const head = el("tr", {}, el("th", { text: "" }), LIST_COLUMNS.map(([key, label, num]) => {
    const th = el("th", { class: `sortable${num ? "" : " text"}`, "data-key": key, text: label });
    th.addEventListener("click", () => {
      state.dir = state.sort === key && state.dir === "desc" ? "asc" : "desc";
      if (state.sort !== key && !num) state.dir = "asc";
      state.sort = key; state.page = "0";
      order = filterRows(); render();
    });
    return th;
  }));
  const tbody = el("tbody");
  main.append(el("div", { class: "pager" }, prev, next, count),
    el("table", { class: "data", id: "feature-table" }, el("thead", {}, head), tbody));
  const maxFire = Math.max(1e-12, maxOf(C.fire_rate || []));

  let order = [];
  const num = (v) => (v === "" || v === undefined ? null : Number(v));
  function filterRows() {
    const q = state.q.trim().toLowerCase().replace(/^#/, "");
    const qId = /^\d+$/.test(q) ? Number(q) : null;
    const frMin = num(state.fr_min), frMax = num(state.fr_max), pMin = num(state.peak_min), pMax = num(state.peak_max);
    const sel = num(state.sel_min), cls = state.cls === "" ? null : Number(state.cls);
    const out = [];
    for (let i = 0; i < n; i++) {
      if (qId !== null) { if (C.feature_id[i] !== qId) continue; }
      else if (q && !String(C.label[i] ?? "").toLowerCase().includes(q)) continue;
      const fr = C.fire_rate[i];
      if (state.live === "1" && !(fr > 0)) continue;
      if (frMin !== null && !(fr * 100 >= frMin)) continue;
      if (frMax !== null && !(fr * 100 <= frMax)) continue;
      if (pMin !== null && !(C.peak_step[i] >= pMin)) continue;
      if (pMax !== null && !(C.peak_step[i] <= pMax)) continue;
      if (cls !== null && C.top_class[i] !== cls) continue;
      if (sel !== null && !(C.class_selectivity[i] >= sel)) continue;
      out.push(i);
    }
    const col = C[state.sort] || C.feature_id, dir = state.dir === "asc" ? 1 : -1;
    const key = state.sort === "top_class" ? (i) => className(col[i]) : (i) => col[i];
    out.sort((a, b) => {
      const x = key(a), y = key(b);
      if (x === y || (x == null && y == null)) return C.feature_id[a] - C.feature_id[b];
      if (x == null) return 1; // missing values last in either direction
      if (y == null) return -1;
      return (x < y ? -1 : 1) * dir;
    });
    return out;
  }
  function render() {
    const size = Number(state.size) || 100;
    const pages = Math.max(1, Math.ceil(order.length / size));
    const page = Math.min(Math.max(0, Number(state.page) || 0), pages - 1);
    state.page = String(page);
    const rows = order.slice(page * size, page * size + size);
    tbody.replaceChildren(...rows.map((i) => {
      const f = C.feature_id[i];
      const thumb = imageAvailable(run) && C.top_sample && C.top_sample[i] !== null
        ? el("img", { class: "thumb", src: imagePath(run, C.top_sample[i]), alt: "" }) : null;
      return el("tr", { "data-feature": f },
        el("td", {}, thumb),
        el("td", {}, link(featureUrl(sae.sae_id, f), `#${f}`)),
        el("td", { class: "text" }, C.label[i] ? el("span", { class: "label-pill", text: C.label[i] }) : ""),
        el("td", {}, pct(C.fire_rate[i]), el("span", { class: "bar", style: `width:${Math.round(40 * (C.fire_rate[i] || 0) / maxFire)}px` })),
        el("td", { text: fmt(C.mean_act[i]) }), el("td", { text: fmt(C.max_act[i]) }),
        el("td", { text: fmt(C.peak_step[i]) }),
        el("td", { text: className(C.top_class[i]) }),
        el("td", { text: fmt(C.class_selectivity[i], 2) }));
    }));
    for (const th of head.querySelectorAll("th[data-key]")) {
      const on = th.dataset.key === state.sort;
      th.classList.toggle("sorted", on);
      th.textContent = LIST_COLUMNS.find((c) => c[0] === th.dataset.key)[1] + (on ? (state.dir === "asc" ? " ▲" : " ▼") : "");
    }
    const shown = order.length ? `${page * size + 1}–${page * size + rows.length}` : "0";
    count.textContent = `${shown} of ${order.length} features` + (order.length < n ? ` (filtered from ${n})` : "") + ` · page ${page + 1}/${pages}`;
    prev.disabled = page === 0;
    next.disabled = page >= pages - 1;
    const changed = Object.entries(state).filter(([k, v]) => v !== DEFAULT_STATE[k]);
    history.replaceState(null, "", changed.length ? `#${new URLSearchParams(changed)}` : location.pathname + location.search);
  }
  let timer = null;
  function schedule() { // typing refilters once it pauses; data-busy tells tests (and CSS) a render is due
    document.body.dataset.busy = "1";
    clearTimeout(timer);
    timer = setTimeout(() => { order = filterRows(); render(); delete document.body.dataset.busy; }, 80);
  }
  order = filterRows();
  render();
  done(`${sae.sae_id} features`);
}

// ----------------------------------------------------------------------------- feature page

async function featurePage() {
  const sae = requireSae();
  const run = runById(sae.run_id);
  const f = Number(params.get("f"));
  crumbs({ text: "Overview", href: "index.html" }, { text: sae.sae_id, href: saeUrl(sae) }, { text: `feature ${params.get("f")}` });
  if (!Number.isInteger(f) || f < 0 || f >= sae.n_latents || params.get("f") === "") {
    throw new Error(`feature ${JSON.stringify(params.get("f"))} is not a latent of ${sae.sae_id}: use an id in 0..${sae.n_latents - 1}`);
  }
  if (!sae.n_features) {
    main.replaceChildren(el("h1", { text: `Feature #${f}` }),
      el("p", { class: "note", text: "No feature statistics for this SAE yet: the feature pass has not run." }));
    done(`feature ${f}`);
    return;
  }
  const chunk = await getJSON(`data/sae/${encodeURIComponent(sae.slug)}/f/${Math.floor(f / SITE.chunk)}.json`);
  const d = chunk.features[String(f)];
  if (!d) throw new Error(`feature ${f} of ${sae.sae_id} has no rows in the warehouse`);
  d.classes = rowsOf(d.classes);
  d.neighbors = rowsOf(d.neighbors);
  for (const scope of Object.keys(d.top)) d.top[scope] = rowsOf(d.top[scope]);
  const st = d.stats;
  const className = (cid) => classNameOf(run, cid);
  main.replaceChildren(
    el("h1", {}, `Feature #${f} `, st.label ? el("span", { class: "label-pill", id: "feature-label", text: st.label }) : null),
    el("p", { class: "muted" }, link(saeUrl(sae), sae.sae_id), ` · ${saeTitle(sae)} · `,
      f > 0 ? link(featureUrl(sae.sae_id, f - 1), "‹ previous", { id: "prev-feature" }) : null,
      f > 0 && f < sae.n_latents - 1 ? " · " : null,
      f < sae.n_latents - 1 ? link(featureUrl(sae.sae_id, f + 1), "next ›", { id: "next-feature" }) : null));
  const known = new Set(["fire_rate", "mean_act", "max_act", "peak_step", "top_class", "top_class_name", "class_selectivity", "label"]);
  main.append(el("section", { class: "card" }, kvTable([
    ["fire rate", pct(st.fire_rate)], ["mean activation (when firing)", st.mean_act], ["max activation", st.max_act],
    ["peak step", stepLabel(run, st.peak_step)], ["top class", st.top_class_name ?? className(st.top_class)],
    ["class selectivity", st.class_selectivity],
    ...Object.entries(st).filter(([k]) => !known.has(k)).map(([k, v]) => [k.replaceAll("_", " "),
      typeof v === "number" ? v : Array.isArray(v) ? v.map((x) => fmt(x)).join(" · ") : String(v ?? "–")]),
  ])));
  main.append(topImages(d, run, st, className));
  const s = d.steps;
  const charts = el("div", { class: "row" });
  if (s.step && s.step.length) {
    charts.append(
      lineChart({ title: "fire rate by step", series: [{ name: "fire rate", color: "#1f77b4", x: s.step, y: s.fire_rate }], xlabel: "step (0 = noisiest)", ylabel: "fire rate", mark: st.peak_step }),
      lineChart({ title: "activation by step", xlabel: "step (0 = noisiest)", ylabel: "activation", mark: st.peak_step, series: [
        { name: "mean when firing", color: "#2ca02c", x: s.step, y: s.mean_act },
        { name: "max", color: "#d62728", x: s.step, y: s.max_act, dash: "4 3" }] }));
  }
  if (s.step && s.class_selectivity) {
    charts.append(lineChart({ title: "class selectivity by step", series: [{ name: "selectivity", color: "#8c564b", x: s.step, y: s.class_selectivity }],
      xlabel: "step (0 = noisiest)", ylabel: "selectivity", mark: st.peak_step }));
  }
  const cls = [...d.classes].sort((a, b) => (b.fire_rate ?? 0) - (a.fire_rate ?? 0)).slice(0, 30);
  const clsOrdered = cls.length <= 12 ? [...cls].sort((a, b) => a.class_id - b.class_id) : cls;
  charts.append(barChart({ title: cls.length < d.classes.length ? `fire rate by class (top ${cls.length})` : "fire rate by class",
    labels: clsOrdered.map((c) => className(c.class_id)), values: clsOrdered.map((c) => c.fire_rate ?? NaN),
    xlabel: "class", ylabel: "fire rate", rotate: clsOrdered.length > 12 }));
  if (d.hist && d.hist.counts.length) {
    const e = d.hist.edges;
    charts.append(barChart({ title: "activation histogram (when firing)", labels: d.hist.counts.map((_, i) => fmt(e[i], 2)),
      values: d.hist.counts, xlabel: "activation (bin start)", ylabel: "tokens", color: "#9b7ad8", rotate: true }));
  }
  main.append(el("h2", { text: "Activation, classes and histogram" }),
    legend([["fire rate", "#1f77b4"], ["mean activation when firing", "#2ca02c"], ["max activation", "#d62728"], ["peak step", "#b42318"]]), charts);
  main.append(el("h2", { text: "Nearest features by decoder cosine" }), neighbors(d, sae));
  if (d.edits && d.edits.length) main.append(steering(d.edits, run, className));
  done(`feature ${f} · ${sae.sae_id}`);
}

function topImages(d, run, st, className) {
  const scopes = Object.keys(d.top);
  const box = el("section", { id: "top-images" }, el("h2", { text: "Top-activating images" }));
  if (!scopes.length) { box.append(el("p", { class: "muted", text: "No top images (the feature never fired)." })); return box; }
  const names = { overall: "overall: each image at its strongest step", peak_step: `at the peak step (${stepLabel(run, st.peak_step)})` };
  const scope = el("select", { id: "scope" }, scopes.map((s) => el("option", { value: s, text: names[s] || s })));
  const heat = el("input", { id: "heat-toggle", type: "checkbox", checked: true });
  const tiles = el("div", { class: "tiles", id: "tiles" });
  box.append(el("div", { class: "controls" }, el("label", {}, "images", scope), el("label", { class: "check" }, heat, "patch heatmap")), tiles);
  const draw = () => {
    tiles.replaceChildren(...d.top[scope.value].map((t) => el("div", { class: "tile", "data-sample": t.sample_id },
      link(sampleUrl(run ? run.run_id : "", t.sample_id), frame(run, t.sample_id, 112, heat.checked ? t.heat : null, d.grid)),
      el("div", { class: "caption" }, `#${t.rank} · act ${fmt(t.activation)}`, el("br"),
        `${stepLabel(run, t.step)}`, el("br"), `class ${className(t.class_id)}`))));
  };
  scope.addEventListener("change", draw);
  heat.addEventListener("change", draw);
  draw();
  if (!imageAvailable(run)) box.append(el("p", { class: "muted", text: `Heatmaps only: ${run ? run.image.reason : "unknown run"}` }));
  return box;
}

function neighbors(d, sae) {
  if (!d.neighbors.length) return el("p", { class: "muted", text: "No neighbours computed." });
  return el("table", { class: "data", id: "neighbors", style: "max-width:640px" },
    el("thead", {}, el("tr", {}, ["rank", "feature", "cosine", "fire rate", "label"].map((c, i) => el("th", { class: i === 4 ? "text" : null, text: c })))),
    el("tbody", {}, d.neighbors.map((n) => el("tr", {},
      el("td", { text: n.rank }), el("td", {}, link(featureUrl(sae.sae_id, n.neighbor_id), `#${n.neighbor_id}`)),
      el("td", { text: fmt(n.cosine, 3) }), el("td", { text: pct(n.neighbor_fire_rate) }),
      el("td", { class: "text", text: n.neighbor_label ?? "" })))));
}

function steering(edits, run, className) {
  return el("section", { id: "steering" }, el("h2", { text: "Steering preview" }),
    el("p", { class: "muted", text: "Images regenerated with this feature edited during sampling (v_edits); the judge's verdict before and after." }),
    el("table", { class: "data", style: "max-width:900px" },
      el("thead", {}, el("tr", {}, ["sample", "class", "edit", "strength", "steps", "judge before", "judge after", "flipped"].map((c) => el("th", { text: c })))),
      el("tbody", {}, edits.map((e) => el("tr", {},
        el("td", {}, link(sampleUrl(e.run_id, e.sample_id), imageAvailable(run) ? el("img", { class: "thumb", src: imagePath(run, e.sample_id), alt: "" }) : `#${e.sample_id}`)),
        el("td", { class: "text", text: e.class_name ?? className(e.class_id) }),
        el("td", { class: "text", text: [e.op ?? "edit", e.target_class != null ? `towards ${className(e.target_class)}` : ""].join(" ").trim() }),
        el("td", { text: fmt(e.strength) }),
        el("td", { text: `${fmt(e.step_start)}–${fmt(e.step_end)}` }),
        el("td", { class: "text", text: `${className(e.pred_before)} (${pct(e.conf_before)})` }),
        el("td", { class: "text", text: `${className(e.pred_after)} (${pct(e.conf_after)})` }),
        el("td", { text: e.flipped ? "yes" : "no" }))))));
}

// ------------------------------------------------------------------------------ sample page

async function samplePage() {
  const run = runById(params.get("run"));
  if (!run) throw new Error(`unknown run ${JSON.stringify(params.get("run"))}; this site has: ${SITE.runs.map((r) => r.run_id).join(", ")}`);
  const sid = Number(params.get("s"));
  crumbs({ text: "Overview", href: "index.html" }, { text: `run ${run.run_id}`, href: `index.html#run-${run.slug}` }, { text: `sample ${params.get("s")}` });
  if (!Number.isInteger(sid) || sid < 0 || params.get("s") === "") throw new Error(`sample ${JSON.stringify(params.get("s"))} is not a sample id`);
  const [lo, hi] = run.sample_ids || [0, -1];
  const block = sid >= lo && sid <= hi
    ? await getJSON(`data/samples/${encodeURIComponent(run.slug)}/${Math.floor(sid / SITE.sample_block)}.json`).catch(() => null)
    : null; // ids outside the run are refused without a request (a 404 would be a console error)
  const s = block && block.samples[String(sid)];
  if (!s) throw new Error(`run ${run.run_id} has no sample ${sid} (it has ${run.n_samples} samples)`);
  const className = (cid) => classNameOf(run, cid);
  main.replaceChildren(el("h1", { text: `Sample ${sid}` }),
    el("p", { class: "muted" }, sid > 0 ? link(sampleUrl(run.run_id, sid - 1), "‹ previous", { id: "prev-sample" }) : null,
      sid > 0 ? " · " : null, sid < run.n_samples - 1 ? link(sampleUrl(run.run_id, sid + 1), "next ›", { id: "next-sample" }) : null),
    el("div", { class: "row" }, imageAvailable(run) ? frame(run, sid, 256) : el("p", { class: "muted", text: run.image.reason }),
      el("section", { class: "card" }, kvTable([
        ["class", s.class_name ?? className(s.class_id)], ["class id", s.class_id], ["seed", s.seed], ["shard", s.shard],
        ["judge prediction", s.judge_pred === null ? "not judged" : `${className(s.judge_pred)} (${pct(s.judge_conf)})`],
        ["run", link(`index.html#run-${run.slug}`, run.run_id)]]))));
  const tops = SITE.saes.filter((sae) => s.top[sae.sae_id] && s.top[sae.sae_id].length);
  main.append(el("h2", { text: "Features that rank this image among their top images" }));
  if (!tops.length) { main.append(el("p", { class: "muted", text: "None: no feature ranks this image among its top images." })); done(`sample ${sid}`); return; }
  main.append(el("table", { class: "data", id: "appearances" },
    el("thead", {}, el("tr", {}, el("th", { class: "text", text: "SAE" }), el("th", { class: "text", text: "features (rank, activation, step)" }))),
    el("tbody", {}, tops.map((sae) => el("tr", {},
      el("td", { class: "text" }, link(saeUrl(sae), `layer ${sae.layer} · ${sae.variant}`)),
      el("td", { class: "text" }, s.top[sae.sae_id].map(([f, rank, step, act], i) => el("span", {}, i ? " · " : "",
        link(featureUrl(sae.sae_id, f), `#${f}`, { title: `rank ${rank}, activation ${fmt(act)}, ${stepLabel(run, step)}` }),
        el("span", { class: "muted", text: ` (${rank}, ${fmt(act)}, s${step})` })))))))));
  done(`sample ${sid}`);
}

// ------------------------------------------------------------------------------------- start

const PAGES = { overview, sae: saePage, feature: featurePage, sample: samplePage };

(async function start() {
  try {
    SITE = await getJSON("data/site.json");
    await PAGES[document.body.dataset.page]();
  } catch (err) {
    fail(`Could not show this page: ${err.message}`);
  }
})();
