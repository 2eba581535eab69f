"""Update algorithms that work on ``[B, T]`` log-probs, shared by every modality."""

from __future__ import annotations

from polyrl import ComponentSpec, hookimpl

from .ddpo import DDPO, DDPOConfig
from .grpo import GRPO, GRPOConfig
from .reinforce import Reinforce, ReinforceConfig


@hookimpl
def polyrl_updates():
    return [
        ComponentSpec("ddpo", DDPO, DDPOConfig, description="DDPO clipped objective, per-prompt stat tracker, per-sample step shuffle"),
        ComponentSpec("grpo", GRPO, GRPOConfig, description="GRPO group-normalised advantages, token-level clip, optional k3 KL"),
        ComponentSpec("reinforce", Reinforce, ReinforceConfig, description="REINFORCE with a batch, group or moving-average baseline"),
    ]
