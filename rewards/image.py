"""Image rewards: the LAION aesthetic predictor and the CLIP score (prompt-image alignment).

Both run batched under ``torch.no_grad`` on the policy's device, and read ``images``
(float ``[B, 3, H, W]`` in ``[0, 1]``).
"""

from __future__ import annotations

import torch

from polyrl import ComponentSpec, hookimpl

from .aesthetic import AestheticConfig, AestheticReward
from .clip_score import ClipScore, ClipScoreConfig

__all__ = ["AestheticConfig", "AestheticReward", "ClipScore", "ClipScoreConfig"]


def _device(policy) -> torch.device:
    return getattr(policy, "device", None) or torch.device("cpu")


@hookimpl
def polyrl_rewards() -> list[ComponentSpec]:
    return [
        ComponentSpec(
            "aesthetic",
            lambda cfg, policy=None: AestheticReward(cfg, device=_device(policy)),
            AestheticConfig,
            modality="image",
            reads=("images",),
            description="LAION aesthetic predictor (linear MLP on L2-normalised CLIP ViT-L/14 image features)",
        ),
        ComponentSpec(
            "clip_score",
            lambda cfg, policy=None: ClipScore(cfg, device=_device(policy)),
            ClipScoreConfig,
            modality="image",
            reads=("images",),
            description="cosine of open_clip image and prompt embeddings (default: the tiny CLIP in assets/)",
        ),
    ]
