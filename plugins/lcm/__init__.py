"""The LCM plugin: latent consistency models trained over their few sampling steps (RLCM).

Components:

* policy ``lcm``: a diffusers ``LatentConsistencyModelPipeline`` (the layout of
  ``SimianLuo/LCM_Dreamshaper_v7``) with a LoRA adapter on its UNet (:class:`LCMPolicy`, config
  :class:`LCMPolicyConfig`);
* sampler ``lcm``: consistency sampling with the guidance embedding as ``timestep_cond``,
  recording every step's re-noising action and its log-probability, and decoding the image from
  the last consistency output (:class:`LCMSampler`, config :class:`LCMSamplerConfig`).

The action density is :func:`lcm_step_with_logprob`: ``π(x_{n+1} | x_n) = N(√ᾱ_{n+1}·f,
(1 − ᾱ_{n+1})·I)``. Any update that works on ``[B, T]`` log-probs trains it (``ddpo``, ``rebel``).
"""

from __future__ import annotations

from polyrl import ComponentSpec, hookimpl
from polyrl.plugins.diffusion import pipeline_capabilities

from .lcm import guidance_embedding, lcm_step_with_logprob, lcm_timesteps
from .policy import LCMPolicy, LCMPolicyConfig
from .sampler import LCMSampler, LCMSamplerConfig

__all__ = [
    "LCMPolicy",
    "LCMPolicyConfig",
    "LCMSampler",
    "LCMSamplerConfig",
    "guidance_embedding",
    "lcm_step_with_logprob",
    "lcm_timesteps",
]


def _make_policy(config: LCMPolicyConfig) -> LCMPolicy:
    return LCMPolicy(config)


def _make_sampler(config: LCMSamplerConfig, policy: LCMPolicy | None = None) -> LCMSampler:
    return LCMSampler(config)


@hookimpl
def polyrl_policies() -> list[ComponentSpec]:
    """The ``lcm`` policy (modality ``image``)."""
    return [
        ComponentSpec(
            name="lcm",
            factory=_make_policy,
            config_cls=LCMPolicyConfig,
            modality="image",
            rollout="consistency_steps",
            capabilities=pipeline_capabilities,
            description="latent consistency model (diffusers LCM pipeline) with a LoRA adapter; RLCM step log-probs",
        )
    ]


@hookimpl
def polyrl_samplers() -> list[ComponentSpec]:
    """The ``lcm`` sampler (modality ``image``, produces ``images``)."""
    return [
        ComponentSpec(
            name="lcm",
            factory=_make_sampler,
            config_cls=LCMSamplerConfig,
            modality="image",
            produces=("images",),
            rollout="consistency_steps",
            description="few-step LCM sampling with the guidance embedding, recording each re-noising step (RLCM)",
        )
    ]
