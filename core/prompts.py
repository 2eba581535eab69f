"""Prompt sources: the contexts each iteration generates for."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .config import PromptsConfig
from .paths import resolve_path
from .types import ConfigError, Context


def load_prompts(cfg: PromptsConfig) -> list[tuple[str, dict]]:
    """``(prompt, extra columns)`` pairs from inline items, a text file or a JSONL file."""
    if cfg.items is not None:
        return [(p, {}) for p in cfg.items]
    path = Path(resolve_path(cfg.file))  # type: ignore[arg-type]
    rows: list[tuple[str, dict]] = []
    if path.suffix == ".jsonl":
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"prompts.file {str(path)!r} line {n}: not JSON ({e})") from None
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                raise ConfigError(f"prompts.file {str(path)!r} line {n}: needs a string 'prompt' column")
            prompt = row.pop("prompt")
            rows.append((prompt, row))
    else:
        rows = [(line, {}) for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        raise ConfigError(f"prompts.file {str(path)!r} holds no prompts")
    return rows


class PromptSource:
    """Draws ``P`` prompts per process per iteration, each repeated ``G`` times.

    The order is a seeded permutation per epoch over the prompt list, and process ``r`` of ``N``
    takes the ``r``-th slice, so the draw for an iteration depends only on (seed, iteration):
    a resumed run draws exactly what the uninterrupted run would have.
    """

    def __init__(self, cfg: PromptsConfig, seed: int) -> None:
        self.rows = load_prompts(cfg)
        self.shuffle = cfg.shuffle
        self.seed = seed

    def _order(self, epoch: int) -> list[int]:
        n = len(self.rows)
        if not self.shuffle:
            return list(range(n))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(n, generator=g).tolist()

    def contexts(self, iteration: int, rank: int, world: int, per_process: int, group: int) -> list[Context]:
        """Contexts for ``iteration`` (1-based) on process ``rank``: ``per_process * group`` of them."""
        n = len(self.rows)
        start = ((iteration - 1) * world + rank) * per_process
        out: list[Context] = []
        for j in range(per_process):
            k = start + j
            idx = self._order(k // n)[k % n]
            prompt, extra = self.rows[idx]
            gid = rank * per_process + j
            out.extend(Context(prompt=prompt, group=gid, extra=dict(extra)) for _ in range(group))
        return out
