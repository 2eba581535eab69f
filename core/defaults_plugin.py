"""Default implementations of the loop hooks, registered ``trylast``.

Each simply calls the component the run config selected. A plugin can take over a phase by
returning a value from its own implementation, or wrap it with ``@hookimpl(wrapper=True)``.
"""

from __future__ import annotations

import torch

from . import hookimpl
from .scoring import compose_rewards, score  # noqa: F401 - compose_rewards is re-exported


@hookimpl(trylast=True)
def polyrl_sample(trainer, contexts):
    # the same precision path as the update's recomputation (accelerate runs the prepared model's
    # forward under autocast), so that the first, on-policy ratios are 1 under mixed precision too
    with torch.no_grad(), trainer.accelerator.autocast():
        return trainer.sampler.sample(trainer.policy, contexts, trainer.generator(f"sample/{trainer.sample_batch}"))


@hookimpl(trylast=True)
def polyrl_reward(trainer, rollout):
    out = score(trainer.rewards, rollout)
    # each reward's per-sample score, [B, K] in the order of trainer.rewards, for updates that
    # normalise rewards separately (GRPO's multi_objective_aggregation: normalize_then_sum)
    if out.components:
        rollout.outputs["reward_components"] = torch.stack(
            [v.sum(1) if v.dim() == 2 else v for v in out.components.values()], dim=1
        )
    return out


@hookimpl(trylast=True)
def polyrl_update(trainer, rollout, rewards):
    return trainer.update.step(trainer, rollout, rewards)
