"""Image rewards: the LAION aesthetic predictor and the CLIP score (prompt-image alignment).

Both run batched under ``torch.no_grad`` on the policy's device, and read ``images``
(float ``[B, 3, H, W]`` in ``[0, 1]``).
"""

from __future__ import annotations

import torch

from polyrl import ComponentSpec, hookimpl

from .aesthetic import AestheticConfig, AestheticReward
from .clip_score import ClipScore, ClipScoreConfig
from .hps import HPSConfig, HPSReward
from .image_reward import ImageRewardConfig, ImageRewardReward
from .pickscore import PickScoreConfig, PickScoreReward
from .shape_match import ShapeMatch, ShapeMatchConfig

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
        ComponentSpec(
            "pickscore",
            lambda cfg, policy=None: PickScoreReward(cfg, device=_device(policy)),
            PickScoreConfig,
            modality="image",
            reads=("images",),
            description="PickScore (CLIP ViT-H/14 fine-tuned on Pick-a-Pic): logit scale times image-prompt cosine",
        ),
        ComponentSpec(
            "hps",
            lambda cfg, policy=None: HPSReward(cfg, device=_device(policy)),
            HPSConfig,
            modality="image",
            reads=("images",),
            description="HPS v2.1 human preference score (open_clip ViT-H/14): image-prompt cosine",
        ),
        ComponentSpec(
            "image_reward",
            lambda cfg, policy=None: ImageRewardReward(cfg, device=_device(policy)),
            ImageRewardConfig,
            modality="image",
            reads=("images",),
            description="ImageReward (BLIP ViT-L/16 + cross-attending BERT + MLP), normalised as its authors do",
        ),
        ComponentSpec(
            "shape_match",
            lambda cfg, policy=None: ShapeMatch(cfg),
            ShapeMatchConfig,
            modality="image",
            reads=("images",),
            description="tiny image world: fraction of the caption's colour, shape and position found in the pixels",
        ),
    ]
