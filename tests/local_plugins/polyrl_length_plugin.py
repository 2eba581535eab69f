"""A local (not installed) plugin module, loaded with ``-p polyrl_length_plugin``."""

from __future__ import annotations

from dataclasses import dataclass


from polyrl import ComponentSpec, hookimpl


@dataclass
class LengthConfig:
    """Settings of the completion-length reward."""

    per_token: float = 1.0
    """Reward per generated token."""


@hookimpl
def polyrl_rewards():
    def factory(cfg, policy=None):
        return lambda rollout: cfg.per_token * rollout.mask.float().sum(1).cpu()

    return [ComponentSpec("completion_length", factory, LengthConfig, modality="text", reads=("texts",),
                          description="number of generated tokens")]
