"""Both modalities through the same loop: DDPO on the tiny diffusion model, GRPO on the tiny LM."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

ROOT = Path(__file__).parent.parent


def run_cli(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "polyrl.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_ddpo_trains_the_tiny_diffusion_model(tmp_path):
    run = tmp_path / "ddpo"
    run_cli("train", "configs/ddpo_tiny_compressibility.yaml", f"run.output_dir={run}", "run.iterations=2",
            "run.prompts_per_iteration=4", "update.train_batch_size=4", "update.gradient_accumulation_batches=1",
            "sampler.num_steps=4", "run.progress=false")
    metrics = rows(run)
    assert [m["iteration"] for m in metrics] == [1, 2]
    for m in metrics:
        assert m["reward/jpeg_compressibility"] < 0 and m["clipfrac"] >= 0 and m["grad_norm"] > 0
    # the LoRA moved away from its initialisation (lora_B starts at zero)
    ckpt = load_file(str(run / "checkpoints" / "iter_000002" / "trainable.safetensors"))
    lora_b = [v for k, v in ckpt.items() if "lora_B" in k]
    assert lora_b and max(v.abs().max().item() for v in lora_b) > 0
    # the trained adapter loads in plain diffusers, and the report has image grids
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(ROOT / "assets" / "tiny-sd"))
    pipe.load_lora_weights(str(run / "policy"))
    assert (run / "report" / "iter_000000.png").is_file() and (run / "report" / "iter_000002.png").is_file()
    assert "reward.png" in (run / "report" / "index.html").read_text()


@pytest.mark.slow
def test_embedded_default_raises_the_reward(tmp_path):
    run = tmp_path / "default"
    run_cli("train", f"run.output_dir={run}", "run.progress=false")
    metrics = rows(run)
    first = sum(m["reward_mean"] for m in metrics[:5]) / 5
    last = sum(m["reward_mean"] for m in metrics[-5:]) / 5
    # the tiny LCM's images match their captions better (clip_score about 0.76 -> 0.87)
    assert "reward/clip_score" in metrics[0] and last > first + 0.05, (first, last)
    report = (run / "report" / "index.html").read_text()
    assert "reward.png" in report and "iteration 0" in report


@pytest.mark.slow
def test_async_rewards_overlap_sampling_and_change_nothing(tmp_path):
    args = ["configs/ddpo_tiny_compressibility.yaml", "run.iterations=2", "run.prompts_per_iteration=4",
            "run.sample_batches=2", "update.train_batch_size=4", "update.gradient_accumulation_batches=1",
            "sampler.num_steps=3", "run.progress=false", "run.report=false"]
    run_cli("train", *args, f"run.output_dir={tmp_path / 'sync'}")
    run_cli("train", *args, f"run.output_dir={tmp_path / 'async'}", "run.async_rewards=true")
    strip = lambda rs: [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rs]  # noqa: E731
    assert strip(rows(tmp_path / "sync")) == strip(rows(tmp_path / "async"))


def test_sample_batches_must_divide_prompts():
    from polyrl.cli import default_config
    from polyrl.config import apply_overrides
    from polyrl.host import Host
    from polyrl.types import ConfigError

    with pytest.raises(ConfigError, match=r"run.sample_batches=3 must divide run.prompts_per_iteration=8; accepted: \[1, 2, 4, 8\]"):
        Host().build_config(apply_overrides(default_config(), ["run.sample_batches=3", "run.prompts_per_iteration=8"]))
