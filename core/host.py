"""The plugin host: discovers plugins, collects their components, validates run configs.

Built-in plugins are registered through the same ``polyrl`` entry-point group as external ones.
A plugin that fails to import is reported with a warning naming it, and the rest still load.
"""

from __future__ import annotations

import importlib
import math
import importlib.metadata as md
import time
import warnings
from dataclasses import dataclass
from typing import Any, Iterable

import pluggy

from . import hookspecs
from .config import (
    ComponentConfig,
    EvalConfig,
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
        top = {"run", "prompts", "optimizer", "policy", "sampler", "update", "rewards", "plugins", "eval"}
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
        if sampler_spec.modality not in ("any", policy_spec.modality):  # before their settings are read
            defaults = _default_params(policy_spec)
            fits = (self.samplers_for(policy_name, defaults) if defaults is not _NO_DEFAULT else
                    [n for n, s in self.registry["sampler"].items() if s.modality in ("any", policy_spec.modality)])
            verb = _SAMPLED_BY.get(next(iter(sorted(policy_spec.formats)), ""), "is sampled by")
            raise ConfigError(
                f"sampler.name: {sampler_name!r} samples {sampler_spec.modality} but policy {policy_name!r} is "
                f"{policy_spec.modality}: policy {policy_name!r} {verb} {_names(fits)}, not {sampler_name!r}; "
                f"accepted: {_names(fits)}"
            )
        policy = ComponentConfig(policy_name, from_dict(policy_spec.config_cls, policy_section, "policy"))
        sampler = ComponentConfig(sampler_name, from_dict(sampler_spec.config_cls, sampler_section, "sampler"))
        update = ComponentConfig(update_name, from_dict(update_spec.config_cls, update_section, "update"))
        self.check_compatibility(policy, sampler, update)

        rewards = self._rewards(data.get("rewards"), "rewards", sampler.name, sampler_spec)
        evaluation = None
        if data.get("eval") is not None:
            raw = data["eval"]
            if not isinstance(raw, dict):
                raise ConfigError(f"eval: expected a mapping with a 'rewards' key, got {str(raw)[:60]!r}")
            raw = dict(raw)
            eval_rewards = self._rewards(raw.pop("rewards", None), "eval.rewards", sampler.name, sampler_spec)
            evaluation = from_dict(EvalConfig, raw, "eval")
            evaluation.rewards = eval_rewards

        cfg = RunConfig(run, prompts, optimizer, policy, sampler, update, rewards, list(plugins), evaluation)
        for params in (policy.params, sampler.params, update.params):
            check = getattr(params, "check_run", None)
            if callable(check):
                check(cfg)
        self.pm.hook.polyrl_configure(config=cfg)
        return cfg

    # ------------------------------------------------------------------ compatibility
    def check_compatibility(self, policy: ComponentConfig, sampler: ComponentConfig, update: ComponentConfig) -> None:
        """Check the declared rollout formats and capabilities of a policy, sampler and update
        against each other (from their validated configs, before any model loads).

        Raises :class:`ConfigError` naming both components of the first mismatch and listing the
        components that would fit. Components that declare nothing (third-party specs written
        before these fields) are not checked.
        """
        reg = self.registry
        p_spec, s_spec, u_spec = reg["policy"][policy.name], reg["sampler"][sampler.name], reg["update"][update.name]
        problem = self._pair_problem(p_spec, policy.params, s_spec, sampler.params)
        if problem is not None:
            fits = self.samplers_for(policy.name, policy.params)
            verb = _SAMPLED_BY.get(next(iter(sorted(p_spec.formats)), ""), "is sampled by")
            raise ConfigError(
                f"sampler.name: {problem}: policy {policy.name!r} {verb} {_names(fits)}, not {sampler.name!r}; "
                f"accepted: {_names(fits)}"
            )
        problem = self._update_problem(p_spec, policy.params, s_spec, sampler.params, u_spec, update.params)
        if problem is not None:
            fits = self.updates_for(policy.name, policy.params, sampler.name, sampler.params)
            raise ConfigError(
                f"update.name: {problem}; updates that fit policy {policy.name!r} with sampler {sampler.name!r}: "
                f"{_names(fits)}"
            )

    @staticmethod
    def _pair_problem(p_spec: ComponentSpec, p_params: Any, s_spec: ComponentSpec, s_params: Any) -> str | None:
        """Why the sampler cannot sample the policy (``None`` when it can)."""
        if s_spec.modality not in ("any", p_spec.modality):
            return f"{s_spec.name!r} samples {s_spec.modality} but policy {p_spec.name!r} is {p_spec.modality}"
        pf, sf = p_spec.formats, s_spec.formats
        if pf and sf and not pf & sf:
            return (f"{s_spec.name!r} records {_names(sf, quote=False)} and policy {p_spec.name!r} is trained on "
                    f"{_names(pf, quote=False)}")
        needs = s_spec.requirements_for(s_params)
        if needs and (pf or p_spec.capabilities):
            missing = sorted(needs - p_spec.capabilities_for(p_params))
            if missing:
                return (f"{s_spec.name!r} samples {_names(missing, quote=False)} policies and policy {p_spec.name!r} "
                        f"is not one")
        return None

    @staticmethod
    def _update_problem(p_spec: ComponentSpec, p_params: Any, s_spec: ComponentSpec, s_params: Any,
                        u_spec: ComponentSpec, u_params: Any) -> str | None:
        """Why the update cannot train this policy on this sampler's rollouts (``None`` when it can)."""
        formats = (p_spec.formats & s_spec.formats) if p_spec.formats and s_spec.formats else (
            p_spec.formats or s_spec.formats)
        accepts = frozenset(u_spec.accepts)
        if accepts and formats and not accepts & formats:
            return (f"update {u_spec.name!r} trains on {_names(accepts, quote=False)} but policy {p_spec.name!r} with "
                    f"sampler {s_spec.name!r} gives {_names(formats, quote=False)}")
        if not (p_spec.formats or p_spec.capabilities):
            return None  # the policy declares nothing: nothing to check its capabilities against
        has = p_spec.capabilities_for(p_params) | s_spec.capabilities_for(s_params)
        missing = sorted(u_spec.requirements_for(u_params) - has)
        if not missing:
            return None
        from .types import CAPABILITIES

        hints = u_spec.requirement_hints(u_params)
        what = "; ".join(
            f"{m} ({CAPABILITIES[m]})" if m in CAPABILITIES else m for m in missing
        )
        off = [m for m in missing if getattr(p_params, m, None) is False]
        hint = "".join(f" with policy.{m}=false (accepted: true)" for m in off)
        extra = "".join(f"; {m}: {hints[m]}" for m in missing if m in hints)
        return (f"update {u_spec.name!r} needs a policy (or sampler) with {what}; policy {p_spec.name!r} with sampler "
                f"{s_spec.name!r} has none{hint}{extra}")

    def samplers_for(self, policy: str, params: Any) -> list[str]:
        """The registered samplers that can sample ``policy`` built from ``params``."""
        p_spec = self.registry["policy"][policy]
        out = []
        for name, s_spec in sorted(self.registry["sampler"].items()):
            s_params = _default_params(s_spec)
            if s_params is not _NO_DEFAULT and self._pair_problem(p_spec, params, s_spec, s_params) is None:
                out.append(name)
        return out

    def updates_for(self, policy: str, p_params: Any, sampler: str, s_params: Any) -> list[str]:
        """The registered updates (with their default settings) that can train ``policy`` on the
        rollouts of ``sampler``."""
        p_spec, s_spec = self.registry["policy"][policy], self.registry["sampler"][sampler]
        out = []
        for name, u_spec in sorted(self.registry["update"].items()):
            u_params = _default_params(u_spec)
            if u_params is not _NO_DEFAULT and self._update_problem(p_spec, p_params, s_spec, s_params, u_spec, u_params) is None:
                out.append(name)
        return out

    def _rewards(self, raw: Any, path: str, sampler_name: str, sampler_spec: ComponentSpec) -> list[RewardConfig]:
        """A ``rewards``-shaped mapping (name -> settings with ``weight``) as reward configs."""
        if not isinstance(raw, dict) or not raw:
            raise ConfigError(
                f"{path}: required mapping of reward name to settings (e.g. {path}: {{jpeg_compressibility: {{weight: 1.0}}}}); "
                f"available: {sorted(self.registry['reward'])}"
            )
        rewards = []
        for key, section in raw.items():
            if section is not None and not isinstance(section, dict):
                raise ConfigError(f"{path}.{key}: expected a mapping of settings, got {str(section)[:60]!r}")
            section = dict(section or {})
            name = section.pop("name", key)
            spec = self.spec("reward", name, f"{path}.{key}" + (".name" if name != key else ""))
            weight = section.pop("weight", 1.0)
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
                raise ConfigError(f"{path}.{key}.weight: expected a finite number, got {str(weight)[:40]!r}")
            missing = [r for r in spec.reads if r not in sampler_spec.produces]
            if missing:
                raise ConfigError(
                    f"{path}.{key}: reward {name!r} reads {missing} but sampler {sampler_name!r} produces "
                    f"{list(sampler_spec.produces)}"
                )
            params = from_dict(spec.config_cls, section, f"{path}.{key}")
            rewards.append(RewardConfig(name=name, key=key, weight=float(weight), params=params))
        return rewards

    # ------------------------------------------------------------------ construction
    def build_policy(self, cfg: RunConfig) -> Any:
        return self.registry["policy"][cfg.policy.name].factory(cfg.policy.params)

    def build_sampler(self, cfg: RunConfig, policy: Any) -> Any:
        return self.registry["sampler"][cfg.sampler.name].factory(cfg.sampler.params, policy=policy)

    def build_rewards(self, cfg: RunConfig, policy: Any, rewards: list[RewardConfig] | None = None) -> list[tuple[str, float, Any]]:
        """The configured rewards (or ``rewards``, e.g. the evaluation rewards) as ``(name, weight, fn)``."""
        return [
            (r.key, r.weight, self.registry["reward"][r.name].factory(r.params, policy=policy))
            for r in (cfg.rewards if rewards is None else rewards)
        ]

    def build_update(self, cfg: RunConfig) -> Any:
        return self.registry["update"][cfg.update.name].factory(cfg.update.params)


#: How a refused pair is phrased, by the policy's rollout format.
_SAMPLED_BY = {"env_steps": "plays episodes through sampler", "transitions": "plays episodes through sampler"}
_NO_DEFAULT = object()


def _names(names: Iterable[str], quote: bool = True) -> str:
    """``'a', 'b'`` (or ``a, b``); ``none`` when empty."""
    items = sorted(names)
    if not items:
        return "none"
    return ", ".join(repr(n) if quote else n for n in items)


def _default_params(spec: ComponentSpec) -> Any:
    """The component's config with its defaults (skipping its file checks), or ``_NO_DEFAULT``."""
    try:
        return spec.config_cls()
    except Exception:  # noqa: BLE001 - a config with required fields has no default to try
        return _NO_DEFAULT
