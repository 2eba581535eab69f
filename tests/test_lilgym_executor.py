"""The lilGym program executor: agreement with NLVR labels, DSL semantics, hostile programs."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

import polyrl
from polyrl.plugins.lilgym import dsl
from polyrl.plugins.lilgym.executor import (
    Limits,
    ProgramBudgetExceeded,
    ProgramError,
    ProgramRejected,
    compile_program,
    run_program,
)
from polyrl.plugins.lilgym.world import World

SHARED = Path(polyrl.__file__).resolve().parents[2] / "shared" / "data" / "lilgym"
FIXTURES = Path(__file__).parent / "fixtures" / "lilgym"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"lilGym data folder {SHARED} is absent")


def block(y: int, color: str = "Black") -> dict:
    return {"x_loc": 40, "y_loc": y, "type": "square", "color": color, "size": 20}


def item(x, y, kind="circle", color="Black", size=20) -> dict:
    return {"x_loc": x, "y_loc": y, "type": kind, "color": color, "size": size}


# ----------------------------------------------------------------------------- agreement with NLVR
@needs_shared
@pytest.mark.parametrize("name", ["tower_flipit_dev.json", "scatter_flipit_dev.json"])
def test_executor_returns_the_nlvr_label_of_every_flipit_dev_world(name):
    data = json.loads((SHARED / name).read_text())
    assert len(data) == {"tower_flipit_dev.json": 676, "scatter_flipit_dev.json": 313}[name]
    wrong = []
    for key, ex in data.items():
        value = run_program(ex["lf"], ex["structured_rep"])
        assert type(value) is bool
        if value != (ex["label"] == "true"):
            wrong.append(key)
    assert wrong == []


@needs_shared
def test_every_statement_program_is_accepted_by_the_whitelist():
    for name in sorted(SHARED.glob("*.json")):
        for key, ex in json.loads(name.read_text()).items():
            compile_program(ex["lf"])  # raises ProgramRejected for anything outside the DSL


def test_fixture_flipit_labels_and_scratch_values():
    for name in ("tower_flipit_dev.json", "scatter_flipit_dev.json"):
        for ex in json.loads((FIXTURES / name).read_text()).values():
            assert run_program(ex["lf"], ex["structured_rep"]) == (ex["label"] == "true")
    empty = [[], [], []]
    scratch = json.loads((FIXTURES / "tower_scratch_dev.json").read_text())
    assert [run_program(ex["lf"], empty) for ex in scratch.values()] == [False, False, True, False]


# ----------------------------------------------------------------------------- DSL semantics
def test_tower_relations_and_positions():
    world = World([[block(80, "Yellow"), block(59, "#0099ff"), block(38)], [block(80)], []])
    left = world.boxes[0]
    bottom, second, third = left.items
    assert left.is_tower() and dsl.is_bottom(bottom) and dsl.is_second(second) and dsl.is_third(third)
    assert dsl.is_top(third) and not dsl.is_top(second)
    assert dsl.get_above(bottom) == {second}  # in a tower "above" means directly on top
    assert dsl.get_box_all_above(bottom) == {second, third}
    assert dsl.get_below(third) == {second}
    assert dsl.get_touching(second) == {bottom, third}  # 1 pixel gap counts as touching
    assert run_program("count(filter_obj(all_boxes, lambda x: x.is_tower())) == 2", world)
    assert run_program("exist(filter_obj(all_items, lambda x: is_blue(x) and is_second(x)))", world)


def test_walls_corners_and_margins():
    world = World([[item(0, 0, size=10), item(83, 50, "square", size=10), item(50, 50)], [], []])
    corner, near_right, middle = world.boxes[0].items
    assert dsl.is_touching_wall(corner) and dsl.is_touching_corner(corner)
    assert dsl.is_touching_wall(corner, dsl.Side.TOP) and dsl.is_touching_wall(corner, dsl.Side.LEFT)
    assert not dsl.is_touching_wall(corner, dsl.Side.BOTTOM)
    assert not dsl.is_touching_wall(near_right) and not dsl.is_closely_touching_wall(near_right)
    assert not dsl.is_touching_wall(middle)
    closely = World([[item(87, 50, size=10)], [], []]).boxes[0].items[0]  # right edge at 97: within 4 px
    assert dsl.is_closely_touching_wall(closely, dsl.Side.RIGHT) and not dsl.is_touching_wall(closely)


def test_strict_types_and_python_semantics_are_kept():
    world = World([[item(10, 10, color="Yellow"), item(50, 50, color="Yellow")], [], []])
    assert run_program("count(get_set_colors(all_items)) == 1", world)  # distinct colours
    assert run_program("equal(query_color(all_boxes[0].all_items_in_box()[0]), Color.YELLOW)", world)  # [c] == c
    assert run_program("query_color(all_boxes[0].all_items_in_box()[0]) == Color.YELLOW", world) is False  # a list is not its element
    with pytest.raises(ProgramError, match="unique"):
        run_program("is_yellow(unique(all_items))", world)  # two items: not a singleton
    with pytest.raises(ProgramError, match="AND"):
        run_program("AND(count(all_items), True)", world)  # AND needs booleans
    with pytest.raises(ProgramError, match="ge"):
        run_program("ge(True, 1)", world)  # ge needs ints, not bools
    with pytest.raises(ProgramError, match="not a bool"):
        run_program("count(all_items)", world)
    assert run_program("all_boxes[0].all_items_in_box()[1].box.is_tower() == False", world)
    assert run_program("len(all_boxes[1:]) == 2 and count(all_boxes[0].all_items_in_box() + all_boxes[1].all_items_in_box()) == 2", world)
    assert run_program("exist(filter_obj(combinations(all_boxes, 2), lambda x: len(x[0]) == len(x[1])))", world)
    assert run_program("count(min(all_boxes, key=lambda x: count(x)).all_items_in_box()) == 0", world)


# ----------------------------------------------------------------------------- hostile programs
HOSTILE = [
    ("__import__('os').system('touch pwned')", "name '__import__' is not allowed"),
    ("import os", "not a single expression"),
    ("exec('print(1)')", "unknown name 'exec'"),
    ("eval('1')", "unknown name 'eval'"),
    ("open('/etc/passwd').read()", "unknown name 'open'"),
    ("all_items.__class__.__mro__", "'__class__' is not allowed"),
    ("().__class__.__bases__[0].__subclasses__()", "attribute '__class__' is not allowed"),
    ("count(all_items).__add__(1) == 1", "'__add__' is not allowed"),
    ("all_boxes[0].items", "attribute 'items' is not part of the world DSL"),
    ("exist(filter_obj(all_items, lambda x: x.color == Color.BLACK))", "attribute 'color' is not part of the world DSL"),
    ("filter_obj.__globals__", "'__globals__' is not allowed"),
    ("Color.BLACK.__class__", "'__class__' is not allowed"),
    ("Color.PURPLE == 1", "unknown member"),
    ("[x for x in all_items]", "ListComp is not allowed"),
    ("(lambda f: f(f))(lambda f: f(f))", "only DSL functions and DSL methods may be called"),
    ("'a' * 10 ** 9", "operator Mult is not allowed"),
    ("is_black('x')", "constant 'x' of type str is not allowed"),
    ("10 ** 10 ** 10 > 1", "operator Pow is not allowed"),
    ("count(all_items) == 99999999999", "out of range"),
    ("(x := 1)", "NamedExpr is not allowed"),
    ("exist(filter_obj(all_items, lambda x, y=print: y(x)))", "plain positional parameters"),
    ("f'{all_items}'", "JoinedStr is not allowed"),
    ("globals()", "unknown name 'globals'"),
    ("count(combinations(all_items, 12)) > 0", "literal k between 0 and 4"),
    ("count(combinations(combinations(all_items, 3), 3)) > 0", "combinations of combinations"),
    ("exist(filter_obj(all_items, lambda a: " * 5 + "True" + "))" * 5, "lambdas nested more than 4 deep"),
    ("not " * 200 + "True", "nested too deeply"),
    ("count(all_items) == 1 " + "and True " * 3000, "too long"),
]


@pytest.mark.parametrize("program, fragment", HOSTILE)
def test_hostile_programs_are_rejected_before_running(program, fragment, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    calls = []
    monkeypatch.setattr(dsl, "charge", lambda n: calls.append(n))  # any DSL work would be recorded
    with pytest.raises(ProgramRejected) as info:
        compile_program(program)
    assert fragment in str(info.value), str(info.value)
    assert calls == [] and not (tmp_path / "pwned").exists()


def test_huge_loops_within_the_grammar_are_stopped_by_the_budget():
    world = World([[item(x, y, size=10) for x in (0, 30, 60) for y in (0, 30, 60)] for _ in range(3)])  # 27 items
    deep = ("count(filter_obj(combinations(all_items, 4), lambda a: exist(filter_obj(all_items, lambda b: "
            "exist(filter_obj(all_items, lambda c: exist(filter_obj(all_items, lambda d: False)))))))) == 0")
    program = compile_program(deep)  # accepted: only the budget can tell
    start = time.perf_counter()
    with pytest.raises(ProgramBudgetExceeded, match="steps|time"):
        program.run(world, max_steps=200_000)
    assert time.perf_counter() - start < Limits.max_seconds + 1.0


def test_rejection_messages_name_the_construct_and_the_column():
    with pytest.raises(ProgramRejected) as info:
        compile_program("exist(filter_obj(all_items, lambda x: os.system(x)))")
    assert "unknown name 'os'" in str(info.value) and "column 39" in str(info.value)
    assert "filter_obj" in str(info.value)  # the accepted names are listed
