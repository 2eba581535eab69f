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
    with torch.no_grad():
        return trainer.sampler.sample(trainer.policy, contexts, trainer.generator("sample"))


@hookimpl(trylast=True)
def polyrl_reward(trainer, rollout):
    components: dict[str, torch.Tensor] = {}
    total = torch.zeros(rollout.batch_size, dtype=torch.float32)
    with torch.no_grad():
        for name, weight, fn in trainer.rewards:
            value = torch.as_tensor(fn(rollout), dtype=torch.float32).detach().cpu()
            if value.shape != (rollout.batch_size,):
                raise ValueError(
                    f"reward {name!r} returned shape {tuple(value.shape)}; expected [{rollout.batch_size}]"
                )
            if not torch.isfinite(value).all():
                raise ValueError(f"reward {name!r} returned non-finite values: {value.tolist()}")
            components[name] = value
            total = total + weight * value
    return RewardOutput(total=total, components=components)


@hookimpl(trylast=True)
def polyrl_update(trainer, rollout, rewards):
    return trainer.update.step(trainer, rollout, rewards)
