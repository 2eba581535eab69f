"""Gymnasium environments for the control components: creation with clear errors, the spaces a
policy needs, and evaluation of a policy (or of uniformly random actions) over whole episodes."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from polyrl.types import ConfigError


@dataclass(frozen=True)
class EnvInfo:
    """What the policy and sampler need to know about an environment."""

    env_id: str
    obs_dim: int
    action_dim: int
    action_low: tuple[float, ...]
    action_high: tuple[float, ...]
    max_episode_steps: int


def _gym():
    import gymnasium

    return gymnasium


def make_env(env_id: str, max_episode_steps: int | None = None) -> Any:
    """``gymnasium.make(env_id)`` with errors that name the problem and what is accepted."""
    gym = _gym()
    kwargs = {"max_episode_steps": max_episode_steps} if max_episode_steps else {}
    try:
        return gym.make(env_id, **kwargs)
    except gym.error.Error as e:
        known = sorted(k for k in gym.registry if "/" not in k)
        from polyrl.config import suggest

        raise ConfigError(
            f"environment {env_id!r} cannot be made: {e}{suggest(env_id, known)}; "
            f"continuous-control examples: Pendulum-v1, MountainCarContinuous-v0, HalfCheetah-v5, Hopper-v5"
        ) from None
    except ModuleNotFoundError as e:
        raise ConfigError(
            f"environment {env_id!r} needs the Python package {e.name!r}, which is not installed "
            f"(MuJoCo environments need `pip install \"gymnasium[mujoco]\"`, i.e. mujoco and imageio)"
        ) from None


@functools.lru_cache(maxsize=32)
def env_info(env_id: str, max_episode_steps: int = 0) -> EnvInfo:
    """The observation and action sizes, action bounds and episode limit of ``env_id``.

    Only flat ``Box`` observation and action spaces with finite action bounds are supported."""
    gym = _gym()
    env = make_env(env_id, max_episode_steps or None)
    try:
        obs, act = env.observation_space, env.action_space
        if not isinstance(act, gym.spaces.Box) or len(act.shape) != 1:
            raise ConfigError(
                f"environment {env_id!r} has action space {act}; the control components need a 1-D Box "
                f"(continuous actions), e.g. Pendulum-v1 or HalfCheetah-v5"
            )
        if not isinstance(obs, gym.spaces.Box) or len(obs.shape) != 1:
            raise ConfigError(f"environment {env_id!r} has observation space {obs}; a 1-D Box is needed")
        if not (np.all(np.isfinite(act.low)) and np.all(np.isfinite(act.high))):
            raise ConfigError(f"environment {env_id!r} has unbounded actions {act}; finite bounds are needed")
        limit = max_episode_steps or (env.spec.max_episode_steps if env.spec else None)
        if not limit:
            raise ConfigError(
                f"environment {env_id!r} has no episode time limit; set sampler.max_episode_steps (and "
                f"policy.max_episode_steps) to a positive number"
            )
        return EnvInfo(
            env_id=env_id,
            obs_dim=int(obs.shape[0]),
            action_dim=int(act.shape[0]),
            action_low=tuple(float(x) for x in act.low),
            action_high=tuple(float(x) for x in act.high),
            max_episode_steps=int(limit),
        )
    finally:
        env.close()


def make_vector_env(env_id: str, num_envs: int, max_episode_steps: int | None = None) -> Any:
    """A synchronous vector env of ``num_envs`` copies (one process: the machine's cores stay
    free for the networks). Episodes that end are reset on the following step (gymnasium's
    next-step autoreset); samplers ignore everything an env returns after its episode ended."""
    gym = _gym()
    fns = [functools.partial(make_env, env_id, max_episode_steps) for _ in range(num_envs)]
    return gym.vector.SyncVectorEnv(fns, autoreset_mode=gym.vector.AutoresetMode.NEXT_STEP)


def seeds_from(generator: torch.Generator, n: int) -> list[int]:
    """``n`` episode seeds drawn from a torch generator."""
    return torch.randint(0, 2**31 - 1, (n,), generator=generator).tolist()


@torch.no_grad()
def evaluate(policy, episodes: int, seed: int, deterministic: bool = True,
             max_episode_steps: int | None = None) -> list[float]:
    """Undiscounted returns of ``episodes`` episodes of ``policy`` on its environment.

    Episodes use seeds drawn from ``seed`` (the same seeds for every policy evaluated with the
    same ``seed``); ``deterministic`` takes the mean action instead of sampling."""
    g = torch.Generator().manual_seed(seed)
    env = make_vector_env(policy.env_id, episodes, max_episode_steps)
    try:
        obs, _ = env.reset(seed=seeds_from(g, episodes))
        returns = np.zeros(episodes)
        alive = np.ones(episodes, dtype=bool)
        was_training = policy.training
        policy.eval()
        while alive.any():
            o = torch.as_tensor(np.asarray(obs), dtype=torch.float32, device=policy.device)
            act = policy.act(o, generator=g, deterministic=deterministic)["env_actions"]
            obs, rew, term, trunc, _ = env.step(act.cpu().numpy())
            returns[alive] += rew[alive]
            alive &= ~(term | trunc)
        policy.train(was_training)
        return returns.tolist()
    finally:
        env.close()


def random_returns(env_id: str, episodes: int, seed: int, max_episode_steps: int | None = None) -> list[float]:
    """Returns of uniformly random actions (the ``0`` of normalised scores)."""
    env = make_vector_env(env_id, episodes, max_episode_steps)
    try:
        env.action_space.seed(seed)
        g = torch.Generator().manual_seed(seed)
        env.reset(seed=seeds_from(g, episodes))
        returns = np.zeros(episodes)
        alive = np.ones(episodes, dtype=bool)
        while alive.any():
            _, rew, term, trunc, _ = env.step(env.action_space.sample())
            returns[alive] += rew[alive]
            alive &= ~(term | trunc)
        return returns.tolist()
    finally:
        env.close()
