"""Reward statistics used to turn rewards into advantages, and :class:`UpdateStats`: an update's
logged statistics, kept on the device until the update ends."""

from __future__ import annotations

from collections import deque
from typing import Any, Mapping, Sequence, Union

import torch


class PerPromptStatTracker:
    """DDPO's per-prompt reward normaliser.

    Every prompt keeps a buffer of its most recent ``buffer_size`` rewards, which persists across
    iterations. Until a prompt's buffer holds ``min_count`` values, its rewards are normalised with
    the mean and std of the whole (gathered) batch; after that, with its own buffer's.
    ``A = (r - mean) / (std + 1e-6)``.
    """

    def __init__(self, buffer_size: int = 32, min_count: int = 16) -> None:
        if buffer_size < 1 or min_count < 1:
            raise ValueError(f"buffer_size and min_count must be >= 1, got {buffer_size}, {min_count}")
        self.buffer_size = buffer_size
        self.min_count = min_count
        self.buffers: dict[str, deque[float]] = {}

    def update(self, prompts: Sequence[str], rewards: torch.Tensor) -> torch.Tensor:
        """Add ``rewards [N]`` for ``prompts`` (length N) and return their advantages ``[N]``."""
        rewards = rewards.detach().double().cpu()
        if len(prompts) != rewards.numel():
            raise ValueError(f"{len(prompts)} prompts for {rewards.numel()} rewards")
        adv = torch.empty_like(rewards)
        batch_mean, batch_std = rewards.mean(), rewards.std(unbiased=False)
        for prompt in dict.fromkeys(prompts):  # unique, in order
            idx = torch.tensor([i for i, p in enumerate(prompts) if p == prompt])
            buf = self.buffers.setdefault(prompt, deque(maxlen=self.buffer_size))
            buf.extend(rewards[idx].tolist())
            if len(buf) < self.min_count:
                mean, std = batch_mean, batch_std
            else:
                values = torch.tensor(list(buf), dtype=torch.float64)
                mean, std = values.mean(), values.std(unbiased=False)
            adv[idx] = (rewards[idx] - mean) / (std + 1e-6)
        return adv.float()

    def stats(self) -> dict[str, float]:
        return {"tracker/prompts": float(len(self.buffers))}

    def state_dict(self) -> dict[str, Any]:
        return {"buffers": {k: list(v) for k, v in self.buffers.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.buffers = {k: deque(v, maxlen=self.buffer_size) for k, v in state["buffers"].items()}


def group_advantages(rewards: torch.Tensor, groups: Sequence[int], scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """GRPO advantages: ``(R_i - mean_G R) / (std_G R + eps)`` within each group (``std`` unbiased,
    as in the GRPO paper and TRL). ``scale=False`` only centres (Dr. GRPO)."""
    rewards = rewards.float()
    gid = torch.as_tensor(list(groups))
    adv = torch.empty_like(rewards)
    for g in torch.unique(gid):
        idx = (gid == g).nonzero(as_tuple=True)[0]
        r = rewards[idx]
        centred = r - r.mean()
        adv[idx] = centred / (r.std() + eps) if scale and r.numel() > 1 else centred
    return adv


Number = Union[int, float]


def read_scalars(tensors: Sequence[torch.Tensor]) -> list[float]:
    """The values of one-element tensors as Python numbers, with one device-to-host transfer per
    device (one ``torch.stack(...).tolist()``) instead of one ``.item()`` each. Each value is the
    one ``.item()`` would give, as a float: the stack promotes to the widest floating dtype, which
    holds every value exactly (integers go through float64)."""
    out: list[float] = [0.0] * len(tensors)
    by_device: dict[torch.device, list[int]] = {}
    for i, t in enumerate(tensors):
        by_device.setdefault(t.device, []).append(i)
    for idx in by_device.values():
        parts = [tensors[i].detach().reshape(()) for i in idx]
        if not all(p.is_floating_point() for p in parts):  # integers (and bools) as float64, not float32
            parts = [p.to(torch.float64) for p in parts]
        values = torch.stack(parts).tolist()
        for i, v in zip(idx, values):
            out[i] = v
    return out


def as_floats(values: Mapping[str, Any]) -> dict[str, float]:
    """``{key: float(value)}``, reading the tensors among the values with one transfer per device
    (see :func:`read_scalars`) rather than one host sync each."""
    tensors = [v for v in values.values() if isinstance(v, torch.Tensor)]
    read = iter(read_scalars(tensors))
    return {k: float(next(read) if isinstance(v, torch.Tensor) else v) for k, v in values.items()}


class UpdateStats:
    """The statistics an update logs, kept as device tensors while it runs and read once at its end.

    Reading a tensor on the host (``.item()``, ``float(t)``) waits until the accelerator has run
    every kernel queued before it, so a read per micro-step stalls a GPU once per micro-step.
    :meth:`add` keeps the (detached) tensor; :meth:`means` reads all of them in one transfer and
    returns each key's mean over its values in the order they were added: the same floats as
    ``sum(values) / len(values)`` over the values' ``.item()``::

        stats = UpdateStats("loss", "clipfrac")  # these keys first in the result, the others as added
        for ...:
            stats.add("loss", loss)              # no host sync
            stats.update(step_stats)             # {name: tensor or number}
        out = stats.means()                      # one host sync
    """

    def __init__(self, *keys: str) -> None:
        self._values: dict[str, list[tuple[torch.Tensor | float, Number]]] = {k: [] for k in keys}

    def add(self, key: str, value: torch.Tensor | Number, factor: Number = 1) -> None:
        """Record ``value`` (a one-element tensor, kept where it is, or a number) under ``key``;
        ``factor`` multiplies it on the host when it is read (in double precision, as
        ``value.item() * factor`` would)."""
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise ValueError(f"UpdateStats.add({key!r}): a statistic is one number, got a tensor of shape "
                                 f"{tuple(value.shape)}")
            value = value.detach()
        else:
            value = float(value)
        self._values.setdefault(key, []).append((value, factor))

    def update(self, values: Mapping[str, torch.Tensor | Number]) -> None:
        """:meth:`add` each ``key: value`` of ``values``."""
        for key, value in values.items():
            self.add(key, value)

    def __contains__(self, key: str) -> bool:
        return bool(self._values.get(key))

    def means(self) -> dict[str, float]:
        """Each key's mean (keys without values are left out), with one device-to-host transfer
        per device that holds values."""
        tensors = [v for values in self._values.values() for v, _ in values if isinstance(v, torch.Tensor)]
        read = iter(read_scalars(tensors))
        out: dict[str, float] = {}
        for key, values in self._values.items():
            if not values:
                continue
            numbers = [next(read) if isinstance(v, torch.Tensor) else v for v, _ in values]
            numbers = [x if f == 1 else x * f for x, (_, f) in zip(numbers, values)]
            out[key] = sum(numbers) / len(numbers)
        return out
