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
