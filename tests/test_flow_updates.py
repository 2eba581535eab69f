"""The flow updates' gradient accumulation: ``flow_grpo`` and ``diffusion_nft`` accumulate through
``UpdateContext.accumulate`` and compute exactly what their earlier hand-rolled form computed (one
``no_sync`` per micro-step, ``backward(loss / n_micro)``), kept below as the reference: the same
gradients at every optimizer step, bit for bit, the same trained weights and the same gradient
syncs, on the tiny flow model with real modules and a real accelerator."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable

import pytest
import torch
from accelerate import Accelerator

import polyrl
from polyrl import Context
from polyrl.context import UpdateContext
from polyrl.host import Host
from polyrl.plugins.flow import (
    DiffusionNFT,
    DiffusionNFTConfig,
    FlowGRPO,
    FlowGRPOConfig,
    FlowPolicy,
    FlowPolicyConfig,
    FlowSDESampler,
    FlowSDESamplerConfig,
)
from polyrl.plugins.flow.grpo import flow_advantages, flow_kl
from polyrl.plugins.flow.nft import nft_loss
from polyrl.plugins.updates.common import windows
from polyrl.plugins.updates.ddpo import ddpo_loss

ROOT = Path(polyrl.__file__).resolve().parent.parent
TINY_FLOW = ROOT / "assets" / "tiny-flow"
PROMPTS = ["a red circle on the left", "a blue star at the top", "a green square in the center", "a yellow triangle on the right"]


# ------------------------------------------------------------------------------ the earlier form
def hand_rolled_flow_grpo(update: FlowGRPO, ctx: UpdateContext, rollout, rewards) -> None:
    """Flow-GRPO's update as it was written before ``accumulate``: the reference."""
    cfg = update.cfg
    device = ctx.accelerator.device
    adv = flow_advantages(ctx, rollout, rewards, cfg.scale_rewards)
    adv = adv.clamp(-cfg.adv_clip_max, cfg.adv_clip_max).to(device)
    rollout = rollout.to(device)
    b, t = rollout.log_probs.shape
    t_train = max(1, int(t * cfg.timestep_fraction))
    g = ctx.generator("update")
    for _ in range(cfg.inner_epochs):
        perm = torch.randperm(b, generator=g)
        for window in windows(perm, cfg.train_batch_size, cfg.gradient_accumulation_batches):
            n_micro = len(window) * t_train
            k = 0
            for idx in window:
                mb = rollout.select(idx)
                mb_adv = adv[idx.to(device)]
                for j in range(t_train):
                    k += 1
                    cols = torch.full((len(idx), 1), j, dtype=torch.long, device=device)
                    with ctx.no_sync(sync=k == n_micro):
                        out = ctx.model(mb, cols, with_mean=True)
                        loss, _ = ddpo_loss(out["log_probs"][:, 0], mb.log_probs[:, j], mb_adv, cfg.clip_range,
                                            mb.mask[:, j])
                        if cfg.beta > 0:
                            ref = ctx.policy.reference_step_outputs(mb, cols)
                            dt = mb.data["next_sigmas"][:, j] - mb.data["sigmas"][:, j]
                            kl = flow_kl(out["mean"][:, 0], ref["mean"][:, 0], out["noise_scale"][:, 0], dt,
                                         cfg.kl_form).mean()
                            loss = loss + cfg.beta * kl
                        ctx.backward(loss / n_micro)
            ctx.optimizer_step()


def hand_rolled_diffusion_nft(update: DiffusionNFT, ctx: UpdateContext, rollout, rewards) -> None:
    """DiffusionNFT's update as it was written before ``accumulate``: the reference."""
    cfg = update.cfg
    device = ctx.accelerator.device
    policy = ctx.policy
    adv = flow_advantages(ctx, rollout, rewards, cfg.scale_rewards)
    adv = adv.clamp(-cfg.adv_clip_max, cfg.adv_clip_max).to(device)
    r = (adv / cfg.adv_clip_max / 2 + 0.5).clamp(0, 1)
    rollout = rollout.to(device)
    x0 = rollout.data["final_latents"].float()
    schedule = rollout.data["schedule"].float()
    b, n = schedule.shape
    n_train = max(1, int(n * cfg.timestep_fraction))
    g = ctx.generator("update")
    noise = torch.randn((b, n_train, *x0.shape[1:]), generator=g).to(device)
    sig = schedule[:, :n_train]
    shape = (b, n_train, *([1] * (x0.dim() - 1)))
    x_sigma = (1 - sig.reshape(shape)) * x0[:, None] + sig.reshape(shape) * noise
    v_old = torch.empty_like(x_sigma)
    with torch.no_grad():
        for s in range(0, b, cfg.train_batch_size):
            idx = torch.arange(s, min(s + cfg.train_batch_size, b))
            mb = rollout.select(idx)
            for j in range(n_train):
                v_old[idx, j] = policy.rollout_velocity(mb, x_sigma[idx, j], sig[idx, j]).float()
    for _ in range(cfg.inner_epochs):
        perm = torch.randperm(b, generator=g)
        for window in windows(perm, cfg.train_batch_size, cfg.gradient_accumulation_batches):
            n_micro = len(window) * n_train
            k = 0
            for idx in window:
                mb = rollout.select(idx)
                i = idx.to(device)
                for j in range(n_train):
                    k += 1
                    with ctx.no_sync(sync=k == n_micro):
                        v = ctx.model(mb, velocity_at=(x_sigma[i, j], sig[i, j]))
                        loss, _ = nft_loss(v, v_old[i, j], x_sigma[i, j], x0[i], sig[i, j], r[i], cfg.nft_beta,
                                           cfg.adv_clip_max)
                        if cfg.kl_beta > 0:
                            with torch.no_grad(), policy.adapter_disabled():
                                v_ref = policy.rollout_velocity(mb, x_sigma[i, j], sig[i, j])
                            loss = loss + cfg.kl_beta * ((v.float() - v_ref.float()) ** 2).mean()
                        ctx.backward(loss / n_micro)
            ctx.optimizer_step()


# ------------------------------------------------------------------------------ the setting
@pytest.fixture(scope="module")
def policy() -> FlowPolicy:
    """The tiny flow model with a rank-4 adapter set away from zero (so the KL and its gradient are
    not 0)."""
    torch.manual_seed(0)
    pol = FlowPolicy(FlowPolicyConfig(pretrained=str(TINY_FLOW), lora_rank=4, lora_alpha=4.0))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in pol.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return pol


@pytest.fixture(scope="module")
def run_config():
    data = {
        "run": {"iterations": 1, "prompts_per_iteration": 4, "samples_per_prompt": 2, "seed": 3, "progress": False,
                "report": False},
        "prompts": {"items": PROMPTS},
        "policy": {"name": "flow", "pretrained": "assets/tiny-flow", "lora_rank": 4},
        "sampler": {"name": "flow_sde", "num_steps": 3},
        "rewards": {"shape_match": {"weight": 1.0}},
        "update": {"name": "flow_grpo", "train_batch_size": 2},
    }
    return Host().build_config(data)


def sample(policy: FlowPolicy, noise_level: float, num_steps: int = 3):
    contexts = [Context(prompt=p, group=i) for i, p in enumerate(PROMPTS) for _ in range(2)]
    sampler = FlowSDESampler(FlowSDESamplerConfig(num_steps=num_steps, noise_level=noise_level, batch_size=8))
    with torch.no_grad():
        rollout = sampler.sample(policy, contexts, torch.Generator().manual_seed(1))
    rewards = torch.rand(len(contexts), generator=torch.Generator().manual_seed(2))
    return rollout, rewards


def run_update(policy: FlowPolicy, config, step: Callable[[UpdateContext], object],
               around_optimizer_step: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext):
    """Run ``step`` on a context around ``policy`` from fixed weights, with Adam; returns the
    gradients at each optimizer step, the trained weights, the ``no_sync`` requests and what
    ``step`` returned. The weights are restored afterwards."""
    params = list(policy.trainable_parameters())
    start = [p.detach().clone() for p in params]
    optimizer = torch.optim.Adam(params, lr=1e-3)
    grads: list[list[torch.Tensor]] = []
    syncs: list[bool] = []

    def optimizer_step() -> float:
        with around_optimizer_step():
            grads.append([p.grad.clone() for p in params])
            norm = float(torch.nn.utils.clip_grad_norm_(params, 1.0))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return norm

    ctx = UpdateContext(accelerator=Accelerator(cpu=True), model=policy, policy=policy, config=config, iteration=1,
                        optimizer_step_fn=optimizer_step)
    real = ctx.no_sync

    def recording(sync: bool) -> contextlib.AbstractContextManager:
        syncs.append(sync)
        return real(sync)

    ctx.no_sync = recording
    policy.zero_grad(set_to_none=True)
    try:
        returned = step(ctx)
        trained = [p.detach().clone() for p in params]
    finally:
        with torch.no_grad():
            for p, s in zip(params, start):
                p.copy_(s)
        policy.zero_grad(set_to_none=True)
    return grads, trained, syncs, returned


def assert_identical(new, ref) -> None:
    grads, trained, syncs, _ = new
    ref_grads, ref_trained, ref_syncs, _ = ref
    assert syncs == ref_syncs and syncs.count(True) == len(grads)  # one synchronised micro-step per optimizer step
    assert len(grads) == len(ref_grads) >= 2
    for step_grads, step_ref in zip(grads, ref_grads):
        assert all(torch.equal(a, b) for a, b in zip(step_grads, step_ref))
    assert any(g.abs().max() > 0 for g in grads[0])
    assert all(torch.equal(a, b) for a, b in zip(trained, ref_trained))


# ------------------------------------------------------------------------------ the tests
@pytest.mark.parametrize("kl_form", ["flow_grpo", "gaussian"])
def test_flow_grpo_accumulates_exactly_as_before(policy, run_config, kl_form):
    rollout, rewards = sample(policy, 0.7)
    update = FlowGRPO(FlowGRPOConfig(beta=0.04, kl_form=kl_form, clip_range=1e-3, train_batch_size=2,
                                     gradient_accumulation_batches=2, inner_epochs=2 if kl_form == "gaussian" else 1))
    new = run_update(policy, run_config, lambda ctx: update.step(ctx, rollout, rewards))
    ref = run_update(policy, run_config, lambda ctx: hand_rolled_flow_grpo(update, ctx, rollout, rewards))
    assert_identical(new, ref)
    stats = new[3]
    assert stats["trained_steps"] == 3.0 and stats["kl"] > 0 and stats["grad_norm"] > 0
    assert stats["loss"] == pytest.approx(stats["policy_loss"] + 0.04 * stats["kl"], rel=1e-5, abs=1e-8)
    assert list(stats)[:6] == ["loss", "approx_kl", "clipfrac", "policy_loss", "kl", "grad_norm"]
    assert all(isinstance(v, float) for v in stats.values())


def test_diffusion_nft_accumulates_exactly_as_before(policy, run_config):
    rollout, rewards = sample(policy, 0.0)
    update = DiffusionNFT(DiffusionNFTConfig(kl_beta=1e-2, timestep_fraction=1.0, train_batch_size=2,
                                             gradient_accumulation_batches=2))
    new = run_update(policy, run_config, lambda ctx: update.step(ctx, rollout, rewards))
    ref = run_update(policy, run_config, lambda ctx: hand_rolled_diffusion_nft(update, ctx, rollout, rewards))
    assert_identical(new, ref)
    stats = new[3]
    assert stats["trained_sigmas"] == 3.0 and stats["kl"] > 0 and stats["grad_norm"] > 0
    assert stats["loss"] == pytest.approx(stats["policy_loss"] + 1e-2 * stats["kl"], rel=1e-5)
    assert all(isinstance(v, float) for v in stats.values())


def test_nft_loss_gives_its_statistics_as_tensors_on_request():
    g = torch.Generator().manual_seed(0)
    v, v_old, x0, noise = (torch.randn(3, 4, 2, 2, generator=g) for _ in range(4))
    sigma, r = torch.tensor([0.2, 0.5, 0.9]), torch.tensor([1.0, 0.3, 0.0])
    xs = (1 - sigma.view(3, 1, 1, 1)) * x0 + sigma.view(3, 1, 1, 1) * noise
    w = v.clone().requires_grad_(True)
    loss, floats = nft_loss(w, v_old, xs, x0, sigma, r, 1.0, 5.0)
    loss_t, tensors = nft_loss(w, v_old, xs, x0, sigma, r, 1.0, 5.0, tensor_stats=True)
    assert torch.equal(loss, loss_t) and list(floats) == list(tensors)
    for key, value in tensors.items():
        assert isinstance(value, torch.Tensor) and value.dim() == 0 and not value.requires_grad, key
        assert isinstance(floats[key], float) and value.item() == floats[key], key


READS = ("item", "__float__", "__int__", "__bool__", "tolist")


class HostReads:
    """Counts the host reads of floating-point tensors (``item``, ``float()``, ``int()``,
    ``bool()``, ``tolist``) while active, except inside :meth:`paused`."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.active = True
        self.counts = dict.fromkeys(READS, 0)
        for name in READS:
            real = getattr(torch.Tensor, name)

            def counting(t, *args, _real=real, _name=name, **kwargs):
                if self.active and t.is_floating_point():
                    self.counts[_name] += 1
                return _real(t, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, counting)

    @contextlib.contextmanager
    def paused(self):
        active, self.active = self.active, False
        try:
            yield
        finally:
            self.active = active


@pytest.mark.parametrize("name", ["flow_grpo", "diffusion_nft"])
def test_host_reads_do_not_grow_with_micro_batches_or_steps(policy, run_config, monkeypatch, name):
    """One optimizer step of 1 micro-batch x 2 steps and of 4 micro-batches x 4 steps read the
    same number of values on the host: the statistics are read once per update (the optimizer
    step's gradient-norm check, here outside the count, reads one more per optimizer step)."""
    counts = []
    for batch, steps in ((8, 2), (2, 4)):
        rollout, rewards = sample(policy, 0.7 if name == "flow_grpo" else 0.0, num_steps=steps)
        if name == "flow_grpo":
            update = FlowGRPO(FlowGRPOConfig(train_batch_size=batch, gradient_accumulation_batches=8 // batch))
        else:
            update = DiffusionNFT(DiffusionNFTConfig(timestep_fraction=1.0, train_batch_size=batch,
                                                     gradient_accumulation_batches=8 // batch))
        with monkeypatch.context() as patch:
            reads = HostReads(patch)
            grads, *_ = run_update(policy, run_config, lambda ctx: update.step(ctx, rollout, rewards), reads.paused)
        assert len(grads) == 1
        counts.append(reads.counts)
    assert counts[0] == counts[1], counts
