"""OCR models: `/v1/images/ocr`'s engine.

    spec = OCR_CATALOGUE["PP-OCR"]                       # engine.catalogue
    runner = OcrRunner("PP-OCR", spec, parse_ocr_options(spec, {}))
    runner.load()                                        # builds the onnxruntime sessions, starts the worker
    document = open_document(upload_bytes, content_type, pages=None, dpi=None)
    handle = runner.submit(OcrRequest(document, parse_ocr_params(spec, {"detail": True})))
    body = handle.result()                               # the response body: a str, or a dict with detail

Modules: `options` (launch options), `params` (request kwargs), `document` (image or PDF pages), `layout`
(reading order, response shape), `runner` (queue and worker thread), `paddle` (PP-OCR on onnxruntime, the
default, weights in the rapidocr wheel), `got` (GOT-OCR2 through transformers).
"""

from .document import Document, DocumentLimits, is_pdf, open_document
from .layout import Line, PageText, Segment, format_result, group_lines
from .options import OcrOptions, parse_ocr_options
from .params import OcrParams, parameter_names, parse_ocr_fields, parse_ocr_params
from .runner import OcrHandle, OcrRequest, OcrRunner

__all__ = [
    "Document", "DocumentLimits", "Line", "OcrHandle", "OcrOptions", "OcrParams",
    "OcrRequest", "OcrRunner", "PageText", "Segment", "format_result", "group_lines", "is_pdf",
    "open_document", "parameter_names", "parse_ocr_fields", "parse_ocr_options", "parse_ocr_params",
]
