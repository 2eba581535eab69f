"""``env_reward``: the rewards an environment returned during sampling, per step."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from polyrl.types import Reward, Rollout


@dataclass
class EnvRewardConfig:
    """Settings of the environment reward."""

    scale: float = 1.0
    """Multiplies every step's reward."""


class EnvReward(Reward):
    """``rollout.outputs["env_rewards"]`` (``[B, T]``, zero after an episode ends) times ``scale``.

    Environment samplers record the reward of each step; this component hands them to the loop so
    they can be composed with other (for example learned) rewards like any other component.
    """

    reads = "env_rewards"

    def __init__(self, cfg: EnvRewardConfig) -> None:
        self.cfg = cfg

    def __call__(self, rollout: Rollout) -> torch.Tensor:
        rewards = torch.as_tensor(rollout.outputs["env_rewards"], dtype=torch.float32).cpu()
        return self.cfg.scale * rewards * rollout.mask.float().cpu()
