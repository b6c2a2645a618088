// The inpainting mask: the input image under a canvas the user paints on with the mouse (or pen, or touch).
// Painted pixels are white in the mask sent as `mask_image` (white = repaint), the rest black, at the image's
// own size, as the server requires.

import { $ } from "./dom.js";

let painted = false;

const canvas = () => $("#mask-canvas");

/** Show `file` under a fresh, empty mask of its size. */
export function loadMaskImage(file) {
  const image = $("#mask-image");
  if (image.src) URL.revokeObjectURL(image.src);
  image.onload = () => {
    canvas().width = image.naturalWidth;
    canvas().height = image.naturalHeight;
    clearMask();
  };
  image.src = URL.createObjectURL(file);
}

export const hasMask = () => painted;

export function clearMask() {
  canvas().getContext("2d").clearRect(0, 0, canvas().width, canvas().height);
  painted = false;
}

function fillMask() {
  const context = canvas().getContext("2d");
  context.fillStyle = "#fff";
  context.fillRect(0, 0, canvas().width, canvas().height);
  painted = true;
}

/** The mask as a PNG blob: black everywhere but the painted strokes. */
export function maskBlob() {
  const out = document.createElement("canvas");
  out.width = canvas().width;
  out.height = canvas().height;
  const context = out.getContext("2d");
  context.fillStyle = "#000";
  context.fillRect(0, 0, out.width, out.height);
  context.drawImage(canvas(), 0, 0);
  return new Promise((resolve) => out.toBlob(resolve, "image/png"));
}

/** Mouse position -> image pixel (the canvas is shown scaled). */
function point(event) {
  const box = canvas().getBoundingClientRect();
  return [(event.clientX - box.left) * (canvas().width / box.width),
    (event.clientY - box.top) * (canvas().height / box.height)];
}

export function setUpMask() {
  let last = null;
  const paint = (event) => {
    const context = canvas().getContext("2d");
    const [x, y] = point(event);
    context.strokeStyle = "#fff";
    context.lineCap = context.lineJoin = "round";
    context.lineWidth = Number($("#brush").value) * (canvas().width / canvas().getBoundingClientRect().width);
    context.beginPath();
    context.moveTo(...(last || [x, y]));
    context.lineTo(x, y);
    context.stroke();
    last = [x, y];
    painted = true;
  };
  canvas().addEventListener("pointerdown", (event) => {
    canvas().setPointerCapture(event.pointerId);
    last = null;
    paint(event);
  });
  canvas().addEventListener("pointermove", (event) => {
    if (canvas().hasPointerCapture(event.pointerId)) paint(event);
  });
  canvas().addEventListener("pointerup", () => { last = null; });
  $("#clear-mask").addEventListener("click", clearMask);
  $("#fill-mask").addEventListener("click", fillMask);
}
