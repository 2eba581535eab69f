"""Sharing a run: ``polyrl export`` (a policy folder from any checkpoint) and ``polyrl push``
(that folder, with a model card, to a Hugging Face Hub repository).

An exported folder is what the policy's ``save_pretrained`` writes: a peft adapter or a whole
transformers model for the text policies, ``pytorch_lora_weights.safetensors`` or a ``unet/``
folder for the diffusion ones. ``push`` adds ``README.md``: the base model, the algorithm and
rewards, the config the run used, the rewards at the first and last iteration, and the report's
reward curve when the run has one.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import yaml

from .checkpoint import checkpoint_path, checkpoints, latest_checkpoint, load_checkpoint
from .types import ConfigError

__all__ = ["export_policy", "model_card", "push_run"]


def _run_config(run_dir: Path, ckpt: Path) -> dict[str, Any]:
    from .config import load_yaml

    for path in (ckpt / "config.yaml", run_dir / "config.yaml"):
        if path.is_file():
            return load_yaml(path)
    raise ConfigError(f"{str(run_dir)!r}: no config.yaml in the run folder or its checkpoint; is it a polyrl run folder?")


def _checkpoint(run_dir: Path, iteration: int | None) -> Path:
    if not run_dir.is_dir():
        raise ConfigError(f"{str(run_dir)!r}: no such run folder")
    if iteration is None:
        ckpt = latest_checkpoint(run_dir)
        if ckpt is None:
            raise ConfigError(f"{str(run_dir)!r} holds no checkpoint (checkpoints/iter_NNNNNN); is it a polyrl run folder?")
        return ckpt
    ckpt = checkpoint_path(run_dir, iteration)
    if not (ckpt / "trainer.json").is_file():
        have = [i for i, _ in checkpoints(run_dir)]
        raise ConfigError(f"--iteration {iteration}: {str(run_dir)!r} has no checkpoint of that iteration; it has {have}")
    return ckpt


def export_policy(run_dir: str | Path, iteration: int | None = None, out: str | Path | None = None,
                  plugins: tuple[str, ...] = (), overwrite: bool = False) -> Path:
    """Write the policy of checkpoint ``iteration`` (default: the latest) of ``run_dir`` as a
    folder the ecosystem loads (the policy's ``save_pretrained``). ``out`` defaults to
    ``RUN_DIR/export/iter_NNNNNN``. Returns the folder."""
    from .host import Host

    run_dir = Path(run_dir)
    ckpt = _checkpoint(run_dir, iteration)
    out = Path(out) if out is not None else run_dir / "export" / ckpt.name
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"--out {str(out)!r} exists and is not empty; choose another folder or remove it")
    host = Host(plugins=plugins)
    cfg = host.build_config(_run_config(run_dir, ckpt))
    state = load_checkpoint(ckpt)
    policy = host.build_policy(cfg)
    policy.load_trainable_state_dict(state["trainable"])
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    policy.save_pretrained(str(tmp))
    (tmp / "polyrl.json").write_text(json.dumps({
        "iteration": state["trainer"]["iteration"], "policy": cfg.policy.name,
        "base": getattr(cfg.policy.params, "pretrained", None),
    }, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp.replace(out)
    return out


def _metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("iteration"), int):
            rows.append(row)
    return rows


def model_card(run_dir: str | Path, config: dict[str, Any], iteration: int, repo_id: str, has_curve: bool) -> str:
    """The ``README.md`` of a pushed policy: what was trained, how, on what rewards, and how it went."""
    run_dir = Path(run_dir)
    policy, update = config.get("policy") or {}, config.get("update") or {}
    rewards = config.get("rewards") or {}
    base = policy.get("pretrained")
    rows = [r for r in _metrics(run_dir) if r["iteration"] <= iteration]
    keys = ["reward_mean"] + sorted(k for k in (rows[-1] if rows else {}) if k.startswith("reward/"))
    lines = ["---", "library_name: " + ("peft" if policy.get("lora_rank") and policy.get("name") not in ("diffusion", "lcm")
                                         else "diffusers" if policy.get("name") in ("diffusion", "lcm") else "transformers")]
    if isinstance(base, str) and "/" in base and not Path(base).exists():
        lines.append(f"base_model: {base}")
    lines += ["tags:", "  - polyrl", "  - reinforcement-learning", f"  - {update.get('name', 'rl')}", "---", "",
              f"# {repo_id.split('/')[-1]}", "",
              f"Policy `{policy.get('name')}` fine-tuned from `{base}` with `{update.get('name')}` by polyrl, "
              f"{iteration} iteration{'s' if iteration != 1 else ''}.", "",
              "## Rewards", ""]
    for key, section in rewards.items():
        section = section if isinstance(section, dict) else {}
        lines.append(f"- `{key}`" + (f" ({section['name']})" if section.get("name") else "")
                     + f", weight {section.get('weight', 1.0)}")
    if rows:
        lines += ["", "| | first iteration | last iteration |", "|---|---|---|"]
        for k in keys:
            first, last = rows[0].get(k), rows[-1].get(k)
            if isinstance(first, (int, float)) and isinstance(last, (int, float)):
                lines.append(f"| {k} | {first:.4g} | {last:.4g} |")
    if has_curve:
        lines += ["", "![reward curve](reward.png)"]
    lines += ["", "## Config", "", "```yaml", yaml.safe_dump(config, sort_keys=False).rstrip(), "```", ""]
    return "\n".join(lines)


def push_run(run_dir: str | Path, repo_id: str, iteration: int | None = None, private: bool = False,
             token: str | None = None, plugins: tuple[str, ...] = (), message: str | None = None) -> str:
    """Export checkpoint ``iteration`` (default: the latest) of ``run_dir``, write its model card and
    upload both to the Hub model repository ``repo_id`` (created if needed). ``HF_ENDPOINT``
    chooses the Hub server. Returns the URL of the commit."""
    from huggingface_hub import HfApi
    from huggingface_hub import errors as hub

    from .paths import _network_errors

    run_dir = Path(run_dir)
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ConfigError(f"--repo {repo_id!r}: expected a Hub repository id of the form owner/name")
    ckpt = _checkpoint(run_dir, iteration)
    folder = export_policy(run_dir, iteration=int(ckpt.name[len("iter_"):]), out=run_dir / "export" / ckpt.name,
                           plugins=plugins, overwrite=True)
    config = _run_config(run_dir, ckpt)
    curve = run_dir / "report" / "reward.png"
    if curve.is_file():
        shutil.copyfile(curve, folder / "reward.png")
    done = int(json.loads((folder / "polyrl.json").read_text())["iteration"])
    (folder / "README.md").write_text(model_card(run_dir, config, done, repo_id, curve.is_file()))
    (folder / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None, token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=str(folder),
                                 commit_message=message or f"polyrl: {ckpt.name} of {run_dir.name}")
    except hub.LocalTokenNotFoundError:
        raise ConfigError("push: not logged in to the Hub; run `hf auth login` or set HF_TOKEN (or pass --token)") from None
    except hub.HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status in (401, 403):
            raise ConfigError(f"push: the Hub refused {repo_id!r} ({status}): the token cannot write there; log in "
                              f"with a write token (`hf auth login`) or choose a repository you own") from None
        raise ConfigError(f"push: the Hub refused the upload to {repo_id!r}: {' '.join(str(e).split())[:300]}") from None
    except (OSError, *_network_errors()) as e:
        raise ConfigError(f"push: cannot reach the Hub ({type(e).__name__}: {' '.join(str(e).split())[:200]}); the "
                          f"exported folder is {folder}, upload it later with `polyrl push` or `hf upload {repo_id} "
                          f"{folder}`") from None
    return str(getattr(info, "commit_url", info))
