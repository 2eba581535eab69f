"""Drawing worlds as lilGym does, with PIL, and describing them in words.

The image is 380x100 pixels: three light-grey 100x100 boxes separated by two 40-pixel dark-grey
separators. Items are drawn inside their box at ``(x_loc, y_loc)`` (top-left of the item's
``size``-pixel bounding square): circles as ellipses, squares as rectangles, triangles pointing
up; colours yellow (250, 255, 0), black (0, 0, 0) and blue (15, 131, 255). The agent observes the
image pooled 2x2 (mean, truncated to uint8): 50x190x3.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw

from .world import BOX_SIZE, Color, Shape

__all__ = [
    "IMAGE_WIDTH",
    "IMAGE_HEIGHT",
    "SEPARATOR_WIDTH",
    "OBS_HEIGHT",
    "OBS_WIDTH",
    "draw_world",
    "pool2x2",
    "observe",
    "describe_world",
]

NUM_BOXES = 3
SEPARATOR_WIDTH = 40
IMAGE_WIDTH = NUM_BOXES * BOX_SIZE + (NUM_BOXES - 1) * SEPARATOR_WIDTH  # 380
IMAGE_HEIGHT = BOX_SIZE  # 100
OBS_HEIGHT, OBS_WIDTH = IMAGE_HEIGHT // 2, IMAGE_WIDTH // 2  # 50, 190

BOX_FILL = (211, 211, 211)
SEPARATOR_FILL = (128, 128, 128)
RGB = {
    Color.YELLOW.value: (250, 255, 0),
    Color.BLACK.value: (0, 0, 0),
    Color.BLUE.value: (15, 131, 255),
    Color.GRAY.value: (211, 211, 211),
}


def box_offset(box: int) -> int:
    """x of a box's left edge in the image."""
    return box * (BOX_SIZE + SEPARATOR_WIDTH)


def _base() -> Image.Image:
    img = Image.new("RGB", (IMAGE_WIDTH, IMAGE_HEIGHT))
    draw = ImageDraw.Draw(img)
    for i in range(NUM_BOXES):
        x0 = box_offset(i)
        draw.rectangle([x0, 0, x0 + BOX_SIZE, BOX_SIZE], fill=BOX_FILL)
    for i in range(NUM_BOXES - 1):
        x0 = box_offset(i) + BOX_SIZE
        draw.rectangle([x0, 0, x0 + SEPARATOR_WIDTH - 1, BOX_SIZE], fill=SEPARATOR_FILL)
    return img


_BASE = _base()


def draw_world(rep: Sequence[Sequence[dict[str, Any]]]) -> Image.Image:
    """The full 380x100 RGB image of a structured representation."""
    img = _BASE.copy()
    draw = ImageDraw.Draw(img)
    for i, box in enumerate(rep):
        off = box_offset(i)
        for obj in box:
            x0, y0 = off + obj["x_loc"], obj["y_loc"]
            # PIL includes the second corner, hence the -1 (as in lilGym)
            x1 = int(x0 + obj["size"]) - 1
            y1 = int(y0 + obj["size"]) - 1
            fill = RGB[obj["color"]]
            kind = obj["type"]
            if kind == Shape.CIRCLE.value:
                draw.ellipse([x0, y0, x1, y1], fill=fill)
            elif kind == Shape.SQUARE.value:
                draw.rectangle([x0, y0, x1, y1], fill=fill)
            elif kind == Shape.TRIANGLE.value:
                apex = (x1 - int((x1 - x0) / 2), y0)
                draw.polygon([(x0, y1), (x1, y1), apex], fill=fill)
            else:  # validated on load; kept as a guard for hand-made worlds
                raise ValueError(f"unknown item type {kind!r}; accepted: circle, square, triangle")
    return img


def pool2x2(image: np.ndarray) -> np.ndarray:
    """Mean over 2x2 blocks, truncated to uint8: ``[H, W, 3] -> [H/2, W/2, 3]``."""
    h, w, c = image.shape
    rows = image.reshape(h // 2, 2, w * c).astype(np.uint16)
    pairs = (rows[:, 0] + rows[:, 1]).reshape(h // 2, w // 2, 2, c)
    return ((pairs[:, :, 0] + pairs[:, :, 1]) >> 2).astype(np.uint8)  # the floor of the mean


def observe(rep: Sequence[Sequence[dict[str, Any]]]) -> tuple[np.ndarray, np.ndarray]:
    """``(full image [100, 380, 3], pooled observation [50, 190, 3])``, both uint8 and read-only
    (worlds recur, so they are cached)."""
    key = tuple(tuple((o["x_loc"], o["y_loc"], o["type"], o["color"], o["size"]) for o in box) for box in rep)
    return _observe(key)


@lru_cache(maxsize=4096)
def _observe(key: tuple) -> tuple[np.ndarray, np.ndarray]:
    rep = [[{"x_loc": x, "y_loc": y, "type": t, "color": c, "size": s} for x, y, t, c, s in box] for box in key]
    full = np.asarray(draw_world(rep), dtype=np.uint8)
    pooled = pool2x2(full)
    full.flags.writeable = False
    pooled.flags.writeable = False
    return full, pooled


_BOX_NAMES = ("left", "middle", "right")
_COLOR_NAMES = {Color.YELLOW.value: "yellow", Color.BLACK.value: "black", Color.BLUE.value: "blue"}
_SIZE_NAMES = {10: "small", 20: "medium", 30: "large"}


def describe_world(rep: Sequence[Sequence[dict[str, Any]]], tower: bool) -> str:
    """The world in words, one line per box: towers bottom to top; scatter items with their grid
    cell (column 0-18 over the whole image, row 0-4), as the actions address them."""
    lines = []
    for i, box in enumerate(rep):
        if tower:
            blocks = [_COLOR_NAMES.get(o["color"], o["color"]) for o in sorted(box, key=lambda o: -o["y_loc"])]
            lines.append(f"{_BOX_NAMES[i]} box: " + (", ".join(blocks) if blocks else "empty"))
        else:
            parts = []
            for o in box:
                col = int((box_offset(i) + o["x_loc"]) // 20)
                row = int(o["y_loc"] // 20)
                parts.append(f"{_SIZE_NAMES[o['size']]} {_COLOR_NAMES.get(o['color'], o['color'])} {o['type']} at ({col},{row})")
            lines.append(f"{_BOX_NAMES[i]} box: " + ("; ".join(parts) if parts else "empty"))
    return "\n".join(lines)
