"""Checkpoints: the trained weights (safetensors), optimizer, update state and loop position.

A checkpoint is a folder ``checkpoints/iter_NNNNNN/``:

* ``trainable.safetensors``: the policy's trainable tensors (LoRA or full);
* ``optimizer.pt``: the optimizer and learning-rate scheduler states;
* ``update.pt``: the update algorithm's state (statistics trackers, adaptive coefficients);
* ``rewards.pt``: the state of learned rewards (discriminators, score networks), by reward name;
* ``rng.pt``: the global random states (torch, CUDA, Python, NumPy) of the main process;
* ``config.yaml``: the run configuration that produced it (a resumed run is checked against it);
* ``trainer.json``: the number of completed iterations, the seed, and the list of the files above
  with their sizes (the manifest). It is written last.

A checkpoint is written into ``iter_NNNNNN.tmp``, every file flushed to disk, and only then renamed:
a folder named ``iter_NNNNNN`` (six or more digits, nothing else) is complete by construction, and
:func:`latest_checkpoint` considers nothing else, so a crash mid-write leaves the previous checkpoint
as the newest. No checkpoint is written from non-finite weights.

``.pt`` files are read with ``torch.load(weights_only=True)``, and only the files the manifest
lists are read. All randomness of the loop's own phases is derived from (seed, iteration, process),
so these files are all a resumed run needs to continue exactly as the uninterrupted run would have.

Sharded training (FSDP2) writes the same files in the same layout: the trainable weights and the
optimizer's moments are gathered into full tensors (:func:`full_optimizer_state`; a collective that
every process joins) and the main process writes them; on resume every process reads the full
files and keeps its own shard (:func:`shard_optimizer_state`, no communication).
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .atomic import disk_full, free_bytes, fsync_dir, is_disk_full
from .errors import CheckpointError, NonFiniteError

CHECKPOINT_DIR = "checkpoints"
FORMAT = 2
STATE_FILES = ("optimizer", "update", "rewards", "rng")
_NAME = re.compile(r"^iter_(\d{6,})$")


def checkpoint_path(run_dir: str | Path, iteration: int) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / f"iter_{iteration:06d}"


def checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first: ``(iteration, folder)``."""
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_dir() and (p / "trainer.json").is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint (``iter_*.tmp`` leftovers of a crash are ignored)."""
    found = checkpoints(run_dir)
    return found[-1][1] if found else None


def leftover_tmp(run_dir: str | Path) -> list[Path]:
    root = Path(run_dir) / CHECKPOINT_DIR
    return sorted(root.glob("iter_*.tmp")) if root.is_dir() else []


def non_finite(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors holding NaN or infinity."""
    return [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def save_checkpoint(
    run_dir: str | Path,
    iteration: int,
    trainable: dict[str, torch.Tensor],
    states: dict[str, Any],
    extra: dict[str, Any],
    keep: int | None = None,
    config_text: str | None = None,
) -> Path:
    """Write a checkpoint atomically (to a temporary folder, then renamed) and prune old ones.

    Raises :class:`NonFiniteError` (nothing written) if a trainable tensor holds NaN or infinity, and
    :class:`polyrl.atomic.DiskFullError` (the temporary folder removed, earlier checkpoints intact)
    when the disk fills up.
    """
    bad = non_finite(trainable)
    if bad:
        raise NonFiniteError(
            f"refusing to write the checkpoint of iteration {iteration}: {len(bad)} trainable tensor(s) hold NaN or "
            f"infinity (first: {bad[0]!r})"
        )
    final = checkpoint_path(run_dir, iteration)
    tmp = final.with_name(final.name + ".tmp")
    # the weights, and AdamW's two moments of the same size in optimizer.pt
    needed = 3 * sum(v.numel() * v.element_size() for v in trainable.values())
    free = free_bytes(final.parent)
    if free is not None and needed > free:
        raise disk_full(final, needed, OSError(28, "No space left on device"))
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in trainable.items()}, str(tmp / "trainable.safetensors"))
        for name, state in states.items():
            torch.save(state, tmp / f"{name}.pt")
        if config_text is not None:
            (tmp / "config.yaml").write_text(config_text, encoding="utf-8")
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
        for p in tmp.iterdir():
            _fsync(p)
        (tmp / "trainer.json").write_text(
            json.dumps({"iteration": iteration, "format": FORMAT, **extra, "files": files}, indent=2)
        )
        _fsync(tmp / "trainer.json")
        fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(final.parent)
    except (OSError, RuntimeError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        # torch.save reports a failed write as a RuntimeError ("iostream error"): a full disk when
        # the free space is gone
        left = free_bytes(final.parent)
        if is_disk_full(e) or (isinstance(e, RuntimeError) and left is not None and left < needed):
            raise disk_full(final, needed, OSError(28, "No space left on device")) from None
        raise
    if keep is not None:
        for _, p in checkpoints(run_dir)[:-keep]:
            shutil.rmtree(p, ignore_errors=True)
    for p in leftover_tmp(run_dir):  # a crashed earlier write
        shutil.rmtree(p, ignore_errors=True)
    return final


def read_trainer_json(path: str | Path) -> dict[str, Any]:
    """The validated ``trainer.json`` of a checkpoint folder."""
    path = Path(path)
    m = _NAME.match(path.name)
    try:
        meta = json.loads((path / "trainer.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {str(path)!r}: trainer.json cannot be read ({type(e).__name__})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"checkpoint {str(path)!r}: trainer.json is not an object")
    it = meta.get("iteration")
    if isinstance(it, bool) or not isinstance(it, int) or it < 1 or (m and it != int(m.group(1))):
        raise CheckpointError(
            f"checkpoint {str(path)!r}: trainer.json says iteration {str(it)[:40]!r}, but the folder is "
            f"{path.name!r}; the checkpoint was edited or is damaged"
        )
    files = meta.get("files")
    if files is not None and (
        not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, int) for k, v in files.items())
    ):
        raise CheckpointError(f"checkpoint {str(path)!r}: trainer.json has a malformed file list")
    return meta


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint: only the files its manifest lists, each size-checked, ``.pt`` files with
    ``weights_only=True``. Raises :class:`CheckpointError` (one line) for anything off."""
    path = Path(path)
    meta = read_trainer_json(path)
    files = meta.get("files")
    if files is None:  # checkpoints written before the manifest existed: the known names only
        files = {p.name: p.stat().st_size for p in path.iterdir() if p.name != "trainer.json"}
    allowed = {"trainable.safetensors", "config.yaml", *(f"{n}.pt" for n in STATE_FILES)}
    for name, size in files.items():
        if name not in allowed and not (meta.get("files") is None):
            raise CheckpointError(f"checkpoint {str(path)!r}: unexpected file {name!r} in its manifest")
        f = path / name
        if name in allowed and (not f.is_file() or f.stat().st_size != size):
            raise CheckpointError(
                f"checkpoint {str(path)!r}: {name} is missing or has another size than when it was written"
            )
    if "trainable.safetensors" not in files:
        raise CheckpointError(f"checkpoint {str(path)!r}: no trainable.safetensors")
    try:
        out: dict[str, Any] = {"trainable": load_file(str(path / "trainable.safetensors")), "trainer": meta}
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise CheckpointError(f"checkpoint {str(path)!r}: trainable.safetensors cannot be read: {str(e)[:200]}") from None
    for name in STATE_FILES:
        if f"{name}.pt" not in files:
            continue
        try:
            out[name] = torch.load(path / f"{name}.pt", weights_only=True, map_location="cpu")
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
            first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
            raise CheckpointError(
                f"checkpoint {str(path)!r}: {name}.pt was refused (only plain tensors and containers are loaded, "
                f"never pickled code): {first}"
            ) from None
    if "config.yaml" in files:
        out["config_text"] = (path / "config.yaml").read_text(encoding="utf-8")
    return out


def _is_dtensor(value: Any) -> bool:
    return hasattr(value, "device_mesh") and hasattr(value, "placements")


def full_optimizer_state(optimizer: Any, keep: bool = True) -> dict[str, Any]:
    """A copy of ``optimizer.state_dict()`` in which every sharded (DTensor) state tensor is
    gathered into its full value on the CPU: the state dict the unsharded optimizer would have.
    With sharded parameters every process must call it together (one all-gather per tensor, in
    the state dict's order), and a process that passes ``keep=False`` drops each gathered tensor
    at once (it takes part, another process writes); without them it is a plain deep copy."""
    import copy

    state = optimizer.state_dict()
    if not any(_is_dtensor(v) for s in state["state"].values() for v in s.values()):
        return copy.deepcopy(state)
    per_param = {
        index: {k: _gathered(v, keep) if _is_dtensor(v) else copy.deepcopy(v) for k, v in s.items()}
        for index, s in state["state"].items()
    }
    return {"state": per_param, "param_groups": copy.deepcopy(state["param_groups"])}


def _gathered(value: Any, keep: bool) -> torch.Tensor | None:
    full = value.full_tensor()
    return full.detach().to("cpu", copy=True) if keep else None


def shard_optimizer_state(optimizer: Any, state: dict[str, Any]) -> dict[str, Any]:
    """``state`` (from :func:`full_optimizer_state` or an unsharded run) made loadable into an
    optimizer over sharded parameters: each full tensor of a DTensor parameter's state becomes a
    DTensor laid out as the parameter, each process keeping its own shard (no communication: every
    process holds the full state). For unsharded parameters it is returned as it is."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if not any(_is_dtensor(p) for p in params):
        return state
    from torch.distributed.tensor import distribute_tensor

    ids = [i for group in state["param_groups"] for i in group["params"]]
    if len(ids) != len(params):
        raise CheckpointError(
            f"the checkpoint's optimizer state covers {len(ids)} parameters, the optimizer has {len(params)}")
    by_id = dict(zip(ids, params))
    out: dict[Any, Any] = {}
    for index, entries in state["state"].items():
        p = by_id[index]
        out[index] = {
            k: distribute_tensor(v.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
            if _is_dtensor(p) and isinstance(v, torch.Tensor) and tuple(v.shape) == tuple(p.shape) else v
            for k, v in entries.items()
        }
    return {"state": out, "param_groups": state["param_groups"]}


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
