"""One scoring path: training, the run report, held-out evaluation and ``polyrl eval`` all score a
rollout through :func:`score`, so a reward means the same number everywhere."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import torch

from .types import RewardOutput, Rollout


@contextlib.contextmanager
def evaluating(policy: torch.nn.Module, sampler: Any = None) -> Iterator[None]:
    """``policy`` in eval mode (and ``sampler.training`` False), and afterwards every module's own
    train/eval mode back (frozen parts stay in eval mode) and the sampler's flag, so that sampling
    for the report or an evaluation leaves training exactly as it was."""
    modes = [(m, m.training) for m in policy.modules()]
    had = sampler is not None and "training" in vars(sampler)  # its own flag, or the class default
    sampler_mode = getattr(sampler, "training", None)
    policy.eval()
    if sampler is not None:
        sampler.training = False
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode
        if sampler is not None:
            if had:
                sampler.training = sampler_mode
            else:
                del sampler.training


def score(rewards: Sequence[tuple[str, float, Any]], rollout: Rollout) -> RewardOutput:
    """Call every ``(name, weight, fn)`` reward on ``rollout`` (no gradients) and compose them.

    Each reward must return ``[B]`` or ``[B, T]`` (per step) finite values; anything else is an error
    naming the reward. Components are returned on the CPU in float32."""
    b, t = rollout.log_probs.shape
    components: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, _, fn in rewards:
            value = torch.as_tensor(fn(rollout), dtype=torch.float32).detach().cpu()
            if value.shape not in ((b,), (b, t)):
                raise ValueError(
                    f"reward {name!r} returned shape {tuple(value.shape)}; expected [{b}] or [{b}, {t}] (per step)"
                )
            if not torch.isfinite(value).all():
                raise ValueError(f"reward {name!r} returned non-finite values: {value.tolist()[:16]}")
            components[name] = value
    return compose_rewards(components, [w for _, w, _ in rewards], rollout.mask.cpu())


def compose_rewards(components: dict[str, torch.Tensor], weights: list[float], mask: torch.Tensor) -> RewardOutput:
    """Weighted sum of ``[B]`` and ``[B, T]`` components (see :class:`RewardOutput`)."""
    per_step = any(v.dim() == 2 for v in components.values())
    b, t = mask.shape
    total = torch.zeros((b, t) if per_step else (b,), dtype=torch.float32)
    if per_step:  # each sample's last valid step (masks may start with forced, untrained steps)
        last = (t - 1 - mask.long().flip(1).argmax(1)).clamp(min=0)
    for (name, value), weight in zip(components.items(), weights):
        if per_step and value.dim() == 1:
            value = torch.zeros(b, t).scatter(1, last.unsqueeze(1), value.unsqueeze(1))
        total = total + weight * value
    return RewardOutput(total=total, components=components)
