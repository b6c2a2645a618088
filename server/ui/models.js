// The Models panel: launched models (status, batch, memory; terminate) and the launch form over the catalogue.
// Other panels subscribe to the list of launched models to fill their pickers.

import { getJson, request } from "./api.js";
import { $, bytesText, el, guarded, labelled } from "./dom.js";

const listeners = [];
let launched = [];
let catalogue = [];
let polling = null;

export const onModels = (listener) => listeners.push(listener);
export const current = () => launched;

/** Fetch the launched models, redraw, and tell the subscribers; keeps polling while one is loading. */
export async function refresh() {
  launched = (await getJson("/v1/models")).data;
  draw();
  for (const listener of listeners) listener(launched);
  const loading = launched.some((model) => model.status === "created" || model.status === "loading");
  if (loading && polling === null) polling = setInterval(() => guarded(refresh), 1000);
  if (!loading && polling !== null) {
    clearInterval(polling);
    polling = null;
  }
}

function draw() {
  const body = $("#models-table tbody");
  body.replaceChildren(...launched.map((model) => el("tr", { "data-uid": model.id },
    el("th", { scope: "row" }, model.id),
    el("td", {}, model.model_name),
    el("td", {}, (model.model_ability || []).join(", ")),
    el("td", { class: `status ${model.status}`, title: model.error || "" },
      model.status, model.error ? el("span", { class: "model-error" }, `: ${model.error}`) : null),
    el("td", {}, String(model.max_batch_size ?? "—")),
    el("td", {}, bytesText(model.memory_bytes)),
    el("td", {}, el("button", { type: "button", "aria-label": `Terminate ${model.id}`,
      onclick: () => guarded(() => terminate(model.id)) }, "Terminate")),
  )));
  if (!launched.length) body.append(el("tr", {}, el("td", { colspan: "7", class: "hint" }, "No model is launched.")));
}

async function terminate(uid) {
  await request(`/v1/models/${encodeURIComponent(uid)}`, { method: "DELETE" });
  await refresh();
}

/** Fill the launch form from the catalogue and the server's launch choices. */
export async function setUpLaunch(config) {
  catalogue = await getJson("/v1/model_registrations/image?detailed=true");
  $("#launch-name").replaceChildren(...catalogue.map((spec) => el("option", { value: spec.model_name },
    `${spec.model_name} (${spec.model_ability.join(", ")})`)));
  $("#launch-backend").replaceChildren(...config.launch.backends.map((name) => el("option", { value: name }, name)));
  $("#launch-dtype").append(...config.launch.dtypes.map((name) => el("option", { value: name }, name)));
  $("#launch-name").addEventListener("change", fitLaunchForm);
  $("#add-lora").addEventListener("click", () => addLoraFile().focus());
  $("#launch-form").addEventListener("submit", (event) => {
    event.preventDefault();
    guarded(launch);
  });
  fitLaunchForm();
}

const entry = (name) => catalogue.find((spec) => spec.model_name === name);
const isOcr = (name) => (entry(name)?.model_ability || []).includes("ocr");

/** OCR models have real weights and none of the diffusion options: those fields are disabled for them. The
 * ControlNet choices are the catalogue entry's (its registration's `controlnet` list). */
function fitLaunchForm() {
  const name = $("#launch-name").value;
  for (const id of ["#launch-tiny", "#launch-backend", "#launch-offload"]) $(id).disabled = isOcr(name);
  const controlnets = (entry(name)?.controlnet || []).map((controlnet) => controlnet.model_name);
  $("#launch-controlnet-names").replaceChildren(...controlnets.map((controlnet) => el("label", { class: "check" },
    el("input", { type: "checkbox", value: controlnet }), controlnet)));
  $("#launch-controlnets").hidden = controlnets.length === 0;
  $("#launch-loras").hidden = isOcr(name);
}

/** A row of the launch's LoRA list (Xinference's peft_model_config.lora_list); returns its name field. */
function addLoraFile() {
  const name = labelled("LoRA name", "input", { class: "lora-name", spellcheck: "false" });
  const path = labelled("Local path", "input", { class: "lora-path", spellcheck: "false",
    placeholder: "/loras/style.safetensors" });
  const item = el("li", {}, el("div", { class: "grid" }, name.node, path.node),
    el("button", { type: "button", onclick: () => item.remove() }, "Remove LoRA file"));
  $("#launch-lora-list").append(item);
  return name.input;
}

/** The LoRA launch options the user filled in; a half-filled row is sent for the server to name what is missing. */
function loraOptions(name) {
  if (isOcr(name)) return {};
  const options = {};
  const lora_list = [...document.querySelectorAll("#launch-lora-list li")]
    .map((item) => ({ lora_name: $(".lora-name", item).value.trim(), local_path: $(".lora-path", item).value.trim() }))
    .filter((lora) => lora.lora_name || lora.local_path);
  if (lora_list.length) options.peft_model_config = { lora_list };
  const slots = $("#launch-max-loras").value.trim();
  if (slots) options.max_loras = /^\d+$/.test(slots) ? Number(slots) : slots;
  if ($("#launch-lora-dir").value.trim()) options.lora_dir = $("#launch-lora-dir").value.trim();
  return options;
}

/** The launch body: only what the user changed from the defaults, as `POST /v1/models` takes it. */
function launchBody() {
  const name = $("#launch-name").value;
  const body = { model_name: name, model_type: "image" };
  const uid = $("#launch-uid").value.trim();
  if (uid) body.model_uid = uid;
  const batch = $("#launch-batch").value.trim();
  if (batch) body.max_batch_size = /^\d+$/.test(batch) ? Number(batch) : batch;
  if ($("#launch-dtype").value) body.torch_dtype = $("#launch-dtype").value;
  if ($("#launch-device").value !== "auto") body.device = $("#launch-device").value;
  if (!isOcr(name)) {
    if ($("#launch-tiny").checked) body.tiny = true;
    if ($("#launch-backend").value !== "auto") body.backend = $("#launch-backend").value;
    if ($("#launch-offload").checked) body.cpu_offload = true;
  }
  const controlnets = [...document.querySelectorAll("#launch-controlnet-names input:checked")].map((box) => box.value);
  if (controlnets.length) body.controlnet = controlnets;
  return { ...body, ...loraOptions(name) };
}

async function launch() {
  // wait_ready=false: the launch answers at once and the table shows "loading" until the model is ready.
  await request("/v1/models?wait_ready=false", { method: "POST", json: launchBody() });
  $("#launch-uid").value = "";
  await refresh();
}
