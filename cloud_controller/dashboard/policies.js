// Operating policies and device groups: view for everyone; operators create, edit
// (a new version, replaced whole) and delete policies.

import { api, el, poll } from "./api.js";

const pretty = (value) => JSON.stringify(value, null, 2);

export function render(view, ctx) {
  return ctx.arg ? detail(view, ctx, ctx.arg) : list(view, ctx);
}

function targetText(target) {
  const parts = [];
  if (target.selector) {
    const pairs = Object.entries(target.selector).map(([k, v]) => `${k}=${v}`);
    parts.push(pairs.length ? pairs.join(", ") : "every device");
  }
  if (target.groups?.length) parts.push(`groups: ${target.groups.join(", ")}`);
  return parts.join(" + ");
}

function list(view, ctx) {
  const error = el("p", { class: "error", role: "alert" });
  const policies = el("tbody");
  const groups = el("tbody");
  view.append(el("h1", {}, "Policies"), error);
  if (ctx.canOperate) view.append(createForm(error));
  view.append(
    el(
      "table",
      { class: "policies", id: "policy-table" },
      el("thead", {}, el("tr", {}, ["Name", "State", "Version", "Priority", "Targets", "Sets"].map((h) => el("th", {}, h)))),
      policies,
    ),
    el("h2", {}, "Groups"),
    el(
      "table",
      { class: "groups", id: "group-table" },
      el("thead", {}, el("tr", {}, ["Name", "Selector", "Members", "Description"].map((h) => el("th", {}, h)))),
      groups,
    ),
  );
  return poll(
    async () => {
      const [items, groupItems] = await Promise.all([api("/api/v1/policies"), api("/api/v1/groups")]);
      policies.replaceChildren(
        ...items.map((p) =>
          el(
            "tr",
            { "data-policy": p.name },
            el("td", {}, el("a", { href: `#/policies/${encodeURIComponent(p.name)}` }, p.name)),
            el("td", {}, el("span", { class: `badge state-${p.state}` }, p.state)),
            el("td", {}, p.current_version),
            el("td", {}, p.current.priority),
            el("td", {}, targetText(p.current.target)),
            el("td", {}, Object.keys(p.current.document).join(", ") || "—"),
          ),
        ),
      );
      if (!items.length) policies.append(el("tr", {}, el("td", { colspan: 6, class: "empty" }, "No policies.")));
      groups.replaceChildren(
        ...groupItems.map((g) =>
          el(
            "tr",
            {},
            el("td", {}, g.name),
            el("td", {}, g.selector ? Object.entries(g.selector).map(([k, v]) => `${k}=${v}`).join(", ") : "—"),
            el("td", {}, `${g.members.length}`),
            el("td", {}, g.description),
          ),
        ),
      );
      if (!groupItems.length) groups.append(el("tr", {}, el("td", { colspan: 4, class: "empty" }, "No groups.")));
      error.textContent = "";
    },
    3000,
    (err) => {
      error.textContent = `Could not load: ${err.message}`;
    },
  );
}

const EXAMPLE = { priority: 0, target: { selector: {} }, document: {}, description: "", enabled: true };

function createForm(error) {
  const name = el("input", { id: "policy-name", required: true, placeholder: "name", "aria-label": "Policy name" });
  const spec = el("textarea", { id: "policy-spec", rows: 7, spellcheck: "false", "aria-label": "Policy (JSON)" });
  spec.value = pretty(EXAMPLE);
  const form = el(
    "form",
    { class: "editor", id: "create-policy", "data-mutating": true },
    el("h2", {}, "New policy"),
    el("label", {}, "Name ", name),
    spec,
    el("button", { type: "submit" }, "Create policy"),
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    try {
      const body = { ...JSON.parse(spec.value), name: name.value.trim() };
      const created = await api("/api/v1/policies", { method: "POST", body });
      location.hash = `#/policies/${encodeURIComponent(created.name)}`;
    } catch (err) {
      error.textContent = `Not created: ${err.message}`;
    }
  });
  return form;
}

function detail(view, ctx, name) {
  const path = `/api/v1/policies/${encodeURIComponent(name)}`;
  const error = el("p", { class: "error", role: "alert" });
  const current = el("pre", { id: "policy-current" });
  const versions = el("tbody");
  const note = el("span", { class: "note" });
  view.append(el("p", {}, el("a", { href: "#/policies" }, "‹ Policies")), el("h1", {}, `Policy ${name}`), error, current);
  let editor = null;
  if (ctx.canOperate) {
    editor = el("textarea", { id: "policy-edit", rows: 10, spellcheck: "false", "aria-label": "Policy (JSON)" });
    view.append(
      el(
        "div",
        { class: "editor", "data-mutating": true },
        el("h2", {}, "Edit (stores a new version)"),
        editor,
        el(
          "div",
          {},
          el("button", { type: "button", id: "save-policy-version", onclick: save }, "Save new version"),
          " ",
          el("button", { type: "button", class: "danger", onclick: remove }, "Delete"),
          " ",
          note,
        ),
      ),
    );
  }
  view.append(
    el("h2", {}, "Versions"),
    el(
      "table",
      {},
      el("thead", {}, el("tr", {}, ["Version", "State", "Priority", "Targets", "Document", "By"].map((h) => el("th", {}, h)))),
      versions,
    ),
  );

  async function save() {
    try {
      const answer = await api(path, { method: "PUT", body: JSON.parse(editor.value) });
      note.textContent = `Version ${answer.current_version} stored; ${answer.devices_updated} devices updated.`;
      await load(true);
    } catch (err) {
      error.textContent = `Not saved: ${err.message}`;
    }
  }

  async function remove() {
    if (!confirm(`Delete policy ${name}?`)) return;
    try {
      await api(path, { method: "DELETE" });
      location.hash = "#/policies";
    } catch (err) {
      error.textContent = `Not deleted: ${err.message}`;
    }
  }

  async function load(refill) {
    const p = await api(path);
    const c = p.current;
    current.textContent = `${p.state} · version ${p.current_version} · priority ${c.priority} · ${targetText(c.target)}\n${pretty(c.document)}`;
    if (editor && (refill || !editor.value)) {
      editor.value = pretty({ priority: c.priority, target: c.target, document: c.document, description: c.description, enabled: p.state === "active" });
    }
    versions.replaceChildren(
      ...[...p.versions].reverse().map((v) =>
        el(
          "tr",
          {},
          el("td", {}, v.version),
          el("td", {}, v.state),
          el("td", {}, v.priority),
          el("td", {}, targetText(v.target)),
          el("td", {}, el("code", {}, JSON.stringify(v.document))),
          el("td", {}, v.created_by),
        ),
      ),
    );
  }

  return poll(
    async () => {
      await load(false);
      error.textContent = "";
    },
    3000,
    (err) => {
      error.textContent = err.status === 404 ? `No policy ${name}.` : `Could not load: ${err.message}`;
    },
  );
}
