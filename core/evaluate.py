"""``polyrl eval``: score a trained run's policy on fixed prompts and seeds, next to its base model.

The run's own config (``RUN_DIR/config.yaml``) rebuilds the policy, sampler and rewards; the
latest checkpoint's trainable weights are loaded; samples are drawn with generators that depend only
on ``seed``, so the base model (``baseline=True``) and the trained one see the same noise.

Prompts are the run's own, or held-out ones (``prompts=``: a text file, one prompt per line, or a
JSONL file with the run's ``prompts.prompt_column``). Besides the rewards it reports:

* ``kl_to_base``: KL(trained ‖ base) of whole samples (token sequences, denoising trajectories,
  episodes), estimated on the trained policy's samples as the mean over samples of
  ``Σ_t log π_trained(a_t | s_t) − log π_base(a_t | s_t)``, both log-probs recomputed by the
  policy (same sampling settings as in training); with its standard error;
* for text, ``distinct-1/2/3`` of each policy's samples (distinct word n-grams over n-grams).

It writes ``RUN_DIR/eval/``: ``summary.json``, ``base/`` and ``trained/`` samples, a side-by-side
grid of the same prompt and noise under both policies (``side_by_side.png`` for images, a table in
``index.html`` for texts) and ``index.html``.
"""

from __future__ import annotations

import html
import io
import json
import math
from pathlib import Path
from typing import Any

import torch

from . import atomic
from .checkpoint import checkpoint_path, latest_checkpoint, load_checkpoint
from .config import PromptsConfig, load_yaml
from .host import Host
from .scoring import score
from .prompts import PromptSource
from .report import captioned_grid, diversity
from .types import ConfigError, Context, Rollout

#: Samples shown in the side-by-side view.
SIDE_BY_SIDE = 16


def _score(policy, sampler, rewards, contexts: list[Context], seed: int, batch: int,
           label: str = "") -> tuple[dict[str, list[float]], list[Rollout]]:
    from tqdm.auto import tqdm

    scores: dict[str, list[float]] = {name: [] for name, _, _ in rewards}
    rollouts = []
    policy.eval()
    starts = range(0, len(contexts), batch)
    # a bar per policy on a terminal (none when stderr is not one): each batch is sampled and scored
    bar = tqdm(starts, desc=f"polyrl eval: {label}" if label else "polyrl eval", unit="batch", disable=None,
               dynamic_ncols=True)
    with torch.no_grad():
        for k in bar:
            g = torch.Generator().manual_seed(seed * 1_000_003 + k)
            rollout = sampler.sample(policy, contexts[k : k + batch], g)
            scored = score(rewards, rollout)  # the same scoring path as training
            for name, value in scored.components.items():
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


def _sequence_log_probs(policy, rollouts: list[Rollout]) -> list[torch.Tensor]:
    """``[B]`` per rollout: the sum over steps of the policy's log-probs of the recorded actions."""
    out = []
    with torch.no_grad():
        for r in rollouts:
            lp = policy(r.to(policy.device))
            if isinstance(lp, dict):
                lp = lp["log_probs"]
            out.append((lp.float() * r.mask.to(lp.device)).sum(1).cpu())
    return out


def kl_estimate(trained_lp: list[torch.Tensor], base_lp: list[torch.Tensor]) -> dict[str, float]:
    """KL(trained ‖ base) from per-sample sequence log-probs of samples of the trained policy."""
    diff = torch.cat(trained_lp).double() - torch.cat(base_lp).double()
    n = diff.numel()
    se = diff.std(unbiased=True).item() / math.sqrt(n) if n > 1 else float("nan")
    return {"kl_to_base": diff.mean().item(), "kl_to_base_stderr": se}


def _prompt_rows(cfg: Any, prompts: str | None, seed: int) -> list[tuple[str, dict]]:
    if prompts is None:
        return PromptSource(cfg.prompts, seed).rows
    source = PromptsConfig(file=str(prompts), prompt_column=cfg.prompts.prompt_column, shuffle=False)
    try:
        source.check()
        rows = PromptSource(source, seed).rows
    except ConfigError as e:
        raise ConfigError(f"--prompts: {e}") from None
    if not rows:
        raise ConfigError(f"--prompts {str(prompts)!r} holds no prompt")
    return rows


def evaluate(run_dir: str | Path, samples: int = 32, seed: int = 0, iteration: int | None = None,
             baseline: bool = True, batch: int = 16, plugins: tuple[str, ...] = (),
             prompts: str | Path | None = None) -> dict[str, Any]:
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
    data = load_yaml(run_dir / "config.yaml")
    if isinstance(data.get("run"), dict):
        data["run"]["log_with"] = []  # evaluation logs nowhere: the run's trackers need not be installed here
    cfg = host.build_config(data)
    rows = _prompt_rows(cfg, prompts, seed)
    contexts = [Context(prompt=rows[i % len(rows)][0], group=i, extra=dict(rows[i % len(rows)][1]))
                for i in range(samples)]
    device = "cuda" if torch.cuda.is_available() and not cfg.run.cpu else "cpu"
    policy = host.build_policy(cfg).to(device)
    sampler = host.build_sampler(cfg, policy)
    sampler.training = False  # no training-only sampling behaviour (lilGym's stop forcing)
    rewards = host.build_rewards(cfg, policy)
    weights = {name: w for name, w, _ in rewards}
    base_state = policy.trainable_state_dict()  # the untrained weights (a LoRA adapter starts as the identity)
    result: dict[str, Any] = {"run_dir": str(run_dir), "samples": samples, "seed": seed,
                              "prompts": str(prompts) if prompts is not None else "run"}
    out = run_dir / "eval"
    out.mkdir(exist_ok=True)
    stages = (["base"] if baseline else []) + ["trained"]
    outputs: dict[str, tuple[dict[str, list[float]], list[Rollout]]] = {}
    for stage in stages:
        if stage == "trained":
            state = load_checkpoint(ckpt)
            policy.load_trainable_state_dict(state["trainable"])
            result["iteration"] = state["trainer"]["iteration"]
        scores, rollouts = _score(policy, sampler, rewards, contexts, seed, batch, label=f"{stage} policy")
        outputs[stage] = scores, rollouts
        result[stage] = _summary(scores, weights)
        texts = _texts(rollouts)
        if texts:  # distinct-n of each policy's samples, beside the reward summaries
            result.setdefault("diversity", {})[stage] = diversity(texts)
        _save_samples(out / stage, contexts, rollouts, scores)
    trained_rollouts = outputs["trained"][1]
    trained_lp = _sequence_log_probs(policy, trained_rollouts)
    policy.load_trainable_state_dict(base_state)
    result["trained"].update(kl_estimate(trained_lp, _sequence_log_probs(policy, trained_rollouts)))
    if baseline:
        _side_by_side(out, contexts, outputs["base"], outputs["trained"])
    atomic.write_text(out / "summary.json", json.dumps(result, indent=2))
    atomic.write_text(out / "index.html", _page(result, contexts, outputs))
    return result


def _texts(rollouts: list[Rollout]) -> list[str]:
    return [t for r in rollouts for t in r.outputs.get("texts", [])]


def _images(rollouts: list[Rollout]) -> torch.Tensor | None:
    if rollouts and all("images" in r.outputs for r in rollouts):
        return torch.cat([r.outputs["images"].float().cpu().clamp(0, 1) for r in rollouts])
    return None


def _save_samples(out: Path, contexts: list[Context], rollouts: list[Rollout], scores: dict[str, list[float]]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    images = _images(rollouts)
    if images is not None:
        from torchvision.utils import save_image

        save_image(images, out / "samples.png", nrow=8, padding=2)
    texts = _texts(rollouts)
    lines = []
    for i, c in enumerate(contexts):
        row: dict[str, Any] = {"prompt": c.prompt, **{k: v[i] for k, v in scores.items()}}
        if texts:
            row["text"] = texts[i]
        lines.append(json.dumps(row) + "\n")
    atomic.write_text(out / "samples.jsonl", "".join(lines))


def _side_by_side(out: Path, contexts: list[Context], base: tuple, trained: tuple) -> None:
    """``side_by_side.png``: for the first samples, the base and the trained image of the same
    prompt and noise next to each other, the prompt and both rewards under them."""
    from PIL import Image

    base_images, trained_images = _images(base[1]), _images(trained[1])
    if base_images is None or trained_images is None:
        return
    n = min(SIDE_BY_SIDE, len(contexts))
    pairs, captions, lines = [], [], []
    gap = max(2, base_images.shape[-1] // 16)
    for i in range(n):
        b = Image.fromarray((base_images[i] * 255).round().byte().permute(1, 2, 0).numpy())
        t = Image.fromarray((trained_images[i] * 255).round().byte().permute(1, 2, 0).numpy())
        pair = Image.new("RGB", (b.width * 2 + gap, b.height), "white")
        pair.paste(b, (0, 0))
        pair.paste(t, (b.width + gap, 0))
        pairs.append(pair)
        captions.append(contexts[i].prompt)
        lines.append([f"{k}: {base[0][k][i]:.3f} → {trained[0][k][i]:.3f}" for k in trained[0]])
    width = pairs[0].width  # small images are enlarged by a whole factor (sharp pixels), large ones reduced
    size = width * math.ceil(384 / width) if width < 384 else min(512, width)
    grid = captioned_grid(pairs, captions, lines, columns=min(4, n), size=size, pad=32)
    header = _header(grid.width, "left of each pair: base policy    right: trained policy    (same prompt and noise)")
    canvas = Image.new("RGB", (grid.width, grid.height + header.height), "white")
    canvas.paste(header, (0, 0))
    canvas.paste(grid, (0, header.height))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    atomic.write_bytes(out / "side_by_side.png", buf.getvalue())


def _header(width: int, text: str) -> Any:
    from PIL import Image, ImageDraw

    from .report import _font

    img = Image.new("RGB", (width, 34), "white")
    ImageDraw.Draw(img).text((10, 8), text, fill=(20, 20, 20), font=_font(16))
    return img


def _page(result: dict[str, Any], contexts: list[Context], outputs: dict[str, tuple]) -> str:
    stages = [s for s in ("base", "trained") if s in result]
    keys = [k for k in result["trained"] if not k.endswith("_std") and k != "kl_to_base_stderr"]
    parts = ["<html><head><meta charset='utf-8'><title>polyrl eval</title>",
             "<style>body{font-family:sans-serif;max-width:1200px;margin:2em auto;color:#222}"
             "td,th{padding:3px 8px;vertical-align:top;text-align:left}table{border-collapse:collapse}"
             "tr:nth-child(even){background:#f4f4f4}.num{text-align:right}img{max-width:100%}</style></head><body>",
             f"<h1>polyrl eval: {html.escape(Path(result['run_dir']).name)}, iteration {result.get('iteration')}</h1>",
             f"<p>{result['samples']} samples, prompts: {html.escape(result['prompts'])}, seed {result['seed']}; "
             "the base and the trained policy sample with the same noise.</p>",
             "<table><tr><th></th>" + "".join(f"<th>{s}</th>" for s in stages) + "</tr>"]
    for k in keys:
        cells = []
        for s in stages:
            v = result[s].get(k)
            if v is None:
                cells.append("<td></td>")
            elif k == "kl_to_base":
                cells.append(f"<td class='num'>{v:.4f} ± {result[s]['kl_to_base_stderr']:.4f}</td>")
            else:
                cells.append(f"<td class='num'>{v:.4f}</td>")
        parts.append(f"<tr><td>{html.escape(k)}</td>{''.join(cells)}</tr>")
    for k in result.get("diversity", {}).get("trained", {}):
        cells = "".join(f"<td class='num'>{result['diversity'][s].get(k, float('nan')):.4f}</td>" for s in stages
                        if s in result["diversity"])
        parts.append(f"<tr><td>{html.escape(k)}</td>{cells}</tr>")
    parts.append("</table><p>kl_to_base: KL(trained ‖ base) of whole samples, estimated on the trained policy's "
                 "samples (± standard error).</p>")
    if "base" in outputs:
        if _images(outputs["base"][1]) is not None:
            parts.append("<h2>Base and trained, side by side</h2><img src='side_by_side.png'>")
        base_texts, trained_texts = _texts(outputs["base"][1]), _texts(outputs["trained"][1])
        if base_texts and trained_texts:
            names = list(outputs["trained"][0])
            parts.append("<h2>Base and trained, side by side</h2><table><tr><th>prompt</th><th>base</th>"
                         "<th>trained</th>" + "".join(f"<th>{html.escape(k)}<br>base &rarr; trained</th>" for k in names)
                         + "</tr>")
            for i, c in enumerate(contexts[:SIDE_BY_SIDE * 2]):
                cells = "".join(f"<td class='num'>{outputs['base'][0][k][i]:.3f} &rarr; {outputs['trained'][0][k][i]:.3f}</td>"
                                for k in names)
                parts.append(f"<tr><td>{html.escape(c.prompt)}</td><td>{html.escape(base_texts[i])}</td>"
                             f"<td>{html.escape(trained_texts[i])}</td>{cells}</tr>")
            parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts)
