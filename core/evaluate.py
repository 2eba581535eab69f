"""``polyrl eval``: score a trained run's policy on fixed prompts and seeds, next to its base model.

The run's own config (``RUN_DIR/config.yaml``) rebuilds the policy, sampler and rewards; the
latest checkpoint's trainable weights are loaded; samples are drawn with generators that depend only
on ``seed``, so the base model (``baseline=True``) and the trained one see the same noise.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .checkpoint import checkpoint_path, latest_checkpoint, load_checkpoint
from .config import load_yaml
from .host import Host
from .prompts import PromptSource
from .types import ConfigError, Context, Rollout


def _score(policy, sampler, rewards, contexts: list[Context], seed: int, batch: int) -> tuple[dict[str, list[float]], list[Rollout]]:
    scores: dict[str, list[float]] = {name: [] for name, _, _ in rewards}
    rollouts = []
    policy.eval()
    with torch.no_grad():
        for k in range(0, len(contexts), batch):
            g = torch.Generator().manual_seed(seed * 1_000_003 + k)
            rollout = sampler.sample(policy, contexts[k : k + batch], g)
            for name, _, fn in rewards:
                value = torch.as_tensor(fn(rollout), dtype=torch.float32).cpu()
                scores[name].extend((value.sum(1) if value.dim() == 2 else value).tolist())
            rollouts.append(rollout)
    return scores, rollouts


def _summary(scores: dict[str, list[float]], weights: dict[str, float]) -> dict[str, float]:
    out: dict[str, float] = {}
    n = len(next(iter(scores.values())))
    total = [sum(weights[k] * scores[k][i] for k in scores) for i in range(n)]
    out["reward_mean"] = sum(total) / n
    for k, v in scores.items():
        t = torch.tensor(v)
        out[f"reward/{k}"] = t.mean().item()
        out[f"reward/{k}_std"] = t.std(unbiased=False).item()
    return out


def evaluate(run_dir: str | Path, samples: int = 32, seed: int = 0, iteration: int | None = None,
             baseline: bool = True, batch: int = 16, plugins: tuple[str, ...] = ()) -> dict[str, Any]:
    """Evaluate a run directory; writes ``RUN_DIR/eval/`` and returns the summary."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"{str(run_dir)!r} is not a polyrl run directory (no config.yaml)")
    ckpt = checkpoint_path(run_dir, iteration) if iteration is not None else latest_checkpoint(run_dir)
    if ckpt is None or not (ckpt / "trainer.json").is_file():
        raise ConfigError(f"{str(run_dir)!r}: no checkpoint {'for iteration ' + str(iteration) if iteration else ''}")
    if samples < 1 or batch < 1:
        raise ConfigError(f"--samples and --batch must be >= 1, got {samples} and {batch}")
    host = Host(plugins=plugins)
    cfg = host.build_config(load_yaml(run_dir / "config.yaml"))
    prompts = PromptSource(cfg.prompts, seed).rows
    contexts = [Context(prompt=prompts[i % len(prompts)][0], group=i, extra=dict(prompts[i % len(prompts)][1]))
                for i in range(samples)]
    device = "cuda" if torch.cuda.is_available() and not cfg.run.cpu else "cpu"
    policy = host.build_policy(cfg).to(device)
    sampler = host.build_sampler(cfg, policy)
    rewards = host.build_rewards(cfg, policy)
    weights = {name: w for name, w, _ in rewards}
    result: dict[str, Any] = {"run_dir": str(run_dir), "samples": samples, "seed": seed}
    out = run_dir / "eval"
    out.mkdir(exist_ok=True)
    stages = []
    if baseline:
        stages.append("base")
    stages.append("trained")
    for stage in stages:
        if stage == "trained":
            state = load_checkpoint(ckpt)
            policy.load_trainable_state_dict(state["trainable"])
            result["iteration"] = state["trainer"]["iteration"]
        scores, rollouts = _score(policy, sampler, rewards, contexts, seed, batch)
        result[stage] = _summary(scores, weights)
        _save_samples(out / stage, contexts, rollouts, scores)
    (out / "summary.json").write_text(json.dumps(result, indent=2))
    return result


def _save_samples(out: Path, contexts: list[Context], rollouts: list[Rollout], scores: dict[str, list[float]]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if all("images" in r.outputs for r in rollouts):
        from torchvision.utils import save_image

        images = torch.cat([r.outputs["images"].float().cpu() for r in rollouts])
        save_image(images, out / "samples.png", nrow=8, padding=2)
    texts = [t for r in rollouts for t in r.outputs.get("texts", [])]
    with (out / "samples.jsonl").open("w") as f:
        for i, c in enumerate(contexts):
            row: dict[str, Any] = {"prompt": c.prompt, **{k: v[i] for k, v in scores.items()}}
            if texts:
                row["text"] = texts[i]
            f.write(json.dumps(row) + "\n")
