"""What ``--resume`` may change, checked before any model loads.

The newest checkpoint holds the configuration that produced it (``config.yaml`` in the checkpoint
folder; older checkpoints: the run folder's ``config.yaml``). A resumed run is compared with it:

* **refused** (:class:`polyrl.errors.ResumeError`): anything in ``policy`` (the base model, the
  adapter's shape, dtypes), ``run.seed``, ``run.prompts_per_iteration``, ``run.samples_per_prompt``,
  and a ``run.iterations`` at or below the iterations already done. These would make the resumed run
  another run, or do nothing;
* **applied, with a message**: everything else (a new ``optimizer.lr`` replaces the restored one;
  sampler, update and reward settings take effect from the next iteration).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from .checkpoint import latest_checkpoint, read_trainer_json
from .config import RunConfig, _short
from .errors import ResumeError

REFUSED = ("policy", "run.seed", "run.prompts_per_iteration", "run.samples_per_prompt")
IGNORED = ("run.output_dir",)


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out or {prefix[:-1]: {}}
    return {prefix[:-1]: data}


def check_resume(config: RunConfig) -> list[str]:
    """Compare a resumed run's config with its newest checkpoint's. Returns the applied changes as
    messages; raises :class:`ResumeError` naming every refused one."""
    run_dir = Path(config.run.output_dir)
    path = latest_checkpoint(run_dir)
    if path is None:
        from .types import ConfigError

        raise ConfigError(f"--resume: no checkpoint under {str(run_dir / 'checkpoints')!r}")
    meta = read_trainer_json(path)
    done = meta["iteration"]
    stored_file = path / "config.yaml" if (path / "config.yaml").is_file() else run_dir / "config.yaml"
    try:
        stored = yaml.safe_load(stored_file.read_text(encoding="utf-8")) if stored_file.is_file() else None
    except (OSError, ValueError, yaml.YAMLError):
        stored = None
    if "seed" in meta and meta["seed"] != config.run.seed:
        raise ResumeError(
            f"--resume: run.seed={config.run.seed} but the checkpoint was trained with seed {_short(meta['seed'])}; "
            f"a resumed run keeps its seed (start a new run for another seed)"
        )
    nothing_to_do = ResumeError(
        f"--resume: the run has already completed {done} iterations and run.iterations={config.run.iterations}; "
        f"nothing to do. To train further, raise it: `polyrl train --resume {run_dir} run.iterations={done + 10}`"
    )
    if not isinstance(stored, dict):
        if config.run.iterations <= done:
            raise nothing_to_do
        return [f"the checkpoint {path.name} holds no readable config; the resumed config could not be compared"]
    old, new = _flatten(stored), _flatten(config.to_dict())
    refused, applied = [], []
    for key in sorted(set(old) | set(new)):
        if key in IGNORED or old.get(key) == new.get(key):
            continue
        change = f"{key}: {_short(old.get(key, '(unset)'))} -> {_short(new.get(key, '(unset)'))}"
        if any(key == r or key.startswith(r + ".") for r in REFUSED):
            refused.append(change)
        elif key != "run.iterations":
            applied.append(change)
    if refused:
        raise ResumeError(
            f"--resume would change what the checkpoint was trained as ({'; '.join(refused[:5])}"
            f"{'; ...' if len(refused) > 5 else ''}); these cannot change in a resumed run: "
            f"policy, run.seed, run.prompts_per_iteration, run.samples_per_prompt. Start a new run instead"
        )
    if config.run.iterations <= done:
        raise nothing_to_do
    return [f"resumed with a changed setting, applied from iteration {done + 1}: {c}" for c in applied]
