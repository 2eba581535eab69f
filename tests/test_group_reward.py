"""Tests of the pairwise win-rate group reward (Pref-GRPO's reward) over pointwise rewards and
pairwise judges, built through the reward registry from a run config."""

from __future__ import annotations

import itertools

import pytest
import torch

from polyrl import ConfigError, Context, Rollout
from polyrl.config import field_docs, from_dict
from polyrl.host import Host
from polyrl.rewards.group import PairwiseJudge, PairwiseWinRate, PairwiseWinRateConfig, win_rates
from polyrl.rewards.jpeg import JpegCompressibility, JpegConfig


def image_rollout(images: torch.Tensor, groups: list[int]) -> Rollout:
    b = len(groups)
    return Rollout(contexts=[Context(f"prompt {g}", g) for g in groups], log_probs=torch.zeros(b, 1),
                   mask=torch.ones(b, 1, dtype=torch.bool), outputs={"images": images})


def brute_force(scores: list[float], groups: list[int], margin: float = 0.0) -> list[float]:
    """Pref-GRPO's counting: every pair of a group compared once, 1 to the winner, 0.5 each on a tie."""
    wins = [0.0] * len(scores)
    count = [0] * len(scores)
    for i, j in itertools.combinations(range(len(scores)), 2):
        if groups[i] != groups[j]:
            continue
        count[i] += 1
        count[j] += 1
        if abs(scores[i] - scores[j]) <= margin:
            wins[i] += 0.5
            wins[j] += 0.5
        elif scores[i] > scores[j]:
            wins[i] += 1
        else:
            wins[j] += 1
    return [w / c if c else 0.5 for w, c in zip(wins, count)]


def test_win_rates_match_pairwise_counting():
    g = torch.Generator().manual_seed(0)
    groups = [3, 3, 3, 3, 7, 7, 7, 7, 7, 1]  # groups of 4 and 5, and one sample alone
    scores = torch.randint(0, 4, (10,), generator=g).float()  # ties happen
    torch.testing.assert_close(win_rates(scores, groups), torch.tensor(brute_force(scores.tolist(), groups)))
    noisy = scores + 0.3 * torch.rand(10, generator=g)
    torch.testing.assert_close(win_rates(noisy, groups, tie_margin=0.2),
                               torch.tensor(brute_force(noisy.tolist(), groups, 0.2)))
    s = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 0.0])
    out = win_rates(s, [0, 0, 0, 1, 1, 1])
    torch.testing.assert_close(out, torch.tensor([0.0, 0.5, 1.0, 0.75, 0.75, 0.0]))
    # the scale of the scores does not matter, only their order within each group
    torch.testing.assert_close(win_rates(100 * s - 7, [0, 0, 0, 1, 1, 1]), out)
    # the mean win rate of a group is 0.5
    assert torch.allclose(out.view(2, 3).mean(1), torch.tensor(0.5))


def test_tie_margin_counts_close_scores_as_half():
    s = torch.tensor([1.0, 1.05, 2.0])
    torch.testing.assert_close(win_rates(s, [0, 0, 0], tie_margin=0.1), torch.tensor([0.25, 0.25, 1.0]))
    torch.testing.assert_close(win_rates(s, [0, 0, 0], tie_margin=0.1),
                               torch.tensor(brute_force(s.tolist(), [0, 0, 0], 0.1)))


def test_wraps_a_registered_pointwise_reward_from_a_run_config():
    """The wrapped reward is named in the config and built through the registry, as the host
    builds any reward; the result is the win rate of its scores."""
    host = Host()
    cfg = host.build_config({
        "prompts": {"items": ["a red circle"]},
        "policy": {"name": "diffusion", "pretrained": "assets/tiny-sd"},
        "sampler": {"name": "ddim"},
        "update": {"name": "ddpo"},
        "rewards": {"preference": {"name": "pairwise_win_rate", "reward": "jpeg_compressibility", "weight": 1.0}},
    })
    (key, weight, reward), = host.build_rewards(cfg, policy=None)
    assert key == "preference" and isinstance(reward, PairwiseWinRate)
    assert isinstance(reward.inner, JpegCompressibility) and reward.reads == "images"
    g = torch.Generator().manual_seed(0)
    flat = torch.full((3, 3, 32, 32), 0.5)
    noisy = torch.rand(3, 3, 32, 32, generator=g)
    images = torch.cat([flat[:1], noisy[:1], noisy[1:2] * 0.5, flat[1:], noisy[2:]])  # two groups of 3
    groups = [0, 0, 0, 1, 1, 1]
    rollout = image_rollout(images, groups)
    scores = reward.inner(rollout)
    out = reward(rollout)
    torch.testing.assert_close(out, torch.tensor(brute_force(scores.tolist(), groups)))
    assert out[0] == 1.0  # the flat image compresses best in its group


def test_config_errors_name_the_wrapped_reward():
    with pytest.raises(ConfigError, match="unknown reward 'jpeg_compresibility' .did you mean 'jpeg_compressibility'"):
        from_dict(PairwiseWinRateConfig, {"reward": "jpeg_compresibility"}, "rewards.pref")
    with pytest.raises(ConfigError, match=r"pairwise_win_rate.params.qualty: unknown key .did you mean 'quality'"):
        from_dict(PairwiseWinRateConfig, {"reward": "jpeg_compressibility", "params": {"qualty": 3}}, "rewards.pref")
    with pytest.raises(ConfigError, match="no 'weight'"):
        from_dict(PairwiseWinRateConfig, {"reward": "clip_score", "params": {"weight": 1.0}}, "rewards.pref")
    with pytest.raises(ConfigError, match="cannot wrap itself"):
        from_dict(PairwiseWinRateConfig, {"reward": "pairwise_win_rate"}, "rewards.pref")
    with pytest.raises(ConfigError, match="tie_margin must be >= 0"):
        from_dict(PairwiseWinRateConfig, {"tie_margin": -1.0}, "rewards.pref")
    with pytest.raises(ConfigError, match="plugin module 'no_such_plugin_module' could not be imported"):
        from_dict(PairwiseWinRateConfig, {"plugins": ["no_such_plugin_module"]}, "rewards.pref")
    cfg = from_dict(PairwiseWinRateConfig, {"reward": "clip_score", "params": {"scale": 2.5}}, "rewards.pref")
    assert cfg.inner.scale == 2.5  # the wrapped reward's settings are checked with its own config class
    assert set(field_docs(PairwiseWinRateConfig)) == {"reward", "params", "tie_margin", "plugins", "inner"}


class Brightness(PairwiseJudge):
    """A pairwise judge: prefers the brighter image, undecided within 0.01 of mean brightness."""

    reads = "images"

    def compare(self, rollout, first, second):
        b = rollout.outputs["images"].mean(dim=(1, 2, 3))
        d = b[first] - b[second]
        return torch.where(d.abs() <= 0.01, torch.full_like(d, 0.5), (d > 0).float())


def test_pairwise_judge_verdicts_become_win_rates():
    levels = torch.tensor([0.2, 0.8, 0.5, 0.505, 0.9, 0.1, 0.3])
    images = levels.view(-1, 1, 1, 1).expand(-1, 3, 8, 8).clone()
    groups = [0, 0, 0, 0, 1, 1, 2]
    reward = PairwiseWinRate(PairwiseWinRateConfig(reward="judge"), inner=Brightness())
    out = reward(image_rollout(images, groups))
    torch.testing.assert_close(out, torch.tensor(brute_force(levels.tolist(), groups, 0.01)))
    with pytest.raises(TypeError, match="pairwise judge"):
        Brightness()(image_rollout(images, groups))


def test_missing_output_is_a_clear_error():
    reward = PairwiseWinRate(PairwiseWinRateConfig(reward="jpeg_compressibility"), inner=JpegCompressibility(JpegConfig()))
    text = Rollout(contexts=[Context("p", 0)] * 2, log_probs=torch.zeros(2, 1), mask=torch.ones(2, 1, dtype=torch.bool),
                   outputs={"texts": ["a", "b"]})
    with pytest.raises(ValueError, match="reads 'images', which this rollout lacks"):
        reward(text)
