// TIDE feature browser, drawing: SVG line and bar charts, legends, and sample images with their patch
// heatmaps painted on a canvas. Loaded after dom.js, before app.js.
"use strict";

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
