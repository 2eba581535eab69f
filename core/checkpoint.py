"""Checkpoints: the trained weights (safetensors), optimizer, update state and loop position.

A checkpoint is a folder ``checkpoints/iter_NNNNNN/``:

* ``trainable.safetensors``: the policy's trainable tensors (LoRA or full);
* ``optimizer.pt``: the optimizer and learning-rate scheduler states;
* ``update.pt``: the update algorithm's state (statistics trackers, adaptive coefficients);
* ``rewards.pt``: the state of learned rewards (discriminators, score networks), by reward name;
* ``rng.pt``: the global random states (torch, CUDA, Python, NumPy) of the main process;
* ``trainer.json``: the number of completed iterations and the seed.

``.pt`` files are read with ``torch.load(weights_only=True)``. All randomness of the loop's own
phases is derived from (seed, iteration, process), so these files are all a resumed run needs to
continue exactly as the uninterrupted run would have; the global random states are restored too,
for plugins that draw from them.
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
    states: dict[str, Any],
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
    for name, state in states.items():
        torch.save(state, tmp / f"{name}.pt")
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
    out: dict[str, Any] = {
        "trainable": load_file(str(path / "trainable.safetensors")),
        "trainer": json.loads((path / "trainer.json").read_text()),
    }
    for f in sorted(path.glob("*.pt")):
        out[f.stem] = torch.load(f, weights_only=True, map_location="cpu")
    return out


def rng_state() -> dict[str, Any]:
    """The global random states, in a form ``torch.load(weights_only=True)`` accepts."""
    import random

    import numpy as np

    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype("int64")), pos, has_gauss, cached),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype("uint32"), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
