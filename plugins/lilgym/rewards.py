"""``lilgym_success``: whether each episode succeeded (for logging the success rate)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from polyrl.types import Reward, Rollout


@dataclass
class LilGymSuccessConfig:
    """Settings of the lilGym success indicator."""

    count_stop_forcing: bool = True
    """Count an episode that stop forcing ended with +1 as a success (False: only a STOP the policy
    chose itself counts, as in lilGym's evaluation without stop forcing)."""


class LilGymSuccess(Reward):
    """``[B]``: 1.0 for an episode that ended with a positive reward, else 0.0.

    Give it weight 0 next to ``env_reward`` to log ``reward/lilgym_success`` (the success rate)
    without changing the objective.
    """

    reads = "lilgym_success"

    def __init__(self, cfg: LilGymSuccessConfig) -> None:
        self.cfg = cfg

    def __call__(self, rollout: Rollout) -> torch.Tensor:
        key = "lilgym_success" if self.cfg.count_stop_forcing else "lilgym_success_no_sf"
        return torch.as_tensor(rollout.outputs[key], dtype=torch.float32).cpu()


@dataclass
class LilGymStepsConfig:
    """Settings of the episode-length measure (no settings)."""


class LilGymSteps(Reward):
    """``[B]``: the number of environment steps (turns, for the language-model agent) of each
    episode. Give it weight 0 to log ``reward/lilgym_steps``, the mean episode length, from which
    the environment steps of a run follow (times the episodes per iteration)."""

    reads = "episode_lengths"

    def __init__(self, cfg: LilGymStepsConfig) -> None:
        self.cfg = cfg

    def __call__(self, rollout: Rollout) -> torch.Tensor:
        return torch.as_tensor(rollout.outputs["episode_lengths"], dtype=torch.float32).cpu()
