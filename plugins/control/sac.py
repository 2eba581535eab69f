"""SAC: soft actor-critic with a learned temperature (Haarnoja et al., 2018), off-policy.

Each iteration the update stores the rollout's valid transitions in its replay buffer and, once
the buffer holds ``learning_starts`` transitions, takes ``updates_per_step`` gradient steps per
new transition. One gradient step on a batch ``(s, a, r, s', d)`` drawn uniformly from the buffer:

    a' ~ pi(.|s'),  y = r + gamma (1 - d) (min_j Q'_j(s', a') - alpha log pi(a'|s'))
    critic loss = sum_j mean (Q_j(s, a) - y)^2                         (critics' own Adam)
    a~ ~ pi(.|s) (reparameterised),  actor loss = mean(alpha log pi(a~|s) - min_j Q_j(s, a~))
                                                        (the policy, through trainer.model and
                                                         trainer.optimizer_step: the run's AdamW)
    temperature loss = mean(alpha (-log pi(a~|s) - H_target)),  H_target = -|A| (its own Adam)
    Q'_j <- tau Q_j + (1 - tau) Q'_j every ``target_update_frequency`` steps

``d`` is a *termination*: a time-limit truncation bootstraps. Rewards are the ones the loop
composed for the rollout (``replay_rewards: stored``) or, for learned rewards that change as they
train (SMILING, discriminators), recomputed for every replay batch from the configured rewards
(``replay_rewards: recompute``): the weighted sum of each reward's ``score_transitions`` on the batch.

The buffer, critics, target critics, temperature and both optimizers are this update's state
(``state_dict``: tensors, numbers and optimizer states only). On several processes each keeps
its own buffer and the critics' and temperature's gradients are averaged, so that all processes
hold the same networks; the actor's gradients are synchronised by the prepared model.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from polyrl.types import ConfigError, Context, Rollout, Update

from .nets import average_gradients, mlp, seeded


@dataclass
class SACConfig:
    """Settings of the SAC update (defaults from SMILING's SAC where CPU allows; see each field)."""

    gamma: float = 0.99
    """Discount factor."""
    tau: float = 0.005
    """Polyak averaging rate of the target critics."""
    batch_size: int = 256
    """Transitions per gradient step (SMILING: 1024; smaller for CPU)."""
    critic_hidden_sizes: list[int] = field(default_factory=lambda: [256, 256])
    """Hidden widths of each of the two Q networks (SMILING: 1024, 1024; smaller for CPU)."""
    critic_lr: float = 1e-4
    """Adam learning rate of the critics (the actor's comes from the ``optimizer`` section)."""
    alpha_lr: float = 1e-4
    """Adam learning rate of the log-temperature."""
    init_temperature: float = 0.1
    """Initial entropy temperature alpha."""
    learn_temperature: bool = True
    """Adapt alpha towards the target entropy (False: alpha stays at ``init_temperature``)."""
    target_entropy: float | None = None
    """Target policy entropy (null: minus the number of action dimensions)."""
    buffer_size: int = 200_000
    """Replay capacity in transitions (the oldest are overwritten)."""
    learning_starts: int = 5000
    """No gradient steps until the buffer holds this many transitions (SMILING's seed steps: 5000)."""
    updates_per_step: float = 1.0
    """Gradient steps per new environment step (the update-to-data ratio)."""
    actor_update_frequency: int = 1
    """Update the actor and temperature every this many critic steps."""
    target_update_frequency: int = 2
    """Update the target critics every this many critic steps."""
    critic_max_grad_norm: float = 0.0
    """Clip the critics' gradient norm to this (<= 0: no clipping)."""
    replay_rewards: Literal["stored", "recompute"] = "stored"
    """``stored``: the rewards the loop composed when the transition was sampled (environment rewards).
    ``recompute``: score each replay batch again with the configured rewards (learned rewards, which
    change as they train); every reward with a non-zero weight must provide ``score_transitions``."""

    def check(self) -> None:
        for name in ("batch_size", "buffer_size", "actor_update_frequency", "target_update_frequency"):
            if getattr(self, name) < 1:
                raise ConfigError(f"update.{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.gamma <= 1:
            raise ConfigError(f"update.gamma must be in [0, 1], got {self.gamma}")
        if not 0 < self.tau <= 1:
            raise ConfigError(f"update.tau must be in (0, 1], got {self.tau}")
        if self.init_temperature <= 0:
            raise ConfigError(f"update.init_temperature must be > 0, got {self.init_temperature}")
        if self.updates_per_step <= 0:
            raise ConfigError(f"update.updates_per_step must be > 0, got {self.updates_per_step}")
        if self.learning_starts < self.batch_size:
            raise ConfigError(
                f"update.learning_starts={self.learning_starts} must be >= update.batch_size={self.batch_size}"
            )
        if not self.critic_hidden_sizes or any(h < 1 for h in self.critic_hidden_sizes):
            raise ConfigError(f"update.critic_hidden_sizes must be positive widths, got {self.critic_hidden_sizes}")


# ---------------------------------------------------------------------------- the losses
def sac_critic_loss(q1: torch.Tensor, q2: torch.Tensor, rewards: torch.Tensor, terminations: torch.Tensor,
                    next_q1: torch.Tensor, next_q2: torch.Tensor, next_log_probs: torch.Tensor,
                    alpha: float, gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft Bellman loss of the twin critics; every argument is ``[N]``. ``next_q*`` are the
    target critics at ``(s', a')`` with ``a' ~ pi(.|s')``. Returns the loss and the target ``y``."""
    soft_v = torch.minimum(next_q1, next_q2) - alpha * next_log_probs
    target = (rewards + gamma * (1.0 - terminations.float()) * soft_v).detach()
    return F.mse_loss(q1, target) + F.mse_loss(q2, target), target


def sac_actor_loss(q1: torch.Tensor, q2: torch.Tensor, log_probs: torch.Tensor, alpha: float) -> torch.Tensor:
    """``mean(alpha log pi(a|s) - min(Q1, Q2)(s, a))`` for reparameterised ``a`` (all ``[N]``)."""
    return (alpha * log_probs - torch.minimum(q1, q2)).mean()


def sac_temperature_loss(log_alpha: torch.Tensor, log_probs: torch.Tensor, target_entropy: float) -> torch.Tensor:
    """``mean(alpha (-log pi - H_target))``: its gradient raises alpha when the entropy is below target."""
    return (log_alpha.exp() * (-log_probs.detach() - target_entropy)).mean()


class TwinQ(nn.Module):
    """Two Q networks ``Q_j(s, a)`` on the concatenation of state and action (in ``[-1, 1]``)."""

    def __init__(self, obs_dim: int, action_dim: int, hidden: list[int]) -> None:
        super().__init__()
        self.q1 = mlp(obs_dim + action_dim, hidden, 1)
        self.q2 = mlp(obs_dim + action_dim, hidden, 1)

    def forward(self, obs: torch.Tensor, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.cat([obs, actions], dim=-1)
        return self.q1(x).squeeze(-1), self.q2(x).squeeze(-1)


class ReplayBuffer:
    """A ring buffer of transitions, preallocated on the first ``add``."""

    KEYS = ("observations", "actions", "next_observations", "rewards", "terminations")

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.data: dict[str, torch.Tensor] = {}
        self.pos = 0
        self.size = 0

    def add(self, batch: Mapping[str, torch.Tensor]) -> None:
        n = next(iter(batch.values())).shape[0]
        if not self.data:
            self.data = {k: torch.zeros((self.capacity, *batch[k].shape[1:]), dtype=torch.float32) for k in self.KEYS}
        if n > self.capacity:
            batch = {k: v[-self.capacity:] for k, v in batch.items()}
            n = self.capacity
        idx = (torch.arange(n) + self.pos) % self.capacity
        for k in self.KEYS:
            self.data[k][idx] = batch[k].float().cpu()
        self.pos = (self.pos + n) % self.capacity
        self.size = min(self.size + n, self.capacity)

    def sample(self, n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        idx = torch.randint(0, self.size, (n,), generator=generator)
        return {k: v[idx] for k, v in self.data.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"capacity": self.capacity, "pos": self.pos, "size": self.size,
                "data": {k: v[: self.size].clone() for k, v in self.data.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.capacity, self.pos, self.size = int(state["capacity"]), int(state["pos"]), int(state["size"])
        self.data = {}
        for k, v in state["data"].items():
            full = torch.zeros((self.capacity, *v.shape[1:]), dtype=torch.float32)
            full[: v.shape[0]] = v
            self.data[k] = full


def transitions_of(rollout: Rollout, rewards: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The valid steps of an environment rollout as flat ``[N, ...]`` transitions."""
    m = rollout.mask.cpu().bool()
    out = {
        "observations": rollout.data["observations"].cpu()[m],
        "actions": rollout.data["actions"].cpu()[m],
        "next_observations": rollout.data["next_observations"].cpu()[m],
        "terminations": rollout.data["terminations"].cpu()[m].float(),
    }
    if rewards is not None:
        r = rewards.detach().cpu().float()
        if r.dim() != 2:
            raise ValueError(f"sac needs per-step rewards [B, T] (environment or transition rewards), got {tuple(r.shape)}")
        out["rewards"] = r[m]
    return out


def replay_rewards(trainer, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The weighted sum of the configured rewards' ``score_transitions`` on a batch (``[N]``)."""
    total = torch.zeros(batch["observations"].shape[0])
    for name, weight, fn in trainer.rewards:
        if weight == 0:
            continue
        score = getattr(fn, "score_transitions", None)
        if score is None:
            raise ConfigError(
                f"update.replay_rewards=recompute: reward {name!r} cannot score replayed transitions "
                f"(it has no score_transitions); use learned transition rewards (smiling, discriminator) "
                f"with non-zero weight only, give {name!r} weight 0 (it is then only logged), "
                f"or set update.replay_rewards: stored"
            )
        total = total + weight * score(batch).detach().float().cpu()
    return total


class SAC(Update):
    def __init__(self, cfg: SACConfig) -> None:
        self.cfg = cfg
        self.buffer = ReplayBuffer(cfg.buffer_size)
        self.critic: TwinQ | None = None
        self.critic_target: TwinQ | None = None
        self.log_alpha: torch.Tensor | None = None
        self.critic_opt: torch.optim.Optimizer | None = None
        self.alpha_opt: torch.optim.Optimizer | None = None
        self.grad_steps = 0
        self.env_steps = 0
        self.update_debt = 0.0
        self._pending: Mapping[str, Any] | None = None
        self._contexts: list[Context] = []

    # ------------------------------------------------------------------ set-up
    def _build(self, trainer) -> None:
        if self.critic is not None:
            return
        from polyrl.loop import derive_seed

        policy = trainer.policy
        device = policy.device
        with seeded(derive_seed(trainer.config.run.seed, "sac-critics")):  # the same on every process
            self.critic = TwinQ(policy.obs_dim, policy.action_dim, self.cfg.critic_hidden_sizes).to(device)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.log_alpha = torch.tensor(math.log(self.cfg.init_temperature), device=device, requires_grad=True)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=self.cfg.critic_lr, foreach=True)
        self.alpha_opt = torch.optim.Adam([self.log_alpha], lr=self.cfg.alpha_lr)
        self.target_entropy = (-float(policy.action_dim) if self.cfg.target_entropy is None
                               else float(self.cfg.target_entropy))
        if self._pending is not None:
            self._load(self._pending)
            self._pending = None

    def _batch_rollout(self, obs: torch.Tensor) -> Rollout:
        n = obs.shape[0]
        if len(self._contexts) < n:
            self._contexts = [Context(prompt="") for _ in range(n)]
        return Rollout(contexts=self._contexts[:n], log_probs=torch.zeros(n, 1), mask=torch.ones(n, 1, dtype=torch.bool),
                       data={"observations": obs.unsqueeze(1)})

    # ------------------------------------------------------------------ the update
    def step(self, trainer, rollout: Rollout, rewards: torch.Tensor) -> dict[str, float]:
        cfg = self.cfg
        self._build(trainer)
        new = transitions_of(rollout, rewards)
        n_new = int(new["observations"].shape[0])
        self.buffer.add(new)
        self.env_steps += n_new
        metrics: dict[str, float] = {"buffer_size": float(self.buffer.size), "env_steps": float(self.env_steps)}
        if self.buffer.size < cfg.learning_starts:
            metrics["gradient_steps"] = 0.0
            return metrics
        self.update_debt += cfg.updates_per_step * n_new
        n_updates = int(self.update_debt)
        self.update_debt -= n_updates
        g = trainer.generator("sac")
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        for _ in range(n_updates):
            for k, v in self._gradient_step(trainer, g).items():
                sums[k] = sums.get(k, 0.0) + v
                counts[k] = counts.get(k, 0) + 1
        metrics.update({k: sums[k] / counts[k] for k in sums})
        metrics["gradient_steps"] = float(n_updates)
        metrics["alpha"] = float(self.log_alpha.detach().exp())
        return metrics

    def _gradient_step(self, trainer, g: torch.Generator) -> dict[str, float]:
        cfg = self.cfg
        policy = trainer.policy
        device = policy.device
        batch = self.buffer.sample(cfg.batch_size, g)
        if cfg.replay_rewards == "recompute":
            with torch.no_grad():
                r = replay_rewards(trainer, batch)
        else:
            r = batch["rewards"]
        obs, nxt = batch["observations"].to(device), batch["next_observations"].to(device)
        act = policy.from_env(batch["actions"].to(device))
        r, term = r.to(device), batch["terminations"].to(device)
        alpha = float(self.log_alpha.detach().exp())
        stats: dict[str, float] = {}

        # critics
        with torch.no_grad():
            mean, log_std = policy.dist_params(nxt)
            u = mean + torch.randn(mean.shape, generator=g).to(device) * log_std.exp()
            next_logp = policy.log_prob_raw(mean, log_std, u)
            tq1, tq2 = self.critic_target(nxt, policy.squash_fn(u))
        q1, q2 = self.critic(obs, act)
        critic_loss, target = sac_critic_loss(q1, q2, r, term, tq1, tq2, next_logp, alpha, cfg.gamma)
        self.critic_opt.zero_grad(set_to_none=True)
        critic_loss.backward()
        average_gradients(trainer.accelerator, self.critic.parameters())
        if cfg.critic_max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.critic.parameters(), cfg.critic_max_grad_norm)
        self.critic_opt.step()
        self.grad_steps += 1
        stats.update(critic_loss=critic_loss.item(), q_mean=q1.mean().item(), target_mean=target.mean().item(),
                     batch_reward_mean=r.mean().item(), batch_reward_std=r.std(unbiased=False).item())

        # actor and temperature
        if self.grad_steps % cfg.actor_update_frequency == 0:
            noise = torch.randn(obs.shape[0], 1, policy.action_dim, generator=g)
            self.critic.requires_grad_(False)
            try:
                out = trainer.model(self._batch_rollout(obs), noise=noise)
                a_pi, logp = out["actions"].squeeze(1), out["log_probs"].squeeze(1)
                pq1, pq2 = self.critic(obs, a_pi)
                actor_loss = sac_actor_loss(pq1, pq2, logp, alpha)
                trainer.backward(actor_loss)
                stats["actor_grad_norm"] = trainer.optimizer_step()
            finally:
                self.critic.requires_grad_(True)
            stats.update(actor_loss=actor_loss.item(), entropy=-logp.mean().item())
            if cfg.learn_temperature:
                t_loss = sac_temperature_loss(self.log_alpha, logp, self.target_entropy)
                self.alpha_opt.zero_grad(set_to_none=True)
                t_loss.backward()
                average_gradients(trainer.accelerator, [self.log_alpha])
                self.alpha_opt.step()
                stats["temperature_loss"] = t_loss.item()

        if self.grad_steps % cfg.target_update_frequency == 0:
            with torch.no_grad():
                torch._foreach_lerp_(list(self.critic_target.parameters()), list(self.critic.parameters()), cfg.tau)
        return stats

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"grad_steps": self.grad_steps, "env_steps": self.env_steps,
                                 "update_debt": self.update_debt, "buffer": self.buffer.state_dict()}
        if self.critic is not None:
            state.update(
                critic={k: v.detach().cpu().clone() for k, v in self.critic.state_dict().items()},
                critic_target={k: v.detach().cpu().clone() for k, v in self.critic_target.state_dict().items()},
                log_alpha=self.log_alpha.detach().cpu().clone(),
                critic_opt=self.critic_opt.state_dict(),
                alpha_opt=self.alpha_opt.state_dict(),
            )
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not state:
            return
        if self.critic is None and "critic" in state:
            self._pending = state  # networks are built at the first step (they need the policy)
            self.grad_steps, self.env_steps = int(state["grad_steps"]), int(state["env_steps"])
            self.update_debt = float(state["update_debt"])
            self.buffer.load_state_dict(state["buffer"])
            return
        self._load(state)

    def _load(self, state: Mapping[str, Any]) -> None:
        self.grad_steps, self.env_steps = int(state["grad_steps"]), int(state["env_steps"])
        self.update_debt = float(state["update_debt"])
        self.buffer.load_state_dict(state["buffer"])
        if "critic" in state and self.critic is not None:
            self.critic.load_state_dict(state["critic"])
            self.critic_target.load_state_dict(state["critic_target"])
            with torch.no_grad():
                self.log_alpha.copy_(state["log_alpha"])
            self.critic_opt.load_state_dict(state["critic_opt"])
            self.alpha_opt.load_state_dict(state["alpha_opt"])
