// TIDE feature browser, what the warehouse found beyond single features: the factor probes (which
// generative factor each layer can tell at each step) on the overview, the edits page (every edit's images
// before and after, judged), and the steering preview of a feature page. Loaded after charts.js.
"use strict";

// One colour per generative factor on every page (feature pages, probes), by name.
const FACTOR_COLORS = { background: "#1f77b4", class: "#ff7f0e", colour: "#2ca02c", thickness: "#9467bd" };
function factorColor(name, i) { return FACTOR_COLORS[name] || EXTRA_COLORS[i % EXTRA_COLORS.length]; }

// ------------------------------------------------------------------------ overview: factor probes

// Probe accuracy by step, a chart per (run, layer, site), a line per factor (dashed: chance). The select
// picks the probe: logistic regression on the raw channels (k = 0) or on an SAE's k best latents.
function probePlots() {
  const saes = SITE.saes.filter((s) => s.probes);
  if (!saes.length) return null;
  const rows = new Map(saes.map((s) => [s.sae_id, rowsOf(s.probes)]));
  const options = [["raw", 0, "raw channels (all)"]];
  for (const v of [...new Set(saes.map((s) => s.variant))]) {
    const ks = [...new Set(saes.filter((s) => s.variant === v).flatMap((s) => rows.get(s.sae_id).map((r) => r.k)))].filter((k) => k > 0).sort((a, b) => a - b);
    for (const k of ks) options.push([v, k, `${v} latents, best ${k}`]);
  }
  const select = el("select", { id: "probe" }, options.map(([v, k, text], i) => el("option", { value: String(i), text })));
  const charts = el("div", { class: "row" });
  const groups = new Map();
  for (const s of saes) {
    const key = `${s.run_id}|${s.layer}|${s.site}`;
    if (!groups.has(key)) groups.set(key, []);
    groups.get(key).push(s);
  }
  const factors = [...new Set(saes.flatMap((s) => rows.get(s.sae_id).map((r) => r.factor)))].sort();
  const draw = () => {
    const [variant, k] = options[Number(select.value)];
    charts.replaceChildren();
    for (const group of groups.values()) {
      const sae = variant === "raw" ? group[0] : group.find((s) => s.variant === variant);
      const mine = sae ? rows.get(sae.sae_id).filter((r) => r.k === k) : [];
      const series = factors.flatMap((f, i) => {
        const rs = mine.filter((r) => r.factor === f);
        return [{ name: f, color: factorColor(f, i), x: rs.map((r) => r.step), y: rs.map((r) => r.accuracy) },
          { name: `${f} chance`, color: factorColor(f, i), dash: "2 4", x: rs.map((r) => r.step), y: rs.map((r) => r.chance) }];
      });
      charts.append(lineChart({ title: `layer ${group[0].layer} · ${group[0].site}` + (SITE.runs.length > 1 ? ` · run ${group[0].run_id}` : ""),
        series, xlabel: "step (0 = noisiest)", ylabel: "probe accuracy (5-fold)" }));
    }
  };
  select.addEventListener("change", draw);
  draw();
  return el("section", { id: "probes" }, el("h2", { text: "Generative factors by layer and step" }),
    el("p", { class: "muted", text: "How well a logistic-regression probe reads each factor of the final image from the activations at each step (v_factor_probes; dashed: chance). Where a factor's line rises is where that layer has decided it." }),
    el("div", { class: "controls" }, el("label", {}, "probe on", select)),
    legend(factors.map((f, i) => [f, factorColor(f, i)])), charts);
}

// ------------------------------------------------------------------------------------ edits page

function editImage(src, alt) {
  return src ? el("img", { class: "thumb big", src, alt }) : el("span", { class: "muted", text: "–" });
}

async function editsPage() {
  crumbs({ text: "Overview", href: "index.html" }, { text: "Edits" });
  main.replaceChildren(el("h1", { text: "Edits" }));
  if (!SITE.n_edits) {
    main.append(el("p", { class: "muted", text: "No edits yet: `tide edit --config …` (or the edits asset) regenerates samples with features edited and records them here." }));
    done("Edits");
    return;
  }
  const { edits } = await getJSON("data/edits.json");
  main.append(el("p", { class: "muted", text: `${edits.length} edit${edits.length === 1 ? "" : "s"} (v_edits): each sample regenerated from the same seed with the SAE's features edited during sampling, and the judge's verdict on both images.` }),
    el("ul", {}, edits.map((e) => el("li", {}, link(`#${e.edit_id}`, editTitle(e))))));
  for (const e of edits) main.append(editCard(e));
  if (location.hash) document.getElementById(location.hash.slice(1))?.scrollIntoView();
  done("Edits");
}

function conceptLabel(c) {  // "colour:red" (edits' config) -> "red (colour)"
  const i = c.indexOf(":");
  return i < 0 ? c : `${c.slice(i + 1)} (${c.slice(0, i)})`;
}

function editTitle(e) {
  const target = e.concept ? ` towards ${conceptLabel(e.concept)}` : e.target_class != null ? ` towards ${e.target_class}` : "";
  return `${e.op}${e.pooled ? " pooled" : ""} ${fmt(e.strength)} at steps ${e.step_start}–${e.step_end}, layer ${e.layer ?? "?"} ${e.variant ?? ""}${target}`;
}

function editCard(e) {
  const sae = saeById(e.sae_id);
  const run = sae ? runById(sae.run_id) : null;
  const className = (cid) => (cid === null || cid === undefined ? "–" : classNameOf(run, cid));
  const feats = e.per_sample_features ? "chosen per sample" : e.feature_ids.length
    ? el("span", {}, e.feature_ids.slice(0, 16).map((f, i) => el("span", {}, i ? ", " : "", link(featureUrl(e.sae_id, f), `#${f}`))), e.feature_ids.length > 16 ? " …" : "")
    : "all latents";
  const s = e.sampler || {};
  // a concept the judge scores (a class, a styled factor value): whether each image shows it
  const scored = e.concept && e.rows.some((r) => r.concept_before != null);
  const shows = (v) => el("td", { text: v == null ? "–" : v ? "yes" : "no" });
  const conceptCols = scored ? [`shows ${e.concept.split(":").pop()} before`, "after"] : [];
  return el("section", { class: "card", id: e.edit_id }, el("h2", { text: editTitle(e) }),
    kvTable([["edit", e.edit_id], ["SAE", sae ? link(saeUrl(sae), e.sae_id) : e.sae_id], ["features", feats],
      ["CFG renormalisation", e.cfg_renorm == null ? "off" : fmt(e.cfg_renorm)], ["unconditional", e.unconditional ? "yes" : "no"],
      ["sampler", e.sampler ? `${s.scheduler ?? "?"}, ${s.num_steps ?? "?"} steps, guidance ${s.guidance_scale ?? "?"}` : "–"]]),
    el("table", { class: "data edit-rows", style: "max-width:900px" },
      el("thead", {}, el("tr", {}, ["sample", conditionNoun(run), "before", "after", "judge before", "judge after", "changed", ...conceptCols].map((c) => el("th", { text: c })))),
      el("tbody", {}, e.rows.map((r) => el("tr", {},
        el("td", {}, r.run_id ? link(sampleUrl(r.run_id, r.sample_id), `#${r.sample_id}`) : `seed of #${r.sample_id}`),
        el("td", { class: "text", text: r.class_name ?? className(r.class_id) }),
        el("td", {}, editImage(r.img_before, `sample ${r.sample_id} before`)),
        el("td", {}, editImage(r.img_after, `sample ${r.sample_id} after`)),
        el("td", { class: "text", text: r.pred_before == null ? "not judged" : `${judgeName(run, r.pred_before)} (${pct(r.conf_before)})` }),
        el("td", { class: "text", text: r.pred_after == null ? "not judged" : `${judgeName(run, r.pred_after)} (${pct(r.conf_after)})` }),
        el("td", { text: r.flipped ? "yes" : "no" }),
        ...(scored ? [shows(r.concept_before), shows(r.concept_after)] : []))))));
}

// ------------------------------------------------------------------ feature page: steering preview

function steering(edits, run, className) {
  return el("section", { id: "steering" }, el("h2", { text: "Steering preview" }),
    el("p", { class: "muted" }, "Images regenerated with this feature edited during sampling (v_edits); the judge's verdict before and after. ",
      link("edits.html", "All edits")),
    el("table", { class: "data", style: "max-width:900px" },
      el("thead", {}, el("tr", {}, ["sample", "class", "before", "after", "edit", "strength", "steps", "judge before", "judge after", "flipped"].map((c) => el("th", { text: c })))),
      el("tbody", {}, edits.map((e) => el("tr", {},
        el("td", {}, link(sampleUrl(e.run_id, e.sample_id), `#${e.sample_id}`)),
        el("td", { class: "text", text: e.class_name ?? className(e.class_id) }),
        el("td", {}, e.img_before ? editImage(e.img_before, "before") : imageAvailable(run) ? el("img", { class: "thumb", src: imagePath(run, e.sample_id), alt: "" }) : "–"),
        el("td", {}, editImage(e.img_after, "after")),
        el("td", { class: "text" }, link(`edits.html#${encodeURIComponent(e.edit_id)}`, [e.op ?? "edit", e.concept ? `towards ${e.concept}` : e.target_class != null ? `towards ${className(e.target_class)}` : ""].join(" ").trim())),
        el("td", { text: fmt(e.strength) }),
        el("td", { text: `${fmt(e.step_start)}–${fmt(e.step_end)}` }),
        el("td", { class: "text", text: `${judgeName(run, e.pred_before)} (${pct(e.conf_before)})` }),
        el("td", { class: "text", text: `${judgeName(run, e.pred_after)} (${pct(e.conf_after)})` }),
        el("td", { text: e.flipped ? "yes" : "no" }))))));
}
