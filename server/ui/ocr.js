// The OCR panel: upload an image (or a PDF), read it with `kwargs {"detail": true}`, and show the text and each
// line's box drawn over the image.

import { request } from "./api.js";
import { $, el, guarded } from "./dom.js";

const SVG = "http://www.w3.org/2000/svg";

export function setUpOcr() {
  $("#ocr-form").addEventListener("submit", (event) => {
    event.preventDefault();
    guarded(read);
  });
}

export function setOcrModels(launched) {
  const able = launched.filter((model) => model.model_ability.includes("ocr"));
  const keep = $("#ocr-model").value;
  $("#ocr-model").replaceChildren(...able.map((model) => el("option", { value: model.id },
    `${model.id}${model.status === "ready" ? "" : ` — ${model.status}`}`)));
  if (able.some((model) => model.id === keep)) $("#ocr-model").value = keep;
}

async function read() {
  const file = $("#ocr-file").files[0];
  if (!file) throw new Error("Choose an image to read first.");
  const form = new FormData();
  if ($("#ocr-model").value) form.append("model", $("#ocr-model").value);
  form.append("image", file);
  form.append("kwargs", JSON.stringify({ detail: true }));
  const result = await (await request("/v1/images/ocr", { method: "POST", form })).json();
  // An image answers {text, lines}; a PDF {text, pages: [{lines, width, height}]}: boxes only for an image.
  const lines = result.lines || [];
  $("#ocr-result").hidden = false;
  $("#ocr-text").textContent = result.text;
  $("#ocr-lines").replaceChildren(...(result.lines || result.pages.flatMap((page) => page.lines)).map((line) =>
    el("li", {}, line.text, el("span", { class: "score" }, ` score ${line.score.toFixed(2)}`))));
  const image = $("#ocr-image");
  const boxes = $("#ocr-boxes");
  boxes.replaceChildren();
  image.hidden = boxes.hidden = file.type === "application/pdf";
  if (image.hidden) return;
  if (image.src) URL.revokeObjectURL(image.src);
  image.onload = () => {
    boxes.setAttribute("viewBox", `0 0 ${image.naturalWidth} ${image.naturalHeight}`);
    boxes.replaceChildren(...lines.map((line) => {
      const shape = document.createElementNS(SVG, "polygon");
      shape.setAttribute("points", line.box.map(([x, y]) => `${x},${y}`).join(" "));
      const title = document.createElementNS(SVG, "title");
      title.textContent = line.text;
      shape.append(title);
      return shape;
    }));
  };
  image.src = URL.createObjectURL(file);
}
