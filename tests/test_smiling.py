"""SMILING's cost against a hand computation; the score networks learn what they should."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from polyrl.plugins.control.smiling import (
    ScoreNet,
    SmilingConfig,
    SmilingReward,
    ddpm_alphas_cumprod,
    denoising_loss,
    smiling_cost,
    train_score_net,
)
from polyrl.types import ConfigError

torch.set_num_threads(1)


def test_smiling_cost_by_hand():
    x = torch.tensor([[1.0, 2.0], [0.0, -1.0]])
    alphas_cumprod = torch.tensor([0.64, 0.36])  # sqrt: 0.8 / 0.6, sqrt(1 - .): 0.6 / 0.8
    levels = torch.tensor([0, 1])
    noise = torch.tensor([[[0.5, -1.0], [1.0, 1.0]], [[1.0, 0.0], [0.0, 2.0]]])  # [K=2, N=2, D=2]
    expert = lambda xt, t: 0.5 * xt  # noqa: E731
    learner = lambda xt, t: t.float().unsqueeze(1).expand_as(xt)  # predicts t everywhere  # noqa: E731
    cost = smiling_cost(x, expert, learner, levels, noise, alphas_cumprod)

    # row 0, level 0: x_t = 0.8 [1, 2] + 0.6 [0.5, -1] = [1.1, 1.0]
    #   expert error mean([0.55 - 0.5]^2, [0.5 + 1]^2) = 1.12625; learner (predicts 0) mean(0.25, 1) = 0.625
    # row 0, level 1: x_t = 0.6 [1, 2] + 0.8 [1, 0] = [1.4, 1.2]
    #   expert error mean([0.7 - 1]^2, [0.6 - 0]^2) = 0.225; learner (predicts 1) mean(0, 1) = 0.5
    row0 = ((1.12625 - 0.625) + (0.225 - 0.5)) / 2
    # row 1, level 0: x_t = [0.6, -0.2], expert [0.3, -0.1]: mean(0.49, 1.21) = 0.85; learner mean(1, 1) = 1
    # row 1, level 1: x_t = [0, 1.0],   expert [0, 0.5]:   mean(0, 2.25) = 1.125; learner mean(1, 1) = 1
    row1 = ((0.85 - 1.0) + (1.125 - 1.0)) / 2
    assert cost.tolist() == pytest.approx([row0, row1], abs=1e-6)


def test_ddpm_schedule_is_linear_betas():
    ab = ddpm_alphas_cumprod(5000)
    betas = torch.linspace(1e-4, 0.02, 5000, dtype=torch.float64)
    assert ab[0].item() == pytest.approx(1 - 1e-4)
    assert ab[999].item() == pytest.approx(torch.prod(1 - betas[:1000]).item(), rel=1e-4)
    assert ab[-1].item() < 1e-10


def _pendulum_like(n: int, g: torch.Generator, upright: bool) -> torch.Tensor:
    if upright:  # near the top, slow: what a swing-up expert visits most
        th = (torch.rand(n, generator=g) - 0.5) * 0.6
        vel = 0.3 * torch.randn(n, generator=g)
    else:  # anywhere, fast
        th = (torch.rand(n, generator=g) - 0.5) * 2 * math.pi
        vel = 3 * torch.randn(n, generator=g)
    return torch.stack([th.cos(), th.sin(), vel], 1)


def _eval_loss(net, x, ab, levels) -> float:
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        return sum(denoising_loss(net, x, torch.full((x.shape[0],), int(t)), torch.randn(x.shape, generator=g), ab).item()
                   for t in levels) / len(levels)


def test_expert_score_net_reaches_low_denoising_loss_and_cost_ranks_states():
    g = torch.Generator().manual_seed(0)
    expert_data, other_data = _pendulum_like(512, g, True), _pendulum_like(512, g, False)
    ab = ddpm_alphas_cumprod(5000)
    levels = torch.arange(0, 5000, 250)
    torch.manual_seed(0)
    expert, learner = ScoreNet(3), ScoreNet(3)
    before = _eval_loss(expert, expert_data, ab, levels)
    train_score_net(expert, torch.optim.AdamW(expert.parameters(), lr=5e-3), expert_data, 80, 256, ab,
                    torch.Generator().manual_seed(1))
    after = _eval_loss(expert, expert_data, ab, levels)
    off = _eval_loss(expert, other_data, ab, levels)
    assert before > 0.5 and after < 0.1 and after < 0.2 * before, (before, after)
    assert off > 5 * after, (after, off)  # it learned *these* states, not denoising in general
    # with the learner fitted to the off-distribution states, expert-like states cost less
    train_score_net(learner, torch.optim.AdamW(learner.parameters(), lr=5e-3), other_data, 80, 256, ab,
                    torch.Generator().manual_seed(2))
    noise = torch.randn(levels.numel(), 512, 3, generator=g)
    cost_expert = smiling_cost(expert_data, expert, learner, levels, noise, ab)
    cost_other = smiling_cost(other_data, expert, learner, levels, noise, ab)
    assert cost_expert.mean() < 0 < cost_other.mean()
    assert (cost_expert.median() < cost_other.median()).item()


def _write_demos(path, n_episodes=2, length=20, obs_dim=3, action_dim=1, **overrides):
    rng = np.random.default_rng(0)
    n = n_episodes * length
    arrays = {
        "observations": rng.normal(size=(n, obs_dim)).astype(np.float32),
        "actions": rng.uniform(-2, 2, size=(n, action_dim)).astype(np.float32),
        "episode_lengths": np.full(n_episodes, length, dtype=np.int64),
        "rewards": rng.normal(size=n).astype(np.float32),
        "env_id": np.array("Pendulum-v1"),
    }
    arrays.update(overrides)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    np.savez(path, **arrays)
    return str(path)


def test_smiling_reward_standardises_scores_and_round_trips_its_state(tmp_path):
    demos = _write_demos(tmp_path / "d.npz")
    cfg = SmilingConfig(demos=demos, num_levels=10, expert_epochs=5, batch_size=16, learn_every=10, learn_samples=30)
    cfg.check()
    reward = SmilingReward(cfg)
    batch = {"observations": torch.randn(64, 3), "actions": torch.zeros(64, 1)}
    r = reward.score_transitions(batch)
    assert reward.expert_trained and r.shape == (64,)
    assert r.mean().item() == pytest.approx(0.0, abs=1e-5) and r.std().item() == pytest.approx(0.1, rel=1e-3)
    torch.save(reward.state_dict(), tmp_path / "r.pt")
    again = SmilingReward(cfg)
    again.load_state_dict(torch.load(tmp_path / "r.pt", weights_only=True))
    assert again.expert_trained
    torch.manual_seed(3)
    c1 = reward.cost(batch["observations"])
    torch.manual_seed(3)
    assert torch.equal(again.cost(batch["observations"]), c1)


def test_smiling_config_errors(tmp_path):
    demos = _write_demos(tmp_path / "d.npz")
    with pytest.raises(ConfigError, match="num_levels=300 must divide num_train_timesteps=5000; accepted: .*250"):
        SmilingConfig(demos=demos, num_levels=300).check()
    with pytest.raises(ConfigError, match="no such file.*polyrl.plugins.control.demos expert"):
        SmilingConfig(demos=str(tmp_path / "missing.npz")).check()
    with pytest.raises(ConfigError, match="5 episodes requested but the file holds 2"):
        SmilingConfig(demos=demos, demo_episodes=5).check()


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        ({"observations": np.zeros((40, 3), np.int64)}, "'observations' must be a float array [N, D], got int64 [40, 3]"),
        ({"actions": np.zeros((39, 1), np.float32)}, "'actions' must be a float array [N=40, A], got float32 [39, 1]"),
        ({"episode_lengths": np.array([20, 19])}, "'episode_lengths' must be positive and sum to N=40"),
        ({"episode_lengths": np.array([20.0, 20.0])}, "'episode_lengths' must be an integer array"),
        ({"actions": None}, "missing keys ['actions']"),
        ({"extra": np.zeros(3)}, "unknown keys ['extra']"),
        ({"env_id": np.array("Hopper-v5")}, "recorded on 'Hopper-v5' but the policy acts in 'Pendulum-v1'"),
        ({"observations": np.full((40, 3), np.nan, np.float32)}, "'observations' holds NaN"),
        ({"observations": np.zeros((40, 4), np.float32)}, "'observations' have 4 features but Pendulum-v1 has 3"),
        ({"rewards": np.zeros((40, 1), np.float32)}, "'rewards' must be a float"),
    ],
)
def test_demonstrations_are_validated_with_clear_errors(tmp_path, overrides, fragment):
    from polyrl.plugins.control.demonstrations import load_demos

    path = _write_demos(tmp_path / "d.npz", **overrides)
    with pytest.raises(ConfigError) as info:
        load_demos(path, env_id="Pendulum-v1", obs_dim=3, action_dim=1)
    assert fragment in str(info.value)


def test_pickled_demonstrations_are_refused(tmp_path):
    from polyrl.plugins.control.demonstrations import load_demos

    path = _write_demos(tmp_path / "d.npz", returns=np.array([{"a": 1}, {"b": 2}], dtype=object))
    with pytest.raises(ConfigError, match="cannot be read without pickle"):
        load_demos(path)


def test_demonstrations_keep_the_first_episodes(tmp_path):
    from polyrl.plugins.control.demonstrations import load_demos

    path = _write_demos(tmp_path / "d.npz", n_episodes=3, length=5)
    d = load_demos(path, episodes=2)
    assert d.num_episodes == 2 and d.observations.shape == (10, 3) and d.observations.dtype == torch.float32
    full = np.load(path)
    assert d.returns.tolist() == pytest.approx([full["rewards"][:5].sum(), full["rewards"][5:10].sum()], rel=1e-5)
