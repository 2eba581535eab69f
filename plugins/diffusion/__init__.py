"""The diffusion plugin: Stable-Diffusion-1.x policies trained over DDIM denoising steps (DDPO).

Components:

* policy ``diffusion``: a diffusers SD 1.x pipeline with a LoRA adapter on its UNet
  (:class:`DiffusionPolicy`, config :class:`DiffusionPolicyConfig`);
* sampler ``ddim``: classifier-free-guided DDIM with η > 0 that records every step and
  produces ``images`` (:class:`DDIMSampler`, config :class:`DDIMSamplerConfig`).

The step density itself is :func:`ddim_step_with_logprob`.
"""

from __future__ import annotations

from polyrl import ComponentSpec, hookimpl

from .ddim import ddim_step_with_logprob
from .policy import DiffusionPolicy, DiffusionPolicyConfig
from .sampler import DDIMSampler, DDIMSamplerConfig

__all__ = [
    "DDIMSampler",
    "DDIMSamplerConfig",
    "DiffusionPolicy",
    "DiffusionPolicyConfig",
    "ddim_step_with_logprob",
]


def pipeline_capabilities(config: DiffusionPolicyConfig) -> set[str]:
    """What a diffusers-pipeline policy offers: per-step log-probs, and a reference policy (the
    adapter disabled) unless the whole UNet is trained."""
    caps = {"step_log_probs"}
    if not config.train_full_unet:
        caps.add("reference")
    return caps


def _make_policy(config: DiffusionPolicyConfig) -> DiffusionPolicy:
    return DiffusionPolicy(config)


def _make_sampler(config: DDIMSamplerConfig, policy: DiffusionPolicy | None = None) -> DDIMSampler:
    return DDIMSampler(config)


@hookimpl
def polyrl_policies() -> list[ComponentSpec]:
    """The ``diffusion`` policy (modality ``image``)."""
    return [
        ComponentSpec(
            name="diffusion",
            factory=_make_policy,
            config_cls=DiffusionPolicyConfig,
            modality="image",
            rollout="diffusion_steps",
            capabilities=pipeline_capabilities,
            description="Stable Diffusion 1.x (diffusers) with a LoRA adapter on the UNet; DDIM step log-probs",
        )
    ]


@hookimpl
def polyrl_samplers() -> list[ComponentSpec]:
    """The ``ddim`` sampler (modality ``image``, produces ``images``)."""
    return [
        ComponentSpec(
            name="ddim",
            factory=_make_sampler,
            config_cls=DDIMSamplerConfig,
            modality="image",
            produces=("images",),
            rollout="diffusion_steps",
            description="stochastic DDIM (eta > 0) with classifier-free guidance, recording every step (DDPO)",
        )
    ]
