"""The structured world of lilGym / NLVR: three boxes of coloured shapes.

A world is what the statements' programs talk about. It is stored as NLVR's *structured
representation*: a list of three boxes, each a list of items
``{"x_loc", "y_loc", "type", "color", "size"}`` in pixels inside a 100x100 box, with ``y_loc``
growing downwards (the top-left corner of the item's bounding square).

:class:`World`, :class:`Box` and :class:`Item` wrap that representation with the geometry the
world DSL needs (walls, corners, touching, above/below, towers). Items compare by identity, like
the objects that lilGym's programs were written against: two equal-looking items are two items.
"""

from __future__ import annotations

from enum import Enum
from typing import Any, Iterator, Sequence

__all__ = [
    "Color",
    "Shape",
    "Size",
    "Side",
    "Item",
    "Box",
    "World",
    "BOX_SIZE",
    "ALMOST_TOUCHING_MARGIN",
    "validate_structured_rep",
]

BOX_SIZE = 100
"""Width and height of a box in pixels."""
ALMOST_TOUCHING_MARGIN = 4
"""Pixels within which items are "closely touching" each other or a wall."""


class Color(Enum):
    YELLOW = "Yellow"
    BLACK = "Black"
    BLUE = "#0099ff"
    GRAY = "Gray"


class Shape(Enum):
    CIRCLE = "circle"
    SQUARE = "square"
    TRIANGLE = "triangle"


class Size(Enum):
    SMALL = 10
    MEDIUM = 20
    BIG = 30


class Side(Enum):
    RIGHT = "right"
    LEFT = "left"
    TOP = "top"
    BOTTOM = "bottom"
    ANY = "any"


class Item:
    """One shape in a box. Coordinates follow the usual axes: ``top`` > ``bottom``."""

    __slots__ = ("x_loc", "y_loc", "color", "shape", "size", "box")

    def __init__(self, d: dict[str, Any]) -> None:
        self.x_loc = d["x_loc"]
        self.y_loc = d["y_loc"]
        self.color = Color(d["color"])
        self.shape = Shape(d["type"])
        self.size = Size(d["size"])
        self.box: Box | None = None

    def __repr__(self) -> str:
        return (
            f"{self.size.name.lower()} {self.color.name.lower()} {self.shape.name.lower()} "
            f"at x: ({self.left}-{self.right}) y: ({self.bottom},{self.top})"
        )

    # geometry (y grows upwards here: the data's y_loc grows downwards)
    @property
    def left(self) -> float:
        return self.x_loc

    @property
    def right(self) -> float:
        return self.x_loc + self.size.value

    @property
    def top(self) -> float:
        return BOX_SIZE - self.y_loc

    @property
    def bottom(self) -> float:
        return BOX_SIZE - (self.y_loc + self.size.value)

    def touching_right(self, use_margin: bool = False) -> bool:
        return self.right >= BOX_SIZE - (ALMOST_TOUCHING_MARGIN if use_margin else 0)

    def touching_left(self, use_margin: bool = False) -> bool:
        return self.left <= (ALMOST_TOUCHING_MARGIN if use_margin else 0)

    def touching_bottom(self, use_margin: bool = False) -> bool:
        return self.bottom <= (ALMOST_TOUCHING_MARGIN if use_margin else 0)

    def touching_top(self, use_margin: bool = False) -> bool:
        return self.top >= BOX_SIZE - (ALMOST_TOUCHING_MARGIN if use_margin else 0)

    def touching_wall(self, use_margin: bool = False) -> bool:
        return (
            self.touching_right(use_margin)
            or self.touching_left(use_margin)
            or self.touching_bottom(use_margin)
            or self.touching_top(use_margin)
        )

    def touching_corner(self, use_margin: bool = False) -> bool:
        walls = (
            self.touching_right(use_margin),
            self.touching_left(use_margin),
            self.touching_bottom(use_margin),
            self.touching_top(use_margin),
        )
        return sum(walls) == 2

    def distance(self, other: "Item") -> float:
        """Gap between the two bounding squares along the axis where they are furthest apart."""
        if self is other:
            return 0
        return max(
            self.left - other.right,
            other.left - self.right,
            self.bottom - other.top,
            other.bottom - self.top,
        )

    def is_touching(self, other: "Item", use_margin: bool = False) -> bool:
        margin = ALMOST_TOUCHING_MARGIN if use_margin else 1
        return self is not other and self.box is other.box and self.distance(other) <= margin

    def is_top(self) -> bool:
        return self.top == max(item.top for item in self.box)  # type: ignore[union-attr]

    def is_bottom(self) -> bool:
        return self.top == min(item.top for item in self.box)  # type: ignore[union-attr]

    def is_second(self) -> bool:
        return self.box.is_tower() and self.bottom == 21  # type: ignore[union-attr]

    def is_third(self) -> bool:
        return self.box.is_tower() and self.bottom == 42  # type: ignore[union-attr]


class Box:
    """The items of one of the three boxes (iterable, indexable, ``len``)."""

    __slots__ = ("items",)

    def __init__(self, items: Sequence[dict[str, Any]]) -> None:
        self.items = [Item(d) for d in items]
        for item in self.items:
            item.box = self

    def __repr__(self) -> str:
        return f"Box({self.items})"

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: Any) -> Any:
        return self.items[key]

    def __iter__(self) -> Iterator[Item]:
        return iter(self.items)

    def __contains__(self, item: Any) -> bool:
        return item in self.items

    def is_tower(self) -> bool:
        """Non-empty, only squares, all right-aligned."""
        return (
            len(self.items) > 0
            and all(s.shape is Shape.SQUARE for s in self.items)
            and all(s.right == self.items[0].right for s in self.items)
        )

    def all_items_in_box(self) -> list[Item]:
        return self.items


class World:
    """A structured representation: three boxes."""

    __slots__ = ("boxes",)

    def __init__(self, structured_rep: Sequence[Sequence[dict[str, Any]]]) -> None:
        self.boxes = [Box(items) for items in structured_rep]

    def all_boxes(self) -> list[Box]:
        return self.boxes

    def all_items(self) -> list[Item]:
        return [item for box in self.boxes for item in box]


_ITEM_KEYS = {"x_loc", "y_loc", "type", "color", "size"}


def validate_structured_rep(rep: Any, where: str = "world") -> list[list[dict[str, Any]]]:
    """Check a structured representation and return it (three lists of item mappings).

    Raises ``ValueError`` naming the first bad entry and what is accepted.
    """
    if not isinstance(rep, list) or len(rep) != 3 or not all(isinstance(b, list) for b in rep):
        raise ValueError(f"{where}: expected a list of three boxes (lists of items), got {str(rep)[:80]!r}")
    colors = [c.value for c in Color if c is not Color.GRAY]
    for i, box in enumerate(rep):
        for j, item in enumerate(box):
            at = f"{where}[{i}][{j}]"
            if not isinstance(item, dict) or not _ITEM_KEYS <= set(item):
                raise ValueError(f"{at}: expected a mapping with keys {sorted(_ITEM_KEYS)}, got {item!r}")
            if item["color"] not in colors:
                raise ValueError(f"{at}.color: {item['color']!r} is not accepted; choose one of {colors}")
            if item["type"] not in [s.value for s in Shape]:
                raise ValueError(f"{at}.type: {item['type']!r} is not accepted; choose one of {[s.value for s in Shape]}")
            if item["size"] not in [s.value for s in Size]:
                raise ValueError(f"{at}.size: {item['size']!r} is not accepted; choose one of {[s.value for s in Size]}")
            for k in ("x_loc", "y_loc"):
                v = item[k]
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= BOX_SIZE:
                    raise ValueError(f"{at}.{k}: expected a number in [0, {BOX_SIZE}], got {v!r}")
    return rep
