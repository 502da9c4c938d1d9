// History: the user's jobs (GET /images, a page at a time), filtered by status and model; the
// running ones followed live, with cancel.

import { get, query } from "./api.js";
import { clear, el, setError } from "./dom.js";
import { follow, jobCard } from "./jobs.js";
import { failed } from "./studio.js";

const $ = (id) => document.getElementById(id);
let next = null;
let loading = 0; // the latest load; an older one's reply is dropped

export function fillModels(models) {
  const select = $("h-model");
  const keep = select.value;
  clear(select);
  select.append(el("option", { value: "" }, "Any"));
  for (const m of models) select.append(el("option", { value: m.model }, m.model));
  select.value = keep;
}

export async function load(reset) {
  const mine = ++loading;
  setError("history-error", "");
  if (reset) next = null;
  const filters = { status: $("h-status").value, model: $("h-model").value, limit: 20 };
  let page;
  try {
    page = await get(`/images${query({ ...filters, cursor: reset ? "" : next })}`);
  } catch (error) {
    failed(error, "history-error");
    return;
  }
  if (mine !== loading) return;
  const list = $("history-list");
  if (reset) clear(list);
  for (const record of page.jobs) {
    list.append(jobCard(record, { compact: true }));
    follow(record);
  }
  next = page.next;
  $("h-more").hidden = !next;
  $("history-empty").hidden = list.children.length > 0;
}

export function init() {
  $("h-status").addEventListener("change", () => load(true));
  $("h-model").addEventListener("change", () => load(true));
  $("h-refresh").addEventListener("click", () => load(true));
  $("h-more").addEventListener("click", () => load(false));
  $("history-filters").addEventListener("submit", (event) => {
    event.preventDefault();
    load(true);
  });
}
