"""GOT-OCR 2.0 (StepFun) through transformers, from a local checkpoint or the Hugging Face cache.

Two checkpoint layouts exist and both load:
- `stepfun-ai/GOT-OCR-2.0-hf` (config `model_type: got_ocr2`): transformers' own GotOcr2ForConditionalGeneration
  with AutoProcessor. Runs on CPU or CUDA; the pages of a step that ask the same thing go through one batched
  `generate`.
- `stepfun-ai/GOT-OCR2_0` (the original, remote code): AutoModel/AutoTokenizer with trust_remote_code and the
  checkpoint's own `chat()`, as Xinference runs it, one page at a time. Its code calls `.cuda()` itself, so it
  needs CUDA, and it was written for transformers 4.47 (Xinference pins that): under transformers 5 it may not
  load, which is reported as a load error naming the -hf checkpoint.

Weights are never downloaded here (1.4 GB): put them in the cache (`hf download stepfun-ai/GOT-OCR-2.0-hf`) or
pass model_path. Kiln's tests run the -hf path on a tiny random-weight checkpoint (loading, per-request options,
batched generate and decode) and the refusals when weights are absent; the real weights (no download offline) and
the remote-code checkpoint (CUDA only) are not exercised.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

from PIL import Image

from kiln.engine.catalogue import OcrSpec

from ..errors import ModelLoadError
from .options import OcrOptions
from .params import OcrParams

log = logging.getLogger("kiln.engine.ocr")

DEFAULT_BATCH = {"cpu": 1, "cuda": 4}  # pages per generate
STOP = "<|im_end|>"


def resolve_checkpoint(spec: OcrSpec, options: OcrOptions) -> Path:
    """The checkpoint directory: model_path, else the first of the spec's hub ids found in the HF cache."""
    if options.model_path:
        path = Path(options.model_path).expanduser()
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"model_path {str(path)!r} is not a GOT-OCR2 checkpoint: it has no config.json")
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    from kiln.engine.loading import hub_cache_dir

    cache = hub_cache_dir()
    for repo in spec.hub_ids:
        try:
            path = Path(snapshot_download(repo, cache_dir=cache, local_files_only=True))
        except (LocalEntryNotFoundError, OSError, ValueError):
            continue
        if (path / "config.json").is_file():
            return path
    raise ModelLoadError(
        f"the weights of {spec.name} are not in the Hugging Face cache (looked for {', '.join(spec.hub_ids)} in "
        f"{cache}, set by HF_HUB_CACHE or HF_HOME), and Kiln does not download them. Download them first "
        f"(`hf download {spec.hub_ids[0]}`) or pass model_path=<a local checkpoint directory>. PP-OCR needs no "
        "download."
    )


class GotOcr:
    """GOT-OCR2 on one device. Not thread-safe: one OCR worker thread calls it."""

    def __init__(self, spec: OcrSpec, options: OcrOptions, on_forward=None):
        import torch

        path = resolve_checkpoint(spec, options)
        config = json.loads((path / "config.json").read_text())
        self.native = config.get("model_type") == "got_ocr2"
        if options.device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        else:
            device = options.device
            if device.startswith("cuda") and not torch.cuda.is_available():
                raise ModelLoadError(f"device={device!r}, but torch sees no CUDA device here; use 'cpu' or 'auto'")
        self.device = torch.device(device)
        if not self.native and self.device.type != "cuda":
            raise ModelLoadError(
                f"{str(path)!r} is the original GOT-OCR2_0 checkpoint, whose remote code runs on CUDA only; use "
                "a CUDA device, or the transformers-native checkpoint stepfun-ai/GOT-OCR-2.0-hf, which runs on CPU"
            )
        dtype_name = options.torch_dtype or ("bfloat16" if self.device.type == "cuda" else "float32")
        self.dtype = getattr(torch, dtype_name)
        self.max_new_tokens = options.max_new_tokens
        kind = "cuda" if self.device.type == "cuda" else "cpu"
        self.max_batch_size = options.max_batch_size or DEFAULT_BATCH[kind]
        self.on_forward = on_forward
        try:
            if self.native:
                from transformers import AutoProcessor, GotOcr2ForConditionalGeneration

                self.processor = AutoProcessor.from_pretrained(path)
                self.model = GotOcr2ForConditionalGeneration.from_pretrained(path, dtype=self.dtype)
            else:
                from transformers import AutoModel, AutoTokenizer

                self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
                self.model = AutoModel.from_pretrained(
                    path, trust_remote_code=True, low_cpu_mem_usage=True, use_safetensors=True,
                    pad_token_id=self.tokenizer.eos_token_id, dtype=self.dtype,
                )
            self.model = self.model.eval().to(self.device)
        except ModelLoadError:
            raise
        except Exception as error:  # noqa: BLE001 - every loader fault is reported with what to try
            hint = "" if self.native else (" (the original checkpoint's remote code targets transformers 4.47; "
                                           "the -hf checkpoint stepfun-ai/GOT-OCR-2.0-hf loads natively)")
            raise ModelLoadError(f"cannot load GOT-OCR2 from {str(path)!r}: {type(error).__name__}: {error}{hint}") \
                from error

    def read(self, images: Sequence[Image.Image], params: Sequence[OcrParams]) -> list[str]:
        """The text of each page; pages that ask the same (type, box, colour) share one generate."""
        import torch

        results: list[str] = [""] * len(images)
        groups: dict[tuple, list[int]] = {}
        for index, param in enumerate(params):
            groups.setdefault((param.ocr_type, param.ocr_box, param.ocr_color), []).append(index)
        with torch.inference_mode():
            for (ocr_type, box, color), indices in groups.items():
                for start in range(0, len(indices), self.max_batch_size):
                    chunk = indices[start:start + self.max_batch_size]
                    pages = [images[i].convert("RGB") for i in chunk]
                    texts = (self._generate(pages, ocr_type, box, color) if self.native
                             else [self._chat(page, ocr_type, box, color) for page in pages])
                    for index, text in zip(chunk, texts):
                        results[index] = text.strip()
        return results

    def _generate(self, pages: list[Image.Image], ocr_type: str, box, color) -> list[str]:
        import time

        extra = {}
        if box is not None:
            extra["box"] = [list(box) for _ in pages]
        if color is not None:
            extra["color"] = color
        inputs = self.processor(pages, return_tensors="pt", format=ocr_type == "format", **extra)
        inputs = {key: value.to(self.device) for key, value in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        started = time.perf_counter()
        generated = self.model.generate(**inputs, do_sample=False, tokenizer=self.processor.tokenizer,
                                        stop_strings=STOP, max_new_tokens=self.max_new_tokens)
        if self.on_forward is not None:
            self.on_forward(len(pages), time.perf_counter() - started)
        new_tokens = generated[:, inputs["input_ids"].shape[1]:]
        return self.processor.batch_decode(new_tokens, skip_special_tokens=True)

    def _chat(self, page: Image.Image, ocr_type: str, box, color) -> str:
        import time

        started = time.perf_counter()
        box_text = f"[{','.join(str(round(v)) for v in box)}]" if box is not None else ""
        text = self.model.chat(self.tokenizer, page, ocr_type=ocr_type, ocr_box=box_text, ocr_color=color or "",
                               gradio_input=True)
        if self.on_forward is not None:
            self.on_forward(1, time.perf_counter() - started)
        return text or ""
