"""Held-out evaluation (the ``eval`` section) and the KL term of DDPO: guards against reward hacking."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from polyrl.config import apply_overrides
from polyrl.host import Host
from polyrl.loop import train
from polyrl.types import ConfigError

ROOT = Path(__file__).parent.parent
TEXT = {
    "run": {"iterations": 4, "prompts_per_iteration": 2, "samples_per_prompt": 4, "seed": 3,
            "save_every": 2, "progress": False, "report": False},
    "prompts": {"file": "assets/tiny-gpt2/prompts.txt"},
    "policy": {"name": "causal_lm", "pretrained": "assets/tiny-gpt2", "lora_rank": 8},
    "sampler": {"name": "generate", "max_new_tokens": 8},
    "rewards": {"sentiment": {}},
    "update": {"name": "grpo", "train_batch_size": 8},
    "optimizer": {"lr": 5e-3},
}
EVAL = {"every": 2, "samples": 6, "batch": 4, "prompts": {"items": ["The weather today", "My neighbour's dog"]},
        "rewards": {"length": {"name": "length_penalty", "target": 2, "coef": 1.0},
                    "sentiment": {"weight": 0.5}}}


@pytest.fixture(autouse=True)
def _cwd(monkeypatch):
    monkeypatch.chdir(ROOT)


def rows(run: Path) -> list[dict]:
    return [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]


def with_eval(tmp_path: Path, name: str, **eval_overrides) -> dict:
    data = copy.deepcopy(TEXT)
    data["run"]["output_dir"] = str(tmp_path / name)
    data["eval"] = {**copy.deepcopy(EVAL), **eval_overrides}
    return data


def test_eval_section_is_checked_before_loading(tmp_path):
    host = Host()
    cfg = host.build_config(with_eval(tmp_path, "ok"))
    assert [r.key for r in cfg.eval.rewards] == ["length", "sentiment"] and cfg.eval.every == 2
    assert host.build_config(cfg.to_dict()).to_dict() == cfg.to_dict()  # round trip
    bad = [({"every": 0}, "eval.every"), ({"rewards": {}}, "eval.rewards: required"),
           ({"rewards": {"aesthetic": {}}}, "eval.rewards.aesthetic: reward 'aesthetic' reads ['images']"),
           ({"sample": 3}, "eval.sample: unknown key"), ({"rewards": {"sentiment": {"weight": float("nan")}}}, "finite")]
    for change, fragment in bad:
        with pytest.raises(ConfigError, match=fragment.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
            host.build_config(with_eval(tmp_path, "bad", **change))


def test_eval_logs_held_out_rewards_and_leaves_training_unchanged(tmp_path):
    host = Host()
    train(host.build_config(with_eval(tmp_path, "eval")), host)
    plain = copy.deepcopy(TEXT)
    plain["run"]["output_dir"] = str(tmp_path / "plain")
    host = Host()
    train(host.build_config(plain), host)
    a, b = rows(tmp_path / "eval"), rows(tmp_path / "plain")
    assert [sorted(k for k in r if k.startswith("eval/")) for r in a] == [
        [], ["eval/length", "eval/reward_mean", "eval/sentiment"], [], ["eval/length", "eval/reward_mean", "eval/sentiment"]]
    r = a[1]
    assert r["eval/reward_mean"] == pytest.approx(r["eval/length"] + 0.5 * r["eval/sentiment"])
    assert -6 <= r["eval/length"] <= 0
    drop = lambda row: {k: v for k, v in row.items() if not k.startswith(("eval/", "time/"))}  # noqa: E731
    assert [drop(x) for x in a] == [drop(x) for x in b]  # evaluating changes nothing in training


def test_resume_with_eval_is_exact(tmp_path):
    host = Host()
    full = with_eval(tmp_path, "full")
    train(host.build_config(full), host)
    split = with_eval(tmp_path, "split")
    split["run"]["iterations"] = 2
    host = Host()
    train(host.build_config(split), host)
    split["run"]["iterations"] = 4
    host = Host()
    train(host.build_config(split), host, resume=True)
    strip = lambda rs: [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rs]  # noqa: E731
    assert strip(rows(tmp_path / "split")) == strip(rows(tmp_path / "full"))


def test_eval_on_the_tiny_image_world(tmp_path):
    from polyrl.cli import default_config

    data = apply_overrides(default_config(), [f"run.output_dir={tmp_path / 'img'}", "run.iterations=2",
                                              "run.progress=false", "run.report=false"])
    data["eval"] = {"every": 1, "samples": 4, "rewards": {"jpeg_compressibility": {}}}
    host = Host()
    train(host.build_config(data), host)
    assert all("eval/jpeg_compressibility" in r for r in rows(tmp_path / "img"))


def test_k3_kl_by_hand():
    from polyrl.plugins.updates.ddpo import k3_kl

    logp = torch.tensor([-1.0, -2.0, -0.5])
    ref = torch.tensor([-1.5, -2.0, 0.0])
    d = ref - logp  # -0.5, 0, 0.5
    expected = ((torch.exp(d) - d - 1)[[0, 1]]).mean()
    assert torch.allclose(k3_kl(logp, ref, torch.tensor([True, True, False])), expected)
    assert k3_kl(logp, logp, torch.ones(3, dtype=torch.bool)).item() == 0.0


def test_ddpo_kl_term_is_zero_at_the_first_update_and_needs_a_reference(tmp_path):
    from polyrl.cli import default_config

    data = apply_overrides(default_config(), [f"run.output_dir={tmp_path / 'kl'}", "run.iterations=2",
                                              "run.progress=false", "run.report=false", "update.kl_coef=0.1",
                                              "update.train_batch_size=32"])
    host = Host()
    train(host.build_config(data), host)
    first, second = rows(tmp_path / "kl")
    assert first["kl_ref"] == 0.0 and second["kl_ref"] > 0.0  # the LoRA starts at zero: policy = reference
    full = apply_overrides(data, ["policy.train_full_unet=true"])
    with pytest.raises(ConfigError, match="reference"):
        Host().build_config(full)
