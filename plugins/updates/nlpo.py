"""NLPO: natural language policy optimisation (Ramamurthy et al., 2023; RL4LMs).

PPO (see :mod:`polyrl.plugins.updates.ppo`) on a *masked* policy: at every step only the tokens in
the top-``p`` nucleus of a masking policy ``pi_psi`` (at least ``mask_min_tokens`` of them, EOS
always) may be chosen::

    pi_masked(a | s)  proportional to  pi_theta(a | s) * 1[a in top-p(pi_psi(. | s))]

``pi_psi`` is a frozen copy of the policy, refreshed (``psi <- theta``) every
``mask_update_interval`` iterations. Sampling and the PPO ratio use the masked policy; the KL
penalty in the reward measures the *unmasked* ``pi_theta`` against the reference policy.

The policy must support the mask (``set_action_mask``, as ``causal_lm`` does); its sampler
records the mask settings in the rollout so that log-probs are recomputed under the same mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch

from polyrl.context import UpdateContext
from polyrl.types import ConfigError, Rollout

from .ppo import PPO, PPOConfig, _check_ppo_fields, _check_ppo_run


@dataclass
class NLPOConfig(PPOConfig):
    """Settings of the NLPO update: PPO's (same defaults) and the action mask (RL4LMs' IMDB run)."""

    mask_top_p: float = 0.9
    """Nucleus of the masking policy: the most likely tokens whose probability reaches this."""
    mask_min_tokens: int = 100
    """The mask keeps at least this many tokens at every step."""
    mask_update_interval: int = 5
    """Iterations between refreshes of the masking policy (psi <- theta): NLPO's mu."""

    def check(self) -> None:
        _check_ppo_fields(self)
        if not 0.0 < self.mask_top_p <= 1.0:
            raise ConfigError(f"update.mask_top_p must be in (0, 1], got {self.mask_top_p}")
        if self.mask_min_tokens < 1:
            raise ConfigError(f"update.mask_min_tokens must be >= 1, got {self.mask_min_tokens}")
        if self.mask_update_interval < 1:
            raise ConfigError(f"update.mask_update_interval must be >= 1, got {self.mask_update_interval}")

    def check_run(self, cfg: Any) -> None:
        _check_ppo_run(self, cfg, "nlpo")


def unmasked(rollout: Rollout) -> Rollout:
    """The rollout with NLPO's mask settings removed from ``meta`` (same samples)."""
    plain = rollout.select(torch.arange(rollout.batch_size))
    plain.meta = {k: v for k, v in rollout.meta.items() if not k.startswith("nlpo_")}
    return plain


class NLPO(PPO):
    name = "nlpo"

    def __init__(self, cfg: NLPOConfig) -> None:
        super().__init__(cfg)
        self.mask_state: dict[str, torch.Tensor] | None = None  # trained weights of pi_psi

    def setup(self, ctx: UpdateContext) -> None:
        """Install the masking policy: the restored one, or a copy of the initial policy
        (``ctx``: the update's context or the loop's trainer; only its ``policy`` is used)."""
        policy = ctx.policy
        if not hasattr(policy, "set_action_mask"):
            raise ConfigError(
                f"update 'nlpo' needs a policy with a token action mask (causal_lm, seq2seq_lm); "
                f"{type(policy).__name__} has none"
            )
        if self.mask_state is None:
            self.mask_state = policy.trainable_state_dict()
        policy.set_action_mask(self.mask_state, self.cfg.mask_top_p, self.cfg.mask_min_tokens)

    def kl_rollout(self, ctx: UpdateContext, rollout: Rollout) -> tuple[Rollout, torch.Tensor]:
        if ctx.policy.mask_model is None:
            self.setup(ctx)
        plain = unmasked(rollout)
        n = self.cfg.train_batch_size
        with torch.no_grad():  # log pi_theta_old, unmasked, in micro-batches
            old = torch.cat([ctx.policy(plain.select(torch.arange(i, min(i + n, plain.batch_size))))
                             for i in range(0, plain.batch_size, n)])
        return plain, old

    def step(self, ctx: UpdateContext, rollout: Rollout, rewards: torch.Tensor) -> dict[str, float]:
        if "nlpo_top_p" not in rollout.meta:
            raise ValueError(
                "nlpo: the rollout was not sampled under the action mask; the sampler must support NLPO "
                "(the text plugin's 'generate' does)"
            )
        return super().step(ctx, rollout, rewards)

    def after_step(self, ctx: UpdateContext) -> dict[str, float]:
        if ctx.iteration % self.cfg.mask_update_interval == 0:
            self.mask_state = ctx.policy.trainable_state_dict()
            ctx.policy.set_action_mask(self.mask_state, self.cfg.mask_top_p, self.cfg.mask_min_tokens)
            return {"mask_refreshed": 1.0}
        return {"mask_refreshed": 0.0}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "mask_state": dict(self.mask_state or {})}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.mask_state = dict(state["mask_state"]) or None
