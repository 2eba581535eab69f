"""The run report: curves of everything the run logs, and samples at fixed seeds and prompts.

``record_samples`` (main process) samples the first prompts with a generator that depends only on
the run's seed, so the same noise is used before and after training and the difference shows what
the fine-tuning changed. It saves, under ``report/``:

* ``iter_NNNNNN.json``: prompts, per-sample rewards, texts and their distinct-n;
* ``iter_NNNNNN.png``: the images, each with its caption and rewards under it;
* ``iter_NNNNNN_raw.png``: the same images side by side, unlabelled (for the stacked view).

``write_report`` draws the curves (``reward.png``, ``metrics.png``, ``time.png`` and, for text,
``diversity.png``) and writes ``report/index.html``. The loop also writes it when a run stops
early, from what was recorded until then.
"""

from __future__ import annotations

import html
import io
import json
import math
from pathlib import Path
from typing import Any, Sequence

import torch

from . import atomic
from .scoring import evaluating, score
from .types import Context

N_REPORT_SAMPLES = 8
#: Under-image caption lines of prompt text before it is cut with an ellipsis.
CAPTION_LINES = 3


# ------------------------------------------------------------------------------ diversity
def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct-n: the number of distinct word n-grams over the number of n-grams, across all
    ``texts`` (words split on white space). 0 when the texts hold no n-gram."""
    total, seen = 0, set()
    for text in texts:
        words = text.split()
        grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
        total += len(grams)
        seen.update(grams)
    return len(seen) / total if total else 0.0


def diversity(texts: Sequence[str]) -> dict[str, float]:
    """``{"distinct-1": ..., "distinct-2": ..., "distinct-3": ...}`` of a set of texts."""
    return {f"distinct-{n}": distinct_n(texts, n) for n in (1, 2, 3)}


# ------------------------------------------------------------------------------ recording
def record_samples(trainer: Any, tag: int) -> None:
    """Sample fixed prompts with fixed noise and save them under ``report/`` as ``iter_NNNNNN``;
    the same samples go to the run's trackers (``run.log_with``) at step ``tag``."""
    from . import trackers

    out = Path(trainer.run_dir) / "report"
    out.mkdir(parents=True, exist_ok=True)
    rows = trainer.prompts.rows
    contexts = [Context(prompt=rows[i % len(rows)][0], group=i, extra=dict(rows[i % len(rows)][1]))
                for i in range(min(N_REPORT_SAMPLES, max(len(rows), 4)))]
    g = torch.Generator().manual_seed(trainer.config.run.seed + 12345)
    # recording samples leaves no trace in training: a resumed run is exact with or without the report
    with evaluating(trainer.policy, trainer.sampler), torch.no_grad(), trainer.accelerator.autocast():
        rollout = trainer.sampler.sample(trainer.policy, contexts, g)
    scored = score(trainer.rewards, rollout)  # the same scoring path as training
    # per-step rewards: the episode return
    scores = {name: (v.sum(1) if v.dim() == 2 else v).tolist() for name, v in scored.components.items()}
    record: dict[str, Any] = {"iteration": tag, "prompts": [c.prompt for c in contexts], "rewards": scores}
    if "captions" in rollout.outputs:  # what a sample shows better than its prompt (an episode's sentence)
        record["captions"] = [str(c) for c in rollout.outputs["captions"]]
    images, grid_png = None, None
    if "images" in rollout.outputs:
        images = rollout.outputs["images"].float().cpu().clamp(0, 1)
        atomic.write_bytes(out / f"iter_{tag:06d}_raw.png", _png(_strip(images)))
        grid_png = _png(captioned_grid(images, record.get("captions", record["prompts"]),
                                       _reward_lines(scores, len(contexts))))
        atomic.write_bytes(out / f"iter_{tag:06d}.png", grid_png)
        record["image"] = f"iter_{tag:06d}.png"
        record["raw_image"] = f"iter_{tag:06d}_raw.png"
    if "texts" in rollout.outputs:
        record["texts"] = list(rollout.outputs["texts"])
        record["distinct"] = diversity(record["texts"])
    atomic.write_text(out / f"iter_{tag:06d}.json", json.dumps(record, indent=2))
    trackers.log_samples(trainer.accelerator, record, step=tag, images=images, grid_png=grid_png)


def _reward_lines(scores: dict[str, list[float]], n: int) -> list[list[str]]:
    """Per sample, one ``name value`` line per reward (just the value when there is one reward)."""
    if len(scores) == 1:
        (name, values), = scores.items()
        return [[f"{name} {values[i]:.3f}"] for i in range(n)]
    return [[f"{k} {v[i]:.3f}" for k, v in scores.items()] for i in range(n)]


# ------------------------------------------------------------------------------ image rendering
def _font(size: int):
    from PIL import ImageFont

    try:
        from matplotlib import font_manager

        return ImageFont.truetype(font_manager.findfont("DejaVu Sans"), size)
    except (OSError, ValueError, ImportError):
        return ImageFont.load_default(size=size)


def _png(image: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _strip(images: torch.Tensor) -> Any:
    """``[N, 3, H, W]`` in ``[0, 1]`` as one unlabelled row of images (no padding)."""
    from PIL import Image

    arr = (images * 255).round().byte().permute(0, 2, 3, 1).numpy()
    n, h, w, _ = arr.shape
    return Image.fromarray(arr.transpose(1, 0, 2, 3).reshape(h, n * w, 3))


def _tile(image: Any, size: int) -> Any:
    """Scale an image to ``size`` pixels wide: whole-number nearest-neighbour steps for small
    images (pixels stay sharp), Lanczos for large ones."""
    from PIL import Image

    if image.width == size:
        return image
    h = round(image.height * size / image.width)
    return image.resize((size, h), Image.NEAREST if image.width < size else Image.LANCZOS)


def _tile_size(width: int) -> int:
    if width >= 256:
        return 256
    return width * max(1, math.ceil(192 / width))


def _wrap(text: str, font: Any, width: int, max_lines: int) -> list[str]:
    words, lines, line = text.split(), [], ""
    for word in words:
        trial = f"{line} {word}".strip()
        if font.getlength(trial) <= width or not line:
            line = trial
        else:
            lines.append(line)
            line = word
    if line:
        lines.append(line)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1] + " …"
    cut = []
    for ln in lines:  # a single word wider than the tile
        while font.getlength(ln) > width and len(ln) > 2:
            ln = ln[:-2] + "…"
        cut.append(ln)
    return cut


def _to_pil(images: torch.Tensor) -> list[Any]:
    from PIL import Image

    arr = (images.float().cpu().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in arr]


def captioned_grid(images: torch.Tensor | Sequence[Any], captions: Sequence[str], lines: Sequence[Sequence[str]],
                   columns: int | None = None, size: int | None = None, pad: int = 10) -> Any:
    """A grid of images, each with its caption (wrapped) and extra lines (rewards) under it.

    ``images`` is ``[N, 3, H, W]`` in ``[0, 1]`` or a list of PIL images. Small images are
    enlarged so that the text under them stays legible."""
    from PIL import Image, ImageDraw

    pils = _to_pil(images) if isinstance(images, torch.Tensor) else list(images)
    n = len(pils)
    columns = columns or min(n, 8)
    size = size or _tile_size(max(p.width for p in pils))
    tiles = [_tile(p, size) for p in pils]
    font, bold = _font(14), _font(15)
    line_h = 18
    wrapped = [_wrap(c, font, size, CAPTION_LINES) for c in captions]
    text_h = line_h * (max(len(w) for w in wrapped) + max((len(x) for x in lines), default=0)) + 6
    cell_w, cell_h = size + pad, max(t.height for t in tiles) + text_h + pad
    rows = math.ceil(n / columns)
    canvas = Image.new("RGB", (columns * cell_w + pad, rows * cell_h + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for i, tile in enumerate(tiles):
        x, y = pad + (i % columns) * cell_w, pad + (i // columns) * cell_h
        canvas.paste(tile, (x, y))
        ty = y + tile.height + 4
        for ln in wrapped[i]:
            draw.text((x, ty), ln, fill=(20, 20, 20), font=font)
            ty += line_h
        for ln in lines[i] if i < len(lines) else ():
            draw.text((x, ty), ln, fill=(0, 70, 160), font=bold)
            ty += line_h
    return canvas


def _stack_grids(records: list[dict[str, Any]], out: Path) -> str | None:
    """One image: the prompts as column heads, then a row per recorded iteration with the same
    prompts and noise, each image with its reward (and the change since the first row) under it."""
    from PIL import Image, ImageDraw

    rows = []
    for rec in records:
        path = out / rec.get("raw_image", "")
        if rec.get("raw_image") and path.is_file():
            rows.append((rec, Image.open(path).convert("RGB")))
    if len(rows) < 2:
        return None
    n = len(rows[0][0]["prompts"])
    if any(len(rec["prompts"]) != n for rec, _ in rows):
        return None
    w = rows[0][1].width // n
    size = _tile_size(w)
    font, big = _font(14), _font(18)
    pad, label_w, line_h = 10, 120, 18
    heads = [_wrap(p, font, size, CAPTION_LINES) for p in rows[0][0].get("captions", rows[0][0]["prompts"])]
    head_h = line_h * max(len(h) for h in heads) + 8
    names = list(rows[0][0]["rewards"])
    reward_h = line_h * max(1, len(names)) + 6
    tile_h = round(rows[0][1].height * size / w)
    row_h = tile_h + reward_h + pad
    canvas = Image.new("RGB", (label_w + n * (size + pad) + pad, head_h + len(rows) * row_h + pad), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((8, pad // 2), "reward:" if len(names) == 1 else "rewards", fill=(0, 70, 160), font=font)
    if len(names) == 1:
        for k, ln in enumerate(_wrap(names[0], font, label_w - 12, 2)):
            draw.text((8, pad // 2 + (k + 1) * line_h), ln, fill=(0, 70, 160), font=font)
    for j, head in enumerate(heads):
        for k, ln in enumerate(head):
            draw.text((label_w + j * (size + pad), pad // 2 + k * line_h), ln, fill=(20, 20, 20), font=font)
    first = rows[0][0]["rewards"]
    for r, (rec, strip) in enumerate(rows):
        y = head_h + r * row_h
        draw.text((8, y + tile_h // 2 - 10), f"iter {rec['iteration']}", fill="black", font=big)
        for j in range(n):
            x = label_w + j * (size + pad)
            canvas.paste(_tile(strip.crop((j * w, 0, (j + 1) * w, strip.height)), size), (x, y))
            for k, name in enumerate(names):
                value = rec["rewards"].get(name, [math.nan] * n)[j]
                label = f"{value:.3f}" if len(names) == 1 else f"{name} {value:.3f}"
                colour = (0, 70, 160)
                if r > 0:
                    delta = value - first[name][j]
                    label += f" ({delta:+.3f})"
                    colour = (0, 120, 40) if delta > 0 else (180, 30, 30) if delta < 0 else colour
                draw.text((x, y + tile_h + 3 + k * line_h), label, fill=colour, font=font)
    atomic.write_bytes(out / "samples_over_iterations.png", _png(canvas))
    return "samples_over_iterations.png"


# ------------------------------------------------------------------------------ curves
def smooth(values: Sequence[float], window: int) -> list[float]:
    """Exponential moving average over about ``window`` points, bias-corrected at the start (the
    first value is not pulled toward zero); non-finite points are skipped and stay NaN."""
    if window <= 1:
        return list(values)
    weight = 1.0 - 1.0 / window
    out, acc, norm = [], 0.0, 0.0
    for v in values:
        if not math.isfinite(v):
            out.append(math.nan)
            continue
        acc = weight * acc + (1 - weight) * v
        norm = weight * norm + (1 - weight)
        out.append(acc / norm)
    return out


def _window(n: int) -> int:
    return max(1, min(50, round(n / 8)))


def _series(rows: list[dict[str, Any]], key: str) -> list[float]:
    out = []
    for r in rows:
        v = r.get(key)
        out.append(float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan)
    return out


def _integer_ticks(ax: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _plot(ax: Any, its: list[int], values: list[float], label: str | None, colour: Any, window: int) -> None:
    _integer_ticks(ax)
    points = [(i, v) for i, v in zip(its, values) if math.isfinite(v)]  # quantities logged on some iterations only
    if not points:
        return
    if len(points) < len(values):  # gaps: plain points and lines, no average across them
        window = 1
    its, values = [i for i, _ in points], [v for _, v in points]
    marker = "." if len(its) <= 30 else None
    if window > 1:
        ax.plot(its, values, color=colour, alpha=0.25, linewidth=1, marker=marker, markersize=3)
        ax.plot(its, smooth(values, window), color=colour, linewidth=2, label=label)
    else:
        ax.plot(its, values, color=colour, linewidth=1.8, marker=marker, label=label)


_FIRST = ("loss", "policy_loss", "value_loss", "kl", "kl_ref", "approx_kl", "clipfrac", "grad_norm", "entropy",
          "completion_length")
_SIDES = ("_low", "_high", "_min", "_max")


def metric_panels(rows: list[dict[str, Any]]) -> tuple[list[list[str]], dict[str, float]]:
    """The logged quantities other than rewards and times, as panels (``clipfrac_low`` and
    ``clipfrac_high`` share ``clipfrac``'s), and the ones constant over the run."""
    keys: list[str] = []
    for r in rows:
        for k, v in r.items():
            if k not in keys and isinstance(v, (int, float)) and not isinstance(v, bool):
                keys.append(k)
    skip = {"iteration", "reward_mean", "reward_std"}
    keys = [k for k in keys if k not in skip and not k.startswith(("reward/", "time/", "eval/"))]
    constant: dict[str, float] = {}
    varying = []
    for k in keys:
        finite = [v for v in _series(rows, k) if math.isfinite(v)]
        if not finite:
            continue
        if len(rows) > 1 and max(finite) == min(finite):
            constant[k] = finite[0]
        else:
            varying.append(k)
    order = {k: i for i, k in enumerate(_FIRST)}
    panels: dict[str, list[str]] = {}
    for k in varying:
        base = next((k[: -len(s)] for s in _SIDES if k.endswith(s) and k[: -len(s)] in varying), k)
        panels.setdefault(base, []).append(k)
    ordered = sorted(panels, key=lambda b: (order.get(b, len(order)), b.startswith("reward_learn/"), b))
    return [panels[b] for b in ordered], constant


def reward_curves(rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """``(key, label)`` of the reward curves: the total, then the components, unless the one
    component is the total itself (one reward of weight 1), which is then drawn once, by its name."""
    components = sorted({k for r in rows for k in r if k.startswith("reward/")})
    if len(components) == 1:
        total, comp = _series(rows, "reward_mean"), _series(rows, components[0])
        if all(abs(a - b) <= 1e-6 * max(1.0, abs(a)) for a, b in zip(total, comp) if math.isfinite(a) and math.isfinite(b)):
            return [("reward_mean", components[0].split("/", 1)[1])]
    return [("reward_mean", "total (weighted)")] + [(k, k.split("/", 1)[1]) for k in components]


def _plot_metrics(rows: list[dict[str, Any]], out: Path) -> tuple[list[str], dict[str, float]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10, "legend.fontsize": 9})
    files = []
    its = [int(r["iteration"]) for r in rows]
    window = _window(len(rows))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]

    # rewards: the total, with the spread of the samples; components only when they add a curve
    curves = reward_curves(rows)
    (_, total_label), extra = curves[0], [k for k, _ in curves[1:]]
    total = _series(rows, "reward_mean")
    fig, ax = plt.subplots(figsize=(7.5, 4))
    std = _series(rows, "reward_std")
    if all(math.isfinite(s) for s in std):
        ax.fill_between(its, [m - s for m, s in zip(total, std)], [m + s for m, s in zip(total, std)],
                        color=colours[0], alpha=0.1, linewidth=0, label="± std of the samples")
    _plot(ax, its, total, total_label, colours[0], window)
    for i, k in enumerate(extra, 1):
        _plot(ax, its, _series(rows, k), k.split("/", 1)[1], colours[i % len(colours)], window)
    ax.set_xlabel("iteration")
    ax.set_ylabel("mean reward per sample")
    ax.set_title("reward")
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    fig.tight_layout()
    _save_fig(fig, out / "reward.png")
    files.append("reward.png")

    held_out = sorted({k for r in rows for k in r if k.startswith("eval/") and k != "eval/reward_mean"})
    if held_out:  # trained reward next to the rewards the update never saw: reward hacking shows here
        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8), sharex=True)
        _plot(left, its, total, total_label, colours[0], window)
        left.set_title("trained reward (training prompts)")
        left.set_ylabel("mean reward per sample")
        for i, k in enumerate(held_out):
            pts = [(it, v) for it, v in zip(its, _series(rows, k)) if math.isfinite(v)]
            right.plot([p[0] for p in pts], [p[1] for p in pts], color=colours[(i + 1) % len(colours)],
                       linestyle="--", marker="o", markersize=4, linewidth=1.5, label=k.split("/", 1)[1])
        right.set_title("held-out evaluation (rewards the update never sees)")
        for ax_ in (left, right):
            ax_.set_xlabel("iteration")
            ax_.grid(alpha=0.3)
            ax_.legend(loc="best")
        fig.tight_layout()
        _save_fig(fig, out / "heldout.png")
        files.append("heldout.png")

    panels, constant = metric_panels(rows)
    if panels:
        ncol = min(3, len(panels))
        nrow = math.ceil(len(panels) / ncol)
        fig, axes = plt.subplots(nrow, ncol, figsize=(4.4 * ncol, 2.9 * nrow), squeeze=False)
        for ax, keys in zip(axes.flat, panels):
            for i, k in enumerate(keys):
                _plot(ax, its, _series(rows, k), k if len(keys) > 1 else None, colours[i % len(colours)], window)
            ax.set_title(keys[0])
            ax.set_xlabel("iteration")
            ax.grid(alpha=0.3)
            if len(keys) > 1:
                ax.legend(loc="best")
        for ax in list(axes.flat)[len(panels):]:
            ax.axis("off")
        fig.tight_layout()
        _save_fig(fig, out / "metrics.png")
        files.append("metrics.png")

    time_keys = [k for k in ("time/sample", "time/reward", "time/update", "time/learn")
                 if any(r.get(k, 0.0) > 0.005 for r in rows)]
    if time_keys:
        fig, ax = plt.subplots(figsize=(7.5, 3))
        bottom = [0.0] * len(its)
        for i, k in enumerate(time_keys):
            vals = [r.get(k, 0.0) for r in rows]
            ax.bar(its, vals, bottom=bottom, label=k.split("/")[1], color=colours[i % len(colours)], width=0.85)
            bottom = [a + b for a, b in zip(bottom, vals)]
        ax.set_xlabel("iteration")
        _integer_ticks(ax)
        ax.set_ylabel("seconds")
        ax.set_title("time per iteration")
        ax.set_ylim(0, max(bottom) * 1.3 or 1.0)  # room for the legend above the bars
        ax.legend(loc="upper left", ncol=len(time_keys))
        fig.tight_layout()
        _save_fig(fig, out / "time.png")
        files.append("time.png")
    return files, constant


def _plot_diversity(records: list[dict[str, Any]], out: Path) -> str | None:
    recs = [r for r in records if "distinct" in r]
    if len(recs) < 2:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 3.2))
    its = [r["iteration"] for r in recs]
    for k in recs[0]["distinct"]:
        ax.plot(its, [r["distinct"].get(k, math.nan) for r in recs], marker="o", label=k, linewidth=1.8)
    ax.set_xlabel("iteration")
    ax.set_ylabel("distinct n-grams / n-grams")
    _integer_ticks(ax)
    ax.set_ylim(0, 1.05)
    ax.set_title(f"diversity of the {len(recs[0]['texts'])} fixed-seed samples")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", ncol=3)
    fig.tight_layout()
    _save_fig(fig, out / "diversity.png")
    return "diversity.png"


def _save_fig(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic.write_bytes(path, buf.getvalue())


# ------------------------------------------------------------------------------ the page
def _planned_iterations(run_dir: Path) -> int | None:
    try:
        import yaml

        data = yaml.safe_load((run_dir / "config.yaml").read_text())
        value = data["run"]["iterations"]
        return value if isinstance(value, int) else None
    except Exception:  # noqa: BLE001 - a missing or damaged config.yaml only loses the "stopped early" note
        return None


def _fmt(v: float) -> str:
    return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.3e}"


def _texts_before_after(records: list[dict[str, Any]]) -> list[str]:
    """A table of the first and the last recorded completion of each prompt (same noise)."""
    recs = [r for r in records if "texts" in r]
    if len(recs) < 2 or recs[0]["prompts"] != recs[-1]["prompts"]:
        return []
    first, last = recs[0], recs[-1]
    names = [k for k in first["rewards"] if k in last["rewards"]]
    parts = [f"<h3>Same prompts and noise: iteration {first['iteration']} and iteration {last['iteration']}</h3>",
             f"<table><tr><th>prompt</th><th>iteration {first['iteration']}</th><th>iteration {last['iteration']}</th>"
             + "".join(f"<th>{html.escape(k)}</th>" for k in names) + "</tr>"]
    for i, prompt in enumerate(first["prompts"]):
        cells = "".join(f"<td class='num'>{first['rewards'][k][i]:.3f} &rarr; {last['rewards'][k][i]:.3f}</td>"
                        for k in names)
        parts.append(f"<tr><td>{html.escape(prompt)}</td><td>{html.escape(first['texts'][i])}</td>"
                     f"<td>{html.escape(last['texts'][i])}</td>{cells}</tr>")
    parts.append("</table>")
    return parts


def write_report(run_dir: str | Path) -> Path:
    """Write ``report/index.html`` for a run directory; returns its path."""
    run_dir = Path(run_dir)
    out = run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    rows, _ = atomic.read_jsonl(run_dir / "metrics.jsonl")  # a torn last line (a crash mid-append) is skipped
    rows = [r for r in rows if isinstance(r.get("iteration"), int)]
    name = html.escape(run_dir.name)
    parts = [f"<html><head><meta charset='utf-8'><title>polyrl run: {name}</title>",
             "<style>body{font-family:sans-serif;max-width:1200px;margin:2em auto;color:#222}"
             "td,th{padding:3px 8px;vertical-align:top;text-align:left}table{border-collapse:collapse}"
             "tr:nth-child(even){background:#f4f4f4}img{max-width:100%}.num{text-align:right}"
             ".note{color:#555}</style></head><body>",
             f"<h1>polyrl run: {name}</h1>"]
    planned = _planned_iterations(run_dir)
    if rows:
        first, last = rows[0], rows[-1]
        parts.append(f"<p>{len(rows)} iterations; mean reward {first['reward_mean']:.4f} (iteration {first['iteration']}) "
                     f"&rarr; {last['reward_mean']:.4f} (iteration {last['iteration']}).</p>")
        if planned is not None and last["iteration"] < planned:
            parts.append(f"<p><b>The run stopped early: after iteration {last['iteration']} of {planned}.</b> "
                         "The samples below are those recorded until then.</p>")
        files, constant = _plot_metrics(rows, out)
        window = _window(len(rows))
        if window > 1:
            parts.append(f"<p class='note'>Faint: the value of each iteration; solid: its exponential moving "
                         f"average over about {window} iterations.</p>")
        for f in files:
            parts.append(f"<p><img src='{f}'></p>")
        if constant:
            parts.append("<p class='note'>Constant over the run: "
                         + ", ".join(f"{html.escape(k)} = {_fmt(v)}" for k, v in sorted(constant.items())) + "</p>")
    elif planned is not None:
        parts.append("<p>No iteration completed.</p>")
    parts.append("<h2>Samples at fixed prompts and seeds</h2>")
    records = []
    for p in sorted(out.glob("iter_*.json")):
        try:
            records.append(json.loads(p.read_text()))
        except (OSError, ValueError):
            parts.append(f"<p class='note'>{html.escape(p.name)} could not be read; skipped.</p>")
    stacked = _stack_grids(records, out)
    if stacked:
        parts.append("<p>Each row: the same prompts and the same noise, at the iteration on its left (first row: "
                     "before training). Under each image its reward, and from the second row on the change since "
                     "the first row (green: higher, red: lower).</p>")
        parts.append(f"<img src='{stacked}' style='width:100%'>")
    diversity_png = _plot_diversity(records, out)
    if any("distinct" in r for r in records):
        parts.append("<h3>Diversity of the sample texts</h3><p class='note'>distinct-n: distinct word n-grams over "
                     "all n-grams of the fixed-seed samples of an iteration (1: every n-gram different).</p>")
        keys = next(r["distinct"] for r in records if "distinct" in r)
        parts.append("<table><tr><th>iteration</th>" + "".join(f"<th>{html.escape(k)}</th>" for k in keys) + "</tr>")
        for r in records:
            if "distinct" in r:
                parts.append(f"<tr><td>{r['iteration']}</td>"
                             + "".join(f"<td class='num'>{r['distinct'].get(k, math.nan):.3f}</td>" for k in keys) + "</tr>")
        parts.append("</table>")
        if diversity_png:
            parts.append(f"<p><img src='{diversity_png}'></p>")
    parts += _texts_before_after(records)
    for rec in records:
        parts.append(f"<h3>iteration {rec['iteration']}</h3>")
        means = ", ".join(f"{k}: {sum(v) / len(v):.4f}" for k, v in rec["rewards"].items() if v)
        parts.append(f"<p>mean reward of these samples: {html.escape(means)}</p>")
        if "image" in rec:
            parts.append(f"<img src='{rec['image']}'>")
        if "texts" in rec:
            if "distinct" in rec:
                parts.append("<p>" + ", ".join(f"{k} {v:.3f}" for k, v in rec["distinct"].items()) + "</p>")
            names = list(rec["rewards"])
            parts.append("<table><tr><th>prompt</th><th>completion</th>"
                         + "".join(f"<th>{html.escape(k)}</th>" for k in names) + "</tr>")
            for i, (p, t) in enumerate(zip(rec["prompts"], rec["texts"])):
                cells = "".join(f"<td class='num'>{rec['rewards'][k][i]:.3f}</td>" for k in names)
                parts.append(f"<tr><td>{html.escape(p)}</td><td>{html.escape(t)}</td>{cells}</tr>")
            parts.append("</table>")
    parts.append("</body></html>")
    index = out / "index.html"
    atomic.write_text(index, "\n".join(parts))
    return index
