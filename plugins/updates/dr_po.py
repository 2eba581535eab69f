"""DR-PO: dataset reset policy optimisation (Chang et al., 2024).

PPO (:mod:`polyrl.plugins.updates.ppo`, same settings) on rollouts that start from states of an
offline dataset: the sampler *resets* a sample to a random prefix of a dataset response (the
text plugin's ``generate`` with ``sampler.reset_column``), and the policy completes it. The forced
prefix tokens are part of the text that the reward scores, but they are not actions of the policy:
the sampler marks them ``mask = False``, so they are left out of the policy loss, the value loss,
the KL penalty and GAE (whose first state is the reset state).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from polyrl.types import ConfigError, Rollout

from .ppo import PPO, PPOConfig


@dataclass
class DRPOConfig(PPOConfig):
    """Settings of the DR-PO update: PPO's (same defaults). Its sampler must reset samples to
    dataset prefixes (the ``dataset_resets`` capability, checked by the host) and name the prompt
    column that holds the responses (``sampler.reset_column``)."""

    def check_run(self, cfg: Any) -> None:
        super().check_run(cfg)
        check_reset_sampler(cfg)


def check_reset_sampler(config: Any) -> None:
    """``dr_po`` needs ``sampler.reset_column``: the prompt column holding the dataset responses."""
    if not getattr(config.sampler.params, "reset_column", None):
        raise ConfigError(
            "sampler.reset_column: dr_po resets samples to prefixes of dataset responses; set it to the prompt "
            "column that holds them (a JSONL prompts file with e.g. {\"prompt\": ..., \"response\": ...})"
        )


class DRPO(PPO):
    name = "dr_po"

    def rollout_stats(self, rollout: Rollout) -> dict[str, torch.Tensor]:
        """The fraction of samples reset to a dataset prefix and the mean number of forced tokens."""
        forced = rollout.data.get("forced")
        if forced is None:
            return {}
        n = forced.sum(1).float()
        return {"reset_fraction": (n > 0).float().mean(), "reset_length": n.mean()}
