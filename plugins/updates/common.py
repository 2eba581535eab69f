"""Pieces shared by the update algorithms: batching and cross-process gathering."""

from __future__ import annotations

from typing import Iterator

import torch

from polyrl.types import ConfigError, Rollout


def check_batching(name: str, batch_size: int, train_batch_size: int, accumulation: int) -> None:
    """Reject a per-process batch that the micro-batch size and accumulation do not divide."""
    if train_batch_size < 1 or accumulation < 1:
        raise ConfigError("update.train_batch_size and update.gradient_accumulation_batches must be >= 1")
    if batch_size % train_batch_size:
        raise ConfigError(
            f"update.train_batch_size={train_batch_size} must divide the per-process batch "
            f"run.prompts_per_iteration * run.samples_per_prompt = {batch_size} ({name}); "
            f"accepted: {[d for d in range(1, batch_size + 1) if batch_size % d == 0]}"
        )
    n_micro = batch_size // train_batch_size
    if n_micro % accumulation:
        raise ConfigError(
            f"update.gradient_accumulation_batches={accumulation} must divide the number of micro-batches "
            f"{n_micro} (= {batch_size} / train_batch_size {train_batch_size}) ({name}); "
            f"accepted: {[d for d in range(1, n_micro + 1) if n_micro % d == 0]}"
        )


def checked_clip_bounds(clip_range: float, epsilon_low: float | None, epsilon_high: float | None) -> tuple[float, float]:
    """``(epsilon_low, epsilon_high)`` with ``clip_range`` filling the unset ones, checked."""
    if clip_range <= 0:
        raise ConfigError(f"update.clip_range must be > 0, got {clip_range}")
    low = clip_range if epsilon_low is None else epsilon_low
    high = clip_range if epsilon_high is None else epsilon_high
    if not 0 <= low < 1:
        raise ConfigError(f"update.epsilon_low must be in [0, 1) (the ratio's lower clip is 1 - epsilon_low), got {low}")
    if high < 0:
        raise ConfigError(f"update.epsilon_high must be >= 0, got {high}")
    return low, high


def windows(perm: torch.Tensor, train_batch_size: int, accumulation: int) -> Iterator[list[torch.Tensor]]:
    """Split a permutation of sample indices into accumulation windows of micro-batches."""
    micro = list(perm.split(train_batch_size))
    for i in range(0, len(micro), accumulation):
        yield micro[i : i + accumulation]


def gather_rewards(ctx, rollout: Rollout, rewards: torch.Tensor) -> tuple[torch.Tensor, list[str], slice]:
    """Rewards ``[N]`` and prompts of *all* processes, and the slice that is this process's
    (``ctx``: the update's :class:`polyrl.context.UpdateContext`, or anything with its ``accelerator``).

    Every process holds the same number of samples, so process ``r``'s samples are
    ``[r*B, (r+1)*B)`` of the gathered tensor.
    """
    acc = ctx.accelerator
    local = rewards.detach().float().to(acc.device)
    # one host read per update: the advantages (DDPO's per-prompt tracker) are computed on the host
    all_rewards = acc.gather(local).cpu()
    from accelerate.utils import gather_object  # imported when an update runs, not when the plugin loads

    all_prompts = gather_object(list(rollout.prompts)) if acc.num_processes > 1 else list(rollout.prompts)
    b = local.shape[0]
    return all_rewards, all_prompts, slice(acc.process_index * b, (acc.process_index + 1) * b)


def sequence_rewards(rewards: torch.Tensor) -> torch.Tensor:
    """``[B]`` returns from ``[B]`` rewards or ``[B, T]`` per-step rewards (summed over steps)."""
    return rewards.sum(1) if rewards.dim() == 2 else rewards


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp(min=1.0)
