"""The plugin host: discovers plugins, collects their components, validates run configs.

Built-in plugins are registered through the same ``polyrl`` entry-point group as external ones.
A plugin that fails to import is reported with a warning naming it, and the rest still load.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import time
import warnings
from dataclasses import dataclass
from typing import Any, Iterable

import pluggy

from . import hookspecs
from .config import (
    ComponentConfig,
    OptimizerConfig,
    PromptsConfig,
    RewardConfig,
    RunConfig,
    RunSettings,
    from_dict,
    suggest,
)
from .types import ComponentSpec, ConfigError

ENTRY_POINT_GROUP = "polyrl"
KINDS = ("policy", "sampler", "reward", "update")
_HOOK_OF_KIND = {
    "policy": "polyrl_policies",
    "sampler": "polyrl_samplers",
    "reward": "polyrl_rewards",
    "update": "polyrl_updates",
}


class PluginLoadWarning(UserWarning):
    """A plugin could not be loaded; the others were."""


@dataclass
class PluginInfo:
    name: str
    module: str
    distribution: str | None
    version: str | None


class Host:
    """A plugin manager plus the registry of components the plugins provide."""

    def __init__(self, plugins: Iterable[str] = (), entry_points: bool = True) -> None:
        self.pm = pluggy.PluginManager("polyrl")
        self.pm.add_hookspecs(hookspecs)
        self.plugins: dict[str, PluginInfo] = {}
        self.failed: dict[str, str] = {}
        from . import defaults_plugin

        self.pm.register(defaults_plugin, name="polyrl.defaults")
        if entry_points:
            self._load_entry_points()
        for mod in plugins:
            self.load_module(mod)
        self._registry: dict[str, dict[str, ComponentSpec]] | None = None

    # ------------------------------------------------------------------ discovery
    def _load_entry_points(self) -> None:
        for ep in sorted(md.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            dist = getattr(ep, "dist", None)
            dist_name = dist.metadata["Name"] if dist is not None else None
            if ep.name in self.plugins:
                continue
            try:
                obj = ep.load()
            except Exception as e:  # noqa: BLE001 - any import failure of a third-party plugin
                msg = f"{type(e).__name__}: {e}"
                self.failed[ep.name] = msg
                warnings.warn(
                    f"polyrl plugin {ep.name!r} ({ep.value}, from {dist_name or 'unknown distribution'}) "
                    f"failed to load and is skipped: {msg}",
                    PluginLoadWarning,
                    stacklevel=2,
                )
                continue
            self._register(obj, ep.name, ep.value, dist_name, dist.version if dist is not None else None)

    def load_module(self, module: str) -> None:
        """Register a module (``-p package.module`` or a ``plugins:`` entry of a config)."""
        if module in self.plugins:
            return
        try:
            obj = importlib.import_module(module)
        except Exception as e:  # noqa: BLE001
            raise ConfigError(f"plugin module {module!r} could not be imported: {type(e).__name__}: {e}") from e
        self._register(obj, module, module, None, None)
        self._registry = None

    def register(self, obj: Any, name: str) -> None:
        """Register an in-process plugin object (a module or an instance with hookimpls)."""
        self._register(obj, name, getattr(obj, "__name__", repr(obj)), None, None)
        self._registry = None

    def _register(self, obj: Any, name: str, module: str, dist: str | None, version: str | None) -> None:
        if self.pm.is_registered(obj):
            return
        self.pm.register(obj, name=name)
        self.plugins[name] = PluginInfo(name, module, dist, version)

    # ------------------------------------------------------------------ registry
    @property
    def registry(self) -> dict[str, dict[str, ComponentSpec]]:
        if self._registry is None:
            self._registry = self._collect()
        return self._registry

    def _collect(self) -> dict[str, dict[str, ComponentSpec]]:
        reg: dict[str, dict[str, ComponentSpec]] = {k: {} for k in KINDS}
        for kind, hook_name in _HOOK_OF_KIND.items():
            hook = getattr(self.pm.hook, hook_name)
            for impl in hook.get_hookimpls():
                specs = impl.function() or []
                for spec in specs:
                    if not isinstance(spec, ComponentSpec):
                        raise TypeError(f"plugin {impl.plugin_name!r}: {hook_name}() must return ComponentSpec objects, got {spec!r}")
                    spec.provider = impl.plugin_name
                    if spec.name in reg[kind]:
                        other = reg[kind][spec.name].provider
                        raise ConfigError(
                            f"two plugins provide a {kind} named {spec.name!r}: {other!r} and {spec.provider!r}; "
                            f"uninstall or rename one of them"
                        )
                    reg[kind][spec.name] = spec
        return reg

    def spec(self, kind: str, name: Any, path: str) -> ComponentSpec:
        available = self.registry[kind]
        if not isinstance(name, str) or name not in available:
            raise ConfigError(
                f"{path}: unknown {kind} {name!r}{suggest(str(name), available)}; available: {sorted(available)}"
            )
        return available[name]

    def plugin_versions(self) -> dict[str, dict[str, Any]]:
        return {
            n: {"module": p.module, "distribution": p.distribution, "version": p.version}
            for n, p in self.plugins.items()
        }

    def describe(self) -> dict[str, Any]:
        """What ``polyrl plugins --json`` prints."""
        out: dict[str, Any] = {"plugins": [], "failed": dict(self.failed)}
        by_provider: dict[str, dict[str, list[str]]] = {}
        for kind, specs in self.registry.items():
            for spec in specs.values():
                by_provider.setdefault(spec.provider, {k: [] for k in KINDS})[kind].append(spec.name)
        for name, info in self.plugins.items():
            out["plugins"].append(
                {
                    "name": name,
                    "module": info.module,
                    "distribution": info.distribution,
                    "version": info.version,
                    "components": by_provider.get(name, {k: [] for k in KINDS}),
                }
            )
        out["components"] = {
            kind: {
                n: {"provider": s.provider, "modality": s.modality, "description": s.description}
                for n, s in sorted(specs.items())
            }
            for kind, specs in self.registry.items()
        }
        return out

    # ------------------------------------------------------------------ configs
    def build_config(self, data: dict[str, Any]) -> RunConfig:
        """Validate a raw mapping into a :class:`RunConfig`. Loads plugins named in ``plugins:``.

        Every error is raised here, before any model loads.
        """
        if not isinstance(data, dict):
            raise ConfigError(f"the config must be a mapping, got {type(data).__name__}")
        top = {"run", "prompts", "optimizer", "policy", "sampler", "update", "rewards", "plugins"}
        for key in data:
            if key not in top:
                raise ConfigError(f"{key}: unknown top-level key{suggest(key, top)}; accepted keys: {sorted(top)}")
        plugins = data.get("plugins") or []
        if not isinstance(plugins, list) or not all(isinstance(p, str) for p in plugins):
            raise ConfigError(f"plugins: expected a list of module names, got {plugins!r}")
        for mod in plugins:
            self.load_module(mod)

        run = from_dict(RunSettings, data.get("run"), "run")
        if "{time}" in run.output_dir:
            run.output_dir = run.output_dir.replace("{time}", time.strftime("%Y%m%d-%H%M%S"))
        prompts = from_dict(PromptsConfig, data.get("prompts"), "prompts")
        optimizer = from_dict(OptimizerConfig, data.get("optimizer"), "optimizer")

        def component_spec(kind: str, key: str) -> tuple[str, dict[str, Any], ComponentSpec]:
            section = data.get(key)
            if not isinstance(section, dict) or "name" not in section:
                raise ConfigError(f"{key}: required section with a 'name' key; available: {sorted(self.registry[kind])}")
            section = dict(section)
            name = section.pop("name")
            return name, section, self.spec(kind, name, f"{key}.name")

        policy_name, policy_section, policy_spec = component_spec("policy", "policy")
        sampler_name, sampler_section, sampler_spec = component_spec("sampler", "sampler")
        update_name, update_section, update_spec = component_spec("update", "update")
        if sampler_spec.modality not in ("any", policy_spec.modality):
            raise ConfigError(
                f"sampler.name: {sampler_name!r} samples {sampler_spec.modality} but policy {policy_name!r} is "
                f"{policy_spec.modality}; samplers for it: "
                f"{sorted(n for n, s in self.registry['sampler'].items() if s.modality in ('any', policy_spec.modality))}"
            )
        policy = ComponentConfig(policy_name, from_dict(policy_spec.config_cls, policy_section, "policy"))
        sampler = ComponentConfig(sampler_name, from_dict(sampler_spec.config_cls, sampler_section, "sampler"))
        update = ComponentConfig(update_name, from_dict(update_spec.config_cls, update_section, "update"))

        raw_rewards = data.get("rewards")
        if not isinstance(raw_rewards, dict) or not raw_rewards:
            raise ConfigError(
                f"rewards: required mapping of reward name to settings (e.g. rewards: {{jpeg_compressibility: {{weight: 1.0}}}}); "
                f"available: {sorted(self.registry['reward'])}"
            )
        rewards = []
        for key, section in raw_rewards.items():
            section = dict(section or {})
            name = section.pop("name", key)
            spec = self.spec("reward", name, f"rewards.{key}" + (".name" if name != key else ""))
            weight = section.pop("weight", 1.0)
            if isinstance(weight, bool) or not isinstance(weight, (int, float)):
                raise ConfigError(f"rewards.{key}.weight: expected a number, got {weight!r}")
            missing = [r for r in spec.reads if r not in sampler_spec.produces]
            if missing:
                raise ConfigError(
                    f"rewards.{key}: reward {name!r} reads {missing} but sampler {sampler.name!r} produces "
                    f"{list(sampler_spec.produces)}"
                )
            params = from_dict(spec.config_cls, section, f"rewards.{key}")
            rewards.append(RewardConfig(name=name, key=key, weight=float(weight), params=params))

        cfg = RunConfig(run, prompts, optimizer, policy, sampler, update, rewards, list(plugins))
        for params in (policy.params, sampler.params, update.params):
            check = getattr(params, "check_run", None)
            if callable(check):
                check(cfg)
        self.pm.hook.polyrl_configure(config=cfg)
        return cfg

    # ------------------------------------------------------------------ construction
    def build_policy(self, cfg: RunConfig) -> Any:
        return self.registry["policy"][cfg.policy.name].factory(cfg.policy.params)

    def build_sampler(self, cfg: RunConfig, policy: Any) -> Any:
        return self.registry["sampler"][cfg.sampler.name].factory(cfg.sampler.params, policy=policy)

    def build_rewards(self, cfg: RunConfig, policy: Any) -> list[tuple[str, float, Any]]:
        return [
            (r.key, r.weight, self.registry["reward"][r.name].factory(r.params, policy=policy))
            for r in cfg.rewards
        ]

    def build_update(self, cfg: RunConfig) -> Any:
        return self.registry["update"][cfg.update.name].factory(cfg.update.params)
