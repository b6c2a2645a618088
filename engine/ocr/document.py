"""What an OCR request reads: one uploaded image, or chosen pages of a PDF rasterised with pdfium.

Everything a client can get wrong is found when the document is opened (on a server worker thread, before the
request is queued): not an image, a corrupt or encrypted PDF, page numbers out of range, too many pages, a dpi
out of bounds, a page that would rasterise past the pixel bound. PDF pages are rendered later, one at a time on
the OCR worker thread, so a 200-page request never holds 200 bitmaps.

PDFium is not thread-safe: every call into it, from any document, holds `_PDFIUM_LOCK`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Sequence

from PIL import Image

from kiln.engine.images import decode_upload

from ..errors import InvalidRequest

PDF_MAGIC = b"%PDF-"
PDF_MEDIA_TYPES = frozenset({"application/pdf", "application/x-pdf"})
_PDFIUM_LOCK = threading.Lock()


@dataclass(frozen=True)
class DocumentLimits:
    """Bounds on one OCR request's input (Xinference's PDF bounds)."""

    max_pages: int = 200  # pages OCR'd per request
    max_page_pixels: int = 80_000_000  # one rasterised PDF page
    default_dpi: int = 200
    min_dpi: int = 50  # below this, body text is a few pixels high: nothing legible to read
    max_dpi: int = 600
    max_image_pixels: int = 4096 * 4096  # one uploaded image (the server passes its own bound)


class UnreadablePdf(InvalidRequest):
    """The upload claims to be a PDF (magic bytes or content type) but pdfium cannot open it."""


# Leading bytes of the image formats uploads may be in: such bytes are an image whatever the content type says.
_IMAGE_SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")


def is_pdf(data: bytes, content_type: str | None = None) -> bool:
    """A PDF by its magic bytes (within the first 1 KiB, as readers allow) or by its declared content type,
    unless the bytes begin as an image does."""
    if data.startswith(_IMAGE_SIGNATURES) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP"):
        return False
    media_type = (content_type or "").split(";")[0].strip().lower()
    return PDF_MAGIC in data[:1024] or media_type in PDF_MEDIA_TYPES


class Document:
    """The pages one request reads. `page_numbers` are 1-based (an image is page 1)."""

    is_pdf = False
    page_numbers: list[int]

    def render(self, index: int) -> Image.Image:
        """The RGB image of the `index`-th chosen page."""
        raise NotImplementedError

    def pixels(self, index: int) -> int:
        """The pixel count of the `index`-th chosen page once rendered (known without rendering it)."""
        raise NotImplementedError

    def close(self) -> None:
        """Free what the document holds (safe to call twice)."""

    def __len__(self) -> int:
        return len(self.page_numbers)


class ImageDocument(Document):
    def __init__(self, image: Image.Image):
        self.image = image
        self.page_numbers = [1]

    def render(self, index: int) -> Image.Image:
        return self.image

    def pixels(self, index: int) -> int:
        return self.image.width * self.image.height


class PdfDocument(Document):
    """Chosen pages of a PDF, rasterised at `dpi` on demand."""

    is_pdf = True

    def __init__(self, pdf: object, page_numbers: list[int], dpi: int, page_pixels: list[int]):
        self._pdf = pdf
        self.page_numbers = page_numbers
        self.dpi = dpi
        self._pixels = page_pixels

    def pixels(self, index: int) -> int:
        return self._pixels[index]

    def render(self, index: int) -> Image.Image:
        with _PDFIUM_LOCK:
            if self._pdf is None:
                raise RuntimeError("the PDF was closed")
            page = self._pdf[self.page_numbers[index] - 1]
            try:
                bitmap = page.render(scale=self.dpi / 72)
                try:
                    return bitmap.to_pil().convert("RGB")
                finally:
                    bitmap.close()
            finally:
                page.close()

    def close(self) -> None:
        with _PDFIUM_LOCK:
            if self._pdf is not None:
                self._pdf.close()
                self._pdf = None


def open_document(
    data: bytes,
    content_type: str | None = None,
    *,
    pages: Sequence[int] | None = None,
    dpi: int | None = None,
    limits: DocumentLimits = DocumentLimits(),
    field: str = "image",
) -> Document:
    """Open an upload for OCR. Raises `InvalidRequest` (400: empty upload, bad pages/dpi, corrupt PDF, too many
    pages, page too large), `engine.images.NotAnImage` (415) or `ImageTooLarge` (413)."""
    if not data:
        raise InvalidRequest(f"{field} is empty (0 bytes); send an image or a PDF", field)
    if not is_pdf(data, content_type):
        if pages is not None or dpi is not None:
            named = "pages" if pages is not None else "dpi"
            raise InvalidRequest(f"{named} applies to PDF uploads only; {field} is not a PDF", named)
        return ImageDocument(decode_upload(data, limits.max_image_pixels))
    dpi = limits.default_dpi if dpi is None else dpi
    if not limits.min_dpi <= dpi <= limits.max_dpi:
        raise InvalidRequest(f"dpi must be between {limits.min_dpi} and {limits.max_dpi}, got {dpi}", "dpi")
    import pypdfium2 as pdfium

    with _PDFIUM_LOCK:
        try:
            pdf = pdfium.PdfDocument(data)
        except pdfium.PdfiumError as error:
            raise UnreadablePdf(f"{field} is not a readable PDF ({error}); send an unencrypted, complete PDF",
                                field) from None
        try:
            count = len(pdf)
            chosen = _choose_pages(pages, count, limits.max_pages)
            scale = dpi / 72
            page_pixels = []
            for number in chosen:
                width, height = pdf.get_page_size(number - 1)
                pixels = round(width * scale) * round(height * scale)
                if pixels > limits.max_page_pixels:
                    raise InvalidRequest(
                        f"page {number} at {dpi} dpi would be {round(width * scale)}x{round(height * scale)} = "
                        f"{pixels} pixels; the limit is {limits.max_page_pixels} per page: lower dpi", "dpi",
                    )
                if pixels == 0:
                    raise InvalidRequest(f"page {number} has no area ({width}x{height} points)", "pages")
                page_pixels.append(pixels)
        except BaseException:
            pdf.close()
            raise
    return PdfDocument(pdf, chosen, dpi, page_pixels)


def _choose_pages(pages: Sequence[int] | None, count: int, max_pages: int) -> list[int]:
    if count == 0:
        raise InvalidRequest("the PDF has no pages", "image")
    if pages is None:
        if count > max_pages:
            raise InvalidRequest(
                f"the PDF has {count} pages; at most {max_pages} are read per request: choose them with the "
                f"`pages` kwarg (1-based page numbers)", "pages",
            )
        return list(range(1, count + 1))
    if len(pages) > max_pages:
        raise InvalidRequest(f"{len(pages)} pages asked for; at most {max_pages} are read per request", "pages")
    outside = [number for number in pages if not 1 <= number <= count]
    if outside:
        raise InvalidRequest(f"pages {outside} are not in the PDF; it has pages 1 to {count}", "pages")
    return list(pages)
