"""lilGym: natural-language visual reasoning environments (Wu et al., ACL 2023), clean-room.

* gymnasium environments ``polyrl/TowerScratch-v0``, ``polyrl/TowerFlipIt-v0``,
  ``polyrl/ScatterScratch-v0``, ``polyrl/ScatterFlipIt-v0`` (:mod:`.env`; registered when this
  package is imported with gymnasium already loaded, when :mod:`.env` is imported, or by
  :func:`register_envs`; see :mod:`.registration`);
* a safe executor for the statements' programs (:mod:`.executor`, over the world DSL of
  :mod:`.dsl` and :mod:`.world`), a PIL renderer (:mod:`.render`), the action sets (:mod:`.actions`)
  and the data loader and downloader (:mod:`.data`).

polyrl components (select them in a run config):

* sampler ``lilgym``: episodes of a task with the current policy (env rewards per step);
* policy ``lilgym_cnn``: factorised categorical policy on a CNN plus a sentence encoder;
* policy ``lilgym_lm`` and sampler ``lilgym_text``: a causal LM that writes each action as text
  (:mod:`.lm`), trained with the text updates over multi-turn episodes;
* rewards ``lilgym_success``, ``lilgym_steps`` and ``lilgym_parse_rate``: the episode's success, its
  length and (LM agent) the fraction of its turns that parse (weight 0 logs them).

The environment reward is ``env_reward`` from :mod:`polyrl.rewards`. Example::

    prompts: {items: [TowerScratch]}
    policy:  {name: lilgym_cnn, appearance: tower}
    sampler: {name: lilgym, task: TowerScratch, split: train}
    rewards: {env_reward: {weight: 1.0}, lilgym_success: {weight: 0.0}}
    update:  {name: ppo, kl_coef: 0.0}
"""

from __future__ import annotations

from polyrl import ComponentSpec, hookimpl
from polyrl.types import ConfigError

import sys

from .registration import register_envs

if "gymnasium" in sys.modules:  # gymnasium.make("polyrl.plugins.lilgym:polyrl/TowerScratch-v0") imports us
    register_envs()  # otherwise importing .env does, so that loading the host needs no gymnasium

__all__ = ["register_envs"]


@hookimpl
def polyrl_policies():
    from .lm import LilGymLMConfig, LilGymLMPolicy
    from .policy import LilGymCNNConfig, LilGymCNNPolicy

    return [
        ComponentSpec("lilgym_cnn", LilGymCNNPolicy, LilGymCNNConfig, modality="env", rollout="env_steps",
                      # no step_log_probs: forward(steps=...) needs a real step among those asked for, which
                      # step-subset updates (ddpo) do not guarantee on episodes of different lengths
                      capabilities=lambda c: {"lilgym_actions", "entropy"} | ({"value_head"} if c.value_head else set()),
                      description="lilGym agent: CNN over the image + transformers sentence encoder, factorised masked actions, value head"),
        ComponentSpec("lilgym_lm", LilGymLMPolicy, LilGymLMConfig, modality="env", rollout="env_steps",
                      capabilities=lambda c: {"lilgym_text_actions", "step_log_probs", "entropy", "reference"} | (
                          {"value_head"} if c.value_head else set()),
                      description="lilGym agent: a causal LM that reads the sentence and the world in words and writes the action"),
    ]


@hookimpl
def polyrl_samplers():
    from .lm import LilGymTextSampler, LilGymTextSamplerConfig
    from .sampler import LilGymSampler, LilGymSamplerConfig

    return [
        ComponentSpec("lilgym", lambda cfg, policy=None: LilGymSampler(cfg, policy), LilGymSamplerConfig,
                      modality="env", produces=("env_rewards", "lilgym_success", "episode_lengths", "images", "texts"),
                      rollout="env_steps", requires={"lilgym_actions"},
                      description="lilGym episodes (TowerScratch, TowerFlipIt, ScatterScratch, ScatterFlipIt) with action masks"),
        ComponentSpec("lilgym_text", lambda cfg, policy=None: LilGymTextSampler(cfg, policy), LilGymTextSamplerConfig,
                      modality="env", produces=("env_rewards", "lilgym_success", "episode_lengths", "lilgym_parse_rate", "texts"),
                      rollout="env_steps", requires={"lilgym_text_actions"},
                      description="multi-turn lilGym episodes for a language-model agent (actions written as text)"),
    ]


@hookimpl
def polyrl_rewards():
    from .lm import LilGymParseRate, LilGymParseRateConfig
    from .rewards import LilGymSteps, LilGymStepsConfig, LilGymSuccess, LilGymSuccessConfig

    return [
        ComponentSpec("lilgym_success", lambda cfg, policy=None: LilGymSuccess(cfg), LilGymSuccessConfig,
                      modality="env", reads=("lilgym_success",),
                      description="1 for a successful lilGym episode (weight 0 to log the success rate)"),
        ComponentSpec("lilgym_steps", lambda cfg, policy=None: LilGymSteps(cfg), LilGymStepsConfig,
                      modality="env", reads=("episode_lengths",),
                      description="environment steps of each lilGym episode (weight 0 to log the mean episode length)"),
        ComponentSpec("lilgym_parse_rate", lambda cfg, policy=None: LilGymParseRate(cfg), LilGymParseRateConfig,
                      modality="env", reads=("lilgym_parse_rate",),
                      description="fraction of the LM agent's turns whose text names an action (weight 0 to log the parse rate)"),
    ]


@hookimpl
def polyrl_iteration_start(trainer, iteration):
    """Tell a lilGym sampler which training iteration it samples (for its stop-forcing schedule)."""
    sampler = getattr(trainer, "sampler", None)
    if hasattr(sampler, "stop_forcing_now"):
        sampler.iteration = int(iteration)


@hookimpl
def polyrl_configure(config):
    """The lilGym sampler's task and the lilGym policy's appearance must agree (which policy pairs
    with which sampler is declared on their specs and checked by the host)."""
    task = getattr(config.sampler.params, "task", None)
    from .data import TASKS

    if task not in TASKS:
        return
    appearance = TASKS[task][0]
    policy_appearance = getattr(config.policy.params, "appearance", None)
    if policy_appearance not in (None, appearance):
        raise ConfigError(
            f"policy.appearance={policy_appearance!r} does not match sampler.task={config.sampler.params.task!r} "
            f"({appearance}); set policy.appearance: {appearance}"
        )
