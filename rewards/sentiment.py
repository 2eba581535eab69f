"""``sentiment``: VADER sentiment of generated texts (rule-based, lexicon shipped with the package).

VADER (Hutto & Gilbert 2014) scores a text from a hand-made lexicon and a few rules (negation,
intensifiers, "but", punctuation). It needs no model download, runs on the CPU in microseconds
per text, and so stands in for the DistilBERT IMDB classifier of RL4LMs' sentiment task.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from polyrl import ComponentSpec, Reward, Rollout

__all__ = ["SentimentConfig", "VaderSentiment", "SENTIMENT_SPEC"]


@dataclass
class SentimentConfig:
    """Which VADER score to use as the reward."""

    score: Literal["compound", "pos", "neg", "neu"] = "compound"
    """compound: normalised overall sentiment in [-1, 1] (the usual choice); pos / neg / neu:
    the proportions of the text that are positive, negative or neutral, each in [0, 1] (note that
    rewarding neg makes the texts more negative)."""


class VaderSentiment(Reward):
    """``rollout.outputs["texts"]`` (``B`` strings) -> ``[B]`` float32 VADER scores.

    The result is on the device of ``rollout.log_probs`` (where the sampler put the rollout).
    """

    reads = "texts"

    def __init__(self, config: SentimentConfig | None = None) -> None:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self.config = config or SentimentConfig()
        self.analyzer = SentimentIntensityAnalyzer()

    def scores(self, texts: list[str]) -> list[float]:
        """The configured score of each text (an empty text scores 0)."""
        key = self.config.score
        return [float(self.analyzer.polarity_scores(t)[key]) for t in texts]

    def __call__(self, rollout: Rollout) -> torch.Tensor:
        texts = rollout.outputs["texts"]
        return torch.tensor(self.scores(list(texts)), dtype=torch.float32, device=rollout.log_probs.device)


SENTIMENT_SPEC = ComponentSpec(
    name="sentiment",
    factory=lambda cfg, policy=None: VaderSentiment(cfg),
    config_cls=SentimentConfig,
    modality="text",
    reads=("texts",),
    description="VADER sentiment of the generated texts (compound in [-1, 1], or pos/neg/neu)",
)
