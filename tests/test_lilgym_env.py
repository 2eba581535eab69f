"""The lilGym environments: gymnasium API and registration, rules, actions, rendering, data."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

import gymnasium
from gymnasium.utils.env_checker import check_env

import polyrl
import polyrl.plugins.lilgym  # noqa: F401 - registers the environments
from polyrl.plugins.lilgym import actions as A
from polyrl.plugins.lilgym.data import (
    PINNED_SHA256,
    LilGymDataError,
    download,
    find_data_file,
    load_examples,
)
from polyrl.plugins.lilgym.env import MAX_SENTENCE_LENGTH, SENTENCE_CHARSET, LilGymEnv
from polyrl.plugins.lilgym.registration import ENV_IDS, TASK_NAMES
from polyrl.plugins.lilgym.render import draw_world, observe, pool2x2

SHARED = Path(polyrl.__file__).resolve().parents[2] / "shared" / "data" / "lilgym"
FIXTURES = Path(__file__).parent / "fixtures" / "lilgym"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"lilGym data folder {SHARED} is absent")


def block(y: int, color: str = "Black") -> dict:
    return {"x_loc": 40, "y_loc": y, "type": "square", "color": color, "size": 20}


def env_for(task: str, **kw) -> LilGymEnv:
    return LilGymEnv(task, "dev", data_dir=FIXTURES, **kw)


# ----------------------------------------------------------------------------- gymnasium API
@pytest.mark.parametrize("env_id", ENV_IDS)
def test_check_env_passes_for_every_task(env_id):
    env = gymnasium.make(env_id, split="dev", data_dir=str(FIXTURES), render_mode="rgb_array").unwrapped
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any checker warning fails the test
        check_env(env, skip_render_check=False)  # also renders every declared mode through the spec
    assert env.action_space.n == (13 if "Tower" in env_id else 2661)


def test_action_space_sizes_and_observation_space():
    assert env_for("TowerFlipIt").action_space.n == 13
    env = env_for("ScatterFlipIt")
    assert env.action_space.n == 2661
    obs, info = env.reset(seed=3)
    assert obs["image"].shape == (50, 190, 3) and obs["image"].dtype == np.uint8
    assert info["action_mask"].shape == (2661,) and info["action_mask"].dtype == np.int8
    assert env.observation_space.contains(obs)


def test_gymnasium_make_finds_the_environments_in_a_fresh_process():
    code = (
        "import gymnasium\n"
        f"env = gymnasium.make('polyrl.plugins.lilgym:polyrl/TowerFlipIt-v0', split='dev', data_dir={str(FIXTURES)!r})\n"
        "obs, info = env.reset(seed=0)\n"
        "print(env.action_space.n, obs['image'].shape, sorted(k for k in gymnasium.registry if k.startswith('polyrl/')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[0].startswith("13 (50, 190, 3)")
    for env_id in ENV_IDS:
        assert env_id in out.stdout


def test_reset_is_seeded_and_options_pick_an_example():
    env = env_for("TowerFlipIt")
    ids = [env.reset(seed=s)[1]["example_id"] for s in range(12)]
    assert ids == [env.reset(seed=s)[1]["example_id"] for s in range(12)]
    assert len(set(ids)) > 1
    obs, info = env.reset(options={"example_id": "f2-0"})
    assert info["example_id"] == "f2-0" and obs["target"] == 1  # label false -> target true
    with pytest.raises(ValueError, match="example_id 'nope' is not in TowerFlipIt/dev"):
        env.reset(options={"example_id": "nope"})
    with pytest.raises(ValueError, match="accepted: \\['example_id', 'example_index'\\]"):
        env.reset(options={"level": 3})


@needs_shared
def test_the_sentence_space_accepts_every_sentence():
    env = LilGymEnv("TowerScratch", "dev")
    for path in SHARED.glob("*.json"):
        for ex in json.loads(path.read_text()).values():
            assert env.observation_space["sentence"].contains(ex["sentence"]), ex["sentence"]
    assert len(SENTENCE_CHARSET) == 95 and MAX_SENTENCE_LENGTH == 320


# ----------------------------------------------------------------------------- rewards and rules
def test_stop_rewards_and_the_target_of_flipit():
    env = env_for("TowerFlipIt")
    env.reset(options={"example_id": "f1-0"})  # label true: the agent must make it false
    _, r, term, trunc, info = env.step(0)
    assert (r, term, trunc, info["success"]) == (-1.0, True, False, False)
    env.reset(options={"example_id": "f1-0"})
    _, r, term, trunc, info = env.step(A.encode("tower", A.Action("remove", box=0)))  # pops the yellow block
    assert (r, term, trunc) == (pytest.approx(-0.1), False, False) and info["program_value"] is False
    _, r, term, _, info = env.step(0)
    assert (r, term, info["success"]) == (1.0, True, True)


def test_invalid_action_gives_minus_one_and_truncates():
    env = env_for("TowerScratch")
    env.reset(options={"example_id": "t1"})
    remove_left = A.encode("tower", A.Action("remove", box=0))
    assert env.action_mask[remove_left] == 0
    obs, r, term, trunc, info = env.step(remove_left)
    assert (r, term, trunc, info["invalid"], info["success"]) == (-1.0, False, True, True, False)


def test_horizon_truncates_after_eleven_steps():
    env = env_for("TowerScratch")
    env.reset(options={"example_id": "t3"})  # "no black blocks": keep adding yellow, never stop
    adds = [A.encode("tower", A.Action("add", box=b, color=0)) for b in (0, 1, 2) for _ in range(4)]
    rewards = []
    for t, a in enumerate(adds[:11], 1):
        _, r, term, trunc, info = env.step(a)
        rewards.append(r)
        assert term is False and trunc is (t == 11)
    assert rewards == [pytest.approx(-0.1)] * 11 and info["success"] is False


def test_stop_forcing_turns_a_move_at_the_goal_into_stop():
    add_yellow = A.encode("tower", A.Action("add", box=1, color=0))
    env = env_for("TowerScratch", stop_forcing=True)
    env.reset(options={"example_id": "t3"})  # already true on the empty world
    _, r, term, trunc, info = env.step(add_yellow)
    assert (r, term, trunc, info["force_stop"], info["success"], info["success_no_sf"]) == (1.0, True, False, True, True, False)
    plain = env_for("TowerScratch")
    plain.reset(options={"example_id": "t3"})
    _, r, term, _, info = plain.step(add_yellow)
    assert (r, term, info["force_stop"]) == (pytest.approx(-0.1), False, False)


# ----------------------------------------------------------------------------- actions
def test_tower_actions_stack_and_pop():
    rep = [[], [], []]
    for color in (0, 1, 2, 0):
        assert A.is_valid("tower", rep, 1 + color)
        rep = A.apply("tower", rep, 1 + color)
    assert [o["y_loc"] for o in rep[0]] == [80, 59, 38, 17]
    assert all(o["x_loc"] == 40 and o["size"] == 20 and o["type"] == "square" for o in rep[0])
    assert [o["color"] for o in rep[0]] == ["Yellow", "Black", "#0099ff", "Yellow"]
    assert not A.is_valid("tower", rep, 1)  # a fifth block
    rep = A.apply("tower", rep, 10)
    assert [o["y_loc"] for o in rep[0]] == [80, 59, 38]
    assert A.valid_mask("tower", [[], [], []]).tolist() == [True] * 10 + [False] * 3


def test_action_indices_round_trip_and_text_form():
    for appearance in ("tower", "scatter"):
        for i in range(A.NUM_ACTIONS[appearance]):
            assert A.encode(appearance, A.decode(appearance, i)) == i
            assert A.parse_action(appearance, A.action_text(appearance, i)) == i
    assert A.decode("scatter", 1) == A.Action("add", x=0, y=0, shape=0, color=0, size=0)
    assert A.decode("scatter", 2565) == A.Action("add", x=18, y=4, shape=2, color=2, size=2)
    assert A.decode("scatter", 2660) == A.Action("remove", x=18, y=4)
    assert A.action_text("tower", 4) == "ADD MIDDLE YELLOW"
    assert A.parse_action("tower", "remove right\nextra") == 12
    for junk in ("", "ADD", "ADD LEFT PURPLE", "jump", "ADD 5 9 CIRCLE BLUE SMALL", "STOP NOW"):
        assert A.parse_action("scatter" if "5 9" in junk else "tower", junk) is None


def scatter_add(x, y, shape="circle", color="YELLOW", size="MEDIUM"):
    return A.encode("scatter", A.Action("add", x=x, y=y, shape=A.SHAPE_VALUES.index(shape),
                                        color=A.COLORS.index(color), size=A.SIZES.index(size)))


def test_scatter_validity_rules():
    empty = [[], [], []]
    mask = A.valid_mask("scatter", empty)
    for x in (5, 6, 12, 13):  # separator columns
        assert not mask[scatter_add(x, 0)] and not mask[A.encode("scatter", A.Action("remove", x=x, y=0))]
    assert mask[scatter_add(4, 4, size="MEDIUM")] and not mask[scatter_add(4, 0, size="LARGE")]
    assert not mask[scatter_add(0, 4, size="LARGE")] and mask[scatter_add(3, 3, size="LARGE")]
    assert mask[scatter_add(14, 0)] and mask[scatter_add(7, 2)]
    assert not mask[2566:].any()  # nothing to remove
    # 13 of 19 columns x 5 rows x 27 items, minus large items in each box's last row or column
    assert mask[1:2566].sum() == 15 * 5 * 27 - 3 * 9 * 9
    one = [[{"x_loc": 20, "y_loc": 20, "type": "square", "color": "Black", "size": 30}], [], []]
    mask = A.valid_mask("scatter", one)
    assert not mask[scatter_add(1, 1)] and not mask[scatter_add(2, 2, "triangle", size="SMALL")]
    assert mask[scatter_add(3, 3, "square", size="SMALL")]  # the square covers 20..50: 60..70 is free
    assert mask[A.encode("scatter", A.Action("remove", x=1, y=1))]
    assert not mask[A.encode("scatter", A.Action("remove", x=2, y=2))]


def test_scatter_add_sticks_to_a_close_item_and_remove_takes_it_back():
    rep = [[], [{"x_loc": 8, "y_loc": 0, "type": "square", "color": "Black", "size": 10}], []]
    a = scatter_add(8, 0, "square", "BLUE", "MEDIUM")  # middle box, x 20: 2 px right of the square's edge at 18
    assert A.is_valid("scatter", rep, a)
    rep = A.apply("scatter", rep, a)
    added = rep[1][-1]
    assert (added["x_loc"], added["y_loc"], added["color"]) == (18, 0, "#0099ff")  # moved to touch
    far = A.apply("scatter", rep, scatter_add(10, 3, "circle", "YELLOW", "SMALL"))
    assert far[1][-1]["x_loc"] == 60 and far[1][-1]["y_loc"] == 60  # nothing within 4 px: stays
    remove = A.encode("scatter", A.Action("remove", x=10, y=3))
    back = A.apply("scatter", far, remove, remove_rule="lilgym-2024")
    assert back == rep
    for rule in A.REMOVE_RULES:
        assert A.is_valid("scatter", far, remove, remove_rule=rule)
    # the paper-era code finds nothing to remove in the middle box: the world stays as it is
    assert A.apply("scatter", far, remove, remove_rule="lilgym-2023") == far


def _remove(x, y):
    return A.encode("scatter", A.Action("remove", x=x, y=y))


def test_scatter_remove_rules_differ_as_lilgym_releases_do():
    circle = {"x_loc": 30, "y_loc": 20, "type": "circle", "color": "Black", "size": 30}  # covers 30..60 x 20..50
    for box in range(3):
        rep = [[], [], []]
        rep[box] = [dict(circle)]
        x0 = [0, 7, 14][box]
        old = A.valid_mask("scatter", rep)  # the default is the paper-era rule set
        assert (old == A.valid_mask("scatter", rep, "lilgym-2023")).all()
        new = A.valid_mask("scatter", rep, "lilgym-2024")
        assert not old[_remove(x0 + 1, 1)] and not old[_remove(x0 + 2, 2)]  # no item starts at 20,20 or 40,40
        covered = {(x0 + cx, cy) for cx in (1, 2) for cy in (1, 2)}  # cells 20..60 x 20..60
        assert {(int(c) // 5, int(c) % 5) for c in np.flatnonzero(new[2566:])} == covered
        assert old[2566:].sum() == 0  # 30,20 is not a cell corner: nothing is removable in 2023
        gone = A.apply("scatter", rep, _remove(x0 + 2, 1), remove_rule="lilgym-2024")
        assert gone[box] == []
        assert not new[_remove(x0, 0)] and not new[_remove(x0 + 3, 3)]  # 60..80 x 60..80 is untouched
    # an item at a cell corner: REMOVE is valid under both; lilgym-2023 removes it only in the left box
    for box in range(3):
        rep = [[], [], []]
        rep[box] = [{"x_loc": 20, "y_loc": 40, "type": "square", "color": "Yellow", "size": 10}]
        x0 = [0, 7, 14][box]
        a = _remove(x0 + 1, 2)
        for rule in A.REMOVE_RULES:
            assert A.is_valid("scatter", rep, a, rule)
        assert A.apply("scatter", rep, a, "lilgym-2024")[box] == []
        assert A.apply("scatter", rep, a, "lilgym-2023")[box] == ([] if box == 0 else rep[box])
    with pytest.raises(ValueError, match="lilgym-2025.*lilgym-2023"):
        A.valid_mask("scatter", [[], [], []], "lilgym-2025")
    with pytest.raises(ValueError, match="remove_rule"):
        LilGymEnv("ScatterScratch", "dev", data_dir=FIXTURES, remove_rule="latest")


def test_scatter_sticky_add_matches_lilgyms_geometry():
    # expected placements computed with lilGym's own sticky code (shapely, image coordinates)
    ref = json.loads((FIXTURES / "scatter_sticky_add.json").read_text())
    assert len(ref["cases"]) == 100
    circles = 0
    for world_index, action, x_loc, y_loc in ref["cases"]:
        world = ref["worlds"][world_index]
        a = A.decode("scatter", action)
        box = A.scatter_box(a.x)
        assert A.is_valid("scatter", world, action)
        added = A.apply("scatter", world, action)[box][-1]
        assert (added["x_loc"], added["y_loc"]) == (x_loc, y_loc), A.action_text("scatter", action)
        circles += a.shape == 0
    assert circles >= 30


def test_circle_outline_has_exact_quadrant_vertices():
    s = A._Shape(0, 50, "circle", 10)  # centre 5, 55, radius 5
    assert s.pts[0] == (10.0, 55.0) and s.pts[16] == (5.0, 50.0) and s.pts[32] == (0.0, 55.0) and s.pts[48] == (5.0, 60.0)
    assert len(s.pts) == 64


# ----------------------------------------------------------------------------- rendering
def test_renderer_draws_boxes_separators_and_items():
    img = np.asarray(draw_world([[block(80, "Yellow")], [], [{"x_loc": 0, "y_loc": 0, "type": "circle", "color": "#0099ff", "size": 30}]]))
    assert img.shape == (100, 380, 3)
    assert tuple(img[50, 10]) == (211, 211, 211) and tuple(img[50, 120]) == (128, 128, 128)
    assert tuple(img[50, 260]) == (128, 128, 128) and tuple(img[50, 300]) == (211, 211, 211)
    assert tuple(img[90, 50]) == (250, 255, 0)  # the yellow block: x 40..59, y 80..99
    assert tuple(img[79, 50]) == (211, 211, 211) and tuple(img[90, 60]) == (211, 211, 211)
    assert tuple(img[15, 295]) == (15, 131, 255)  # circle centre in the right box
    assert tuple(img[0, 280]) == (211, 211, 211)  # outside the circle, in its bounding square
    tri = np.asarray(draw_world([[{"x_loc": 0, "y_loc": 0, "type": "triangle", "color": "Black", "size": 20}], [], []]))
    assert tuple(tri[18, 10]) == (0, 0, 0) and tuple(tri[10, 10]) == (0, 0, 0)
    assert tuple(tri[1, 1]) == (211, 211, 211) and tuple(tri[5, 2]) == (211, 211, 211)  # outside the slopes


def test_observation_is_the_floor_of_the_2x2_mean():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (100, 380, 3), dtype=np.uint8)
    expected = np.floor(img.reshape(50, 2, 190, 2, 3).mean(axis=(1, 3))).astype(np.uint8)
    assert (pool2x2(img) == expected).all()
    full, pooled = observe([[block(80)], [], []])
    assert pooled.shape == (50, 190, 3) and (pooled == pool2x2(full)).all()
    assert tuple(pooled[45, 25]) == (0, 0, 0)


# ----------------------------------------------------------------------------- data
def test_missing_data_gives_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("POLYRL_LILGYM_DATA", raising=False)
    monkeypatch.setattr("polyrl.plugins.lilgym.data.shared_dir", lambda: tmp_path / "no-shared")
    with pytest.raises(LilGymDataError) as info:
        find_data_file("tower", "flipit", "train", tmp_path)
    msg = str(info.value)
    assert "tower_flipit_train.json" in msg and "github.com/lil-lab/lilgym" in msg and "download" in msg
    assert str(tmp_path / "cache" / "polyrl" / "lilgym") in msg
    with pytest.raises(ValueError, match="split 'val' is not accepted; choose one of \\['train', 'dev', 'test'\\]"):
        find_data_file("tower", "flipit", "val")


def test_malformed_data_names_the_bad_entry(tmp_path):
    bad = {"x1": {"sentence": "s", "lf": "True", "label": "maybe", "structured_rep": [[], [], []]}}
    (tmp_path / "tower_flipit_dev.json").write_text(json.dumps(bad))
    with pytest.raises(LilGymDataError, match="\\['x1'\\].label: expected 'true' or 'false', got 'maybe'"):
        load_examples("tower", "flipit", "dev", tmp_path)
    bad["x1"]["label"] = "true"
    bad["x1"]["structured_rep"] = [[{"x_loc": 1, "y_loc": 2, "type": "star", "color": "Black", "size": 20}], [], []]
    (tmp_path / "tower_flipit_dev.json").write_text(json.dumps(bad))
    with pytest.raises(LilGymDataError, match="type: 'star' is not accepted"):
        load_examples("tower", "flipit", "dev", tmp_path)


def test_download_uses_the_cache_and_checks_sha256(tmp_path):
    source = tmp_path / "mirror"
    source.mkdir()
    payload = (FIXTURES / "tower_scratch_dev.json").read_bytes()
    (source / "tower_scratch_test.json").write_bytes(payload)
    url = source.as_uri() + "/"
    dest = tmp_path / "cache"
    [path] = download(["tower_scratch_test.json"], dest, base_url=url)
    assert path.read_bytes() == payload
    digest = hashlib.sha256(payload).hexdigest()
    assert (dest / "SHA256SUMS").read_text() == f"{digest}  tower_scratch_test.json\n"
    (source / "tower_scratch_test.json").write_bytes(payload + b" ")  # the mirror changes
    assert download(["tower_scratch_test.json"], dest, base_url=url)[0].read_bytes() == payload  # cached, verified
    with pytest.raises(LilGymDataError, match="does not match the expected"):
        download(["tower_scratch_test.json"], dest, base_url=url, force=True)
    assert path.read_bytes() == payload  # the bad download was not saved
    (source / "tower_scratch_dev.json").write_bytes(payload)  # a pinned name with other content
    with pytest.raises(LilGymDataError, match=f"expected {PINNED_SHA256['tower_scratch_dev.json']}"):
        download(["tower_scratch_dev.json"], dest, base_url=url)
    assert not (dest / "tower_scratch_dev.json").exists()
    with pytest.raises(LilGymDataError, match="could not be fetched"):
        download(["scatter_flipit_test.json"], dest, base_url=url)


@needs_shared
def test_shared_files_match_the_pinned_checksums_and_sizes():
    for name, digest in PINNED_SHA256.items():
        assert hashlib.sha256((SHARED / name).read_bytes()).hexdigest() == digest
    sizes = {(a, s, sp): len(load_examples(a, s, sp)) for a, s, sp in
             [("tower", "scratch", "train"), ("tower", "scratch", "dev"), ("scatter", "scratch", "train"),
              ("scatter", "scratch", "dev"), ("tower", "flipit", "dev"), ("scatter", "flipit", "dev")]}
    assert sizes == {("tower", "scratch", "train"): 989, ("tower", "scratch", "dev"): 163,
                     ("scatter", "scratch", "train"): 1241, ("scatter", "scratch", "dev"): 87,
                     ("tower", "flipit", "dev"): 676, ("scatter", "flipit", "dev"): 313}


def test_task_names_and_ids():
    assert TASK_NAMES == ("TowerScratch", "TowerFlipIt", "ScatterScratch", "ScatterFlipIt")
    assert all(i in gymnasium.registry for i in ENV_IDS)
