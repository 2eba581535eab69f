"""RLOO: REINFORCE leave-one-out (Kool et al., 2019; Ahmadian et al., 2024), in the form of TRL's
RLOOTrainer.

``G`` samples per prompt; each sample's reward carries the sequence KL to the reference policy,
``r_i = R_i - kl_coef * sum_t (log pi_old - log pi_ref)``, and its baseline is the mean reward of
the *other* ``G - 1`` samples of its group::

    A_i = r_i - (sum_j r_j - r_i) / (G - 1)

The loss is PPO's clipped surrogate on the *sequence* ratio
``rho = exp(sum_t (log pi - log pi_old))``::

    loss = mean_i max(-A_i * rho_i, -A_i * clip(rho_i, 1 - eps_low, 1 + eps_high))

``eps_low`` and ``eps_high`` are ``clip_range`` unless set apart (DAPO's clip-higher,
arXiv:2503.14476, as TRL's RLOOTrainer offers it). GRPO's other variants do not apply here: the
loss has one term per sequence, so there are no token losses for ``loss_type`` to aggregate; the
ratio is already a sequence ratio (TRL's RLOO uses the unnormalised sum of token log-ratios, not
GSPO's length-normalised mean); and the leave-one-out baseline replaces GRPO's group
normalisation, which ``scale_rewards`` and GDPO's per-reward normalisation modify.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from polyrl.context import UpdateContext
from polyrl.stats import UpdateStats
from polyrl.types import ConfigError, Rollout, Update

from .common import check_batching, checked_clip_bounds, sequence_rewards, windows


@dataclass
class RLOOConfig:
    """Settings of the RLOO update (defaults follow TRL's RLOOTrainer)."""

    kl_coef: float = 0.05
    """Weight of the sequence KL to the reference policy subtracted from each reward (0 disables
    it and skips reference passes)."""
    clip_range: float = 0.2
    """Clip epsilon of the sequence-level ratio on both sides; ``epsilon_low`` and ``epsilon_high``
    override either side."""
    epsilon_low: float | None = None
    """Lower clip: the ratio is clipped at ``1 - epsilon_low`` (in [0, 1)). null: ``clip_range``."""
    epsilon_high: float | None = None
    """Upper clip: the ratio is clipped at ``1 + epsilon_high`` (>= 0). null: ``clip_range``
    (DAPO's clip-higher uses 0.28 with a lower epsilon of 0.2)."""
    normalize_advantages: bool = False
    """Divide the leave-one-out advantages by their std over the iteration's samples (all processes)."""
    inner_epochs: int = 4
    """Optimisation passes over each iteration's samples."""
    train_batch_size: int = 8
    """Samples per micro-batch on each process."""
    gradient_accumulation_batches: int = 1
    """Micro-batches per optimizer step."""

    def check(self) -> None:
        if self.kl_coef < 0:
            raise ConfigError(f"update.kl_coef must be >= 0, got {self.kl_coef}")
        self.clip_bounds  # checks clip_range, epsilon_low and epsilon_high
        if self.inner_epochs < 1:
            raise ConfigError(f"update.inner_epochs must be >= 1, got {self.inner_epochs}")

    @property
    def clip_bounds(self) -> tuple[float, float]:
        """``(epsilon_low, epsilon_high)`` with ``clip_range`` filling the unset ones."""
        return checked_clip_bounds(self.clip_range, self.epsilon_low, self.epsilon_high)

    def check_run(self, cfg: Any) -> None:
        if cfg.run.samples_per_prompt < 2:
            raise ConfigError(
                f"run.samples_per_prompt={cfg.run.samples_per_prompt}: rloo's baseline is the mean of the other "
                "samples of a prompt; accepted: any integer >= 2"
            )
        check_batching("rloo", cfg.run.batch_size, self.train_batch_size, self.gradient_accumulation_batches)


def leave_one_out_advantages(rewards: torch.Tensor, groups: Sequence[int]) -> torch.Tensor:
    """``A_i = r_i - mean of the other rewards of i's group``; ``[B]`` from ``[B]``."""
    rewards = rewards.float()
    gid = torch.as_tensor(list(groups))  # on the host: finding the groups reads no device value
    adv = torch.empty_like(rewards)
    for g in torch.unique(gid):
        idx = (gid == g).nonzero(as_tuple=True)[0]
        r = rewards[idx]
        n = r.numel()
        if n < 2:
            raise ValueError(f"rloo: group {int(g)} has a single sample; the leave-one-out baseline needs >= 2")
        adv[idx] = r - (r.sum() - r) / (n - 1)
    return adv


def rloo_loss(
    logp: torch.Tensor, old: torch.Tensor, mask: torch.Tensor, adv: torch.Tensor, clip_range: float,
    epsilon_high: float | None = None, *, tensor_stats: bool = False,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Clipped surrogate on sequence ratios. ``logp``, ``old``, ``mask`` ``[b, T]``; ``adv`` ``[b]``.
    ``clip_range`` is the lower clip epsilon and, unless ``epsilon_high`` is given, the upper one.
    The statistics are Python floats, or with ``tensor_stats`` 0-dim tensors on the loss's device (no host sync; see
    :class:`polyrl.stats.UpdateStats`)."""
    low, high = clip_range, clip_range if epsilon_high is None else epsilon_high
    m = mask.to(logp.dtype)
    log_ratio = ((logp - old) * m).sum(1)  # [b]
    ratio = torch.exp(log_ratio)
    pg = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1 - low, 1 + high))
    loss = pg.mean()
    with torch.no_grad():
        r = ratio.detach()
        stats = {
            "approx_kl": (0.5 * log_ratio.detach() ** 2).mean(),
            "clipfrac": ((r < 1 - low) | (r > 1 + high)).float().mean(),
            "clipfrac_low": ((r < 1 - low) & (adv < 0)).float().mean(),
            "clipfrac_high": ((r > 1 + high) & (adv > 0)).float().mean(),
        }
    return loss, (stats if tensor_stats else {k: v.item() for k, v in stats.items()})


class RLOO(Update):
    def __init__(self, cfg: RLOOConfig) -> None:
        self.cfg = cfg

    def step(self, ctx: UpdateContext, rollout: Rollout, rewards: torch.Tensor) -> dict[str, float]:
        ctx = UpdateContext.of(ctx)
        cfg = self.cfg
        acc = ctx.accelerator
        device = acc.device
        rollout = rollout.to(device)
        rewards = sequence_rewards(rewards).float().to(device)
        out = UpdateStats()  # read once, at the end
        if cfg.kl_coef > 0:
            ref = ctx.policy.reference_log_probs(rollout)
            kl = ((rollout.log_probs - ref) * rollout.mask.float()).sum(1)  # [B]
            rewards = rewards - cfg.kl_coef * kl
            out.add("kl_ref", kl.mean())
        adv = leave_one_out_advantages(rewards, [c.group for c in rollout.contexts])
        if cfg.normalize_advantages:
            all_adv = acc.gather(adv) if acc.num_processes > 1 else adv
            adv = adv / (all_adv.std() + 1e-8)
        out.add("advantage_abs_mean", adv.abs().mean())
        g = ctx.generator("update")
        low, high = cfg.clip_bounds
        for _ in range(cfg.inner_epochs):
            perm = torch.randperm(rollout.batch_size, generator=g)
            for window in windows(perm, cfg.train_batch_size, cfg.gradient_accumulation_batches):
                for micro, idx in ctx.accumulate(window):
                    mb = rollout.select(idx)
                    with micro:
                        logp = ctx.model(mb)
                        loss, step_stats = rloo_loss(logp, mb.log_probs, mb.mask, adv[idx.to(device)], low, high,
                                                     tensor_stats=True)
                        micro.backward(loss)
                    out.add("loss", loss)
                    out.update(step_stats)
                out.add("grad_norm", ctx.optimizer_step())
        return out.means()  # the update's one read of its statistics
