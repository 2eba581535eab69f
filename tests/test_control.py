"""Continuous-control components: the Gaussian policy, the gym sampler, SAC's losses and update."""

from __future__ import annotations

import math

import pytest
import torch
from torch import distributions as D

from polyrl.host import Host
from polyrl.plugins.control.policy import GaussianPolicy, GaussianPolicyConfig
from polyrl.plugins.control.sac import (
    ReplayBuffer,
    sac_actor_loss,
    sac_critic_loss,
    sac_temperature_loss,
)
from polyrl.plugins.control.sampler import GymSampler, GymSamplerConfig
from polyrl.types import ConfigError, Context

torch.set_num_threads(1)

PENDULUM = {
    "run": {"iterations": 2, "prompts_per_iteration": 2, "samples_per_prompt": 1, "output_dir": "runs/x", "cpu": True,
            "report": False, "progress": False},
    "prompts": {"items": ["Pendulum-v1"]},
    "policy": {"name": "gaussian", "env": "Pendulum-v1", "hidden_sizes": [32, 32]},
    "sampler": {"name": "gym", "max_episode_steps": 50},
    "rewards": {"env_reward": {"weight": 1.0}},
    "update": {"name": "sac", "batch_size": 32, "learning_starts": 128, "critic_hidden_sizes": [32, 32]},
    "optimizer": {"lr": 1e-3, "weight_decay": 0.0, "max_grad_norm": 0.0},
}


def ctx(n, env="Pendulum-v1"):
    return [Context(prompt=env, group=i) for i in range(n)]


def test_squashed_log_prob_matches_torch_distributions():
    torch.manual_seed(0)
    policy = GaussianPolicy(GaussianPolicyConfig(env="Pendulum-v1", hidden_sizes=[16]))
    obs = torch.randn(5, 3)
    mean, log_std = policy.dist_params(obs)
    u = mean + torch.randn_like(mean) * log_std.exp()
    ref = D.TransformedDistribution(D.Normal(mean, log_std.exp()), [D.TanhTransform()])
    expected = ref.log_prob(torch.tanh(u)).sum(-1)
    assert torch.allclose(policy.log_prob_raw(mean, log_std, u), expected, atol=1e-4)
    # unsquashed: a plain diagonal Gaussian with a state-independent std
    plain = GaussianPolicy(GaussianPolicyConfig(env="Pendulum-v1", hidden_sizes=[16], squash=False, std="parameter",
                                                init_log_std=-0.5))
    m2, s2 = plain.dist_params(obs)
    assert torch.allclose(s2, torch.full_like(s2, -0.5))
    assert torch.allclose(plain.log_prob_raw(m2, s2, u), D.Normal(m2, s2.exp()).log_prob(u).sum(-1), atol=1e-5)


def test_policy_maps_actions_onto_the_env_bounds_and_back():
    policy = GaussianPolicy(GaussianPolicyConfig(env="Pendulum-v1", hidden_sizes=[16]))  # bounds [-2, 2]
    a = torch.tensor([[-1.0], [0.0], [0.5], [1.0]])
    env_a = policy.to_env(a)
    assert env_a.flatten().tolist() == pytest.approx([-2.0, 0.0, 1.0, 2.0])
    assert torch.allclose(policy.from_env(env_a), a)
    assert torch.allclose(policy.raw_from_env(torch.tensor([[1.0]])), torch.atanh(torch.tensor([[0.5]])))


def test_sampler_rollout_shapes_rewards_and_reproducibility():
    policy = GaussianPolicy(GaussianPolicyConfig(env="Pendulum-v1", hidden_sizes=[16]))
    sampler = GymSampler(GymSamplerConfig(max_episode_steps=30))
    ro = sampler.sample(policy, ctx(3), torch.Generator().manual_seed(1))
    assert ro.log_probs.shape == ro.mask.shape == (3, 30) and ro.mask.all()
    assert ro.data["observations"].shape == (3, 30, 3) and ro.data["actions"].shape == (3, 30, 1)
    # next observation of a step is the observation of the following step
    assert torch.equal(ro.data["next_observations"][:, :-1], ro.data["observations"][:, 1:])
    assert not ro.data["terminations"].any()  # Pendulum only truncates
    assert (ro.data["actions"].abs() <= 2.0).all()
    assert torch.allclose(ro.outputs["episode_returns"], ro.outputs["env_rewards"].sum(1))
    # the policy recomputes the recorded log-probs exactly
    assert torch.allclose(policy(ro), ro.log_probs, atol=1e-4)
    out = policy(ro, steps=torch.tensor([[0, 5], [1, 2], [29, 0]]), with_entropy=True)
    assert out["log_probs"].shape == out["entropy"].shape == (3, 2)
    assert out["log_probs"][2, 0].item() == pytest.approx(ro.log_probs[2, 29].item(), abs=1e-4)
    again = sampler.sample(policy, ctx(3), torch.Generator().manual_seed(1))
    assert torch.equal(again.data["observations"], ro.data["observations"])
    other = sampler.sample(policy, ctx(3), torch.Generator().manual_seed(2))
    assert not torch.equal(other.data["observations"], ro.data["observations"])
    with pytest.raises(ConfigError, match="must be the policy's environment 'Pendulum-v1'"):
        sampler.sample(policy, ctx(1, "CartPole-v1"), torch.Generator())


def test_value_head_and_reparameterised_sample():
    policy = GaussianPolicy(GaussianPolicyConfig(env="Pendulum-v1", hidden_sizes=[16], value_head=True,
                                                 value_hidden_sizes=[8]))
    assert policy.has_value_head
    ro = GymSampler(GymSamplerConfig(max_episode_steps=5)).sample(policy, ctx(2), torch.Generator().manual_seed(0))
    out = policy(ro, with_values=True, with_entropy=True)
    assert out["values"].shape == (2, 5) and out["log_probs"].shape == (2, 5)
    noise = torch.randn(2, 5, 1)
    sample = policy(ro, noise=noise)
    assert sample["actions"].requires_grad and (sample["actions"].abs() <= 1).all()
    sample["log_probs"].sum().backward()
    assert policy.net[0].weight.grad is not None


def test_policy_save_and_load_round_trip(tmp_path):
    policy = GaussianPolicy(GaussianPolicyConfig(env="Pendulum-v1", hidden_sizes=[8, 8]))
    policy.save_pretrained(str(tmp_path / "p"))
    again = GaussianPolicy.from_pretrained(str(tmp_path / "p"))
    obs = torch.randn(4, 3)
    assert torch.equal(policy.act(obs, deterministic=True)["actions"], again.act(obs, deterministic=True)["actions"])
    with pytest.raises(ConfigError, match="not a saved gaussian policy"):
        GaussianPolicy.from_pretrained(str(tmp_path))


def test_sac_losses_by_hand():
    q1 = torch.tensor([1.0, 2.0], requires_grad=True)
    q2 = torch.tensor([1.5, 1.0], requires_grad=True)
    r = torch.tensor([0.5, -1.0])
    term = torch.tensor([0.0, 1.0])
    nq1, nq2 = torch.tensor([3.0, 4.0]), torch.tensor([2.0, 5.0])
    nlogp = torch.tensor([-1.0, 0.5])
    loss, target = sac_critic_loss(q1, q2, r, term, nq1, nq2, nlogp, alpha=0.2, gamma=0.9)
    # y0 = 0.5 + 0.9 * (min(3, 2) - 0.2 * -1) = 0.5 + 0.9 * 2.2 = 2.48; y1 = -1 (terminated)
    assert target.tolist() == pytest.approx([2.48, -1.0])
    expected = ((1 - 2.48) ** 2 + (2 + 1) ** 2) / 2 + ((1.5 - 2.48) ** 2 + (1 + 1) ** 2) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    logp = torch.tensor([-0.5, 0.3])
    assert sac_actor_loss(q1, q2, logp, 0.2).item() == pytest.approx(((0.2 * -0.5 - 1.0) + (0.2 * 0.3 - 1.0)) / 2)
    log_alpha = torch.tensor(math.log(0.2), requires_grad=True)
    t_loss = sac_temperature_loss(log_alpha, logp, target_entropy=-1.0)
    assert t_loss.item() == pytest.approx(0.2 * ((0.5 + 1) + (-0.3 + 1)) / 2, rel=1e-6)
    t_loss.backward()  # entropy (0.1) above the target (-1): alpha should fall, so the gradient is positive
    assert log_alpha.grad.item() > 0


def test_replay_buffer_wraps_and_round_trips_through_weights_only_load(tmp_path):
    buf = ReplayBuffer(5)
    for start in (0, 3):
        n = 3
        buf.add({"observations": torch.arange(start, start + n).float().unsqueeze(1).repeat(1, 2),
                 "actions": torch.zeros(n, 1), "next_observations": torch.zeros(n, 2), "rewards": torch.ones(n),
                 "terminations": torch.zeros(n)})
    assert buf.size == 5 and buf.pos == 1
    assert buf.data["observations"][:, 0].tolist() == [5.0, 1.0, 2.0, 3.0, 4.0]
    torch.save(buf.state_dict(), tmp_path / "b.pt")
    again = ReplayBuffer(1)
    again.load_state_dict(torch.load(tmp_path / "b.pt", weights_only=True))
    assert again.capacity == 5 and torch.equal(again.data["observations"], buf.data["observations"])


def test_config_errors_before_anything_is_built():
    host = Host()
    bad = [
        ({"prompts": {"items": ["CartPole-v1"]}}, ["prompts.items", "[Pendulum-v1]"]),
        ({"policy": {"name": "gaussian", "env": "Pendulm-v1"}}, ["'Pendulm-v1'", "did you mean 'Pendulum-v1'"]),
        ({"policy": {"name": "gaussian", "env": "CartPole-v1"}}, ["CartPole-v1", "1-D Box"]),
        ({"update": {"name": "sac", "learning_starts": 10, "batch_size": 32}}, ["learning_starts=10", "batch_size=32"]),
        ({"policy": {"name": "gaussian", "env": "Pendulum-v1", "squash": False}}, ["squash"]),
    ]
    for change, fragments in bad:
        data = {**PENDULUM, **change}
        with pytest.raises(ConfigError) as info:
            host.build_config(data)
        for f in fragments:
            assert f in str(info.value), (f, str(info.value))


def test_sac_learns_through_the_loop_and_resumes_exactly(tmp_path):
    """A few iterations of SAC on Pendulum; the checkpoint (weights-only loadable) resumes exactly."""
    from polyrl.checkpoint import load_checkpoint
    from polyrl.config import apply_overrides
    from polyrl.loop import train

    host = Host()
    run = tmp_path / "sac"
    cfg = host.build_config(apply_overrides(PENDULUM, [f"run.output_dir={run}", "run.iterations=3", "run.save_every=2"]))
    trainer = train(cfg, host)
    rows = [__import__("json").loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["gradient_steps"] for r in rows] == [0, 100, 100]  # 128 transitions to start, 100 per iteration
    assert all(math.isfinite(r["critic_loss"]) for r in rows[1:]) and rows[-1]["buffer_size"] == 300
    state = load_checkpoint(run / "checkpoints" / "iter_000003")["update"]
    assert state["buffer"]["size"] == 300 and "critic_target" in state and "log_alpha" in state
    # resume from iteration 2 reproduces iteration 3
    import shutil

    shutil.rmtree(run / "checkpoints" / "iter_000003")
    final = dict(trainer.policy.trainable_state_dict())
    cfg2 = host.build_config(apply_overrides(PENDULUM, [f"run.output_dir={run}", "run.iterations=3", "run.save_every=2"]))
    resumed = train(cfg2, host, resume=True)
    for k, v in resumed.policy.trainable_state_dict().items():
        assert torch.allclose(v, final[k], atol=1e-6), k


def test_gaussian_policy_serves_the_ppo_update(tmp_path):
    """The actor-critic contract (values, entropies) through the generic ppo update."""
    from polyrl.config import apply_overrides
    from polyrl.loop import train

    host = Host()
    if "ppo" not in host.registry["update"]:
        pytest.skip("no ppo update installed")
    data = apply_overrides(PENDULUM, [f"run.output_dir={tmp_path / 'ppo'}", "policy.value_head=true",
                                      "policy.squash=false", "policy.std=parameter"])
    data["update"] = {"name": "ppo", "kl_coef": 0.0, "kl_target": None, "gamma": 0.99, "train_batch_size": 1,
                      "inner_epochs": 2}
    trainer = train(host.build_config(data), host)
    rows = [__import__("json").loads(l) for l in (tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(math.isfinite(v) for r in rows for v in r.values() if isinstance(v, float))
    assert all(r["grad_norm"] > 0 for r in rows)
    with pytest.raises(ConfigError, match="update.kl_coef: 0"):
        trainer.policy.reference_log_probs(None)
