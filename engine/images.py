"""Images in and out of Kiln: decoding uploads safely, encoding results, and the expiring store behind `url`.

Plain PIL, no torch: the server calls these from worker threads (never on the event loop), and the engine hands
finished images over as PIL images.
"""

from __future__ import annotations

import heapq
import io
import re
import secrets
import tempfile
import threading
import time
import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError

FORMATS = ("png", "jpeg", "webp")
MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
_PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
DEFAULT_QUALITY = 90  # jpeg/webp quality when the client does not say
# Decoders tried on uploads: the common formats only, so PIL's rarer (and less audited) plugins never see them.
UPLOAD_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")


class NotAnImage(ValueError):
    """The upload is not an image PIL can read (HTTP 415)."""


class ImageTooLarge(ValueError):
    """The upload's pixel count is past the bound (HTTP 413), found from the header before decoding pixels."""


def encode(image: Image.Image, output_format: str = "png", quality: int | None = None) -> bytes:
    """Encode one image; jpeg/webp take `quality` (1-100), png is lossless."""
    if output_format not in _PIL_FORMATS:
        raise ValueError(f"output_format must be one of {', '.join(FORMATS)}")
    if output_format == "jpeg" and image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    buffer = io.BytesIO()
    options = {} if output_format == "png" else {"quality": DEFAULT_QUALITY if quality is None else quality}
    image.save(buffer, format=_PIL_FORMATS[output_format], **options)
    return buffer.getvalue()


def decode_upload(data: bytes, max_pixels: int, mode: str = "RGB") -> Image.Image:
    """Decode an uploaded image into `mode`. The size is checked from the header before any pixel is decoded,
    so a decompression bomb costs nothing. Transparent images are composited onto white, as Xinference does.
    Whatever PIL fails on, the conversion to `mode` included (a LAB TIFF has no conversion to RGB or L), is
    NotAnImage: an upload is the client's input, never a server fault."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=UPLOAD_FORMATS)
            width, height = image.size
            if width * height > max_pixels:
                raise ImageTooLarge(f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}")
            image.load()
    except ImageTooLarge:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageTooLarge(str(error)) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise NotAnImage(
            f"not a readable image ({type(error).__name__}); send PNG, JPEG, WebP, GIF, BMP or TIFF"
        ) from None
    try:
        return _convert(image, mode)
    except (OSError, ValueError):
        raise NotAnImage(f"a {image.mode} image cannot be converted to {mode}; send an RGB, RGBA, greyscale or "
                         "palette image") from None


def _convert(image: Image.Image, mode: str) -> Image.Image:
    """`image` in `mode`, transparency composited onto white for RGB."""
    if mode == "RGB" and (image.mode in ("RGBA", "LA") or "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert(mode)


class ImageStore:
    """Encoded images kept on disk under random names for `ttl` seconds, then deleted.

    Only names this store handed out can be read back (the name is looked up in memory, never joined to a
    path from the client), so nothing else on disk is reachable through it.
    """

    _NAME = re.compile(r"^[A-Za-z0-9_-]{22}\.(png|jpeg|webp)$")

    def __init__(self, directory: str | Path | None = None, ttl: float = 3600.0):
        self.directory = Path(directory) if directory is not None else Path(tempfile.mkdtemp(prefix="kiln-images-"))
        self.directory.mkdir(parents=True, exist_ok=True)
        self.ttl = ttl
        self._expiry: dict[str, float] = {}
        self._queue: list[tuple[float, str]] = []  # (expiry, name), a heap
        self._lock = threading.Lock()

    def put(self, data: bytes, output_format: str) -> str:
        """Store encoded bytes; returns the file name to put in a URL."""
        name = f"{secrets.token_urlsafe(16)}.{output_format}"
        (self.directory / name).write_bytes(data)
        expires = time.monotonic() + self.ttl
        with self._lock:
            self._expiry[name] = expires
            heapq.heappush(self._queue, (expires, name))
        self.sweep()
        return name

    def read(self, name: str) -> bytes | None:
        """The stored bytes, or None for a name that is unknown, malformed or expired."""
        if not self._NAME.match(name):
            return None
        with self._lock:
            expires = self._expiry.get(name)
        if expires is None or expires <= time.monotonic():
            self.sweep()
            return None
        try:
            return (self.directory / name).read_bytes()
        except FileNotFoundError:
            return None

    def sweep(self) -> int:
        """Delete expired files; returns how many went."""
        now, expired = time.monotonic(), []
        with self._lock:
            while self._queue and self._queue[0][0] <= now:
                _, name = heapq.heappop(self._queue)
                del self._expiry[name]
                expired.append(name)
        for name in expired:
            (self.directory / name).unlink(missing_ok=True)
        return len(expired)

    def clear(self) -> None:
        """Delete every stored file (at shutdown)."""
        with self._lock:
            names = list(self._expiry)
            self._expiry.clear()
            self._queue.clear()
        for name in names:
            (self.directory / name).unlink(missing_ok=True)

    def __len__(self) -> int:
        return len(self._expiry)


def media_type(name: str) -> str:
    """The Content-Type for a stored file name."""
    return MEDIA_TYPES[name.rsplit(".", 1)[-1]]
