"""The VADER sentiment reward."""

from __future__ import annotations

import pytest
import torch

from polyrl import Context, Rollout
from polyrl.rewards.sentiment import SENTIMENT_SPEC, SentimentConfig, VaderSentiment

TEXTS = [
    "This movie was wonderful, I loved every minute. Highly recommended!",
    "This blender is terrible and it broke after a week. Avoid it.",
    "The kettle is standard and it arrived on time.",
    "",
]


def rollout(texts: list[str]) -> Rollout:
    b = len(texts)
    return Rollout(
        contexts=[Context(prompt="") for _ in texts],
        log_probs=torch.zeros(b, 3),
        mask=torch.ones(b, 3, dtype=torch.bool),
        outputs={"texts": texts},
    )


def test_positive_beats_negative() -> None:
    r = VaderSentiment(SentimentConfig())(rollout(TEXTS))
    assert r.shape == (4,) and r.dtype == torch.float32
    assert r[0] > 0.5 and r[1] < -0.5 and r[0] > r[2] > r[1]
    assert r[3] == 0.0 and ((r >= -1) & (r <= 1)).all()


@pytest.mark.parametrize("score", ["compound", "pos", "neg", "neu"])
def test_score_options(score: str) -> None:
    r = VaderSentiment(SentimentConfig(score=score))(rollout(TEXTS))
    assert r.shape == (4,)
    if score == "pos":
        assert r[0] > r[1] and ((r >= 0) & (r <= 1)).all()
    elif score == "neg":
        assert r[1] > r[0] and ((r >= 0) & (r <= 1)).all()
    elif score == "neu":
        assert r[2] == pytest.approx(1.0) and r[2] > r[0]
    else:
        assert r[0] > 0 > r[1]


def test_spec() -> None:
    assert SENTIMENT_SPEC.name == "sentiment" and SENTIMENT_SPEC.reads == ("texts",)
    assert SENTIMENT_SPEC.modality == "text" and SENTIMENT_SPEC.config_cls is SentimentConfig
    reward = SENTIMENT_SPEC.factory(SentimentConfig(score="pos"), policy=None)
    assert isinstance(reward, VaderSentiment) and reward.reads == "texts"
    assert reward(rollout(["great"])).item() == pytest.approx(1.0)


def test_config_rejects_unknown_score() -> None:
    from polyrl.config import ConfigError, from_dict

    with pytest.raises(ConfigError, match="compound"):
        from_dict(SentimentConfig, {"score": "positive"}, "rewards.sentiment")
