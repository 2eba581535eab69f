"""``flow_grpo``: Flow-GRPO's update on flow-matching rollouts (Liu et al. 2025, arXiv:2505.05470;
``scripts/train_sd3.py`` of yifan123/flow_grpo).

``G`` images per prompt form a group; each image's reward ``R`` gives one advantage for all of its
trained steps::

    A   = clamp((R − mean_group R) / (std R + 1e-4), −adv_clip_max, adv_clip_max)
          (std of the group, or of the whole iteration's batch on all processes: Flow-GRPO's global_std)
    r_j = exp(log π_θ(x_{j+1} | x_j) − log π_old(x_{j+1} | x_j))        (the SDE step's Gaussian)
    L_j = mean_batch max(−A·r_j, −A·clip(r_j, 1 − ε, 1 + ε)) + β · KL_j

with the KL to the reference policy (the adapter disabled) computed, as Flow-GRPO does, on the
step means::

    kl_form flow_grpo: KL_j = mean_batch mean_dims (μ_θ − μ_ref)² / (2 s_j²)          (train_sd3.py)
    kl_form gaussian:  KL_j = mean_batch mean_dims (μ_θ − μ_ref)² / (2 s_j² (−dt_j))  (the exact KL
                       per dimension between N(μ_θ, s²(−dt)) and N(μ_ref, s²(−dt)))

``s_j = a·sqrt(σ_j / (1 − σ_j))`` is the step's noise scale. Flow-GRPO divides by ``2 s²`` (its
``std_dev_t``); the exact Gaussian KL also divides by ``−dt`` (``1/N`` for a uniform schedule),
i.e. it is ``N`` times larger for the same ``β``. The policy loss is Flow-GRPO's (and DDPO's)
clipped surrogate, :func:`polyrl.plugins.updates.ddpo.ddpo_loss`; advantages are
:func:`polyrl.plugins.updates.grpo.grpo_advantages` (Bessel std; Flow-GRPO uses the population
std). Steps are trained one at a time, in sampling order, with a backward pass per step, and the
gradients of ``gradient_accumulation_batches`` micro-batches times all trained steps are
accumulated into one optimizer step, as in Flow-GRPO. ``timestep_fraction`` trains the first
``int(T · fraction)`` recorded steps (Flow-GRPO: 0.99 of 10, i.e. 9).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from polyrl.context import UpdateContext
from polyrl.plugins.updates.common import check_batching, sequence_rewards, windows
from polyrl.plugins.updates.ddpo import ddpo_loss
from polyrl.plugins.updates.grpo import grpo_advantages
from polyrl.stats import UpdateStats
from polyrl.types import ConfigError, Rollout, Update

__all__ = ["FlowGRPO", "FlowGRPOConfig", "flow_advantages", "flow_kl"]


@dataclass
class FlowGRPOConfig:
    """Settings of Flow-GRPO's update (defaults: Flow-GRPO's SD3.5-M runs)."""

    beta: float = 0.04
    """Weight of the KL to the reference policy (Flow-GRPO: 0.04 GenEval/OCR, 0.01 PickScore;
    0 disables it and skips the reference passes)."""
    kl_form: Literal["flow_grpo", "gaussian"] = "flow_grpo"
    """flow_grpo: mean squared difference of the step means over ``2 s²`` (Flow-GRPO's code);
    gaussian: over ``2 s² (−dt)``, the exact per-dimension KL of the two step Gaussians."""
    clip_range: float = 1e-4
    """Ratio clip epsilon (Flow-GRPO: 1e-4)."""
    adv_clip_max: float = 5.0
    """Advantages are clamped to [-adv_clip_max, adv_clip_max]."""
    scale_rewards: Literal["group", "batch"] = "batch"
    """Divide the group-centred rewards by the std of the group, or of the whole iteration's batch
    on all processes (Flow-GRPO's ``global_std``, on in its SD3 configs)."""
    timestep_fraction: float = 1.0
    """Train the first ``int(T · fraction)`` (at least one) of the ``T`` recorded steps
    (Flow-GRPO: 0.99)."""
    inner_epochs: int = 1
    """Passes over each iteration's samples."""
    train_batch_size: int = 8
    """Samples per micro-batch on each process."""
    gradient_accumulation_batches: int = 1
    """Micro-batches per optimizer step; each contributes all of its trained steps."""

    def check(self) -> None:
        """Reject impossible settings before any model loads."""
        if self.beta < 0:
            raise ConfigError(f"update.beta must be >= 0, got {self.beta}")
        if self.kl_form not in ("flow_grpo", "gaussian"):
            raise ConfigError(f"update.kl_form={self.kl_form!r}; accepted: 'flow_grpo', 'gaussian'")
        if self.clip_range <= 0:
            raise ConfigError(f"update.clip_range must be > 0, got {self.clip_range}")
        if self.adv_clip_max <= 0:
            raise ConfigError(f"update.adv_clip_max must be > 0, got {self.adv_clip_max}")
        if self.scale_rewards not in ("group", "batch"):
            raise ConfigError(f"update.scale_rewards={self.scale_rewards!r}; accepted: 'group', 'batch'")
        if not 0 < self.timestep_fraction <= 1:
            raise ConfigError(f"update.timestep_fraction must be in (0, 1], got {self.timestep_fraction}")
        if self.inner_epochs < 1:
            raise ConfigError(f"update.inner_epochs must be >= 1, got {self.inner_epochs}")

    def check_run(self, cfg: Any) -> None:
        if cfg.run.samples_per_prompt < 2:
            raise ConfigError(
                f"run.samples_per_prompt={cfg.run.samples_per_prompt}: {cfg.update.name} needs groups of at least 2 "
                "images per prompt; accepted: any integer >= 2"
            )
        check_batching(cfg.update.name, cfg.run.batch_size, self.train_batch_size, self.gradient_accumulation_batches)
        if getattr(cfg.sampler.params, "noise_level", None) == 0:
            raise ConfigError(
                "sampler.noise_level=0 samples the deterministic ODE and records no steps to train; flow_grpo needs "
                "noise_level > 0 (Flow-GRPO: 0.7)"
            )


def flow_advantages(ctx, rollout: Rollout, rewards: torch.Tensor, scale_rewards: str) -> torch.Tensor:
    """``[B]`` group-normalised advantages of this process's samples (``batch``: std over every
    process's rewards)."""
    acc = ctx.accelerator
    rewards = sequence_rewards(rewards).detach().float().cpu()
    batch = None
    if scale_rewards == "batch":
        batch = acc.gather(rewards.to(acc.device)).cpu() if acc.num_processes > 1 else rewards
    return grpo_advantages(rewards, [c.group for c in rollout.contexts], scale_rewards, batch)


def flow_kl(mean: torch.Tensor, ref_mean: torch.Tensor, noise_scale: torch.Tensor, dt: torch.Tensor,
            form: str = "flow_grpo") -> torch.Tensor:
    """``[b]`` KL of one step per sample (see the module docstring): ``mean``/``ref_mean``
    ``[b, ...]``, ``noise_scale`` ``s`` and ``dt`` (negative) ``[b]``."""
    mse = ((mean.float() - ref_mean.float()) ** 2).flatten(1).mean(1)
    denom = 2 * noise_scale.float() ** 2
    if form == "gaussian":
        denom = denom * (-dt.float())
    elif form != "flow_grpo":
        raise ValueError(f"kl form {form!r}; accepted: 'flow_grpo', 'gaussian'")
    return mse / denom


class FlowGRPO(Update):
    """Flow-GRPO (see the module docstring)."""

    def __init__(self, cfg: FlowGRPOConfig | None = None) -> None:
        self.cfg = cfg or FlowGRPOConfig()
        self.cfg.check()

    def step(self, ctx: UpdateContext, rollout: Rollout, rewards: torch.Tensor) -> dict[str, float]:
        ctx = UpdateContext.of(ctx)
        cfg = self.cfg
        device = ctx.accelerator.device
        adv = flow_advantages(ctx, rollout, rewards, cfg.scale_rewards)
        adv = adv.clamp(-cfg.adv_clip_max, cfg.adv_clip_max).to(device)
        rollout = rollout.to(device)
        b, t = rollout.log_probs.shape
        if t == 0:
            raise ValueError("flow_grpo: the rollout has no stochastic steps (sampler.noise_level is 0)")
        t_train = max(1, int(t * cfg.timestep_fraction))
        g = ctx.generator("update")
        stats = UpdateStats("loss", "approx_kl", "clipfrac", "policy_loss", "kl", "grad_norm")
        for _ in range(cfg.inner_epochs):
            perm = torch.randperm(b, generator=g)
            for window in windows(perm, cfg.train_batch_size, cfg.gradient_accumulation_batches):
                micro_batches = [(rollout.select(idx), adv[idx.to(device)]) for idx in window]
                calls = [(mb, mb_adv, j) for mb, mb_adv in micro_batches for j in range(t_train)]
                # one loss term per (micro-batch, trained step), each with its own backward pass
                for micro, (mb, mb_adv, j) in ctx.accumulate(calls, scale=len(calls)):
                    cols = torch.full((mb.log_probs.shape[0], 1), j, dtype=torch.long, device=device)
                    with micro:
                        out = ctx.model(mb, cols, with_mean=True)
                        logp = out["log_probs"][:, 0]
                        loss, step_stats = ddpo_loss(logp, mb.log_probs[:, j], mb_adv, cfg.clip_range, mb.mask[:, j],
                                                     tensor_stats=True)
                        stats.add("policy_loss", loss)
                        if cfg.beta > 0:
                            ref = ctx.policy.reference_step_outputs(mb, cols)
                            dt = mb.data["next_sigmas"][:, j] - mb.data["sigmas"][:, j]
                            kl = flow_kl(out["mean"][:, 0], ref["mean"][:, 0], out["noise_scale"][:, 0], dt,
                                         cfg.kl_form).mean()
                            loss = loss + cfg.beta * kl
                            stats.add("kl", kl)
                        micro.backward(loss)  # loss / (micro-batches x trained steps)
                    stats.add("loss", loss)
                    stats.update(step_stats)
                stats.add("grad_norm", ctx.optimizer_step())
        stats.add("advantage_abs_mean", adv.abs().mean())
        out_stats = stats.means()  # the update's one read of its statistics
        out_stats["trained_steps"] = float(t_train)
        return out_stats
