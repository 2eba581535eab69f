"""Group rewards: a sample's reward is its standing among the other samples of its prompt.

``pairwise_win_rate`` is the reward of Pref-GRPO (Wang et al. 2025, "Pref-GRPO: Pairwise
Preference Reward-based GRPO for Stable Text-to-Image Reinforcement Learning", arXiv:2508.20751):
every pair of samples drawn for the same prompt is compared, the preferred sample of a pair wins 1,
an undecided pair (a tie) gives each 0.5, and a sample's reward is its number of wins divided by its
number of comparisons::

    r_i = 1/(G-1) · Σ_{j ≠ i in the group of i} ( 1[i beats j] + 0.5 · 1[tie(i, j)] )      ∈ [0, 1]

Pref-GRPO asks a pairwise judge (a vision-language model) which of two images is better; here the
comparison comes from either

* any pointwise reward, named with its own settings: ``i`` beats ``j`` when ``s_i > s_j +
  tie_margin``, and ``|s_i - s_j| <= tie_margin`` is a tie. Turning scores into win rates removes
  their scale and keeps only the order within the group, which is what Pref-GRPO argues makes
  training robust to reward hacking through tiny score differences being inflated by group
  normalisation; or
* a pairwise judge: a reward that subclasses :class:`PairwiseJudge` and returns, for pairs
  ``(i, j)``, the probability (or 0 / 0.5 / 1 verdict) that ``i`` is preferred.

Groups are the samples sharing a ``Context.group`` (all ``G`` samples of a prompt are on the same
process and in the same sampling batch). A sample alone in its group scores 0.5. The wrapped reward
is built by the same registry as every other reward, from the built-in and installed plugins plus
the modules listed in ``plugins``.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass, field
from typing import Any

import torch

from polyrl.types import ConfigError, Reward, Rollout

__all__ = ["PairwiseJudge", "PairwiseWinRate", "PairwiseWinRateConfig", "win_rates"]


class PairwiseJudge(Reward):
    """A reward that compares two samples rather than scoring one.

    ``compare(rollout, first, second) -> [P]`` returns for each pair ``(first[p], second[p])`` (indices
    into the rollout, same group) the probability that ``first[p]`` is preferred: 1 a win, 0 a loss,
    0.5 a tie, or anything between. ``pairwise_win_rate`` turns these into win rates."""

    def compare(self, rollout: Rollout, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def __call__(self, rollout: Rollout) -> torch.Tensor:
        raise TypeError(f"{type(self).__name__} is a pairwise judge: use it through the pairwise_win_rate reward")


def win_rates(scores: torch.Tensor, groups: list[int], tie_margin: float = 0.0) -> torch.Tensor:
    """``[B]`` win rate of each sample against the others of its group, from pointwise
    ``scores [B]``: a win counts 1, a tie (``|s_i - s_j| <= tie_margin``) 0.5; a sample alone in its
    group gets 0.5."""
    scores = scores.detach().double().cpu()
    out = torch.full((len(groups),), 0.5, dtype=torch.float64)
    for idx in _group_indices(groups):
        if len(idx) < 2:
            continue
        s = scores[idx]
        diff = s[:, None] - s[None, :]
        wins = (diff > tie_margin).double() + 0.5 * (diff.abs() <= tie_margin).double()
        wins.fill_diagonal_(0.0)
        out[idx] = wins.sum(1) / (len(idx) - 1)
    return out.float()


def _group_indices(groups: list[int]) -> list[torch.Tensor]:
    members: dict[Any, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    return [torch.tensor(v, dtype=torch.long) for v in members.values()]


@functools.lru_cache(maxsize=8)
def _reward_registry(plugins: tuple[str, ...]) -> dict[str, Any]:
    from polyrl.host import Host

    return Host(plugins=plugins).registry["reward"]


@dataclass
class PairwiseWinRateConfig:
    """Settings of the pairwise win-rate group reward."""

    reward: str = "clip_score"
    """The reward (or pairwise judge) that compares the samples, by its registered name
    (``pickscore``, ``hps``, ``image_reward``, ``clip_score``, a plugin's reward...)."""
    params: dict[str, Any] = field(default_factory=dict)
    """That reward's own settings, as they would appear under its name in ``rewards:`` (no
    ``weight``)."""
    tie_margin: float = 0.0
    """Scores closer than this count as a tie (half a win each); pointwise rewards only."""
    plugins: list[str] = field(default_factory=list)
    """Modules providing the wrapped reward when it comes from a local plugin module (built-in
    and installed plugins are found without it)."""
    inner: Any = field(default=None, init=False, repr=False)
    """The wrapped reward's checked settings (filled in by ``check``)."""

    def check(self) -> None:
        """Check the wrapped reward's name and settings before any model loads."""
        from polyrl.config import from_dict, suggest

        if self.tie_margin < 0:
            raise ConfigError(f"pairwise_win_rate.tie_margin must be >= 0, got {self.tie_margin}")
        if "weight" in self.params or "name" in self.params:
            raise ConfigError("pairwise_win_rate.params: the wrapped reward's settings take no 'weight' or 'name'; "
                              "set the weight of pairwise_win_rate itself and the name in 'reward'")
        try:
            registry = _reward_registry(tuple(self.plugins))
        except ConfigError as e:
            raise ConfigError(f"pairwise_win_rate.plugins: {e}") from None
        if self.reward not in registry:
            raise ConfigError(f"pairwise_win_rate.reward: unknown reward {self.reward!r}{suggest(self.reward, registry)}; "
                              f"available: {sorted(registry)}")
        if self.reward == "pairwise_win_rate":
            raise ConfigError("pairwise_win_rate.reward: cannot wrap itself; name a pointwise reward or a pairwise judge")
        self.inner = from_dict(registry[self.reward].config_cls, dict(self.params), "pairwise_win_rate.params")


class PairwiseWinRate(Reward):
    """Each sample's win rate against the other samples of its group, ``[B]`` in ``[0, 1]``.

    Built from its config (the wrapped reward is built through the reward registry, on the policy's
    device), or around an already built reward: ``PairwiseWinRate(cfg, inner=reward)``."""

    scores_groups = True  # a sample's win rate depends on its group: scored on whole batches

    def __init__(self, cfg: PairwiseWinRateConfig, policy: Any = None, inner: Reward | None = None) -> None:
        self.cfg = cfg
        if inner is None:
            if cfg.inner is None:
                cfg.check()
            spec = _reward_registry(tuple(cfg.plugins))[cfg.reward]
            inner = spec.factory(cfg.inner, policy=policy)
        self.inner = inner
        self.reads = getattr(inner, "reads", "any")

    def __call__(self, rollout: Rollout) -> torch.Tensor:
        if self.reads not in ("any", None) and self.reads not in rollout.outputs and self.reads not in rollout.data:
            raise ValueError(f"pairwise_win_rate: the wrapped reward {self.cfg.reward!r} reads {self.reads!r}, "
                             f"which this rollout lacks (it has {sorted(rollout.outputs)})")
        groups = [c.group for c in rollout.contexts]
        if isinstance(self.inner, PairwiseJudge):
            return self._judged(rollout, groups)
        scores = torch.as_tensor(self.inner(rollout), dtype=torch.float32)
        if scores.dim() == 2:  # a per-step reward: compare returns
            scores = scores.sum(1)
        if scores.shape != (rollout.batch_size,):
            raise ValueError(f"pairwise_win_rate: {self.cfg.reward!r} returned shape {tuple(scores.shape)}, "
                             f"expected [{rollout.batch_size}]")
        return win_rates(scores, groups, self.cfg.tie_margin)

    def _judged(self, rollout: Rollout, groups: list[int]) -> torch.Tensor:
        pairs = [(int(a), int(b)) for idx in _group_indices(groups) for a, b in itertools.combinations(idx.tolist(), 2)]
        wins = torch.zeros(rollout.batch_size, dtype=torch.float64)
        counts = torch.zeros(rollout.batch_size, dtype=torch.float64)
        if pairs:
            first = torch.tensor([a for a, _ in pairs])
            second = torch.tensor([b for _, b in pairs])
            p = torch.as_tensor(self.inner.compare(rollout, first, second), dtype=torch.float64).cpu()
            if p.shape != (len(pairs),) or not bool(((p >= 0) & (p <= 1)).all()):
                raise ValueError(f"pairwise_win_rate: judge {self.cfg.reward!r} must return [{len(pairs)}] probabilities "
                                 f"in [0, 1], got shape {tuple(p.shape)}")
            wins.index_add_(0, first, p).index_add_(0, second, 1 - p)
            counts.index_add_(0, first, torch.ones_like(p)).index_add_(0, second, torch.ones_like(p))
        out = torch.where(counts > 0, wins / counts.clamp(min=1), torch.full_like(wins, 0.5))
        return out.float()

    def setup(self, trainer: Any) -> None:
        fn = getattr(self.inner, "setup", None)
        if callable(fn):
            fn(trainer)

    def close(self) -> None:
        fn = getattr(self.inner, "close", None)
        if callable(fn):
            fn()

    def learn(self, trainer: Any, rollout: Rollout) -> dict[str, float]:
        return self.inner.learn(trainer, rollout)

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state) -> None:
        self.inner.load_state_dict(state)
