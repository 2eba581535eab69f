"""The world DSL that lilGym's statement programs are written in.

Every name a program may use is listed in :data:`FUNCTIONS` (functions), :data:`ENUMS` (``Color``,
``Shape``, ``Size``, ``Side``) and the two world constants ``all_boxes`` and ``all_items``; the
executor (:mod:`.executor`) refuses every other name. The functions follow the semantics of the
programs' published executor (NLVR's structured representations, Goldman et al. 2018; lilGym,
Wu et al. 2023): the same set/list types, the same strict type checks (``AND`` needs two bools,
``ge`` two ints) and the same errors, so that each program gives the value its annotators
intended. Work that grows with the input (lambda calls, combinations, set building) is charged to
the running program's budget through :func:`charge`.
"""

from __future__ import annotations

import contextvars
import itertools
import math
from collections.abc import Iterable
from typing import Any, Callable

from .world import ALMOST_TOUCHING_MARGIN, Box, Color, Item, Shape, Side, Size

__all__ = ["FUNCTIONS", "ENUMS", "CONSTANTS", "charge", "BUDGET"]


class _NoBudget:
    def tick(self, n: int = 1) -> None:
        pass


BUDGET: contextvars.ContextVar[Any] = contextvars.ContextVar("lilgym_program_budget", default=_NoBudget())
"""The budget of the program being run (set by the executor)."""


def charge(n: int) -> None:
    """Charge ``n`` steps of work to the running program."""
    BUDGET.get().tick(n)


def _size(s: Any) -> int:
    try:
        return len(s)
    except TypeError:
        return 1


# ------------------------------------------------------------------------------ sets and counting
def count(_set: Any) -> int:
    """Number of distinct objects (by identity) in ``_set``."""
    charge(_size(_set))
    return len({id(x) for x in _set})


def exist(_set: Any) -> bool:
    return count(_set) > 0


def unique(_set: Any) -> Any:
    if len(_set) == 1:
        return list(_set)[0]
    raise ValueError(f"unique: expected exactly one element, got {len(_set)}")


# ------------------------------------------------------------------------------ item predicates
def is_yellow(x: Item) -> bool:
    return x.color == Color.YELLOW


def is_blue(x: Item) -> bool:
    return x.color == Color.BLUE


def is_black(x: Item) -> bool:
    return x.color == Color.BLACK


def is_circle(x: Item) -> bool:
    return x.shape == Shape.CIRCLE


def is_square(x: Item) -> bool:
    return x.shape == Shape.SQUARE


def is_triangle(x: Item) -> bool:
    return x.shape == Shape.TRIANGLE


def is_big(x: Item) -> bool:
    return x.size == Size.BIG


def is_medium(x: Item) -> bool:
    return x.size == Size.MEDIUM


def is_small(x: Item) -> bool:
    return x.size == Size.SMALL


def _item(x: Any, fn: str) -> Item:
    if not isinstance(x, Item):
        raise TypeError(f"{fn}: expected an item, got {type(x).__name__}")
    return x


def is_top(x: Item) -> bool:
    return _item(x, "is_top").is_top()


def is_bottom(x: Item) -> bool:
    return _item(x, "is_bottom").is_bottom()


def is_second(x: Item) -> bool:
    return _item(x, "is_second").is_second()


def is_third(x: Item) -> bool:
    return _item(x, "is_third").is_third()


def is_closely_touching(x: Item, y: Item) -> bool:
    m = ALMOST_TOUCHING_MARGIN
    return (
        abs(x.top - y.bottom) <= m
        or abs(x.left - y.right) <= m
        or abs(y.top - x.bottom) <= m
        or abs(y.left - x.right) <= m
    )


def _wall(x: Item, side: Any, use_margin: bool) -> bool | None:
    x = _item(x, "is_touching_wall")
    if side == Side.ANY or side is None:
        return x.touching_wall(use_margin)
    if side == Side.TOP:
        return x.touching_top(use_margin)
    if side == Side.BOTTOM:
        return x.touching_bottom(use_margin)
    if side == Side.RIGHT:
        return x.touching_right(use_margin)
    if side == Side.LEFT:
        return x.touching_left(use_margin)
    return None


def is_touching_wall(x: Item, side: Any = None) -> bool | None:
    return _wall(x, side, False)


def is_closely_touching_wall(x: Item, side: Any = None) -> bool | None:
    return _wall(x, side, True)


def is_touching_corner(x: Item, side: Any = None) -> Any:
    return _item(x, "is_touching_corner").touching_corner() and is_touching_wall(x, side)


def is_closely_touching_corner(x: Item, side: Any = None) -> Any:
    return _item(x, "is_closely_touching_corner").touching_corner(True) and is_closely_touching_wall(x, side)


def is_closely_touching_specific_corner(x: Item, side_a: Any = None, side_b: Any = None) -> Any:
    return (
        _item(x, "is_closely_touching_specific_corner").touching_corner(True)
        and is_closely_touching_wall(x, side_a)
        and is_closely_touching_wall(x, side_b)
    )


# ------------------------------------------------------------------------------ queries
def _per_item(s: Any, f: Callable[[Item], Any]) -> list[Any]:
    if type(s) is Item:
        return [f(s)]
    if isinstance(s, Iterable):
        items = list(s)
        charge(len(items))
        if all(type(x) is Item for x in items):
            return [f(x) for x in items]
    raise TypeError("expected an item or a set of items")


def query_color(x: Any) -> list[Color]:
    return _per_item(x, lambda item: item.color)


def query_size(x: Any) -> list[Size]:
    return _per_item(x, lambda item: item.size)


def query_shape(x: Any) -> list[Shape]:
    return _per_item(x, lambda item: item.shape)


def get_set_colors(s: Any) -> set[Color]:
    charge(_size(s))
    return {x.color for x in s}


def get_set_sizes(s: Any) -> set[Size]:
    charge(_size(s))
    return {x.size for x in s}


def get_set_shapes(s: Any) -> set[Shape]:
    charge(_size(s))
    return {x.shape for x in s}


# ------------------------------------------------------------------------------ filters
def filter_obj(_set: Any, func: Callable[[Any], Any]) -> list[Any]:
    return [x for x in _set if func(x)]


def filter_color(_set: Any, color: Color) -> list[Any]:
    return filter_obj(_set, lambda x: equal(query_color(x), color))


def filter_size(_set: Any, size: Size) -> list[Any]:
    return filter_obj(_set, lambda x: equal(query_size(x), size))


def filter_shape(_set: Any, shape: Shape) -> list[Any]:
    return filter_obj(_set, lambda x: equal(query_shape(x), shape))


# ------------------------------------------------------------------------------ comparisons
def _ints(fn: str, a: Any, b: Any) -> None:
    if not (type(a) is int and type(b) is int):
        raise TypeError(f"{fn}: expected two integers, got {type(a).__name__} and {type(b).__name__}")


def le(a: int, b: int) -> bool:
    _ints("le", a, b)
    return a <= b


def ge(a: int, b: int) -> bool:
    _ints("ge", a, b)
    return a >= b


def lt(a: int, b: int) -> bool:
    _ints("lt", a, b)
    return a < b


def gt(a: int, b: int) -> bool:
    _ints("gt", a, b)
    return a > b


def equal_int(a: int, b: int) -> bool:
    _ints("equal_int", a, b)
    return a == b


def equal(a: Any, b: Any) -> bool:
    """Equality where a singleton equals its element (``equal([Color.BLUE], Color.BLUE)``)."""
    if type(a) == type(b):
        return a == b
    a = a if isinstance(a, list) else [a]
    b = b if isinstance(b, list) else [b]
    types = [type(x) for x in a] + [type(x) for x in b]
    if count(types) > 1:
        raise TypeError(f"equal: cannot compare {types[0].__name__} and {types[-1].__name__}")
    return equal_set(a, b)


def _is_type_or_set_of(x: Any, t: type) -> bool:
    return isinstance(x, t) or (isinstance(x, Iterable) and all(isinstance(a, t) for a in x))


def equal_color(a: Any, b: Any) -> bool:
    if not (_is_type_or_set_of(a, Color) and _is_type_or_set_of(b, Color)):
        raise TypeError("equal_color: expected colours")
    return equal(a, b)


def equal_size(a: Any, b: Any) -> bool:
    if not (_is_type_or_set_of(a, Size) and _is_type_or_set_of(b, Size)):
        raise TypeError("equal_size: expected sizes")
    return equal(a, b)


def equal_shape(a: Any, b: Any) -> bool:
    if not (_is_type_or_set_of(a, Shape) and _is_type_or_set_of(b, Shape)):
        raise TypeError("equal_shape: expected shapes")
    return equal(a, b)


# ------------------------------------------------------------------------------ relations
def _others(item: Item) -> list[Item]:
    return [x for x in item.box if x is not item]  # type: ignore[union-attr]


def _above(x: Item, item: Item) -> bool:
    """``x`` is above ``item`` (and, in a tower, sits on it)."""
    return item.top <= x.bottom and (item.is_touching(x) if item.box.is_tower() else True)  # type: ignore[union-attr]


def _relate(s: Any, test: Callable[[Item, Item], bool]) -> set[Item]:
    out: set[Item] = set()
    for item in _per_item(s, lambda i: i):
        others = _others(item)
        charge(len(others))
        out.update(x for x in others if test(x, item))
    return out


def get_above(s: Any) -> set[Item]:
    return _relate(s, _above)


def get_below(s: Any) -> set[Item]:
    return _relate(s, lambda x, item: _above(item, x))


def get_touching(s: Any) -> set[Item]:
    return _relate(s, lambda x, item: item.is_touching(x))


def get_closely_touching(s: Any) -> set[Item]:
    return _relate(s, lambda x, item: item.is_touching(x, use_margin=True))


def get_box_all_above(s: Any) -> set[Item]:
    return _relate(s, lambda x, item: item.top <= x.bottom)


def get_box_all_below(s: Any) -> set[Item]:
    return _relate(s, lambda x, item: x.top <= item.bottom)


# ------------------------------------------------------------------------------ logic
def _bool(fn: str, *values: Any) -> None:
    for v in values:
        if type(v) is not bool:
            raise TypeError(f"{fn}: expected booleans, got {type(v).__name__}")


def AND(a: bool, b: bool) -> bool:  # noqa: N802 - the DSL's name
    _bool("AND", a, b)
    return a and b


def OR(a: bool, b: bool) -> bool:  # noqa: N802
    _bool("OR", a, b)
    return a or b


def NOT(a: bool) -> bool:  # noqa: N802
    _bool("NOT", a)
    return not a


def All(_set: Any, func: Callable[[Any], Any]) -> bool:  # noqa: N802
    return all([func(x) is True for x in _set]) if len(_set) > 0 else False


def Any_(_set: Any, func: Callable[[Any], Any]) -> bool:
    for x in _set:
        if func(x) is True:
            return True
    return False


# ------------------------------------------------------------------------------ set algebra
def member_of(item: Any, _set: Any) -> bool:
    charge(_size(_set))
    return item in _set


def contained(set1: Any, set2: Any) -> bool:
    charge(_size(set1) * max(1, _size(set2)))
    for item in set1:
        if item not in set2:
            return False
    return True


def equal_set(set1: Any, set2: Any) -> bool:
    return contained(set1, set2) and contained(set2, set1)


def all_same(_set: Any) -> bool:
    charge(_size(_set))
    return len(set(_set)) == 1


def all_same_attribute(_set: Any, func: Callable[[Any], Any]) -> bool:
    return all_same([func(x) for x in _set])


def all_same_shape(_set: Any) -> bool:
    return all_same(query_shape(_set))


def all_same_color(_set: Any) -> bool:
    return all_same(query_color(_set))


def all_same_size(_set: Any) -> bool:
    return all_same(query_size(_set))


def union_all(sets: Any) -> set[Any]:
    out: set[Any] = set()
    for s in sets:
        charge(_size(s))
        out.update(s)
    return out


def union(set1: Any, set2: Any) -> Any:
    charge(_size(set1) + _size(set2))
    return set1.union(set2)


def intersect(set1: Any, set2: Any) -> Any:
    charge(_size(set1) + _size(set2))
    return set1.intersection(set2)


MAX_COMBINATIONS = 100_000
"""The most tuples ``combinations`` may build (the programs need at most a few dozen)."""


def combinations(s: Any, k: int) -> list[tuple[Any, ...]]:
    items = list(s)
    if type(k) is not int or k < 0:
        raise TypeError(f"combinations: expected a non-negative integer size, got {k!r}")
    n = math.comb(len(items), k) if k <= len(items) else 0
    if n > MAX_COMBINATIONS:
        raise OverflowError(f"combinations: {n} tuples exceed the limit of {MAX_COMBINATIONS}")
    charge(n * max(1, k))
    return list(itertools.combinations(items, k))


# ------------------------------------------------------------------------------ safe builtins
def _len(x: Any) -> int:
    return len(x)


def _set(x: Any = ()) -> set[Any]:
    charge(_size(x))
    return set(x)


def _list(x: Any = ()) -> list[Any]:
    charge(_size(x))
    return list(x)


def _all(x: Any) -> bool:
    charge(_size(x))
    return all(x)


def _any(x: Any) -> bool:
    charge(_size(x))
    return any(x)


def _min(x: Any, key: Callable[[Any], Any] | None = None) -> Any:
    charge(_size(x))
    return min(x, key=key) if key is not None else min(x)


def _max(x: Any, key: Callable[[Any], Any] | None = None) -> Any:
    charge(_size(x))
    return max(x, key=key) if key is not None else max(x)


def _sum(x: Any) -> int:
    charge(_size(x))
    values = list(x)
    if not all(type(v) is int for v in values):
        raise TypeError("sum: expected integers")
    return sum(values)


FUNCTIONS: dict[str, Callable[..., Any]] = {
    # sets and counting
    "count": count, "exist": exist, "unique": unique,
    # item predicates
    "is_yellow": is_yellow, "is_blue": is_blue, "is_black": is_black,
    "is_circle": is_circle, "is_square": is_square, "is_triangle": is_triangle,
    "is_big": is_big, "is_medium": is_medium, "is_small": is_small,
    "is_top": is_top, "is_bottom": is_bottom, "is_second": is_second, "is_third": is_third,
    "is_closely_touching": is_closely_touching,
    "is_touching_wall": is_touching_wall, "is_closely_touching_wall": is_closely_touching_wall,
    "is_touching_corner": is_touching_corner, "is_closely_touching_corner": is_closely_touching_corner,
    "is_closely_touching_specific_corner": is_closely_touching_specific_corner,
    # queries
    "query_color": query_color, "query_size": query_size, "query_shape": query_shape,
    "get_set_colors": get_set_colors, "get_set_sizes": get_set_sizes, "get_set_shapes": get_set_shapes,
    # filters
    "filter_obj": filter_obj, "filter_color": filter_color, "filter_size": filter_size, "filter_shape": filter_shape,
    # comparisons
    "le": le, "ge": ge, "lt": lt, "gt": gt, "equal_int": equal_int, "equal": equal,
    "equal_color": equal_color, "equal_size": equal_size, "equal_shape": equal_shape,
    # relations
    "get_above": get_above, "get_below": get_below, "get_touching": get_touching,
    "get_closely_touching": get_closely_touching,
    "get_box_all_above": get_box_all_above, "get_box_all_below": get_box_all_below,
    # logic
    "AND": AND, "OR": OR, "NOT": NOT, "All": All, "Any": Any_,
    # set algebra
    "member_of": member_of, "contained": contained, "equal_set": equal_set, "all_same": all_same,
    "all_same_attribute": all_same_attribute, "all_same_shape": all_same_shape,
    "all_same_color": all_same_color, "all_same_size": all_same_size,
    "union_all": union_all, "union": union, "intersect": intersect, "combinations": combinations,
    # Python builtins the programs use, over DSL values only
    "len": _len, "set": _set, "list": _list, "all": _all, "any": _any, "min": _min, "max": _max, "sum": _sum,
}
"""Every function a program may call, by name."""

ENUMS: dict[str, type] = {"Color": Color, "Shape": Shape, "Size": Size, "Side": Side}
"""Enumerations a program may name; their members are reached as ``Color.BLACK``."""

CONSTANTS = ("all_boxes", "all_items")
"""The world constants bound for each run: the list of boxes and the list of all items."""

KEYWORDS = {"side", "side_a", "side_b", "key"}
"""The keyword arguments a call may pass."""

METHODS: dict[type, frozenset[str]] = {
    Box: frozenset({"all_items_in_box", "is_tower"}),
}
"""Methods a program may call on world objects (``x.all_items_in_box()``, ``x.box.is_tower()``)."""

FIELDS: dict[type, frozenset[str]] = {
    Item: frozenset({"box"}),
}
"""Fields a program may read on world objects (``x.box``)."""
