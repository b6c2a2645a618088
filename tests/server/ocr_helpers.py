"""Text rendered with real TrueType fonts (DejaVu, from matplotlib's wheel), as PNG and PDF bytes, and the
character error rate to score OCR output against what was drawn."""

from __future__ import annotations

import io
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

WHITE, BLACK = (255, 255, 255), (0, 0, 0)


@lru_cache(maxsize=None)
def font(name: str, size: int) -> ImageFont.FreeTypeFont:
    """A DejaVu face shipped in matplotlib's wheel (DejaVuSans, DejaVuSerif, DejaVuSansMono, -Bold, ...)."""
    import matplotlib

    return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / f"{name}.ttf"), size)


@dataclass(frozen=True)
class Render:
    """Text drawn on a plain background: the image, the text, and each line's drawn box (before rotation)."""

    text: str
    image: Image.Image
    line_boxes: tuple[tuple[int, int, int, int], ...]


def render(text: str, face: str = "DejaVuSans", size: int = 32, fg=BLACK, bg=WHITE, angle: float = 0.0,
           margin: int | None = None, spacing: float = 1.6) -> Render:
    """Draw `text` (lines split on newlines) with the font; `angle` rotates the whole image (degrees, counter-
    clockwise), growing the canvas so nothing is cut."""
    typeface = font(face, size)
    margin = size if margin is None else margin
    lines = text.split("\n")
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    widths = [probe.textbbox((0, 0), line, font=typeface)[2] for line in lines]
    step = round(size * spacing)
    image = Image.new("RGB", (max(widths) + 2 * margin, step * (len(lines) - 1) + size + 2 * margin), bg)
    draw = ImageDraw.Draw(image)
    boxes = []
    for index, line in enumerate(lines):
        origin = (margin, margin + index * step)
        draw.text(origin, line, font=typeface, fill=fg)
        boxes.append(draw.textbbox(origin, line, font=typeface))
    if angle:
        image = image.rotate(angle, resample=Image.Resampling.BICUBIC, expand=True, fillcolor=bg)
    return Render(text, image, tuple(boxes))


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def pdf(pages: list[Image.Image], resolution: float = 100.0) -> bytes:
    """A PDF with one page per image, written by PIL (each page is the image at `resolution` dpi)."""
    buffer = io.BytesIO()
    pages[0].save(buffer, format="PDF", save_all=True, append_images=pages[1:], resolution=resolution)
    return buffer.getvalue()


def page(text: str, size: tuple[int, int] = (850, 1100), face: str = "DejaVuSerif", font_size: int = 28) -> Image.Image:
    """A letter page at 100 dpi (850x1100) with `text` near its top-left corner."""
    image = Image.new("RGB", size, WHITE)
    draw = ImageDraw.Draw(image)
    for index, line in enumerate(text.split("\n")):
        draw.text((80, 100 + index * round(font_size * 1.6)), line, font=font(face, font_size), fill=BLACK)
    return image


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions), case-sensitive."""
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, 1):
        current = [i]
        for j, char_b in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def cer(expected: str, got: str) -> float:
    """Character error rate: edits to turn `got` into `expected`, per expected character."""
    return edit_distance(expected, got) / max(1, len(expected))


# The clean renders the CER bound is measured on: several sizes, three faces (and bold), dark on light and light
# on dark, and rotations up to 3 degrees; the last is a multi-line paragraph.
CLEAN_RENDERS: dict[str, dict] = {
    "sans-32": dict(text="The quick brown fox jumps over the lazy dog.", face="DejaVuSans", size=32),
    "serif-24-tinted": dict(text="Invoice 2024-07: Total $1,234.56 (paid)", face="DejaVuSerif", size=24,
                            fg=(20, 20, 120), bg=(250, 245, 230)),
    "mono-20-inverse": dict(text="def ocr(image): return text.strip()", face="DejaVuSansMono", size=20,
                            fg=(235, 235, 235), bg=(30, 30, 30)),
    "sans-40-rot3": dict(text="Kiln serves images and reads text", face="DejaVuSans", size=40, angle=3.0),
    "bold-64-red-rot-2": dict(text="Hello World", face="DejaVuSans-Bold", size=64, fg=(200, 0, 0), angle=-2.0),
    "serif-18-small": dict(text="Small print: 12 apples, 7 pears and 3 figs.", face="DejaVuSerif", size=18),
    "sans-28-yellow-on-navy": dict(text="Light text on a dark background", face="DejaVuSans", size=28,
                                   fg=(255, 230, 120), bg=(10, 20, 70)),
    "paragraph-serif-26-rot1": dict(
        text="Kiln reads the text of images.\nLines are returned in reading order,\ntop to bottom and left to "
             "right,\njoined with newlines.",
        face="DejaVuSerif", size=26, angle=1.5,
    ),
}


def build_tiny_got_ocr2(directory: Path) -> Path:
    """A random-weight GOT-OCR2 checkpoint in transformers' native (-hf) layout, built in a second: a byte-level
    BPE tokenizer with GOT's special tokens, a 256-pixel image processor, and a vision tower whose 64x64 patches
    the projector folds into the 256 image tokens the processor writes into the prompt. It reads nothing useful;
    it runs the real loading, batching and generate/decode path."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GotOcr2Config, GotOcr2ForConditionalGeneration, GotOcr2Processor, PreTrainedTokenizerFast
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<imgpad>", "<box>", "</box>"]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["system You should follow the instructions carefully and explain your answers in "
                             "detail. user OCR: assistant"], vocab_size=400, special_tokens=special)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>")
    tokenizer.add_special_tokens({"additional_special_tokens": special[1:]})
    processor = GotOcr2Processor(image_processor=GotOcr2ImageProcessorPil(size={"height": 256, "width": 256}),
                                 tokenizer=tokenizer)
    config = GotOcr2Config(
        vision_config=dict(hidden_size=32, output_channels=16, num_hidden_layers=1, num_attention_heads=2,
                           image_size=256, patch_size=4, window_size=8, global_attn_indexes=[], mlp_dim=64),
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, eos_token_id=tokenizer.eos_token_id),
        image_token_index=tokenizer.convert_tokens_to_ids("<imgpad>"), image_seq_length=256,
    )
    torch.manual_seed(0)
    GotOcr2ForConditionalGeneration(config).save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory
