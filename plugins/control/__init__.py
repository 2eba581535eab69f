"""Continuous control: Gaussian policies, environment sampler, SAC, SMILING and adversarial imitation rewards.

Components (select them in a run config):

* policy ``gaussian`` (:mod:`.policy`): diagonal Gaussian MLP, tanh-squashed or clipped, optional value head;
* sampler ``gym`` (:mod:`.sampler`): one episode per context in a gymnasium vector env;
* updates ``sac`` (:mod:`.sac`) and ``bc`` (:mod:`.bc`);
* rewards ``smiling`` (:mod:`.smiling`) and ``discriminator`` (:mod:`.discriminator`, GAIL/AIRL forms,
  gradient penalty, AILBoost weighted replay), both learned from demonstrations (:mod:`.demos`).

The environment reward itself is ``env_reward`` from :mod:`polyrl.rewards`.
"""

from __future__ import annotations

from polyrl import ComponentSpec, hookimpl
from polyrl.types import ConfigError

from .bc import BCConfig, BehaviourCloning
from .discriminator import DiscriminatorConfig, DiscriminatorReward
from .policy import GaussianPolicy, GaussianPolicyConfig
from .sac import SAC, SACConfig
from .sampler import GymSampler, GymSamplerConfig
from .smiling import SmilingConfig, SmilingReward

__all__ = [
    "BCConfig", "BehaviourCloning", "DiscriminatorConfig", "DiscriminatorReward", "GaussianPolicy",
    "GaussianPolicyConfig", "GymSampler", "GymSamplerConfig", "SAC", "SACConfig", "SmilingConfig", "SmilingReward",
]


def gaussian_capabilities(config: GaussianPolicyConfig) -> set[str]:
    """Box actions with per-step log-probs, entropies and action likelihoods; SAC's squashed
    parameterisation with ``squash``; a value head with ``value_head``. No reference policy (it is
    trained from scratch)."""
    caps = {"box_actions", "step_log_probs", "entropy", "action_likelihood"}
    if config.squash:
        caps.add("squashed_actions")
    if config.value_head:
        caps.add("value_head")
    return caps


@hookimpl
def polyrl_policies():
    return [ComponentSpec("gaussian", GaussianPolicy, GaussianPolicyConfig, modality="env",
                          rollout=("env_steps", "transitions"), capabilities=gaussian_capabilities,
                          description="diagonal Gaussian MLP policy for gymnasium Box actions (tanh-squashed or clipped, optional value head)")]


@hookimpl
def polyrl_samplers():
    return [ComponentSpec("gym", lambda cfg, policy=None: GymSampler(cfg, policy), GymSamplerConfig, modality="env",
                          produces=("env_rewards", "transitions"), rollout=("env_steps", "transitions"),
                          requires={"box_actions"},
                          description="one episode per context in a gymnasium vector env (observations, actions, env rewards)")]


@hookimpl
def polyrl_rewards():
    return [
        ComponentSpec("smiling", lambda cfg, policy=None: SmilingReward(cfg, policy), SmilingConfig, modality="env",
                      reads=("transitions",),
                      description="SMILING: expert-vs-learner diffusion score-matching cost (learned from demonstrations)"),
        ComponentSpec("discriminator", lambda cfg, policy=None: DiscriminatorReward(cfg, policy), DiscriminatorConfig,
                      modality="env", reads=("transitions",),
                      description="GAIL/DAC discriminator reward with gradient penalty; AIRL form; AILBoost weighted replay"),
    ]


@hookimpl
def polyrl_updates():
    return [
        ComponentSpec("sac", SAC, SACConfig, accepts=("transitions",),
                      requires={"squashed_actions": "set policy.squash: true"}, description="soft actor-critic: replay buffer, twin critics, learned temperature"),
        ComponentSpec("bc", BehaviourCloning, BCConfig, accepts=("env_steps", "transitions"),
                      requires={"action_likelihood"}, description="behaviour cloning on demonstrations (log-likelihood or MSE)"),
    ]


@hookimpl
def polyrl_configure(config):
    """Episodes of the ``gym`` sampler are named by their prompt: it must be the policy's environment."""
    if not isinstance(config.sampler.params, GymSamplerConfig) or not isinstance(config.policy.params, GaussianPolicyConfig):
        return
    env = config.policy.params.env
    items = config.prompts.items
    if items is not None and any(p != env for p in items):
        raise ConfigError(
            f"prompts.items: with the gym sampler each prompt is one episode of the policy's environment; "
            f"use prompts.items: [{env}] (got {items})"
        )
