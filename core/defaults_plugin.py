"""Default implementations of the loop hooks, registered ``trylast``.

Each simply calls the component the run config selected. A plugin can take over a phase by
returning a value from its own implementation, or wrap it with ``@hookimpl(wrapper=True)``.
"""

from __future__ import annotations

import torch

from . import hookimpl
from .scoring import compose_rewards, score  # noqa: F401 - compose_rewards is re-exported
from .types import Rollout


@hookimpl(trylast=True)
def polyrl_sample(trainer, contexts):
    # the same precision path as the update's recomputation (accelerate runs the prepared model's
    # forward under autocast), so that the first, on-policy ratios are 1 under mixed precision too
    # Samplers yield their batch in chunks (one chunk unless they work in batches); with
    # ``run.async_rewards`` the loop scores each chunk while the next one samples.
    g = trainer.generator(f"sample/{trainer.sample_batch}")
    chunks = []
    with torch.no_grad(), trainer.accelerator.autocast():
        for chunk in trainer.sampler.sample_chunks(trainer.policy, contexts, g):
            chunks.append(chunk)
            if trainer.on_sample_chunk is not None:
                trainer.on_sample_chunk(chunk)
    return Rollout.cat(chunks)


@hookimpl(trylast=True)
def polyrl_reward(trainer, rollout):
    return score(trainer.rewards, rollout)


@hookimpl(trylast=True)
def polyrl_update(trainer, rollout, rewards):
    # the update sees the iteration's UpdateContext, not the whole trainer
    return trainer.update.step(trainer.update_context(), rollout, rewards)
