"""Checkpoints: the trained weights (safetensors), optimizer, update state and loop position.

A checkpoint is a folder ``checkpoints/iter_NNNNNN/``:

* ``trainable.safetensors``: the policy's trainable tensors (LoRA or full);
* ``optimizer.pt``: the optimizer state, loaded with ``torch.load(weights_only=True)``;
* ``update.pt``: the update algorithm's state (statistics trackers, adaptive coefficients);
* ``trainer.json``: the number of completed iterations and the seed.

All randomness of an iteration is derived from (seed, iteration, process), so these files are all
a resumed run needs to continue exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

CHECKPOINT_DIR = "checkpoints"


def checkpoint_path(run_dir: str | Path, iteration: int) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / f"iter_{iteration:06d}"


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return None
    done = [p for p in root.iterdir() if p.name.startswith("iter_") and (p / "trainer.json").is_file()]
    return max(done, key=lambda p: int(p.name[5:]), default=None)


def save_checkpoint(
    run_dir: str | Path,
    iteration: int,
    trainable: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    update_state: dict[str, Any],
    extra: dict[str, Any],
    keep: int | None = None,
) -> Path:
    """Write a checkpoint atomically (to a temporary folder, then renamed) and prune old ones."""
    final = checkpoint_path(run_dir, iteration)
    tmp = final.with_name(final.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in trainable.items()}, str(tmp / "trainable.safetensors"))
    torch.save(optimizer_state, tmp / "optimizer.pt")
    torch.save(update_state, tmp / "update.pt")
    (tmp / "trainer.json").write_text(json.dumps({"iteration": iteration, **extra}, indent=2))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    if keep is not None:
        root = final.parent
        older = sorted(
            (p for p in root.iterdir() if p.name.startswith("iter_") and not p.name.endswith(".tmp")),
            key=lambda p: int(p.name[5:]),
        )
        for p in older[:-keep]:
            shutil.rmtree(p)
    return final


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    return {
        "trainable": load_file(str(path / "trainable.safetensors")),
        "optimizer": torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu"),
        "update": torch.load(path / "update.pt", weights_only=True, map_location="cpu"),
        "trainer": json.loads((path / "trainer.json").read_text()),
    }
