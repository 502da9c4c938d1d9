// Accounts: the user's own and the shared ones with their capacity and state; add, edit and
// remove the user's own (the API's messages shown as they are); the scheduler's running jobs.

import { del, get, post, seg } from "./api.js";
import { busy, clear, el, say, setError, when } from "./dom.js";
import { failed } from "./studio.js";

const $ = (id) => document.getElementById(id);
let reloaded = () => {};

function state(account) {
  const parts = [];
  if (account.error) parts.push(el("span", { class: "bad" }, account.error));
  if (account.cooldownUntil) {
    parts.push(el("span", { class: "warn" }, `Cooling down until ${when(account.cooldownUntil)}`));
  }
  if (account.lastError) {
    parts.push(el("span", { class: "note" },
      `Last error ${when(account.lastErrorAt)}: ${account.lastError}`));
  }
  return parts.length ? parts : [el("span", { class: "ok" }, "Ready")];
}

function row(account) {
  const actions = el("td", { class: "actions" });
  if (account.shared) {
    actions.append(el("span", { class: "note" }, "Managed by the operator"));
  } else {
    const edit = el("button", { type: "button", class: "quiet", "aria-label": `Edit ${account.account}` }, "Edit");
    edit.addEventListener("click", () => fill(account));
    const remove = el("button", { type: "button", class: "danger", "aria-label": `Remove ${account.account}` }, "Remove");
    remove.addEventListener("click", () => removeAccount(account.account, remove));
    actions.append(edit, remove);
  }
  const models = account.models.image;
  return el("tr", { "data-account": account.account },
    el("th", { scope: "row" }, account.account, account.shared ? el("span", { class: "badge" }, "shared") : null,
      el("div", { class: "note" }, models.length ? models.join(", ") : "no models")),
    el("td", { "data-label": "Engine" }, account.engine),
    el("td", { "data-label": "Running / capacity" }, `${account.running} / ${account.maxJobs}`),
    el("td", { "data-label": "Priority" }, String(account.priority)),
    el("td", { "data-label": "Last hour" },
      `${account.lastHour.completed} done, ${account.lastHour.failed} failed`),
    el("td", { class: "state", "data-label": "State" }, state(account)),
    actions);
}

export async function load() {
  setError("accounts-error", "");
  try {
    const accounts = await get("/accounts");
    const body = $("accounts-table").tBodies[0];
    clear(body);
    for (const account of Object.values(accounts)) body.append(row(account));
    if (!body.children.length) {
      body.append(el("tr", {}, el("td", { colspan: 7, class: "empty" }, "No accounts.")));
    }
    reloaded(accounts);
  } catch (error) {
    failed(error, "accounts-error");
  }
  scheduler();
}

function fill(account) {
  $("a-engine").value = account.engine;
  $("a-region").value = account.region;
  $("a-email").value = account.email;
  $("a-account").value = account.account;
  $("a-maxjobs").value = account.maxJobs;
  $("a-priority").value = account.priority;
  $("a-models").value = account.models.image.join(", ");
  const settings = account.settings || {};
  $("a-settings").value = Object.keys(settings).length ? JSON.stringify(settings, null, 2) : "";
  $("account-form-title").textContent = `Edit ${account.account}`;
  $("a-engine").focus();
}

function clearForm() {
  $("account-form").reset();
  $("account-form-title").textContent = "Add an account";
  setError("account-error", "");
}

function body() {
  const form = new FormData($("account-form"));
  const request = {};
  for (const name of ["engine", "region", "email", "account"]) {
    const value = String(form.get(name) || "").trim();
    if (value) request[name] = value;
  }
  for (const name of ["maxJobs", "priority"]) {
    const value = String(form.get(name) || "").trim();
    if (value) request[name] = /^-?\d+(\.\d+)?$/.test(value) ? Number(value) : value;
  }
  const models = String(form.get("models") || "").split(",").map((m) => m.trim()).filter(Boolean);
  if (models.length) request.models = models;
  const settings = String(form.get("settings") || "").trim();
  if (settings) {
    try {
      request.settings = JSON.parse(settings);
    } catch (error) {
      throw new Error(`Engine settings are not JSON: ${error.message}`);
    }
  }
  return request;
}

async function save(event) {
  event.preventDefault();
  setError("account-error", "");
  const done = busy($("a-save"), "Saving…");
  try {
    const saved = await post("/accounts", body());
    say(`Account ${saved.account} saved`);
    clearForm();
    await load();
  } catch (error) {
    failed(error, "account-error");
  } finally {
    done();
  }
}

async function removeAccount(account, button) {
  if (!confirm(`Remove account ${account}? Its running jobs are cancelled.`)) return;
  setError("accounts-error", "");
  const done = busy(button, "Removing…");
  try {
    const reply = await del(`/accounts/${seg(account)}`);
    say(`Account ${reply.account} removed; ${reply.remaining} left`);
    await load();
  } catch (error) {
    done();
    failed(error, "accounts-error");
  }
}

async function scheduler() {
  setError("scheduler-error", "");
  const target = $("scheduler");
  try {
    const reply = await get("/scheduler");
    clear(target);
    if (!reply.total) target.append(el("p", { class: "empty" }, "No job of yours is running."));
    for (const [account, jobs] of Object.entries(reply.executing)) {
      target.append(el("h3", {}, account), el("ul", { class: "executing" }, jobs.map((job) => {
        const cancel = el("button", { type: "button", class: "danger", "aria-label": `Cancel ${job.jobid}` }, "Cancel");
        cancel.addEventListener("click", async () => {
          try {
            await del(`/scheduler/${seg(job.jobid)}`);
            say("Job cancelled");
            load();
          } catch (error) {
            failed(error, "scheduler-error");
          }
        });
        return el("li", {}, el("code", {}, job.jobid), ` ${job.model}, ${job.elapsedSeconds} s `, cancel);
      })));
    }
  } catch (error) {
    failed(error, "scheduler-error");
  }
}

export function init(hooks) {
  reloaded = hooks.reloaded;
  $("account-form").addEventListener("submit", save);
  $("a-clear").addEventListener("click", clearForm);
}
