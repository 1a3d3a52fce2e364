// Hand-written SVG charts: a time-series line chart and a horizontal bar chart.
// Small on purpose: no library, nothing fetched, colours from CSS classes.

const NS = "http://www.w3.org/2000/svg";

function svg(tag, attrs = {}, text) {
  const node = document.createElementNS(NS, tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  if (text !== undefined) node.textContent = text;
  return node;
}

function niceMax(value) {
  if (!(value > 0)) return 1;
  const power = 10 ** Math.floor(Math.log10(value));
  for (const step of [1, 2, 2.5, 5, 10]) {
    if (value <= step * power) return step * power;
  }
  return 10 * power;
}

function fmt(value) {
  if (value === 0) return "0";
  if (Math.abs(value) >= 1000) return `${(value / 1000).toFixed(1)}k`;
  if (Math.abs(value) >= 10) return value.toFixed(0);
  if (Math.abs(value) >= 1) return value.toFixed(1);
  return value.toFixed(2);
}

const clock = (t) => new Date(t).toLocaleTimeString([], { hour12: false });

// series: [{name, cls, points: [[timeMs, valueOrNull], ...]}]; gaps where value is null.
export function lineChart({ title, series, unit = "", yMax, width = 440, height = 170 }) {
  const pad = { left: 44, right: 10, top: 22, bottom: 24 };
  const w = width - pad.left - pad.right;
  const h = height - pad.top - pad.bottom;
  const root = svg("svg", {
    viewBox: `0 0 ${width} ${height}`,
    class: "chart line-chart",
    role: "img",
    "aria-label": title,
  });
  root.append(svg("text", { x: pad.left, y: 14, class: "chart-title" }, title));
  const all = series.flatMap((s) => s.points);
  const xs = all.map((p) => p[0]);
  const values = all.map((p) => p[1]).filter((v) => v !== null && v !== undefined);
  const top = yMax ?? niceMax(Math.max(0, ...values));
  const x0 = Math.min(...xs);
  const x1 = Math.max(...xs);
  const sx = (x) => pad.left + (x1 > x0 ? ((x - x0) / (x1 - x0)) * w : w / 2);
  const sy = (y) => pad.top + h - (Math.min(y, top) / top) * h;
  for (let i = 0; i <= 4; i += 1) {
    const v = (top * i) / 4;
    root.append(svg("line", { x1: pad.left, x2: pad.left + w, y1: sy(v), y2: sy(v), class: "grid" }));
    root.append(svg("text", { x: pad.left - 4, y: sy(v) + 4, class: "tick", "text-anchor": "end" }, fmt(v) + unit));
  }
  if (xs.length) {
    root.append(svg("text", { x: pad.left, y: height - 6, class: "tick" }, clock(x0)));
    root.append(svg("text", { x: pad.left + w, y: height - 6, class: "tick", "text-anchor": "end" }, clock(x1)));
  }
  if (!values.length) {
    root.append(svg("text", { x: pad.left + w / 2, y: pad.top + h / 2, class: "empty", "text-anchor": "middle" }, "no data yet"));
  }
  let legendX = pad.left + w;
  for (const s of [...series].reverse()) {
    let d = "";
    let pen = "M";
    for (const [x, y] of s.points) {
      if (y === null || y === undefined) {
        pen = "M";
        continue;
      }
      d += `${pen}${sx(x).toFixed(1)},${sy(y).toFixed(1)}`;
      pen = "L";
    }
    if (d) root.append(svg("path", { d, class: `line ${s.cls}` }));
    const label = svg("text", { x: legendX, y: 14, class: `legend ${s.cls}`, "text-anchor": "end" }, s.name);
    root.append(label);
    legendX -= 8 + 7 * s.name.length;
  }
  return root;
}

// entries: [{label, value, cls}] drawn as horizontal bars, longest first as given.
export function barChart({ title, entries, width = 320 }) {
  const row = 20;
  const labelW = 120;
  const height = 24 + row * Math.max(1, entries.length);
  const root = svg("svg", {
    viewBox: `0 0 ${width} ${height}`,
    class: "chart bar-chart",
    role: "img",
    "aria-label": title,
  });
  root.append(svg("text", { x: 0, y: 14, class: "chart-title" }, title));
  const max = Math.max(1, ...entries.map((e) => e.value));
  const barW = width - labelW - 40;
  entries.forEach((entry, i) => {
    const y = 22 + i * row;
    root.append(svg("text", { x: labelW - 6, y: y + 13, class: "tick", "text-anchor": "end" }, entry.label));
    root.append(svg("rect", { x: labelW, y: y + 2, height: row - 6, width: Math.max(1, (entry.value / max) * barW), class: `bar ${entry.cls || ""}` }));
    root.append(svg("text", { x: labelW + (entry.value / max) * barW + 4, y: y + 13, class: "tick" }, String(entry.value)));
  });
  if (!entries.length) root.append(svg("text", { x: labelW, y: 36, class: "empty" }, "none"));
  return root;
}
