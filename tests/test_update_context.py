"""The update's context: gradient accumulation (sync and loss scaling in one place) and A*-PO
working from the context alone (real modules, real accelerator, the tiny GPT-2)."""

from __future__ import annotations

import contextlib
import dataclasses
import math
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

from polyrl import Context
from polyrl.context import UpdateContext

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "assets" / "tiny-gpt2"
PROMPTS = [p for p in (TINY / "prompts.txt").read_text().splitlines() if p.strip()] if TINY.is_dir() else []


def tiny_context() -> tuple[UpdateContext, torch.nn.Linear, list[bool]]:
    """A context around a small linear model; ``syncs`` records every ``no_sync(sync)`` request."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    ctx = UpdateContext(accelerator=Accelerator(), model=model, policy=model, config=None, iteration=1)
    syncs: list[bool] = []
    real = ctx.no_sync

    def recording(sync: bool) -> contextlib.AbstractContextManager:
        syncs.append(sync)
        return real(sync)

    ctx.no_sync = recording  # the accelerator's own no_sync still runs underneath
    return ctx, model, syncs


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 4, generator=g), torch.randn(8, generator=g)


def loss_of(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((model(x).squeeze(1) - y) ** 2).mean()


def grads(model: torch.nn.Module) -> list[torch.Tensor]:
    out = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return out


def test_accumulate_gives_the_full_batch_gradient_and_syncs_only_the_last_micro_step() -> None:
    ctx, model, syncs = tiny_context()
    x, y = data()
    ctx.backward(loss_of(model, x, y))
    full = grads(model)

    window = list(torch.arange(8).split(2))  # 4 micro-batches of 2
    seen = []
    for micro, idx in ctx.accumulate(window):
        with micro:
            micro.backward(loss_of(model, x[idx], y[idx]))
        seen.append((micro.index, micro.last, micro.scale))
    accumulated = grads(model)
    assert syncs == [False, False, False, True]
    assert seen == [(0, False, 4), (1, False, 4), (2, False, 4), (3, True, 4)]
    for a, b in zip(accumulated, full):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7), (a, b)

    # bit for bit the hand-written form the updates used: backward(loss / len(window)) per micro-batch
    for idx in window:
        ctx.backward(loss_of(model, x[idx], y[idx]) / len(window))
    by_hand = grads(model)
    assert all(torch.equal(a, b) for a, b in zip(accumulated, by_hand))


def test_accumulate_scale_sums_several_terms_or_none() -> None:
    ctx, model, syncs = tiny_context()
    x, y = data()
    window = list(torch.arange(8).split(4))
    # two loss terms per micro-step, averaged over all four terms of the step (DDPO's steps)
    for micro, idx in ctx.accumulate(window, scale=4):
        with micro:
            total = loss_of(model, x[idx[:2]], y[idx[:2]]) + loss_of(model, x[idx[2:]], y[idx[2:]])
            micro.backward(total)
    terms = grads(model)
    for idx in window:
        total = loss_of(model, x[idx[:2]], y[idx[:2]]) + loss_of(model, x[idx[2:]], y[idx[2:]])
        ctx.backward(total / 4)
    assert all(torch.equal(a, b) for a, b in zip(terms, grads(model)))
    # scale 1: the loss as it is (a loss already normalised over the whole step)
    for micro, idx in ctx.accumulate(window, scale=1):
        with micro:
            micro.backward(loss_of(model, x[idx], y[idx]))
    unscaled = grads(model)
    for idx in window:
        ctx.backward(loss_of(model, x[idx], y[idx]))
    assert all(torch.equal(a, b) for a, b in zip(unscaled, grads(model)))
    assert syncs == [False, True, False, True]


def test_accumulate_refuses_misuse() -> None:
    ctx, model, _ = tiny_context()
    x, y = data()
    with pytest.raises(ValueError, match="at least one micro-batch"):
        next(ctx.accumulate([]))
    with pytest.raises(ValueError, match="scale must be > 0, got 0"):
        next(ctx.accumulate([0], scale=0))
    micro, _ = next(ctx.accumulate([0, 1]))
    with pytest.raises(RuntimeError, match="inside `with micro:`"):  # outside, the gradient sync is not set
        micro.backward(loss_of(model, x, y))
    with pytest.raises(RuntimeError, match="no optimizer"):
        ctx.optimizer_step()
    with pytest.raises(TypeError, match="needs an UpdateContext .* got int"):
        UpdateContext.of(3)


@pytest.mark.skipif(not (TINY / "model.safetensors").is_file(), reason="run scripts/make_tiny_gpt2.py first")
def test_a_star_po_needs_only_its_context(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from polyrl.host import Host
    from polyrl.loop import Trainer

    monkeypatch.chdir(ROOT)
    host = Host()
    cfg = host.build_config({
        "run": {"iterations": 1, "prompts_per_iteration": 8, "samples_per_prompt": 1, "seed": 3, "progress": False,
                "report": False, "output_dir": str(tmp_path / "run")},
        "prompts": {"items": PROMPTS[:8]},
        "policy": {"name": "causal_lm", "pretrained": "assets/tiny-gpt2"},
        "sampler": {"name": "generate", "max_new_tokens": 8},
        "rewards": {"sentiment": {"weight": 1.0}},
        "optimizer": {"lr": 1e-3},
        "update": {"name": "a_star_po", "train_batch_size": 4, "num_reference_samples": 2, "reference_batch_size": 32},
    })
    trainer = Trainer(cfg, host)
    trainer.update.setup(trainer)  # the loop's way: V* from the trainer's context
    expected = dict(trainer.update.v_star)
    assert set(expected) == set(PROMPTS[:8])

    ctx = trainer.update_context()
    for name in ("host", "prompts", "sampler", "update"):  # what A*-PO used to reach for
        delattr(trainer, name)
    update = host.build_update(cfg)
    update.setup(ctx)
    assert update.v_star == expected  # the same reference samples, scored through the reward hook

    ctx = dataclasses.replace(ctx, iteration=1, completed=0)
    contexts = [Context(prompt=p, group=i) for i, p in enumerate(PROMPTS[:8])]
    rollout, scored = ctx.sample_and_score(contexts, "test")
    before = [p.detach().clone() for p in ctx.policy.trainable_parameters()]
    out = update.step(ctx, rollout, scored.total)
    assert math.isfinite(out["loss"]) and out["grad_norm"] > 0
    assert out["v_star_mean"] == pytest.approx(sum(expected.values()) / len(expected), rel=1e-6)
    assert any(not torch.equal(a, b) for a, b in zip(before, ctx.policy.trainable_parameters()))
