"""Experiment trackers: ``run.log_with`` through accelerate's trackers.

Every iteration's metrics (the line appended to ``metrics.jsonl``) go to each selected tracker with
``step=iteration``; the fixed-seed report samples go there too whenever they are recorded
(``run.report_every``, first and last iteration): images with their caption and per-sample reward,
texts as a table, and the distinct-n of the texts.

==============  ==========================================  ====================================
tracker         where it writes                             offline
==============  ==========================================  ====================================
``tensorboard`` ``RUN_DIR/logs/polyrl/`` (event files)      always (``tensorboard --logdir``)
``wandb``       ``RUN_DIR/wandb/``                          ``WANDB_MODE=offline``, then
                                                            ``wandb sync``
``trackio``     trackio's local store                       local by default
==============  ==========================================  ====================================

Tracker packages are optional: selecting one that is not installed is a :class:`ConfigError`
that names the ``pip install`` command, raised before any model loads.
"""

from __future__ import annotations

import importlib.util
import io
import json
import secrets
from pathlib import Path
from typing import Any, Sequence

from .types import ConfigError

#: The trackers ``run.log_with`` accepts, and how to install each one.
TRACKERS: dict[str, str] = {
    "tensorboard": "pip install tensorboard",
    "wandb": "pip install wandb",
    "trackio": "pip install trackio",
}

#: The accelerate project name (the wandb / trackio project; tensorboard's sub-folder of ``logs/``).
PROJECT = "polyrl"


def normalise(value: str | Sequence[str] | None) -> list[str]:
    """``run.log_with`` as a list of tracker names: a name, a list of names, ``none`` or nothing.

    Raises :class:`ConfigError` naming an unknown tracker and the accepted ones."""
    from .config import suggest

    if value is None:
        return []
    names = [value] if isinstance(value, str) else list(value)
    out: list[str] = []
    for name in names:
        if not isinstance(name, str):
            raise ConfigError(f"run.log_with: {name!r} is not a tracker name; accepted: {sorted(TRACKERS)} or none")
        key = name.strip().lower()
        if key in ("", "none"):
            continue
        if key not in TRACKERS:
            raise ConfigError(
                f"run.log_with: unknown tracker {name[:60]!r}{suggest(key, TRACKERS)}; accepted: {sorted(TRACKERS)} or none"
            )
        if key not in out:
            out.append(key)
    return out


def check_installed(names: Sequence[str]) -> None:
    """Raise :class:`ConfigError` when a selected tracker's package is missing (accelerate would
    silently drop it)."""
    for name in names:
        if importlib.util.find_spec(name) is None:
            raise ConfigError(
                f"run.log_with: {name!r} is selected but the {name} package is not installed; "
                f"install it with `{TRACKERS[name]}` or remove {name!r} from run.log_with"
            )


def accelerator_kwargs(names: Sequence[str], run_dir: str | Path) -> dict[str, Any]:
    """Keyword arguments for ``Accelerator`` that route the selected trackers into the run folder."""
    if not names:
        return {}
    from accelerate.utils import ProjectConfiguration

    run_dir = Path(run_dir)
    return {
        "log_with": list(names),
        "project_config": ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "logs")),
    }


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as ``{"run.iterations": 40, ...}`` with scalar values (what every tracker's
    hyper-parameter table accepts; lists become their JSON text)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        elif value is None or isinstance(value, (bool, int, float, str)):
            out[name] = value
        else:
            out[name] = json.dumps(value, default=str)
    return out


def start(trainer: Any) -> None:
    """Start the run's trackers (all processes call it; accelerate starts them on the main one).

    The wandb run keeps one id across ``--resume`` (stored in ``RUN_DIR/trackers.json``)."""
    acc = trainer.accelerator
    names = normalise(trainer.config.run.log_with)
    if not names:
        return
    init_kwargs: dict[str, dict[str, Any]] = {}
    run_dir = Path(trainer.run_dir)
    if "wandb" in names and acc.is_main_process:
        init_kwargs["wandb"] = {"name": run_dir.name, "dir": str(run_dir), "id": _wandb_id(run_dir), "resume": "allow"}
    if "trackio" in names:
        init_kwargs["trackio"] = {"name": run_dir.name, "resume": "allow"}
    acc.init_trackers(PROJECT, config=flatten(trainer.config.to_dict()), init_kwargs=init_kwargs)


def _wandb_id(run_dir: Path) -> str:
    from . import atomic

    path = run_dir / "trackers.json"
    try:
        data = json.loads(path.read_text())
        if isinstance(data, dict) and isinstance(data.get("wandb_id"), str) and data["wandb_id"].isalnum():
            return data["wandb_id"]
    except (OSError, ValueError):
        pass
    run_id = secrets.token_hex(4)
    atomic.write_text(path, json.dumps({"wandb_id": run_id}))
    return run_id


def log_metrics(accelerator: Any, metrics: dict[str, Any], step: int) -> None:
    """One iteration's scalars (``iteration`` is the step, not a curve)."""
    if not accelerator.trackers:
        return
    accelerator.log({k: v for k, v in metrics.items() if k != "iteration"}, step=step)


def log_samples(accelerator: Any, record: dict[str, Any], step: int, images: Any = None, grid_png: bytes | None = None) -> None:
    """The fixed-seed samples of one report recording.

    ``record`` is what :func:`polyrl.report.record_samples` saves (prompts, per-sample rewards,
    texts, distinct-n); ``images`` a ``[N, 3, H, W]`` tensor in ``[0, 1]``; ``grid_png`` the
    captioned grid (each image with its caption and rewards under it), for trackers without
    per-image captions (tensorboard)."""
    if not accelerator.trackers or not accelerator.is_main_process:
        return
    captions = sample_captions(record)
    arrays = None
    if images is not None:
        arrays = [(img.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy() for img in images]
    columns, rows = text_table(record)
    scalars = {f"samples/{k}": v for k, v in record.get("distinct", {}).items()}
    for name, values in record.get("rewards", {}).items():
        if values:
            scalars[f"samples/reward/{name}"] = sum(values) / len(values)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            _tensorboard_samples(tracker.tracker, captions, arrays, grid_png, columns, rows, scalars, step)
        elif tracker.name == "wandb":
            import wandb

            values: dict[str, Any] = dict(scalars)
            if arrays is not None:
                values["samples/images"] = [wandb.Image(a, caption=c) for a, c in zip(arrays, captions)]
            if rows:
                values["samples/texts"] = wandb.Table(columns=columns, data=rows)
            tracker.tracker.log(values, step=step)
        elif tracker.name == "trackio":
            import trackio

            values = dict(scalars)
            if arrays is not None:
                values["samples/images"] = [trackio.Image(a, caption=c) for a, c in zip(arrays, captions)]
            if rows:
                import pandas as pd

                values["samples/texts"] = trackio.Table(dataframe=pd.DataFrame(rows, columns=columns))
            tracker.tracker.log(values, step=step)


def sample_captions(record: dict[str, Any]) -> list[str]:
    """``"<prompt> | clip_score 0.812"`` for each recorded sample."""
    rewards = record.get("rewards", {})
    out = []
    for i, prompt in enumerate(record.get("prompts", [])):
        scores = ", ".join(f"{k} {v[i]:.3f}" for k, v in rewards.items() if i < len(v))
        out.append(f"{prompt} | {scores}" if scores else prompt)
    return out


def text_table(record: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """Columns and rows (prompt, completion, one column per reward) of a text recording."""
    if "texts" not in record:
        return [], []
    rewards = record.get("rewards", {})
    columns = ["prompt", "completion", *rewards]
    rows = [[p, t, *(round(float(v[i]), 4) for v in rewards.values())]
            for i, (p, t) in enumerate(zip(record["prompts"], record["texts"]))]
    return columns, rows


def _markdown_cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _tensorboard_samples(writer: Any, captions: list[str], arrays: Any, grid_png: bytes | None,
                         columns: list[str], rows: list[list[Any]], scalars: dict[str, float], step: int) -> None:
    import numpy as np

    for k, v in scalars.items():
        writer.add_scalar(k, v, global_step=step)
    if grid_png is not None:
        from PIL import Image

        grid = np.asarray(Image.open(io.BytesIO(grid_png)).convert("RGB"))
        writer.add_image("samples/grid", grid, global_step=step, dataformats="HWC")
    if arrays is not None:
        writer.add_images("samples/images", np.stack(arrays), global_step=step, dataformats="NHWC")
        table = ["| # | caption and rewards |", "|---|---|"]
        table += [f"| {i} | {_markdown_cell(c)} |" for i, c in enumerate(captions)]
        writer.add_text("samples/captions", "\n".join(table), global_step=step)
    if rows:
        table = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        table += ["| " + " | ".join(_markdown_cell(v) for v in row) + " |" for row in rows]
        writer.add_text("samples/texts", "\n".join(table), global_step=step)
    writer.flush()


def finish(accelerator: Any) -> None:
    """Close the run's trackers (flush event files, finish the wandb / trackio run).

    The tracker part of ``Accelerator.end_training``; the process group is left as it is, so a
    caller that still synchronises processes after :func:`polyrl.loop.train` can."""
    trackers, accelerator.trackers = list(getattr(accelerator, "trackers", [])), []
    for tracker in trackers:
        tracker.finish()
