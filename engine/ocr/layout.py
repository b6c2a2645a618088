"""From recognised text segments to lines in reading order, and from pages to the response body.

A detector finds text *segments*: a quadrilateral each, usually one per visual line, sometimes several per line
when words are far apart. Reading order is top to bottom, then left to right: segments whose vertical extents
overlap (measured along the text's own slope, so that a page rotated a few degrees does not merge neighbouring
lines) form one line, joined with spaces; lines are joined with newlines; PDF pages with blank lines.

Pure Python: unit-testable without a model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

Point = tuple[float, float]
SAME_LINE_OVERLAP = 0.5  # segments are one line when their centres are within this many text heights


@dataclass(frozen=True)
class Segment:
    """One recognised text region: its text, confidence and box (top-left, top-right, bottom-right,
    bottom-left, in pixels of the page image)."""

    text: str
    score: float
    box: tuple[Point, Point, Point, Point]

    @property
    def center(self) -> Point:
        return (sum(p[0] for p in self.box) / 4, sum(p[1] for p in self.box) / 4)

    @property
    def height(self) -> float:
        (x0, y0), (x1, y1), (x2, y2), (x3, y3) = self.box
        return max(1.0, (((x3 - x0) ** 2 + (y3 - y0) ** 2) ** 0.5 + ((x2 - x1) ** 2 + (y2 - y1) ** 2) ** 0.5) / 2)

    @property
    def slope(self) -> float:
        """dy/dx of the text's baseline direction (the mean of the top and bottom edges)."""
        (x0, y0), (x1, y1), (x2, y2), (x3, y3) = self.box
        dx, dy = (x1 - x0) + (x2 - x3), (y1 - y0) + (y2 - y3)
        return dy / dx if dx > 0 else 0.0

    @property
    def left(self) -> float:
        return min(p[0] for p in self.box)

    def y_at(self, x: float) -> float:
        """The height of this segment's centre line at `x`."""
        cx, cy = self.center
        return cy + self.slope * (x - cx)


@dataclass(frozen=True)
class Line:
    """One line of text in reading order: its segments' texts joined, their combined box and mean score."""

    text: str
    score: float
    box: tuple[Point, Point, Point, Point]

    def to_json(self) -> dict[str, Any]:
        return {"text": self.text, "box": [[round(x), round(y)] for x, y in self.box], "score": round(self.score, 4)}


@dataclass(frozen=True)
class PageText:
    """What one page (or image) read as: the text, and its lines when the model gives boxes."""

    page: int
    width: int
    height: int
    text: str
    lines: tuple[Line, ...] | None = None

    @classmethod
    def from_segments(cls, page: int, width: int, height: int, segments: Sequence[Segment]) -> PageText:
        lines = tuple(_join(group) for group in group_lines(segments))
        return cls(page, width, height, "\n".join(line.text for line in lines), lines)

    def to_json(self) -> dict[str, Any]:
        return {"page": self.page, "width": self.width, "height": self.height, "text": self.text,
                "lines": [line.to_json() for line in self.lines or ()]}


def group_lines(segments: Sequence[Segment]) -> list[list[Segment]]:
    """Segments grouped into lines, lines top to bottom, segments in a line left to right."""
    lines: list[list[Segment]] = []
    anchors: list[Segment] = []  # each line's longest segment: its slope and height stand for the line
    for segment in sorted(segments, key=lambda s: s.center[1]):
        cx, cy = segment.center
        best, best_distance = None, None
        for index, anchor in enumerate(anchors):
            distance = abs(cy - anchor.y_at(cx))
            if distance < SAME_LINE_OVERLAP * min(anchor.height, segment.height) and (
                best_distance is None or distance < best_distance
            ):
                best, best_distance = index, distance
        if best is None:
            lines.append([segment])
            anchors.append(segment)
        else:
            lines[best].append(segment)
            if _width(segment) > _width(anchors[best]):
                anchors[best] = segment
    if not lines:
        return []
    x_ref = sum(s.center[0] for s in segments) / len(segments)  # compare lines at one x, along their slopes
    order = sorted(range(len(lines)), key=lambda i: anchors[i].y_at(x_ref))
    return [sorted(lines[i], key=lambda s: s.left) for i in order]


def _width(segment: Segment) -> float:
    (x0, y0), (x1, y1) = segment.box[0], segment.box[1]
    return ((x1 - x0) ** 2 + (y1 - y0) ** 2) ** 0.5


def _join(segments: list[Segment]) -> Line:
    first, last = segments[0], segments[-1]
    box = (first.box[0], last.box[1], last.box[2], first.box[3])
    chars = sum(max(1, len(s.text)) for s in segments)
    score = sum(s.score * max(1, len(s.text)) for s in segments) / chars
    return Line(" ".join(s.text for s in segments), score, box)


def format_result(pages: Sequence[PageText], *, detail: bool, document: bool) -> Any:
    """The response body: the text as a JSON string (PDF pages joined by a blank line), or with `detail`
    `{"text", "lines"}` for an image and `{"text", "pages": [{"page", "width", "height", "text", "lines"}]}`
    for a PDF."""
    text = "\n\n".join(page.text for page in pages)
    if not detail:
        return text
    if not document:
        (page,) = pages
        return {"text": page.text, "lines": [line.to_json() for line in page.lines or ()]}
    return {"text": text, "pages": [page.to_json() for page in pages]}
