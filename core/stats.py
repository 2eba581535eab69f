"""Reward statistics used to turn rewards into advantages."""

from __future__ import annotations

from collections import deque
from typing import Any, Mapping, Sequence

import torch


class PerPromptStatTracker:
    """DDPO's per-prompt reward normaliser.

    Every prompt keeps a buffer of its most recent ``buffer_size`` rewards, which persists across
    iterations. Until a prompt's buffer holds ``min_count`` values, its rewards are normalised with
    the mean and std of the whole (gathered) batch; after that, with its own buffer's.
    ``A = (r - mean) / (std + 1e-6)``.
    """

    def __init__(self, buffer_size: int = 32, min_count: int = 16) -> None:
        if buffer_size < 1 or min_count < 1:
            raise ValueError(f"buffer_size and min_count must be >= 1, got {buffer_size}, {min_count}")
        self.buffer_size = buffer_size
        self.min_count = min_count
        self.buffers: dict[str, deque[float]] = {}

    def update(self, prompts: Sequence[str], rewards: torch.Tensor) -> torch.Tensor:
        """Add ``rewards [N]`` for ``prompts`` (length N) and return their advantages ``[N]``."""
        rewards = rewards.detach().double().cpu()
        if len(prompts) != rewards.numel():
            raise ValueError(f"{len(prompts)} prompts for {rewards.numel()} rewards")
        adv = torch.empty_like(rewards)
        batch_mean, batch_std = rewards.mean(), rewards.std(unbiased=False)
        for prompt in dict.fromkeys(prompts):  # unique, in order
            idx = torch.tensor([i for i, p in enumerate(prompts) if p == prompt])
            buf = self.buffers.setdefault(prompt, deque(maxlen=self.buffer_size))
            buf.extend(rewards[idx].tolist())
            if len(buf) < self.min_count:
                mean, std = batch_mean, batch_std
            else:
                values = torch.tensor(list(buf), dtype=torch.float64)
                mean, std = values.mean(), values.std(unbiased=False)
            adv[idx] = (rewards[idx] - mean) / (std + 1e-6)
        return adv.float()

    def stats(self) -> dict[str, float]:
        return {"tracker/prompts": float(len(self.buffers))}

    def state_dict(self) -> dict[str, Any]:
        return {"buffers": {k: list(v) for k, v in self.buffers.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.buffers = {k: deque(v, maxlen=self.buffer_size) for k, v in state["buffers"].items()}


def group_advantages(rewards: torch.Tensor, groups: Sequence[int], scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """GRPO advantages: ``(R_i - mean_G R) / (std_G R + eps)`` within each group (``std`` unbiased,
    as in the GRPO paper and TRL). ``scale=False`` only centres (Dr. GRPO)."""
    rewards = rewards.float()
    gid = torch.as_tensor(list(groups))
    adv = torch.empty_like(rewards)
    for g in torch.unique(gid):
        idx = (gid == g).nonzero(as_tuple=True)[0]
        r = rewards[idx]
        centred = r - r.mean()
        adv[idx] = centred / (r.std() + eps) if scale and r.numel() > 1 else centred
    return adv
