// The Generate form's ControlNet units: shown only for a model with resident ControlNets (its description's
// `controlnet` list). Each unit names one of them (or none), with its control image, scale, step window, guess
// mode and optional canny preprocessing; the values go to the server as typed, and the server checks them.

import { $, el, labelled, numberOrText } from "./dom.js";

let names = []; // the selected model's resident ControlNets

const units = () => [...document.querySelectorAll("#controlnet-units .unit")];

export function setUpControlNet() {
  $("#add-unit").addEventListener("click", () => {
    addUnit();
    units().at(-1).querySelector("select").focus();
  });
  addUnit();
}

/** Show the section for `model` when it has resident ControlNets; keep each unit's choice where it still fits. */
export function setControlNets(model) {
  names = (model?.controlnet || []).map((resident) => resident.model_name);
  $("#controlnet").hidden = names.length === 0;
  for (const unit of units()) fillNames(unit.querySelector("select"));
}

function fillNames(select) {
  const keep = select.value;
  const options = names.map((name) => el("option", { value: name }, name));
  select.replaceChildren(el("option", { value: "" }, "none"), ...options);
  select.value = names.includes(keep) ? keep : "";
}

/** A unit's control: `field` is the unit key it holds. */
const control = (text, field, tag, attributes = {}) => labelled(text, tag, { "data-field": field, ...attributes });

function addUnit() {
  const name = control("ControlNet", "name", "select");
  fillNames(name.input);
  const canny = control("Preprocess: canny (send a photo, the server finds its edges)", "preprocess", "input",
    { type: "checkbox" });
  const thresholds = [control("Low", "low", "input", { type: "number", value: "100", min: 0, max: 255 }),
    control("High", "high", "input", { type: "number", value: "200", min: 0, max: 255 })];
  const setThresholds = () => thresholds.forEach(({ input }) => { input.disabled = !canny.input.checked; });
  canny.input.addEventListener("change", setThresholds);
  const unit = el("fieldset", { class: "unit" },
    el("legend", {}),
    name.node,
    control("Control image", "image", "input", { type: "file", accept: "image/*" }).node,
    el("div", { class: "grid" },
      control("Scale", "scale", "input", { type: "number", value: "1", step: 0.1, min: 0, max: 5 }).node,
      control("Start", "start", "input", { type: "number", value: "0", step: 0.05, min: 0, max: 1 }).node,
      control("End", "end", "input", { type: "number", value: "1", step: 0.05, min: 0, max: 1 }).node),
    control("Guess mode", "guess_mode", "input", { type: "checkbox" }).node,
    canny.node,
    el("div", { class: "grid" }, ...thresholds.map(({ node }) => node)),
    el("button", { type: "button", class: "remove", onclick: () => { unit.remove(); renumber(); } }));
  setThresholds();
  $("#controlnet-units").append(unit);
  renumber();
}

/** Units are named by their position ("ControlNet unit 2"), which is also the order the server applies them in. */
function renumber() {
  units().forEach((unit, index) => {
    unit.querySelector("legend").textContent = `ControlNet unit ${index + 1}`;
    unit.querySelector(".remove").textContent = `Remove unit ${index + 1}`;
  });
}

/** The units that name a ControlNet, in order, as [{unit, file}]: the request's unit without its image, and
 * the control image file to send with it. */
export function chosenUnits() {
  if ($("#controlnet").hidden) return [];
  return units().flatMap((node, index) => {
    const value = (name) => node.querySelector(`[data-field=${name}]`);
    if (!value("name").value) return [];
    const file = value("image").files[0];
    if (!file) throw new Error(`ControlNet unit ${index + 1}: choose a control image.`);
    const canny = value("preprocess").checked;
    const unit = {
      name: value("name").value, scale: numberOrText(value("scale")), start: numberOrText(value("start")),
      end: numberOrText(value("end")), guess_mode: value("guess_mode").checked,
      preprocess: canny ? "canny" : undefined,
      low: canny ? numberOrText(value("low")) : undefined, high: canny ? numberOrText(value("high")) : undefined,
    };
    return [{ unit, file }];
  });
}
