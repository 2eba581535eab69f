"""What the learned imitation rewards share: scoring transitions, and a buffer of the learner's
recent transitions.

A :class:`TransitionReward` scores a batch of transitions ``{"observations" [N, D], "actions"
[N, A] (environment units), "next_observations" [N, D]}`` with ``score_transitions(batch) ->
[N]``. The same method serves the loop (``__call__`` scores a rollout's valid steps and returns
per-step rewards ``[B, T]``) and off-policy updates, which re-score replayed batches with it
(``sac`` with ``replay_rewards: recompute``), so a reward that keeps learning is never stale.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from polyrl.types import Reward, Rollout


def rollout_transitions(rollout: Rollout) -> dict[str, torch.Tensor]:
    """The valid steps of an environment rollout as a flat batch of transitions."""
    m = rollout.mask.cpu().bool()
    batch = {"observations": rollout.data["observations"].cpu()[m], "actions": rollout.data["actions"].cpu()[m]}
    if "next_observations" in rollout.data:
        batch["next_observations"] = rollout.data["next_observations"].cpu()[m]
    return batch


class TransitionReward(Reward):
    """Base of the learned imitation rewards; subclasses implement :meth:`score_transitions`."""

    reads = "transitions"
    input: str = "states"

    def features(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``[N, D]`` states, or ``[N, D + A]`` state-action pairs (``input: states_actions``)."""
        obs = batch["observations"].float()
        if self.input == "states":
            return obs
        return torch.cat([obs, batch["actions"].float()], dim=-1)

    def score_transitions(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def __call__(self, rollout: Rollout) -> torch.Tensor:
        m = rollout.mask.cpu().bool()
        out = torch.zeros(m.shape, dtype=torch.float32)
        if m.any():
            out[m] = self.score_transitions(rollout_transitions(rollout)).float().cpu()
        return out


class FeatureBuffer:
    """A ring buffer of the learner's recent feature vectors, each tagged with the *round* in which
    it was collected (AILBoost weighs rounds; SMILING and DAC sample uniformly)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.x: torch.Tensor | None = None
        self.round = torch.zeros(capacity, dtype=torch.long)
        self.pos = 0
        self.size = 0

    def add(self, x: torch.Tensor, round_: int) -> None:
        x = x.detach().float().cpu()
        if self.x is None:
            self.x = torch.zeros(self.capacity, x.shape[1])
        if x.shape[0] > self.capacity:
            x = x[-self.capacity:]
        idx = (torch.arange(x.shape[0]) + self.pos) % self.capacity
        self.x[idx] = x
        self.round[idx] = round_
        self.pos = (self.pos + x.shape[0]) % self.capacity
        self.size = min(self.size + x.shape[0], self.capacity)

    def indices(self, n: int, generator: torch.Generator, weights: torch.Tensor | None = None) -> torch.Tensor:
        """``n`` indices drawn with replacement: uniformly (as the SMILING authors' code draws its
        100k-state epochs, whatever the buffer's size), or in proportion to ``weights`` (one per item)."""
        if weights is not None:
            return torch.multinomial(weights[: self.size], n, replacement=True, generator=generator)
        return torch.randint(0, self.size, (n,), generator=generator)

    def state_dict(self) -> dict[str, Any]:
        return {"capacity": self.capacity, "pos": self.pos, "size": self.size,
                "x": None if self.x is None else self.x[: self.size].clone(), "round": self.round[: self.size].clone()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.capacity, self.pos, self.size = int(state["capacity"]), int(state["pos"]), int(state["size"])
        self.round = torch.zeros(self.capacity, dtype=torch.long)
        self.round[: self.size] = state["round"]
        self.x = None
        if state["x"] is not None:
            self.x = torch.zeros(self.capacity, state["x"].shape[1])
            self.x[: self.size] = state["x"]


def standardize(r: torch.Tensor, scale: float) -> torch.Tensor:
    """``(r - mean) / (std + 1e-6) * scale`` over the batch (SMILING's reward normalisation)."""
    if r.numel() < 2:
        return torch.zeros_like(r)
    return (r - r.mean()) / (r.std() + 1e-6) * scale


def net_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
