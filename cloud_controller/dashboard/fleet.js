// Fleet overview: counts (status, hardware class, variant, staleness), live fleet charts
// (throughput, p50/p99 latency, offload ratio, CPU) and a paged, searchable device table.

import { age, api, el, poll } from "./api.js";
import { barChart, lineChart } from "./charts.js";

const PAGE_SIZE = 25;
const STATUS_ORDER = ["online", "offline"];

function counts(title, map, clsFor = () => "") {
  const entries = Object.entries(map).map(([label, value]) => ({ label, value, cls: clsFor(label) }));
  return barChart({ title, entries });
}

export function render(view, ctx) {
  const state = { page: 1, search: "", status: "" };
  const cards = el("div", { class: "cards", id: "fleet-cards" });
  const bars = el("div", { class: "panels", id: "fleet-counts" });
  const charts = el("div", { class: "panels", id: "fleet-charts" });
  const search = el("input", { type: "search", id: "device-search", placeholder: "Search id or hardware class", "aria-label": "Search devices" });
  const status = el(
    "select",
    { id: "status-filter", "aria-label": "Status" },
    el("option", { value: "" }, "any status"),
    STATUS_ORDER.map((s) => el("option", { value: s }, s)),
  );
  const tbody = el("tbody");
  const pager = el("div", { class: "pager", id: "pager" });
  const error = el("p", { class: "error", role: "alert" });
  view.append(
    el("h1", {}, "Fleet"),
    error,
    cards,
    bars,
    el("h2", {}, "Live (last 5 minutes)"),
    charts,
    el("h2", {}, "Devices"),
    el("div", { class: "filters" }, search, status),
    el(
      "table",
      { class: "devices", id: "device-table" },
      el("thead", {}, el("tr", {}, ["Device", "Status", "Hardware class", "Variant", "Last heard"].map((h) => el("th", {}, h)))),
      tbody,
    ),
    pager,
  );

  async function loadSummary() {
    const s = await api("/api/v1/fleet/summary");
    cards.replaceChildren(
      card("Devices", s.total, "total"),
      card("Online", s.by_status.online ?? 0, "online"),
      card("Offline", s.by_status.offline ?? 0, "offline"),
      card("Stale", s.stale, "stale"),
    );
    bars.replaceChildren(
      counts("By status", s.by_status, (label) => `status-${label}`),
      counts("By hardware class", s.by_hardware_class),
      counts("By model variant", s.by_variant),
      counts("By time since last heard", s.staleness_s),
    );
  }

  async function loadSeries() {
    const s = await api("/api/v1/fleet/series", { params: { window_s: 300, step_s: 5 } });
    const at = (key) => s.points.map((p) => [Date.parse(p.t), p[key]]);
    charts.replaceChildren(
      lineChart({ title: "Throughput (results/s)", series: [{ name: "results/s", cls: "s1", points: at("throughput_rps") }] }),
      lineChart({
        title: "Latency (ms)",
        unit: "",
        series: [
          { name: "p50", cls: "s1", points: at("p50_ms") },
          { name: "p99", cls: "s2", points: at("p99_ms") },
        ],
      }),
      lineChart({ title: "Offload ratio", yMax: 1, series: [{ name: "cloud share", cls: "s3", points: at("offload_ratio") }] }),
      lineChart({ title: "Fleet CPU (mean %)", series: [{ name: "cpu %", cls: "s4", points: at("cpu_percent_mean") }] }),
    );
  }

  async function loadTable() {
    const p = await api("/api/v1/fleet/devices", {
      params: { page: state.page, page_size: PAGE_SIZE, search: state.search, status: state.status },
    });
    tbody.replaceChildren(
      ...p.items.map((d) =>
        el(
          "tr",
          { "data-device": d.id },
          el("td", {}, el("a", { href: `#/device/${encodeURIComponent(d.id)}` }, d.id)),
          el("td", {}, el("span", { class: `badge status-${d.status}${d.stale ? " stale" : ""}` }, d.stale ? "stale" : d.status)),
          el("td", {}, d.hardware_class),
          el("td", {}, d.variant ?? "—"),
          el("td", {}, `${age(d.staleness_age_s)} ago`),
        ),
      ),
    );
    if (!p.items.length) tbody.append(el("tr", {}, el("td", { colspan: 5, class: "empty" }, "No device matches.")));
    const pages = Math.max(1, Math.ceil(p.total / PAGE_SIZE));
    if (state.page > pages) {
      state.page = pages;
      return loadTable();
    }
    pager.replaceChildren(
      el("button", { type: "button", id: "prev-page", disabled: state.page <= 1, onclick: () => go(state.page - 1) }, "‹ Prev"),
      el("span", { id: "page-info" }, `page ${state.page} of ${pages} · ${p.total} devices`),
      el("button", { type: "button", id: "next-page", disabled: state.page >= pages, onclick: () => go(state.page + 1) }, "Next ›"),
    );
  }

  function go(page) {
    state.page = page;
    loadTable().catch(showError);
  }

  let typing;
  search.addEventListener("input", () => {
    clearTimeout(typing);
    typing = setTimeout(() => {
      state.search = search.value.trim();
      go(1);
    }, 200);
  });
  status.addEventListener("change", () => {
    state.status = status.value;
    go(1);
  });

  function showError(err) {
    error.textContent = `Could not load: ${err.message}`;
  }
  const stop = poll(
    async () => {
      await Promise.all([loadSummary(), loadSeries(), loadTable()]);
      error.textContent = "";
    },
    2000,
    showError,
  );
  return () => {
    clearTimeout(typing);
    stop();
  };
}

function card(label, value, cls) {
  return el("div", { class: `card ${cls}`, "data-card": cls }, el("div", { class: "value" }, String(value)), el("div", { class: "label" }, label));
}
