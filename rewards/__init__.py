"""Built-in rewards. Each reads one rollout output and returns a ``[B]`` float tensor."""

from __future__ import annotations

from polyrl import ComponentSpec, hookimpl

from .jpeg import JpegCompressibility, JpegConfig, JpegIncompressibility
from .sentiment import SENTIMENT_SPEC


@hookimpl
def polyrl_rewards():
    return [
        ComponentSpec(
            "jpeg_compressibility",
            lambda cfg, policy=None: JpegCompressibility(cfg),
            JpegConfig,
            modality="image",
            reads=("images",),
            description="minus the JPEG size in kB (quality 95)",
        ),
        ComponentSpec(
            "jpeg_incompressibility",
            lambda cfg, policy=None: JpegIncompressibility(cfg),
            JpegConfig,
            modality="image",
            reads=("images",),
            description="the JPEG size in kB (quality 95)",
        ),
        SENTIMENT_SPEC,
    ]
