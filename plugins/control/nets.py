"""Small building blocks shared by the control components: MLPs, seeded construction, and the
gradient averaging that keeps networks owned by a component (critics, score networks,
discriminators) identical on every process."""

from __future__ import annotations

import contextlib
import math
from typing import Iterable, Iterator, Sequence

import torch
from torch import nn

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "elu": nn.ELU, "leaky_relu": nn.LeakyReLU, "silu": nn.SiLU}


def mlp(in_dim: int, hidden: Sequence[int], out_dim: int, activation: str = "relu") -> nn.Sequential:
    """``Linear -> act`` for each hidden size, then a final ``Linear`` to ``out_dim``."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation {activation!r} is not supported; choose one of {sorted(ACTIVATIONS)}")
    layers: list[nn.Module] = []
    d = in_dim
    for h in hidden:
        layers += [nn.Linear(d, h), ACTIVATIONS[activation]()]
        d = h
    layers.append(nn.Linear(d, out_dim))
    return nn.Sequential(*layers)


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block (typically network construction) with the global torch RNG seeded to ``seed``,
    restoring the previous RNG state afterwards. Networks built inside are identical on every
    process that uses the same seed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed % (2**63))
        yield


def average_gradients(accelerator, params: Iterable[nn.Parameter]) -> None:
    """All-reduce (mean) the gradients of ``params`` over processes; a no-op on one process.

    Components that own networks outside the policy (and so outside DDP) call this between
    ``backward`` and their optimizer step, so that every process applies the same update."""
    if accelerator is None or accelerator.num_processes == 1:
        return
    for p in params:
        if p.grad is not None:
            p.grad = accelerator.reduce(p.grad.contiguous(), reduction="mean")


class SinusoidalEmbedding(nn.Module):
    """The transformer/DDPM sinusoidal embedding of a scalar (a diffusion timestep) into ``dim``
    features: ``[sin(t w_0), ..., sin(t w_{h-1}), cos(t w_0), ...]`` with
    ``w_i = 10000^(-i / (h - 1))`` and ``h = dim / 2``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        if dim < 4 or dim % 2:
            raise ValueError(f"sinusoidal embedding size must be even and >= 4, got {dim}")
        half = dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / (half - 1))
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        x = t.float().unsqueeze(-1) * self.freqs
        return torch.cat([x.sin(), x.cos()], dim=-1)
