"""The shape_match reward: a pixel detector of the tiny world's colour, shape and position."""

import importlib.util

import pytest
import torch

from polyrl import Context, Rollout
from polyrl.paths import REPO_ROOT
from polyrl.rewards.shape_match import (
    COLOURS, POSITIONS, SHAPES, ShapeMatch, ShapeMatchConfig, detect, parse_caption, shape_match_scores,
)
from polyrl.types import ConfigError


@pytest.fixture(scope="module")
def world():
    spec = importlib.util.spec_from_file_location("make_tiny_world", REPO_ROOT / "scripts" / "make_tiny_world.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def renders(world):
    """Three fresh ground-truth renders of each of the 100 captions."""
    images, labels = world.make_images(world.COMBOS, 3, seed=4321)
    return images.float() / 255, [world.caption(*world.COMBOS[i]) for i in labels], labels


def test_world_definitions_agree_with_the_renderer(world):
    assert COLOURS == world.COLOURS and tuple(SHAPES) == tuple(world.SHAPES) and POSITIONS == world.POSITIONS
    for combo in world.COMBOS:
        assert parse_caption(world.caption(*combo)) == combo


def test_ground_truth_renders_of_all_100_captions_score_one(world, renders):
    images, captions, labels = renders
    assert len(set(captions)) == 100
    scores = shape_match_scores(images, captions)
    assert scores.shape == (300,)
    assert torch.equal(scores, torch.ones(300)), [captions[i] for i in (scores < 1).nonzero().flatten()[:5]]
    found = detect(images[0])
    assert (found["colour"], found["shape"], found["position"]) == world.COMBOS[labels[0]]


def test_shuffled_captions_score_near_chance(renders):
    images, captions, _ = renders
    perm = torch.randperm(len(captions), generator=torch.Generator().manual_seed(0))
    scores = shape_match_scores(images, [captions[i] for i in perm])
    chance = (1 / 5 + 1 / 4 + 1 / 5) / 3  # colour, shape, position by chance
    assert abs(scores.mean().item() - chance) < 0.06
    assert set((scores * 3).round().tolist()) <= {0.0, 1.0, 2.0, 3.0}


def test_blank_image_matches_nothing_and_one_wrong_attribute_costs_a_third(renders):
    blank = torch.full((1, 3, 64, 64), 0.9)
    assert shape_match_scores(blank, ["a red circle on the left"]).item() == 0.0
    images, captions, _ = renders
    colour, shape, position = parse_caption(captions[0])
    other = next(c for c in COLOURS if c != colour)
    phrase = {v: k for k, v in {"on the left": "left", "on the right": "right", "at the top": "top",
                                "at the bottom": "bottom", "in the center": "center"}.items()}[position]
    assert shape_match_scores(images[:1], [f"a {other} {shape} {phrase}"]).item() == pytest.approx(2 / 3)


def test_stray_specks_are_not_the_object(renders):
    images, captions, _ = renders
    specked = images[:6].clone()
    specked[:, :, 1:3, 60:62] = torch.tensor([0.1, 0.1, 0.1]).view(1, 3, 1, 1)  # a dark 2x2 speck in a corner
    specked[:, :, 55:56, 3:4] = torch.tensor([0.9, 0.1, 0.1]).view(1, 3, 1, 1)  # a red pixel
    assert torch.equal(shape_match_scores(specked, captions[:6]), torch.ones(6))


def test_reward_component_on_a_rollout_and_a_subset_of_attributes(renders):
    images, captions, _ = renders
    ctx = [Context(prompt=c) for c in captions[:4]]
    rollout = Rollout(ctx, torch.zeros(4, 1), torch.ones(4, 1, dtype=torch.bool), outputs={"images": images[:4]})
    assert torch.equal(ShapeMatch()(rollout), torch.ones(4))
    assert torch.equal(ShapeMatch(ShapeMatchConfig(attributes=["shape"]))(rollout), torch.ones(4))
    # the same images at 128 pixels: the anchors and sizes scale with the image
    big = torch.nn.functional.interpolate(images[:4], scale_factor=2, mode="nearest")
    assert torch.equal(shape_match_scores(big, captions[:4]), torch.ones(4))


def test_bad_settings_and_captions_are_refused():
    with pytest.raises(ConfigError, match="attributes"):
        ShapeMatchConfig(attributes=["size"]).check()
    with pytest.raises(ConfigError, match="triangle_roundness"):
        ShapeMatchConfig(triangle_roundness=0.9).check()
    with pytest.raises(ValueError, match="cannot read the caption 'a cat'"):
        parse_caption("a cat")


def test_registered_as_an_image_reward():
    from polyrl.host import Host

    spec = Host().spec("reward", "shape_match", "rewards.shape_match.name")
    assert spec.reads == ("images",) and spec.config_cls is ShapeMatchConfig
