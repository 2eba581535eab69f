"""The run report: reward curves, and samples at fixed seeds and prompts over iterations.

``record_samples`` (main process) samples the first prompts with a generator that depends only on
the run's seed, so the same noise is used before and after training and the difference shows what
the fine-tuning changed. ``write_report`` draws the curves and writes ``report/index.html``.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import torch

from . import atomic
from .types import Context

N_REPORT_SAMPLES = 8


def record_samples(trainer: Any, tag: int) -> None:
    """Sample fixed prompts with fixed noise and save them under ``report/`` as ``iter_NNNNNN``."""
    out = Path(trainer.run_dir) / "report"
    out.mkdir(parents=True, exist_ok=True)
    rows = trainer.prompts.rows
    contexts = [Context(prompt=rows[i % len(rows)][0], group=i, extra=dict(rows[i % len(rows)][1]))
                for i in range(min(N_REPORT_SAMPLES, max(len(rows), 4)))]
    g = torch.Generator().manual_seed(trainer.config.run.seed + 12345)
    # every module's own mode is restored afterwards (frozen parts stay in eval mode), so recording
    # samples leaves no trace in training: a resumed run is exact with or without the report
    modes = [(m, m.training) for m in trainer.policy.modules()]
    trainer.policy.eval()
    try:
        with torch.no_grad():
            rollout = trainer.sampler.sample(trainer.policy, contexts, g)
            scores = {}
            for name, _, fn in trainer.rewards:
                value = torch.as_tensor(fn(rollout)).float().cpu()
                scores[name] = (value.sum(1) if value.dim() == 2 else value).tolist()  # per-step: episode return
    finally:
        for m, mode in modes:
            m.training = mode
    record: dict[str, Any] = {"iteration": tag, "prompts": [c.prompt for c in contexts], "rewards": scores}
    if "images" in rollout.outputs:
        from torchvision.utils import save_image

        save_image(rollout.outputs["images"].float().cpu(), out / f"iter_{tag:06d}.png", nrow=len(contexts), padding=2)
        record["image"] = f"iter_{tag:06d}.png"
    if "texts" in rollout.outputs:
        record["texts"] = list(rollout.outputs["texts"])
    atomic.write_text(out / f"iter_{tag:06d}.json", json.dumps(record, indent=2))


def _plot_metrics(rows: list[dict[str, float]], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    its = [r["iteration"] for r in rows]
    reward_keys = ["reward_mean"] + sorted(k for k in rows[0] if k.startswith("reward/"))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for k in reward_keys:
        ax.plot(its, [r.get(k, float("nan")) for r in rows], label=k, marker="." if len(its) < 50 else None)
    ax.set_xlabel("iteration")
    ax.set_ylabel("reward")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "reward.png", dpi=110)
    plt.close(fig)
    files.append("reward.png")

    time_keys = ["time/sample", "time/reward", "time/update"]
    fig, ax = plt.subplots(figsize=(6, 3))
    bottom = [0.0] * len(its)
    for k in time_keys:
        vals = [r.get(k, 0.0) for r in rows]
        ax.bar(its, vals, bottom=bottom, label=k.split("/")[1])
        bottom = [a + b for a, b in zip(bottom, vals)]
    ax.set_xlabel("iteration")
    ax.set_ylabel("seconds")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "time.png", dpi=110)
    plt.close(fig)
    files.append("time.png")
    return files


def _stack_grids(records: list[dict[str, Any]], out: Path) -> str | None:
    """One image with the fixed-seed grid of every recorded iteration as a labelled row."""
    from PIL import Image, ImageDraw

    rows = [(rec["iteration"], Image.open(out / rec["image"]).convert("RGB")) for rec in records if "image" in rec]
    if len(rows) < 2:
        return None
    label_w = 90
    width = label_w + max(im.width for _, im in rows)
    canvas = Image.new("RGB", (width, sum(im.height for _, im in rows)), "white")
    draw = ImageDraw.Draw(canvas)
    y = 0
    for iteration, im in rows:
        canvas.paste(im, (label_w, y))
        draw.text((6, y + im.height // 2 - 6), f"iter {iteration}", fill="black")
        y += im.height
    canvas.save(out / "samples_over_iterations.png")
    return "samples_over_iterations.png"


def write_report(run_dir: str | Path) -> Path:
    """Write ``report/index.html`` for a run directory; returns its path."""
    run_dir = Path(run_dir)
    out = run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    metrics = run_dir / "metrics.jsonl"
    rows, _ = atomic.read_jsonl(metrics)  # a torn last line (a crash mid-append) is skipped
    parts = [f"<html><head><meta charset='utf-8'><title>polyrl run: {html.escape(run_dir.name)}</title>",
             "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}td,th{padding:2px 8px}"
             "img{max-width:100%;image-rendering:pixelated}</style></head><body>",
             f"<h1>polyrl run: {html.escape(run_dir.name)}</h1>"]
    if rows:
        first, last = rows[0], rows[-1]
        parts.append(f"<p>{len(rows)} iterations; mean reward {first['reward_mean']:.4f} (iteration {first['iteration']}) "
                     f"&rarr; {last['reward_mean']:.4f} (iteration {last['iteration']}).</p>")
        for f in _plot_metrics(rows, out):
            parts.append(f"<img src='{f}'>")
    parts.append("<h2>Samples at fixed prompts and seeds</h2>")
    records = [json.loads(p.read_text()) for p in sorted(out.glob("iter_*.json"))]
    stacked = _stack_grids(records, out)
    if stacked:
        parts.append("<p>Each row: the same prompts and the same noise, at the iteration on its left "
                     "(first row: before training).</p>")
        parts.append(f"<img src='{stacked}' style='width:100%'>")
    for rec in records:
        parts.append(f"<h3>iteration {rec['iteration']}</h3>")
        means = ", ".join(f"{k}: {sum(v) / len(v):.4f}" for k, v in rec["rewards"].items())
        parts.append(f"<p>mean reward of these samples: {html.escape(means)}</p>")
        if "image" in rec:
            parts.append(f"<img src='{rec['image']}' style='width:100%'><p>prompts: "
                         f"{html.escape(' | '.join(rec['prompts']))}</p>")
        if "texts" in rec:
            parts.append("<table><tr><th>prompt</th><th>completion</th></tr>")
            for p, t in zip(rec["prompts"], rec["texts"]):
                parts.append(f"<tr><td>{html.escape(p)}</td><td>{html.escape(t)}</td></tr>")
            parts.append("</table>")
    parts.append("</body></html>")
    index = out / "index.html"
    atomic.write_text(index, "\n".join(parts))
    return index
