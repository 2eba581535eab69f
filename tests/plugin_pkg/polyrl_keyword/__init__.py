"""An example external polyrl plugin, installed with pip: a keyword-count reward for text."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from polyrl import ComponentSpec, Reward, hookimpl


@dataclass
class KeywordConfig:
    """Settings of the keyword reward."""

    keywords: list[str] = field(default_factory=lambda: ["great", "good"])
    """Words that earn a point each time they appear (case-insensitive)."""


class KeywordCount(Reward):
    reads = "texts"

    def __init__(self, cfg: KeywordConfig) -> None:
        self.keywords = [k.lower() for k in cfg.keywords]

    def __call__(self, rollout):
        counts = []
        for text in rollout.outputs["texts"]:
            words = text.lower().split()
            counts.append(sum(w.strip(".,!?") in self.keywords for w in words))
        return torch.tensor(counts, dtype=torch.float32)


@hookimpl
def polyrl_rewards():
    return [
        ComponentSpec(
            "keyword_count",
            lambda cfg, policy=None: KeywordCount(cfg),
            KeywordConfig,
            modality="text",
            reads=("texts",),
            description="number of configured keywords in the completion",
        )
    ]
