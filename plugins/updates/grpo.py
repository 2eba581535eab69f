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

from .common import sequence_rewards, check_batching, windows


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


def grpo_loss(
    logp: torch.Tensor,
    old: torch.Tensor,
    adv: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
    beta: float = 0.0,
    ref: torch.Tensor | None = None,
    aggregation: str = "sequence_mean",
) -> tuple[torch.Tensor, dict[str, float]]:
    """GRPO's loss. ``logp``, ``old``, ``ref``, ``mask`` are ``[b, T]``; ``adv`` is ``[b]``."""
    m = mask.float()
    a = adv.unsqueeze(1)
    ratio = torch.exp(logp - old)
    per_token = -torch.minimum(ratio * a, torch.clamp(ratio, 1 - clip_range, 1 + clip_range) * a)
    n_tokens = m.sum().clamp(min=1)
    stats: dict[str, float] = {}
    if beta > 0:
        if ref is None:
            raise ValueError("grpo_loss: beta > 0 needs reference log-probs")
        d = ref - logp
        kl = torch.exp(d) - d - 1  # k3 estimator of KL(pi_theta || pi_ref)
        per_token = per_token + beta * kl
        stats["kl_ref"] = ((kl.detach() * m).sum() / n_tokens).item()
    if aggregation == "sequence_mean":
        loss = ((per_token * m).sum(1) / m.sum(1).clamp(min=1)).mean()
    elif aggregation == "token_mean":
        loss = (per_token * m).sum() / n_tokens
    else:
        raise ValueError(f"unknown aggregation {aggregation!r}; accepted: 'sequence_mean', 'token_mean'")
    with torch.no_grad():
        d_old = (logp.detach() - old) * m
        stats["approx_kl"] = (0.5 * (d_old**2).sum() / n_tokens).item()
        stats["clipfrac"] = ((((ratio.detach() - 1).abs() > clip_range).float() * m).sum() / n_tokens).item()
    return loss, stats


class GRPO(Update):
    def __init__(self, cfg: GRPOConfig) -> None:
        self.cfg = cfg

    def step(self, trainer, rollout: Rollout, rewards: torch.Tensor) -> dict[str, float]:
        cfg = self.cfg
        rewards = sequence_rewards(rewards)
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
                    with trainer.no_sync(sync=k == len(window)):
                        logp = trainer.model(mb)  # [b, T]
                        loss, step_stats = grpo_loss(
                            logp, mb.log_probs, adv[idx.to(device)], mb.mask, cfg.clip_range,
                            cfg.beta, mb.ref_log_probs, cfg.loss_aggregation,
                        )
                        trainer.backward(loss / len(window))
                    stats["loss"].append(loss.item())
                    for key, value in step_stats.items():
                        stats[key].append(value)
                stats["grad_norm"].append(trainer.optimizer_step())
        out = {k: sum(v) / len(v) for k, v in stats.items() if v}
        out["completion_length"] = rollout.mask.float().sum(1).mean().item()
        return out
