"""Held-out evaluation during training (the ``eval`` section of a run config).

Every ``eval.every`` iterations the policy samples fixed prompts with fixed noise (the same at every
evaluation, so curves compare like with like) and :func:`polyrl.scoring.score` scores them with the
evaluation rewards, which the update never sees. The loop logs ``eval/<name>`` (mean per sample) and
``eval/reward_mean`` (their weighted sum) in that iteration's ``metrics.jsonl`` row.

Each process samples its share of the prompts (``i::num_processes``) and the sums are reduced, so
every process must call :meth:`HeldOut.run` at the same iterations. Drawing from its own generator
and restoring every module's train/eval mode, an evaluation leaves training exactly as it was.
"""

from __future__ import annotations

from typing import Any

import torch

from .prompts import PromptSource
from .scoring import evaluating, score
from .types import Context


class HeldOut:
    """The evaluation of one run: its prompts, rewards and schedule."""

    def __init__(self, trainer: Any) -> None:
        cfg = trainer.config
        self.config = cfg.eval
        source = PromptSource(self.config.prompts or cfg.prompts, self.config.seed)
        rows = source.rows
        self.contexts = [Context(prompt=rows[i % len(rows)][0], group=i, extra=dict(rows[i % len(rows)][1]))
                         for i in range(self.config.samples)]
        self.rewards = trainer.host.build_rewards(cfg, trainer.policy, self.config.rewards)

    def due(self, iteration: int, last: int) -> bool:
        return iteration % self.config.every == 0 or iteration == last

    def run(self, trainer: Any) -> dict[str, float]:
        acc = trainer.accelerator
        mine = self.contexts[acc.process_index :: acc.num_processes]
        names = [name for name, _, _ in self.rewards]
        weights = torch.tensor([w for _, w, _ in self.rewards], dtype=torch.float64)
        sums = torch.zeros(len(names) + 1, dtype=torch.float64)  # per reward, then the count
        with evaluating(trainer.policy, trainer.sampler):
            for k in range(0, len(mine), self.config.batch):
                g = torch.Generator().manual_seed(self.config.seed * 1_000_003 + acc.process_index * 7919 + k)
                with torch.no_grad(), acc.autocast():
                    rollout = trainer.sampler.sample(trainer.policy, mine[k : k + self.config.batch], g)
                out = score(self.rewards, rollout)
                for i, name in enumerate(names):
                    v = out.components[name]
                    sums[i] += (v.sum(1) if v.dim() == 2 else v).double().sum()
                sums[-1] += rollout.batch_size
        if acc.num_processes > 1:
            sums = acc.reduce(sums.to(acc.device), reduction="sum").cpu()
        means = sums[:-1] / sums[-1].clamp(min=1)
        metrics = {f"eval/{name}": float(means[i]) for i, name in enumerate(names)}
        metrics["eval/reward_mean"] = float((means * weights).sum())
        return metrics
