"""Default implementations of the loop hooks, registered ``trylast``.

Each simply calls the component the run config selected. A plugin can take over a phase by
returning a value from its own implementation, or wrap it with ``@hookimpl(wrapper=True)``.
"""

from __future__ import annotations

import torch

from . import hookimpl
from .types import RewardOutput


@hookimpl(trylast=True)
def polyrl_sample(trainer, contexts):
    # the same precision path as the update's recomputation (accelerate runs the prepared model's
    # forward under autocast), so that the first, on-policy ratios are 1 under mixed precision too
    with torch.no_grad(), trainer.accelerator.autocast():
        return trainer.sampler.sample(trainer.policy, contexts, trainer.generator(f"sample/{trainer.sample_batch}"))


@hookimpl(trylast=True)
def polyrl_reward(trainer, rollout):
    b, t = rollout.log_probs.shape
    components: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, _, fn in trainer.rewards:
            value = torch.as_tensor(fn(rollout), dtype=torch.float32).detach().cpu()
            if value.shape not in ((b,), (b, t)):
                raise ValueError(
                    f"reward {name!r} returned shape {tuple(value.shape)}; expected [{b}] or [{b}, {t}] (per step)"
                )
            if not torch.isfinite(value).all():
                raise ValueError(f"reward {name!r} returned non-finite values: {value.tolist()}")
            components[name] = value
    # each reward's per-sample score, [B, K] in the order of trainer.rewards, for updates that
    # normalise rewards separately (GRPO's multi_objective_aggregation: normalize_then_sum)
    if components:
        rollout.outputs["reward_components"] = torch.stack(
            [v.sum(1) if v.dim() == 2 else v for v in components.values()], dim=1
        )
    return compose_rewards(components, [w for _, w, _ in trainer.rewards], rollout.mask.cpu())


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


@hookimpl(trylast=True)
def polyrl_update(trainer, rollout, rewards):
    return trainer.update.step(trainer, rollout, rewards)
