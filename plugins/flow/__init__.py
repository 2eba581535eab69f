"""The flow plugin: flow-matching text-to-image transformers (SD3 / FLUX layout) trained with
Flow-GRPO or DiffusionNFT.

Components:

* policy ``flow``: a diffusers ``StableDiffusion3Pipeline`` or ``FluxPipeline`` with a LoRA adapter
  on the transformer's attention, joint attention included (:class:`FlowPolicy`, config
  :class:`FlowPolicyConfig`);
* sampler ``flow_sde``: Flow-GRPO's marginal-preserving SDE, all steps or a window of ``k``
  stochastic steps (Flow-GRPO-Fast / MixGRPO), guidance optional, the scheduler's shift honoured
  (:class:`FlowSDESampler`); the step and its log-prob are :func:`sde_step_with_logprob`;
* update ``flow_grpo``: Flow-GRPO's clipped objective with the KL on the step means
  (:class:`FlowGRPO`);
* update ``diffusion_nft``: DiffusionNFT's negative-aware flow matching on the clean samples
  (:class:`DiffusionNFT`).

The ``flow_steps`` rollouts also train with the shared on-policy updates (``grpo``, ``ddpo``,
``rebel``...), whose KL, where they have one, is on the log-probs.
"""

from __future__ import annotations

from polyrl import ComponentSpec, hookimpl

from .grpo import FlowGRPO, FlowGRPOConfig
from .nft import DiffusionNFT, DiffusionNFTConfig
from .policy import FlowPolicy, FlowPolicyConfig
from .sampler import FlowSDESampler, FlowSDESamplerConfig
from .sde import ode_step, sde_step_with_logprob

__all__ = [
    "DiffusionNFT",
    "DiffusionNFTConfig",
    "FlowGRPO",
    "FlowGRPOConfig",
    "FlowPolicy",
    "FlowPolicyConfig",
    "FlowSDESampler",
    "FlowSDESamplerConfig",
    "ode_step",
    "sde_step_with_logprob",
]

#: What an update needs from the policy: the step means with ``forward(..., with_mean=True)``.
_STEP_MEANS = "flow_step_means"
#: DiffusionNFT: the velocity at arbitrary latents with ``forward(..., velocity_at=(x, sigma))``.
_VELOCITY = "flow_velocity"


def _policy_capabilities(config: FlowPolicyConfig) -> set[str]:
    """Per-step log-probs, the reference (adapter disabled), step means and velocities."""
    return {"step_log_probs", "reference", _STEP_MEANS, _VELOCITY}


def _grpo_requires(config: FlowGRPOConfig) -> dict[str, str]:
    need = {_STEP_MEANS: "the flow policy's step means (policy 'flow')"}
    if config.beta > 0:
        need["reference"] = "for the KL term; set update.beta: 0 to train without it"
    return need


def _nft_requires(config: DiffusionNFTConfig) -> dict[str, str]:
    need = {_VELOCITY: "the flow policy's velocity at noised clean samples (policy 'flow')"}
    if config.kl_beta > 0:
        need["reference"] = "for the KL term; set update.kl_beta: 0 to train without it"
    return need


def _make_policy(config: FlowPolicyConfig) -> FlowPolicy:
    return FlowPolicy(config)


def _make_sampler(config: FlowSDESamplerConfig, policy: FlowPolicy | None = None) -> FlowSDESampler:
    return FlowSDESampler(config)


@hookimpl
def polyrl_policies() -> list[ComponentSpec]:
    """The ``flow`` policy (modality ``image``)."""
    return [
        ComponentSpec(
            name="flow",
            factory=_make_policy,
            config_cls=FlowPolicyConfig,
            modality="image",
            rollout="flow_steps",
            capabilities=_policy_capabilities,
            description="flow-matching transformer (diffusers SD3 / FLUX layout) with LoRA on its (joint) attention",
        )
    ]


@hookimpl
def polyrl_samplers() -> list[ComponentSpec]:
    """The ``flow_sde`` sampler (modality ``image``, produces ``images``)."""
    return [
        ComponentSpec(
            name="flow_sde",
            factory=_make_sampler,
            config_cls=FlowSDESamplerConfig,
            modality="image",
            produces=("images",),
            rollout="flow_steps",
            description="Flow-GRPO's marginal-preserving SDE (all steps or a window of k), recording each stochastic step",
        )
    ]


@hookimpl
def polyrl_updates() -> list[ComponentSpec]:
    """``flow_grpo`` and ``diffusion_nft`` (flow rollouts only)."""
    return [
        ComponentSpec("flow_grpo", FlowGRPO, FlowGRPOConfig, accepts=("flow_steps",), requires=_grpo_requires,
                      description="Flow-GRPO: clipped ratio per SDE step, group-normalised advantages, KL on the step means"),
        ComponentSpec("diffusion_nft", DiffusionNFT, DiffusionNFTConfig, accepts=("flow_steps",), requires=_nft_requires,
                      description="DiffusionNFT: negative-aware flow matching on the clean samples (no log-probs, no guidance)"),
    ]
