// Small DOM helpers shared by the panels, and the one error area every failure is shown in.

export const $ = (selector, root = document) => root.querySelector(selector);

/** el("a", {href, download: "x.png"}, "text", child...): attributes set as properties where they exist. */
export function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value === undefined || value === null || value === false) continue;
    if (name in node && typeof value !== "string") node[name] = value;
    else node.setAttribute(name, value === true ? "" : value);
  }
  node.append(...children.filter((child) => child !== null && child !== undefined));
  return node;
}

let ids = 0;

/** A control with an id of its own and a label that names it, as {input, node}: a checkbox sits inside its
 * label, any other control under it. For controls made many times over (ControlNet units, LoRAs). */
export function labelled(text, tag, attributes = {}) {
  ids += 1;
  const id = `control-${ids}`;
  const input = el(tag, { id, ...attributes });
  const check = attributes.type === "checkbox";
  const label = el("label", { for: id, class: check ? "check" : null }, check ? input : null, text);
  return { input, node: check ? label : el("div", {}, label, input) };
}

/** Show the server's message (an ApiError's) or any other failure's, in the page's alert area. */
export function showError(error) {
  const where = [error.status && `HTTP ${error.status}`, error.code].filter(Boolean).join(", ");
  $("#error-message").textContent = where ? `${error.message} (${where})` : error.message;
  $("#errors").hidden = false;
}

export function clearError() {
  $("#errors").hidden = true;
  $("#error-message").textContent = "";
}

/** Run an async action; a failure goes to the error area instead of the console. */
export async function guarded(action) {
  try {
    return await action();
  } catch (error) {
    showError(error);
    return undefined;
  }
}

export function bytesText(bytes) {
  if (typeof bytes !== "number") return "—";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return `${value.toFixed(unit ? 1 : 0)} ${units[unit]}`;
}

/** A typed value from a text field: a number when it reads as one, the text otherwise (the server says what is
 * wrong with it), undefined when empty. */
export function numberOrText(input) {
  const text = input.value.trim();
  if (text === "") return undefined;
  return Number.isFinite(Number(text)) ? Number(text) : text;
}

export function dataUrl(b64, format = "png") {
  return `data:image/${format};base64,${b64}`;
}

export const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
