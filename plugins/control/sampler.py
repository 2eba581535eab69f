"""``gym``: runs one episode per context in a gymnasium vector env and returns them as a rollout.

Every context is one episode from a fresh reset (its prompt names the environment, which must be
the policy's). The ``B`` episodes run side by side in a synchronous vector env for at most ``T``
steps (the environment's time limit, or ``max_episode_steps``); the rollout is ``[B, T]`` with
``mask`` False after an episode ended. Reset seeds and action noise come from the iteration's
generator, so a run (and a resumed run) samples exactly the same episodes.

Rollout contents (``D`` observation size, ``A`` action size):

* ``data["observations"] [B, T, D]``, ``data["next_observations"] [B, T, D]`` (the true next
  state, also at the last step of an episode), ``data["actions"] [B, T, A]`` in environment units,
  ``data["raw_actions"] [B, T, A]`` (the Gaussian sample before squashing),
  ``data["terminations"] [B, T]`` (True where the episode *terminated*; a time-limit truncation
  is not a termination, so values bootstrap through it);
* ``outputs["env_rewards"] [B, T]`` (zero on padding), ``outputs["episode_returns"] [B]``,
  ``outputs["episode_lengths"] [B]``;
* ``log_probs [B, T]``: the policy's log-probs of the raw actions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from polyrl.types import ConfigError, Context, Rollout, Sampler

from .envs import env_info, make_vector_env, seeds_from


@dataclass
class GymSamplerConfig:
    """Settings of the gymnasium episode sampler."""

    max_episode_steps: int = 0
    """Cut episodes after this many steps (0: the environment's own time limit). A cut is a truncation, not a termination."""
    deterministic: bool = False
    """Take the policy's mean action instead of sampling (for evaluation runs; training needs exploration)."""

    def check(self) -> None:
        if self.max_episode_steps < 0:
            raise ConfigError(f"sampler.max_episode_steps must be >= 0 (0: the environment's limit), got {self.max_episode_steps}")


class GymSampler(Sampler):
    modality = "env"

    def __init__(self, cfg: GymSamplerConfig, policy=None) -> None:
        self.cfg = cfg
        self._envs: dict[tuple[str, int], object] = {}

    def _vector_env(self, env_id: str, n: int):
        key = (env_id, n)
        if key not in self._envs:
            self._envs[key] = make_vector_env(env_id, n, self.cfg.max_episode_steps or None)
        return self._envs[key]

    @torch.no_grad()
    def sample(self, policy, contexts: list[Context], generator: torch.Generator) -> Rollout:
        env_id = policy.env_id
        bad = sorted({c.prompt for c in contexts if c.prompt != env_id})
        if bad:
            raise ConfigError(
                f"sampler 'gym': every prompt names the environment of an episode and must be the policy's "
                f"environment {env_id!r}; got {bad} (set prompts.items: [{env_id}])"
            )
        b = len(contexts)
        info = env_info(env_id, self.cfg.max_episode_steps)
        horizon = info.max_episode_steps
        env = self._vector_env(env_id, b)
        obs, _ = env.reset(seed=seeds_from(generator, b))
        d, a = info.obs_dim, info.action_dim
        observations = np.zeros((horizon, b, d), np.float32)
        next_observations = np.zeros((horizon, b, d), np.float32)
        actions = np.zeros((horizon, b, a), np.float32)
        raw_actions = np.zeros((horizon, b, a), np.float32)
        log_probs = np.zeros((horizon, b), np.float32)
        rewards = np.zeros((horizon, b), np.float32)
        terminations = np.zeros((horizon, b), bool)
        valid = np.zeros((horizon, b), bool)
        alive = np.ones(b, bool)
        device = policy.device
        t_end = 0
        for t in range(horizon):
            if not alive.any():
                break
            o = np.asarray(obs, dtype=np.float32)
            out = policy.act(torch.from_numpy(o).to(device), generator=generator, deterministic=self.cfg.deterministic)
            env_actions = out["env_actions"].cpu().numpy()
            nxt, rew, term, trunc, _ = env.step(env_actions)
            observations[t], next_observations[t] = o, np.asarray(nxt, dtype=np.float32)
            actions[t], raw_actions[t] = env_actions, out["raw_actions"].cpu().numpy()
            log_probs[t], rewards[t] = out["log_probs"].cpu().numpy(), np.asarray(rew, dtype=np.float32)
            terminations[t], valid[t] = term & alive, alive
            alive = alive & ~(term | trunc)
            obs = nxt
            t_end = t + 1
        if alive.any():  # cannot happen with a time limit; a guard against a wrapper that removes it
            raise RuntimeError(f"{env_id}: episodes did not end within {horizon} steps")
        valid_t = torch.from_numpy(valid[:t_end].T.copy())
        tt = lambda x: torch.from_numpy(np.ascontiguousarray(np.swapaxes(x[:t_end], 0, 1)))  # noqa: E731
        env_rewards = tt(rewards) * valid_t
        return Rollout(
            contexts=list(contexts),
            log_probs=tt(log_probs) * valid_t,
            mask=valid_t,
            data={
                "observations": tt(observations),
                "next_observations": tt(next_observations),
                "actions": tt(actions),
                "raw_actions": tt(raw_actions),
                "terminations": tt(terminations),
            },
            outputs={
                "env_rewards": env_rewards,
                "episode_returns": env_rewards.sum(1),
                "episode_lengths": valid_t.sum(1),
            },
            meta={"env_id": env_id, "deterministic": self.cfg.deterministic},
        )

    def close(self) -> None:
        for env in self._envs.values():
            env.close()  # type: ignore[attr-defined]
        self._envs.clear()
