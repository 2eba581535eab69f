"""``lilgym``: runs lilGym episodes with the current policy and returns them as a rollout.

Each context is one episode. Its prompt is either the task name (``TowerScratch``...): the
example (statement and start world) is then drawn from the split with the iteration's generator,
one draw per context *group*, so that the ``G`` samples of a group play the same example; or an
example id of the split, which plays that example (evaluation over a whole split). The ``B``
episodes run side by side for at most the horizon (11) steps; the rollout is ``[B, T = horizon]``
with ``mask`` True while an episode runs.

Rollout contents:

* ``data``: ``images [B, T, 50, 190, 3]`` uint8 (the observation before each step),
  ``action_masks [B, T, A]`` bool, ``actions [B, T]`` long, ``sentence_ids [B, L]``,
  ``sentence_mask [B, L]``, ``target [B]`` (0/1);
* ``outputs``: ``env_rewards [B, T]`` (zero after the episode), ``lilgym_success [B]`` (1.0 if
  the episode ended with a positive reward), ``lilgym_success_no_sf [B]``, ``episode_lengths
  [B]``, ``example_ids`` (list), ``images [B, 3, 100, 380]`` (the last world, for reports),
  ``texts`` (the sentence, target and actions taken, for reports);
* ``log_probs [B, T]`` under the sampling policy (zero after the episode).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from polyrl.types import ConfigError, Context, Rollout, Sampler

from . import actions as A
from .data import TASKS, Example, LilGymDataError, load_examples
from .registration import HORIZON

__all__ = ["LilGymSamplerConfig", "LilGymSampler", "select_statements", "assign_examples"]


@dataclass
class LilGymSamplerConfig:
    """Settings of the lilGym episode sampler."""

    task: Literal["TowerScratch", "TowerFlipIt", "ScatterScratch", "ScatterFlipIt"] = "TowerScratch"
    """The lilGym task the episodes come from."""
    split: Literal["train", "dev", "test"] = "train"
    """The data split the examples are drawn from."""
    data_dir: str | None = None
    """Folder holding lilGym's JSON files (null: $POLYRL_LILGYM_DATA, shared/data/lilgym beside the
    checkout, or the download cache)."""
    statements: Literal["all", "fit", "heldout"] = "all"
    """Use all statements of the split, or one side of a fixed partition of its statements (by a hash
    of the sentence): 'fit' to train on, 'heldout' (a heldout_fraction of them) to evaluate on
    statements never trained on; for FlipIt, whose train split is not distributed offline."""
    heldout_fraction: float = 0.5
    """Fraction of the statements in the 'heldout' side of the partition."""
    stop_forcing: bool = True
    """lilGym's stop forcing (training only): a move made while the goal already holds becomes STOP (+1)."""
    stop_forcing_iterations: int = 0
    """With stop forcing, use it only in the first this many training iterations, then train without
    (a curriculum: stop forcing teaches reaching the goal, the rest teaches stopping there); 0: in
    every iteration."""
    stop_forcing_fraction: float = 1.0
    """With stop forcing, the fraction of episodes that use it (drawn per episode); the others run
    without, where only a STOP chosen by the policy earns +1, so that the policy also learns to stop."""
    record_forced_stop: bool = True
    """With stop forcing, record the STOP that the environment executes (with its log-prob under the
    policy) as the step's action, as lilGym's PPO baseline does, so that the update learns to stop
    where the goal holds; False records the action the policy drew, which the environment replaced."""
    horizon: int = HORIZON
    """Most steps per episode (lilGym: 11)."""
    remove_rule: Literal["lilgym-2023", "lilgym-2024"] = "lilgym-2023"
    """lilGym's rule set for scatter REMOVE: 'lilgym-2023' (the paper's: valid only at an item's
    top-left cell, removes nothing in the middle and right boxes) or 'lilgym-2024' (valid wherever an
    item covers the cell, in every box)."""
    deterministic: bool = False
    """Take the most likely action instead of sampling (evaluation)."""

    def check(self) -> None:
        if self.horizon < 1:
            raise ConfigError(f"sampler.horizon must be >= 1, got {self.horizon}")
        if self.remove_rule not in A.REMOVE_RULES:
            raise ConfigError(f"sampler.remove_rule {self.remove_rule!r} is not accepted; choose one of {list(A.REMOVE_RULES)}")
        if self.stop_forcing_iterations < 0:
            raise ConfigError(f"sampler.stop_forcing_iterations must be >= 0 (0: always), got {self.stop_forcing_iterations}")
        if not 0 <= self.stop_forcing_fraction <= 1:
            raise ConfigError(f"sampler.stop_forcing_fraction must be in [0, 1], got {self.stop_forcing_fraction}")
        if not 0 < self.heldout_fraction < 1:
            raise ConfigError(f"sampler.heldout_fraction must be in (0, 1), got {self.heldout_fraction}")
        try:
            _examples(self)
        except (LilGymDataError, ValueError) as e:
            raise ConfigError(f"sampler: {e}") from None


def _in_heldout(sentence: str, fraction: float) -> bool:
    digest = hashlib.sha256(sentence.strip().lower().encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2**64 < fraction


def select_statements(examples: list[Example], which: str, fraction: float) -> list[Example]:
    """The examples whose statement lies on side ``which`` of the fixed partition."""
    if which == "all":
        return list(examples)
    keep = [ex for ex in examples if _in_heldout(ex.sentence, fraction) == (which == "heldout")]
    if not keep:
        raise ValueError(f"statements={which!r} leaves no example (heldout_fraction={fraction})")
    return keep


_CACHE: dict[tuple, list[Example]] = {}


def _examples(cfg: LilGymSamplerConfig) -> list[Example]:
    appearance, start = TASKS[cfg.task]
    key = (cfg.task, cfg.split, cfg.data_dir)
    if key not in _CACHE:
        _CACHE[key] = load_examples(appearance, start, cfg.split, cfg.data_dir)
    return select_statements(_CACHE[key], cfg.statements, cfg.heldout_fraction)


def assign_examples(contexts: list[Context], task: str, ids: dict[str, int], n: int,
                    generator: torch.Generator) -> list[int]:
    """Example index of each context: its prompt's example id, or one draw per group when the
    prompt is the task name."""
    drawn: dict[int, int] = {}
    out = []
    for c in contexts:
        if c.prompt == task:
            if c.group not in drawn:
                drawn[c.group] = int(torch.randint(n, (1,), generator=generator))
            out.append(drawn[c.group])
        elif c.prompt in ids:
            out.append(ids[c.prompt])
        else:
            raise ConfigError(
                f"sampler 'lilgym': a prompt must be the task name {task!r} (an example drawn from the split) or an "
                f"example id of the split; got {c.prompt!r} (set prompts.items: [{task}])"
            )
    return out


class LilGymSampler(Sampler):
    modality = "env"

    def __init__(self, cfg: LilGymSamplerConfig, policy: Any = None) -> None:
        self.cfg = cfg
        self.examples = _examples(cfg)
        self.ids = {ex.id: i for i, ex in enumerate(self.examples)}
        self.appearance, _ = TASKS[cfg.task]
        if policy is not None and getattr(policy, "appearance", self.appearance) != self.appearance:
            raise ConfigError(
                f"sampler.task={cfg.task!r} is a {self.appearance} task but the policy acts in "
                f"{policy.appearance!r}; set policy.appearance: {self.appearance}"
            )
        self._envs: list[LilGymEnv] = []
        self.iteration = 0
        """The training iteration being sampled (set by the plugin's sample-phase wrapper; 0 outside training)."""

    def stop_forcing_now(self) -> bool:
        """Whether this iteration's episodes use stop forcing."""
        cfg = self.cfg
        if not cfg.stop_forcing or not self.training:  # training only: never while evaluating
            return False
        return cfg.stop_forcing_iterations == 0 or 0 < self.iteration <= cfg.stop_forcing_iterations

    def _env(self, i: int) -> LilGymEnv:
        from .env import LilGymEnv  # gymnasium is imported when the first episode runs
        while len(self._envs) <= i:
            self._envs.append(LilGymEnv(self.cfg.task, self.cfg.split, data=self.examples,
                                        stop_forcing=self.cfg.stop_forcing, horizon=self.cfg.horizon,
                                        remove_rule=self.cfg.remove_rule))
        return self._envs[i]

    @torch.no_grad()
    def sample(self, policy, contexts: list[Context], generator: torch.Generator) -> Rollout:
        cfg = self.cfg
        b, horizon = len(contexts), cfg.horizon
        index = assign_examples(contexts, cfg.task, self.ids, len(self.examples), generator)
        seeds = torch.randint(2**31 - 1, (b,), generator=generator).tolist()
        forcing = (torch.rand(b, generator=generator) < cfg.stop_forcing_fraction).numpy() & self.stop_forcing_now()
        envs = [self._env(i) for i in range(b)]
        for env, f in zip(envs, forcing):
            env.stop_forcing = bool(f)
        n_act = A.NUM_ACTIONS[self.appearance]
        images = np.zeros((b, horizon, 50, 190, 3), np.uint8)
        masks = np.zeros((b, horizon, n_act), bool)
        masks[:, :, 0] = True  # padding steps: only STOP, so that no row is empty
        actions = np.zeros((b, horizon), np.int64)
        log_probs = np.zeros((b, horizon), np.float32)
        rewards = np.zeros((b, horizon), np.float32)
        valid = np.zeros((b, horizon), bool)
        success = np.zeros(b, np.float32)
        success_no_sf = np.zeros(b, np.float32)
        obs, infos = zip(*(env.reset(seed=s, options={"example_index": i}) for env, s, i in zip(envs, seeds, index)))
        obs, infos = list(obs), list(infos)
        sentences = [o["sentence"] for o in obs]
        target = torch.tensor([o["target"] for o in obs], dtype=torch.long)
        ids, smask = policy.tokenize(sentences)
        sentence = policy.encode(ids, smask)
        alive = np.ones(b, bool)
        taken: list[list[str]] = [[] for _ in range(b)]
        for t in range(horizon):
            rows = np.flatnonzero(alive)
            if rows.size == 0:
                break
            img = np.stack([obs[i]["image"] for i in rows])
            m = np.stack([infos[i]["action_mask"].astype(bool) for i in rows])
            # where the goal already holds, stop forcing will end the episode with STOP whatever is drawn
            goal = np.array([envs[i].stop_forcing and infos[i]["program_value"] == envs[i].example.target for i in rows])
            forced = torch.from_numpy(goal) if cfg.record_forced_stop else None
            act, lp = policy.act(torch.from_numpy(img), torch.from_numpy(m), sentence[rows], target[rows],
                                 generator, deterministic=cfg.deterministic, forced_stop=forced)
            for j, i in enumerate(rows):
                a = int(act[j])
                images[i, t], masks[i, t], actions[i, t], log_probs[i, t], valid[i, t] = img[j], m[j], a, float(lp[j]), True
                obs[i], r, term, trunc, infos[i] = envs[i].step(a)
                rewards[i, t] = r
                was_forced = bool(goal[j]) and (infos[i]["force_stop"] or cfg.record_forced_stop)
                taken[i].append(A.action_text(self.appearance, a) + (" (forced)" if was_forced else ""))
                if term or trunc:
                    alive[i] = False
                    success[i] = float(infos[i]["success"])
                    success_no_sf[i] = float(infos[i]["success"] and not was_forced)
        final = torch.from_numpy(np.stack([env.render_full() for env in envs])).permute(0, 3, 1, 2).float() / 255.0
        valid_t = torch.from_numpy(valid)
        texts = [
            f"{envs[i].example.sentence} [target {str(envs[i].example.target).lower()}] -> {', '.join(taken[i])} "
            f"(return {rewards[i].sum():+.1f}, {'success' if success[i] else 'failure'})"
            for i in range(b)
        ]
        return Rollout(
            contexts=list(contexts),
            log_probs=torch.from_numpy(log_probs),
            mask=valid_t,
            data={
                "images": torch.from_numpy(images),
                "action_masks": torch.from_numpy(masks),
                "actions": torch.from_numpy(actions),
                "sentence_ids": ids,
                "sentence_mask": smask,
                "target": target,
            },
            outputs={
                "env_rewards": torch.from_numpy(rewards),
                "lilgym_success": torch.from_numpy(success),
                "lilgym_success_no_sf": torch.from_numpy(success_no_sf),
                "episode_lengths": valid_t.sum(1),
                "example_ids": [envs[i].example.id for i in range(b)],
                "images": final,
                "texts": texts,
                "captions": [f"{env.example.sentence} [{str(env.example.target).lower()}]" for env in envs],
            },
            meta={"task": cfg.task, "split": cfg.split, "stop_forcing": self.stop_forcing_now(),
                  "deterministic": cfg.deterministic},
        )
