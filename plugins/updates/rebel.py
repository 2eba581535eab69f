"""REBEL: reinforcement learning via regressing relative rewards (Gao et al., 2024).

Each iteration the sampling policy ``pi_t`` draws an even number of samples per prompt; consecutive
samples of a group form pairs ``(y, y')``. The policy regresses the difference of the two rewards
with the difference of its log-ratios to ``pi_t``::

    loss = mean over pairs of ((1 / eta) * [log pi(y)/pi_t(y) - log pi(y')/pi_t(y')] - [r(y) - r(y')])^2

Sequence log-probabilities are sums over the valid steps of the ``[B, T]`` log-probs, so the update
serves any policy that returns per-step log-probs (tokens of a language model, denoising steps of a
diffusion or consistency model). ``pi_t`` is the policy that sampled: its log-probs are the rollout's
``log_probs``. With ``kl_coef > 0`` the KL to the reference policy enters the reward,
``r = R - kl_coef * sum_t (log pi_t - log pi_ref)``, as in the paper's summarisation runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from polyrl.context import UpdateContext
from polyrl.stats import UpdateStats
from polyrl.types import ConfigError, Rollout, Update

from .common import check_batching, sequence_rewards, windows


@dataclass
class REBELConfig:
    """Settings of the REBEL update."""

    eta: float = 1.0
    """Step size ``eta``: the log-ratio difference is divided by it before it regresses the
    reward difference (smaller values keep the new policy closer to the sampling one)."""
    kl_coef: float = 0.0
    """Weight of the sequence KL to the reference policy subtracted from each reward (0 disables
    it and skips reference passes)."""
    inner_epochs: int = 1
    """Optimisation passes over each iteration's pairs."""
    train_batch_size: int = 8
    """Samples per micro-batch on each process (an even number: both samples of a pair go together)."""
    gradient_accumulation_batches: int = 1
    """Micro-batches per optimizer step."""

    def check(self) -> None:
        if self.eta <= 0:
            raise ConfigError(f"update.eta must be > 0, got {self.eta}")
        if self.kl_coef < 0:
            raise ConfigError(f"update.kl_coef must be >= 0, got {self.kl_coef}")
        if self.inner_epochs < 1:
            raise ConfigError(f"update.inner_epochs must be >= 1, got {self.inner_epochs}")

    def check_run(self, cfg: Any) -> None:
        g = cfg.run.samples_per_prompt
        if g < 2 or g % 2:
            raise ConfigError(
                f"run.samples_per_prompt={g}: rebel pairs the samples of each prompt; accepted: an even "
                "integer >= 2 (2, 4, 6, ...)"
            )
        if self.train_batch_size % 2:
            raise ConfigError(
                f"update.train_batch_size={self.train_batch_size}: rebel keeps both samples of a pair in one "
                f"micro-batch; accepted: an even divisor of {cfg.run.batch_size}: "
                f"{[d for d in range(2, cfg.run.batch_size + 1, 2) if cfg.run.batch_size % d == 0]}"
            )
        check_batching("rebel", cfg.run.batch_size, self.train_batch_size, self.gradient_accumulation_batches)


def pair_indices(groups: list[int]) -> torch.Tensor:
    """``[N, 2]`` indices of the pairs: consecutive samples of each group, in order of appearance.

    Raises ``ValueError`` if a group has an odd number of samples.
    """
    members: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    pairs: list[list[int]] = []
    for g, idx in members.items():
        if len(idx) % 2:
            raise ValueError(f"rebel: group {g} has {len(idx)} samples; every group needs an even number")
        pairs.extend([idx[k], idx[k + 1]] for k in range(0, len(idx), 2))
    return torch.tensor(pairs, dtype=torch.long).reshape(-1, 2)


def sequence_log_probs(log_probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[B]`` sums of ``[B, T]`` log-probs over the valid steps."""
    return (log_probs * mask.to(log_probs.dtype)).sum(1)


def rebel_loss(
    logp: torch.Tensor,
    old: torch.Tensor,
    mask: torch.Tensor,
    rewards: torch.Tensor,
    eta: float,
    *,
    tensor_stats: bool = False,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """REBEL's loss on ``N`` pairs laid out as rows ``2k`` (``y``) and ``2k + 1`` (``y'``).

    ``logp`` (current policy, with gradients), ``old`` (sampling policy) and ``mask`` are
    ``[2N, T]``; ``rewards`` is ``[2N]``. Returns the mean squared regression error over pairs and
    statistics: ``approx_kl = 0.5 * mean((log pi(y) - log pi_t(y))^2)`` over samples,
    ``logratio_diff`` (the mean absolute predicted reward difference) and ``reward_diff_abs``:
    Python floats, or with ``tensor_stats`` 0-dim tensors on the loss's device (no host sync; see
    :class:`UpdateStats`).
    """
    if logp.shape[0] % 2:
        raise ValueError(f"rebel_loss needs pairs (an even number of rows), got {logp.shape[0]}")
    ratio = sequence_log_probs(logp, mask) - sequence_log_probs(old, mask)  # [2N] log pi/pi_t
    pred = (ratio[0::2] - ratio[1::2]) / eta  # [N]
    target = rewards[0::2] - rewards[1::2]  # [N]
    loss = ((pred - target) ** 2).mean()
    with torch.no_grad():
        stats = {
            "approx_kl": (0.5 * ratio.detach() ** 2).mean(),
            "logratio_diff": pred.detach().abs().mean(),
            "reward_diff_abs": target.abs().mean(),
        }
    return loss, (stats if tensor_stats else {k: v.item() for k, v in stats.items()})


class REBEL(Update):
    def __init__(self, cfg: REBELConfig) -> None:
        self.cfg = cfg

    def step(self, ctx: UpdateContext, rollout: Rollout, rewards: torch.Tensor) -> dict[str, float]:
        ctx = UpdateContext.of(ctx)
        cfg = self.cfg
        device = ctx.accelerator.device
        rewards = sequence_rewards(rewards).float().to(device)
        rollout = rollout.to(device)
        out = UpdateStats()  # read once, at the end
        if cfg.kl_coef > 0:
            ref = ctx.policy.reference_log_probs(rollout)
            kl = sequence_log_probs(rollout.log_probs - ref, rollout.mask)  # [B]
            rewards = rewards - cfg.kl_coef * kl
            out.add("kl_ref", kl.mean())
        pairs = pair_indices([c.group for c in rollout.contexts])  # [N, 2]
        g = ctx.generator("update")
        pairs_per_micro = cfg.train_batch_size // 2
        for _ in range(cfg.inner_epochs):
            perm = torch.randperm(pairs.shape[0], generator=g)
            for window in windows(perm, pairs_per_micro, cfg.gradient_accumulation_batches):
                for micro, pidx in ctx.accumulate(window):
                    idx = pairs[pidx].reshape(-1)  # y_0, y'_0, y_1, y'_1, ...
                    mb = rollout.select(idx)
                    with micro:
                        logp = ctx.model(mb)  # [2n, T]
                        loss, step_stats = rebel_loss(logp, mb.log_probs, mb.mask, rewards[idx.to(device)], cfg.eta,
                                                      tensor_stats=True)
                        micro.backward(loss)
                    out.add("loss", loss)
                    out.update(step_stats)
                out.add("grad_norm", ctx.optimizer_step())
        return out.means()  # the update's one read of its statistics
