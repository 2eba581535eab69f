"""Run configs are checked completely before any model loads."""

from __future__ import annotations

import copy
import subprocess
import sys
import time

import pytest

from polyrl.cli import default_config
from polyrl.config import apply_overrides, field_docs, parse_overrides
from polyrl.host import Host
from polyrl.types import ConfigError

TEXT = {
    "run": {"iterations": 2, "prompts_per_iteration": 2, "samples_per_prompt": 4, "output_dir": "runs/x"},
    "prompts": {"items": ["This movie was", "I bought this"]},
    "policy": {"name": "causal_lm", "pretrained": "assets/tiny-gpt2"},
    "sampler": {"name": "generate", "max_new_tokens": 8},
    "rewards": {"sentiment": {"weight": 1.0}},
    "update": {"name": "grpo", "train_batch_size": 4},
}


@pytest.fixture(scope="module")
def host():
    return Host()


def build(host, data, *overrides):
    return host.build_config(apply_overrides(data, overrides))


def test_valid_text_config_round_trips(host):
    cfg = build(host, TEXT)
    assert cfg.run.batch_size == 8
    assert cfg.update.params.train_batch_size == 4
    again = host.build_config(cfg.to_dict())
    assert again.to_dict() == cfg.to_dict()


def test_embedded_default_is_valid(host):
    cfg = host.build_config(default_config())
    assert cfg.run.iterations >= 5


@pytest.mark.parametrize(
    "overrides, fragments",
    [
        (["run.iteratons=3"], ["run.iteratons", "unknown key", "did you mean 'iterations'"]),
        (["run.iterations=three"], ["run.iterations", "expected an integer", "'three'"]),
        (["optimizer.lr=fast"], ["optimizer.lr", "expected a number"]),
        (["update.name=grop"], ["update.name", "unknown update 'grop'", "did you mean 'grpo'", "reinforce"]),
        (["policy.name=causal_llm"], ["policy.name", "did you mean 'causal_lm'"]),
        (["rewards.sentimnt.weight=1"], ["rewards.sentimnt", "did you mean 'sentiment'"]),
        (["sampler.temprature=0.7"], ["sampler.temprature", "did you mean 'temperature'"]),
        (["run.samples_per_prompt=1"], ["run.samples_per_prompt=1", "grpo", "at least 2"]),
        (["update.train_batch_size=3"], ["update.train_batch_size=3", "must divide", "accepted: [1, 2, 4, 8]"]),
        (["run.mixed_precision=fp8"], ["run.mixed_precision", "'fp8'", "'bf16'"]),
        (["sampler.name=ddim"], ["sampler.name", "'ddim' samples image", "causal_lm", "generate"]),
        (["rewards.jpeg_compressibility.weight=1"], ["rewards.jpeg_compressibility", "reads ['images']", "produces ['texts'"]),
        (["colour=red"], ["colour: unknown top-level key"]),
    ],
)
def test_bad_configs_name_the_key_and_what_is_accepted(host, overrides, fragments):
    with pytest.raises(ConfigError) as info:
        build(host, TEXT, *overrides)
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))


def test_prompts_need_exactly_one_source(host):
    data = copy.deepcopy(TEXT)
    data["prompts"] = {"items": ["a"], "file": "x.txt"}
    with pytest.raises(ConfigError, match="exactly one"):
        host.build_config(data)
    data["prompts"] = {"file": "no/such/file.txt"}
    with pytest.raises(ConfigError, match="no such file 'no/such/file.txt'"):
        host.build_config(data)


def test_overrides_parse_yaml_scalars():
    assert parse_overrides(["a.b=1e-4", "c=true", "d=[x, y]", "e=hello"]) == [
        (["a", "b"], "1e-4"),  # YAML 1.1 reads 1e-4 as a string; float fields accept it
        (["c"], True),
        (["d"], ["x", "y"]),
        (["e"], "hello"),
    ]
    with pytest.raises(ConfigError, match="dotted.key=value"):
        parse_overrides(["novalue"])


def test_float_field_accepts_exponent_without_dot(host):
    cfg = build(host, TEXT, "optimizer.lr=1e-4")
    assert cfg.optimizer.lr == pytest.approx(1e-4)


def test_every_config_field_is_documented(host):
    from dataclasses import fields

    from polyrl.config import OptimizerConfig, PromptsConfig, RunSettings

    classes = [RunSettings, PromptsConfig, OptimizerConfig]
    for specs in host.registry.values():
        classes.extend(s.config_cls for s in specs.values())
    for cls in classes:
        docs = field_docs(cls)
        for f in fields(cls):
            assert docs.get(f.name), f"{cls.__name__}.{f.name} has no docstring"


def test_cli_rejects_bad_config_before_loading_models(tmp_path):
    out = tmp_path / "run"
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "polyrl.cli", "train", "update.name=grop", f"run.output_dir={out}"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "update.name: unknown update 'grop' (did you mean 'grpo'?)" in proc.stderr
    assert not out.exists()  # nothing was created, nothing loaded
    assert time.perf_counter() - start < 60
