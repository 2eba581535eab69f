"""JPEG file size as a reward (DDPO's compressibility tasks).

Images (float ``[B, 3, H, W]`` in ``[0, 1]``) are converted to uint8, encoded by PIL as JPEG at
quality 95, and measured in kilobytes (bytes / 1000). Incompressibility rewards the size,
compressibility its negative.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import torch
from PIL import Image

from polyrl.types import Reward, Rollout


def jpeg_size_kb(images: torch.Tensor, quality: int = 95) -> torch.Tensor:
    """Size in kB of each image of ``images [B, 3, H, W]`` (float in [0, 1]) encoded as JPEG."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images [B, 3, H, W], got {tuple(images.shape)}")
    arr = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    sizes = []
    for a in arr:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="JPEG", quality=quality)
        sizes.append(buf.tell() / 1000)
    return torch.tensor(sizes, dtype=torch.float32)


@dataclass
class JpegConfig:
    """Settings of the JPEG size rewards."""

    quality: int = 95
    """JPEG quality used for encoding (1-95)."""

    def check(self) -> None:
        from polyrl.types import ConfigError

        if not 1 <= self.quality <= 95:
            raise ConfigError(f"quality must be between 1 and 95, got {self.quality}")


class JpegCompressibility(Reward):
    """``-kB``: smaller files are better."""

    reads = "images"

    def __init__(self, cfg: JpegConfig) -> None:
        self.cfg = cfg

    def __call__(self, rollout: Rollout) -> torch.Tensor:
        return -jpeg_size_kb(rollout.outputs["images"], self.cfg.quality)


class JpegIncompressibility(JpegCompressibility):
    """``+kB``: larger files are better."""

    def __call__(self, rollout: Rollout) -> torch.Tensor:
        return jpeg_size_kb(rollout.outputs["images"], self.cfg.quality)
