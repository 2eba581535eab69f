"""A language-model agent for lilGym: a causal LM reads the sentence and the world in words and
writes the next action as text, over multi-turn episodes.

Components:

* policy ``lilgym_lm`` (:class:`LilGymLMPolicy`): a transformers causal LM (the text plugin's
  ``causal_lm`` underneath: full or LoRA fine-tuning, optional value head, reference policy);
* sampler ``lilgym_text`` (:class:`LilGymTextSampler`): plays episodes turn by turn. At each turn
  the prompt is::

      <sentence>
      make it <true|false>
      left: <blocks bottom to top, or ->
      middle: ...
      right: ...
      action:

  and the LM generates up to ``max_action_tokens`` tokens, up to a newline or EOS. The first
  line is parsed (:func:`polyrl.plugins.lilgym.actions.parse_action`: ``stop``, ``add left
  yellow``, ``remove right``; scatter: ``add 3 2 circle blue small``, ``remove 3 2``); an
  unparsable action counts as an invalid action (reward -1, the episode ends), and a parsed
  action that the world does not allow is invalid by the environment's own rule.

The **parse rate** is the fraction of turns whose text names an action (whether or not the world
allows it); the **valid rate** the fraction that name an action the world allows. Each rollout
carries them per episode (``outputs["lilgym_parse_rate"]``, ``lilgym_parsed_turns``,
``lilgym_valid_turns``); the reward ``lilgym_parse_rate`` (weight 0) logs
``reward/lilgym_parse_rate`` every iteration, and :func:`evaluate_split_text` reports both over a
whole split. ``scripts/lilgym_lm_warmup.py`` teaches a causal LM the action format (supervised, on
valid actions of the train split's worlds) before RL.

With ``stop_forcing`` (training only), a turn taken where the goal already holds ends the episode
with STOP (+1) whatever its text; ``record_forced_stop`` then records that turn as the text
``" stop\\n"`` with its log-probs under the policy, so that the update teaches the agent to stop
there itself (lilGym's PPO baseline records the forced STOP the same way).

Rollouts are ``[B, T]`` with ``T = horizon * max_action_tokens``: turn ``k`` occupies tokens
``k*A .. k*A + A - 1``; ``mask`` is True on generated tokens (the newline/EOS included); the
environment's reward of a turn sits on the turn's last generated token, so the text updates
(``grpo``, ``ppo``) see per-token rewards exactly as for a single completion.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from polyrl.types import ConfigError, Context, Policy, Reward, Rollout, Sampler

from . import actions as A
from .data import TASKS, Example
from .registration import HORIZON
from .render import describe_world
from .sampler import _examples, assign_examples

__all__ = ["LilGymLMConfig", "LilGymLMPolicy", "LilGymTextSamplerConfig", "LilGymTextSampler",
           "build_prompt", "action_target", "evaluate_split_text", "LilGymParseRateConfig", "LilGymParseRate"]


@dataclass
class LilGymLMConfig:
    """Settings of the language-model lilGym agent."""

    appearance: Literal["tower", "scatter"] = "tower"
    """Which action set the agent writes actions for."""
    pretrained: str = "assets/tiny-gpt2"
    """A transformers causal LM folder or Hub id."""
    lora_rank: int = 0
    """LoRA rank; 0 trains every weight."""
    lora_alpha: int = 16
    """LoRA scaling numerator."""
    value_head: bool = False
    """Add a value head (for ppo)."""
    max_action_tokens: int = 12
    """Most tokens generated per turn (an action that is not finished by then is unparsable)."""
    max_prompt_tokens: int = 112
    """Prompts are cut from the left to this many tokens (the model's context must hold prompt and action)."""
    temperature: float = 1.0
    """Sampling temperature of the action tokens."""

    def check(self) -> None:
        if self.max_action_tokens < 2:
            raise ConfigError(f"policy.max_action_tokens must be >= 2, got {self.max_action_tokens}")
        if self.max_prompt_tokens < 8:
            raise ConfigError(f"policy.max_prompt_tokens must be >= 8, got {self.max_prompt_tokens}")
        if self.temperature <= 0:
            raise ConfigError(f"policy.temperature must be > 0, got {self.temperature}")


def action_target(appearance: str, index: int) -> str:
    """The text the agent is taught to write after ``action:`` for action ``index``: a space, the
    action in lower case, a newline (``" add left yellow\\n"``); :func:`parse_action` reads it back."""
    return f" {A.action_text(appearance, index).lower()}\n"


def build_prompt(example: Example, world: list, appearance: str) -> str:
    """The turn's prompt: sentence, target, the world in words, ``action:``."""
    lines = [example.sentence.strip(), f"make it {str(example.target).lower()}"]
    names = ("left", "middle", "right")
    if appearance == "tower":
        colours = {"Yellow": "yellow", "Black": "black", "#0099ff": "blue"}
        for name, box in zip(names, world):
            blocks = [colours[o["color"]] for o in sorted(box, key=lambda o: -o["y_loc"])]
            lines.append(f"{name}: {' '.join(blocks) if blocks else '-'}")
    else:
        lines += describe_world(world, tower=False).splitlines()
    lines.append("action:")
    return "\n".join(lines)


class LilGymLMPolicy(Policy):
    """See the module documentation. ``lm`` is a :class:`polyrl.plugins.text.policy.CausalLMPolicy`."""

    modality = "env"

    def __init__(self, cfg: LilGymLMConfig) -> None:
        super().__init__()
        from polyrl.plugins.text.policy import CausalLMConfig, CausalLMPolicy

        self.cfg = cfg
        self.appearance = cfg.appearance
        self.lm = CausalLMPolicy(CausalLMConfig(pretrained=cfg.pretrained, lora_rank=cfg.lora_rank,
                                                lora_alpha=cfg.lora_alpha, value_head=cfg.value_head))
        self.tokenizer = self.lm.tokenizer
        limit = getattr(self.lm._base_model().config, "n_positions", None) or getattr(
            self.lm._base_model().config, "max_position_embeddings", None)
        if limit is not None and cfg.max_prompt_tokens + cfg.max_action_tokens > limit:
            raise ConfigError(
                f"policy.max_prompt_tokens + policy.max_action_tokens = {cfg.max_prompt_tokens + cfg.max_action_tokens} "
                f"exceeds the model's context of {limit} tokens"
            )
        newline = self.tokenizer("\n", add_special_tokens=False)["input_ids"]
        self.stop_ids = {int(i) for i in newline[-1:]} | ({self.lm.eos_token_id} if self.lm.eos_token_id is not None else set())

    @property
    def has_value_head(self) -> bool:  # type: ignore[override]
        return self.lm.has_value_head

    # ------------------------------------------------------------------ prompts and sampling
    def encode_prompts(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded prompt ids and mask ``[N, P]`` with ``P = max_prompt_tokens`` (cut from the left)."""
        p = self.cfg.max_prompt_tokens
        ids = torch.full((len(prompts), p), self.lm.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), p), dtype=torch.bool)
        for i, text in enumerate(prompts):
            x = self.tokenizer(text, add_special_tokens=False)["input_ids"][-p:]
            ids[i, p - len(x):] = torch.tensor(x, dtype=torch.long)
            mask[i, p - len(x):] = True
        return ids, mask

    @torch.no_grad()
    def generate(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, generator: torch.Generator,
                 deterministic: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Action tokens ``[N, A]``, their log-probs ``[N, A]`` and mask ``[N, A]`` (True up to and
        including the newline or EOS)."""
        from polyrl.plugins.text.logits import SamplingSettings, process_logits

        settings = SamplingSettings(self.cfg.temperature)
        model, device = self.lm.model, self.device
        n, a = prompt_ids.shape[0], self.cfg.max_action_tokens
        ids, attn = prompt_ids.to(device), prompt_mask.long().to(device)
        tokens = torch.full((n, a), self.lm.pad_token_id, dtype=torch.long)
        logps = torch.zeros(n, a)
        mask = torch.zeros(n, a, dtype=torch.bool)
        done = torch.zeros(n, dtype=torch.bool)
        past, step_ids = None, ids
        position = (attn.cumsum(-1) - 1).clamp(min=0)
        for t in range(a):
            out = model(input_ids=step_ids, attention_mask=attn, position_ids=position, past_key_values=past, use_cache=True)
            past = out.past_key_values
            logp = process_logits(out.logits[:, -1], settings).log_softmax(-1).cpu()
            nxt = logp.argmax(-1) if deterministic else torch.multinomial(logp.exp(), 1, generator=generator).squeeze(-1)
            live = ~done
            tokens[:, t] = torch.where(live, nxt, torch.full_like(nxt, self.lm.pad_token_id))
            logps[:, t] = torch.where(live, logp.gather(1, nxt[:, None]).squeeze(1), torch.zeros(n))
            mask[:, t] = live
            done = done | torch.tensor([int(x) in self.stop_ids for x in nxt.tolist()])
            if done.all():
                break
            step_ids = tokens[:, t : t + 1].to(device)
            attn = torch.cat([attn, live.long()[:, None].to(device)], dim=1)
            position = position[:, -1:] + 1
        return tokens, logps, mask

    def decode(self, tokens: torch.Tensor, mask: torch.Tensor) -> list[str]:
        return [self.tokenizer.decode([int(x) for x, m in zip(row, mrow) if m], skip_special_tokens=True)
                for row, mrow in zip(tokens.tolist(), mask.tolist())]

    # ------------------------------------------------------------------ log-probs
    def _turn_rollout(self, rollout: Rollout) -> tuple[Rollout, torch.Tensor, int]:
        """The turns as a text rollout ``[N, P + A]`` for the causal LM, the ``[N, 2]`` (episode,
        turn) index of each, and ``A``."""
        d = rollout.data
        b, k, p = d["prompt_ids"].shape
        a = self.cfg.max_action_tokens
        mask = rollout.mask.reshape(b, k, a)
        live = mask.any(-1)
        where = live.nonzero()
        prompt_ids, prompt_mask = d["prompt_ids"][live], d["prompt_mask"][live]
        action_ids = d["action_ids"][live]
        action_mask = mask[live]
        turns = Rollout(
            contexts=[Context("") for _ in range(where.shape[0])],
            log_probs=torch.zeros(where.shape[0], a),
            mask=action_mask,
            data={"input_ids": torch.cat([prompt_ids, action_ids], 1),
                  "attention_mask": torch.cat([prompt_mask, action_mask], 1).long()},
            meta={"temperature": self.cfg.temperature, "top_k": 0, "top_p": 1.0},
        )
        return turns, where, a

    def _scatter(self, values: torch.Tensor, where: torch.Tensor, b: int, k: int, a: int) -> torch.Tensor:
        out = torch.zeros(b, k, a, dtype=values.dtype, device=values.device)
        out = out.index_put((where[:, 0].to(values.device), where[:, 1].to(values.device)), values)
        return out.reshape(b, k * a)

    def forward(self, rollout: Rollout, steps: torch.Tensor | None = None, with_values: bool = False,
                with_entropy: bool = False):
        b, k = rollout.data["prompt_ids"].shape[:2]
        turns, where, a = self._turn_rollout(rollout)
        res = self.lm(turns, with_values=with_values, with_entropy=with_entropy)
        res = res if isinstance(res, dict) else {"log_probs": res}
        out = {name: self._scatter(v, where, b, k, a) for name, v in res.items()}
        if steps is not None:
            out = {name: v.gather(1, steps.to(v.device)) for name, v in out.items()}
        return out if (with_values or with_entropy) else out["log_probs"]

    @torch.no_grad()
    def reference_log_probs(self, rollout: Rollout, steps: torch.Tensor | None = None) -> torch.Tensor:
        b, k = rollout.data["prompt_ids"].shape[:2]
        turns, where, a = self._turn_rollout(rollout)
        out = self._scatter(self.lm.reference_log_probs(turns), where, b, k, a)
        return out if steps is None else out.gather(1, steps.to(out.device))

    def save_pretrained(self, path: str) -> None:
        self.lm.save_pretrained(path)


# ---------------------------------------------------------------------------------- sampler
@dataclass
class LilGymTextSamplerConfig:
    """Settings of the multi-turn text sampler for the language-model agent."""

    task: Literal["TowerScratch", "TowerFlipIt", "ScatterScratch", "ScatterFlipIt"] = "TowerScratch"
    """The lilGym task the episodes come from."""
    split: Literal["train", "dev", "test"] = "train"
    """The data split the examples are drawn from."""
    data_dir: str | None = None
    """Folder holding lilGym's JSON files (null: the default search path)."""
    statements: Literal["all", "fit", "heldout"] = "all"
    """All statements of the split, or one side of the fixed partition (see the lilgym sampler)."""
    heldout_fraction: float = 0.5
    """Fraction of the statements in the 'heldout' side of the partition."""
    stop_forcing: bool = False
    """lilGym's stop forcing (training only): a turn taken while the goal already holds becomes STOP
    (+1), whatever its text (unparsable text included)."""
    stop_forcing_fraction: float = 1.0
    """With stop forcing, the fraction of episodes that use it (drawn per episode; nothing is drawn
    at 1.0, so that runs at the default are unchanged); the others run without, where only a
    ``stop`` the agent writes itself earns +1, so that it also learns to stop."""
    record_forced_stop: bool = True
    """With stop forcing, record the STOP that the environment executes as the turn's text (the
    tokens of ``" stop\\n"`` with their log-probs under the sampling policy), as lilGym's PPO baseline
    records the forced STOP, so that the update learns to write ``stop`` where the goal holds; False
    records the text the policy wrote, which the environment replaced (the agent then never learns
    to stop by itself)."""
    horizon: int = HORIZON
    """Most turns per episode (lilGym: 11)."""
    remove_rule: Literal["lilgym-2023", "lilgym-2024"] = "lilgym-2023"
    """lilGym's rule set for scatter REMOVE: 'lilgym-2023' (the paper's: valid only at an item's
    top-left cell, removes nothing in the middle and right boxes) or 'lilgym-2024' (valid wherever an
    item covers the cell, in every box)."""
    deterministic: bool = False
    """Greedy decoding instead of sampling (evaluation)."""

    def check(self) -> None:
        from .sampler import LilGymSamplerConfig

        LilGymSamplerConfig(task=self.task, split=self.split, data_dir=self.data_dir, statements=self.statements,
                            heldout_fraction=self.heldout_fraction, horizon=self.horizon,
                            remove_rule=self.remove_rule, stop_forcing_fraction=self.stop_forcing_fraction).check()


class LilGymTextSampler(Sampler):
    modality = "env"

    def __init__(self, cfg: LilGymTextSamplerConfig, policy: Any = None) -> None:
        self.cfg = cfg
        self.examples = _examples(cfg)  # type: ignore[arg-type]
        self.ids = {ex.id: i for i, ex in enumerate(self.examples)}
        self.appearance = TASKS[cfg.task][0]
        if policy is not None and getattr(policy, "appearance", self.appearance) != self.appearance:
            raise ConfigError(f"sampler.task={cfg.task!r} is a {self.appearance} task; set policy.appearance: {self.appearance}")
        self._envs: list[LilGymEnv] = []
        self.totals = {"turns": 0, "parsed": 0, "valid": 0}
        """Turns played, turns whose text parsed, and turns that named an allowed action, over every
        :meth:`sample` call of this sampler (what :func:`evaluate_split_text` reports)."""

    def _env(self, i: int) -> LilGymEnv:
        from .env import LilGymEnv  # gymnasium is imported when the first episode runs
        while len(self._envs) <= i:
            self._envs.append(LilGymEnv(self.cfg.task, self.cfg.split, data=self.examples,
                                        stop_forcing=self.cfg.stop_forcing, horizon=self.cfg.horizon,
                                        remove_rule=self.cfg.remove_rule))
        return self._envs[i]

    def _record_stops(self, policy: LilGymLMPolicy, turns: list[tuple[int, int]], prompt_ids: torch.Tensor,
                      prompt_mask: torch.Tensor, action_ids: torch.Tensor, log_probs: torch.Tensor, mask: torch.Tensor,
                      rewards: torch.Tensor) -> None:
        """Record the STOP that stop forcing executed at each ``(episode, turn)`` of ``turns``: the
        tokens of ``" stop\\n"``, their log-probs under ``policy`` given the turn's prompt, and the
        turn's reward moved to the last of them (in place)."""
        a = policy.cfg.max_action_tokens
        stop = policy.tokenizer(action_target(self.appearance, 0), add_special_tokens=False)["input_ids"]
        if len(stop) > a:
            raise ConfigError(f"policy.max_action_tokens={a} cannot hold the STOP text ({len(stop)} tokens); raise it")
        ep, tn = (torch.tensor(x) for x in zip(*turns))
        ids = torch.full((len(turns), a), policy.lm.pad_token_id, dtype=torch.long)
        ids[:, : len(stop)] = torch.tensor(stop)
        m = torch.zeros(len(turns), a, dtype=torch.bool)
        m[:, : len(stop)] = True
        text = Rollout(contexts=[Context("") for _ in turns], log_probs=torch.zeros(len(turns), a), mask=m,
                       data={"input_ids": torch.cat([prompt_ids[ep, tn], ids], 1),
                             "attention_mask": torch.cat([prompt_mask[ep, tn], m], 1).long()},
                       meta={"temperature": policy.cfg.temperature, "top_k": 0, "top_p": 1.0})
        reward = rewards[ep, tn].sum(-1)
        action_ids[ep, tn], mask[ep, tn] = ids, m
        log_probs[ep, tn] = policy.lm(text).detach().float().cpu()
        rewards[ep, tn] = 0.0
        rewards[ep, tn, len(stop) - 1] = reward

    @torch.no_grad()
    def sample(self, policy: LilGymLMPolicy, contexts: list[Context], generator: torch.Generator) -> Rollout:
        cfg = self.cfg
        b, k, a, p = len(contexts), cfg.horizon, policy.cfg.max_action_tokens, policy.cfg.max_prompt_tokens
        index = assign_examples(contexts, cfg.task, self.ids, len(self.examples), generator)
        seeds = torch.randint(2**31 - 1, (b,), generator=generator).tolist()
        envs = [self._env(i) for i in range(b)]
        on = cfg.stop_forcing and self.training  # training only: never while evaluating
        forcing = [on] * b
        if on and cfg.stop_forcing_fraction < 1:
            forcing = (torch.rand(b, generator=generator) < cfg.stop_forcing_fraction).tolist()
        for env, s, i, f in zip(envs, seeds, index, forcing):
            env.stop_forcing = bool(f)
            env.reset(seed=s, options={"example_index": i})
        prompt_ids = torch.full((b, k, p), policy.lm.pad_token_id, dtype=torch.long)
        prompt_mask = torch.zeros((b, k, p), dtype=torch.bool)
        action_ids = torch.full((b, k, a), policy.lm.pad_token_id, dtype=torch.long)
        log_probs = torch.zeros(b, k, a)
        mask = torch.zeros(b, k, a, dtype=torch.bool)
        rewards = torch.zeros(b, k, a)
        success = np.zeros(b, np.float32)
        success_no_sf = np.zeros(b, np.float32)
        invalid_text = np.zeros(b, np.float32)
        parsed = np.zeros(b, np.float32)
        valid = np.zeros(b, np.float32)
        alive = np.ones(b, bool)
        transcript: list[list[str]] = [[] for _ in range(b)]
        forced_turns: list[tuple[int, int]] = []
        for t in range(k):
            rows = np.flatnonzero(alive)
            if rows.size == 0:
                break
            prompts = [build_prompt(envs[i].example, envs[i].world, self.appearance) for i in rows]
            ids, pm = policy.encode_prompts(prompts)
            toks, lps, m = policy.generate(ids, pm, generator, deterministic=cfg.deterministic)
            texts = policy.decode(toks, m)
            for j, i in enumerate(rows):
                prompt_ids[i, t], prompt_mask[i, t] = ids[j], pm[j]
                action_ids[i, t], log_probs[i, t], mask[i, t] = toks[j], lps[j], m[j]
                last = int(m[j].nonzero().max())
                action = A.parse_action(self.appearance, texts[j])
                env = envs[i]
                forced = False
                if action is None and env.stop_forcing and env.program_value() == env.example.target:
                    # stop forcing turns every turn taken where the goal holds into STOP, unparsable ones too
                    _, reward, _, _, _ = env.step(0)
                    done, won, forced = True, True, True
                    transcript[i].append(f"{texts[j].strip()!r} (unparsable, forced stop)")
                elif action is None:  # unparsable: an invalid action
                    reward, done, won = -1.0, True, False
                    invalid_text[i] = 1.0
                    transcript[i].append(f"{texts[j].strip()!r} (unparsable)")
                else:
                    parsed[i] += 1
                    _, reward, term, trunc, info = env.step(action)
                    done, won, forced = term or trunc, bool(info.get("success", False)), bool(info["force_stop"])
                    valid[i] += float(not info["invalid"])
                    transcript[i].append(A.action_text(self.appearance, action).lower()
                                         + (" (invalid)" if info["invalid"] else " (forced stop)" if forced else ""))
                rewards[i, t, last] = reward
                if forced:
                    forced_turns.append((int(i), t))
                if done:
                    alive[i] = False
                    success[i] = float(won)
                    success_no_sf[i] = float(won and not forced)
        if forced_turns and cfg.record_forced_stop:
            self._record_stops(policy, forced_turns, prompt_ids, prompt_mask, action_ids, log_probs, mask, rewards)
        flat = lambda x: x.reshape(b, k * a)  # noqa: E731
        env_rewards = flat(rewards)
        turns = mask.any(-1).sum(1)
        self.totals["turns"] += int(turns.sum())
        self.totals["parsed"] += int(parsed.sum())
        self.totals["valid"] += int(valid.sum())
        texts_out = [
            f"{envs[i].example.sentence} [target {str(envs[i].example.target).lower()}] -> {', '.join(transcript[i])} "
            f"(return {float(env_rewards[i].sum()):+.1f}, {'success' if success[i] else 'failure'})"
            for i in range(b)
        ]
        return Rollout(
            contexts=list(contexts),
            log_probs=flat(log_probs),
            mask=flat(mask),
            data={"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "action_ids": action_ids},
            outputs={
                "env_rewards": env_rewards,
                "lilgym_success": torch.from_numpy(success),
                "lilgym_success_no_sf": torch.from_numpy(success_no_sf),
                "lilgym_unparsable": torch.from_numpy(invalid_text),
                "lilgym_parsed_turns": torch.from_numpy(parsed),
                "lilgym_valid_turns": torch.from_numpy(valid),
                "lilgym_parse_rate": torch.from_numpy(parsed) / turns.clamp(min=1).float(),
                "episode_lengths": turns,
                "example_ids": [envs[i].example.id for i in range(b)],
                "texts": texts_out,
                # the final worlds, captioned with their sentences, for the run report
                "images": torch.from_numpy(np.stack([env.render_full() for env in envs])).permute(0, 3, 1, 2).float() / 255.0,
                "captions": [f"{env.example.sentence} [{str(env.example.target).lower()}]" for env in envs],
            },
            meta={"temperature": policy.cfg.temperature, "task": cfg.task, "split": cfg.split,
                  "deterministic": cfg.deterministic},
        )


def evaluate_split_text(policy: LilGymLMPolicy, task: str, split: str = "dev", data_dir: str | None = None,
                        seed: int = 0, deterministic: bool = True, batch: int = 64, statements: str = "all",
                        heldout_fraction: float = 0.5) -> dict[str, float]:
    """:func:`polyrl.plugins.lilgym.evaluate.evaluate_split` for the language-model agent (no stop
    forcing), with ``parse_rate`` and ``valid_rate``: the fraction of all turns played whose text
    names an action, and names one the world allows."""
    from .evaluate import run_split

    cfg = LilGymTextSamplerConfig(task=task, split=split, data_dir=data_dir, deterministic=deterministic,
                                  statements=statements, heldout_fraction=heldout_fraction)
    sampler = LilGymTextSampler(cfg, policy)
    out = run_split(sampler, policy, seed, batch)
    n = max(sampler.totals["turns"], 1)
    return {**out, "parse_rate": sampler.totals["parsed"] / n, "valid_rate": sampler.totals["valid"] / n}


# ---------------------------------------------------------------------------------- logging
@dataclass
class LilGymParseRateConfig:
    """Settings of the parse-rate measure (no settings)."""


class LilGymParseRate(Reward):
    """``[B]``: the fraction of each episode's turns whose text named an action (the language-model
    agent). Give it weight 0 to log ``reward/lilgym_parse_rate`` every iteration."""

    reads = "lilgym_parse_rate"

    def __init__(self, cfg: LilGymParseRateConfig) -> None:
        self.cfg = cfg

    def __call__(self, rollout: Rollout) -> torch.Tensor:
        return torch.as_tensor(rollout.outputs["lilgym_parse_rate"], dtype=torch.float32).cpu()
