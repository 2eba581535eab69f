"""A safe executor for lilGym's statement programs.

The programs are Python expressions (``exist(filter_obj(all_items, lambda x: is_black(x)))``).
They are data, so they are never handed to ``eval``: :func:`compile_program` parses the text with
:func:`ast.parse` and checks every node against a whitelist bound to the world DSL
(:mod:`.dsl`): only calls of DSL functions, lambdas, names that are DSL functions, enumerations,
the world constants or lambda parameters, reads of the DSL's own fields and methods
(``x.box``, ``x.all_items_in_box()``, ``Color.BLACK``), integer and boolean constants,
comparisons, ``and``/``or``/``not``, small arithmetic, list/set/tuple displays and constant
subscripts. Anything else (imports, ``__dunder__`` access, attribute access outside the DSL,
comprehensions, strings, unknown names, oversized programs) is rejected with
:class:`ProgramRejected` *before* anything runs.

An accepted program is turned into a tree of closures and run on a :class:`~.world.World` with a
step budget and a time limit (:class:`ProgramBudgetExceeded`). Errors that the DSL itself raises
on a world (``unique`` of a set that is not a singleton, ``AND`` of a non-boolean) are reported as
:class:`ProgramError`.
"""

from __future__ import annotations

import ast
import functools
import operator
import time
from typing import Any, Callable

from . import dsl
from .world import World

__all__ = [
    "ProgramRejected",
    "ProgramError",
    "ProgramBudgetExceeded",
    "Program",
    "compile_program",
    "run_program",
    "Limits",
]


class ProgramRejected(ValueError):
    """The program is not in the accepted subset of the world DSL; nothing of it was run."""


class ProgramError(RuntimeError):
    """The program failed on this world (a DSL type or value error)."""


class ProgramBudgetExceeded(ProgramError):
    """The program used more steps or time than allowed and was stopped."""


class Limits:
    """Static and run-time limits of the executor."""

    max_chars = 4000
    """Longest accepted program text."""
    max_nodes = 1500
    """Most AST nodes in a program."""
    max_depth = 60
    """Deepest nesting of AST nodes."""
    max_int = 1000
    """Largest absolute integer constant."""
    max_display = 32
    """Most elements in a list, set or tuple display."""
    max_lambda_depth = 4
    """Deepest nesting of lambdas (each level can loop over every item; the data needs 3)."""
    max_combination_size = 4
    """``combinations(s, k)`` needs a literal ``k`` of at most this, and no ``combinations`` inside ``s``."""
    max_steps = 2_000_000
    """Steps (node evaluations, lambda calls and elements touched by DSL functions) per run."""
    max_seconds = 2.0
    """Wall-clock limit per run."""
    max_value_size = 100_000
    """Most elements (counted through every level, a shared part once per use) in one value the
    program builds. ``==``, ``in`` and hashing walk a value inside C, between two budget ticks, so a
    value that nests shared tuples could otherwise cost 2**depth steps in one comparison."""


_COMPARE = {
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
    ast.In: lambda a, b: a in b,
    ast.NotIn: lambda a, b: a not in b,
}
_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mod: operator.mod}
_ATTRIBUTES = {name for names in dsl.METHODS.values() for name in names} | {
    name for names in dsl.FIELDS.values() for name in names
}


class _Budget:
    __slots__ = ("steps", "max_steps", "deadline", "next_clock", "sizes", "keep")

    def __init__(self, max_steps: int, seconds: float) -> None:
        self.steps = 0
        self.max_steps = max_steps
        self.deadline = time.perf_counter() + seconds
        self.next_clock = 4096
        self.sizes: dict[int, int] = {}  # id of a container built in this run -> its expanded size
        self.keep: list[Any] = []  # those containers, alive while their ids are in ``sizes``

    def sized(self, value: Any) -> Any:
        """``value``, after checking that its expanded size is within ``Limits.max_value_size``
        (memoised per container, so the check costs the container's own length, not its expansion)."""
        self._size(value)
        return value

    def _size(self, value: Any) -> int:
        if not isinstance(value, (tuple, list, set, frozenset)):
            return 1
        known = self.sizes.get(id(value))
        if known is not None:
            return known
        total = 1
        for v in value:
            total += self._size(v)
            if total > Limits.max_value_size:
                raise ProgramBudgetExceeded(
                    f"program stopped: it builds a value of more than {Limits.max_value_size} elements"
                )
        self.sizes[id(value)] = total
        self.keep.append(value)
        return total

    def tick(self, n: int = 1) -> None:
        self.steps += n
        if self.steps > self.max_steps:
            raise ProgramBudgetExceeded(f"program stopped: more than {self.max_steps} steps")
        if self.steps >= self.next_clock:
            self.next_clock = self.steps + 4096
            if time.perf_counter() > self.deadline:
                raise ProgramBudgetExceeded("program stopped: time limit exceeded")


Env = dict  # lambda parameters and world constants by name
Node = Callable[[Env, _Budget], Any]


def _reject(node: ast.AST | None, message: str) -> ProgramRejected:
    where = f" (column {node.col_offset + 1})" if node is not None and hasattr(node, "col_offset") else ""
    return ProgramRejected(f"{message}{where}")


class _Compiler:
    """Checks the AST against the whitelist and turns it into closures in one pass."""

    def __init__(self) -> None:
        self.nodes = 0
        self.lambda_depth = 0

    def compile(self, node: ast.AST, scope: frozenset[str], depth: int) -> Node:
        self.nodes += 1
        if self.nodes > Limits.max_nodes:
            raise _reject(node, f"program too large: more than {Limits.max_nodes} syntax nodes")
        if depth > Limits.max_depth:
            raise _reject(node, f"program nested too deeply: more than {Limits.max_depth} levels")
        method = getattr(self, f"_{type(node).__name__}", None)
        if method is None:
            raise _reject(node, f"{type(node).__name__} is not allowed in a world program; allowed are DSL calls, "
                                "lambdas, names, comparisons, and/or/not, + - %, integer constants, displays and "
                                "constant subscripts")
        return method(node, scope, depth + 1)

    # ------------------------------------------------------------------ leaves
    def _Constant(self, node: ast.Constant, scope, depth) -> Node:
        v = node.value
        if type(v) is bool or v is None:
            return lambda env, b: v
        if type(v) is int:
            if abs(v) > Limits.max_int:
                raise _reject(node, f"integer constant {v} is out of range (|n| <= {Limits.max_int})")
            return lambda env, b: v
        raise _reject(node, f"constant {v!r} of type {type(v).__name__} is not allowed; only integers and booleans")

    def _Name(self, node: ast.Name, scope, depth) -> Node:
        name = node.id
        if not isinstance(node.ctx, ast.Load):
            raise _reject(node, f"assignment to {name!r} is not allowed")
        if name.startswith("_"):
            raise _reject(node, f"name {name!r} is not allowed (names starting with '_' are never accepted)")
        if name in scope or name in dsl.CONSTANTS:
            return lambda env, b: env[name]
        if name in dsl.FUNCTIONS:
            fn = dsl.FUNCTIONS[name]
            return lambda env, b: fn
        if name in dsl.ENUMS:
            raise _reject(node, f"the enumeration {name!r} may only be used as {name}.MEMBER")
        raise _reject(node, f"unknown name {name!r}: not part of the world DSL; accepted names are the DSL functions "
                            f"({', '.join(sorted(dsl.FUNCTIONS))}), the enumerations {sorted(dsl.ENUMS)}, the constants "
                            f"{list(dsl.CONSTANTS)} and lambda parameters")

    def _Attribute(self, node: ast.Attribute, scope, depth) -> Node:
        attr = node.attr
        base = node.value
        value = None
        if not (isinstance(base, ast.Name) and base.id in dsl.ENUMS and base.id not in scope):
            value = self.compile(base, scope, depth)  # problems inside are reported first
        if attr.startswith("_"):
            raise _reject(node, f"attribute {attr!r} is not allowed (no access to underscore or dunder attributes)")
        if value is None:
            assert isinstance(base, ast.Name)
            enum = dsl.ENUMS[base.id]
            if attr not in enum.__members__:
                raise _reject(node, f"{base.id}.{attr}: unknown member; accepted: {sorted(enum.__members__)}")
            member = enum[attr]
            return lambda env, b: member
        if attr not in _ATTRIBUTES:
            raise _reject(node, f"attribute {attr!r} is not part of the world DSL; accepted: {sorted(_ATTRIBUTES)}")

        def get(env, b):
            obj = value(env, b)
            kind = type(obj)
            if attr in dsl.FIELDS.get(kind, ()):
                return getattr(obj, attr)
            if attr in dsl.METHODS.get(kind, ()):
                return getattr(obj, attr)
            raise TypeError(f"{kind.__name__} has no attribute {attr!r} in the world DSL")

        return get

    # ------------------------------------------------------------------ calls and lambdas
    def _Call(self, node: ast.Call, scope, depth) -> Node:
        if not isinstance(node.func, (ast.Name, ast.Attribute)):
            raise _reject(node, "only DSL functions and DSL methods may be called")
        if isinstance(node.func, ast.Name) and node.func.id not in scope and node.func.id not in dsl.FUNCTIONS:
            self._Name(node.func, scope, depth)  # raises the unknown-name error
        if isinstance(node.func, ast.Name) and node.func.id == "combinations" and node.func.id not in scope:
            self._check_combinations(node)
        func = self.compile(node.func, scope, depth)
        args = []
        for a in node.args:
            if isinstance(a, ast.Starred):
                raise _reject(a, "*args is not allowed")
            args.append(self.compile(a, scope, depth))
        kwargs = []
        for k in node.keywords:
            if k.arg is None:
                raise _reject(k.value, "**kwargs is not allowed")
            if k.arg not in dsl.KEYWORDS:
                raise _reject(k.value, f"keyword argument {k.arg!r} is not allowed; accepted: {sorted(dsl.KEYWORDS)}")
            kwargs.append((k.arg, self.compile(k.value, scope, depth)))

        def call(env, b):
            b.tick()
            fn = func(env, b)
            if not callable(fn):
                raise TypeError(f"{type(fn).__name__} is not callable")
            return b.sized(fn(*[a(env, b) for a in args], **{k: v(env, b) for k, v in kwargs}))

        return call

    def _check_combinations(self, node: ast.Call) -> None:
        k_max = Limits.max_combination_size
        if len(node.args) != 2 or node.keywords:
            raise _reject(node, "combinations takes two positional arguments: combinations(items, k)")
        k = node.args[1]
        if not (isinstance(k, ast.Constant) and type(k.value) is int and 0 <= k.value <= k_max):
            raise _reject(node, f"combinations(items, k) needs a literal k between 0 and {k_max}")
        for inner in ast.walk(node.args[0]):
            if isinstance(inner, ast.Call) and isinstance(inner.func, ast.Name) and inner.func.id == "combinations":
                raise _reject(inner, "combinations of combinations is not allowed (the result would be huge)")

    def _Lambda(self, node: ast.Lambda, scope, depth) -> Node:
        a = node.args
        if a.vararg or a.kwarg or a.kwonlyargs or a.defaults or a.kw_defaults or getattr(a, "posonlyargs", []):
            raise _reject(node, "lambdas may only take plain positional parameters")
        params = [p.arg for p in a.args]
        for p in params:
            if p.startswith("_") or p in dsl.CONSTANTS or p in dsl.ENUMS:
                raise _reject(node, f"lambda parameter {p!r} is not allowed")
        self.lambda_depth += 1
        if self.lambda_depth > Limits.max_lambda_depth:
            raise _reject(node, f"lambdas nested more than {Limits.max_lambda_depth} deep (each level loops over a set)")
        body = self.compile(node.body, scope | frozenset(params), depth)
        self.lambda_depth -= 1

        def make(env, b):
            def fn(*values):
                if len(values) != len(params):
                    raise TypeError(f"lambda takes {len(params)} arguments, got {len(values)}")
                b.tick()
                inner = dict(env)
                inner.update(zip(params, values))
                return body(inner, b)

            return fn

        return make

    # ------------------------------------------------------------------ operators
    def _BoolOp(self, node: ast.BoolOp, scope, depth) -> Node:
        values = [self.compile(v, scope, depth) for v in node.values]
        if isinstance(node.op, ast.And):
            def run_and(env, b):
                result = True
                for v in values:
                    result = v(env, b)
                    if not result:
                        return result
                return result

            return run_and

        def run_or(env, b):
            result = False
            for v in values:
                result = v(env, b)
                if result:
                    return result
            return result

        return run_or

    def _UnaryOp(self, node: ast.UnaryOp, scope, depth) -> Node:
        operand = self.compile(node.operand, scope, depth)
        if isinstance(node.op, ast.Not):
            return lambda env, b: not operand(env, b)
        if isinstance(node.op, ast.USub):
            def neg(env, b):
                v = operand(env, b)
                if type(v) is not int:
                    raise TypeError("unary minus needs an integer")
                return -v

            return neg
        raise _reject(node, f"unary operator {type(node.op).__name__} is not allowed; accepted: not, -")

    def _BinOp(self, node: ast.BinOp, scope, depth) -> Node:
        op = _BINARY.get(type(node.op))
        if op is None:
            raise _reject(node, f"operator {type(node.op).__name__} is not allowed; accepted: + - %")
        left, right = self.compile(node.left, scope, depth), self.compile(node.right, scope, depth)

        concat = isinstance(node.op, ast.Add)

        def binop(env, b):
            x, y = left(env, b), right(env, b)
            if concat and type(x) is type(y) and type(x) in (list, tuple):  # joining two item lists
                b.tick(len(x) + len(y))
                return b.sized(x + y)
            if type(x) not in (int, bool) or type(y) not in (int, bool):
                raise TypeError(f"arithmetic needs integers (or + of two lists), got {type(x).__name__} and {type(y).__name__}")
            return op(x, y)

        return binop

    def _Compare(self, node: ast.Compare, scope, depth) -> Node:
        ops = []
        for o in node.ops:
            fn = _COMPARE.get(type(o))
            if fn is None:
                raise _reject(node, f"comparison {type(o).__name__} is not allowed; accepted: == != < <= > >= in, not in")
            ops.append(fn)
        left = self.compile(node.left, scope, depth)
        rights = [self.compile(c, scope, depth) for c in node.comparators]

        def compare(env, b):
            x = left(env, b)
            for fn, r in zip(ops, rights):
                y = r(env, b)
                if not fn(x, y):
                    return False
                x = y
            return True

        return compare

    # ------------------------------------------------------------------ displays and subscripts
    def _display(self, node, elts, scope, depth, build) -> Node:
        if len(elts) > Limits.max_display:
            raise _reject(node, f"display with {len(elts)} elements; at most {Limits.max_display}")
        parts = []
        for e in elts:
            if isinstance(e, ast.Starred):
                raise _reject(e, "*unpacking is not allowed")
            parts.append(self.compile(e, scope, depth))
        return lambda env, b: b.sized(build(p(env, b) for p in parts))

    def _List(self, node, scope, depth) -> Node:
        return self._display(node, node.elts, scope, depth, list)

    def _Tuple(self, node, scope, depth) -> Node:
        return self._display(node, node.elts, scope, depth, tuple)

    def _Set(self, node, scope, depth) -> Node:
        return self._display(node, node.elts, scope, depth, set)

    def _int_literal(self, node: ast.AST | None) -> int | None:
        if node is None:
            return None
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            v = self._int_literal(node.operand)
            return None if v is None else -v
        if isinstance(node, ast.Constant) and type(node.value) is int and abs(node.value) <= Limits.max_int:
            return node.value
        raise _reject(node, "subscripts must be integer constants or slices of integer constants")

    def _Subscript(self, node: ast.Subscript, scope, depth) -> Node:
        value = self.compile(node.value, scope, depth)
        s = node.slice
        if isinstance(s, ast.Slice):
            if s.step is not None:
                raise _reject(node, "slice steps are not allowed")
            key: Any = slice(self._int_literal(s.lower), self._int_literal(s.upper))
        else:
            key = self._int_literal(s)

        def subscript(env, b):
            v = value(env, b)
            if not isinstance(v, (list, tuple, dsl.Box)):
                raise TypeError(f"{type(v).__name__} cannot be subscripted in the world DSL")
            return v[key]

        return subscript


class Program:
    """A checked, compiled program: call :meth:`run` on a world."""

    def __init__(self, source: str, root: Node) -> None:
        self.source = source
        self._root = root

    def __repr__(self) -> str:
        return f"Program({self.source!r})"

    def run(self, world: World, max_steps: int | None = None, max_seconds: float | None = None) -> Any:
        """The program's value on ``world`` (lilGym's programs give a bool).

        Raises :class:`ProgramError` when the DSL fails on this world and
        :class:`ProgramBudgetExceeded` when the budget runs out.
        """
        budget = _Budget(max_steps or Limits.max_steps, max_seconds or Limits.max_seconds)
        env = {"all_boxes": world.all_boxes(), "all_items": world.all_items()}
        token = dsl.BUDGET.set(budget)
        try:
            return self._root(env, budget)
        except ProgramError:
            raise
        except RecursionError as e:
            raise ProgramBudgetExceeded("program stopped: recursion too deep") from e
        except (TypeError, ValueError, AttributeError, KeyError, IndexError, ZeroDivisionError, OverflowError) as e:
            raise ProgramError(f"{type(e).__name__}: {e}") from e
        finally:
            dsl.BUDGET.reset(token)

    def evaluate(self, world: World) -> bool:
        """The program's boolean value; :class:`ProgramError` if it is not a bool."""
        value = self.run(world)
        if type(value) is not bool:
            raise ProgramError(f"the program returned {type(value).__name__}, not a bool")
        return value


@functools.lru_cache(maxsize=8192)
def compile_program(source: str) -> Program:
    """Parse and check ``source``; raises :class:`ProgramRejected` (naming the construct) if it is
    outside the world DSL. Nothing of the program runs here."""
    if not isinstance(source, str):
        raise ProgramRejected(f"a program must be a string, got {type(source).__name__}")
    text = source.strip()
    if not text:
        raise ProgramRejected("empty program")
    if len(text) > Limits.max_chars:
        raise ProgramRejected(f"program too long: {len(text)} characters, at most {Limits.max_chars}")
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        raise ProgramRejected(f"not a single expression of the world DSL: {type(e).__name__}: {e}") from None
    root = _Compiler().compile(tree.body, frozenset(), 0)
    return Program(text, root)


def run_program(source: str, world: World | list) -> bool:
    """Compile (cached) and evaluate ``source`` on ``world`` (a :class:`World` or a structured
    representation)."""
    if not isinstance(world, World):
        world = World(world)
    return compile_program(source).evaluate(world)
