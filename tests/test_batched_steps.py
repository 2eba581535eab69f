"""Log-probs of several denoising steps in one model call (``update.steps_per_call``): the same
gradient as one call per step, for the diffusion and LCM policies."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from polyrl.config import apply_overrides
from polyrl.host import Host
from polyrl.loop import train
from polyrl.types import ConfigError

ROOT = Path(__file__).parent.parent
BASE = {
    "run": {"iterations": 1, "prompts_per_iteration": 2, "samples_per_prompt": 4, "progress": False, "report": False},
    "prompts": {"items": ["a red circle on the right", "a blue triangle on the left"]},
    "rewards": {"jpeg_incompressibility": {}},
    "update": {"name": "ddpo", "train_batch_size": 4, "gradient_accumulation_batches": 2, "clip_range": 1.0e-4,
               "tracker_min_count": 1000, "kl_coef": 0.1},
    "optimizer": {"lr": 1.0e-2},
}
POLICIES = {
    "diffusion": ({"name": "diffusion", "pretrained": "assets/tiny-sd", "lora_rank": 4},
                  {"name": "ddim", "num_steps": 5, "guidance_scale": 5.0}),
    "lcm": ({"name": "lcm", "pretrained": "assets/tiny-lcm", "lora_rank": 4},
            {"name": "lcm", "num_steps": 4, "guidance_scale": 4.0}),
}


@pytest.fixture(autouse=True)
def _cwd(monkeypatch):
    monkeypatch.chdir(ROOT)


def gradients(tmp_path: Path, name: str, steps_per_call: int, monkeypatch) -> list[list[torch.Tensor]]:
    """The gradient of every optimizer step of one iteration (the step itself is skipped, so that
    both runs see the same weights throughout)."""
    from polyrl.loop import Trainer

    grads: list[list[torch.Tensor]] = []

    def record(self):
        params = self.policy.trainable_parameters()
        grads.append([p.grad.detach().clone() for p in params])
        self.optimizer.zero_grad(set_to_none=True)
        return 0.0

    monkeypatch.setattr(Trainer, "optimizer_step", record)
    policy, sampler = POLICIES[name]
    data = apply_overrides({**BASE, "policy": policy, "sampler": sampler},
                           [f"run.output_dir={tmp_path / f'{name}-{steps_per_call}'}", f"update.steps_per_call={steps_per_call}"])
    host = Host()
    train(host.build_config(data), host)
    return grads


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_batched_step_log_probs_give_the_per_step_gradient(tmp_path, name, monkeypatch):
    one = gradients(tmp_path, name, 1, monkeypatch)
    batched = gradients(tmp_path, name, 3, monkeypatch)  # 5 or 4 steps: calls of 3 and the rest
    assert len(one) == len(batched) == 1  # 8 samples, micro-batches of 4, accumulated twice
    nonzero = 0
    scale = max(float(a.abs().max()) for a in one[0])
    for a, b in zip(one[0], batched[0]):
        # the same sums in other batch shapes: float32 rounding, about 1e-4 of the largest gradient
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4 * scale), ((a - b).abs().max(), scale)
        nonzero += int(a.abs().sum() > 0)
    assert nonzero >= len(one[0]) // 2  # every lora_B (lora_A starts with a zero gradient: B = 0)


def test_steps_per_call_must_be_positive():
    with pytest.raises(ConfigError, match="steps_per_call"):
        Host().build_config(apply_overrides({**BASE, "policy": POLICIES["lcm"][0], "sampler": POLICIES["lcm"][1]},
                                            ["update.steps_per_call=0"]))
