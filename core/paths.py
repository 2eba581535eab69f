"""Resolving the relative paths that configs use (``assets/tiny-gpt2``, prompt files)."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
"""The polyrl checkout (for an editable install), where ``assets/`` and ``configs/`` live."""


def resolve_path(name: str) -> str:
    """``name`` if it exists as given; else, for a relative path, the same path under the polyrl
    checkout if it exists there (so ``assets/tiny-sd`` works from any directory); else ``name``
    unchanged (for a model, a Hub id)."""
    p = Path(name).expanduser()
    if p.exists() or p.is_absolute():
        return str(p)
    q = REPO_ROOT / p
    return str(q) if q.exists() else name
