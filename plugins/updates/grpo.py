"""GRPO: group-relative policy optimisation (Shao et al., 2024).

``G`` samples per prompt form a group; every token of sample ``i`` gets
``A_i = (R_i - mean_G R) / (std_G R + eps)``. The loss is the token-level clipped surrogate plus,
when ``beta > 0``, ``beta`` times the k3 estimator of KL to the reference policy::

    r_t = exp(logp_t - logp_old_t)
    l_t = -min(r_t * A, clip(r_t, 1 - eps, 1 + eps) * A) + beta * (exp(ref_t - logp_t) - (ref_t - logp_t) - 1)

averaged over each sequence's tokens, then over sequences (``loss_aggregation: sequence_mean``,
the paper's form) or over all tokens of the batch (``token_mean``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from polyrl.stats import group_advantages
from polyrl.types import ConfigError, Rollout, Update

from .common import check_batching, windows


@dataclass
class GRPOConfig:
    """Settings of the GRPO update (defaults follow TRL's GRPOTrainer)."""

    beta: float = 0.0
    """Weight of the k3 KL penalty to the reference policy (0 disables it and skips reference passes)."""
    clip_range: float = 0.2
    """Ratio clip epsilon."""
    inner_epochs: int = 1
    """Optimisation passes over each iteration's samples (GRPO's mu)."""
    train_batch_size: int = 8
    """Samples per micro-batch on each process."""
    gradient_accumulation_batches: int = 1
    """Micro-batches per optimizer step."""
    scale_rewards: bool = True
    """Divide by the group's reward std (False: only subtract the group mean)."""
    loss_aggregation: Literal["sequence_mean", "token_mean"] = "sequence_mean"
    """How token losses are averaged: per sequence then over sequences, or over all tokens."""

    def check_run(self, cfg: Any) -> None:
        if cfg.run.samples_per_prompt < 2:
            raise ConfigError(
                f"run.samples_per_prompt={cfg.run.samples_per_prompt}: grpo needs groups of at least 2 samples per prompt; "
                "accepted: any integer >= 2"
            )
        check_batching("grpo", cfg.run.batch_size, self.train_batch_size, self.gradient_accumulation_batches)


class GRPO(Update):
    def __init__(self, cfg: GRPOConfig) -> None:
        self.cfg = cfg

    def step(self, trainer, rollout: Rollout, rewards: torch.Tensor) -> dict[str, float]:
        cfg = self.cfg
        device = trainer.accelerator.device
        adv = group_advantages(rewards, [c.group for c in rollout.contexts], scale=cfg.scale_rewards).to(device)
        rollout = rollout.to(device)
        if cfg.beta > 0:
            rollout.ref_log_probs = trainer.policy.reference_log_probs(rollout)
        b = rollout.batch_size
        g = trainer.generator("update")
        stats: dict[str, list[float]] = {"loss": [], "approx_kl": [], "clipfrac": [], "kl_ref": [], "grad_norm": []}
        for _ in range(cfg.inner_epochs):
            perm = torch.randperm(b, generator=g)
            for window in windows(perm, cfg.train_batch_size, cfg.gradient_accumulation_batches):
                for k, idx in enumerate(window, 1):
                    mb = rollout.select(idx)
                    a = adv[idx.to(device)].unsqueeze(1)  # [b, 1]
                    with trainer.no_sync(sync=k == len(window)):
                        logp = trainer.model(mb)  # [b, T]
                        m = mb.mask.float()
                        ratio = torch.exp(logp - mb.log_probs)
                        surrogate = torch.minimum(ratio * a, torch.clamp(ratio, 1 - cfg.clip_range, 1 + cfg.clip_range) * a)
                        per_token = -surrogate
                        if cfg.beta > 0:
                            d = mb.ref_log_probs - logp
                            kl = torch.exp(d) - d - 1
                            per_token = per_token + cfg.beta * kl
                            stats["kl_ref"].append(((kl.detach() * m).sum() / m.sum().clamp(min=1)).item())
                        if cfg.loss_aggregation == "sequence_mean":
                            loss = ((per_token * m).sum(1) / m.sum(1).clamp(min=1)).mean()
                        else:
                            loss = (per_token * m).sum() / m.sum().clamp(min=1)
                        trainer.backward(loss / len(window))
                    with torch.no_grad():
                        d_old = (logp.detach() - mb.log_probs) * m
                        stats["loss"].append(loss.item())
                        stats["approx_kl"].append((0.5 * (d_old**2).sum() / m.sum().clamp(min=1)).item())
                        clipped = ((ratio.detach() - 1).abs() > cfg.clip_range).float() * m
                        stats["clipfrac"].append((clipped.sum() / m.sum().clamp(min=1)).item())
                stats["grad_norm"].append(trainer.optimizer_step())
        out = {k: sum(v) / len(v) for k, v in stats.items() if v}
        out["completion_length"] = rollout.mask.float().sum(1).mean().item()
        return out
