// Rollouts: the list, one rollout's waves (state, gate verdicts, progress) and its devices;
// operators can start one, and pause, resume or abort it.

import { age, api, el, poll } from "./api.js";

const FINISHED = new Set(["completed", "rolled_back", "aborted"]);

export function render(view, ctx) {
  return ctx.arg ? detail(view, ctx, ctx.arg) : list(view, ctx);
}

function progress(done, total) {
  const share = total ? done / total : 0;
  return el(
    "div",
    { class: "progress", role: "progressbar", "aria-valuenow": done, "aria-valuemax": total },
    el("div", { class: `fill w${Math.round(share * 20) * 5}` }),
    el("span", {}, `${done}/${total} devices`),
  );
}

const badge = (state) => el("span", { class: `badge state-${state}` }, state.replace("_", " "));

function list(view, ctx) {
  const error = el("p", { class: "error", role: "alert" });
  const tbody = el("tbody");
  view.append(el("h1", {}, "Rollouts"), error);
  if (ctx.canOperate) view.append(startForm(error));
  view.append(
    el(
      "table",
      { class: "rollouts", id: "rollout-table" },
      el("thead", {}, el("tr", {}, ["#", "Model", "State", "Wave", "Progress", "Started"].map((h) => el("th", {}, h)))),
      tbody,
    ),
  );
  return poll(
    async () => {
      const page = await api("/api/v1/rollouts", { params: { page_size: 50 } });
      tbody.replaceChildren(
        ...page.items.map((r) =>
          el(
            "tr",
            { "data-rollout": r.id },
            el("td", {}, el("a", { href: `#/rollouts/${r.id}` }, `#${r.id}`)),
            el("td", {}, `${r.model}@${r.version}`),
            el("td", {}, badge(r.state)),
            el("td", {}, r.current_wave < 0 ? "—" : `${r.current_wave + 1} of ${r.waves_total}`),
            el("td", {}, progress(r.devices_done, r.devices_total)),
            el("td", {}, `${age((Date.now() - Date.parse(r.created_at)) / 1000)} ago`),
          ),
        ),
      );
      if (!page.items.length) tbody.append(el("tr", {}, el("td", { colspan: 6, class: "empty" }, "No rollouts yet.")));
      error.textContent = "";
    },
    2000,
    (err) => {
      error.textContent = `Could not load: ${err.message}`;
    },
  );
}

function startForm(error) {
  const model = el("select", { id: "rollout-model", required: true, "aria-label": "Model" });
  const version = el("input", { id: "rollout-version", required: true, placeholder: "version", "aria-label": "Version" });
  const labels = el("input", { id: "rollout-labels", placeholder: "site=lab (blank: every device)", "aria-label": "Target labels" });
  const canary = el("input", { id: "rollout-canary", type: "number", min: 0, max: 1, step: "any", value: 0.1, "aria-label": "Canary share" });
  const waveSize = el("input", { id: "rollout-wave-size", type: "number", min: 1, value: 10, "aria-label": "Wave size" });
  const interval = el("input", { id: "rollout-interval", type: "number", min: 0, step: "any", value: 60, "aria-label": "Observation seconds" });
  const note = el("span", { class: "note", id: "rollout-note" });
  api("/api/v1/models", { params: { page_size: 200 } })
    .then((page) => {
      model.replaceChildren(...page.items.map((m) => el("option", { value: m.name, "data-version": m.current_version ?? "" }, m.name)));
      if (page.items.length && !version.value) version.value = page.items[0].current_version ?? "";
    })
    .catch((err) => {
      note.textContent = `Models not loaded: ${err.message}`;
    });
  model.addEventListener("change", () => {
    version.value = model.selectedOptions[0]?.dataset.version ?? "";
  });
  const form = el(
    "form",
    { class: "start-rollout", id: "start-rollout", "data-mutating": true },
    el("h2", {}, "Start a rollout"),
    el("label", {}, "Model ", model),
    el("label", {}, "Version ", version),
    el("label", {}, "Target labels ", labels),
    el("label", {}, "Canary share ", canary),
    el("label", {}, "Wave size ", waveSize),
    el("label", {}, "Observe (s) ", interval),
    el("button", { type: "submit", id: "start-rollout-button" }, "Start rollout"),
    note,
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const selector = {};
    for (const pair of labels.value.split(",").map((s) => s.trim()).filter(Boolean)) {
      const [key, ...rest] = pair.split("=");
      selector[key.trim()] = rest.join("=").trim();
    }
    try {
      const rollout = await api("/api/v1/rollouts", {
        method: "POST",
        body: {
          model: model.value,
          version: version.value.trim(),
          target: { labels: selector },
          waves: { canary_share: Number(canary.value), wave_size: Number(waveSize.value), interval_s: Number(interval.value) },
        },
      });
      location.hash = `#/rollouts/${rollout.id}`;
    } catch (err) {
      error.textContent = `Not started: ${err.message}`;
    }
  });
  return form;
}

function detail(view, ctx, id) {
  const error = el("p", { class: "error", role: "alert" });
  const head = el("div", { id: "rollout-head" });
  const controls = el("div", { class: "controls", id: "rollout-controls" });
  const waves = el("div", { class: "waves", id: "rollout-waves" });
  const devices = el("tbody");
  view.append(
    el("p", {}, el("a", { href: "#/rollouts" }, "‹ Rollouts")),
    el("h1", {}, `Rollout #${id}`),
    error,
    head,
    controls,
    el("h2", {}, "Waves"),
    waves,
    el("h2", {}, "Devices"),
    el(
      "table",
      { class: "devices" },
      el("thead", {}, el("tr", {}, ["Device", "Wave", "Hardware class", "Variant", "State", "Note"].map((h) => el("th", {}, h)))),
      devices,
    ),
  );

  async function act(action) {
    try {
      await api(`/api/v1/rollouts/${id}/${action}`, { method: "POST" });
      await load();
    } catch (err) {
      error.textContent = `${action} refused: ${err.message}`;
    }
  }

  async function load() {
    const r = await api(`/api/v1/rollouts/${encodeURIComponent(id)}`);
    head.replaceChildren(
      el("p", {}, `${r.model}@${r.version} `, badge(r.state), r.reason ? ` — ${r.reason}` : ""),
      progress(r.devices_done, r.devices_total),
    );
    controls.replaceChildren();
    if (ctx.canOperate && !FINISHED.has(r.state)) {
      if (r.state === "paused") controls.append(el("button", { type: "button", id: "resume", "data-mutating": true, onclick: () => act("resume") }, "Resume"));
      else if (r.state !== "rolling_back") controls.append(el("button", { type: "button", id: "pause", "data-mutating": true, onclick: () => act("pause") }, "Pause"));
      if (r.state !== "rolling_back") {
        controls.append(
          el("button", { type: "button", id: "abort", class: "danger", "data-mutating": true, onclick: () => confirm("Abort and roll every updated device back?") && act("abort") }, "Abort"),
        );
      }
    }
    waves.replaceChildren(
      ...r.waves.map((w) =>
        el(
          "div",
          { class: `wave wave-${w.state}`, "data-wave": w.index },
          el("h3", {}, w.canary ? "Canary" : `Wave ${w.index + 1}`, " ", badge(w.state)),
          el("p", {}, `${w.devices} devices`, w.gate_verdict ? ` · gates: ${w.gate_verdict}` : ""),
          el(
            "ul",
            { class: "gates" },
            w.gate_results.map((g) =>
              el("li", { class: `gate gate-${g.verdict}` }, `${g.name}: ${g.verdict}`, g.value !== null && g.value !== undefined ? ` (${Number(g.value).toPrecision(3)} vs ${g.threshold})` : "", g.detail ? ` — ${g.detail}` : ""),
            ),
          ),
        ),
      ),
    );
    devices.replaceChildren(
      ...r.devices.map((d) =>
        el(
          "tr",
          {},
          el("td", {}, el("a", { href: `#/device/${encodeURIComponent(d.device_id)}` }, d.device_id)),
          el("td", {}, d.wave + 1),
          el("td", {}, d.hardware_class),
          el("td", {}, d.variant ?? "—"),
          el("td", {}, badge(d.state)),
          el("td", {}, d.reason ?? ""),
        ),
      ),
    );
  }

  return poll(
    async () => {
      await load();
      error.textContent = "";
    },
    1500,
    (err) => {
      error.textContent = `Could not load: ${err.message}`;
    },
  );
}
