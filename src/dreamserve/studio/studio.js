// The studio: sign in, the screens (Generate, History, Accounts, Webhooks) and the job cards
// they share. Plain ES modules over the HTTP API (api.js); no framework, no build step.

import { ApiError, api, get, post, query, seg, setToken, token } from "./api.js";
import { busy, clear, el, say, setError } from "./dom.js";
import { follow, jobCard, stopFollowing } from "./jobs.js";
import * as history from "./history.js";
import * as accounts from "./accounts.js";
import * as webhooks from "./webhooks.js";

const $ = (id) => document.getElementById(id);
const SCREENS = ["generate", "history", "accounts", "webhooks"];

export const state = {
  models: [], // GET /models
  defaultModel: null, // its `default`
  accounts: {}, // GET /accounts
  refs: [], // the chosen references: {assetRef, url, label}
};

export const model = (name) => state.models.find((m) => m.model === name);

// Sign in and out

async function signIn(event) {
  event.preventDefault();
  const value = $("signin-token").value.trim();
  setError("signin-error", "");
  try {
    await get("/models", { token: value }); // the token is checked by any call
  } catch (error) {
    setError("signin-error", error.message);
    return;
  }
  setToken(value);
  $("signin-token").value = "";
  await start();
}

export function signOut(message = "") {
  stopFollowing();
  setToken("");
  state.refs = [];
  renderRefs();
  clear($("results"));
  $("results-empty").hidden = false;
  // Nothing of this user stays in the page for the next one: the secret, jobs, accounts.
  $("w-secret").textContent = "…";
  $("w-previous").textContent = "";
  $("w-jobid").value = "";
  clear($("deliveries"));
  clear($("history-list"));
  $("h-more").hidden = true;
  clear($("accounts-table").tBodies[0]);
  clear($("scheduler"));
  $("account-form").reset();
  for (const id of ["g-prompt", "g-replyurl", "g-replyref"]) $(id).value = "";
  $("nav").hidden = true;
  $("signout").hidden = true;
  showScreen("signin");
  setError("signin-error", message);
  $("signin-token").focus();
}

// Any call that answers 401 (a token revoked meanwhile) ends the session with the message.
export function failed(error, where) {
  if (error instanceof ApiError && error.status === 401) signOut(error.message);
  else setError(where, error.message);
}

async function start() {
  try {
    const [models, owned] = await Promise.all([get("/models"), get("/accounts")]);
    state.models = models.models;
    state.defaultModel = models.default;
    state.accounts = owned;
  } catch (error) {
    signOut(error.message);
    return;
  }
  $("nav").hidden = false;
  $("signout").hidden = false;
  fillModels();
  route();
}

// Screens

function showScreen(name) {
  for (const section of document.querySelectorAll(".screen")) {
    section.hidden = section.id !== `screen-${name}`;
  }
  for (const link of document.querySelectorAll("#nav a")) {
    if (link.dataset.screen === name) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
}

function route() {
  if (!token()) {
    showScreen("signin");
    return;
  }
  const name = location.hash.slice(1);
  const screen = SCREENS.includes(name) ? name : "generate";
  showScreen(screen);
  if (screen === "history") history.load(true);
  if (screen === "accounts") accounts.load();
  if (screen === "webhooks") webhooks.load();
}

export function go(screen) {
  if (location.hash === `#${screen}`) route();
  else location.hash = screen;
}

// The generate form: what the chosen model takes, and nothing it does not

function option(value, text = value, selected = false) {
  const node = el("option", { value }, text);
  node.selected = selected;
  return node;
}

export function servingAccounts(name) {
  return Object.values(state.accounts).filter((a) => a.models.image.includes(name));
}

function fillModels() {
  const select = $("g-model");
  const current = select.value || localStorage.getItem("dreamserve.model");
  clear(select);
  const served = state.models.filter((m) => servingAccounts(m.model).length);
  // The user's last choice, else the server's default model where an account serves it.
  const fallback = served.find((m) => m.model === state.defaultModel) || served[0];
  const chosen = model(current) ? current : (fallback || state.models[0] || {}).model;
  for (const m of state.models) {
    const label = servingAccounts(m.model).length ? m.model : `${m.model} (no account)`;
    select.append(option(m.model, label, m.model === chosen));
  }
  history.fillModels(state.models);
  modelChanged();
}

function modelChanged() {
  const m = model($("g-model").value);
  if (!m) return;
  localStorage.setItem("dreamserve.model", m.model);
  const resolution = $("g-resolution");
  const keep = resolution.value;
  clear(resolution);
  for (const r of m.resolutions) {
    const chosen = m.resolutions.includes(keep) ? r === keep : r === m.defaultResolution;
    resolution.append(option(r, r, chosen));
  }
  fillRatios();
  const account = $("g-account");
  const was = account.value;
  clear(account);
  account.append(option("", "Any free"));
  for (const a of servingAccounts(m.model)) {
    account.append(option(a.account, a.shared ? `${a.account} (shared)` : a.account, a.account === was));
  }
  $("g-refs").hidden = m.maxRefs === 0;
  $("g-refs-note").textContent = `up to ${m.maxRefs}`;
  if (state.refs.length > m.maxRefs) {
    state.refs.length = m.maxRefs;
    renderRefs();
  }
  promptNote();
}

function fillRatios() {
  const m = model($("g-model").value);
  const select = $("g-ratio");
  const keep = select.value;
  const sizes = m.sizes[$("g-resolution").value] || {};
  const ratios = [...(m.autoRatio ? ["auto"] : []), ...Object.keys(sizes)];
  clear(select);
  for (const ratio of ratios) {
    const size = sizes[ratio] ? ` (${sizes[ratio].replace("x", "×")})` : "";
    const text = ratio === "auto" ? "auto" : ratio + size;
    select.append(option(ratio, text, keep ? ratio === keep : false));
  }
  if (!ratios.includes(keep)) select.value = ratios[0];
}

function promptNote() {
  const m = model($("g-model").value);
  if (!m) return;
  const required = m.promptRequired || state.refs.length === 0;
  $("g-prompt-note").textContent = required ? "(required)" : "(optional with references)";
  $("g-strength-row").hidden = state.refs.length === 0;
}

// References: uploads and earlier images

export function renderRefs() {
  const list = $("g-thumbs");
  clear(list);
  state.refs.forEach((ref, index) => {
    const remove = el("button", { type: "button", class: "remove quiet" }, "✕");
    remove.setAttribute("aria-label", `Remove reference ${index + 1}`);
    remove.addEventListener("click", () => {
      state.refs.splice(index, 1);
      renderRefs();
    });
    const image = el("img", { src: ref.url, alt: `Reference ${index + 1}: ${ref.label}` });
    list.append(el("li", { "data-asset-ref": ref.assetRef }, image, remove));
  });
  promptNote();
}

export function addRef(ref) {
  const m = model($("g-model").value);
  if (m && state.refs.length >= m.maxRefs) {
    setError("generate-error", `${m.model} takes at most ${m.maxRefs} references`);
    return false;
  }
  state.refs.push(ref);
  renderRefs();
  return true;
}

// Where an upload goes: the chosen account, else the account of the references already chosen
// (a job's references must all be on its account), else one that serves the model.
function uploadAccount() {
  const chosen = $("g-account").value;
  if (chosen) return chosen;
  for (const ref of state.refs) {
    const bound = /^(.+?)-image:/.exec(ref.assetRef); // <account>-image:w<W>:h<H>:...
    if (bound) return bound[1];
  }
  const serving = servingAccounts($("g-model").value);
  return serving.length ? serving[0].account : "";
}

async function upload(files) {
  setError("generate-error", "");
  for (const file of files) {
    const account = uploadAccount();
    if (!account) {
      // The API's own message: a job of this model could not run, references or not.
      setError("generate-error", `No account serves model ${$("g-model").value}`);
      return;
    }
    try {
      const reply = await api("POST", `/assets/${seg(account)}`, {
        body: file,
        type: file.type || "application/octet-stream",
      });
      addRef({ assetRef: reply.assetRef, url: URL.createObjectURL(file), label: file.name });
      say(`Uploaded ${file.name}`);
    } catch (error) {
      failed(error, "generate-error");
      return;
    }
  }
}

async function openPicker() {
  const dialog = $("picker");
  const list = $("picker-images");
  clear(list);
  setError("picker-error", "");
  dialog.showModal();
  try {
    const page = await get(`/images${query({ status: "completed", limit: 30 })}`);
    for (const job of page.jobs) {
      (job.response.images || []).forEach((image, index) => {
        const label = `${job.request.prompt || job.type} (${index + 1})`;
        const button = el("button", { type: "button", class: "pick" },
          el("img", { src: image.imageUrl, alt: label, loading: "lazy" }));
        button.addEventListener("click", () => {
          if (addRef({ assetRef: image.assetRef, url: image.imageUrl, label })) dialog.close();
        });
        list.append(el("li", {}, button));
      });
    }
    if (!list.children.length) list.append(el("li", { class: "empty" }, "No images yet."));
  } catch (error) {
    failed(error, "picker-error");
  }
}

// Submitting

const NUMBERS = ["seed", "queueSeconds", "maxJobs", "count"];

function requestBody() {
  const form = new FormData($("generate-form"));
  const body = {};
  for (const name of ["prompt", "model", "ratio", "resolution", "count", "seed", "account",
    "queueSeconds", "maxJobs", "replyUrl", "replyRef"]) {
    const value = String(form.get(name) ?? "").trim();
    if (value === "") continue;
    body[name] = NUMBERS.includes(name) && /^-?\d+(\.\d+)?$/.test(value) ? Number(value) : value;
  }
  state.refs.forEach((ref, index) => {
    body[`imageRef_${index + 1}`] = ref.assetRef;
  });
  if (state.refs.length) body.imageStrength = Number($("g-strength").value);
  return body;
}

async function generate(event) {
  event.preventDefault();
  setError("generate-error", "");
  const done = busy($("g-submit"), "Submitting…");
  try {
    const record = await post("/images", requestBody());
    showResult(record);
  } catch (error) {
    failed(error, "generate-error");
  } finally {
    done();
  }
}

export function showResult(record) {
  $("results-empty").hidden = true;
  $("results").prepend(jobCard(record));
  follow(record);
}

// Wiring

function drop(zone) {
  for (const name of ["dragenter", "dragover"]) {
    zone.addEventListener(name, (event) => {
      event.preventDefault();
      zone.classList.add("over");
    });
  }
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("over");
    upload([...event.dataTransfer.files]);
  });
}

function init() {
  $("signin-form").addEventListener("submit", signIn);
  $("signout").addEventListener("click", () => signOut());
  $("generate-form").addEventListener("submit", generate);
  $("g-model").addEventListener("change", modelChanged);
  $("g-resolution").addEventListener("change", fillRatios);
  $("g-strength").addEventListener("input", () => {
    $("g-strength-out").textContent = $("g-strength").value;
  });
  $("g-files").addEventListener("change", async (event) => {
    await upload([...event.target.files]);
    event.target.value = "";
  });
  $("g-pick").addEventListener("click", openPicker);
  drop($("g-drop"));
  window.addEventListener("hashchange", route);
  history.init();
  accounts.init({ reloaded: (owned) => { state.accounts = owned; fillModels(); } });
  webhooks.init();
  if (token()) start();
  else route();
}


init();
