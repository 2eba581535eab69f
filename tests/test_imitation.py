"""Imitation end to end on Pendulum: SMILING, the discriminator baselines and BC through the loop."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from polyrl.checkpoint import load_checkpoint
from polyrl.config import apply_overrides, load_yaml
from polyrl.host import Host
from polyrl.loop import train
from polyrl.types import ConfigError
from polyrl.plugins.control.demonstrations import save_demos
from polyrl.plugins.control.demos import main as demos_main
from polyrl.plugins.control.demos import rollout_episodes
from polyrl.plugins.control.discriminator import (
    DiscriminatorConfig,
    DiscriminatorReward,
    ailboost_weights,
    discriminator_loss,
    gradient_penalty,
    reward_from_logits,
)
from polyrl.plugins.control.policy import GaussianPolicy, GaussianPolicyConfig

torch.set_num_threads(1)
ROOT = Path(__file__).parent.parent

SMALL = [
    "run.iterations=3", "run.save_every=2", "run.progress=false", "sampler.max_episode_steps=50",
    "policy.hidden_sizes=[32, 32]", "update.critic_hidden_sizes=[32, 32]", "update.batch_size=32",
    "update.learning_starts=100", "optimizer.lr=1e-3",
]


@pytest.fixture(scope="module")
def demos(tmp_path_factory):
    """Two 50-step episodes of an (untrained) policy: the file format is what matters here."""
    torch.manual_seed(0)
    policy = GaussianPolicy(GaussianPolicyConfig(env="Pendulum-v1", hidden_sizes=[16]))
    episodes = rollout_episodes(policy, 2, seed=0)
    episodes = [{k: v[:50] for k, v in e.items()} for e in episodes]
    return str(save_demos(tmp_path_factory.mktemp("demos") / "pendulum.npz", episodes, "Pendulum-v1"))


@pytest.fixture(scope="module")
def host():
    return Host()


def build(host, config, *overrides):
    return host.build_config(apply_overrides(load_yaml(ROOT / "configs" / config), list(overrides)))


def metrics(run: Path) -> list[dict]:
    return [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]


def test_smiling_pendulum_runs_through_the_loop_and_resumes_exactly(tmp_path, host, demos):
    run = tmp_path / "smiling"
    overrides = [*SMALL, f"run.output_dir={run}", f"rewards.smiling.demos={demos}", "rewards.smiling.demo_episodes=1",
                 "rewards.smiling.num_levels=10", "rewards.smiling.expert_epochs=20", "rewards.smiling.learn_every=100",
                 "rewards.smiling.learn_samples=150", "rewards.smiling.batch_size=64",
                 "rewards.smiling.hidden_dim=32"]
    trainer = train(build(host, "smiling_pendulum.yaml", *overrides), host)
    rows = metrics(run)
    assert [r["iteration"] for r in rows] == [1, 2, 3]
    assert rows[0]["reward_learn/smiling/expert_loss"] < 1.5
    assert all("reward_learn/smiling/learner_loss" in r for r in rows)  # 100 steps per iteration, learn_every 100
    assert [r["gradient_steps"] for r in rows] == [100, 100, 100]
    assert all(abs(r["reward/smiling"]) < 1e-3 for r in rows)  # standardised per rollout: sums to ~0
    assert all(r["reward/env_reward"] < 0 for r in rows)  # logged with weight 0
    for r in rows:  # the episode return on the expert = 1, random = 0 scale, logged with weight 0
        assert r["reward/normalised_return"] == pytest.approx((r["reward/env_reward"] + 1246.7) / (-155.0 + 1246.7), abs=1e-4)
    state = load_checkpoint(run / "checkpoints" / "iter_000003")  # torch.load(weights_only=True) inside
    assert state["rewards"]["smiling"]["expert_trained"] and state["rewards"]["smiling"]["rounds"] == 3
    assert state["update"]["buffer"]["size"] == 300

    # resume from iteration 2: same policy, same learner score network
    final_policy = trainer.policy.trainable_state_dict()
    final_learner = {k: v.clone() for k, v in trainer.rewards[0][2].learner.state_dict().items()}
    shutil.rmtree(run / "checkpoints" / "iter_000003")
    resumed = train(build(host, "smiling_pendulum.yaml", *overrides), host, resume=True)
    for k, v in resumed.policy.trainable_state_dict().items():
        assert torch.allclose(v, final_policy[k], atol=1e-6), k
    for k, v in resumed.rewards[0][2].learner.state_dict().items():
        assert torch.allclose(v, final_learner[k], atol=1e-6), k


@pytest.mark.parametrize("replay, form", [("uniform", "gail"), ("ailboost", "airl")])
def test_discriminator_pendulum_runs_through_the_loop(tmp_path, host, demos, replay, form):
    run = tmp_path / "dac"
    cfg = build(host, "dac_pendulum.yaml", *SMALL, "run.iterations=2", f"run.output_dir={run}",
                f"rewards.discriminator.demos={demos}", "rewards.discriminator.demo_episodes=0",
                f"rewards.discriminator.replay={replay}",
                f"rewards.discriminator.reward_form={form}", "rewards.discriminator.learn_every=100",
                "rewards.discriminator.learn_samples=128", "rewards.discriminator.batch_size=64")
    train(cfg, host)
    rows = metrics(run)
    assert all(r["reward_learn/discriminator/rounds"] == i for i, r in enumerate(rows, 1))
    assert all(np.isfinite(r["reward_learn/discriminator/grad_penalty"]) for r in rows)
    if form == "gail":
        assert all(r["reward/discriminator"] > 0 for r in rows)  # -log(1 - D) > 0


def test_bc_fits_the_demonstrated_actions(tmp_path, host, demos):
    run = tmp_path / "bc"
    small = [o for o in SMALL if not o.startswith("update.")]
    cfg = build(host, "bc_pendulum.yaml", *small, "run.iterations=3", f"run.output_dir={run}", f"update.demos={demos}",
                "update.demo_episodes=0", "update.steps_per_iteration=100", "update.loss=mse")
    trainer = train(cfg, host)
    rows = metrics(run)
    assert rows[-1]["bc_loss"] < 0.5 * rows[0]["bc_loss"]
    d = np.load(demos)
    policy = trainer.policy
    with torch.no_grad():
        pred = policy.act(torch.from_numpy(d["observations"]), deterministic=True)["env_actions"]
    err = (pred - torch.from_numpy(d["actions"])).pow(2).mean().item()
    assert err < 0.5 * float(np.mean(d["actions"] ** 2)), err


def test_discriminator_pieces_by_hand():
    ll, le = torch.tensor([0.0, 2.0]), torch.tensor([1.0])
    sp = lambda x: float(np.log1p(np.exp(x)))  # noqa: E731  softplus: BCE(f, 0) = softplus(f), BCE(f, 1) = softplus(-f)
    assert discriminator_loss(ll, le).item() == pytest.approx(0.5 * ((sp(0) + sp(2)) / 2 + sp(-1)), rel=1e-6)
    w = torch.tensor([3.0, 4.0])  # linear f(x) = w.x: the gradient norm is 5 everywhere
    gp = gradient_penalty(lambda x: x @ w, torch.randn(4, 2), torch.randn(4, 2), torch.rand(4, 1))
    assert gp.item() == pytest.approx((5 - 1) ** 2)
    logits = torch.tensor([-1.0, 0.0, 3.0])
    d = torch.sigmoid(logits)
    assert torch.allclose(reward_from_logits(logits, "gail"), -torch.log(1 - d), atol=1e-5)
    assert torch.equal(reward_from_logits(logits, "airl"), logits)


def test_ailboost_weights_discount_older_rounds():
    rounds = torch.tensor([0, 0, 1, 2, 2, 2, 2])
    w = ailboost_weights(rounds, current_round=2, alpha=0.5)
    # mixture: round 0: (1 - .5)^2 = .25, round 1: .5 * .5 = .25, round 2: .5; shared within each round
    assert w.tolist() == pytest.approx([0.125, 0.125, 0.25, 0.125, 0.125, 0.125, 0.125])
    assert w.sum().item() == pytest.approx(1.0)
    assert ailboost_weights(torch.tensor([0, 0]), 0, 0.1).tolist() == pytest.approx([0.5, 0.5])


def test_discriminator_reward_separates_expert_from_learner(demos):
    cfg = DiscriminatorConfig(demos=demos, learn_every=50, learn_samples=256, batch_size=64, learn_epochs=20)
    reward = DiscriminatorReward(cfg)
    expert = reward.expert_data
    far = expert + torch.tensor([0.0, 0.0, 6.0])  # the same angles, much faster: not what the expert does
    from types import SimpleNamespace

    from polyrl.types import Context, Rollout

    ro = Rollout(contexts=[Context("Pendulum-v1")], log_probs=torch.zeros(1, far.shape[0]),
                 mask=torch.ones(1, far.shape[0], dtype=torch.bool),
                 data={"observations": far.unsqueeze(0), "actions": torch.zeros(1, far.shape[0], 1)})
    reward.learn(SimpleNamespace(generator=lambda purpose: torch.Generator().manual_seed(0), accelerator=None), ro)
    r_exp = reward.score_transitions({"observations": expert, "actions": torch.zeros(expert.shape[0], 1)})
    r_far = reward.score_transitions({"observations": far, "actions": torch.zeros(far.shape[0], 1)})
    assert r_exp.mean() > r_far.mean() + 0.5


def test_demos_command_checks_files(tmp_path, demos, capsys):
    assert demos_main(["check", demos, "--env", "Pendulum-v1"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["episodes"] == 2 and info["steps"] == 100 and info["obs_dim"] == 3
    bad = tmp_path / "bad.npz"
    np.savez(bad, observations=np.zeros((10, 3), np.float32), actions=np.zeros((10, 1), np.float32),
             episode_lengths=np.array([4, 4]))
    proc = subprocess.run([sys.executable, "-m", "polyrl.plugins.control.demos", "check", str(bad)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "'episode_lengths' must be positive and sum to N=10" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_normalised_return_needs_two_different_returns(host, demos):
    with pytest.raises(ConfigError, match=r"expert_return and random_return are both 5.0"):
        build(host, "smiling_pendulum.yaml", f"rewards.smiling.demos={demos}", "rewards.smiling.demo_episodes=1",
              "rewards.normalised_return.expert_return=5.0",
              "rewards.normalised_return.random_return=5.0")
