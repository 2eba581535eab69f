"""Errors that end a run with one line a person can act on (``polyrl: error: ...``).

:class:`polyrl.types.ConfigError` covers configurations; these cover what happens later.
"""

from __future__ import annotations

__all__ = ["PolyrlError", "CheckpointError", "NonFiniteError", "ResumeError", "RunStopped"]


class PolyrlError(RuntimeError):
    """Base of the run-time errors shown as one line without a traceback."""


class CheckpointError(PolyrlError):
    """A checkpoint that cannot be trusted: damaged, edited, or holding something other than tensors."""


class NonFiniteError(PolyrlError):
    """A loss, gradient norm or weight became NaN or infinite. The run stops at the last good checkpoint."""


class ResumeError(PolyrlError):
    """``--resume`` asked for a change that would break the run (another model, seed or batch shape)."""


class RunStopped(KeyboardInterrupt):
    """The run was asked to stop (SIGTERM, or Ctrl-C) and did, after saving a checkpoint.

    ``signum`` is the signal that asked; the command exits with ``128 + signum``.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum
