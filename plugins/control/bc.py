"""``bc``: behaviour cloning on demonstrations, as an update of the same loop.

Each iteration takes ``steps_per_iteration`` gradient steps on batches of demonstrated
``(s, a)`` pairs; the rollout and rewards of the iteration are not used for learning (the loop
still samples episodes with the current policy, so the environment return of the cloned policy
is logged as it trains). Losses (``loss``):

* ``mle``: ``-mean log pi(a|s)``, the demonstrated action mapped back to the raw Gaussian
  (``atanh`` after clipping to ``1 - 1e-5`` for a squashed policy) (the SMILING code's default);
* ``mse``: ``mean |mean_action(s) - a|^2`` in the policy's ``[-1, 1]`` action space.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from polyrl.types import ConfigError, Context, Rollout, Update

from .demonstrations import load_demos


@dataclass
class BCConfig:
    """Settings of behaviour cloning."""

    demos: str
    """Demonstrations file (.npz, format in docs/imitation.md)."""
    demo_episodes: int = 0
    """Use the first this many episodes of the file (0: all)."""
    loss: Literal["mle", "mse"] = "mle"
    """Negative log-likelihood of the demonstrated actions, or squared error of the mean action."""
    batch_size: int = 256
    """Demonstrated pairs per gradient step."""
    steps_per_iteration: int = 200
    """Gradient steps per loop iteration."""

    def check(self) -> None:
        if self.batch_size < 1 or self.steps_per_iteration < 1:
            raise ConfigError("update.batch_size and update.steps_per_iteration must be >= 1")
        load_demos(self.demos, self.demo_episodes)


def bc_loss(out: dict[str, torch.Tensor], target_actions: torch.Tensor, loss: str) -> torch.Tensor:
    """``-mean log_probs`` (``mle``) or ``mean (mean_actions - target)^2`` (``mse``, targets in ``[-1, 1]``)."""
    if loss == "mle":
        return -out["log_probs"].mean()
    return (out["mean_actions"] - target_actions).pow(2).mean()


class BehaviourCloning(Update):
    def __init__(self, cfg: BCConfig) -> None:
        self.cfg = cfg
        self.demos = None
        self._contexts: list[Context] = []

    def step(self, trainer, rollout: Rollout, rewards: torch.Tensor) -> dict[str, float]:
        cfg = self.cfg
        policy = trainer.policy
        if self.demos is None:
            self.demos = load_demos(cfg.demos, cfg.demo_episodes, env_id=policy.env_id, obs_dim=policy.obs_dim,
                                    action_dim=policy.action_dim)
        obs, act = self.demos.observations, self.demos.actions
        g = trainer.generator("bc")
        if len(self._contexts) < cfg.batch_size:
            self._contexts = [Context(prompt="") for _ in range(cfg.batch_size)]
        losses, norms = [], []
        for _ in range(cfg.steps_per_iteration):
            idx = torch.randint(0, obs.shape[0], (cfg.batch_size,), generator=g)
            batch = Rollout(contexts=self._contexts[: cfg.batch_size], log_probs=torch.zeros(cfg.batch_size, 1),
                            mask=torch.ones(cfg.batch_size, 1, dtype=torch.bool),
                            data={"observations": obs[idx].unsqueeze(1), "actions": act[idx].unsqueeze(1)})
            out = trainer.model(batch, with_mean=True)
            target = policy.from_env(act[idx].to(policy.device)).unsqueeze(1)
            loss = bc_loss(out, target, cfg.loss)
            trainer.backward(loss)
            norms.append(trainer.optimizer_step())
            losses.append(loss.item())
        return {"bc_loss": sum(losses) / len(losses), "grad_norm": sum(norms) / len(norms)}
