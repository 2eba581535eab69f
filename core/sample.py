"""``polyrl sample``: draw samples from a trained run's policy, for prompts you give.

The run's own config (``RUN_DIR/config.yaml``) rebuilds the policy and the sampler (no reward is
built: nothing is scored, and no reward model is loaded); a checkpoint's trainable weights are
loaded (the latest, or ``iteration``), or none with ``base=True`` to sample the model the run
started from. Every prompt gets ``samples_per_prompt`` samples; batch ``k`` of the samples draws
its noise from a generator seeded with ``seed * 1_000_003 + k``, as ``polyrl eval`` does, so the
same command (the same ``batch`` too) gives the same samples, and the trained and the base policy
see the same noise.

It writes ``OUT/samples.jsonl`` (one row per sample: ``prompt``, ``sample``, ``seed``, and the
sample's ``text`` and/or ``image`` file), each image as ``OUT/NNNN.png`` and all of them with
their prompts in ``OUT/grid.png``. ``OUT`` defaults to ``RUN_DIR/samples/iter_NNNNNN-seedS``
(``base-seedS`` for the base policy); a folder that already holds samples is never overwritten.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch

from . import atomic
from .checkpoint import checkpoint_path, latest_checkpoint, load_checkpoint
from .config import load_yaml
from .host import Host
from .scoring import evaluating
from .types import ConfigError, Context, Rollout

__all__ = ["sample_run"]


def _contexts(cfg: Any, prompts: Sequence[str] | None, prompts_file: str | None, n: int, seed: int) -> list[Context]:
    """``n`` contexts per prompt, the prompts' rows in order (the run's own when none are given)."""
    from .evaluate import _prompt_rows

    if prompts:
        rows = [(p, {}) for p in prompts]
    else:
        rows = _prompt_rows(cfg, prompts_file, seed)
    return [Context(prompt=p, group=i, extra=dict(extra)) for i, (p, extra) in enumerate(rows) for _ in range(n)]


def sample_run(run_dir: str | Path, prompts: Sequence[str] | None = None, prompts_file: str | None = None,
               samples_per_prompt: int = 4, seed: int = 0, iteration: int | None = None, base: bool = False,
               batch: int = 16, out: str | Path | None = None, plugins: tuple[str, ...] = ()) -> Path:
    """Sample a run's policy (see the module docstring); returns the folder written."""
    from tqdm.auto import tqdm

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"{str(run_dir)!r} is not a polyrl run directory (no config.yaml)")
    if samples_per_prompt < 1 or batch < 1:
        raise ConfigError(f"--samples-per-prompt and --batch must be >= 1, got {samples_per_prompt} and {batch}")
    if prompts and prompts_file:
        raise ConfigError("give prompts on the command line or --prompts FILE, not both")
    if prompts is not None and any(not p.strip() for p in prompts):
        raise ConfigError(f"empty prompt in {list(prompts)!r}")
    if not 0 <= seed < 2**40:
        raise ConfigError(f"--seed={seed} is out of range; accepted: 0 to 2**40 - 1")
    ckpt = None
    if not base:
        ckpt = checkpoint_path(run_dir, iteration) if iteration is not None else latest_checkpoint(run_dir)
        if ckpt is None or not (ckpt / "trainer.json").is_file():
            which = f"for iteration {iteration}" if iteration is not None else "at all"
            raise ConfigError(f"{str(run_dir)!r}: no checkpoint {which} (--base samples the model the run started from)")
    if out is None:
        tag = "base" if base else f"iter_{json.loads((ckpt / 'trainer.json').read_text())['iteration']:06d}"
        out = run_dir / "samples" / f"{tag}-seed{seed}"
    out = Path(out)
    if (out / "samples.jsonl").exists():
        raise ConfigError(f"{str(out)!r} already holds samples; give another --out (nothing was overwritten)")

    host = Host(plugins=plugins)
    data = load_yaml(run_dir / "config.yaml")
    if isinstance(data.get("run"), dict):
        data["run"]["log_with"] = []
    cfg = host.build_config(data)
    contexts = _contexts(cfg, prompts, prompts_file, samples_per_prompt, seed)
    device = "cuda" if torch.cuda.is_available() and not cfg.run.cpu else "cpu"
    policy = host.build_policy(cfg).to(device)
    sampler = host.build_sampler(cfg, policy)
    if ckpt is not None:
        policy.load_trainable_state_dict(load_checkpoint(ckpt)["trainable"])
    rollouts: list[Rollout] = []
    # eval mode, and no training-only sampling behaviour (lilGym's stop forcing)
    with evaluating(policy, sampler), torch.no_grad():
        for k in tqdm(range(0, len(contexts), batch), desc="polyrl sample", unit="batch", disable=None):
            g = torch.Generator().manual_seed(seed * 1_000_003 + k)
            rollouts.append(sampler.sample(policy, contexts[k : k + batch], g))
    _write(out, contexts, rollouts, seed)
    return out


def _write(out: Path, contexts: list[Context], rollouts: list[Rollout], seed: int) -> None:
    from .evaluate import _images, _texts
    from .report import _png, _to_pil, captioned_grid

    out.mkdir(parents=True, exist_ok=True)
    images, texts = _images(rollouts), _texts(rollouts)
    captions = [c for r in rollouts for c in r.outputs.get("captions", [])]
    rows = []
    for i, c in enumerate(contexts):
        row: dict[str, Any] = {"prompt": c.prompt, "sample": i, "seed": seed}
        if texts:
            row["text"] = texts[i]
        if images is not None:
            row["image"] = f"{i:04d}.png"
            atomic.write_bytes(out / row["image"], _png(_to_pil(images[i : i + 1])[0]))
        rows.append(json.dumps(row) + "\n")
    if images is not None:
        heads = captions if len(captions) == len(contexts) else [c.prompt for c in contexts]
        atomic.write_bytes(out / "grid.png", _png(captioned_grid(images, heads, [[f"#{i}"] for i in range(len(contexts))])))
    atomic.write_text(out / "samples.jsonl", "".join(rows))  # last: its presence means the folder is complete
