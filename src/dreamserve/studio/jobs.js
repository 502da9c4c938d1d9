// Job cards, shared by the Generate and History screens: status and live progress (the job's
// event stream), then its images with their actions (open large, download, use as reference,
// upscale), the job's record, and cancel while it runs.

import { ApiError, del, get, post, seg, streamJob } from "./api.js";
import { busy, el, say, setError, when } from "./dom.js";
import { addRef, failed, go, showResult } from "./studio.js";

const cards = new Map(); // jobid -> the cards that show it (one per screen at most)
const following = new Map(); // jobid -> AbortController of its stream
const UPSCALES = ["2k", "4k", "8k"];

export function jobCard(record, { compact = false } = {}) {
  const card = el("li", { class: compact ? "job compact" : "job", "data-jobid": record.jobid });
  const shown = cards.get(record.jobid) || [];
  cards.set(record.jobid, [...shown.filter((node) => node.isConnected), card]);
  render(card, record);
  return card;
}

export function updateCards(record) {
  const shown = (cards.get(record.jobid) || []).filter((node) => node.isConnected);
  cards.set(record.jobid, shown);
  for (const card of shown) {
    if (card.dataset.status === record.status) progress(card, record);
    else render(card, record);
  }
}

function title(record) {
  if (record.type === "upscale") {
    return `Upscale ${record.request.resolution} of image ${record.request.imageIndex + 1}`;
  }
  return record.request.prompt || "(references only)";
}

function meta(record) {
  const request = record.request;
  const refs = Object.keys(request).filter((key) => key.startsWith("imageRef_")).length;
  const parts = [record.model];
  if (record.type === "image") parts.push(request.ratio, request.resolution);
  if (refs) parts.push(`${refs} reference${refs > 1 ? "s" : ""}`);
  parts.push(account(record.jobid), when(record.created));
  return parts.filter(Boolean).join(" · ");
}

// The account from the job id: j<time>-u<user>-<account>-bot:dreamina
function account(jobid) {
  const found = /^j\w+-u\d+-(.*)-bot:dreamina$/.exec(jobid);
  return found ? found[1] : "";
}

function statusText(record) {
  if (record.status === "completed") return "Completed";
  if (record.status === "failed") return "Failed";
  if (record.queuePosition) return `Queued, position ${record.queuePosition}`;
  if (record.started) return `Running ${record.progress ?? 0}%`;
  return "Starting";
}

function progress(card, record) {
  const bar = card.querySelector("progress");
  const label = card.querySelector(".status");
  if (label) label.textContent = statusText(record);
  if (bar) {
    if (record.started) bar.value = record.progress ?? 0;
    else bar.removeAttribute("value"); // indeterminate while it waits for a slot
    bar.setAttribute("aria-valuetext", statusText(record));
  }
  card.record = record;
}

function render(card, record) {
  card.dataset.status = record.status;
  card.record = record;
  const error = el("p", { class: "error", role: "alert", hidden: true });
  const actions = el("div", { class: "job-actions" });
  if (record.status === "created") {
    const cancel = el("button", { type: "button", class: "danger" }, "Cancel");
    cancel.addEventListener("click", () => cancelJob(card, cancel, error));
    actions.append(cancel);
  }
  const show = el("button", { type: "button", class: "quiet" }, "Record");
  show.addEventListener("click", () => showRecord(card.record));
  actions.append(show);
  if (record.request.replyUrl) {
    const hooks = el("button", { type: "button", class: "quiet" }, "Webhooks");
    hooks.addEventListener("click", () => {
      document.getElementById("w-jobid").value = record.jobid;
      go("webhooks");
    });
    actions.append(hooks);
  }
  const head = el("div", { class: "job-head" },
    el("div", {},
      el("h3", { class: "job-title" }, title(record)),
      el("p", { class: "meta" }, meta(record))),
    el("span", { class: `status ${record.status}` }, statusText(record)));
  const parts = [head];
  if (record.status === "created") {
    const bar = el("progress", { max: 100, "aria-label": `Progress of ${title(record)}` });
    parts.push(bar);
  }
  if (record.status === "failed") {
    parts.push(el("p", { class: "failure" }, record.error || "Failed",
      record.errorDetails ? el("span", { class: "note" }, ` (${record.errorDetails})`) : null));
  }
  const images = record.response.images || [];
  if (images.length) {
    parts.push(el("ul", { class: "images" }, images.map((image, index) => figure(record, image, index, card.classList.contains("compact")))));
  }
  parts.push(actions, error);
  card.replaceChildren(...parts);
  progress(card, record);
}

function figure(record, image, index, compact) {
  const label = `Image ${index + 1} of ${title(record)}`;
  const open = el("button", { type: "button", class: "thumb", "aria-label": `Open ${label}` },
    el("img", { src: image.imageUrl, alt: label, loading: "lazy", width: image.width, height: image.height }));
  open.addEventListener("click", () => openImage(record, image, index));
  return el("li", { class: "image" }, open, compact ? null : imageTools(record, image, index));
}

// Download, use as reference, upscale: under each image of a card, and in the large view.
function imageTools(record, image, index, after = () => {}) {
  const label = `Image ${index + 1} of ${title(record)}`;
  const download = el("a", {
    href: image.imageUrl,
    download: `${image.itemId}.${image.format === "jpeg" ? "jpg" : image.format}`,
    class: "button quiet",
    "aria-label": `Download ${label}`,
  }, "Download");
  const use = el("button", { type: "button", class: "quiet", "aria-label": `Use ${label} as reference` },
    "Use as reference");
  use.addEventListener("click", () => {
    if (addRef({ assetRef: image.assetRef, url: image.imageUrl, label })) {
      say(`Image ${index + 1} is now a reference`);
      after();
      go("generate");
    }
  });
  const error = el("p", { class: "error", role: "alert", hidden: true });
  const tools = [download, use];
  if (record.type === "image") {
    const size = el("select", { "aria-label": `Upscale resolution of ${label}` },
      UPSCALES.map((r) => el("option", { value: r }, r)));
    size.value = "4k";
    const upscale = el("button", { type: "button", class: "quiet", "aria-label": `Upscale ${label}` },
      "Upscale");
    upscale.addEventListener("click", async () => {
      setError(error, "");
      const done = busy(upscale, "…");
      try {
        const job = await post("/images/upscale", {
          jobid: record.jobid, imageIndex: index, upscaleResolution: size.value,
        });
        after();
        go("generate");
        showResult(job);
      } catch (failure) {
        failed(failure, error);
      } finally {
        done();
      }
    });
    tools.push(el("span", { class: "upscale" }, size, upscale));
  }
  return el("div", { class: "image-tools" }, el("div", { class: "image-actions" }, tools), error);
}

function openImage(record, image, index) {
  const dialog = document.getElementById("viewer");
  const picture = document.getElementById("viewer-image");
  picture.src = image.imageUrl;
  picture.alt = `Image ${index + 1} of ${title(record)}`;
  document.getElementById("viewer-title").textContent = `Image ${index + 1} of ${title(record)}`;
  const seed = image.seed !== undefined ? ` · seed ${image.seed}` : "";
  document.getElementById("viewer-info").textContent =
    `${image.width}×${image.height} ${image.format}${seed} · ${image.assetRef}`;
  document.getElementById("viewer-tools").replaceChildren(
    imageTools(record, image, index, () => dialog.close()));
  dialog.showModal();
}

export function showRecord(record) {
  document.getElementById("record-title").textContent = `Job ${record.jobid}`;
  document.getElementById("record-json").textContent = JSON.stringify(record, null, 2);
  document.getElementById("record").showModal();
}

async function cancelJob(card, button, error) {
  setError(error, "");
  const done = busy(button, "Cancelling…");
  try {
    updateCards(await del(`/scheduler/${seg(card.dataset.jobid)}`));
    say("Job cancelled");
  } catch (failure) {
    done();
    failed(failure, error);
  }
}

// Follow a job until it ends: its event stream, or polling where the stream breaks (a proxy
// that buffers, a restart). A browser opens at most 6 connections to a server (HTTP/1.1), and
// each stream holds one: past MAX_STREAMS jobs are polled, so that the page's other calls
// (cancel, the next page of the history) never wait behind the streams.
const MAX_STREAMS = 3;
let streams = 0;

export async function follow(record) {
  if (record.status !== "created" || following.has(record.jobid)) return;
  const control = new AbortController();
  following.set(record.jobid, control);
  let last = record;
  let retry = false;
  try {
    while (last.status === "created" && !control.signal.aborted) {
      if (streams < MAX_STREAMS) {
        streams += 1;
        try {
          last = (await streamJob(record.jobid, updateCards, control.signal)) || last;
        } finally {
          streams -= 1;
        }
        if (last.status !== "created") break;
      }
      await new Promise((resolve) => setTimeout(resolve, 2000));
      if (control.signal.aborted) break;
      last = await get(`/images/${seg(record.jobid)}`, { signal: control.signal });
      updateCards(last);
    }
  } catch (error) {
    if (error.name === "AbortError") return;
    if (error instanceof ApiError && error.status === 401) failed(error, "generate-error");
    else if (!(error instanceof ApiError)) retry = true; // the connection broke: again soon
  } finally {
    if (following.get(record.jobid) === control) following.delete(record.jobid);
  }
  if (retry) setTimeout(() => follow(last), 2000);
}

export function stopFollowing() {
  for (const control of following.values()) control.abort();
  following.clear();
  cards.clear();
}
