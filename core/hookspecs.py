"""The hooks a polyrl plugin can implement.

There are three kinds:

* **Registration hooks** (``polyrl_policies``, ``polyrl_samplers``, ``polyrl_rewards``,
  ``polyrl_updates``) are called once when the host is built, on every process, and every plugin
  contributes. They return lists of :class:`polyrl.types.ComponentSpec`. Installing a plugin only
  makes components *available*; the run configuration *selects* them.
* **Loop hooks** (``polyrl_sample``, ``polyrl_reward``, ``polyrl_update``) are ``firstresult``:
  the built-in defaults are registered ``trylast`` and simply call the selected component, so a
  plugin may replace a phase (return a value) or wrap it (``@hookimpl(wrapper=True)``) to observe
  or modify what flows through. They run once per iteration on every process, never per token or
  per denoising step.
* **Event hooks** (``polyrl_configure``, ``polyrl_run_start``, ``polyrl_iteration_start``,
  ``polyrl_iteration_end``, ``polyrl_run_end``) are broadcast to every plugin; return values are
  ignored.

Components have a lifecycle of their own, declared on the base classes of
:mod:`polyrl.types`: the loop calls ``setup(trainer)`` on the policy, sampler, update and rewards
before the first iteration (just before ``polyrl_run_start``), ``Reward.learn`` after each update,
and ``close()`` on each when the run stops (after ``polyrl_run_end``).

Shapes: ``B`` is the number of samples this process holds in the iteration, ``T`` the number of
decision steps (tokens, denoising steps, env steps).

Example plugin::

    from polyrl import hookimpl, ComponentSpec, Reward

    class Brightness(Reward):
        reads = "images"
        def __call__(self, rollout):
            return rollout.outputs["images"].mean(dim=(1, 2, 3))

    @dataclass
    class BrightnessConfig:
        pass

    @hookimpl
    def polyrl_rewards():
        return [ComponentSpec("brightness", lambda cfg, policy=None: Brightness(),
                              BrightnessConfig, reads=("images",))]
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    import torch

    from .config import RunConfig
    from .loop import Trainer
    from .types import ComponentSpec, Context, RewardOutput, Rollout

hookspec = pluggy.HookspecMarker("polyrl")


# ---------------------------------------------------------------- registration hooks
@hookspec
def polyrl_policies() -> list[ComponentSpec]:
    """Return the policy components this plugin provides (list of ``ComponentSpec``).

    Called once per process when the host is built. A policy's factory receives its config
    dataclass and returns a :class:`polyrl.types.Policy`.
    """


@hookspec
def polyrl_samplers() -> list[ComponentSpec]:
    """Return the sampler components this plugin provides (list of ``ComponentSpec``).

    Called once per process. A sampler's factory receives ``(config, policy=policy)`` and returns
    a :class:`polyrl.types.Sampler`; ``spec.modality`` must equal the policy's.
    """


@hookspec
def polyrl_rewards() -> list[ComponentSpec]:
    """Return the reward components this plugin provides (list of ``ComponentSpec``).

    Called once per process. A reward's factory receives ``(config, policy=policy)`` and returns a
    callable ``rollout -> [B]`` float tensor; ``spec.reads`` lists the rollout outputs it needs.
    """


@hookspec
def polyrl_updates() -> list[ComponentSpec]:
    """Return the update algorithms this plugin provides (list of ``ComponentSpec``).

    Called once per process. An update's factory receives its config and returns a
    :class:`polyrl.types.Update`. Its config class may define ``check_run(run_config)`` to reject
    impossible batch or group sizes before any model loads.
    """


# ---------------------------------------------------------------- loop hooks
@hookspec(firstresult=True)
def polyrl_sample(trainer: Trainer, contexts: list[Context]) -> Rollout:
    """Produce a rollout: called on every process once per sampling batch (``run.sample_batches``
    per iteration, 1 by default; ``trainer.sample_batch`` is the batch's index).

    Receives ``B`` contexts (``B = prompts_per_iteration * samples_per_prompt / sample_batches``,
    whole prompt groups) and returns a :class:`polyrl.types.Rollout` with ``log_probs`` and
    ``mask`` of shape ``[B, T]``. Runs under ``torch.no_grad``. The default calls the configured
    sampler with the unwrapped policy and the batch's generator
    (``trainer.generator(f"sample/{trainer.sample_batch}")``).

    Args:
        trainer: the loop's :class:`polyrl.loop.Trainer` (policy, sampler, generators, ``sample_batch``).
        contexts: the batch's ``B`` contexts, ``samples_per_prompt`` consecutive ones per prompt.
    """


@hookspec(firstresult=True)
def polyrl_reward(trainer: Trainer, rollout: Rollout) -> RewardOutput:
    """Score a rollout: called on every process once per sampling batch, after it is sampled;
    with ``run.async_rewards`` in a background thread while the next batch samples.

    Returns a :class:`polyrl.types.RewardOutput` whose ``components`` map each configured reward's
    name to its unweighted score, ``[B]`` or ``[B, T]`` (per step), and whose ``total`` is their
    weighted sum (``[B, T]`` if any component is per step, else ``[B]``). The default calls every
    configured reward under ``torch.no_grad`` and composes them.

    Args:
        trainer: the loop's :class:`polyrl.loop.Trainer` (``trainer.rewards``: ``(name, weight, reward)``).
        rollout: the rollout to score: a sampling batch, one of its chunks, or other samples
            (A*-PO's reference samples, held-out evaluations).
    """


@hookspec(firstresult=True)
def polyrl_update(trainer: Trainer, rollout: Rollout, rewards: torch.Tensor) -> dict[str, float]:
    """Improve the policy: called once per iteration on every process, after the reward.

    ``rewards`` is the total reward of this process's samples, ``[B]`` or ``[B, T]`` (per step;
    sequence-level algorithms sum it over steps). Learned rewards train right after this hook
    (``Reward.learn``). Returns a ``dict`` of float
    metrics (``loss``, ``approx_kl``, ``clipfrac``...). The default calls the configured update
    algorithm with the iteration's :class:`polyrl.context.UpdateContext`
    (``trainer.update.step(trainer.update_context(), rollout, rewards)``); algorithms gather
    cross-process statistics themselves, so every process must call it.

    Args:
        trainer: the loop's :class:`polyrl.loop.Trainer`; ``trainer.update_context()`` is what the
            update algorithm receives.
        rollout: this process's rollout of the iteration (all its sampling batches), with
            ``outputs["reward_components"]`` ``[B, K]`` when the rewards have components.
        rewards: the total reward of this process's samples, ``[B]`` or ``[B, T]``.
    """


# ---------------------------------------------------------------- event hooks
@hookspec
def polyrl_configure(config: RunConfig) -> None:
    """Called once per process with the validated :class:`polyrl.config.RunConfig`, before any
    model loads. Raise :class:`polyrl.types.ConfigError` to reject a configuration.

    Args:
        config: the validated run configuration (components resolved, fields checked).
    """


@hookspec
def polyrl_run_start(trainer: Trainer) -> None:
    """Called once per process after models are loaded and a checkpoint (if any) is restored,
    before the first iteration. ``trainer.iteration`` is the number of completed iterations.

    Args:
        trainer: the loop's :class:`polyrl.loop.Trainer`, its components set up.
    """


@hookspec
def polyrl_iteration_start(trainer: Trainer, iteration: int) -> None:
    """Called on every process at the start of each iteration, before its first sampling batch.
    Components whose behaviour follows a schedule over iterations read it here.

    Args:
        trainer: the loop's :class:`polyrl.loop.Trainer`.
        iteration: the iteration starting, from 1 (``trainer.iteration`` holds the same number).
    """


@hookspec
def polyrl_iteration_end(trainer: Trainer, iteration: int, metrics: dict[str, float], rollout: Rollout) -> None:
    """Called on every process after each iteration, once its metrics are final.

    Args:
        trainer: the loop's :class:`polyrl.loop.Trainer`.
        iteration: the iteration that ended, from 1.
        metrics: the iteration's metrics as logged (means over all processes).
        rollout: this process's rollout of the iteration.
    """


@hookspec
def polyrl_run_end(trainer: Trainer, error: BaseException | None) -> None:
    """Called once per process when the run stops, after the emergency checkpoint (if any) has
    been written.

    Args:
        trainer: the loop's :class:`polyrl.loop.Trainer`.
        error: ``None`` after the last iteration, or the exception (``KeyboardInterrupt``
            included) that stopped the run.
    """
