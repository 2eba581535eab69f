"""REINFORCE with a baseline (Williams, 1992).

``loss = -mean_i (R_i - b) * sum_t logp_{i,t}`` over each sample's valid steps, one optimizer step
per iteration. The baseline ``b`` is the mean reward of the whole batch gathered from every
process (``batch_mean``), of the sample's group (``group_mean``), an exponential moving average of
past batch means (``ema``), or zero (``none``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Mapping

import torch

from polyrl.context import UpdateContext
from polyrl.stats import UpdateStats, group_advantages
from polyrl.types import Rollout, Update

from .common import sequence_rewards, check_batching, gather_rewards, windows


@dataclass
class ReinforceConfig:
    """Settings of the REINFORCE update."""

    baseline: Literal["batch_mean", "group_mean", "ema", "none"] = "batch_mean"
    """What is subtracted from each reward."""
    ema_decay: float = 0.9
    """Decay of the moving-average baseline (``baseline: ema``)."""
    normalize_advantages: bool = False
    """Divide advantages by the gathered batch's std."""
    train_batch_size: int = 8
    """Samples per micro-batch on each process (all micro-batches form one optimizer step)."""

    def check_run(self, cfg: Any) -> None:
        check_batching("reinforce", cfg.run.batch_size, self.train_batch_size, 1)


class Reinforce(Update):
    def __init__(self, cfg: ReinforceConfig) -> None:
        self.cfg = cfg
        self.ema: float | None = None

    def step(self, ctx: UpdateContext, rollout: Rollout, rewards: torch.Tensor) -> dict[str, float]:
        ctx = UpdateContext.of(ctx)
        cfg = self.cfg
        rewards = sequence_rewards(rewards)
        device = ctx.accelerator.device
        all_rewards, _, mine = gather_rewards(ctx, rollout, rewards)
        local = all_rewards[mine]
        if cfg.baseline == "batch_mean":
            adv = local - all_rewards.mean()
        elif cfg.baseline == "group_mean":
            adv = group_advantages(local, [c.group for c in rollout.contexts], scale=False)
        elif cfg.baseline == "ema":
            batch_mean = all_rewards.mean().item()
            self.ema = batch_mean if self.ema is None else cfg.ema_decay * self.ema + (1 - cfg.ema_decay) * batch_mean
            adv = local - self.ema
        else:
            adv = local.clone()
        if cfg.normalize_advantages:
            adv = adv / (all_rewards.std(unbiased=False) + 1e-6)
        adv = adv.to(device)
        rollout = rollout.to(device)
        perm = torch.arange(rollout.batch_size)
        window = next(windows(perm, cfg.train_batch_size, rollout.batch_size))
        stats = UpdateStats()  # read once, at the end
        for micro, idx in ctx.accumulate(window):
            mb = rollout.select(idx)
            with micro:
                logp = ctx.model(mb)
                seq_logp = (logp * mb.mask.float()).sum(1)
                loss = -(adv[idx.to(device)] * seq_logp).mean()
                micro.backward(loss)
            stats.add("loss", loss)
        stats.add("grad_norm", ctx.optimizer_step())
        stats.add("advantage_abs_mean", adv.abs().mean())
        return stats.means()  # the update's one read of its statistics

    def state_dict(self) -> dict[str, Any]:
        return {"ema": self.ema}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.ema = state.get("ema")
