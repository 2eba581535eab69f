"""Built-in rewards. Each reads one rollout output and returns a ``[B]`` float tensor."""

from __future__ import annotations

from polyrl import ComponentSpec, hookimpl

from .jpeg import JpegCompressibility, JpegConfig, JpegIncompressibility
from .env import EnvReward, EnvRewardConfig, NormalisedReturn, NormalisedReturnConfig
from .sentiment import SENTIMENT_SPEC
from .group import PairwiseWinRate, PairwiseWinRateConfig
from .remote import REMOTE_SPEC


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
        REMOTE_SPEC,
        ComponentSpec(
            "env_reward",
            lambda cfg, policy=None: EnvReward(cfg),
            EnvRewardConfig,
            modality="env",
            reads=("env_rewards",),
            description="per-step rewards returned by the environment",
        ),
        ComponentSpec(
            "normalised_return",
            lambda cfg, policy=None: NormalisedReturn(cfg),
            NormalisedReturnConfig,
            modality="env",
            reads=("env_rewards",),
            description="episode return on the expert = 1, random = 0 scale (log it with weight 0)",
        ),
        ComponentSpec(
            "pairwise_win_rate",
            lambda cfg, policy=None: PairwiseWinRate(cfg, policy=policy),
            PairwiseWinRateConfig,
            description="win rate of each sample against the rest of its group under any reward or judge (Pref-GRPO)",
        ),
    ]
