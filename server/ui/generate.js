// The Generate panel and its results. Every request streams (`stream: true`): previews replace the placeholder
// as they arrive, a progress bar follows `GET /v1/requests/{id}/progress`, and the final images carry their
// seeds. Text to image posts JSON to /generations; image to image and inpainting post multipart to
// /variations and /inpainting. Images come back as b64_json, so they show with API keys on too. ControlNet
// units travel with either: in JSON with their images as base64, in multipart as a `controlnet` JSON field
// with the images as `control_image` files in unit order (a text field is capped at 1 MB, files are not).

import { ApiError, getJson, readEvents, request } from "./api.js";
import { chosenUnits, setControlNets, setUpControlNet } from "./controlnet.js";
import { $, dataUrl, el, guarded, numberOrText, sleep } from "./dom.js";
import { chosenLoras, setLoras } from "./lora.js";
import { hasMask, loadMaskImage, maskBlob, setUpMask } from "./mask.js";

const MODES = { text2image: "text to image", image2image: "image to image", inpainting: "inpainting" };
const ENDPOINTS = { text2image: "/v1/images/generations", image2image: "/v1/images/variations",
  inpainting: "/v1/images/inpainting" };
const PROGRESS_POLL_MS = 250;
const BLANK = "data:image/svg+xml,%3Csvg xmlns='http://www.w3.org/2000/svg'/%3E"; // an empty frame until a preview

let config = { samplers: {} };
let models = [];

const selected = () => models.find((model) => model.id === $("#model").value);
const mode = () => document.querySelector("input[name=mode]:checked").value;

export function setUpGenerate() {
  $("#model").addEventListener("change", () => applyDefaults(selected()));
  for (const radio of document.querySelectorAll("input[name=mode]")) radio.addEventListener("change", showMode);
  $("#image-file").addEventListener("change", () => {
    const file = $("#image-file").files[0];
    if (file) loadMaskImage(file);
  });
  $("#prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) $("#generate-form").requestSubmit();
  });
  $("#generate-form").addEventListener("submit", (event) => {
    event.preventDefault();
    guarded(generate);
  });
  setUpMask();
  setUpControlNet();
}

export function setConfig(value) {
  config = value;
  $("#n").max = value.limits.max_images;
  $("#partial-images").max = value.limits.max_partial_images;
  $("#steps").max = value.limits.max_steps;
  $("#guidance").max = value.limits.max_guidance;
}

/** Refill the picker with the launched image models; keep the choice, else take the first text-to-image one. */
export function setModels(launched) {
  models = launched.filter((model) => model.model_ability.some((ability) => ability in MODES));
  const keep = $("#model").value;
  $("#model").replaceChildren(...models.map((model) => el("option", { value: model.id },
    `${model.id} (${model.model_ability.join(", ")})${model.status === "ready" ? "" : ` — ${model.status}`}`)));
  const still = models.find((model) => model.id === keep);
  const first = models.find((model) => model.model_ability.includes("text2image")) || models[0];
  if (still) $("#model").value = keep;
  else if (first) {
    $("#model").value = first.id;
    applyDefaults(first);
  }
  setControlNets(selected()); // a model that finished loading lists its ControlNets and LoRAs now
  setLoras(selected());
  showMode();
}

/** The model's catalogue defaults: size, steps, guidance, and the samplers its family accepts. */
function applyDefaults(model) {
  if (!model) return;
  $("#size").value = mode() === "text2image" ? model.default_size : "";
  $("#steps").value = model.default_steps;
  $("#guidance").value = model.default_guidance_scale;
  const samplers = config.samplers[model.model_name] || ["default"];
  $("#sampler").replaceChildren(...samplers.map((name) => el("option", { value: name }, name)));
  setControlNets(model);
  setLoras(model);
  showMode();
}

/** Enable the modes the model has; show the input image (and mask) for the image modes. */
function showMode() {
  const abilities = selected()?.model_ability || [];
  for (const radio of document.querySelectorAll("input[name=mode]")) radio.disabled = !abilities.includes(radio.value);
  const checked = document.querySelector("input[name=mode]:checked");
  if (checked.disabled) {
    const able = [...document.querySelectorAll("input[name=mode]")].find((radio) => !radio.disabled);
    if (able) able.checked = true;
  }
  const image = mode() !== "text2image";
  $("#input-image").hidden = !image;
  $("#mask-editor").hidden = mode() !== "inpainting";
  $("#size").placeholder = image ? "the input's size" : selected()?.default_size || "";
  if (!image && !$("#size").value && selected()) $("#size").value = selected().default_size;
}

const field = (id) => numberOrText($(id));

function parameters() {
  const seed = field("#seed");
  return {
    model: $("#model").value || undefined,
    prompt: $("#prompt").value,
    negative_prompt: $("#negative-prompt").value || undefined,
    size: $("#size").value.trim() || undefined,
    num_inference_steps: field("#steps"),
    guidance_scale: field("#guidance"),
    sampler_name: $("#sampler").value || undefined,
    seed: seed === -1 ? undefined : seed,
    n: field("#n"),
    strength: mode() === "text2image" ? undefined : field("#strength"),
    partial_images: field("#partial-images"),
    lora: chosenLoras(),
    stream: true,
    response_format: "b64_json",
    request_id: `ui-${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 10)}`,
  };
}

const base64 = (file) => new Promise((resolve, reject) => {
  const reader = new FileReader();
  reader.onload = () => resolve(reader.result); // a data: URL, which the server takes as base64
  reader.onerror = () => reject(reader.error);
  reader.readAsDataURL(file);
});

async function body(params, units) {
  if (mode() === "text2image") {
    if (!units.length) return { json: params };
    const controlnet = await Promise.all(units.map(async ({ unit, file }) => ({ ...unit, image: await base64(file) })));
    return { json: { ...params, controlnet } };
  }
  const file = $("#image-file").files[0];
  if (!file) throw new Error("Choose an input image first.");
  const form = new FormData();
  for (const [name, value] of Object.entries(params)) {
    if (value !== undefined) form.append(name, typeof value === "object" ? JSON.stringify(value) : String(value));
  }
  form.append("image", file);
  // Always sent, `[]` for none: on a model launched with ControlNet, variations without it would read the image
  // as the control image (Xinference's form), and this form's image is the one to start from.
  form.append("controlnet", JSON.stringify(units.map(({ unit }) => unit)));
  for (const unit of units) form.append("control_image", unit.file);
  if (mode() === "inpainting") {
    if (!hasMask()) throw new Error("Draw the mask first: paint over the parts to repaint.");
    form.append("mask_image", await maskBlob(), "mask.png");
  }
  return { form };
}

async function generate() {
  const requestMode = mode();
  const params = parameters();
  const units = chosenUnits();
  const payload = await body(params, units);
  // Invalid input is refused before the stream starts: the error area shows it and no card is made.
  const response = await request(ENDPOINTS[requestMode], { method: "POST", ...payload });
  const card = new ResultCard(params, requestMode, units.map(({ unit }) => unit));
  let done = false;
  try {
    followProgress(params.request_id, card, () => done);
    await readEvents(response, (name, data) => {
      if (name.endsWith(".partial_image")) card.preview(data);
      else if (name.endsWith(".completed")) card.complete(data);
      else if (name === "error") throw new ApiError(null, data);
    });
    card.finish();
  } catch (error) {
    card.fail(error);
    throw error;
  } finally {
    done = true;
  }
}

/** Poll the request's progress until its stream has ended. */
async function followProgress(requestId, card, finished) {
  while (!finished()) {
    try {
      card.progress((await getJson(`/v1/requests/${encodeURIComponent(requestId)}/progress`)).progress);
    } catch {
      // not known yet, or already forgotten: the stream's end settles the bar
    }
    await sleep(PROGRESS_POLL_MS);
  }
}

/** One request in the Results list: its parameters, a progress bar, and one figure per image. */
class ResultCard {
  constructor(params, requestMode, units) {
    const count = Number.isInteger(params.n) ? params.n : 1; // the server accepted it, so within its limit
    const details = [
      params.model, MODES[requestMode], params.size || "default size", `${params.num_inference_steps ?? "default"} steps`,
      `guidance ${params.guidance_scale ?? "default"}`, `sampler ${params.sampler_name || "default"}`,
      params.strength !== undefined ? `strength ${params.strength}` : null,
      params.lora && `LoRA ${params.lora.map((lora) => `${lora.name} ${lora.scale ?? "default scale"}`).join(", ")
        || "none"}`,
      ...units.map((unit) => `ControlNet ${unit.name} scale ${unit.scale ?? "default"}`),
    ].filter(Boolean).join(" · ");
    this.bar = el("progress", { max: 1, value: 0, "aria-label": "Progress" });
    this.percent = el("span", { class: "percent" }, "0%");
    this.figures = Array.from({ length: count }, (_, index) => new ImageFigure(index));
    this.node = el("li", { class: "request", "aria-label": `Request: ${params.prompt || "(no prompt)"}` },
      el("p", { class: "prompt" }, params.prompt || "(no prompt)"),
      el("p", { class: "params" }, details),
      el("p", { class: "progress-line" }, this.bar, this.percent),
      el("div", { class: "images" }, ...this.figures.map((figure) => figure.node)));
    $("#result-list").prepend(this.node);
    $("#no-results").hidden = true;
  }

  figure(index) {
    return this.figures[index] || this.figures[0];
  }

  preview(event) {
    this.figure(event.image_index ?? 0).preview(event);
  }

  complete(event) {
    this.figure(event.image_index ?? 0).complete(event);
  }

  progress(value) {
    if (value > this.bar.value) {
      this.bar.value = value;
      this.percent.textContent = `${Math.round(value * 100)}%`;
    }
  }

  finish() {
    this.progress(1);
    this.node.classList.add("done");
  }

  fail(error) {
    this.node.classList.add("failed");
    this.node.querySelector(".progress-line").replaceChildren(el("span", { class: "failure" }, `Failed: ${error.message}`));
  }
}

/** One image of a request: latest preview, then the final image with its seed, download link and reuse. */
class ImageFigure {
  constructor(index) {
    this.index = index;
    this.image = el("img", { alt: `Image ${index + 1}, waiting`, class: "pending", src: BLANK });
    this.previews = el("div", { class: "previews", "aria-label": `Previews of image ${index + 1}` });
    this.caption = el("figcaption", {}, el("span", { class: "seed" }, "seed …"));
    this.node = el("figure", { class: "image" }, this.image, this.caption, this.previews);
  }

  preview(event) {
    const number = event.partial_image_index + 1;
    const src = dataUrl(event.b64_json, event.output_format);
    this.image.src = src;
    this.image.alt = `Preview ${number}, image ${this.index + 1}`;
    this.image.className = "preview";
    this.previews.append(el("img", { src, alt: `Preview ${number} of image ${this.index + 1}` }));
  }

  complete(event) {
    const src = dataUrl(event.b64_json, event.output_format);
    this.image.src = src;
    this.image.alt = `Image ${this.index + 1}, seed ${event.seed}`;
    this.image.className = "final";
    const reuse = el("button", { type: "button", "aria-label": `Reuse seed ${event.seed}`,
      onclick: () => { $("#seed").value = event.seed; $("#seed").focus(); } }, "Reuse seed");
    this.caption.replaceChildren(
      el("span", { class: "seed" }, `seed ${event.seed}`),
      el("a", { href: src, download: `kiln-${event.seed}.${event.output_format}`,
        "aria-label": `Download image ${this.index + 1}, seed ${event.seed}` }, "Download"),
      reuse);
  }
}
