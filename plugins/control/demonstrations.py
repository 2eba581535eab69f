"""Demonstrations: the ``.npz`` format and its validation (the command that makes them: :mod:`.demos`).

Format (one ``numpy.savez`` file, read with ``numpy.load(allow_pickle=False)``; ``N`` steps in
all, ``E`` episodes stored one after the other, ``D`` observation size, ``A`` action size):

* ``observations`` ``[N, D]`` float (required): the state before each action;
* ``actions`` ``[N, A]`` float (required): the action taken, in environment units;
* ``episode_lengths`` ``[E]`` integer (required): steps of each episode, each >= 1, summing to ``N``;
* ``next_observations`` ``[N, D]`` float: the state after each action;
* ``rewards`` ``[N]`` float: the environment reward of each step;
* ``terminations`` ``[N]`` bool: True where the episode terminated (not a time-limit cut);
* ``returns`` ``[E]`` float: the undiscounted return of each episode;
* ``env_id`` ``[]`` str: the gymnasium environment id (checked against the policy's when present).

Make demonstrations with ``python -m polyrl.plugins.control.demos`` (:mod:`.demos`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from polyrl.types import ConfigError

REQUIRED = ("observations", "actions", "episode_lengths")
OPTIONAL = ("next_observations", "rewards", "terminations", "returns", "env_id")


@dataclass
class Demos:
    """Validated demonstrations as float32 tensors (steps of all episodes concatenated)."""

    observations: torch.Tensor
    actions: torch.Tensor
    episode_lengths: torch.Tensor
    returns: torch.Tensor | None
    env_id: str | None
    path: str

    @property
    def num_episodes(self) -> int:
        return int(self.episode_lengths.numel())

    def features(self, kind: str) -> torch.Tensor:
        """``[N, D]`` states or ``[N, D + A]`` state-action pairs (``kind``: ``states`` or ``states_actions``)."""
        return self.observations if kind == "states" else torch.cat([self.observations, self.actions], dim=1)


def _fail(path: str, msg: str) -> ConfigError:
    return ConfigError(f"demonstrations {path!r}: {msg} (the format is described in docs/imitation.md)")


def _describe(x: np.ndarray) -> str:
    return f"{x.dtype} {list(x.shape)}"


MAX_BYTES = 1 << 30
"""Most bytes the arrays of one demonstrations file may hold once read (a small compressed file can
declare huge arrays)."""


def _check_headers(p: Path, path: str) -> None:
    """Reject unknown keys, object arrays and oversized arrays from the ``.npy`` headers alone."""
    import zipfile

    try:
        with zipfile.ZipFile(p) as zf:
            members = [m for m in zf.infolist() if m.filename.endswith(".npy")]
            names = [m.filename[:-4] for m in members]
            unknown = sorted(set(names) - set(REQUIRED) - set(OPTIONAL))
            if unknown:
                raise _fail(path, f"unknown keys {[u[:40] for u in unknown[:10]]}; accepted: {list(REQUIRED + OPTIONAL)}")
            total = 0
            for m in members:
                with zf.open(m) as f:
                    version = np.lib.format.read_magic(f)
                    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                    shape, _, dtype = read(f, max_header_size=10_000)  # the header only
                if dtype.hasobject:
                    raise _fail(path, f"{m.filename[:-4]!r} is an object array and cannot be read without pickle; "
                                      "save plain numeric arrays with numpy.savez")
                total += int(np.prod(shape, dtype=np.float64)) * dtype.itemsize
                if total > MAX_BYTES:
                    raise _fail(path, f"its arrays would take {total / 2**30:.1f} GiB once read; at most "
                                      f"{MAX_BYTES / 2**30:.0f} GiB are accepted")
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - not a zip, a broken header
        raise _fail(path, f"is not a readable .npz file ({type(e).__name__}: {str(e)[:120]})") from None


def load_demos(path: str, episodes: int = 0, env_id: str | None = None, obs_dim: int | None = None,
               action_dim: int | None = None) -> Demos:
    """Read and validate a demonstrations file; keep its first ``episodes`` episodes (0: all).

    ``env_id``, ``obs_dim`` and ``action_dim``, when given, must match the file. Every problem is
    reported as a :class:`ConfigError` naming the key, what was found and what is expected."""
    from polyrl.paths import resolve_path

    p = Path(resolve_path(path))
    if not p.is_file():
        raise ConfigError(
            f"demonstrations {path!r}: no such file; make them with `python -m polyrl.plugins.control.demos "
            f"expert EXPERT_CONFIG --out {path}` (EXPERT_CONFIG: for example configs/sac_pendulum.yaml or "
            f"configs/sac_halfcheetah.yaml), or see docs/imitation.md"
        )
    _check_headers(p, path)  # names, dtypes and sizes from the headers, before any array is read
    try:
        with np.load(p, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except ValueError as e:
        raise _fail(path, f"cannot be read without pickle ({e}); save plain numeric arrays with numpy.savez") from None
    except Exception as e:  # noqa: BLE001 - not a zip / not an npz
        raise _fail(path, f"is not a readable .npz file ({type(e).__name__}: {e})") from None
    missing = [k for k in REQUIRED if k not in arrays]
    if missing:
        raise _fail(path, f"missing keys {missing}; found {sorted(arrays)}; required: {list(REQUIRED)}")
    unknown = sorted(set(arrays) - set(REQUIRED) - set(OPTIONAL))
    if unknown:
        raise _fail(path, f"unknown keys {unknown}; accepted: {list(REQUIRED + OPTIONAL)}")

    obs, act, lengths = arrays["observations"], arrays["actions"], arrays["episode_lengths"]
    if obs.ndim != 2 or not np.issubdtype(obs.dtype, np.floating):
        raise _fail(path, f"'observations' must be a float array [N, D], got {_describe(obs)}")
    n = obs.shape[0]
    if act.ndim != 2 or not np.issubdtype(act.dtype, np.floating) or act.shape[0] != n:
        raise _fail(path, f"'actions' must be a float array [N={n}, A], got {_describe(act)}")
    if lengths.ndim != 1 or not np.issubdtype(lengths.dtype, np.integer):
        raise _fail(path, f"'episode_lengths' must be an integer array [E], got {_describe(lengths)}")
    if lengths.size == 0 or (lengths < 1).any() or int(lengths.sum()) != n:
        raise _fail(path, f"'episode_lengths' must be positive and sum to N={n} (the number of steps); "
                          f"got sum {int(lengths.sum())}, min {int(lengths.min()) if lengths.size else None}")
    if "next_observations" in arrays:
        nxt = arrays["next_observations"]
        if nxt.shape != obs.shape or not np.issubdtype(nxt.dtype, np.floating):
            raise _fail(path, f"'next_observations' must be a float array {list(obs.shape)} like 'observations', got {_describe(nxt)}")
    for key, dtype_ok, name in (("rewards", np.floating, "float"), ("terminations", np.bool_, "bool")):
        if key in arrays:
            v = arrays[key]
            if v.shape != (n,) or not np.issubdtype(v.dtype, dtype_ok):
                raise _fail(path, f"'{key}' must be a {name} array [N={n}], got {_describe(v)}")
    returns = arrays.get("returns")
    if returns is not None and (returns.shape != lengths.shape or not np.issubdtype(returns.dtype, np.floating)):
        raise _fail(path, f"'returns' must be a float array [E={lengths.size}], got {_describe(returns)}")
    if returns is None and "rewards" in arrays:
        returns = np.add.reduceat(arrays["rewards"].astype(np.float64), np.r_[0, np.cumsum(lengths)[:-1]])
    file_env = None
    if "env_id" in arrays:
        e = arrays["env_id"]
        if e.ndim != 0 or e.dtype.kind != "U":
            raise _fail(path, f"'env_id' must be a string scalar, got {_describe(e)}")
        file_env = str(e)
    if env_id is not None and file_env is not None and file_env != env_id:
        raise _fail(path, f"recorded on {file_env!r} but the policy acts in {env_id!r}")
    if obs_dim is not None and obs.shape[1] != obs_dim:
        raise _fail(path, f"'observations' have {obs.shape[1]} features but {env_id or 'the environment'} has {obs_dim}")
    if action_dim is not None and act.shape[1] != action_dim:
        raise _fail(path, f"'actions' have {act.shape[1]} dimensions but {env_id or 'the environment'} has {action_dim}")
    for key in ("observations", "actions"):
        if not np.isfinite(arrays[key]).all():
            raise _fail(path, f"'{key}' holds NaN or infinite values")

    if episodes < 0:
        raise ConfigError(f"demo_episodes must be >= 0 (0: all), got {episodes}")
    if episodes:
        if episodes > lengths.size:
            raise _fail(path, f"{episodes} episodes requested but the file holds {lengths.size}")
        keep = int(lengths[:episodes].sum())
        obs, act, lengths = obs[:keep], act[:keep], lengths[:episodes]
        returns = None if returns is None else returns[:episodes]
    f32 = lambda x: torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))  # noqa: E731
    return Demos(
        observations=f32(obs),
        actions=f32(act),
        episode_lengths=torch.from_numpy(lengths.astype(np.int64)),
        returns=None if returns is None else torch.from_numpy(np.asarray(returns, dtype=np.float64)),
        env_id=file_env,
        path=str(path),
    )


def save_demos(path: str | Path, episodes: list[dict[str, np.ndarray]], env_id: str) -> Path:
    """Write episodes (each a dict with ``observations``, ``actions``, ``next_observations``,
    ``rewards``, ``terminations``) in the format above."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    cat = lambda k, dt: np.concatenate([e[k] for e in episodes]).astype(dt)  # noqa: E731
    np.savez(
        out,
        observations=cat("observations", np.float32),
        actions=cat("actions", np.float32),
        next_observations=cat("next_observations", np.float32),
        rewards=cat("rewards", np.float32),
        terminations=cat("terminations", np.bool_),
        episode_lengths=np.array([len(e["rewards"]) for e in episodes], dtype=np.int64),
        returns=np.array([float(np.sum(e["rewards"], dtype=np.float64)) for e in episodes], dtype=np.float64),
        env_id=np.array(env_id),
    )
    return out


