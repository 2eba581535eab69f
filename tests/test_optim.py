"""optimizer.implementation (torch, fused, 8bit) and run.tf32."""

from __future__ import annotations

import pytest
import torch

from polyrl import ConfigError
from polyrl.config import OptimizerConfig, RunSettings
from polyrl.optim import apply_numeric_settings, build_optimizer


def _train(implementation: str, steps: int = 5) -> tuple[torch.optim.Optimizer, list[torch.Tensor]]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.Tanh(), torch.nn.Linear(96, 8))
    cfg = OptimizerConfig(lr=1e-2, weight_decay=0.01, implementation=implementation)
    cfg.check()
    opt = build_optimizer(model.parameters(), cfg)
    x, y = torch.randn(32, 64), torch.randn(32, 8)
    for _ in range(steps):
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    return opt, [p.detach().clone() for p in model.parameters()]


def test_fused_adamw_gives_the_same_update():
    _, plain = _train("torch")
    opt, fused = _train("fused")
    assert opt.defaults["fused"] is True
    for a, b in zip(plain, fused):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_8bit_adamw_keeps_one_byte_moments_and_trains_like_adamw():
    pytest.importorskip("bitsandbytes")
    _, plain = _train("torch")
    opt, eight = _train("8bit")
    first = next(iter(opt.state.values()))
    big = [s for s in opt.state.values() if s["state1"].numel() >= 4096]
    assert big, "the 64x96 weight has >= 4096 elements and gets 8-bit moments"
    assert all(s["state1"].dtype == torch.uint8 and s["state2"].dtype == torch.uint8 for s in big)
    assert first is not None
    # quantised moments: AdamW's update up to a small relative error, not exactly
    _, start = _train("torch", steps=0)
    for a, b, s in zip(plain, eight, start):
        exact, quantised = a - s, b - s
        assert (quantised - exact).norm() < 0.1 * exact.norm()
    assert any(not torch.equal(a, b) for a, b in zip(plain, eight))


def test_unknown_implementation_is_refused():
    with pytest.raises(ConfigError, match="'adam9'.*'torch', 'fused', '8bit'"):
        OptimizerConfig(implementation="adam9").check()


def test_tf32_switches_the_matmul_mode_and_says_when_it_cannot_act():
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        notes = apply_numeric_settings(RunSettings(tf32=True))
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        assert bool(notes) == (not torch.cuda.is_available())
        assert apply_numeric_settings(RunSettings()) == []
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


@pytest.mark.parametrize("implementation", ["fused", "8bit"])
def test_runs_with_each_implementation_resume_exactly(tmp_path, monkeypatch, implementation):
    """A full fine-tune of the tiny GPT-2 (weights large enough for 8-bit moments) stopped after 2
    iterations and resumed logs what the uninterrupted run logs: the moments are checkpointed."""
    if implementation == "8bit":
        pytest.importorskip("bitsandbytes")
    import copy
    import json
    from pathlib import Path

    from polyrl.host import Host
    from polyrl.loop import train

    monkeypatch.chdir(Path(__file__).parent.parent)
    base = {
        "run": {"iterations": 4, "prompts_per_iteration": 2, "samples_per_prompt": 4, "seed": 3, "save_every": 2,
                "progress": False, "report": False},
        "prompts": {"file": "assets/tiny-gpt2/prompts.txt"},
        "policy": {"name": "causal_lm", "pretrained": "assets/tiny-gpt2", "lora_rank": 0},
        "sampler": {"name": "generate", "max_new_tokens": 8},
        "rewards": {"sentiment": {"weight": 1.0}},
        "update": {"name": "grpo", "train_batch_size": 4, "beta": 0.0},
        "optimizer": {"lr": 1e-3, "implementation": implementation},
    }

    def run(name: str, iterations: int, resume: bool = False) -> list[dict]:
        data = copy.deepcopy(base)
        data["run"].update(output_dir=str(tmp_path / name), iterations=iterations)
        host = Host()
        train(host.build_config(data), host, resume=resume)
        rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]

    whole = run("whole", 4)
    run("split", 2)
    assert run("split", 4, resume=True) == whole
    state = torch.load(tmp_path / "whole" / "checkpoints" / "iter_000004" / "optimizer.pt", weights_only=True)
    saved = list(state["optimizer"]["state"].values())
    if implementation == "8bit":  # bitsandbytes packs its quantised moments under one key
        assert any("__bnb_optimizer_quant_state__" in s for s in saved)
    else:
        assert saved and all("exp_avg" in s and s["exp_avg"].dtype == torch.float32 for s in saved)
