"""polyrl: reinforcement-learning fine-tuning for generative models, through one loop and plugins."""

from __future__ import annotations

import pluggy

from .types import (
    ComponentSpec,
    ConfigError,
    Context,
    Policy,
    Reward,
    RewardOutput,
    Rollout,
    Sampler,
    Update,
)

__version__ = "0.1.0"

hookimpl = pluggy.HookimplMarker("polyrl")
"""Marker for plugin hook implementations: ``@polyrl.hookimpl def polyrl_rewards(): ...``."""

__all__ = [
    "hookimpl",
    "ComponentSpec",
    "ConfigError",
    "Context",
    "Policy",
    "Reward",
    "RewardOutput",
    "Rollout",
    "Sampler",
    "Update",
    "__version__",
]
