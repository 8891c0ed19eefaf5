// TIDE feature browser, the pages: overview, feature list (SAE), feature and sample pages (the edits page
// is in findings.js). Each page is a shell (index/sae/feature/sample/edits.html) whose body names it;
// start() fetches data/site.json and renders that page from JSON written by dashboards/site.py, with the
// helpers of dom.js, charts.js and findings.js.
"use strict";

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
  const probes = probePlots();
  if (probes) main.append(probes);
  if (SITE.n_edits) {
    main.append(el("h2", { text: "Edits" }), el("p", {}, link("edits.html", `${SITE.n_edits} edits`),
      el("span", { class: "muted", text: ": samples regenerated with features edited, before and after" })));
  }
  done("Overview");
}

function runCard(run) {
  const s = run.sampling || {}, m = run.model || {}, cap = run.capture || {}, sae = run.sae || {};
  const spec = sae.spec || {};  // [sae.spec] of the run config: the SAE library's SAEDesign
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
        ["SAE", spec.n_latents ? `${(sae.variants || []).join(" / ")}, ${spec.n_latents} latents, k=${spec.k}` : "–"],
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
  d.concepts = rowsOf(d.concepts);
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
    ["peak step", stepLabel(run, st.peak_step)], [`top ${conditionNoun(run)}`, st.top_class_name ?? className(st.top_class)],
    [`${conditionNoun(run)} selectivity`, st.class_selectivity],
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
    charts.append(lineChart({ title: `${conditionNoun(run)} selectivity by step`, series: [{ name: "selectivity", color: "#8c564b", x: s.step, y: s.class_selectivity }],
      xlabel: "step (0 = noisiest)", ylabel: "selectivity", mark: st.peak_step }));
  }
  // Generative factors (styled digits): how much of each factor the feature's firing tells, step by step.
  const fac = rowsOf(d.factors || {}).filter((r) => r.step >= 0);
  const factorNames = [...new Set(fac.map((r) => r.factor))].sort();
  const factorChart = fac.length ? lineChart({ title: "information about each factor by step", xlabel: "step (0 = noisiest)",
    ylabel: "share of the factor's entropy", mark: st.peak_step, series: factorNames.map((n, i) => {
      const rows = fac.filter((r) => r.factor === n);
      return { name: n, color: factorColor(n, i), x: rows.map((r) => r.step), y: rows.map((r) => r.normalized_mi) };
    }) }) : null;
  // Concepts: the classes of a class-conditional run (all of them, in class order when few), or the words and
  // tags of a text-conditional run's prompts (the 30 the feature fires on most, relative to its own rate).
  const onlyClasses = d.concepts.every((c) => c.kind === "class");
  const byRate = [...d.concepts].sort((a, b) => (b.fire_rate ?? 0) - (a.fire_rate ?? 0));
  const byLift = [...d.concepts].sort((a, b) => (b.lift ?? 0) - (a.lift ?? 0));
  const con = (onlyClasses ? byRate : byLift).slice(0, 30);
  const conOrdered = onlyClasses && con.length <= 12 ? [...con].sort((a, b) => a.concept.localeCompare(b.concept, undefined, { numeric: true })) : con;
  const what = onlyClasses ? "class" : "prompt word or tag";
  charts.append(barChart({ title: con.length < d.concepts.length ? `fire rate by ${what} (top ${con.length}${onlyClasses ? "" : " by lift"})` : `fire rate by ${what}`,
    labels: conOrdered.map((c) => c.concept), values: conOrdered.map((c) => c.fire_rate ?? NaN),
    xlabel: what, ylabel: "fire rate", rotate: conOrdered.length > 12 }));
  if (d.hist && d.hist.counts.length) {
    const e = d.hist.edges;
    charts.append(barChart({ title: "activation histogram (when firing)", labels: d.hist.counts.map((_, i) => fmt(e[i], 2)),
      values: d.hist.counts, xlabel: "activation (bin start)", ylabel: "tokens", color: "#9b7ad8", rotate: true }));
  }
  main.append(el("h2", { text: "Activation, concepts and histogram" }),
    legend([["fire rate", "#1f77b4"], ["mean activation when firing", "#2ca02c"], ["max activation", "#d62728"], ["peak step", "#b42318"]]), charts);
  if (factorChart) {
    main.append(el("h2", { text: "Generative factors" }),
      legend(factorNames.map((n, i) => [n, factorColor(n, i)])), el("div", { class: "row" }, factorChart));
  }
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
        `${stepLabel(run, t.step)}`, el("br"), `${conditionNoun(run)} ${className(t.class_id)}`))));
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
        [conditionNoun(run), s.class_name ?? className(s.class_id)], [conditionNoun(run) === "prompt" ? "prompt index" : "class id", s.class_id], ["seed", s.seed], ["shard", s.shard],
        ["judge prediction", s.judge_pred === null ? "not judged" : `${judgeName(run, s.judge_pred)} (${pct(s.judge_conf)})`],
        ["run", link(`index.html#run-${run.slug}`, run.run_id)]]))));
  const tops = SITE.saes.filter((sae) => s.top[sae.sae_id] && s.top[sae.sae_id].length);
  main.append(el("h2", { text: "Features that rank this image among their top images" }));
  if (!tops.length) { main.append(el("p", { class: "muted", text: "None: no feature ranks this image among its top images." })); done(`sample ${sid}`); return; }
  main.append(el("table", { class: "data", id: "appearances" },
    el("thead", {}, el("tr", {}, el("th", { class: "text", text: "SAE" }), el("th", { class: "text", text: "features (rank, activation, step)" }))),
    el("tbody", {}, tops.map((sae) => el("tr", {},
      el("td", { class: "text" }, link(saeUrl(sae), `layer ${sae.layer} · ${sae.site} · ${sae.variant}`)),
      el("td", { class: "text" }, s.top[sae.sae_id].map(([f, rank, step, act], i) => el("span", {}, i ? " · " : "",
        link(featureUrl(sae.sae_id, f), `#${f}`, { title: `rank ${rank}, activation ${fmt(act)}, ${stepLabel(run, step)}` }),
        el("span", { class: "muted", text: ` (${rank}, ${fmt(act)}, s${step})` })))))))));
  done(`sample ${sid}`);
}

// ------------------------------------------------------------------------------------- start

const PAGES = { overview, sae: saePage, feature: featurePage, sample: samplePage, edits: editsPage };

(async function start() {
  try {
    SITE = await getJSON("data/site.json");
    await PAGES[document.body.dataset.page]();
  } catch (err) {
    fail(`Could not show this page: ${err.message}`);
  }
})();
