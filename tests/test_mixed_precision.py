"""Sampling and training compute the same distribution under mixed precision: with bf16 autocast
on the CPU, the first, on-policy update sees ratios of exactly 1 (no clipping), for diffusion, LCM
and text policies."""

from __future__ import annotations

import io
import json
from contextlib import redirect_stderr
from pathlib import Path

import pytest

from polyrl.config import apply_overrides
from polyrl.host import Host
from polyrl.loop import train

ROOT = Path(__file__).parent.parent
IMAGE = {
    "run": {"iterations": 1, "prompts_per_iteration": 2, "samples_per_prompt": 4, "progress": False, "report": False},
    "prompts": {"items": ["a red circle on the right", "a blue triangle on the left"]},
    "rewards": {"clip_score": {}},
    # one micro-batch and one inner epoch: every ratio is computed before the optimizer step
    "update": {"name": "ddpo", "train_batch_size": 8, "clip_range": 1.0e-4, "tracker_min_count": 1000},
    "optimizer": {"lr": 1.0e-2},
}
CASES = {
    "diffusion": {**IMAGE, "policy": {"name": "diffusion", "pretrained": "assets/tiny-sd", "lora_rank": 4},
                  "sampler": {"name": "ddim", "num_steps": 4, "guidance_scale": 5.0}},
    "lcm": {**IMAGE, "policy": {"name": "lcm", "pretrained": "assets/tiny-lcm", "lora_rank": 4},
            "sampler": {"name": "lcm", "num_steps": 4, "guidance_scale": 4.0}},
    "text": {"run": IMAGE["run"], "prompts": {"file": "assets/tiny-gpt2/prompts.txt"},
             "policy": {"name": "causal_lm", "pretrained": "assets/tiny-gpt2", "lora_rank": 4},
             "sampler": {"name": "generate", "max_new_tokens": 8}, "rewards": {"sentiment": {}},
             "update": {"name": "grpo", "train_batch_size": 8, "clip_range": 1.0e-4}, "optimizer": {"lr": 1.0e-2}},
}


@pytest.fixture(autouse=True)
def _cwd(monkeypatch):
    monkeypatch.chdir(ROOT)


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """accelerate keeps one process-wide state: another mixed-precision setting needs a fresh one
    (as a new process would have), before and after these tests."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.parametrize("name", sorted(CASES))
def test_first_update_is_on_policy_under_bf16(tmp_path, name):
    data = apply_overrides(CASES[name], [f"run.output_dir={tmp_path / 'run'}", "run.mixed_precision='bf16'", "run.cpu=true"])
    host = Host()
    trainer = train(host.build_config(data), host)
    assert trainer.accelerator.mixed_precision == "bf16"
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert row["clipfrac"] == 0.0, row
    assert row["approx_kl"] == 0.0, row


def test_fp16_on_a_cpu_is_announced(tmp_path):
    data = apply_overrides(CASES["text"], [f"run.output_dir={tmp_path / 'run'}", "run.mixed_precision='fp16'", "run.cpu=true"])
    err = io.StringIO()
    host = Host()
    with redirect_stderr(err):
        train(host.build_config(data), host)
    assert "fp16" in err.getvalue() and "CPU" in err.getvalue()
