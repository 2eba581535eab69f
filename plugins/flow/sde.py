"""The stochastic step of a flow-matching sampler and its log-density (Flow-GRPO).

A rectified-flow model predicts the velocity ``v(x_σ, σ) ≈ ε − x0`` on the path
``x_σ = (1 − σ)·x0 + σ·ε``; the Euler ODE step from ``σ`` to the next sigma ``σ'`` is
``x' = x + (σ' − σ)·v``. Flow-GRPO (Liu et al. 2025, "Flow-GRPO: Training Flow Matching Models
via Online RL", arXiv:2505.05470, ``sde_step_with_logprob`` in ``flow_grpo/diffusers_patch/
sd3_sde_with_logprob.py`` of yifan123/flow_grpo) replaces it by an SDE whose marginals are those of
the ODE, discretised with Euler–Maruyama. With ``dt = σ' − σ`` (negative), the noise level ``a``
and::

    s    = a · sqrt(σ / (1 − σ))            (σ = 1 replaced by σ_max, the first sigma below 1)
    mean = x · (1 + s²·dt / (2σ)) + v · (1 + s²·(1 − σ) / (2σ)) · dt
    x'   = mean + s · sqrt(−dt) · ε,        ε ~ N(0, I)

the step is the Gaussian ``N(mean, (s·sqrt(−dt))²·I)``, and its log-probability is that density
at the stored ``x'``, averaged (not summed) over the latent dimensions. Everything is computed in
float32 whatever the model's dtype.
"""

from __future__ import annotations

import math

import torch

__all__ = ["flow_noise_scale", "ode_step", "sde_step_with_logprob"]


def _per_sample(value: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """``value`` (a scalar or ``[B]``) as float32 ``[B, 1, ..., 1]`` broadcasting against ``like``."""
    t = torch.as_tensor(value, dtype=torch.float32, device=like.device)
    if t.dim() == 0:
        t = t.expand(like.shape[0])
    return t.reshape(-1, *([1] * (like.dim() - 1)))


def flow_noise_scale(sigma: torch.Tensor | float, noise_level: float, sigma_max: float) -> torch.Tensor:
    """``s = a·sqrt(σ / (1 − σ))`` with ``σ = 1`` replaced by ``sigma_max`` in the denominator."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32)
    denom = 1 - torch.where(sigma >= 1, torch.full_like(sigma, float(sigma_max)), sigma)
    return torch.sqrt(sigma / denom) * float(noise_level)


def sde_step_with_logprob(
    velocity: torch.Tensor,
    sample: torch.Tensor,
    sigma: torch.Tensor | float,
    sigma_next: torch.Tensor | float,
    noise_level: float,
    sigma_max: float,
    prev_sample: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One Flow-GRPO SDE step (see the module docstring).

    Args:
        velocity: the model output ``v`` at ``sample`` (any shape ``[B, ...]``).
        sample: the current latents ``x``.
        sigma, sigma_next: ``σ`` and ``σ'``, scalars or ``[B]`` (``σ' < σ``).
        noise_level: ``a`` (> 0).
        sigma_max: the schedule's first sigma below 1 (``scheduler.sigmas[1]`` when the schedule
            starts at 1), used in place of ``σ = 1`` in ``s``.
        prev_sample: the stored next latents ``x'`` to score (training); when ``None`` the step is
            sampled with ``noise`` (sampling).
        noise: ``ε`` of the shape of ``sample`` (default: ``torch.randn_like``).

    Returns:
        ``(x', log_prob [B], mean, std [B, 1, ..., 1])``, all float32; ``std = s·sqrt(−dt)``. The
        log-prob is differentiable in ``velocity`` (``x'`` is detached).
    """
    v = velocity.float()
    x = sample.float()
    sig = _per_sample(sigma, x)
    sig_next = _per_sample(sigma_next, x)
    dt = sig_next - sig
    s = flow_noise_scale(sig, noise_level, sigma_max).to(x.device)
    mean = x * (1 + s**2 / (2 * sig) * dt) + v * (1 + s**2 * (1 - sig) / (2 * sig)) * dt
    std = s * torch.sqrt(-dt)
    if prev_sample is None:
        eps = torch.randn_like(x) if noise is None else noise.to(device=x.device, dtype=torch.float32)
        prev_sample = mean + std * eps
    x_next = prev_sample.detach().float()
    log_prob = -((x_next - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return x_next, log_prob.mean(dim=tuple(range(1, log_prob.dim()))), mean, std


def ode_step(velocity: torch.Tensor, sample: torch.Tensor, sigma: torch.Tensor | float,
             sigma_next: torch.Tensor | float) -> torch.Tensor:
    """The deterministic Euler step ``x + (σ' − σ)·v`` (float32): what the flow's scheduler does."""
    x = sample.float()
    return x + (_per_sample(sigma_next, x) - _per_sample(sigma, x)) * velocity.float()
