"""The plugin host: discovery through entry points, local modules, failures and name clashes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest

from polyrl import ComponentSpec, hookimpl
from polyrl.host import Host, PluginLoadWarning
from polyrl.types import ConfigError

HERE = Path(__file__).parent
BUILTIN = {
    "policy": {"causal_lm", "diffusion"},
    "sampler": {"generate", "ddim"},
    "reward": {"jpeg_compressibility", "jpeg_incompressibility", "sentiment"},
    "update": {"ddpo", "grpo", "reinforce"},
}


def polyrl_cli(*args, env=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "polyrl.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_plugins_json_lists_builtin_components():
    proc = polyrl_cli("plugins", "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    for kind, names in BUILTIN.items():
        assert names <= set(info["components"][kind]), (kind, info["components"][kind])
    providers = {p["name"]: p for p in info["plugins"]}
    assert providers["updates"]["distribution"] == "polyrl"  # built-ins come through entry points too
    assert "grpo" in providers["updates"]["components"]["update"]


def test_local_module_with_dash_p_and_config_list():
    env = dict(os.environ, PYTHONPATH=str(HERE / "local_plugins"))
    proc = polyrl_cli("-p", "polyrl_length_plugin", "plugins", "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["components"]["reward"]["completion_length"]["provider"] == "polyrl_length_plugin"

    sys.path.insert(0, str(HERE / "local_plugins"))
    try:
        host = Host()
        with pytest.raises(ConfigError, match="unknown reward 'completion_length'"):
            host.build_config(_text_config({"completion_length": {}}))
        cfg = host.build_config({**_text_config({"completion_length": {"per_token": 0.5}}), "plugins": ["polyrl_length_plugin"]})
        assert cfg.rewards[0].params.per_token == 0.5
        with pytest.raises(ConfigError, match="plugin module 'no_such_module_xyz' could not be imported"):
            Host(plugins=["no_such_module_xyz"])
    finally:
        sys.path.remove(str(HERE / "local_plugins"))


def test_broken_plugin_warns_and_others_load(tmp_path, monkeypatch):
    site = tmp_path / "site"
    (site / "broken_polyrl_plugin").mkdir(parents=True)
    (site / "broken_polyrl_plugin" / "__init__.py").write_text("import a_module_that_is_not_installed\n")
    dist = site / "broken_polyrl_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-polyrl-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[polyrl]\nbroken = broken_polyrl_plugin\n")
    monkeypatch.syspath_prepend(str(site))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        host = Host()
    messages = [str(w.message) for w in caught if issubclass(w.category, PluginLoadWarning)]
    assert any("'broken'" in m and "broken-polyrl-plugin" in m and "a_module_that_is_not_installed" in m for m in messages), messages
    assert "broken" in host.failed
    assert BUILTIN["update"] <= set(host.registry["update"])


@dataclass
class _Empty:
    """Nothing to set."""


def test_duplicate_component_names_name_both_providers():
    class A:
        @hookimpl
        def polyrl_rewards(self):
            return [ComponentSpec("dup", lambda c, policy=None: None, _Empty)]

    class B:
        @hookimpl
        def polyrl_rewards(self):
            return [ComponentSpec("dup", lambda c, policy=None: None, _Empty)]

    host = Host()
    host.register(A(), "plugin_a")
    host.register(B(), "plugin_b")
    with pytest.raises(ConfigError) as info:
        _ = host.registry
    assert "'dup'" in str(info.value) and "'plugin_a'" in str(info.value) and "'plugin_b'" in str(info.value)


def _text_config(rewards):
    return {
        "run": {"iterations": 2, "prompts_per_iteration": 2, "samples_per_prompt": 2},
        "prompts": {"items": ["This movie was", "I bought this"]},
        "policy": {"name": "causal_lm"},
        "sampler": {"name": "generate", "max_new_tokens": 8},
        "rewards": rewards,
        "update": {"name": "grpo", "train_batch_size": 4},
    }


@pytest.mark.slow
def test_pip_installed_plugin_is_discovered_and_trains(tmp_path):
    """The plugin is pip-installed into a throw-away folder put on PYTHONPATH for the commands of
    this test only: the environment polyrl runs from is never changed."""
    src = tmp_path / "polyrl-keyword"
    shutil.copytree(HERE / "plugin_pkg", src)
    site = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--no-build-isolation",
                              "-q", "--target", str(site), str(src)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr
    assert (site / "polyrl_keyword").is_dir() and list(site.glob("polyrl_keyword-0.3.1.dist-info"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])])}
    proc = polyrl_cli("plugins", "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    keyword = {p["name"]: p for p in info["plugins"]}["keyword"]
    assert keyword["distribution"] == "polyrl-keyword" and keyword["version"] == "0.3.1"
    assert keyword["components"]["reward"] == ["keyword_count"]

    config = tmp_path / "keyword.yaml"
    data = _text_config({"keyword_count": {"keywords": ["great", "good", "love"]}})
    data["run"].update({"output_dir": str(tmp_path / "run"), "progress": False, "report": False})
    import yaml

    config.write_text(yaml.safe_dump(data))
    proc = polyrl_cli("train", str(config), env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2]
    assert all("reward/keyword_count" in r for r in rows)
    proc = polyrl_cli("plugins", "--json")  # without the folder: polyrl's own environment has no such plugin
    assert "keyword" not in {p["name"] for p in json.loads(proc.stdout)["plugins"]}


def test_plugins_lists_what_each_sampler_puts_in_rollout_outputs(capsys):
    from polyrl.cli import main

    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "rollout.outputs of each sampler" in out
    lines = {line.split()[0]: line.split(None, 1)[1] for line in out.split("rollout.outputs of each sampler")[1].splitlines()[1:]
             if line.startswith("    ")}
    assert lines["ddim"] == "images" and lines["generate"] == "texts, completion_ids"
    assert main(["plugins", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["components"]["sampler"]["lcm"]["produces"] == ["images"]
    assert info["components"]["reward"]["clip_score"]["reads"] == ["images"]


def test_config_command_documents_the_run_sections_and_components(capsys):
    import dataclasses

    from polyrl.cli import main
    from polyrl.config import OptimizerConfig, RunSettings, field_docs

    for kind, cls in (("run", RunSettings), ("optimizer", OptimizerConfig)):
        assert main(["config", kind]) == 0
        out = capsys.readouterr().out
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            assert docs.get(f.name) and f"  {f.name} = " in out, (kind, f.name)
    assert main(["config", "policy", "causal_lm"]) == 0
    assert "  chunk_lm_head = False" in capsys.readouterr().out
    # a component kind needs a name; a section takes none
    assert main(["config", "update"]) == 2
    assert "which update?" in capsys.readouterr().err
    assert main(["config", "run", "grpo"]) == 2
    assert "takes no name" in capsys.readouterr().err
