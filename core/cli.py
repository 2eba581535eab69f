"""``polyrl`` command line: ``train``, ``eval``, ``plugins``, ``config``, ``prefetch``, ``export`` and ``push``."""

from __future__ import annotations

import argparse
import json
import sys
from importlib import resources
from pathlib import Path
from typing import Sequence

import yaml

from .config import apply_overrides, field_docs, load_yaml
from .types import ConfigError

COMPONENT_KINDS = ("policy", "sampler", "reward", "update")

DEFAULT_CONFIG = "default.yaml"


def default_config() -> dict:
    """The embedded default run: tiny models from ``assets/``, CPU-friendly, a few minutes."""
    text = resources.files("polyrl").joinpath("defaults", DEFAULT_CONFIG).read_text()
    return yaml.safe_load(text)


def _build_host(plugin_modules: Sequence[str]):
    from .host import Host

    return Host(plugins=plugin_modules)


def cmd_train(args: argparse.Namespace) -> int:
    host = _build_host(args.plugin)
    if args.resume:
        if args.config and "=" not in args.config:
            raise ConfigError("--resume takes the run directory's own config; give overrides only (key=value)")
        run_dir = Path(args.resume)
        data = run_folder_config(run_dir, "--resume")
        overrides = ([args.config] if args.config else []) + list(args.overrides)
        data.setdefault("run", {})["output_dir"] = str(run_dir)
        announce_imports(data, run_dir)
    elif args.config is None or "=" in args.config:
        data = default_config()
        overrides = ([args.config] if args.config else []) + list(args.overrides)
    else:
        data = load_yaml(args.config)
        overrides = list(args.overrides)
    data = apply_overrides(data, overrides)
    cfg = host.build_config(data)
    from .loop import train  # after the config is accepted: a rejected one is reported without loading the loop

    trainer = train(cfg, host, resume=bool(args.resume))
    if trainer.accelerator.is_main_process:
        print(f"polyrl: run finished: {trainer.run_dir} (report: {trainer.run_dir / 'report' / 'index.html'})")
    return 0


def run_folder_config(run_dir: Path, what: str) -> dict:
    """The config of a run folder: its ``config.yaml``, or, if that is missing or unreadable, the
    one saved in its newest checkpoint."""
    from .checkpoint import latest_checkpoint

    if not run_dir.is_dir():
        raise ConfigError(f"{what} {str(run_dir)!r}: no such folder")
    try:
        return load_yaml(run_dir / "config.yaml")
    except ConfigError as first:
        ckpt = latest_checkpoint(run_dir)
        if ckpt is not None and (ckpt / "config.yaml").is_file():
            print(f"polyrl: {first}; using the config saved in {ckpt.name}", file=sys.stderr)
            return load_yaml(ckpt / "config.yaml")
        raise ConfigError(f"{what} {str(run_dir)!r}: {first}; is it a polyrl run directory?") from None


def announce_imports(data: dict, run_dir: Path) -> None:
    """A run folder's config can import code (``plugins:``, ``rewards.*.function``,
    ``trust_remote_code``). Say which, before anything is imported, so that a downloaded run folder
    cannot run code unseen."""
    found = [f"plugin module {m!r}" for m in (data.get("plugins") or []) if isinstance(m, str)]
    for key, section in (data.get("rewards") or {}).items():
        if isinstance(section, dict) and section.get("function"):
            found.append(f"rewards.{key}.function {str(section['function'])[:80]!r}")
    sections = [(part, data.get(part)) for part in ("policy", "sampler", "update")]
    sections += [(f"rewards.{k}", v) for k, v in (data.get("rewards") or {}).items()]
    for part, section in sections:
        if isinstance(section, dict) and section.get("trust_remote_code"):
            found.append(f"{part}.trust_remote_code (the model's own Python code)")
    if found:
        print(f"polyrl: the config of {str(run_dir)!r} imports code: {', '.join(found)}. "
              f"Only continue or evaluate run folders you trust.", file=sys.stderr)


def cmd_eval(args: argparse.Namespace) -> int:
    from .evaluate import evaluate

    announce_imports(run_folder_config(Path(args.run_dir), "eval"), Path(args.run_dir))
    result = evaluate(args.run_dir, samples=args.samples, seed=args.seed, iteration=args.iteration,
                      baseline=not args.no_baseline, batch=args.batch, plugins=tuple(args.plugin),
                      prompts=args.prompts)
    print(json.dumps(result, indent=2))
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from .sample import sample_run

    announce_imports(run_folder_config(Path(args.run_dir), "sample"), Path(args.run_dir))
    out = sample_run(args.run_dir, prompts=args.prompt or None, prompts_file=args.prompts,
                     samples_per_prompt=args.samples_per_prompt, seed=args.seed, iteration=args.iteration,
                     base=args.base, batch=args.batch, out=args.out, plugins=tuple(args.plugin))
    print(f"polyrl: wrote the samples to {out}")
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    host = _build_host(args.plugin)
    info = host.describe()
    for kind in ("sampler", "reward"):  # what samplers put in rollout.outputs, and what rewards read from it
        for name, entry in info["components"].get(kind, {}).items():
            spec = host.registry[kind][name]
            entry["produces" if kind == "sampler" else "reads"] = list(spec.produces if kind == "sampler" else spec.reads)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for p in info["plugins"]:
        dist = f" ({p['distribution']} {p['version']})" if p["distribution"] else ""
        print(f"{p['name']}{dist}: {p['module']}")
        for kind, names in p["components"].items():
            if names:
                plural = "policies" if kind == "policy" else kind + "s"
                print(f"    {plural:9} {', '.join(sorted(names))}")
    samplers = info["components"].get("sampler", {})
    if samplers:
        print("rollout.outputs of each sampler (what rewards can read):")
        for name, entry in samplers.items():
            print(f"    {name:17} {', '.join(entry['produces']) or '(none declared)'}")
    for name, err in info["failed"].items():
        print(f"{name}: FAILED TO LOAD: {err}")
    return 0


def _sections() -> dict[str, type]:
    """The config's own sections (not components), by their key in a run config."""
    from .config import EvalConfig, OptimizerConfig, PromptsConfig, RunSettings

    return {"run": RunSettings, "prompts": PromptsConfig, "optimizer": OptimizerConfig, "eval": EvalConfig}


def _print_fields(cls: type) -> None:
    import dataclasses

    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "(required)")  # type: ignore[misc]
        print(f"  {f.name} = {default!r}\n      {docs.get(f.name, '')}")


def cmd_config(args: argparse.Namespace) -> int:
    """Print the accepted keys of a config section or a component, with their defaults and documentation."""
    kind = args.kind
    sections = _sections()
    if kind in sections:
        if args.name is not None:
            raise ConfigError(f"polyrl config {kind} takes no name (got {args.name!r}); "
                              f"names go with {', '.join(COMPONENT_KINDS)}")
        doc = " ".join((sections[kind].__doc__ or "").strip().split("\n\n")[0].split())  # its first paragraph
        print(f"{kind}: {doc}")
        _print_fields(sections[kind])
        return 0
    if args.name is None:
        raise ConfigError(f"polyrl config {kind} NAME: which {kind}? `polyrl plugins` lists the installed ones")
    host = _build_host(args.plugin)
    spec = host.spec(kind, args.name, f"{kind}")
    print(f"{kind} {spec.name!r} (from {spec.provider}): {spec.description}")
    _print_fields(spec.config_cls)
    return 0


def _config_from_args(args: argparse.Namespace) -> tuple[object, dict]:
    """The host and accepted config of ``CONFIG [overrides]`` (no config: the embedded default)."""
    host = _build_host(args.plugin)
    if args.config is None or "=" in args.config:
        data = default_config()
        overrides = ([args.config] if args.config else []) + list(args.overrides)
    else:
        data = load_yaml(args.config)
        overrides = list(args.overrides)
    return host, host.build_config(apply_overrides(data, overrides))


def cmd_prefetch(args: argparse.Namespace) -> int:
    """Download everything remote a config reads, or list it (``--list``)."""
    from .prefetch import prefetch

    _, cfg = _config_from_args(args)
    return 1 if prefetch(cfg, download=not args.list) and not args.list else 0


def cmd_export(args: argparse.Namespace) -> int:
    from .hub import export_policy

    out = export_policy(args.run_dir, iteration=args.iteration, out=args.out, plugins=tuple(args.plugin),
                        overwrite=args.overwrite)
    print(f"polyrl: exported the policy to {out}")
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from .hub import push_run

    announce_imports(run_folder_config(Path(args.run_dir), "push"), Path(args.run_dir))
    url = push_run(args.run_dir, args.repo, iteration=args.iteration, private=args.private, token=args.token,
                   plugins=tuple(args.plugin), message=args.message)
    print(f"polyrl: pushed to {url}")
    return 0


def cmd_serve_reward(args: argparse.Namespace) -> int:
    """Serve a registered reward over HTTP (see :mod:`polyrl.serve`)."""
    from .serve import main_serve

    return main_serve(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="polyrl", description="RL fine-tuning of generative models through one loop and plugins.")
    parser.add_argument("-p", "--plugin", action="append", default=[], metavar="MODULE",
                        help="load a Python module as a plugin (repeatable)")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="fine-tune a model (no config: the embedded tiny default run)")
    t.add_argument("config", nargs="?", help="YAML run config (omit for the embedded default)")
    t.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. run.iterations=20")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its latest checkpoint")
    t.add_argument("-p", "--plugin", action="append", default=argparse.SUPPRESS, metavar="MODULE")
    t.set_defaults(func=cmd_train)

    p = sub.add_parser("plugins", help="list installed plugins and their components")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("-p", "--plugin", action="append", default=argparse.SUPPRESS, metavar="MODULE")
    p.set_defaults(func=cmd_plugins)

    e = sub.add_parser("eval", help="score a run's trained policy (and its base model) on fixed prompts and seeds")
    e.add_argument("run_dir")
    e.add_argument("--samples", type=int, default=32, help="number of samples (prompts are cycled)")
    e.add_argument("--seed", type=int, default=0, help="seed of the sampling noise")
    e.add_argument("--iteration", type=int, default=None, help="checkpoint to load (default: latest)")
    e.add_argument("--batch", type=int, default=16, help="samples per sampling batch")
    e.add_argument("--no-baseline", action="store_true", help="skip the base model")
    e.add_argument("--prompts", metavar="FILE", default=None,
                   help="held-out prompts: a text file (one per line) or JSONL (default: the run's prompts)")
    e.add_argument("-p", "--plugin", action="append", default=argparse.SUPPRESS, metavar="MODULE")
    e.set_defaults(func=cmd_eval)

    sm = sub.add_parser("sample", help="draw samples from a run's trained policy (or its base model) for given prompts")
    sm.add_argument("run_dir")
    sm.add_argument("prompt", nargs="*", help="prompts (default: --prompts FILE, else the run's own)")
    sm.add_argument("--prompts", metavar="FILE", default=None, help="a text file (one prompt per line) or JSONL")
    sm.add_argument("-n", "--samples-per-prompt", type=int, default=4)
    sm.add_argument("--seed", type=int, default=0, help="seed of the sampling noise")
    sm.add_argument("--iteration", type=int, default=None, help="checkpoint to load (default: latest)")
    sm.add_argument("--base", action="store_true", help="sample the model the run started from")
    sm.add_argument("--batch", type=int, default=16, help="samples per sampling batch")
    sm.add_argument("--out", default=None, help="folder to write (default: RUN_DIR/samples/iter_NNNNNN-seedS)")
    sm.add_argument("-p", "--plugin", action="append", default=argparse.SUPPRESS, metavar="MODULE")
    sm.set_defaults(func=cmd_sample)

    c = sub.add_parser("config", help="show the settings of a config section or a component, with their documentation")
    c.add_argument("kind", choices=[*COMPONENT_KINDS, *_sections()],
                   help="a component kind (then its NAME) or a section of the run config")
    c.add_argument("name", nargs="?", help="the component's name (`polyrl plugins` lists them)")
    c.set_defaults(func=cmd_config)

    f = sub.add_parser("prefetch", help="download every remote model and file a config reads (then train offline)")
    f.add_argument("config", nargs="?", help="YAML run config (omit for the embedded default)")
    f.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    f.add_argument("--list", action="store_true", help="only list them, and where each goes")
    f.add_argument("-p", "--plugin", action="append", default=argparse.SUPPRESS, metavar="MODULE")
    f.set_defaults(func=cmd_prefetch)

    x = sub.add_parser("export", help="write a checkpoint's policy as a folder the ecosystem loads")
    x.add_argument("run_dir")
    x.add_argument("--iteration", type=int, default=None, help="checkpoint to export (default: latest)")
    x.add_argument("--out", default=None, help="folder to write (default: RUN_DIR/export/iter_NNNNNN)")
    x.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    x.add_argument("-p", "--plugin", action="append", default=argparse.SUPPRESS, metavar="MODULE")
    x.set_defaults(func=cmd_export)

    h = sub.add_parser("push", help="upload a run's policy with a model card to a Hub repository")
    h.add_argument("run_dir")
    h.add_argument("--repo", required=True, help="Hub repository id, owner/name (created if missing)")
    h.add_argument("--iteration", type=int, default=None, help="checkpoint to push (default: latest)")
    h.add_argument("--private", action="store_true", help="create the repository as private")
    h.add_argument("--token", default=None, help="Hub token (default: the logged-in one, or $HF_TOKEN)")
    h.add_argument("--message", default=None, help="commit message")
    h.add_argument("-p", "--plugin", action="append", default=argparse.SUPPRESS, metavar="MODULE")
    h.set_defaults(func=cmd_push)

    s = sub.add_parser("serve-reward", help="serve a reward over HTTP for runs that use the 'remote' reward")
    s.add_argument("name", help="a registered reward (polyrl plugins lists them)")
    s.add_argument("overrides", nargs="*", help="the reward's settings as key=value, e.g. head=path/to/head.pth")
    s.add_argument("--config", metavar="YAML", help="a file with the reward's settings (overrides apply on top)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0: all)")
    s.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free port)")
    s.add_argument("--token", default=None, help="bearer token required from clients (default: $POLYRL_REWARD_TOKEN)")
    s.add_argument("--token-env", default="POLYRL_REWARD_TOKEN", help=argparse.SUPPRESS)
    s.add_argument("--device", default=None, help="device of the reward's model (default: cuda if present, else cpu)")
    s.add_argument("--max-batch-size", type=int, default=64, help="most samples per reward call (default 64)")
    s.add_argument("--max-request-samples", type=int, default=None,
                   help="most samples per request (default: --max-batch-size)")
    s.add_argument("--batch-window-ms", type=float, default=5.0,
                   help="how long a request waits for others to be scored with it (default 5)")
    s.add_argument("--image-size", type=int, nargs="+", metavar="N", default=None,
                   help="accept only images of this size: one side (square) or H W")
    s.add_argument("-p", "--plugin", action="append", default=argparse.SUPPRESS, metavar="MODULE")
    s.set_defaults(func=cmd_serve_reward)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from .atomic import DiskFullError
    from .errors import PolyrlError, RunStopped

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, PolyrlError, DiskFullError) as e:
        if args.debug:
            raise
        text = " ".join(str(e.strerror if isinstance(e, DiskFullError) else e).split())
        print(f"polyrl: error: {text}", file=sys.stderr)
        return 2
    except RunStopped as e:
        return 128 + e.signum
    except KeyboardInterrupt:
        print("polyrl: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
