"""One DDIM step that also returns the log-probability of the step it took (DDPO's action density).

With ``η > 0`` a DDIM step is a Gaussian policy: ``x_prev ~ N(μ_θ(x_t, t), σ_t² I)``. This module
computes ``μ`` and ``σ_t`` exactly as :meth:`diffusers.DDIMScheduler.step` does and scores either
the sample it draws or a given ``prev_sample`` (at training time, the latent stored by the
sampler). Timesteps may differ per sample, because DDPO visits the denoising steps of each sample
in its own shuffled order.
"""

from __future__ import annotations

import math

import torch

__all__ = ["ddim_std", "ddim_step_with_logprob", "previous_timesteps"]


def _per_sample(values: torch.Tensor, ndim: int) -> torch.Tensor:
    """Reshape ``[B]`` to ``[B, 1, ..., 1]`` so that it broadcasts against an ``ndim`` tensor."""
    return values.reshape(values.shape[0], *([1] * (ndim - 1)))


def previous_timesteps(scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """The timestep each DDIM step lands on, ``t − num_train_timesteps // num_inference_steps``
    (negative after the last step), for timesteps of the schedule ``scheduler.set_timesteps`` made.
    The sampler records them, so that rescoring a step never reads the scheduler's mutable
    ``num_inference_steps``."""
    if scheduler.num_inference_steps is None:
        raise ValueError("the scheduler has no inference steps: call scheduler.set_timesteps(num_steps) first")
    return timesteps.to(torch.long) - scheduler.config.num_train_timesteps // scheduler.num_inference_steps


def _alphas(scheduler, timestep: torch.Tensor, device: torch.device,
            prev_timestep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ᾱ_t, ᾱ_prev)``, each ``[B]`` float32 on ``device``, for integer timesteps ``[B]``.

    The previous timestep is ``prev_timestep`` when given, else (diffusers' rule)
    ``t − num_train_timesteps // num_inference_steps``; where it is negative (the last step),
    ``ᾱ_prev`` is the scheduler's ``final_alpha_cumprod`` (1 when ``set_alpha_to_one``, else
    ``ᾱ_0``), as in diffusers. Only the scheduler's fixed schedule (``alphas_cumprod``,
    ``final_alpha_cumprod``) is read when ``prev_timestep`` is given.
    """
    alphas_cumprod = scheduler.alphas_cumprod.to(device=device, dtype=torch.float32)
    final = torch.as_tensor(scheduler.final_alpha_cumprod, dtype=torch.float32, device=device)
    t = timestep.to(device=device, dtype=torch.long)
    if prev_timestep is None:
        prev = previous_timesteps(scheduler, t)
    else:
        prev = torch.as_tensor(prev_timestep, device=device).to(torch.long).expand_as(t)
    alpha_t = alphas_cumprod[t]
    alpha_prev = torch.where(prev >= 0, alphas_cumprod[prev.clamp(min=0)], final)
    return alpha_t, alpha_prev


def ddim_std(scheduler, timestep: torch.Tensor, eta: float, prev_timestep: torch.Tensor | None = None) -> torch.Tensor:
    """``σ_t = η·sqrt((1−ᾱ_prev)/(1−ᾱ_t)·(1−ᾱ_t/ᾱ_prev))`` for timesteps ``[B]`` (returns ``[B]``)."""
    prev = None if prev_timestep is None else torch.as_tensor(prev_timestep).reshape(-1)
    alpha_t, alpha_prev = _alphas(scheduler, torch.as_tensor(timestep).reshape(-1), torch.device("cpu"), prev)
    return eta * ((1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev)).sqrt()


def ddim_step_with_logprob(
    scheduler,
    model_output: torch.Tensor,
    timestep: torch.Tensor | int,
    sample: torch.Tensor,
    eta: float,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
    prev_timestep: torch.Tensor | int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM step ``x_t → x_prev`` and its log-probability (DDPO, Black et al. 2023).

    Args:
        scheduler: a :class:`diffusers.DDIMScheduler` (or one with the same config fields); only
            its fixed schedule (``alphas_cumprod``, ``final_alpha_cumprod``) and config are read,
            and, when ``prev_timestep`` is not given, its ``num_inference_steps`` (set by
            ``set_timesteps``).
        model_output: ``[B, C, H, W]`` the (guided) UNet output at ``(sample, timestep)``, read
            according to ``scheduler.config.prediction_type`` (``epsilon``, ``sample`` or
            ``v_prediction``).
        timestep: ``[B]`` integer timesteps, one per sample (an int or a 0-d tensor is used for
            every sample).
        sample: ``[B, C, H, W]`` the current latents ``x_t``.
        eta: DDIM's η; ``σ_t`` scales with it. ``η = 1`` is DDPO's setting.
        prev_sample: ``[B, C, H, W]`` the latents to score (training); ``None`` draws them
            (sampling).
        generator: seeds the draw of ``z`` when ``prev_sample`` and ``noise`` are ``None``. ``z``
            is drawn on the generator's device (a CPU generator for device-independent results)
            in float32 and then moved to ``sample``'s device.
        noise: ``[B, C, H, W]`` standard-normal ``z`` to use instead of drawing it.
        prev_timestep: ``[B]`` the timesteps the steps land on (recorded by the sampler, see
            :func:`previous_timesteps`); ``None`` computes them from the scheduler's
            ``num_inference_steps`` as diffusers does.

    Returns:
        ``(prev_sample, log_prob)``: ``prev_sample`` ``[B, C, H, W]`` (the given one, or
        ``μ + σ_t·z``) and ``log_prob`` ``[B]`` float32, the log-density of ``prev_sample`` under
        ``N(μ, σ_t²)`` averaged over all non-batch dimensions. It is differentiable in
        ``model_output`` (gradients flow through ``μ``, never through a given ``prev_sample``).
        With ``η = 0`` the step is deterministic and has no density: ``log_prob`` is all zeros.
    """
    if scheduler.config.get("thresholding", False):
        raise NotImplementedError("ddim_step_with_logprob does not support dynamic thresholding")
    b, nd = sample.shape[0], sample.dim()
    t = torch.as_tensor(timestep, device=sample.device)
    if t.dim() == 0:
        t = t.expand(b)
    if t.shape != (b,):
        raise ValueError(f"timestep must be [B={b}] or a scalar, got {tuple(t.shape)}")

    alpha_t, alpha_prev = _alphas(scheduler, t, sample.device, prev_timestep)
    variance = (1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev)
    std = eta * variance.sqrt()
    alpha_t, alpha_prev = _per_sample(alpha_t, nd), _per_sample(alpha_prev, nd)
    std_b = _per_sample(std, nd)
    beta_t = 1 - alpha_t

    # x̂0 and ε̂ from the model output
    kind = scheduler.config.prediction_type
    x = sample.float()
    out = model_output.float()
    if kind == "epsilon":
        pred_x0 = (x - beta_t.sqrt() * out) / alpha_t.sqrt()
        pred_eps = out
    elif kind == "sample":
        pred_x0 = out
        pred_eps = (x - alpha_t.sqrt() * pred_x0) / beta_t.sqrt()
    elif kind == "v_prediction":
        pred_x0 = alpha_t.sqrt() * x - beta_t.sqrt() * out
        pred_eps = alpha_t.sqrt() * out + beta_t.sqrt() * x
    else:
        raise ValueError(f"prediction_type {kind!r} is not one of 'epsilon', 'sample', 'v_prediction'")
    if scheduler.config.get("clip_sample", False):
        r = scheduler.config.clip_sample_range
        pred_x0 = pred_x0.clamp(-r, r)

    # μ = sqrt(ᾱ_prev)·x̂0 + sqrt(1 − ᾱ_prev − σ²)·ε̂
    mean = alpha_prev.sqrt() * pred_x0 + (1 - alpha_prev - std_b**2).sqrt() * pred_eps

    if prev_sample is None:
        if eta > 0:
            if noise is None:
                gen_device = generator.device if generator is not None else torch.device("cpu")
                noise = torch.randn(sample.shape, generator=generator, device=gen_device, dtype=torch.float32)
            prev = mean + std_b * noise.to(device=sample.device, dtype=torch.float32)
        else:
            prev = mean
        prev = prev.to(sample.dtype)
    else:
        prev = prev_sample

    if eta > 0:
        diff = prev.detach().float() - mean
        log_prob = -(diff**2) / (2 * std_b**2) - torch.log(std_b) - 0.5 * math.log(2 * math.pi)
        log_prob = log_prob.mean(dim=tuple(range(1, nd)))
    else:
        log_prob = torch.zeros(b, device=sample.device)
    return prev, log_prob
