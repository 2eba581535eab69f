"""The latent-consistency step as a policy (RLCM, Oertell et al. 2024), and its log-probability.

A latent consistency model (LCM) samples in a few steps. At step ``n`` it maps the noisy latent
``x_n`` at timestep ``τ_n`` to a clean estimate, the consistency output

    f = c_out(τ_n)·x̂0 + c_skip(τ_n)·x_n,
    c_skip(τ) = σ_d² / ((s·τ)² + σ_d²),   c_out(τ) = s·τ / sqrt((s·τ)² + σ_d²),   σ_d = 0.5, s = 10,

where ``x̂0`` comes from the UNet output (ε-, x- or v-prediction), and then re-noises it to the next
timestep ``τ_{n+1}``. RLCM reads the re-noising as the policy's action:

    π(x_{n+1} | x_n) = N(√ᾱ_{n+1}·f, (1 − ᾱ_{n+1})·I)

with a fixed, schedule-given variance (no η). As in diffusers' ``LCMScheduler``, the last step
re-noises to its own timestep (``τ_{n+1} = τ_n``); the image is decoded from the last ``f``, so
that last action does not change the reward. The log-probability is averaged over all non-batch
dimensions, as in DDPO.

Timesteps follow RLCM's (and the original LCM's) skipping-step schedule: with ``K`` original
steps (50), the training timesteps are ``k·1000/K − 1`` for ``k = 1..K`` and ``n`` inference steps
take every ``⌊K/n⌋``-th one from the top: ``n = 4 → [999, 759, 519, 279]``. (Recent diffusers
versions space them with ``linspace`` instead, which gives ``[999, 759, 499, 259]``; pass our
timesteps to ``LatentConsistencyModelPipeline(timesteps=...)`` to reproduce a rollout there.)
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "SIGMA_DATA",
    "boundary_scalings",
    "guidance_embedding",
    "lcm_std",
    "lcm_step_with_logprob",
    "lcm_timesteps",
    "next_timesteps",
]

SIGMA_DATA = 0.5
"""``σ_d`` of the consistency boundary condition (LCM's default)."""


def lcm_timesteps(num_steps: int, original_steps: int = 50, num_train_timesteps: int = 1000) -> torch.Tensor:
    """The ``num_steps`` LCM inference timesteps ``[n]`` (long, descending).

    ``original_steps`` is the number of DDIM-solver steps the model was distilled with (LCM's
    ``original_inference_steps``, 50): the candidate timesteps are ``c·k − 1`` for ``k = 1..K``
    with ``c = num_train_timesteps // K``, and every ``K // n``-th one is taken from the top.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if not 1 <= original_steps <= num_train_timesteps:
        raise ValueError(f"original_steps must be in [1, {num_train_timesteps}], got {original_steps}")
    if num_steps > original_steps:
        raise ValueError(
            f"num_steps={num_steps} cannot exceed original_steps={original_steps}: the LCM schedule is a subset "
            "of the distillation solver's timesteps"
        )
    c = num_train_timesteps // original_steps
    origin = torch.arange(1, original_steps + 1, dtype=torch.long) * c - 1
    skipping = original_steps // num_steps
    return origin.flip(0)[::skipping][:num_steps].clone()


def next_timesteps(timesteps: torch.Tensor) -> torch.Tensor:
    """``τ_{n+1}`` for each step of a schedule ``[n]``: the next timestep, and the last one itself
    (the last step re-noises to its own level, as in diffusers' ``LCMScheduler``)."""
    return torch.cat([timesteps[1:], timesteps[-1:]])


def guidance_embedding(w: torch.Tensor, dim: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The guidance-scale embedding ``[B, dim]`` that LCM UNets take as ``timestep_cond``.

    ``w`` ``[B]`` is the LCM guidance weight (``guidance_scale − 1``). The same sinusoidal
    embedding of ``1000·w`` as ``LatentConsistencyModelPipeline.get_guidance_scale_embedding``.
    """
    if w.dim() != 1:
        raise ValueError(f"w must be [B], got {tuple(w.shape)}")
    w = w.to(dtype) * 1000.0
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=dtype, device=w.device) * -(math.log(10000.0) / (half - 1)))
    emb = w[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
    if dim % 2 == 1:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb


def boundary_scalings(timestep: torch.Tensor, timestep_scaling: float = 10.0,
                      sigma_data: float = SIGMA_DATA) -> tuple[torch.Tensor, torch.Tensor]:
    """``(c_skip, c_out)`` of the consistency parameterisation at integer timesteps (float32)."""
    s = timestep.to(torch.float32) * timestep_scaling
    c_skip = sigma_data**2 / (s**2 + sigma_data**2)
    c_out = s / (s**2 + sigma_data**2).sqrt()
    return c_skip, c_out


def _alpha(scheduler, t: torch.Tensor, device: torch.device) -> torch.Tensor:
    alphas_cumprod = scheduler.alphas_cumprod.to(device=device, dtype=torch.float32)
    final = torch.as_tensor(scheduler.final_alpha_cumprod, dtype=torch.float32, device=device)
    t = t.to(device=device, dtype=torch.long)
    return torch.where(t >= 0, alphas_cumprod[t.clamp(min=0)], final)


def lcm_std(scheduler, prev_timestep: torch.Tensor) -> torch.Tensor:
    """The action's standard deviation ``sqrt(1 − ᾱ_{n+1})`` for next timesteps ``[B]``."""
    t = torch.as_tensor(prev_timestep).reshape(-1)
    return (1 - _alpha(scheduler, t, torch.device("cpu"))).sqrt()


def _per_sample(values: torch.Tensor, ndim: int) -> torch.Tensor:
    return values.reshape(values.shape[0], *([1] * (ndim - 1)))


def lcm_step_with_logprob(
    scheduler,
    model_output: torch.Tensor,
    timestep: torch.Tensor | int,
    prev_timestep: torch.Tensor | int,
    sample: torch.Tensor,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One LCM step ``x_n → (f, x_{n+1})`` and the log-probability of ``x_{n+1}`` (RLCM, Oertell et al. 2024).

    Args:
        scheduler: an ``LCMScheduler`` (or any scheduler with ``alphas_cumprod``,
            ``final_alpha_cumprod`` and a config with ``prediction_type``, ``timestep_scaling``);
            only its schedule and config are read.
        model_output: ``[B, C, h, w]`` the UNet output at ``(sample, timestep)`` (with the guidance
            embedding as ``timestep_cond``), read according to ``prediction_type``.
        timestep: ``[B]`` integer timesteps ``τ_n`` (a scalar is used for every sample).
        prev_timestep: ``[B]`` integer next timesteps ``τ_{n+1}`` (the step's own timestep for
            the last step; see :func:`next_timesteps`).
        sample: ``[B, C, h, w]`` the current latents ``x_n``.
        prev_sample: ``[B, C, h, w]`` the next latents to score (training); ``None`` draws them.
        generator: seeds ``z`` when neither ``prev_sample`` nor ``noise`` is given (drawn on the
            generator's device in float32, then moved to ``sample``'s device).
        noise: ``[B, C, h, w]`` standard-normal ``z`` to use instead of drawing it.

    Returns:
        ``(prev_sample, denoised, log_prob)``: ``prev_sample`` ``[B, C, h, w]`` (the given one or
        ``√ᾱ_{n+1}·f + sqrt(1 − ᾱ_{n+1})·z``), ``denoised`` the consistency output ``f`` (float32),
        and ``log_prob`` ``[B]`` float32, the log-density of ``prev_sample`` under
        ``N(√ᾱ_{n+1}·f, (1 − ᾱ_{n+1})·I)`` averaged over the non-batch dimensions. Gradients flow
        through ``f`` (the model output), never through a given ``prev_sample``.
    """
    cfg = scheduler.config
    if cfg.get("thresholding", False):
        raise NotImplementedError("lcm_step_with_logprob does not support dynamic thresholding")
    b, nd, device = sample.shape[0], sample.dim(), sample.device

    def per_batch(v: torch.Tensor | int, name: str) -> torch.Tensor:
        v = torch.as_tensor(v, device=device)
        if v.dim() == 0:
            v = v.expand(b)
        if v.shape != (b,):
            raise ValueError(f"{name} must be [B={b}] or a scalar, got {tuple(v.shape)}")
        return v.long()

    t, t_next = per_batch(timestep, "timestep"), per_batch(prev_timestep, "prev_timestep")
    alpha_t = _per_sample(_alpha(scheduler, t, device), nd)
    alpha_next = _per_sample(_alpha(scheduler, t_next, device), nd)
    beta_t = 1 - alpha_t

    x = sample.float()
    out = model_output.float()
    kind = cfg.prediction_type
    if kind == "epsilon":
        pred_x0 = (x - beta_t.sqrt() * out) / alpha_t.sqrt()
    elif kind == "sample":
        pred_x0 = out
    elif kind == "v_prediction":
        pred_x0 = alpha_t.sqrt() * x - beta_t.sqrt() * out
    else:
        raise ValueError(f"prediction_type {kind!r} is not one of 'epsilon', 'sample', 'v_prediction'")
    if cfg.get("clip_sample", False):
        r = cfg.clip_sample_range
        pred_x0 = pred_x0.clamp(-r, r)

    c_skip, c_out = boundary_scalings(t, float(cfg.get("timestep_scaling", 10.0)))
    denoised = _per_sample(c_out, nd) * pred_x0 + _per_sample(c_skip, nd) * x

    mean = alpha_next.sqrt() * denoised
    std = (1 - alpha_next).sqrt()
    if prev_sample is None:
        if noise is None:
            gen_device = generator.device if generator is not None else torch.device("cpu")
            noise = torch.randn(sample.shape, generator=generator, device=gen_device, dtype=torch.float32)
        prev = (mean + std * noise.to(device=device, dtype=torch.float32)).to(sample.dtype)
    else:
        prev = prev_sample
    diff = prev.detach().float() - mean
    log_prob = -(diff**2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    log_prob = log_prob.mean(dim=tuple(range(1, nd)))
    return prev, denoised, log_prob
