"""Success rate of a policy on a whole lilGym split (every example once), without stop forcing.

Used by ``scripts/lilgym_results.py``; works with any policy the ``lilgym`` sampler can drive
(``lilgym_cnn``, :class:`RandomPolicy`) through the same sampler code as training.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from polyrl.types import Context, Policy

from .actions import NUM_ACTIONS
from .sampler import LilGymSampler, LilGymSamplerConfig

__all__ = ["RandomPolicy", "evaluate_split", "run_split"]


class RandomPolicy(Policy):
    """Uniform over the valid actions (``masked=True``) or over all actions (an invalid one ends the
    episode with -1, as for any agent)."""

    modality = "env"

    def __init__(self, appearance: str, masked: bool = True) -> None:
        super().__init__()
        self.appearance = appearance
        self.masked = masked
        self._p = nn.Parameter(torch.zeros(1), requires_grad=False)

    def tokenize(self, sentences):
        return torch.zeros(len(sentences), 1, dtype=torch.long), torch.ones(len(sentences), 1, dtype=torch.bool)

    def encode(self, ids, mask):
        return torch.zeros(ids.shape[0], 1)

    @torch.no_grad()
    def act(self, images, masks, sentence, target, generator, deterministic=False, forced_stop=None):
        m = masks.bool() if self.masked else torch.ones(masks.shape[0], NUM_ACTIONS[self.appearance], dtype=torch.bool)
        p = m.float() / m.float().sum(-1, keepdim=True)
        actions = torch.multinomial(p, 1, generator=generator).squeeze(-1)
        if forced_stop is not None:
            actions = actions.masked_fill(forced_stop.bool(), 0)
        return actions, p.gather(1, actions.unsqueeze(1)).squeeze(1).log()

    def forward(self, rollout, steps=None):  # pragma: no cover - never trained
        raise NotImplementedError("RandomPolicy is not trainable")


def run_split(sampler: Any, policy: Any, seed: int = 0, batch: int = 64, turns: bool = False) -> dict[str, float]:
    """Play every example of ``sampler``'s split once with ``policy``; see :func:`evaluate_split`."""
    ids = [ex.id for ex in sampler.examples]
    was_training = policy.training
    policy.eval()
    success, returns, steps = 0.0, 0.0, 0
    try:
        for k in range(0, len(ids), batch):
            contexts = [Context(prompt=i, group=j) for j, i in enumerate(ids[k : k + batch])]
            g = torch.Generator().manual_seed(seed * 1_000_003 + k)
            r = sampler.sample(policy, contexts, g)
            success += float(r.outputs["lilgym_success"].sum())
            returns += float(r.outputs["env_rewards"].sum())
            steps += int(r.outputs["episode_lengths"].sum())
    finally:
        policy.train(was_training)
    n = len(ids)
    return {"success": success / n, "return": returns / n, "episodes": n, "env_steps": steps}


def evaluate_split(policy: Any, task: str, split: str = "dev", data_dir: str | None = None, seed: int = 0,
                   deterministic: bool = True, batch: int = 64, statements: str = "all",
                   heldout_fraction: float = 0.5) -> dict[str, float]:
    """Play every example of ``task``/``split`` once (no stop forcing); returns ``success`` (the
    success rate), ``return`` (mean episode return), ``episodes`` and ``env_steps``."""
    cfg = LilGymSamplerConfig(task=task, split=split, data_dir=data_dir, stop_forcing=False,
                              deterministic=deterministic, statements=statements, heldout_fraction=heldout_fraction)
    return run_split(LilGymSampler(cfg, policy), policy, seed, batch)
