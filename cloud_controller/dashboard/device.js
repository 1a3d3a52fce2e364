// One device: identity, desired vs reported state side by side, recent telemetry charts,
// and (operators) an editor for its desired policy.

import { age, api, el, poll } from "./api.js";
import { lineChart } from "./charts.js";

const pretty = (value) => JSON.stringify(value ?? {}, null, 2);

export function render(view, ctx) {
  const id = ctx.arg;
  const path = `/api/v1/devices/${encodeURIComponent(id)}`;
  const info = el("dl", { class: "facts", id: "device-facts" });
  const desired = el("pre", { id: "desired" });
  const reported = el("pre", { id: "reported" });
  const sync = el("p", { id: "sync" });
  const charts = el("div", { class: "panels", id: "device-charts" });
  const error = el("p", { class: "error", role: "alert" });
  view.append(
    el("p", {}, el("a", { href: "#/fleet" }, "‹ Fleet")),
    el("h1", {}, `Device ${id}`),
    error,
    info,
    el("h2", {}, "Desired vs reported"),
    sync,
    el(
      "div",
      { class: "state-pair" },
      el("div", {}, el("h3", {}, "Desired"), desired),
      el("div", {}, el("h3", {}, "Reported"), reported),
    ),
  );
  if (ctx.canOperate) view.append(editor(path, error));
  view.append(el("h2", {}, "Recent telemetry"), charts);

  async function load() {
    const [d, samples] = await Promise.all([api(path), api(`${path}/telemetry`, { params: { limit: 100 } })]);
    info.replaceChildren(
      ...fact("Status", el("span", { class: `badge status-${d.status}${d.stale ? " stale" : ""}` }, d.stale ? "stale" : d.status)),
      ...fact("Hardware class", d.hardware_class),
      ...fact("Labels", Object.entries(d.labels).map(([k, v]) => `${k}=${v}`).join(", ") || "—"),
      ...fact("Agent version", d.agent_version),
      ...fact("Last heard", `${age(d.staleness_age_s)} ago`),
      ...fact("Boot epoch", d.boot_epoch),
    );
    const want = d.desired?.generation;
    const got = d.reported?.observed_generation;
    desired.textContent = d.desired ? `generation ${want}\n${pretty(d.desired.policy)}` : "(none set)";
    reported.textContent = d.reported
      ? `observed generation ${got} · ${d.reported.outcome}${d.reported.error ? ` · ${d.reported.error}` : ""}\n${pretty(d.reported.policy)}`
      : "(nothing reported yet)";
    sync.textContent = !d.desired ? "No desired state set." : want === got ? "In sync: the device applied the latest generation." : `Converging: desired generation ${want}, device at ${got ?? "none"}.`;
    sync.className = !d.desired || want === got ? "ok" : "warn";
    const points = [...samples].reverse();
    const at = (key) => points.map((s) => [Date.parse(s.ts), s.metrics[key] ?? null]);
    charts.replaceChildren(
      lineChart({ title: "CPU %", yMax: 100, series: [{ name: "cpu", cls: "s1", points: at("cpu_percent") }] }),
      lineChart({ title: "Memory %", yMax: 100, series: [{ name: "memory", cls: "s2", points: at("memory_percent") }] }),
      lineChart({
        title: "Latency (ms)",
        series: [
          { name: "p50", cls: "s1", points: at("latency_p50_ms") },
          { name: "p99", cls: "s2", points: at("latency_p99_ms") },
        ],
      }),
      lineChart({ title: "Queue (texts)", series: [{ name: "queued", cls: "s3", points: at("queue_items") }] }),
      lineChart({ title: "Offload ratio", yMax: 1, series: [{ name: "cloud share", cls: "s4", points: at("offload_ratio") }] }),
    );
  }

  return poll(
    async () => {
      await load();
      error.textContent = "";
    },
    2000,
    (err) => {
      error.textContent = err.status === 404 ? `No device ${id}.` : `Could not load: ${err.message}`;
    },
  );
}

function fact(name, value) {
  return [el("dt", {}, name), el("dd", {}, value)];
}

function editor(path, error) {
  const text = el("textarea", { id: "policy-editor", rows: 8, spellcheck: "false", "aria-label": "Desired policy (JSON)" });
  const note = el("span", { class: "note" });
  const load = el("button", { type: "button", "data-mutating": true, onclick: async () => {
    const d = await api(path);
    text.value = pretty(d.desired?.policy);
  } }, "Load current");
  const save = el("button", { type: "button", id: "save-policy", "data-mutating": true, onclick: async () => {
    let policy;
    try {
      policy = JSON.parse(text.value || "{}");
    } catch (err) {
      note.textContent = `Not JSON: ${err.message}`;
      return;
    }
    try {
      const answer = await api(`${path}/desired`, { method: "PUT", body: { policy } });
      note.textContent = `Stored as generation ${answer.generation}.`;
    } catch (err) {
      error.textContent = `Not saved: ${err.message}`;
    }
  } }, "Set desired policy");
  return el("details", { class: "editor" }, el("summary", {}, "Edit desired policy"), text, el("div", {}, load, " ", save, " ", note));
}
