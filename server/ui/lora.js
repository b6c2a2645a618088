// The Generate form's LoRA picker, from the model's description (`lora`): in per-row mode, one checkbox per
// registered LoRA with its scale, at most `max_loras_per_request` at once, the launch default picked to start;
// in fused mode only a note (every request gets the fused LoRAs). The request's `lora` is the picked list;
// none picked sends `[]` where the model has a default (absent would mean the default), else nothing.

import { $, el, labelled, numberOrText } from "./dom.js";

let info = null; // the selected model's description `lora` (per-row mode), or null
let shown = ""; // which model and names the picker was built for, so a refresh keeps the user's picks

const boxes = () => [...document.querySelectorAll("#lora-list input[type=checkbox]")];

export function setLoras(model) {
  const lora = model?.lora;
  const perRow = lora?.mode === "per-row" && lora.registered.length > 0;
  info = perRow ? lora : null;
  $("#lora").hidden = !lora;
  $("#lora-hint").textContent = !lora ? "" : perRow
    ? `Pick up to ${lora.max_loras_per_request} to stack, each at its own scale (-10 to 10).`
    : `Fused at launch: ${lora.fused.join(", ")} (every request gets them).`;
  const key = perRow ? `${model.id}\n${lora.registered.join("\n")}` : "";
  if (key !== shown) {
    shown = key;
    $("#lora-list").replaceChildren(...(perRow ? lora.registered.map(row) : []));
    limitStack();
  }
}

function row(name) {
  const picked = info.default.find((lora) => lora.name === name);
  const box = labelled(name, "input",
    { type: "checkbox", value: name, checked: Boolean(picked), onchange: limitStack });
  const scale = labelled(`Scale for ${name}`, "input", { type: "number", step: 0.1, min: -10, max: 10,
    value: String(picked ? picked.scale : 1), class: "scale" });
  return el("div", { class: "lora-row" }, box.node, scale.node);
}

/** Past the model's per-request bound the other checkboxes are disabled. */
function limitStack() {
  const full = boxes().filter((box) => box.checked).length >= (info?.max_loras_per_request ?? Infinity);
  for (const box of boxes()) box.disabled = full && !box.checked;
}

/** The request's `lora` field, or undefined to leave it out. */
export function chosenLoras() {
  if (!info) return undefined;
  const picked = boxes().filter((box) => box.checked).map((box) =>
    ({ name: box.value, scale: numberOrText(box.closest(".lora-row").querySelector(".scale")) }));
  return picked.length || info.default.length ? picked : undefined;
}
