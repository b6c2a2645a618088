// The "Batch at work" panel: polls /metrics (Prometheus text) and shows, per model, the images waiting and
// being denoised, and, from the change since the last poll, rows per batched forward and steps per second.

import { getText } from "./api.js";
import { $, el } from "./dom.js";

const POLL_MS = 500;
let last = null; // {at, models} of the previous poll
const peaks = new Map();

/** {uid: {metric name: value}} from the exposition's per-model samples; a model served by several replicas
 * (kiln serve --ray) has one sample per replica, summed here. */
export function parseMetrics(text) {
  const byModel = {};
  for (const line of text.split("\n")) {
    const match = /^(kiln_[a-z_]+)\{model="((?:[^"\\]|\\.)*)"(?:,replica="[^"]*")?\} (\S+)$/.exec(line);
    if (!match) continue;
    const [, name, uid, value] = match;
    const model = (byModel[uid] ||= {});
    model[name] = (model[name] ?? 0) + Number(value);
  }
  return byModel;
}

function rates(now, before, seconds) {
  if (!before || seconds <= 0) return { rows: null, stepsPerSecond: null };
  const forwards = now.kiln_forward_rows_count - before.kiln_forward_rows_count;
  const rows = now.kiln_forward_rows_sum - before.kiln_forward_rows_sum;
  const steps = now.kiln_steps_total - before.kiln_steps_total;
  return { rows: forwards > 0 ? rows / forwards : null, stepsPerSecond: steps / seconds };
}

function draw(models, at) {
  const rowsOut = Object.entries(models).map(([uid, now]) => {
    const { rows, stepsPerSecond } = rates(now, last?.models[uid], (at - (last?.at ?? at)) / 1000);
    const active = now.kiln_active_jobs ?? 0;
    const waiting = now.kiln_queue_depth ?? 0;
    peaks.set(uid, Math.max(peaks.get(uid) || 0, active));
    // One square per active image, one hollow square per waiting image (capped so a long queue stays one line).
    const squares = el("span", { class: "squares", "aria-hidden": "true" },
      "■".repeat(Math.min(active, 32)) + "□".repeat(Math.min(waiting, 32)));
    return el("tr", { "data-model": uid },
      el("th", { scope: "row" }, uid),
      el("td", { class: "waiting" }, String(waiting)),
      el("td", { class: "active" }, el("span", { class: "count" }, String(active)), " ", squares),
      el("td", { class: "rows" }, rows === null ? "—" : rows.toFixed(1)),
      el("td", { class: "steps" }, stepsPerSecond === null ? "—" : stepsPerSecond.toFixed(1)),
      el("td", { class: "generated" }, String(now.kiln_images_generated_total ?? 0)),
      el("td", { class: "peak" }, String(peaks.get(uid))));
  });
  $("#batch-table tbody").replaceChildren(...rowsOut);
}

async function poll(onUids) {
  if (document.hidden) return;
  let models;
  try {
    models = parseMetrics(await getText("/metrics"));
  } catch {
    return; // a missing key or a restarting server: the rest of the page reports it; try again next poll
  }
  const at = performance.now();
  draw(models, at);
  last = { at, models };
  onUids(Object.keys(models));
}

let timer = null;

/** Poll /metrics; `onUids` gets the model uids it lists (so the page notices models launched elsewhere). */
export function startBatchPanel(onUids) {
  poll(onUids);
  timer ??= setInterval(() => poll(onUids), POLL_MS);
}
