// Webhooks: the signing secret (shown, rotated) and a job's delivery log, with redeliver.

import { get, post, seg } from "./api.js";
import { busy, clear, el, say, setError, when } from "./dom.js";
import { failed } from "./studio.js";

const $ = (id) => document.getElementById(id);
let again = 0; // the timer that reads a pending delivery's log again

function showSecret(reply) {
  $("w-secret").textContent = reply.secret;
  $("w-previous").textContent = reply.previousSecretExpires
    ? `The previous secret still signs until ${when(reply.previousSecretExpires)}.`
    : "";
}

export async function load() {
  setError("secret-error", "");
  try {
    showSecret(await get("/webhooks/secret"));
  } catch (error) {
    failed(error, "secret-error");
  }
  if ($("w-jobid").value.trim()) deliveries("GET");
}

async function rotate() {
  if (!confirm("Rotate the signing secret? The old one keeps signing for 24 hours.")) return;
  setError("secret-error", "");
  const done = busy($("w-rotate"), "Rotating…");
  try {
    showSecret(await post("/webhooks/secret"));
    say("Secret rotated");
  } catch (error) {
    failed(error, "secret-error");
  } finally {
    done();
  }
}

function tries(delivery) {
  return el("ol", { class: "tries" }, delivery.tries.map((attempt) => el("li", {},
    `${when(attempt.at)}: `,
    attempt.statusCode !== null && attempt.statusCode !== undefined
      ? `HTTP ${attempt.statusCode}` : attempt.error || "no answer",
    attempt.durationMs !== undefined ? ` (${attempt.durationMs} ms)` : "")));
}

async function deliveries(method) {
  const jobid = $("w-jobid").value.trim();
  setError("deliveries-error", "");
  const target = $("deliveries");
  try {
    const path = `/images/${seg(jobid)}/webhooks`;
    const reply = method === "POST" ? await post(path) : await get(path);
    clear(target);
    if (!reply.deliveries.length) target.append(el("p", { class: "empty" }, "No deliveries."));
    for (const delivery of reply.deliveries) {
      target.append(el("div", { class: "delivery" },
        el("p", {}, el("strong", {}, delivery.status), ` to ${delivery.url}`),
        el("p", { class: "note" }, `webhook-id ${delivery.webhookId} · created ${when(delivery.created)}`,
          delivery.nextTry ? ` · next try ${when(delivery.nextTry)}` : ""),
        tries(delivery)));
    }
    if (method === "POST") say("Delivery sent again");
    // A delivery still pending is read again shortly, while this job's log is shown.
    clearTimeout(again);
    if (reply.deliveries.some((delivery) => delivery.status === "pending")) {
      again = setTimeout(() => {
        if (!$("screen-webhooks").hidden && $("w-jobid").value.trim() === jobid) deliveries("GET");
      }, 2000);
    }
  } catch (error) {
    clear(target);
    failed(error, "deliveries-error");
  }
}

export function init() {
  $("w-rotate").addEventListener("click", rotate);
  $("deliveries-form").addEventListener("submit", (event) => {
    event.preventDefault();
    deliveries("GET");
  });
  $("w-redeliver").addEventListener("click", () => {
    if ($("deliveries-form").reportValidity()) deliveries("POST");
  });
}
