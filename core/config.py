"""Run configuration: YAML mapped onto typed dataclasses and checked before any model loads.

A run configuration has a few fixed sections (``run``, ``prompts``, ``optimizer``) and four
component sections. Each component section names the component (``name:``) and holds the fields
of that component's own config dataclass::

    policy:   {name: diffusion, pretrained: assets/tiny-sd, lora_rank: 4}
    sampler:  {name: ddim, num_steps: 10, eta: 1.0}
    rewards:
      jpeg_compressibility: {weight: 1.0}
    update:   {name: ddpo, clip_range: 1.0e-4}

Dotted overrides (``policy.lora_rank=8``) are applied to the raw mapping first; then every key is
checked against the dataclasses, and unknown keys, wrong types and unknown names are reported with
their path, the accepted values and the nearest name.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import difflib
import types
import typing
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal


from .types import ConfigError

__all__ = [
    "RunSettings",
    "PromptsConfig",
    "OptimizerConfig",
    "ComponentConfig",
    "RewardConfig",
    "RunConfig",
    "EvalConfig",
    "parse_overrides",
    "apply_overrides",
    "load_yaml",
    "from_dict",
    "to_dict",
    "suggest",
]


# ---------------------------------------------------------------------------------- sections
@dataclass
class RunSettings:
    """Loop-level settings."""

    iterations: int = 10
    """Number of RL iterations (sample, reward, update)."""
    prompts_per_iteration: int = 4
    """Distinct prompts drawn per iteration on each process."""
    samples_per_prompt: int = 1
    """Samples generated per prompt (the group size ``G`` of group methods)."""
    seed: int = 0
    """Seed for everything: prompt order, sampling noise, update shuffles, dropout."""
    sample_batches: int = 1
    """Sample each iteration's prompts in this many batches (bounds sampling memory; with
    ``async_rewards`` a batch's rewards are computed while the next batch samples)."""
    async_rewards: bool = False
    """Compute rewards in a background thread, overlapping the sampling of the next batch."""
    output_dir: str = "runs/polyrl"
    """Run directory: resolved config, metrics.jsonl, checkpoints and report. ``{time}`` is
    replaced by the start time (``20260101-120000``)."""
    save_every: int = 5
    """Write a checkpoint every this many iterations (and always at the end)."""
    keep_checkpoints: int = 2
    """How many periodic checkpoints to keep (older ones are deleted)."""
    mixed_precision: Literal["no", "fp16", "bf16", False] = "no"
    """accelerate mixed precision for the trainable forward passes (``no``: full precision; an
    unquoted ``no``, which YAML reads as false, means the same)."""
    cpu: bool = False
    """Force the CPU even when a GPU is present."""
    threads: int = 0
    """CPU threads each process uses for its tensor operations (``torch.set_num_threads``); 0
    keeps PyTorch's default, one per core. On a machine shared with other jobs, or with several
    processes per machine, set it to (free cores / processes): more threads than free cores
    makes every step slower, not faster."""
    report: bool = True
    """Write report.html with reward curves and samples at the end of the run."""
    report_every: int = 0
    """Also record fixed-seed samples for the report every this many iterations (0: first and last)."""
    progress: bool = True
    """Show a progress bar (main process only)."""
    tf32: bool = False
    """Allow TensorFloat-32 matmuls and convolutions on NVIDIA GPUs (Ampere and later): float32
    math at about bf16 speed with a 10-bit mantissa in the products. No effect on CPUs."""
    update_snapshot: Literal["auto", "memory", "none"] = "auto"
    """How a failure during the update keeps the run resumable. ``memory``: copy the trainable
    weights and the optimizer and update states before each update (about 3x the trainable
    weights), so that any failure saves the state before it. ``none``: no copy; a failure before
    the update's first optimizer step still saves that state, a later one leaves the newest
    periodic checkpoint (``save_every``). ``auto``: ``memory`` up to 50 M trainable parameters
    (adapters, small models), ``none`` above (full fine-tunes of large models)."""
    log_with: list[str] | str = field(default_factory=list)
    """Experiment trackers that receive every iteration's metrics and the report's fixed-seed
    samples: any of ``tensorboard`` (event files under ``RUN_DIR/logs/``), ``wandb`` (offline with
    ``WANDB_MODE=offline``), ``trackio``; a name, a list, or ``none``. wandb and trackio are
    optional packages (``pip install wandb``)."""

    def __post_init__(self) -> None:
        if self.mixed_precision is False:  # YAML 1.1 reads an unquoted `no` as false
            self.mixed_precision = "no"
        elif not isinstance(self.mixed_precision, str):
            raise ConfigError(f"run.mixed_precision: {_short(self.mixed_precision)} is not accepted; choose one of "
                              f"['no', 'fp16', 'bf16']")

    def check(self) -> None:
        for name in ("iterations", "prompts_per_iteration", "samples_per_prompt", "save_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ConfigError(f"run.{name} must be >= 1, got {getattr(self, name)}")
        for name, most in (("iterations", 10**9), ("prompts_per_iteration", 10**6), ("samples_per_prompt", 10**4),
                           ("sample_batches", 10**6), ("save_every", 10**9), ("keep_checkpoints", 10**4)):
            if getattr(self, name) > most:
                raise ConfigError(f"run.{name}={getattr(self, name)} is out of range; accepted: 1 to {most}")
        if self.batch_size > 10**6:
            raise ConfigError(
                f"run.prompts_per_iteration * run.samples_per_prompt = {self.batch_size} samples per iteration; "
                f"accepted: at most 1000000"
            )
        if not 0 <= self.seed < 2**63:
            raise ConfigError(f"run.seed={_short(self.seed)} is out of range; accepted: 0 to 2**63 - 1")
        if not self.output_dir.strip():
            raise ConfigError("run.output_dir is empty; give a folder for the run (e.g. runs/my-run)")
        out = Path(self.output_dir)
        if out.exists() and not out.is_dir():
            raise ConfigError(f"run.output_dir {_short(self.output_dir)}: a file is in the way; choose a folder path")
        if self.sample_batches < 1 or self.prompts_per_iteration % self.sample_batches:
            raise ConfigError(
                f"run.sample_batches={self.sample_batches} must divide run.prompts_per_iteration="
                f"{self.prompts_per_iteration}; accepted: "
                f"{[d for d in range(1, self.prompts_per_iteration + 1) if self.prompts_per_iteration % d == 0]}"
            )
        if self.report_every < 0:
            raise ConfigError(f"run.report_every must be >= 0, got {self.report_every}")
        if not 0 <= self.threads <= 4096:
            raise ConfigError(f"run.threads={self.threads} is out of range; accepted: 0 (PyTorch's default) to 4096")
        from .trackers import check_installed, normalise

        self.log_with = normalise(self.log_with)
        check_installed(self.log_with)

    @property
    def batch_size(self) -> int:
        """Samples per process per iteration (``B``)."""
        return self.prompts_per_iteration * self.samples_per_prompt


@dataclass
class PromptsConfig:
    """Where prompts come from. Exactly one of ``items``, ``file`` and ``dataset``."""

    items: list[str] | None = None
    """Prompts written inline."""
    file: str | None = None
    """A text file (one prompt per line) or a JSONL file (``prompt_column``; other columns go to
    rewards as ``Context.extra``)."""
    dataset: str | None = None
    """A dataset: a ``.jsonl`` / ``.json`` / ``.csv`` file, a folder holding ``<split>.jsonl``
    (``.json``, ``.csv``), a folder saved by ``datasets``' ``save_to_disk`` or holding parquet /
    arrow files, or a Hub dataset id (``owner/name``, read with ``datasets.load_dataset``; run
    ``polyrl prefetch`` to have it offline). Folders and Hub ids need the ``datasets`` package.
    Other columns go to rewards as ``Context.extra``."""
    dataset_config: str | None = None
    """The configuration (subset) of a Hub dataset or datasets folder that has several
    (``datasets.load_dataset(..., name=)``); ``null`` for its default."""
    prompt_column: str = "prompt"
    """The column that holds the prompt (JSONL files and datasets)."""
    split: str = "train"
    """The split to read from a dataset with several splits (a folder or a Hub dataset)."""
    shuffle: bool = True
    """Draw prompts in a seeded random order (without replacement within an epoch)."""

    def check(self) -> None:
        if sum(x is not None for x in (self.items, self.file, self.dataset)) != 1:
            raise ConfigError(
                "prompts: give exactly one of prompts.items (a list), prompts.file (a path) and prompts.dataset (a path)"
            )
        if self.items is not None and len(self.items) == 0:
            raise ConfigError("prompts.items is empty")
        from .paths import resolve_path

        if self.file is not None:
            if not Path(resolve_path(self.file)).is_file():
                raise ConfigError(f"prompts.file: no such file {self.file!r}")
        if self.dataset is not None:
            from .prompts import check_dataset

            check_dataset(self)  # raises ConfigError naming what is wrong


@dataclass
class OptimizerConfig:
    """AdamW over the policy's trainable parameters."""

    lr: float = 3e-4
    """Learning rate."""
    weight_decay: float = 1e-4
    """AdamW weight decay."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.999
    """AdamW beta2."""
    eps: float = 1e-8
    """AdamW epsilon."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this before each optimizer step (<= 0 disables)."""
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    """Learning-rate schedule over iterations after the warm-up (decaying to 0 at the last)."""
    warmup_iterations: int = 0
    """Iterations of linear warm-up from 0 to ``lr``."""
    implementation: Literal["torch", "fused", "8bit"] = "torch"
    """Which AdamW: ``torch`` (``torch.optim.AdamW``), ``fused`` (its single-kernel form, same
    update, faster on GPUs), ``8bit`` (bitsandbytes' block-wise 8-bit moments: 2 instead of 8
    bytes of optimizer state per trained weight, for full fine-tunes of large models; ``pip install
    'polyrl[bnb]'``)."""

    def check(self) -> None:
        if not 0 < self.lr <= 10:
            raise ConfigError(f"optimizer.lr must be > 0 and at most 10, got {self.lr}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"optimizer.{name} must be in [0, 1), got {getattr(self, name)}")
        if not self.eps > 0:
            raise ConfigError(f"optimizer.eps must be > 0, got {self.eps}")
        if not self.weight_decay >= 0:
            raise ConfigError(f"optimizer.weight_decay must be >= 0, got {self.weight_decay}")
        if self.warmup_iterations < 0:
            raise ConfigError(f"optimizer.warmup_iterations must be >= 0, got {self.warmup_iterations}")
        from .optim import check_implementation

        check_implementation(self.implementation)

    def lr_factor(self, iterations: int):
        """The multiplier of ``lr`` after ``k`` completed iterations (for ``LambdaLR``)."""
        import math

        warmup, schedule = self.warmup_iterations, self.lr_schedule

        def factor(k: int) -> float:
            if k < warmup:
                return (k + 1) / (warmup + 1)
            if schedule == "constant":
                return 1.0
            progress = min(1.0, (k - warmup) / max(1, iterations - warmup))
            return 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))

        return factor


@dataclass
class ComponentConfig:
    """A selected component and its own (typed) config."""

    name: str
    params: Any = None


@dataclass
class RewardConfig:
    """A selected reward, its weight in the total, and its own config."""

    name: str
    key: str
    weight: float = 1.0
    params: Any = None


@dataclass
class EvalConfig:
    """Held-out evaluation, the guard against reward hacking: every ``every`` iterations, fixed
    prompts are sampled with fixed noise and scored with evaluation rewards that the update never
    sees; each is logged as ``eval/<name>`` (and ``eval/reward_mean``, their weighted sum). A trained
    reward that rises while the evaluation rewards fall is reward hacking made visible.

    ``rewards`` (required) has the shape of the top-level ``rewards`` section."""

    every: int = 5
    """Evaluate after every this many iterations (and after the last)."""
    samples: int = 16
    """Samples per evaluation, over all processes (prompts are cycled)."""
    seed: int = 1234
    """Seed of the evaluation's sampling noise (the same at every evaluation)."""
    batch: int = 16
    """Samples per sampling call."""
    prompts: PromptsConfig | None = None
    """Held-out prompts (same keys as the top-level ``prompts``); default: the training prompts."""
    rewards: list[RewardConfig] = field(default_factory=list, init=False)
    """The evaluation rewards, filled in from the ``eval.rewards`` mapping."""

    def check(self) -> None:
        for name, most in (("every", 10**9), ("samples", 10**6), ("batch", 10**6)):
            if not 1 <= getattr(self, name) <= most:
                raise ConfigError(f"eval.{name} must be between 1 and {most}, got {getattr(self, name)}")
        if not 0 <= self.seed < 2**63:
            raise ConfigError(f"eval.seed={_short(self.seed)} is out of range; accepted: 0 to 2**63 - 1")


@dataclass
class RunConfig:
    """A whole, validated run configuration."""

    run: RunSettings
    prompts: PromptsConfig
    optimizer: OptimizerConfig
    policy: ComponentConfig
    sampler: ComponentConfig
    update: ComponentConfig
    rewards: list[RewardConfig]
    plugins: list[str] = field(default_factory=list)
    eval: EvalConfig | None = None

    def to_dict(self) -> dict[str, Any]:
        """The plain mapping that, fed back to :func:`polyrl.host.Host.build_config`, gives this config."""
        comp = lambda c: {"name": c.name, **(to_dict(c.params) or {})}  # noqa: E731
        return {
            "run": to_dict(self.run),
            "prompts": to_dict(self.prompts),
            "optimizer": to_dict(self.optimizer),
            "policy": comp(self.policy),
            "sampler": comp(self.sampler),
            "update": comp(self.update),
            "rewards": _rewards_dict(self.rewards),
            "plugins": list(self.plugins),
            **({"eval": {**to_dict(self.eval), "rewards": _rewards_dict(self.eval.rewards)}} if self.eval else {}),
        }


def _rewards_dict(rewards: list[RewardConfig]) -> dict[str, Any]:
    return {
        r.key: {**({"name": r.name} if r.name != r.key else {}), "weight": r.weight, **(to_dict(r.params) or {})}
        for r in rewards
    }


# ---------------------------------------------------------------------------------- helpers
def _short(value: Any, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters (config messages never echo whole values)."""
    try:
        text = repr(value)
    except RecursionError:
        text = f"<{type(value).__name__} nested too deeply>"
    return text if len(text) <= limit else text[: limit - 20] + f"... ({len(text)} characters)"


def suggest(name: str, choices: typing.Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the nearest choice, or an empty string."""
    close = difflib.get_close_matches(str(name), list(choices), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A config file as a mapping (bounded, strict YAML: see :mod:`polyrl.safeyaml`)."""
    from . import safeyaml

    p = Path(path)
    if not p.exists():
        raise ConfigError(f"config file not found: {str(path)!r}")
    data = safeyaml.load_file(p, "config") or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    return data


def parse_overrides(items: typing.Sequence[str]) -> list[tuple[list[str], Any]]:
    """Parse ``a.b.c=value`` strings; values are read as YAML scalars (``1e-4``, ``true``, ``[a, b]``)."""
    out = []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {_short(item)} is not of the form dotted.key=value")
        key, raw = item.split("=", 1)
        if not key or any(not k for k in key.split(".")):
            raise ConfigError(f"override {_short(item)}: empty key")
        from . import safeyaml

        try:
            value = safeyaml.loads(raw, f"override {key}") if raw != "" else ""
        except ConfigError as e:
            raise ConfigError(f"override {_short(item)}: cannot read the value: {e}") from None
        out.append((key.split("."), value))
    return out


def apply_overrides(data: dict[str, Any], overrides: typing.Sequence[str]) -> dict[str, Any]:
    data = copy.deepcopy(data)
    for keys, value in parse_overrides(overrides):
        node = data
        for k in keys[:-1]:
            if not isinstance(node.get(k), dict):
                node[k] = {} if node.get(k) is None else node[k]
                if not isinstance(node[k], dict):
                    raise ConfigError(f"override {'.'.join(keys)}: {k!r} is not a section")
            node = node[k]
        node[keys[-1]] = value
    return data


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        args = typing.get_args(tp)
        return f"{origin.__name__}[{_type_name(args[0])}]" if args else origin.__name__
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{path}: {_short(value)} is not accepted; choose one of {list(allowed)}{suggest(str(value)[:100], map(str, allowed))}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(value, a, path)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(f"{path}: expected {_type_name(tp)}, got {_short(value)}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list ({_type_name(tp)}), got {_short(value)}")
        args = typing.get_args(tp)
        inner = args[0] if args else Any
        items = [_convert(v, inner, f"{path}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {_short(value)}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {_short(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {_short(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            # YAML reads 1e-4 (no dot) as a string; accept it when it parses
            number = None
            if isinstance(value, str) and len(value) < 64:
                try:
                    number = float(value)
                except ValueError:
                    pass
            if number is None:
                raise ConfigError(f"{path}: expected a number, got {_short(value)}")
            value = number
        try:
            value = float(value)
        except OverflowError:
            raise ConfigError(f"{path}: {_short(value)} is too large for a number") from None
        if not math.isfinite(value):
            raise ConfigError(f"{path}: expected a finite number, got {value}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {_short(value)}")
        return value
    raise TypeError(f"{path}: unsupported config field type {tp!r}")


def from_dict(cls: type, data: Any, path: str) -> Any:
    """Build dataclass ``cls`` from a mapping, checking every key and type. ``path`` prefixes errors."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping, got {_short(data)}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls) if f.init}
    for key in data:
        if key not in known:
            raise ConfigError(
                f"{path}.{_short(key, 80)[1:-1] if isinstance(key, str) else _short(key)}: unknown key"
                f"{suggest(str(key)[:100], known)}; accepted keys: {sorted(known)}"
            )
    kwargs = {}
    for name, f in known.items():
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], f"{path}.{name}")
        elif f.default is MISSING and f.default_factory is MISSING:  # type: ignore[misc]
            raise ConfigError(f"{path}.{name}: required ({_type_name(hints[name])})")
    obj = cls(**kwargs)
    check = getattr(obj, "check", None)
    if callable(check) and _check_takes_no_args(check):
        check()
    return obj


def _check_takes_no_args(fn: Any) -> bool:
    import inspect

    try:
        return len(inspect.signature(fn).parameters) == 0
    except (TypeError, ValueError):
        return False


def to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in fields(obj) if f.init}
    if isinstance(obj, tuple):
        return [to_dict(v) for v in obj]
    if isinstance(obj, list):
        return [to_dict(v) for v in obj]
    return obj


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a config dataclass (read from its source), including the
    fields it inherits: the classes of its MRO are read base first, so a subclass's docstring of a
    field it redeclares wins."""
    import ast
    import inspect
    import textwrap

    docs: dict[str, str] = {}
    for klass in reversed(getattr(cls, "__mro__", (cls,))):
        if klass is object:
            continue
        try:
            src = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        tree = ast.parse(src)
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for a, b in zip(body, body[1:]):
            if isinstance(a, ast.AnnAssign) and isinstance(a.target, ast.Name):
                if isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant) and isinstance(b.value.value, str):
                    docs[a.target.id] = " ".join(b.value.value.split())
    return docs
