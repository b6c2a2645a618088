"""PP-OCR on onnxruntime: PaddleOCR's PP-OCRv6 small detector and recogniser and the v2.0 direction classifier,
as the `rapidocr` wheel ships them.

Kiln uses rapidocr's model pieces (pre- and post-processing, the CTC decoder) but builds every onnxruntime
session itself from explicit file paths: rapidocr's own loader resolves models through a download table, and
here nothing may ever be fetched. Detection runs per page; the text crops of every page in a step (several
requests) then go through the classifier and the recogniser together, in forwards of up to `max_batch_size`
crops of similar width (sorted by aspect ratio, so padding to the widest crop of a forward stays small).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from ..errors import ModelLoadError
from .layout import Segment
from .options import OcrOptions

log = logging.getLogger("kiln.engine.ocr")

DET_FILE = "PP-OCRv6_det_small.onnx"
REC_FILE = "PP-OCRv6_rec_small.onnx"
CLS_FILE = "ch_ppocr_mobile_v2.0_cls_mobile.onnx"
# Crops per recognition forward when the launch does not say. On one CPU thread a forward's cost grows with its
# crops (no per-crop saving, measured), so batching there only groups requests; on a GPU it is the throughput.
DEFAULT_BATCH = {"cpu": 8, "cuda": 32}
WIDTH_BUCKET = 1.3  # a forward's widest crop (aspect ratio) is at most this much wider than its narrowest
# rapidocr's defaults, except detection at the page's own resolution (PaddleOCR 3's `limit_side_len=64, min`):
# rapidocr's `736, min` upscales small images until their short side is 736 px, which is 20-40x slower on
# line-sized images and splits lines at word gaps.
MIN_SIDE, MAX_SIDE = 30, 2000  # pages are scaled into these bounds before detection
MAX_ASPECT = MAX_SIDE / 32  # thinner pages are padded first: scaled into the bounds, a side must keep 32 px
PAD_RATIO, PAD_MIN_HEIGHT = 8, 30  # very wide or short images are padded vertically before detection
DET = {"limit_side_len": 64, "limit_type": "min", "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "thresh": 0.3,
       "box_thresh": 0.5, "max_candidates": 1000, "unclip_ratio": 1.6, "use_dilation": True, "score_mode": "fast"}
REC_SHAPE = (3, 48, 320)
CLS_THRESH = 0.9

ForwardCallback = Callable[[int, float], None]  # (crops in the forward, seconds)


def wheel_models_dir() -> Path:
    """Where the rapidocr wheel keeps its bundled .onnx files."""
    import rapidocr

    return Path(rapidocr.__file__).resolve().parent / "models"


@dataclass(frozen=True)
class ModelFiles:
    det: Path
    rec: Path
    cls: Path


def model_files(model_path: str | None) -> ModelFiles:
    """The three .onnx files: the wheel's, or from `model_path` (a directory with one `*det*.onnx` and one
    `*rec*.onnx`, and optionally a `*cls*.onnx`; missing pieces come from the wheel)."""
    bundled = wheel_models_dir()
    files = {"det": bundled / DET_FILE, "rec": bundled / REC_FILE, "cls": bundled / CLS_FILE}
    if model_path:
        directory = Path(model_path).expanduser()
        if not directory.is_dir():
            raise ModelLoadError(f"model_path {str(directory)!r} is not a directory; for PP-OCR pass a directory "
                                 "holding a *det*.onnx and a *rec*.onnx (and optionally a *cls*.onnx)")
        for part in ("det", "rec", "cls"):
            found = sorted(directory.glob(f"*{part}*.onnx"))
            if len(found) > 1:
                raise ModelLoadError(f"model_path {str(directory)!r} has several *{part}*.onnx files: "
                                     f"{[f.name for f in found]}; keep one")
            if found:
                files[part] = found[0]
            elif part != "cls":
                raise ModelLoadError(f"model_path {str(directory)!r} has no *{part}*.onnx file")
    for part, path in files.items():
        if not path.is_file():
            raise ModelLoadError(f"the PP-OCR {part} model {str(path)!r} is missing (reinstall rapidocr==3.10.0, "
                                 "whose wheel ships it, or pass model_path)")
    return ModelFiles(**files)


class _Section(dict):
    """The attribute-and-key config object rapidocr's model classes read (instead of its OmegaConf tree)."""

    __getattr__ = dict.__getitem__


def _providers(device: str) -> tuple[str, list]:
    """(device kind, onnxruntime providers) for a device option; CUDA needs onnxruntime-gpu."""
    import onnxruntime as ort

    has_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    if device == "auto":
        device = "cuda" if has_cuda else "cpu"
    if device == "cpu":
        return "cpu", ["CPUExecutionProvider"]
    if not has_cuda:
        raise ModelLoadError(f"device={device!r}, but this onnxruntime has no CUDA provider (install "
                             "onnxruntime-gpu instead of onnxruntime); use device='cpu' or 'auto'")
    index = int(device.partition(":")[2] or 0)
    return "cuda", [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]


def _widen_thin(image: Image.Image, record: dict) -> Image.Image:
    """A page thinner than MAX_ASPECT (a 2 x 4000 strip) scaled to fit MAX_SIDE and padded with white across its
    short side, since rapidocr's resizes round such a side to 0 pixels (ResizeImgError) or, scaling it up to
    MIN_SIDE, blow the long side up past memory. Other pages pass unchanged. The steps go into `record` in
    rapidocr's op-record form, so `map_boxes_to_original` undoes them."""
    width, height = image.size
    if max(width, height) <= MAX_ASPECT * min(width, height):
        return image
    scale = min(1.0, MAX_SIDE / max(width, height))
    scaled = image.resize((max(1, round(width * scale)), max(1, round(height * scale))))
    record["preprocess_thin"] = {"ratio_h": height / scaled.height, "ratio_w": width / scaled.width}
    short = math.ceil(max(scaled.size) / MAX_ASPECT)
    canvas = Image.new("RGB", (max(scaled.width, short), max(scaled.height, short)), (255, 255, 255))
    left, top = (canvas.width - scaled.width) // 2, (canvas.height - scaled.height) // 2
    canvas.paste(scaled, (left, top))
    record["padding_thin"] = {"top": top, "left": left}
    return canvas


class PaddleOcr:
    """The three PP-OCR models on one device. Not thread-safe: one OCR worker thread calls it."""

    def __init__(self, options: OcrOptions, on_forward: ForwardCallback | None = None):
        import onnxruntime as ort
        from rapidocr.ch_ppocr_cls import TextClassifier
        from rapidocr.ch_ppocr_det import TextDetector
        from rapidocr.ch_ppocr_rec import TextRecognizer
        from rapidocr.utils.typings import EngineType, LangCls, LangDet, LangRec, ModelType, OCRVersion, TaskType

        logging.getLogger("RapidOCR").setLevel(logging.WARNING)
        self.files = model_files(options.model_path)
        self.device, providers = _providers(options.device)
        self.max_batch_size = options.max_batch_size or DEFAULT_BATCH[self.device]
        self.text_score = options.text_score
        self.on_forward = on_forward

        def session(path: Path, arena: bool) -> "ort.InferenceSession":
            settings = ort.SessionOptions()
            settings.log_severity_level = 3
            settings.intra_op_num_threads = options.intra_op_num_threads
            settings.inter_op_num_threads = 1
            settings.enable_cpu_mem_arena = arena
            settings.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            try:
                return ort.InferenceSession(str(path), sess_options=settings, providers=providers)
            except Exception as error:  # a corrupt or foreign .onnx file
                raise ModelLoadError(f"cannot load the PP-OCR model {str(path)!r}: {error}") from error

        # Detection inputs vary in size page to page: no arena, so a large page's buffers are freed after it.
        # Recognition and classification inputs are small and repeat: keep the arena (about 15% faster).
        det_session, rec_session, cls_session = session(self.files.det, False), session(self.files.rec, True), \
            session(self.files.cls, True)
        if "character" not in rec_session.get_modelmeta().custom_metadata_map:
            raise ModelLoadError(f"the recognition model {str(self.files.rec)!r} carries no character list in its "
                                 "metadata ('character'); use a rapidocr-converted PP-OCR rec model")
        common = {"engine_type": EngineType.ONNXRUNTIME, "engine_cfg": _Section(), "model_path": None,
                  "model_dir": None, "model_root_dir": None}
        self.detector = TextDetector(_Section(
            common, session=det_session, task_type=TaskType.DET, lang_type=LangDet.CH, model_type=ModelType.SMALL,
            ocr_version=OCRVersion.PPOCRV6, **DET,
        ))
        self.classifier = TextClassifier(_Section(
            common, session=cls_session, task_type=TaskType.CLS, lang_type=LangCls.CH, model_type=ModelType.MOBILE,
            ocr_version=OCRVersion.PPOCRV4, cls_batch_num=self.max_batch_size, cls_thresh=CLS_THRESH,
            label_list=["0", "180"],
        ))
        self.recognizer = TextRecognizer(_Section(
            common, session=rec_session, task_type=TaskType.REC, lang_type=LangRec.CH, model_type=ModelType.SMALL,
            ocr_version=OCRVersion.PPOCRV6, rec_keys_path=None, rec_img_shape=list(REC_SHAPE),
            rec_batch_num=self.max_batch_size, font_path=None,
        ))

    # --- one step: every page's detection, then all their crops together ------------------------------------
    def read(self, images: Sequence[Image.Image], params: Sequence[object] = ()) -> list[list[Segment]]:
        """The recognised segments of each image (boxes in the image's pixels), unordered. PP-OCR has no
        per-request parameters that change what it reads, so `params` is unused."""
        detected = [self.detect(image) for image in images]
        crops = [crop for boxes, page_crops in detected for crop in page_crops]
        texts = self.recognize(self.classify(crops)) if crops else []
        results, start = [], 0
        for boxes, page_crops in detected:
            segments = []
            for box, (text, score) in zip(boxes, texts[start:start + len(page_crops)]):
                if text.strip() and score >= self.text_score:
                    segments.append(Segment(text.strip(), float(score), tuple((float(x), float(y)) for x, y in box)))
            results.append(segments)
            start += len(page_crops)
        return results

    def detect(self, image: Image.Image) -> tuple[np.ndarray, list[np.ndarray]]:
        """Text boxes (in `image`'s pixels, 4 points each) and the straightened crop of each."""
        from rapidocr.utils.process_img import (
            apply_vertical_padding, get_rotate_crop_image, map_boxes_to_original, resize_image_within_bounds,
        )

        width, height = image.size
        record: dict = {}
        image = _widen_thin(image.convert("RGB"), record)
        bgr = np.ascontiguousarray(np.asarray(image)[:, :, ::-1])
        scaled, ratio_h, ratio_w = resize_image_within_bounds(bgr, MIN_SIDE, MAX_SIDE)
        record["preprocess"] = {"ratio_h": ratio_h, "ratio_w": ratio_w}
        padded, record = apply_vertical_padding(scaled, record, PAD_RATIO, PAD_MIN_HEIGHT)
        found = self.detector(padded)
        if found.boxes is None or len(found.boxes) == 0:
            return np.zeros((0, 4, 2), dtype=np.float32), []
        crops = [get_rotate_crop_image(padded, box.copy()) for box in found.boxes]
        boxes = map_boxes_to_original(np.array(found.boxes, dtype=np.float32), record, height, width)
        return boxes, crops

    def classify(self, crops: list[np.ndarray]) -> list[np.ndarray]:
        """Crops turned upright where the direction classifier is sure they are upside down."""
        return self.classifier(crops).img_list

    def recognize(self, crops: list[np.ndarray]) -> list[tuple[str, float]]:
        """(text, confidence) per crop, in forwards of up to `max_batch_size` crops of similar width."""
        _, rec_height, rec_width = REC_SHAPE
        ratios = [max(crop.shape[1] / max(crop.shape[0], 1), rec_width / rec_height) for crop in crops]
        order = sorted(range(len(crops)), key=ratios.__getitem__)
        results: list[tuple[str, float]] = [("", 0.0)] * len(crops)
        begin = 0
        while begin < len(order):
            end = begin + 1
            while (end < len(order) and end - begin < self.max_batch_size
                   and ratios[order[end]] <= ratios[order[begin]] * WIDTH_BUCKET):
                end += 1
            chunk = order[begin:end]
            widest = max(ratios[i] for i in chunk)
            batch = np.stack([self.recognizer.resize_norm_img(crops[i], widest) for i in chunk]).astype(np.float32)
            started = time.perf_counter()
            predictions = self.recognizer.session(batch)
            seconds = time.perf_counter() - started
            lines, _ = self.recognizer.postprocess_op(
                predictions, False, wh_ratio_list=[crops[i].shape[1] / max(crops[i].shape[0], 1) for i in chunk],
                max_wh_ratio=widest,
            )
            for index, (text, score) in zip(chunk, lines):
                results[index] = (text, float(score))
            if self.on_forward is not None:
                self.on_forward(len(chunk), seconds)
            begin = end
        return results
