"""lilGym's action sets, their validity rules and their effect on a world.

**Tower** (13 actions): ``0`` STOP; ``1 + 3*box + colour`` ADD a block on top of box ``box``
(left, middle, right) in colour ``colour`` (yellow, black, blue); ``10 + box`` REMOVE the top
block of ``box``. A block is a 20-pixel square at ``x_loc = 40``, stacked at ``y_loc`` 80, 59,
38, 17 (at most four per box). ADD on a full box and REMOVE on an empty one are invalid.

**Scatter** (2661 actions) on a 19x5 grid of 20-pixel cells over the 380x100 image: ``0`` STOP;
``1 + (((x*5 + y)*3 + shape)*3 + colour)*3 + size`` ADD an item (shape circle/square/triangle,
colour yellow/black/blue, size 10/20/30 pixels) with its top-left corner at cell ``(x, y)``;
``2566 + x*5 + y`` REMOVE at cell ``(x, y)``. Invalid: any action on a separator column (x = 5,
6, 12, 13); a large item in the last row or column of a box; an item that would stick out of its
box or overlap an existing item (positive intersection area). A valid ADD that ends up within 4
pixels of an item is moved to touch it ("sticky" placement), computed as lilGym computes it: outlines
in image coordinates, distances and nearest points as GEOS (shapely's geometry engine) finds them.

**Scatter REMOVE** follows one of lilGym's two released rule sets, chosen with ``remove_rule``:

* ``"lilgym-2023"`` (the default; the code of the lilGym paper's experiments, lil-lab/lilgym from
  commit 3e4950b of 2022-11-10 to commit 3975c4c of 2023-07-27): REMOVE at a cell is valid only if an item has its top-left
  corner exactly at the cell's corner. It removes the item whose outline covers most of the cell,
  but the cell is built without its box's offset, so in the middle and right boxes it covers no
  item and a valid REMOVE leaves the world unchanged (it costs its step).
* ``"lilgym-2024"`` (lil-lab/lilgym commit 4293653 of 2024-02-26, "Simplify the checks"): REMOVE at a
  cell is valid if some item covers part of the cell (positive intersection area), in any box, and
  removes the item that covers most of it.

Shapes are polygons as in lilGym's geometry (shapely): squares and triangles by their corners,
circles as the 64-gon of GEOS's point buffer.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Sequence

import numpy as np

from .render import SEPARATOR_WIDTH
from .world import ALMOST_TOUCHING_MARGIN, BOX_SIZE, Color

__all__ = [
    "Action",
    "REMOVE_RULES",
    "DEFAULT_REMOVE_RULE",
    "check_remove_rule",
    "NUM_ACTIONS",
    "decode",
    "encode",
    "is_valid",
    "valid_mask",
    "apply",
    "action_text",
    "parse_action",
]

NUM_ACTIONS = {"tower": 13, "scatter": 2661}
"""Size of the action set of each appearance."""
REMOVE_RULES = ("lilgym-2023", "lilgym-2024")
"""lilGym's released rule sets for scatter REMOVE (see the module documentation)."""
DEFAULT_REMOVE_RULE = "lilgym-2023"
"""The rule set of the lilGym paper's experiments, for comparability with its numbers."""


def check_remove_rule(rule: str) -> None:
    """Raise ``ValueError`` naming ``rule`` unless it is one of :data:`REMOVE_RULES`."""
    if rule not in REMOVE_RULES:
        raise ValueError(f"remove_rule {rule!r} is not accepted; choose one of {list(REMOVE_RULES)}")

BOXES = ("LEFT", "MIDDLE", "RIGHT")
COLORS = ("YELLOW", "BLACK", "BLUE")
COLOR_VALUES = (Color.YELLOW.value, Color.BLACK.value, Color.BLUE.value)
SHAPES = ("CIRCLE", "SQUARE", "TRIANGLE")
SHAPE_VALUES = ("circle", "square", "triangle")
SIZES = ("SMALL", "MEDIUM", "LARGE")
SIZE_VALUES = (10, 20, 30)
GRID_X, GRID_Y, CELL = 19, 5, 20
N_CELLS = GRID_X * GRID_Y
SCATTER_ADD0, SCATTER_REMOVE0 = 1, 1 + N_CELLS * 27
TOWER_X, TOWER_SIZE, TOWER_STEP, TOWER_FIRST_Y, TOWER_MAX = 40, 20, 21, 80, 4


@dataclass(frozen=True)
class Action:
    """A decoded action. ``kind`` is ``"stop"``, ``"add"`` or ``"remove"``; tower actions use
    ``box`` (and ``color`` for ADD); scatter actions use the cell ``x``, ``y`` (and ``shape``,
    ``color``, ``size`` for ADD). Attribute values are indices into the lists above."""

    kind: str
    box: int = -1
    x: int = -1
    y: int = -1
    shape: int = -1
    color: int = -1
    size: int = -1


def _check_appearance(appearance: str) -> None:
    if appearance not in NUM_ACTIONS:
        raise ValueError(f"appearance {appearance!r} is not accepted; choose one of {list(NUM_ACTIONS)}")


def decode(appearance: str, index: int) -> Action:
    """The :class:`Action` of a flat action index."""
    _check_appearance(appearance)
    n = NUM_ACTIONS[appearance]
    index = int(index)
    if not 0 <= index < n:
        raise ValueError(f"action {index} is out of range for {appearance}: accepted 0..{n - 1}")
    if index == 0:
        return Action("stop")
    if appearance == "tower":
        if index < 10:
            return Action("add", box=(index - 1) // 3, color=(index - 1) % 3)
        return Action("remove", box=index - 10)
    if index < SCATTER_REMOVE0:
        k = index - SCATTER_ADD0
        size, k = k % 3, k // 3
        color, k = k % 3, k // 3
        shape, cell = k % 3, k // 3
        return Action("add", x=cell // GRID_Y, y=cell % GRID_Y, shape=shape, color=color, size=size)
    cell = index - SCATTER_REMOVE0
    return Action("remove", x=cell // GRID_Y, y=cell % GRID_Y)


def encode(appearance: str, action: Action) -> int:
    """The flat index of an :class:`Action` (inverse of :func:`decode`)."""
    _check_appearance(appearance)
    if action.kind == "stop":
        return 0
    if appearance == "tower":
        return 1 + 3 * action.box + action.color if action.kind == "add" else 10 + action.box
    cell = action.x * GRID_Y + action.y
    if action.kind == "add":
        return SCATTER_ADD0 + ((cell * 3 + action.shape) * 3 + action.color) * 3 + action.size
    return SCATTER_REMOVE0 + cell


# ---------------------------------------------------------------------------------- text form
def action_text(appearance: str, index: int) -> str:
    """``STOP``, ``ADD LEFT BLUE``, ``REMOVE RIGHT`` (tower); ``ADD 3 2 CIRCLE BLUE SMALL``,
    ``REMOVE 3 2`` (scatter)."""
    a = decode(appearance, index)
    if a.kind == "stop":
        return "STOP"
    if appearance == "tower":
        return f"ADD {BOXES[a.box]} {COLORS[a.color]}" if a.kind == "add" else f"REMOVE {BOXES[a.box]}"
    if a.kind == "add":
        return f"ADD {a.x} {a.y} {SHAPES[a.shape]} {COLORS[a.color]} {SIZES[a.size]}"
    return f"REMOVE {a.x} {a.y}"


def parse_action(appearance: str, text: str) -> int | None:
    """The action index that ``text`` names (first line, case-insensitive), or ``None`` if it
    names none."""
    _check_appearance(appearance)
    words = re.findall(r"[A-Za-z]+|\d+", (text.strip().splitlines() or [""])[0].upper())
    if not words:
        return None
    try:
        if words == ["STOP"]:
            return 0
        if appearance == "tower":
            if words[0] == "ADD" and len(words) == 3:
                return encode("tower", Action("add", box=BOXES.index(words[1]), color=COLORS.index(words[2])))
            if words[0] == "REMOVE" and len(words) == 2:
                return encode("tower", Action("remove", box=BOXES.index(words[1])))
            return None
        if words[0] == "ADD" and len(words) == 6:
            x, y = int(words[1]), int(words[2])
            if 0 <= x < GRID_X and 0 <= y < GRID_Y:
                return encode("scatter", Action("add", x=x, y=y, shape=SHAPES.index(words[3]),
                                                color=COLORS.index(words[4]), size=SIZES.index(words[5])))
        if words[0] == "REMOVE" and len(words) == 3:
            x, y = int(words[1]), int(words[2])
            if 0 <= x < GRID_X and 0 <= y < GRID_Y:
                return encode("scatter", Action("remove", x=x, y=y))
    except ValueError:
        return None
    return None


# ---------------------------------------------------------------------------------- geometry
_CIRCLE_SEGMENTS = 64
_APOTHEM = math.cos(math.pi / _CIRCLE_SEGMENTS)
_QUADRANT = ((1.0, 0.0), (0.0, -1.0), (-1.0, 0.0), (0.0, 1.0))
"""Exact directions of the quarter-turn vertices of a circle (GEOS's point buffer puts them exactly on the
axes, where ``cos``/``sin`` of a multiple of pi/2 would be a few ulps off)."""
Point = tuple[float, float]


class _Shape:
    """An item's outline in box coordinates (lilGym's shapes: no -1 on the far corner): squares
    and triangles by their corners, circles as 64-gons. Bounds and edges are precomputed."""

    __slots__ = ("kind", "pts", "bounds", "center", "radius", "edges")

    def __init__(self, x_loc: float, y_loc: float, kind: str, size: int) -> None:
        xs, ys = x_loc, y_loc
        xe, ye = int(xs + size), int(ys + size)
        self.kind = kind
        self.center = ((xs + xe) / 2, (ys + ye) / 2)
        self.radius = size / 2
        if kind == "square":
            pts = [(xs, ys), (xe, ys), (xe, ye), (xs, ye)]
        elif kind == "triangle":
            pts = [((xs + xe) / 2, ys), (xs, ye), (xe, ye)]
        else:
            cx, cy = self.center
            r, step = size / 2, 2 * math.pi / _CIRCLE_SEGMENTS
            pts = [(cx + r * _QUADRANT[k // 16][0], cy + r * _QUADRANT[k // 16][1]) if k % 16 == 0
                   else (cx + r * math.cos(-k * step), cy + r * math.sin(-k * step)) for k in range(_CIRCLE_SEGMENTS)]
        self.pts: list[Point] = pts
        xs_, ys_ = [p[0] for p in pts], [p[1] for p in pts]
        self.bounds = (min(xs_), min(ys_), max(xs_), max(ys_))
        n = len(pts)
        self.edges = [(pts[i], pts[(i + 1) % n]) for i in range(n)]


@lru_cache(maxsize=65536)
def _shape(x_loc: float, y_loc: float, kind: str, size: int) -> _Shape:
    return _Shape(x_loc, y_loc, kind, size)


def _item_shape(item: dict[str, Any]) -> _Shape:
    return _shape(item["x_loc"], item["y_loc"], item["type"], item["size"])


def _sat_overlap(a: _Shape, b: _Shape, eps: float = 1e-9) -> bool:
    """Positive-area intersection of two convex polygons (separating-axis test)."""
    for poly in (a, b):
        for (x1, y1), (x2, y2) in poly.edges:
            nx, ny = y2 - y1, x1 - x2
            pa = [nx * x + ny * y for x, y in a.pts]
            pb = [nx * x + ny * y for x, y in b.pts]
            if min(max(pa), max(pb)) - max(min(pa), min(pb)) <= eps * math.hypot(nx, ny):
                return False
    return True


def _point_polygon_distance(p: Point, s: _Shape) -> float:
    """0 inside the convex polygon, else the distance to its boundary."""
    inside = True
    sign = 0.0
    best = math.inf
    for a, b in s.edges:
        cross = (b[0] - a[0]) * (p[1] - a[1]) - (b[1] - a[1]) * (p[0] - a[0])
        if cross != 0:
            if sign == 0:
                sign = cross
            elif (cross > 0) != (sign > 0):
                inside = False
        c = _closest_on_segment(p, a, b)
        best = min(best, _dist(p, c))
    return 0.0 if inside else best


def _overlap(a: _Shape, b: _Shape, eps: float = 1e-9) -> bool:
    """Whether two items' outlines share a positive area."""
    ba, bb = a.bounds, b.bounds
    if ba[2] <= bb[0] + eps or bb[2] <= ba[0] + eps or ba[3] <= bb[1] + eps or bb[3] <= ba[1] + eps:
        return False
    if a.kind == "square" and b.kind == "square":
        return True  # squares are their bounding boxes
    # circles: the 64-gon lies between the disc of its apothem and the disc of its radius
    if a.kind == "circle" or b.kind == "circle":
        c, other = (a, b) if a.kind == "circle" else (b, a)
        if other.kind == "circle":
            d = _dist(c.center, other.center)
            if d >= c.radius + other.radius:
                return False
            if d < (c.radius + other.radius) * _APOTHEM - eps:
                return True
        else:
            d = _point_polygon_distance(c.center, other)
            if d >= c.radius:
                return False
            if d < c.radius * _APOTHEM - eps:
                return True
    return _sat_overlap(a, b, eps)


def _closest_on_segment(p: Point, a: Point, b: Point) -> Point:
    dx, dy = b[0] - a[0], b[1] - a[1]
    den = dx * dx + dy * dy
    if den == 0:
        return a
    t = ((p[0] - a[0]) * dx + (p[1] - a[1]) * dy) / den
    t = 0.0 if t < 0 else 1.0 if t > 1 else t
    return (a[0] + t * dx, a[1] + t * dy)


def _dist(p: Point, q: Point) -> float:
    return math.hypot(p[0] - q[0], p[1] - q[1])


def _geos_point_distance(p: Point, q: Point) -> float:
    dx, dy = p[0] - q[0], p[1] - q[1]
    return math.sqrt(dx * dx + dy * dy)


def _geos_point_segment(p: Point, a: Point, b: Point) -> float:
    """Distance from ``p`` to segment ``ab``, in the order of operations of GEOS's
    ``Distance::pointToSegment`` (perpendicular distance as ``|s| * sqrt(len2)``)."""
    if a[0] == b[0] and a[1] == b[1]:
        return _geos_point_distance(p, a)
    len2 = (b[0] - a[0]) * (b[0] - a[0]) + (b[1] - a[1]) * (b[1] - a[1])
    r = ((p[0] - a[0]) * (b[0] - a[0]) + (p[1] - a[1]) * (b[1] - a[1])) / len2
    if r <= 0.0:
        return _geos_point_distance(p, a)
    if r >= 1.0:
        return _geos_point_distance(p, b)
    s = ((a[1] - p[1]) * (b[0] - a[0]) - (a[0] - p[0]) * (b[1] - a[1])) / len2
    return abs(s) * math.sqrt(len2)


def _geos_segment_segment(a: Point, b: Point, c: Point, d: Point) -> float:
    """Distance between segments ``ab`` and ``cd`` as GEOS's ``Distance::segmentToSegment``
    computes it (0 where they intersect)."""
    if a == b:
        return _geos_point_segment(a, c, d)
    if c == d:
        return _geos_point_segment(d, a, b)
    no_intersection = False
    if (max(a[0], b[0]) < min(c[0], d[0]) or min(a[0], b[0]) > max(c[0], d[0])
            or max(a[1], b[1]) < min(c[1], d[1]) or min(a[1], b[1]) > max(c[1], d[1])):
        no_intersection = True
    else:
        denom = (b[0] - a[0]) * (d[1] - c[1]) - (b[1] - a[1]) * (d[0] - c[0])
        if denom == 0:
            no_intersection = True
        else:
            r = ((a[1] - c[1]) * (d[0] - c[0]) - (a[0] - c[0]) * (d[1] - c[1])) / denom
            s = ((a[1] - c[1]) * (b[0] - a[0]) - (a[0] - c[0]) * (b[1] - a[1])) / denom
            no_intersection = r < 0 or r > 1 or s < 0 or s > 1
    if no_intersection:
        return min(_geos_point_segment(a, c, d), _geos_point_segment(b, c, d),
                   _geos_point_segment(c, a, b), _geos_point_segment(d, a, b))
    return 0.0


def _geos_closest_point(p: Point, a: Point, b: Point) -> Point:
    """GEOS's ``LineSegment::closestPoint``: the projection inside the segment, else the nearer end."""
    if p == a:
        factor = 0.0
    elif p == b:
        factor = 1.0
    else:
        dx, dy = b[0] - a[0], b[1] - a[1]
        factor = ((p[0] - a[0]) * dx + (p[1] - a[1]) * dy) / (dx * dx + dy * dy)
    if 0 < factor < 1:
        return (a[0] + factor * (b[0] - a[0]), a[1] + factor * (b[1] - a[1]))
    return a if _geos_point_distance(a, p) < _geos_point_distance(b, p) else b


def _segment_closest_points(p0: Point, p1: Point, q0: Point, q1: Point) -> tuple[Point, Point]:
    """Closest points of two segments that do not intersect, as GEOS's ``LineSegment::closestPoints``
    (the four endpoint projections in its order, the first strictly closest kept)."""
    c = _geos_closest_point(q0, p0, p1)
    best, out = _geos_point_distance(c, q0), (c, q0)
    c = _geos_closest_point(q1, p0, p1)
    d = _geos_point_distance(c, q1)
    if d < best:
        best, out = d, (c, q1)
    c = _geos_closest_point(p0, q0, q1)
    d = _geos_point_distance(c, p0)
    if d < best:
        best, out = d, (p0, c)
    c = _geos_closest_point(p1, q0, q1)
    if _geos_point_distance(c, p1) < best:
        out = (p1, c)
    return out


def _nearest_points(a: _Shape, b: _Shape, within: float = math.inf) -> tuple[float, Point, Point]:
    """Distance and nearest points of two disjoint outlines as GEOS's ``DistanceOp`` (shapely's
    ``distance`` and ``nearest_points``) finds them: segment pairs in ring order, the first strictly
    closest pair kept; touching outlines give distance 0 and one point twice. Pairs whose bounding
    boxes are further apart than the best distance so far (or than ``within``) cannot be closest
    and are skipped."""
    best, pair = math.inf, (a.pts[0], b.pts[0])
    for p0, p1 in a.edges:
        pminx, pmaxx = min(p0[0], p1[0]), max(p0[0], p1[0])
        pminy, pmaxy = min(p0[1], p1[1]), max(p0[1], p1[1])
        for q0, q1 in b.edges:
            gap = max(min(q0[0], q1[0]) - pmaxx, pminx - max(q0[0], q1[0]),
                      min(q0[1], q1[1]) - pmaxy, pminy - max(q0[1], q1[1]))
            if gap > best or gap >= within:
                continue
            d = _geos_segment_segment(p0, p1, q0, q1)
            if d < best:
                best = d
                if d == 0.0:
                    return 0.0, p0, p0  # touching: GEOS returns the contact point for both
                pair = _segment_closest_points(p0, p1, q0, q1)
    return best, pair[0], pair[1]


def _clip_area(s: _Shape, x0: float, y0: float, x1: float, y1: float) -> float:
    """Area of a convex outline inside an axis-aligned rectangle (Sutherland-Hodgman + shoelace)."""
    pts = list(s.pts)
    for axis, bound, keep_greater in ((0, x0, True), (0, x1, False), (1, y0, True), (1, y1, False)):
        out = []
        n = len(pts)
        for i in range(n):
            cur, nxt = pts[i], pts[(i + 1) % n]
            cin = cur[axis] >= bound if keep_greater else cur[axis] <= bound
            nin = nxt[axis] >= bound if keep_greater else nxt[axis] <= bound
            if cin:
                out.append(cur)
            if cin != nin:
                t = (bound - cur[axis]) / (nxt[axis] - cur[axis])
                out.append((cur[0] + t * (nxt[0] - cur[0]), cur[1] + t * (nxt[1] - cur[1])))
        pts = out
        if not pts:
            return 0.0
    area = 0.0
    for i in range(len(pts)):
        (xa, ya), (xb, yb) = pts[i], pts[(i + 1) % len(pts)]
        area += xa * yb - xb * ya
    return abs(area) / 2


# ---------------------------------------------------------------------------------- scatter rules
def scatter_box(x: int) -> int:
    """The box of grid column ``x`` (0, 1, 2) or -1 for a separator column."""
    if 0 <= x < BOX_SIZE // CELL:
        return 0
    if (BOX_SIZE + 2 * CELL) // CELL <= x < 2 * (BOX_SIZE + CELL) // CELL:
        return 1
    if x >= (2 * BOX_SIZE + 4 * CELL) // CELL:
        return 2
    return -1


def _cell_in_box(x: int, y: int, box: int) -> tuple[int, int]:
    return x * CELL - box * (BOX_SIZE + SEPARATOR_WIDTH), y * CELL


def _box_key(box_items: Sequence[dict[str, Any]]) -> tuple:
    return tuple((o["x_loc"], o["y_loc"], o["type"], o["size"]) for o in box_items)


@lru_cache(maxsize=4096)
def _free_add_cells(key: tuple) -> np.ndarray:
    """``[5 columns, 5 rows, 3 shapes, 3 sizes]`` bool: where an ADD fits in a box holding the
    items ``key`` (box coordinates: overlaps do not depend on which box)."""
    shapes = [_shape(x, y, t, s) for x, y, t, s in key]
    out = np.zeros((5, 5, 3, 3), dtype=bool)
    for cx in range(5):
        for cy in range(5):
            bx, by = cx * CELL, cy * CELL
            for si, size in enumerate(SIZE_VALUES):
                if si == 2 and (bx == 80 or by == 80):
                    continue
                if bx + size - 1 >= BOX_SIZE or by + size - 1 >= BOX_SIZE:
                    continue
                for ki, kind in enumerate(SHAPE_VALUES):
                    new = _shape(bx, by, kind, size)
                    out[cx, cy, ki, si] = not any(_overlap(new, other) for other in shapes)
    return out


def _first_column(box: int) -> int:
    return (box * (BOX_SIZE + SEPARATOR_WIDTH)) // CELL


@lru_cache(maxsize=4096)
def _covered_cells(key: tuple) -> np.ndarray:
    """``[5 columns, 5 rows]`` bool: the cells of a box holding the items ``key`` that some item covers
    with a positive area (box coordinates)."""
    shapes = [_shape(x, y, t, s) for x, y, t, s in key]
    out = np.zeros((5, 5), dtype=bool)
    for cx in range(5):
        for cy in range(5):
            x0, y0 = cx * CELL, cy * CELL
            x1, y1 = min(x0 + CELL, BOX_SIZE), min(y0 + CELL, BOX_SIZE)
            out[cx, cy] = any(
                sh.bounds[0] < x1 and sh.bounds[2] > x0 and sh.bounds[1] < y1 and sh.bounds[3] > y0
                and _clip_area(sh, x0, y0, x1, y1) > 0.0 for sh in shapes)
    return out


def _scatter_mask(rep: Sequence[Sequence[dict[str, Any]]], remove_rule: str) -> np.ndarray:
    mask = np.zeros(NUM_ACTIONS["scatter"], dtype=bool)
    mask[0] = True
    add = np.zeros((GRID_X, GRID_Y, 3, 3, 3), dtype=bool)  # x, y, shape, colour, size
    remove = np.zeros((GRID_X, GRID_Y), dtype=bool)
    for box in range(3):
        x0 = _first_column(box)
        free = _free_add_cells(_box_key(rep[box]))  # [5, 5, shape, size]
        add[x0 : x0 + 5] = free[:, :, :, None, :]
        if remove_rule == "lilgym-2024":
            remove[x0 : x0 + 5] = _covered_cells(_box_key(rep[box]))
            continue
        for o in rep[box]:
            bx, by = o["x_loc"], o["y_loc"]
            if bx % CELL == 0 and by % CELL == 0 and 0 <= bx < BOX_SIZE and 0 <= by < BOX_SIZE:
                remove[x0 + int(bx) // CELL, int(by) // CELL] = True
    mask[SCATTER_ADD0:SCATTER_REMOVE0] = add.reshape(-1)
    mask[SCATTER_REMOVE0:] = remove.reshape(-1)
    return mask


def valid_mask(appearance: str, rep: Sequence[Sequence[dict[str, Any]]],
               remove_rule: str = DEFAULT_REMOVE_RULE) -> np.ndarray:
    """``[n_actions]`` bool: which actions are valid in world ``rep`` (STOP always is) under the scatter
    REMOVE rule set ``remove_rule``."""
    _check_appearance(appearance)
    check_remove_rule(remove_rule)
    if appearance == "tower":
        mask = np.zeros(13, dtype=bool)
        mask[0] = True
        for box in range(3):
            n = len(rep[box])
            mask[1 + 3 * box : 4 + 3 * box] = n < TOWER_MAX
            mask[10 + box] = n > 0
        return mask
    return _scatter_mask(rep, remove_rule)


def is_valid(appearance: str, rep: Sequence[Sequence[dict[str, Any]]], index: int,
             remove_rule: str = DEFAULT_REMOVE_RULE) -> bool:
    return bool(valid_mask(appearance, rep, remove_rule)[int(index)])


def _tidy(v: float) -> float | int:
    return int(v) if float(v).is_integer() else v


def apply(appearance: str, rep: Sequence[Sequence[dict[str, Any]]], index: int,
          remove_rule: str = DEFAULT_REMOVE_RULE) -> list[list[dict[str, Any]]]:
    """The world after a *valid* action (a new structured representation; ``rep`` is unchanged),
    scatter REMOVE under the rule set ``remove_rule``."""
    check_remove_rule(remove_rule)
    a = decode(appearance, index)
    new = [[dict(item) for item in box] for box in rep]
    if a.kind == "stop":
        return new
    if appearance == "tower":
        box = new[a.box]
        if a.kind == "add":
            y = box[-1]["y_loc"] - TOWER_STEP if box else TOWER_FIRST_Y
            box.append({"x_loc": TOWER_X, "y_loc": y, "type": "square", "color": COLOR_VALUES[a.color], "size": TOWER_SIZE})
        else:
            box.pop()
        return new
    b = scatter_box(a.x)
    if b < 0:
        raise ValueError(f"action {index} acts on a separator column and is invalid")
    bx, by = _cell_in_box(a.x, a.y, b)
    items = new[b]
    if a.kind == "remove":
        if remove_rule == "lilgym-2023" and b > 0:
            return new  # the released 2023 code looks for the item in a cell without the box's offset: none
        x1, y1 = min(bx + CELL, BOX_SIZE), min(by + CELL, BOX_SIZE)
        best, best_area = -1, 0.0
        for i, o in enumerate(items):
            area = _clip_area(_item_shape(o), bx, by, x1, y1)
            if area > 0.0 and area > best_area:
                best, best_area = i, area
        if best >= 0:
            del items[best]
        return new
    obj = {"x_loc": bx, "y_loc": by, "type": SHAPE_VALUES[a.shape], "color": COLOR_VALUES[a.color], "size": SIZE_VALUES[a.size]}
    # sticky placement: an item less than 5 pixels from another one is moved to touch it. As in
    # lilGym, outlines are in image coordinates (the box's offset added), where floating-point ties
    # between segments resolve as they do there.
    offset = b * (BOX_SIZE + SEPARATOR_WIDTH)
    shape = _shape(offset + bx, by, obj["type"], obj["size"])
    closest_d, nearest = BOX_SIZE, None
    for o in items:
        other = _shape(offset + o["x_loc"], o["y_loc"], o["type"], o["size"])
        d, p_new, p_old = _nearest_points(shape, other, within=ALMOST_TOUCHING_MARGIN + 1)
        if d < ALMOST_TOUCHING_MARGIN + 1 and int(d) < closest_d:
            closest_d, nearest = int(d), (p_new, p_old)
    if nearest is not None:
        p_new, p_old = nearest
        x_min, y_min = shape.bounds[:2]
        obj["x_loc"] = _tidy(x_min + int(p_old[0]) - int(p_new[0]) - offset)
        obj["y_loc"] = _tidy(y_min + int(p_old[1]) - int(p_new[1]))
    items.append(obj)
    return new
