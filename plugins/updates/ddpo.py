"""DDPO: clipped policy gradient over denoising steps (Black et al., 2023).

For each sample, the same scalar advantage applies to every step. Advantages come from a
per-prompt statistics tracker over rewards gathered from all processes. Per inner epoch the
samples are shuffled, and *each sample's* step order is shuffled independently; one optimizer step
accumulates gradients over ``gradient_accumulation_batches`` micro-batches times all their steps::

    A = clamp(adv, -adv_clip_max, adv_clip_max)
    r = exp(logp_new - logp_old)
    loss = mean(max(-A * r, -A * clip(r, 1 - eps, 1 + eps)))

With ``kl_coef > 0`` (not in DDPO's paper; a guard against reward hacking, as in GRPO), each step
adds ``kl_coef * (exp(d) - d - 1)`` with ``d = logp_ref - logp_new``: the k3 estimator of the KL from
the trained policy to the reference policy (the base model, adapter disabled) on the sampled step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch

from polyrl.context import UpdateContext
from polyrl.stats import PerPromptStatTracker, UpdateStats
from polyrl.types import Rollout, Update

from .common import sequence_rewards, check_batching, gather_rewards, windows


@dataclass
class DDPOConfig:
    """Settings of the DDPO update (defaults from the DDPO reference runs)."""

    inner_epochs: int = 1
    """Passes over each iteration's samples."""
    train_batch_size: int = 4
    """Samples per micro-batch on each process."""
    gradient_accumulation_batches: int = 1
    """Micro-batches per optimizer step; each contributes all of its steps (T backward passes)."""
    clip_range: float = 1e-4
    """PPO ratio clip epsilon."""
    adv_clip_max: float = 5.0
    """Advantages are clamped to [-adv_clip_max, adv_clip_max]."""
    timestep_fraction: float = 1.0
    """Fraction of each sample's (shuffled) steps to train on."""
    per_prompt_stat_tracking: bool = True
    """Normalise rewards per prompt (tracker); False uses the gathered batch's mean and std."""
    tracker_buffer_size: int = 32
    """Rewards remembered per prompt."""
    tracker_min_count: int = 16
    """Below this many rewards for a prompt, the batch statistics are used."""
    steps_per_call: int = 1
    """Denoising steps of a micro-batch whose log-probs one model call computes (all ``b * k`` steps
    as one batch). The gradient is the per-step form's; larger is faster and needs more memory (the
    activations of ``k`` steps at once). 1: one call per step, as DDPO's reference code."""
    kl_coef: float = 0.0
    """Weight of a k3 KL penalty to the reference policy on each trained step (0: none, DDPO's own
    objective; > 0 needs a LoRA policy, whose reference is the base model)."""

    def check(self) -> None:
        from polyrl.types import ConfigError

        if not 0 < self.timestep_fraction <= 1:
            raise ConfigError(f"update.timestep_fraction must be in (0, 1], got {self.timestep_fraction}")
        if self.inner_epochs < 1:
            raise ConfigError(f"update.inner_epochs must be >= 1, got {self.inner_epochs}")
        if self.clip_range <= 0:
            raise ConfigError(f"update.clip_range must be > 0, got {self.clip_range}")
        if self.steps_per_call < 1:
            raise ConfigError(f"update.steps_per_call must be >= 1, got {self.steps_per_call}")
        if self.kl_coef < 0:
            raise ConfigError(f"update.kl_coef must be >= 0, got {self.kl_coef}")

    def check_run(self, cfg: Any) -> None:
        check_batching("ddpo", cfg.run.batch_size, self.train_batch_size, self.gradient_accumulation_batches)


def ddpo_loss(logp: torch.Tensor, old: torch.Tensor, adv: torch.Tensor, clip_range: float,
              valid: torch.Tensor | None = None, *, tensor_stats: bool = False) -> tuple[torch.Tensor, dict[str, Any]]:
    """The clipped DDPO/PPO surrogate for one step per sample.

    ``logp``, ``old``, ``adv`` and ``valid`` are ``[b]``. Returns the loss (mean over valid
    samples) and ``approx_kl = mean(0.5 * (logp - old)^2)`` and ``clipfrac``: Python floats, or with
    ``tensor_stats`` 0-dim tensors on the loss's device (no host sync; see :class:`UpdateStats`).
    """
    valid = torch.ones_like(logp) if valid is None else valid.float()
    ratio = torch.exp(logp - old)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1 - clip_range, 1 + clip_range)
    loss = (torch.maximum(unclipped, clipped) * valid).sum() / valid.sum().clamp(min=1.0)
    with torch.no_grad():
        d = logp.detach() - old
        stats = {
            "approx_kl": (0.5 * d**2).mean(),
            "clipfrac": ((ratio.detach() - 1).abs() > clip_range).float().mean(),
        }
    return loss, (stats if tensor_stats else {k: v.item() for k, v in stats.items()})


def k3_kl(logp: torch.Tensor, ref: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean over valid samples of ``exp(d) - d - 1``, ``d = ref - logp``: the k3 estimator of
    KL(pi_theta || pi_ref) from samples of pi_theta (Schulman, "Approximating KL divergence", 2020)."""
    d = ref - logp
    v = valid.float()
    return ((torch.exp(d) - d - 1) * v).sum() / v.sum().clamp(min=1.0)


class DDPO(Update):
    def __init__(self, cfg: DDPOConfig) -> None:
        self.cfg = cfg
        self.tracker = PerPromptStatTracker(cfg.tracker_buffer_size, cfg.tracker_min_count)
        self.last_advantages: torch.Tensor | None = None

    def advantages(self, ctx: UpdateContext, rollout: Rollout, rewards: torch.Tensor) -> torch.Tensor:
        all_rewards, all_prompts, mine = gather_rewards(ctx, rollout, rewards)
        if self.cfg.per_prompt_stat_tracking:
            adv = self.tracker.update(all_prompts, all_rewards)
        else:
            adv = (all_rewards - all_rewards.mean()) / (all_rewards.std(unbiased=False) + 1e-6)
        return adv[mine]

    def step(self, ctx: UpdateContext, rollout: Rollout, rewards: torch.Tensor) -> dict[str, float]:
        ctx = UpdateContext.of(ctx)
        cfg = self.cfg
        rewards = sequence_rewards(rewards)
        device = ctx.accelerator.device
        adv = self.advantages(ctx, rollout, rewards)
        self.last_advantages = adv.clone()
        adv = adv.clamp(-cfg.adv_clip_max, cfg.adv_clip_max).to(device)
        rollout = rollout.to(device)
        b, t = rollout.log_probs.shape
        t_train = max(1, int(t * cfg.timestep_fraction))
        g = ctx.generator("update")
        stats = UpdateStats("loss", "approx_kl", "clipfrac", "grad_norm", "kl_ref")  # read once, at the end
        for _ in range(cfg.inner_epochs):
            perm = torch.randperm(b, generator=g)
            order = torch.stack([torch.randperm(t, generator=g) for _ in range(b)])  # [B, T] per-sample shuffle
            for window in windows(perm, cfg.train_batch_size, cfg.gradient_accumulation_batches):
                n_micro = len(window) * t_train  # one loss term per (micro-batch, step), as in the reference
                calls = [(idx, j, min(cfg.steps_per_call, t_train - j))
                         for idx in window for j in range(0, t_train, cfg.steps_per_call)]
                for micro, (idx, j, k) in ctx.accumulate(calls, scale=n_micro):
                    mb = rollout.select(idx)
                    mb_adv = adv[idx.to(device)]
                    cols = order[idx, j : j + k].to(device)  # [b, k]: each sample's next k shuffled steps
                    with micro:
                        logps = ctx.model(mb, cols)  # [b, k] in one model call
                        olds, valids = mb.log_probs.gather(1, cols), mb.mask.gather(1, cols)
                        refs = (ctx.policy.reference_log_probs(mb, cols).to(logps.device)
                                if cfg.kl_coef > 0 else None)
                        total = 0.0
                        for col in range(k):  # each step's loss as with one call per step
                            loss, step_stats = ddpo_loss(logps[:, col], olds[:, col], mb_adv, cfg.clip_range,
                                                         valids[:, col], tensor_stats=True)
                            if refs is not None:
                                kl = k3_kl(logps[:, col], refs[:, col], valids[:, col])
                                loss = loss + cfg.kl_coef * kl
                                step_stats["kl_ref"] = kl
                            total = total + loss
                            stats.add("loss", loss)
                            stats.update(step_stats)
                        micro.backward(total)  # total / n_micro
                stats.add("grad_norm", ctx.optimizer_step())
        stats.add("advantage_abs_mean", adv.abs().mean())
        out = stats.means()  # the update's one read of its statistics
        out.update(self.tracker.stats())
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"tracker": self.tracker.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.tracker.load_state_dict(state["tracker"])
