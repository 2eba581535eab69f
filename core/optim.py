"""The optimizer a run trains with, and the process-wide numeric settings it asks for.

:func:`build_optimizer` makes the AdamW that ``optimizer.implementation`` names:

========== ======================================================= ==============================
``torch``  ``torch.optim.AdamW`` (for-each kernels)                 two float32 moments per weight
``fused``  ``torch.optim.AdamW(fused=True)``: one kernel per step   the same memory, fewer launches
``8bit``   ``bitsandbytes.optim.AdamW8bit`` (block-wise 8-bit       moments in 1 byte instead of 4
           moments; ``pip install polyrl[bnb]``)                    (6 bytes per weight saved)
========== ======================================================= ==============================

All three compute AdamW with decoupled weight decay; ``fused`` gives the same update as ``torch``
up to float rounding, ``8bit`` quantises the moments (a small, documented change of what is
computed, as in bitsandbytes' paper: Dettmers et al. 2022, "8-bit Optimizers via Block-wise
Quantization"). Tensors smaller than 4096 elements keep float32 moments in ``8bit``, as bitsandbytes
does by default.
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING, Iterable

import torch

from .types import ConfigError

if TYPE_CHECKING:
    from .config import OptimizerConfig, RunSettings

__all__ = ["IMPLEMENTATIONS", "apply_numeric_settings", "build_optimizer", "check_implementation"]

IMPLEMENTATIONS = ("torch", "fused", "8bit")


def check_implementation(name: str) -> None:
    """Reject an unknown implementation, or ``8bit`` without bitsandbytes, before any model loads."""
    if name not in IMPLEMENTATIONS:
        raise ConfigError(f"optimizer.implementation: {name!r} is not one of {list(IMPLEMENTATIONS)}")
    if name == "8bit" and importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(
            "optimizer.implementation: '8bit' needs the bitsandbytes package (pip install 'polyrl[bnb]'); "
            "or choose 'torch' or 'fused'"
        )


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: OptimizerConfig) -> torch.optim.Optimizer:
    """AdamW over ``params`` with ``cfg``'s learning rate, betas, epsilon and weight decay, in the
    implementation ``cfg.implementation`` names."""
    params = list(params)
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decay=cfg.weight_decay)
    check_implementation(cfg.implementation)
    if cfg.implementation == "8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, **kwargs)
    if cfg.implementation == "fused":
        return torch.optim.AdamW(params, fused=True, **kwargs)
    return torch.optim.AdamW(params, **kwargs)


def apply_numeric_settings(run: RunSettings) -> list[str]:
    """Set the process-wide numeric switches the run asks for; returns a line per setting that
    has no effect on this machine (for the start message)."""
    notes = []
    if run.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        if not torch.cuda.is_available():
            notes.append("run.tf32: true has no effect without a CUDA device (TF32 is an NVIDIA Ampere+ matmul mode)")
    return notes
