"""``discriminator``: the adversarial imitation reward (GAIL / DAC style), with AILBoost's weighted replay.

A discriminator ``D(x) = sigmoid(f(x))`` on states (or state-action pairs) is trained every
``learn_every`` environment steps to tell demonstrations (label 1) from the learner's recent data
(label 0), with the binary cross-entropy of both halves averaged and DAC's gradient penalty
(Kostrikov et al., 2019) on random interpolates ``x~ = u x_learner + (1 - u) x_expert``:

    loss = (BCE(f(x_learner), 0) + BCE(f(x_expert), 1)) / 2 + lambda * mean (|grad f(x~)|_2 - 1)^2

Rewards (``reward_form``): ``gail`` ``-log(1 - D(x))`` (the DAC/GAIL form; positive, so it also
favours staying alive), ``airl`` ``f(x) = log D - log(1 - D)``.

Replay (``replay``): ``uniform`` draws the learner's data uniformly from its buffer (DAC).
``ailboost`` treats the policy of each training round as a weak learner of a boosted ensemble:
when round ``k`` ends, the newest data gets mixture weight ``alpha`` and all older rounds' weights
are multiplied by ``1 - alpha`` (the first round starts at weight 1), and learner batches are
drawn from this weighted mixture, so older policies' data is discounted (Chang et al., 2024).

Defaults follow the SMILING authors' DAC baseline: one hidden layer of 256 with LeakyReLU, AdamW
lr 5e-3, batch 1024, gradient penalty 10, one epoch over 100k of the last 200k learner states
every 1001 steps, no reward normalisation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Mapping

import torch
import torch.nn.functional as F

from polyrl.types import ConfigError, Rollout

from .demonstrations import load_demos
from .nets import average_gradients, mlp, seeded
from .transitions import FeatureBuffer, TransitionReward, net_state, rollout_transitions, standardize


@dataclass
class DiscriminatorConfig:
    """Settings of the discriminator reward (defaults: the SMILING authors' DAC baseline)."""

    demos: str
    """Demonstrations file (.npz, format in docs/imitation.md)."""
    demo_episodes: int = 0
    """Use the first this many episodes of the file (0: all)."""
    input: Literal["states", "states_actions"] = "states"
    """Discriminate states or state-action pairs."""
    reward_form: Literal["gail", "airl"] = "gail"
    """``gail``: ``-log(1 - D(x))``; ``airl``: the logit ``log D(x) - log(1 - D(x))``."""
    hidden_dim: int = 256
    """Width of the discriminator's hidden layers."""
    hidden_depth: int = 1
    """Number of hidden layers (LeakyReLU)."""
    lr: float = 5e-3
    """AdamW learning rate."""
    batch_size: int = 1024
    """Learner samples (and as many expert samples) per gradient step."""
    gradient_penalty: float = 10.0
    """Weight of the gradient penalty (DAC: 10; 0 disables it)."""
    learn_every: int = 1001
    """Train the discriminator every this many environment steps."""
    learn_samples: int = 100_000
    """Learner samples drawn with replacement from the buffer for each training epoch."""
    learn_epochs: int = 1
    """Epochs over those samples at each training round."""
    buffer_size: int = 200_000
    """How many of the learner's most recent transitions are kept."""
    replay: Literal["uniform", "ailboost"] = "uniform"
    """How learner batches are drawn from the buffer: uniformly (DAC), or weighted by round (AILBoost)."""
    boost_alpha: float = 0.1
    """AILBoost: mixture weight of the newest weak learner's data (older data is multiplied by 1 - alpha)."""
    standardize: bool = False
    """Standardise each batch of rewards before scaling."""
    scale: float = 1.0
    """Multiplies the rewards."""
    seed: int = 0
    """Seed of the network's initialisation (the same on every process)."""

    def check(self) -> None:
        for name in ("hidden_dim", "hidden_depth", "batch_size", "learn_every", "learn_samples", "buffer_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"rewards.discriminator.{name} must be >= 1, got {getattr(self, name)}")
        if self.learn_epochs < 0 or self.gradient_penalty < 0:
            raise ConfigError("rewards.discriminator.learn_epochs and gradient_penalty must be >= 0")
        if not 0 < self.boost_alpha <= 1:
            raise ConfigError(f"rewards.discriminator.boost_alpha must be in (0, 1], got {self.boost_alpha}")
        load_demos(self.demos, self.demo_episodes)


def discriminator_loss(logits_learner: torch.Tensor, logits_expert: torch.Tensor) -> torch.Tensor:
    """``(BCE(f(x_L), 0) + BCE(f(x_E), 1)) / 2`` from logits."""
    return 0.5 * (F.binary_cross_entropy_with_logits(logits_learner, torch.zeros_like(logits_learner))
                  + F.binary_cross_entropy_with_logits(logits_expert, torch.ones_like(logits_expert)))


def gradient_penalty(f, x_learner: torch.Tensor, x_expert: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``mean (|grad_x f(x~)| - 1)^2`` at ``x~ = u x_learner + (1 - u) x_expert`` (``u [N, 1]``)."""
    x = (u * x_learner + (1 - u) * x_expert).detach().requires_grad_(True)
    out = f(x)
    (grad,) = torch.autograd.grad(out.sum(), x, create_graph=True)
    return (grad.norm(2, dim=1) - 1).pow(2).mean()


def reward_from_logits(logits: torch.Tensor, form: str) -> torch.Tensor:
    """``gail``: ``-log(1 - sigmoid(f))`` (= softplus(f), computed stably); ``airl``: ``f``."""
    if form == "gail":
        return F.softplus(logits)
    if form == "airl":
        return logits
    raise ValueError(f"reward form {form!r}: choose 'gail' or 'airl'")


def ailboost_weights(rounds: torch.Tensor, current_round: int, alpha: float) -> torch.Tensor:
    """Per-item sampling weights of the AILBoost mixture over rounds ``0..current_round``.

    Round ``j``'s mixture weight is ``(1 - alpha)^k`` for ``j = 0`` and ``alpha (1 - alpha)^(k - j)``
    otherwise (``k = current_round``); it is shared equally among that round's stored items.
    Rounds whose data has left the buffer drop out (the rest are renormalised by sampling)."""
    k = current_round
    j = rounds.long()
    w = torch.where(j == 0, torch.full(j.shape, (1 - alpha) ** k, dtype=torch.float64),
                    alpha * (1 - alpha) ** (k - j).double())
    counts = torch.bincount(j, minlength=k + 1).double()
    return w / counts[j]


class DiscriminatorReward(TransitionReward):
    """Learned reward from a discriminator between expert and learner data (see the module docs)."""

    def __init__(self, cfg: DiscriminatorConfig, policy=None) -> None:
        self.cfg = cfg
        self.input = cfg.input
        self.demos = load_demos(cfg.demos, cfg.demo_episodes, env_id=getattr(policy, "env_id", None),
                                obs_dim=getattr(policy, "obs_dim", None), action_dim=getattr(policy, "action_dim", None))
        self.expert_data = self.demos.features(cfg.input)
        self.device = policy.device if policy is not None else torch.device("cpu")
        with seeded(cfg.seed):
            self.net = mlp(self.expert_data.shape[1], [cfg.hidden_dim] * cfg.hidden_depth, 1, "leaky_relu").to(self.device)
        self.opt = torch.optim.AdamW(self.net.parameters(), lr=cfg.lr)
        self.buffer = FeatureBuffer(cfg.buffer_size)
        self.steps_since_learn = 0
        self.rounds = 0

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.to(self.device).float()).squeeze(-1)

    @torch.no_grad()
    def score_transitions(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        r = reward_from_logits(self.logits(self.features(batch)), self.cfg.reward_form).cpu()
        return standardize(r, self.cfg.scale) if self.cfg.standardize else self.cfg.scale * r

    def learn(self, trainer, rollout: Rollout) -> dict[str, float]:
        cfg = self.cfg
        x = self.features(rollout_transitions(rollout))
        self.buffer.add(x, self.rounds)
        self.steps_since_learn += x.shape[0]
        rounds, self.steps_since_learn = divmod(self.steps_since_learn, cfg.learn_every)
        metrics: dict[str, float] = {"buffer_size": float(self.buffer.size)}
        if not rounds:
            return metrics
        g = trainer.generator("discriminator")
        acc = getattr(trainer, "accelerator", None)
        for _ in range(rounds):
            weights = (ailboost_weights(self.buffer.round[: self.buffer.size], self.rounds, cfg.boost_alpha)
                       if cfg.replay == "ailboost" else None)
            metrics.update(self._train_round(g, acc, weights))
            self.rounds += 1
        metrics["rounds"] = float(self.rounds)
        return metrics

    def _train_round(self, g: torch.Generator, acc, weights: torch.Tensor | None) -> dict[str, float]:
        cfg = self.cfg
        sums = {"loss": 0.0, "gan_loss": 0.0, "grad_penalty": 0.0, "acc_expert": 0.0, "acc_learner": 0.0}
        steps = 0
        for _ in range(cfg.learn_epochs):
            idx = self.buffer.indices(cfg.learn_samples, g, weights)
            for chunk in idx.split(cfg.batch_size):
                xl = self.buffer.x[chunk].to(self.device)
                xe = self.expert_data[torch.randint(0, self.expert_data.shape[0], (chunk.numel(),), generator=g)].to(self.device)
                ll, le = self.logits(xl), self.logits(xe)
                gan = discriminator_loss(ll, le)
                gp = (gradient_penalty(lambda z: self.net(z).squeeze(-1), xl, xe,
                                       torch.rand(chunk.numel(), 1, generator=g).to(self.device))
                      if cfg.gradient_penalty > 0 else torch.zeros((), device=self.device))
                loss = gan + cfg.gradient_penalty * gp
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                average_gradients(acc, self.net.parameters())
                self.opt.step()
                steps += 1
                sums["loss"] += loss.item()
                sums["gan_loss"] += gan.item()
                sums["grad_penalty"] += gp.item()
                sums["acc_expert"] += (le > 0).float().mean().item()
                sums["acc_learner"] += (ll < 0).float().mean().item()
        return {k: v / max(steps, 1) for k, v in sums.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"net": net_state(self.net), "opt": self.opt.state_dict(), "steps_since_learn": self.steps_since_learn,
                "rounds": self.rounds, "buffer": self.buffer.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not state:
            return
        self.net.load_state_dict(state["net"])
        self.opt.load_state_dict(state["opt"])
        self.steps_since_learn, self.rounds = int(state["steps_since_learn"]), int(state["rounds"])
        self.buffer.load_state_dict(state["buffer"])
