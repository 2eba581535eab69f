"""``shape_match``: a verifiable reward for the tiny image world, read from pixels.

The tiny world's captions name one object by three attributes: ``"a red circle on the left"`` is
colour *red*, shape *circle*, position *left* (5 colours x 4 shapes x 5 positions, see
``scripts/make_tiny_world.py``). This reward is the world's counterpart of GenEval's object
checks: a programmatic detector, no learned model, finds the drawn object in each image and
returns the fraction of the caption's attributes that hold (0, 1/3, 2/3 or 1).

The detector, on an image ``[3, H, W]`` in ``[0, 1]``:

1. **Foreground**: pixels whose colour differs from the median colour of the 2-pixel border by
   more than ``threshold`` (0.25) in some channel; **the object** is its largest 8-connected
   component (stray specks, which a sampler's leftover noise can leave, are not objects, as an
   object detector would not report them). Fewer than ``min_pixels`` pixels in it: nothing was
   drawn, no attribute holds.
2. **Colour**: the object's mean colour's nearest palette colour (Euclidean, RGB).
3. **Position**: the object's centroid's nearest of the five anchor points (left, right, top,
   bottom, center; scaled to the image size).
4. **Shape**, from two scale-free measures of the object's mask (taken as the union of its
   pixel squares): *solidity* = area / convex-hull area, and *roundness* = area / (π r²) with
   ``r`` the largest distance from the centroid to a foreground pixel corner. A five-pointed star
   is the only concave shape (solidity ≈ 0.62 against ≥ 0.9 for the others); among the convex
   ones roundness separates circle (≈ 0.9), square (≈ 0.6) and triangle (≈ 0.4).

Ideal values: solidity of the star 1.469 R² / 2.378 R²; roundness of the square 2/π, of the
equilateral triangle 3√3/(4π). Pixelisation pulls both towards the middle, hence the thresholds
(``star_solidity`` 0.8, ``circle_roundness`` 0.75, ``triangle_roundness`` 0.53).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import torch

from polyrl.types import ConfigError, Reward, Rollout

__all__ = ["COLOURS", "POSITIONS", "SHAPES", "ShapeMatch", "ShapeMatchConfig", "detect", "parse_caption"]

#: The tiny world's palette (RGB 0-255), shapes, and position anchors (x, y on a 64-pixel image).
COLOURS = {"red": (215, 40, 40), "green": (40, 160, 60), "blue": (45, 85, 220), "yellow": (235, 195, 30),
           "purple": (135, 55, 185)}
SHAPES = ("circle", "square", "triangle", "star")
POSITIONS = {"left": (17, 32), "right": (47, 32), "top": (32, 17), "bottom": (32, 47), "center": (32, 32)}
PHRASES = {"on the left": "left", "on the right": "right", "at the top": "top", "at the bottom": "bottom",
           "in the center": "center"}
WORLD_SIZE = 64

_CAPTION = re.compile(
    r"^\s*an?\s+(?P<colour>" + "|".join(COLOURS) + r")\s+(?P<shape>" + "|".join(SHAPES) + r")\s+(?P<position>"
    + "|".join(PHRASES) + r")\s*\.?\s*$",
    re.IGNORECASE,
)


def parse_caption(caption: str) -> tuple[str, str, str]:
    """``(colour, shape, position)`` of a tiny-world caption such as ``"a red circle on the left"``."""
    m = _CAPTION.match(caption)
    if m is None:
        raise ValueError(
            f"shape_match: cannot read the caption {caption!r}; accepted: 'a <colour> <shape> <position>' with colour in "
            f"{list(COLOURS)}, shape in {list(SHAPES)}, position in {list(PHRASES)}"
        )
    return m["colour"].lower(), m["shape"].lower(), PHRASES[m["position"].lower()]


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected component of a boolean ``[H, W]`` mask (all False when empty)."""
    h, w = mask.shape
    label = np.zeros((h, w), dtype=np.int32)
    best, best_size, current = 0, 0, 0
    for y0, x0 in zip(*np.nonzero(mask)):
        if label[y0, x0]:
            continue
        current += 1
        label[y0, x0] = current
        stack, size = [(y0, x0)], 0
        while stack:
            y, x = stack.pop()
            size += 1
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    ny, nx = y + dy, x + dx
                    if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not label[ny, nx]:
                        label[ny, nx] = current
                        stack.append((ny, nx))
        if size > best_size:
            best, best_size = current, size
    return label == best if best else np.zeros_like(mask)


def _turn(o: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """The z component of ``(a - o) x (b - o)``: > 0 for a left turn."""
    return float((a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0]))


def _hull_area(points: np.ndarray) -> float:
    """Area of the convex hull of ``points [N, 2]`` (Andrew's monotone chain, shoelace formula)."""
    pts = np.unique(points, axis=0)
    if len(pts) < 3:
        return 0.0
    pts = pts[np.lexsort((pts[:, 1], pts[:, 0]))]

    def half(seq):
        out: list[np.ndarray] = []
        for p in seq:
            while len(out) >= 2 and _turn(out[-2], out[-1], p) <= 0:
                out.pop()
            out.append(p)
        return out

    lower, upper = half(pts), half(pts[::-1])
    hull = np.array(lower[:-1] + upper[:-1], dtype=np.float64)
    x, y = hull[:, 0], hull[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


@dataclass
class ShapeMatchConfig:
    """Settings of the ``shape_match`` detector (defaults fit the tiny world's renders)."""

    threshold: float = 0.25
    """A pixel is foreground when some channel differs from the border's median colour by more than
    this (images in [0, 1])."""
    min_pixels: int = 8
    """Fewer foreground pixels than this (at the world's 64-pixel scale) count as no object."""
    star_solidity: float = 0.8
    """Below this solidity (area / convex-hull area) the object is a star."""
    circle_roundness: float = 0.75
    """Convex objects with roundness (area / (pi r_max^2)) above this are circles."""
    triangle_roundness: float = 0.53
    """Convex objects with roundness below this are triangles (between the two: squares)."""
    attributes: list[str] | None = None
    """Which attributes count (any of colour, shape, position); null: all three."""

    def check(self) -> None:
        """Reject impossible settings before any model loads."""
        if not 0 < self.threshold < 1:
            raise ConfigError(f"rewards.shape_match.threshold must be in (0, 1), got {self.threshold}")
        if self.min_pixels < 1:
            raise ConfigError(f"rewards.shape_match.min_pixels must be >= 1, got {self.min_pixels}")
        if not 0 < self.triangle_roundness < self.circle_roundness < 1:
            raise ConfigError(
                "rewards.shape_match: need 0 < triangle_roundness < circle_roundness < 1, got "
                f"{self.triangle_roundness} and {self.circle_roundness}"
            )
        if not 0 < self.star_solidity < 1:
            raise ConfigError(f"rewards.shape_match.star_solidity must be in (0, 1), got {self.star_solidity}")
        if self.attributes is not None:
            bad = [a for a in self.attributes if a not in ("colour", "shape", "position")]
            if bad or not self.attributes:
                raise ConfigError(
                    f"rewards.shape_match.attributes: {self.attributes!r}; accepted: a non-empty list of "
                    "'colour', 'shape', 'position' (or null for all three)"
                )


def detect(image: torch.Tensor, config: ShapeMatchConfig | None = None) -> dict[str, str | None]:
    """The object in one image ``[3, H, W]`` in ``[0, 1]``: ``{"colour", "shape", "position"}``,
    each ``None`` when no object is found. Also ``solidity`` and ``roundness`` (floats) for
    inspection."""
    cfg = config or ShapeMatchConfig()
    img = image.detach().float().clamp(0, 1).cpu()
    if img.dim() != 3 or img.shape[0] != 3:
        raise ValueError(f"shape_match: expected an image [3, H, W], got {tuple(img.shape)}")
    _, h, w = img.shape
    border = torch.cat([img[:, :2].flatten(1), img[:, -2:].flatten(1), img[:, :, :2].flatten(1),
                        img[:, :, -2:].flatten(1)], 1)
    bg = border.median(dim=1).values.view(3, 1, 1)
    fg = largest_component(((img - bg).abs().amax(0) > cfg.threshold).numpy())
    scale = w / WORLD_SIZE
    none = {"colour": None, "shape": None, "position": None, "solidity": float("nan"), "roundness": float("nan")}
    if fg.sum() < cfg.min_pixels * scale * scale:
        return none
    ys, xs = np.nonzero(fg)
    mean = img[:, torch.from_numpy(fg)].mean(1)
    palette = torch.tensor(list(COLOURS.values()), dtype=torch.float32) / 255
    colour = list(COLOURS)[int((palette - mean).norm(dim=1).argmin())]
    cx, cy = xs.mean() + 0.5, ys.mean() + 0.5  # pixel centres
    anchors = np.array(list(POSITIONS.values()), dtype=np.float64) * np.array([w, h]) / WORLD_SIZE
    position = list(POSITIONS)[int(np.argmin(((anchors - [cx, cy]) ** 2).sum(1)))]
    corners = np.concatenate([np.stack([xs + dx, ys + dy], 1) for dx in (0, 1) for dy in (0, 1)])
    area = float(fg.sum())
    solidity = area / max(_hull_area(corners), 1e-9)
    r_max = math.sqrt(float(((corners - [cx, cy]) ** 2).sum(1).max()))
    roundness = area / (math.pi * r_max * r_max)
    if solidity < cfg.star_solidity:
        shape = "star"
    elif roundness > cfg.circle_roundness:
        shape = "circle"
    elif roundness < cfg.triangle_roundness:
        shape = "triangle"
    else:
        shape = "square"
    return {"colour": colour, "shape": shape, "position": position, "solidity": solidity, "roundness": roundness}


def shape_match_scores(images: torch.Tensor, captions: list[str], config: ShapeMatchConfig | None = None) -> torch.Tensor:
    """``[B]`` fraction of each caption's attributes that the detector finds in its image."""
    cfg = config or ShapeMatchConfig()
    if images.dim() != 4 or images.shape[0] != len(captions):
        raise ValueError(f"shape_match: expected images [B={len(captions)}, 3, H, W], got {tuple(images.shape)}")
    attrs = cfg.attributes or ["colour", "shape", "position"]
    out = []
    for image, text in zip(images, captions):
        colour, shape, position = parse_caption(text)
        want = {"colour": colour, "shape": shape, "position": position}
        got = detect(image, cfg)
        out.append(sum(got[a] == want[a] for a in attrs) / len(attrs))
    return torch.tensor(out, dtype=torch.float32)


class ShapeMatch(Reward):
    """The fraction of the caption's attributes (colour, shape, position) that hold in the image."""

    reads = "images"

    def __init__(self, cfg: ShapeMatchConfig | None = None) -> None:
        self.cfg = cfg or ShapeMatchConfig()
        self.cfg.check()

    def __call__(self, rollout: Rollout) -> torch.Tensor:
        return shape_match_scores(rollout.outputs["images"], rollout.prompts, self.cfg)
