// The dashboard shell: sign-in with an API token, the signed-in user's role, hash routing.
// Pages are modules exporting render(view, ctx) -> stop(); ctx.canOperate says whether to
// show mutating controls (the server checks the role on every request anyway).

import { api, clearToken, el, setToken, token } from "./api.js";
import * as device from "./device.js";
import * as fleet from "./fleet.js";
import * as policies from "./policies.js";
import * as rollouts from "./rollouts.js";

const view = document.getElementById("view");
const login = document.getElementById("login");
const nav = document.getElementById("nav");
const who = document.getElementById("who");
const logout = document.getElementById("logout");

let me = null;
let stopPage = () => {};

function route() {
  const hash = decodeURIComponent(location.hash.replace(/^#\/?/, ""));
  const [page, ...rest] = hash.split("/");
  if (page === "device" && rest.length) return { module: device, page: "fleet", arg: rest.join("/") };
  if (page === "rollouts") return { module: rollouts, page, arg: rest.join("/") };
  if (page === "policies") return { module: policies, page, arg: rest.join("/") };
  return { module: fleet, page: "fleet", arg: null };
}

function show() {
  stopPage();
  view.replaceChildren();
  if (!me) return;
  const { module, page, arg } = route();
  for (const link of nav.querySelectorAll("a")) {
    link.classList.toggle("active", link.dataset.page === page);
  }
  const ctx = {
    me,
    canOperate: me.role === "operator" || me.role === "admin",
    arg,
  };
  stopPage = module.render(view, ctx) || (() => {});
}

function signedOut(message = "") {
  me = null;
  stopPage();
  view.replaceChildren();
  nav.hidden = true;
  logout.hidden = true;
  who.textContent = "";
  document.body.dataset.role = "";
  login.hidden = false;
  document.getElementById("login-error").textContent = message;
  document.getElementById("token").focus();
}

async function signIn() {
  try {
    me = await api("/api/v1/auth/me");
  } catch (err) {
    clearToken();
    signedOut(err.status === 401 ? "That token was not accepted." : `Sign-in failed: ${err.message}`);
    return;
  }
  login.hidden = true;
  nav.hidden = false;
  logout.hidden = false;
  who.replaceChildren(el("span", { class: "name" }, me.name), " ", el("span", { class: `role role-${me.role}` }, me.role));
  document.body.dataset.role = me.role;
  show();
}

login.addEventListener("submit", (event) => {
  event.preventDefault();
  const input = document.getElementById("token");
  setToken(input.value.trim());
  input.value = "";
  signIn();
});
logout.addEventListener("click", () => {
  clearToken();
  signedOut();
});
window.addEventListener("spillway:logout", () => signedOut("Your session ended; sign in again."));
window.addEventListener("hashchange", show);

if (token()) signIn();
else signedOut();
