"""``diffusion_nft``: DiffusionNFT's negative-aware flow-matching update (Zheng et al. 2025,
"DiffusionNFT: Online Diffusion Reinforcement with Forward Process", arXiv:2509.16117; the loss of
its SD3 training script, as also implemented by Flow-Factory's ``trainers/nft.py``).

No log-probs and no guidance: the update needs only each sample's final clean latents ``x0``, its
reward, and the sampling sigmas (any solver; the ``flow_sde`` sampler with ``noise_level: 0`` is
the deterministic Euler ODE). Per sample, rewards become an optimality probability::

    A = clamp((R − mean_group R) / (std R + 1e-4), −A_max, A_max)      (group-normalised)
    r = clamp(A / A_max / 2 + 0.5, 0, 1)

For each trained sigma ``σ`` of the sampling schedule, the clean sample is noised afresh
(``x_σ = (1 − σ)·x0 + σ·ε``) and, with ``v_θ`` the current velocity and ``v_old`` the velocity of
the policy that sampled (no gradient), the implicit positive and negative policies are::

    v⁺ = β·v_θ + (1 − β)·v_old,        v⁻ = (1 + β)·v_old − β·v_θ
    x0⁺ = x_σ − σ·v⁺,                  x0⁻ = x_σ − σ·v⁻
    L  = A_max · [ r·‖x0⁺ − x0‖² / w⁺ + (1 − r)·‖x0⁻ − x0‖² / w⁻ ] / β   (‖·‖² a mean over dims)
         + kl_beta · mean (v_θ − v_ref)²

with the adaptive weights ``w± = max(mean|x0± − x0|, 1e-5)`` (no gradient) and ``v_ref`` the
reference policy (the adapter disabled). High-reward samples pull ``v⁺`` to their data, low-reward
samples pull ``v⁻`` (so push ``v_θ`` away). The loss is averaged over the micro-batch and over the
trained sigmas; ``gradient_accumulation_batches`` micro-batches times all trained sigmas make one
optimizer step. ``v_old`` is computed for every sample and sigma before the first optimizer step
of the iteration, so it is exactly the sampling policy (DiffusionNFT samples with a slowly updated
EMA copy and uses it for ``v_old``; with its decay 0 the two coincide).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from polyrl.context import UpdateContext
from polyrl.plugins.updates.common import check_batching, windows
from polyrl.stats import UpdateStats
from polyrl.types import ConfigError, Rollout, Update

from .grpo import flow_advantages

__all__ = ["DiffusionNFT", "DiffusionNFTConfig", "nft_loss"]


@dataclass
class DiffusionNFTConfig:
    """Settings of the DiffusionNFT update (defaults: DiffusionNFT's SD3.5-M configs)."""

    nft_beta: float = 1.0
    """``β``: how far the implicit positive / negative policies step from the old policy (1.0; 0.1
    for OCR and multi-reward runs)."""
    adv_clip_max: float = 5.0
    """Advantages are clamped to [-adv_clip_max, adv_clip_max]; ``r = A / adv_clip_max / 2 + 0.5``."""
    kl_beta: float = 1e-4
    """Weight of ``mean (v_θ − v_ref)²`` to the reference policy (DiffusionNFT: 1e-4; 0 disables it
    and skips the reference passes)."""
    scale_rewards: Literal["group", "batch"] = "group"
    """Divide the group-centred rewards by the std of the group or of the whole batch."""
    timestep_fraction: float = 0.99
    """Train the first ``int(N · fraction)`` (at least one) of the ``N`` sampling sigmas."""
    inner_epochs: int = 1
    """Passes over each iteration's samples."""
    train_batch_size: int = 8
    """Samples per micro-batch on each process."""
    gradient_accumulation_batches: int = 1
    """Micro-batches per optimizer step; each contributes all of its trained sigmas."""

    def check(self) -> None:
        """Reject impossible settings before any model loads."""
        if self.nft_beta <= 0:
            raise ConfigError(f"update.nft_beta must be > 0, got {self.nft_beta}")
        if self.adv_clip_max <= 0:
            raise ConfigError(f"update.adv_clip_max must be > 0, got {self.adv_clip_max}")
        if self.kl_beta < 0:
            raise ConfigError(f"update.kl_beta must be >= 0, got {self.kl_beta}")
        if self.scale_rewards not in ("group", "batch"):
            raise ConfigError(f"update.scale_rewards={self.scale_rewards!r}; accepted: 'group', 'batch'")
        if not 0 < self.timestep_fraction <= 1:
            raise ConfigError(f"update.timestep_fraction must be in (0, 1], got {self.timestep_fraction}")
        if self.inner_epochs < 1:
            raise ConfigError(f"update.inner_epochs must be >= 1, got {self.inner_epochs}")

    def check_run(self, cfg: Any) -> None:
        if cfg.run.samples_per_prompt < 2:
            raise ConfigError(
                f"run.samples_per_prompt={cfg.run.samples_per_prompt}: diffusion_nft needs groups of at least 2 "
                "images per prompt; accepted: any integer >= 2"
            )
        check_batching("diffusion_nft", cfg.run.batch_size, self.train_batch_size, self.gradient_accumulation_batches)


def nft_loss(v: torch.Tensor, v_old: torch.Tensor, x_sigma: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor,
             r: torch.Tensor, beta: float, adv_clip_max: float, *,
             tensor_stats: bool = False) -> tuple[torch.Tensor, dict[str, Any]]:
    """DiffusionNFT's policy loss for one sigma per sample (see the module docstring).

    ``v``, ``v_old``, ``x_sigma``, ``x0``: ``[b, ...]``; ``sigma`` and ``r``: ``[b]``. Returns the
    mean over the micro-batch and statistics: Python floats, or with ``tensor_stats`` 0-dim tensors
    on the loss's device (no host sync; see :class:`polyrl.stats.UpdateStats`)."""
    dims = tuple(range(1, x0.dim()))
    s = sigma.float().reshape(-1, *([1] * (x0.dim() - 1)))
    v, v_old, xs, x0 = v.float(), v_old.detach().float(), x_sigma.float(), x0.float()
    v_pos = beta * v + (1 - beta) * v_old
    v_neg = (1 + beta) * v_old - beta * v
    x0_pos, x0_neg = xs - s * v_pos, xs - s * v_neg
    with torch.no_grad():
        w_pos = (x0_pos.double() - x0.double()).abs().mean(dims, keepdim=True).clamp(min=1e-5).float()
        w_neg = (x0_neg.double() - x0.double()).abs().mean(dims, keepdim=True).clamp(min=1e-5).float()
    pos = ((x0_pos - x0) ** 2 / w_pos).mean(dims)
    neg = ((x0_neg - x0) ** 2 / w_neg).mean(dims)
    per_sample = (r.float() * pos + (1 - r.float()) * neg) / beta
    loss = (per_sample * adv_clip_max).mean()
    with torch.no_grad():
        stats = {"positive_loss": pos.mean(), "negative_loss": neg.mean(), "unweighted_policy_loss": per_sample.mean(),
                 "old_deviation": ((v.detach() - v_old) ** 2).mean()}
    return loss, (stats if tensor_stats else {k: t.item() for k, t in stats.items()})


class DiffusionNFT(Update):
    """DiffusionNFT (see the module docstring)."""

    def __init__(self, cfg: DiffusionNFTConfig | None = None) -> None:
        self.cfg = cfg or DiffusionNFTConfig()
        self.cfg.check()

    def step(self, ctx: UpdateContext, rollout: Rollout, rewards: torch.Tensor) -> dict[str, float]:
        ctx = UpdateContext.of(ctx)
        cfg = self.cfg
        device = ctx.accelerator.device
        policy = ctx.policy
        adv = flow_advantages(ctx, rollout, rewards, cfg.scale_rewards)
        adv = adv.clamp(-cfg.adv_clip_max, cfg.adv_clip_max).to(device)
        r = (adv / cfg.adv_clip_max / 2 + 0.5).clamp(0, 1)
        rollout = rollout.to(device)
        x0 = rollout.data["final_latents"].float()
        schedule = rollout.data["schedule"].float()  # [B, N]
        b, n = schedule.shape
        n_train = max(1, int(n * cfg.timestep_fraction))
        g = ctx.generator("update")
        noise = torch.randn((b, n_train, *x0.shape[1:]), generator=g).to(device)
        sig = schedule[:, :n_train]  # [B, K]
        x_sigma = (1 - sig.reshape(b, n_train, *([1] * (x0.dim() - 1)))) * x0[:, None] + \
            sig.reshape(b, n_train, *([1] * (x0.dim() - 1))) * noise
        # v_old: the sampling policy's velocity, before any optimizer step of this iteration
        v_old = torch.empty_like(x_sigma)
        with torch.no_grad():
            for s in range(0, b, cfg.train_batch_size):
                idx = torch.arange(s, min(s + cfg.train_batch_size, b))
                mb = rollout.select(idx)
                for j in range(n_train):
                    v_old[idx, j] = policy.rollout_velocity(mb, x_sigma[idx, j], sig[idx, j]).float()
        stats = UpdateStats("loss", "positive_loss", "negative_loss", "unweighted_policy_loss", "old_deviation",
                          "policy_loss", "kl", "grad_norm")
        for _ in range(cfg.inner_epochs):
            perm = torch.randperm(b, generator=g)
            for window in windows(perm, cfg.train_batch_size, cfg.gradient_accumulation_batches):
                calls = [(rollout.select(idx), idx.to(device), j) for idx in window for j in range(n_train)]
                # one loss term per (micro-batch, trained sigma), each with its own backward pass
                for micro, (mb, i, j) in ctx.accumulate(calls, scale=len(calls)):
                    with micro:
                        v = ctx.model(mb, velocity_at=(x_sigma[i, j], sig[i, j]))
                        loss, step_stats = nft_loss(v, v_old[i, j], x_sigma[i, j], x0[i], sig[i, j], r[i],
                                                    cfg.nft_beta, cfg.adv_clip_max, tensor_stats=True)
                        stats.add("policy_loss", loss)
                        if cfg.kl_beta > 0:
                            with torch.no_grad(), policy.adapter_disabled():
                                v_ref = policy.rollout_velocity(mb, x_sigma[i, j], sig[i, j])
                            kl = ((v.float() - v_ref.float()) ** 2).mean()
                            loss = loss + cfg.kl_beta * kl
                            stats.add("kl", kl)
                        micro.backward(loss)  # loss / (micro-batches x trained sigmas)
                    stats.add("loss", loss)
                    stats.update(step_stats)
                stats.add("grad_norm", ctx.optimizer_step())
        stats.add("advantage_abs_mean", adv.abs().mean())
        stats.add("optimality_mean", r.mean())
        out = stats.means()  # the update's one read of its statistics
        out["trained_sigmas"] = float(n_train)
        return out
