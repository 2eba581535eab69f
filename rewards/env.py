"""``env_reward``: the rewards an environment returned during sampling, per step."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from polyrl.types import ConfigError, Reward, Rollout


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


@dataclass
class NormalisedReturnConfig:
    """Settings of the normalised episode return (expert = 1, random = 0)."""

    expert_return: float = 0.0
    """The expert's episode return (the ``1`` of the scale), e.g. from the demonstrations' expert."""
    random_return: float = 0.0
    """The episode return of uniformly random actions (the ``0`` of the scale)."""

    def check(self) -> None:
        """Reject a scale that cannot normalise."""
        if self.expert_return == self.random_return:
            raise ConfigError(
                f"normalised_return: expert_return and random_return are both {self.expert_return}; give two "
                "different returns (expert = 1, random = 0), e.g. expert_return: -155.0, random_return: -1246.7"
            )


class NormalisedReturn(Reward):
    """``(episode return − random_return) / (expert_return − random_return)`` per episode ``[B]``.

    The episode return is the sum of ``rollout.outputs["env_rewards"]`` over the valid steps. Used
    with ``weight: 0`` it logs ``reward/<name>``, the imitation score of the training episodes,
    on the scale of the imitation results (those evaluate the policy's mean action instead).
    """

    reads = "env_rewards"

    def __init__(self, cfg: NormalisedReturnConfig) -> None:
        self.cfg = cfg

    def __call__(self, rollout: Rollout) -> torch.Tensor:
        rewards = torch.as_tensor(rollout.outputs["env_rewards"], dtype=torch.float32).cpu()
        returns = (rewards * rollout.mask.float().cpu()).sum(dim=1)
        return (returns - self.cfg.random_return) / (self.cfg.expert_return - self.cfg.random_return)
