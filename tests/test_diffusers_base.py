"""The shared diffusers base: one loader, adapter, reference and saver for SD-1.x, LCM and flow
policies; steps that read only the rollout (never the scheduler's mutable state)."""

from __future__ import annotations

import pytest
import torch

from polyrl import ConfigError, Context
from polyrl.plugins.diffusers_base import DiffusersPolicy, DiffusersPolicyConfig
from polyrl.plugins.diffusion.ddim import ddim_step_with_logprob, previous_timesteps
from polyrl.plugins.diffusion.policy import DiffusionPolicy, DiffusionPolicyConfig
from polyrl.plugins.diffusion.sampler import DDIMSampler, DDIMSamplerConfig
from polyrl.plugins.flow.policy import FlowPolicyConfig
from polyrl.plugins.lcm.policy import LCMPolicyConfig


def test_every_image_family_shares_the_base():
    from polyrl.plugins.flow.policy import FlowPolicy
    from polyrl.plugins.lcm.policy import LCMPolicy

    for policy, config in ((DiffusionPolicy, DiffusionPolicyConfig), (LCMPolicy, LCMPolicyConfig),
                           (FlowPolicy, FlowPolicyConfig)):
        assert issubclass(policy, DiffusersPolicy) and issubclass(config, DiffusersPolicyConfig)
        for method in ("adapter_disabled", "reference_log_probs", "save_pretrained", "add_lora"):
            assert getattr(policy, method) is getattr(DiffusersPolicy, method), (policy.__name__, method)


@pytest.mark.parametrize("config, folder, hint", [
    (DiffusionPolicyConfig, "assets/tiny-flow", "use policy 'flow'"),
    (DiffusionPolicyConfig, "assets/tiny-lcm", "use policy 'lcm'"),
    (LCMPolicyConfig, "assets/tiny-flow", "use policy 'flow'"),
    (FlowPolicyConfig, "assets/tiny-lcm", "use policy 'lcm'"),
])
def test_a_folder_of_another_family_is_refused_before_loading(config, folder, hint):
    with pytest.raises(ConfigError) as err:
        config(pretrained=folder).check()
    message = str(err.value)
    assert folder in message and config.policy_name in message and hint in message
    for name in config.accepted_classes:
        assert name in message


def test_an_lcm_policy_takes_an_sd_layout_folder_only_with_a_distilled_unet():
    LCMPolicyConfig(pretrained="assets/tiny-sd").check()  # the class fits; the UNet is checked on load


def test_frozen_parts_take_their_own_dtype():
    policy = DiffusionPolicy(DiffusionPolicyConfig(frozen_dtype="bfloat16"))
    assert policy.vae.dtype == torch.bfloat16 and policy.text_encoder.dtype == torch.bfloat16
    assert policy.denoiser_dtype == torch.float32
    base = [p for n, p in policy.unet.named_parameters() if "lora" not in n]
    assert {p.dtype for p in base} == {torch.float32}
    assert all(p.dtype == torch.float32 for p in policy.trainable_parameters())
    images = policy.decode(torch.randn(1, *policy.latent_shape))
    assert images.dtype == torch.float32 and images.shape[0] == 1


def test_ddim_rescoring_reads_the_rollout_not_the_scheduler():
    """A rollout of 4 steps is rescored exactly after the scheduler was set to another number of
    steps (as a report or evaluation with other settings leaves it)."""
    policy = DiffusionPolicy()
    torch.manual_seed(0)
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
    sampler = DDIMSampler(DDIMSamplerConfig(num_steps=4, batch_size=2, guidance_scale=3.0))
    rollout = sampler.sample(policy, [Context("a red circle"), Context("a blue square")], torch.Generator().manual_seed(1))
    steps = policy.scheduler.timesteps.long()
    assert torch.equal(rollout.data["prev_timesteps"][0], previous_timesteps(policy.scheduler, steps))
    policy.scheduler.set_timesteps(7)  # another gap between timesteps
    with torch.no_grad():
        rescored = policy(rollout)
    torch.testing.assert_close(rescored, rollout.log_probs, atol=1e-5, rtol=1e-5)
    assert policy.scheduler.num_inference_steps == 7  # rescoring did not reset it either


def test_ddim_step_with_recorded_prev_timestep_equals_the_schedulers_rule():
    from diffusers import DDIMScheduler

    sch = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                        clip_sample=False, set_alpha_to_one=False)
    sch.set_timesteps(10)
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([901, 501, 1])
    prev = previous_timesteps(sch, t)
    assert prev.tolist() == [801, 401, -99]
    a, lp_a = ddim_step_with_logprob(sch, eps, t, x, 1.0, noise=torch.ones_like(x))
    sch.set_timesteps(50)  # the recorded prev timesteps no longer follow from the scheduler
    b, lp_b = ddim_step_with_logprob(sch, eps, t, x, 1.0, noise=torch.ones_like(x), prev_timestep=prev)
    assert torch.equal(a, b) and torch.equal(lp_a, lp_b)
    c, _ = ddim_step_with_logprob(sch, eps, t, x, 1.0, noise=torch.ones_like(x))
    assert not torch.equal(a, c)


@pytest.mark.parametrize("family", ["diffusion", "flow"])
def test_gradient_checkpointing_keeps_log_probs_and_gradients(family):
    """The denoiser recomputes its activations in the backward pass: same log-probs, same gradients."""
    if family == "diffusion":
        make = lambda **kw: DiffusionPolicy(DiffusionPolicyConfig(**kw))  # noqa: E731
        sampler = DDIMSampler(DDIMSamplerConfig(num_steps=3, batch_size=2))
    else:
        from polyrl.plugins.flow.policy import FlowPolicy
        from polyrl.plugins.flow.sampler import FlowSDESampler, FlowSDESamplerConfig

        make = lambda **kw: FlowPolicy(FlowPolicyConfig(lora_rank=4, **kw))  # noqa: E731
        sampler = FlowSDESampler(FlowSDESamplerConfig(num_steps=3, batch_size=2))
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        policy = make(gradient_checkpointing=checkpointing)
        with torch.no_grad():
            for p in policy.trainable_parameters():
                p.add_(0.05 * torch.randn_like(p))
        assert policy.denoiser.is_gradient_checkpointing == checkpointing
        policy.train()
        rollout = sampler.sample(policy, [Context("a red circle"), Context("a blue square")], torch.Generator().manual_seed(1))
        log_probs = policy(rollout)
        log_probs.sum().backward()
        results.append((log_probs.detach(), [p.grad.clone() for p in policy.trainable_parameters()]))
    (lp_a, g_a), (lp_b, g_b) = results
    torch.testing.assert_close(lp_a, lp_b, atol=1e-6, rtol=1e-6)
    assert len(g_a) == len(g_b) and any(g.abs().sum() > 0 for g in g_a)
    for a, b in zip(g_a, g_b):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_vae_decode_batch_size_gives_the_same_images():
    whole = DiffusionPolicy()
    sliced = DiffusionPolicy(DiffusionPolicyConfig(vae_decode_batch_size=2))
    z = torch.randn(5, *whole.latent_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(sliced.decode(z), whole.decode(z), atol=1e-5, rtol=1e-4)  # float rounding
    with pytest.raises(ConfigError, match="vae_decode_batch_size"):
        DiffusionPolicyConfig(vae_decode_batch_size=0).check()


@pytest.mark.slow
def test_compiled_denoiser_gives_the_eager_log_probs_and_gradients():
    """``policy.compile``: the same log-probs and gradients (float rounding), the same parameter
    names (checkpoints and saved adapters are unchanged)."""
    torch.manual_seed(0)
    eager = DiffusionPolicy()
    torch.manual_seed(0)
    compiled = DiffusionPolicy(DiffusionPolicyConfig(compile=True))
    assert [n for n, _ in compiled.named_parameters()] == [n for n, _ in eager.named_parameters()]
    rollout = DDIMSampler(DDIMSamplerConfig(num_steps=2, batch_size=2)).sample(
        eager, [Context("a red circle"), Context("a blue square")], torch.Generator().manual_seed(0))
    out = []
    for policy in (eager, compiled):
        lp = policy(rollout, torch.tensor([[0, 1], [1, 0]]))
        lp.sum().backward()
        out.append((lp.detach(), [p.grad.clone() for p in policy.trainable_parameters()]))
    torch.testing.assert_close(out[1][0], out[0][0], atol=1e-5, rtol=1e-5)
    scale = max(float(g.abs().max()) for g in out[0][1])
    for a, b in zip(out[0][1], out[1][1]):  # fused kernels round differently: 1e-3 of the largest gradient
        torch.testing.assert_close(b, a, atol=1e-3 * scale, rtol=1e-3)
