"""Tests of the diffusion plugin on the real tiny Stable Diffusion pipeline in ``assets/tiny-sd``.

CPU only, no mocks: the DDIM step is checked against diffusers' ``DDIMScheduler.step`` and
``torch.distributions.Normal``, the sampler against ``StableDiffusionPipeline``, the saved LoRA
against plain ``load_lora_weights``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

import polyrl
from polyrl import ComponentSpec, ConfigError, Context
from polyrl.config import field_docs, from_dict
from polyrl.plugins import diffusion as plugin
from polyrl.plugins.diffusion import (
    DDIMSampler,
    DDIMSamplerConfig,
    DiffusionPolicy,
    DiffusionPolicyConfig,
    ddim_step_with_logprob,
)
from polyrl.plugins.diffusion.ddim import ddim_std
from polyrl.paths import resolve_path

TINY_SD = Path(polyrl.__file__).resolve().parent.parent / "assets" / "tiny-sd"
PROMPTS = ["a photo of a cat", "a red circle", "a dog riding a bike", "a blue square"]
STEPS = 5


def contexts(prompts: list[str] = PROMPTS) -> list[Context]:
    return [Context(prompt=p, group=i) for i, p in enumerate(prompts)]


def perturb_lora(policy: DiffusionPolicy, seed: int = 0, scale: float = 0.1) -> None:
    """Give every LoRA weight a random value (LoRA B starts at zero, i.e. the base model)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


@pytest.fixture(scope="module")
def policy() -> DiffusionPolicy:
    """The default policy on tiny-sd; tests must not change its weights."""
    torch.manual_seed(0)
    return DiffusionPolicy(DiffusionPolicyConfig(pretrained=str(TINY_SD)))


@pytest.fixture(scope="module")
def rollout(policy):
    sampler = DDIMSampler(DDIMSamplerConfig(num_steps=STEPS, batch_size=2))
    return sampler.sample(policy, contexts(), torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def perturbed() -> DiffusionPolicy:
    """A policy with lora_alpha != lora_rank and random (non-zero) LoRA weights."""
    torch.manual_seed(0)
    pol = DiffusionPolicy(DiffusionPolicyConfig(pretrained=str(TINY_SD), lora_rank=2, lora_alpha=6.0))
    perturb_lora(pol)
    return pol


def scheduler(prediction_type: str = "epsilon", num_steps: int = 10) -> DDIMScheduler:
    s = DDIMScheduler.from_pretrained(TINY_SD, subfolder="scheduler", prediction_type=prediction_type)
    s.set_timesteps(num_steps)
    return s


# ------------------------------------------------------------------------------ (a) DDIM step
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_step_matches_diffusers_and_normal(prediction_type, eta):
    sch = scheduler(prediction_type)
    g = torch.Generator().manual_seed(0)
    b = 3
    for t in sch.timesteps:  # includes the last step, whose previous timestep is negative
        x = torch.randn(b, 4, 8, 8, generator=g)
        out = torch.randn(b, 4, 8, 8, generator=g)
        z = torch.randn(b, 4, 8, 8, generator=g)
        prev, log_prob = ddim_step_with_logprob(sch, out, t.expand(b), x, eta, noise=z)
        ref = sch.step(out, t, x, eta=eta, variance_noise=z).prev_sample
        torch.testing.assert_close(prev, ref, atol=1e-5, rtol=1e-5)
        assert log_prob.shape == (b,)
        if eta == 0:
            assert torch.equal(log_prob, torch.zeros(b))
            continue
        mean = sch.step(out, t, x, eta=eta, variance_noise=torch.zeros_like(z)).prev_sample
        prev_t = int(t) - sch.config.num_train_timesteps // sch.num_inference_steps
        std = eta * sch._get_variance(int(t), prev_t) ** 0.5
        direct = torch.distributions.Normal(mean, std).log_prob(prev).mean(dim=(1, 2, 3))
        torch.testing.assert_close(log_prob, direct, atol=1e-4, rtol=1e-5)
        # scoring a given sample gives the log-prob of the drawn one
        _, scored = ddim_step_with_logprob(sch, out, t.expand(b), x, eta, prev_sample=prev)
        torch.testing.assert_close(scored, log_prob)


def test_ddim_noise_scale_follows_reference():
    """With SD's schedule, 50 steps and η = 1, σ_t runs from about 0.45 down to 0.04."""
    sch = scheduler(num_steps=50)
    std = ddim_std(sch, sch.timesteps, 1.0)
    assert std.shape == (50,) and (std[:-1] > std[1:]).all()
    assert abs(std[0].item() - 0.45) < 0.01 and abs(std[-2].item() - 0.04) < 0.005


def test_ddim_step_per_sample_timesteps_and_generator():
    sch = scheduler()
    g = torch.Generator().manual_seed(0)
    t = sch.timesteps[torch.tensor([0, 9, 4, 9])]
    x, out = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    prev = torch.randn(4, 4, 8, 8, generator=g)
    _, batched = ddim_step_with_logprob(sch, out, t, x, 1.0, prev_sample=prev)
    for i in range(4):
        _, single = ddim_step_with_logprob(
            sch, out[i : i + 1], int(t[i]), x[i : i + 1], 1.0, prev_sample=prev[i : i + 1]
        )
        torch.testing.assert_close(batched[i : i + 1], single)
    # noise comes from the generator, drawn on the CPU as torch.randn
    drawn, _ = ddim_step_with_logprob(sch, out, t, x, 1.0, generator=torch.Generator().manual_seed(5))
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    expected, _ = ddim_step_with_logprob(sch, out, t, x, 1.0, noise=z)
    assert torch.equal(drawn, expected)
    # the log-prob is differentiable in the model output
    out.requires_grad_(True)
    _, lp = ddim_step_with_logprob(sch, out, t, x, 1.0, prev_sample=prev)
    lp.sum().backward()
    assert out.grad is not None and out.grad.abs().sum() > 0


# ------------------------------------------------------------------------------ (b) sampler
def test_sampler_rollout(policy, rollout):
    b, (c, h, w) = len(PROMPTS), policy.latent_shape
    assert (c, h, w) == (4, 8, 8)
    assert rollout.log_probs.shape == (b, STEPS) and rollout.mask.shape == (b, STEPS)
    assert rollout.mask.dtype == torch.bool and rollout.mask.all()
    assert torch.isfinite(rollout.log_probs).all()
    assert rollout.data["trajectory"].shape == (b, STEPS + 1, c, h, w)  # the chain, stored once
    assert "latents" not in rollout.data and "next_latents" not in rollout.data
    policy.set_num_steps(STEPS)
    assert torch.equal(rollout.data["timesteps"], policy.scheduler.timesteps.expand(b, STEPS))
    assert rollout.data["prompt_embeds"].shape == (b, 77, 32)
    assert rollout.shared["negative_prompt_embeds"].shape == (1, 77, 32)  # not copied per sample
    assert "negative_prompt_embeds" not in rollout.data
    images = rollout.outputs["images"]
    assert images.shape == (b, 3, 64, 64) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1
    assert (images[0] - images[1]).abs().mean() > 1e-2, "images must vary with the latents"
    assert rollout.meta == {"eta": 1.0, "guidance_scale": 5.0, "num_steps": STEPS}
    assert rollout.prompts == PROMPTS


def test_sampler_is_deterministic_and_chunk_independent(policy, rollout):
    sampler = DDIMSampler(DDIMSamplerConfig(num_steps=STEPS, batch_size=2))
    again = sampler.sample(policy, contexts(), torch.Generator().manual_seed(1))
    assert torch.equal(again.log_probs, rollout.log_probs)
    assert torch.equal(again.outputs["images"], rollout.outputs["images"])
    other = sampler.sample(policy, contexts(), torch.Generator().manual_seed(2))
    assert not torch.allclose(other.outputs["images"], rollout.outputs["images"])
    # one UNet batch instead of two: the same samples
    whole = DDIMSampler(DDIMSamplerConfig(num_steps=STEPS, batch_size=8))
    one = whole.sample(policy, contexts(), torch.Generator().manual_seed(1))
    torch.testing.assert_close(one.data["trajectory"], rollout.data["trajectory"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(one.log_probs, rollout.log_probs, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_sampler_matches_diffusers_pipeline_at_eta_0(policy):
    """With η = 0 the sampler is plain DDIM: the same images as StableDiffusionPipeline."""
    prompts = PROMPTS[:2]
    sampler = DDIMSampler(DDIMSamplerConfig(num_steps=STEPS, eta=0.0))  # no check(): eta 0 on purpose
    ours = sampler.sample(policy, contexts(prompts), torch.Generator().manual_seed(3))
    init = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(3))
    theirs = policy.pipeline(
        prompts, num_inference_steps=STEPS, eta=0.0, guidance_scale=5.0, latents=init, output_type="pt"
    ).images
    torch.testing.assert_close(ours.outputs["images"], theirs, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------ (c) forward
def test_forward_reproduces_sampler_log_probs(policy, rollout):
    with torch.no_grad():
        all_steps = policy(rollout)
    torch.testing.assert_close(all_steps, rollout.log_probs, atol=1e-4, rtol=0)
    g = torch.Generator().manual_seed(0)
    steps = torch.stack([torch.randperm(STEPS, generator=g) for _ in range(rollout.batch_size)])
    with torch.no_grad():
        shuffled = policy(rollout, steps)
    torch.testing.assert_close(shuffled, rollout.log_probs.gather(1, steps), atol=1e-4, rtol=0)
    # a subset of the batch, a subset of the steps
    sub = rollout.select([2, 0])
    with torch.no_grad():
        part = policy(sub, steps[[2, 0], :2])
    torch.testing.assert_close(part, rollout.log_probs[[2, 0]].gather(1, steps[[2, 0], :2]), atol=1e-4, rtol=0)


def test_gradients_reach_lora_only(policy, rollout):
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert all(n.startswith("unet.") for n in trainable)
    assert {n for n, _ in policy.named_children()} == {"unet", "vae", "text_encoder"}
    policy.zero_grad(set_to_none=True)
    steps = torch.tensor([[0], [2], [4], [1]])
    policy(rollout, steps).sum().backward()
    for n, p in policy.named_parameters():
        if n in trainable:
            assert p.grad is not None, n
        else:
            assert p.grad is None, n
    lora_b = [p.grad for n, p in policy.named_parameters() if ".lora_B." in n]
    assert all(torch.isfinite(gr).all() for gr in lora_b) and sum(gr.abs().sum() for gr in lora_b) > 0
    policy.zero_grad(set_to_none=True)


# ------------------------------------------------------------------------------ (d) save / load
def test_save_pretrained_loads_in_plain_diffusers(perturbed, tmp_path):
    perturbed.save_pretrained(str(tmp_path))
    assert (tmp_path / "pytorch_lora_weights.safetensors").is_file()
    pipe = StableDiffusionPipeline.from_pretrained(TINY_SD)
    pipe.load_lora_weights(str(tmp_path))
    g = torch.Generator().manual_seed(0)
    x, emb = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    t = torch.tensor([901, 101])
    with torch.no_grad():
        ours = perturbed.unet(x, t, encoder_hidden_states=emb).sample
        theirs = pipe.unet(x, t, encoder_hidden_states=emb).sample
        base = StableDiffusionPipeline.from_pretrained(TINY_SD).unet(x, t, encoder_hidden_states=emb).sample
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    assert (ours - base).abs().max() > 1e-3, "the perturbed LoRA must change the UNet"


def test_trainable_state_dict_round_trip(perturbed, rollout):
    state = perturbed.trainable_state_dict()
    assert state and all(".lora_" in k for k in state)
    with torch.no_grad():
        before = perturbed(rollout, torch.zeros(rollout.batch_size, 1, dtype=torch.long))
    perturb_lora(perturbed, seed=1)
    perturbed.load_trainable_state_dict(state)
    with torch.no_grad():
        after = perturbed(rollout, torch.zeros(rollout.batch_size, 1, dtype=torch.long))
    torch.testing.assert_close(after, before)
    with pytest.raises(ValueError, match="does not match"):
        perturbed.load_trainable_state_dict({k: v for k, v in list(state.items())[1:]})


# ------------------------------------------------------------------------------ (e) reference
def test_reference_log_probs_are_the_base_model(policy, perturbed, rollout):
    steps = torch.tensor([[0, 3], [1, 4], [2, 0], [4, 2]])
    with torch.no_grad():
        current = perturbed(rollout, steps)
    ref = perturbed.reference_log_probs(rollout, steps)
    assert not ref.requires_grad
    # the unperturbed policy's LoRA B is zero: its log-probs are the base model's
    torch.testing.assert_close(ref, rollout.log_probs.gather(1, steps), atol=1e-4, rtol=0)
    assert (current - ref).abs().max() > 1e-3
    # the adapter is active again afterwards
    with torch.no_grad():
        torch.testing.assert_close(perturbed(rollout, steps), current)


def test_full_unet_training(rollout, tmp_path):
    torch.manual_seed(0)
    full = DiffusionPolicy(DiffusionPolicyConfig(pretrained=str(TINY_SD), train_full_unet=True))
    assert {n for n, p in full.named_parameters() if p.requires_grad} == {
        f"unet.{n}" for n, _ in full.unet.named_parameters()
    }
    with torch.no_grad():
        torch.testing.assert_close(
            full(rollout, torch.tensor([[0], [1], [2], [3]])),
            rollout.log_probs[:, :4].diagonal()[:, None],
            atol=1e-4,
            rtol=0,
        )
    with pytest.raises(NotImplementedError, match="train_full_unet"):
        full.reference_log_probs(rollout)
    full.save_pretrained(str(tmp_path))
    assert (tmp_path / "unet" / "config.json").is_file()


# ------------------------------------------------------------------------------ plugin & config
def test_plugin_registers_components():
    (pol,) = plugin.polyrl_policies()
    (smp,) = plugin.polyrl_samplers()
    assert isinstance(pol, ComponentSpec) and pol.name == "diffusion" and pol.modality == "image"
    assert pol.config_cls is DiffusionPolicyConfig
    assert smp.name == "ddim" and smp.modality == "image" and smp.produces == ("images",)
    assert isinstance(smp.factory(DDIMSamplerConfig(), policy=None), DDIMSampler)
    for cls in (DiffusionPolicyConfig, DDIMSamplerConfig):
        documented = field_docs(cls)
        assert set(documented) == {f.name for f in dataclasses.fields(cls)}, cls


def test_config_validation(tmp_path, monkeypatch):
    cfg = from_dict(DiffusionPolicyConfig, {"lora_rank": 8, "lora_target_modules": ["to_q"]}, "policy")
    assert cfg.lora_rank == 8 and cfg.lora_alpha is None
    with pytest.raises(ConfigError, match="eta"):
        from_dict(DDIMSamplerConfig, {"eta": 0.0}, "sampler")
    with pytest.raises(ConfigError, match="lora_rank"):
        from_dict(DiffusionPolicyConfig, {"lora_rank": 0}, "policy")
    with pytest.raises(ConfigError, match="no-such-model"):
        from_dict(DiffusionPolicyConfig, {"pretrained": "./models/no-such-model"}, "policy")
    # a relative asset path works from any directory of the checkout
    monkeypatch.chdir(tmp_path)
    assert Path(resolve_path("assets/tiny-sd")) == TINY_SD
    assert resolve_path("CompVis/stable-diffusion-v1-4") == "CompVis/stable-diffusion-v1-4"
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="model_index.json"):
        DiffusionPolicy(DiffusionPolicyConfig(pretrained=str(tmp_path / "empty")))


def test_encode_prompts_matches_pipeline(policy):
    ours = policy.encode_prompts(["a photo of a cat", ""])
    theirs, _ = policy.pipeline.encode_prompt(["a photo of a cat", ""], "cpu", 1, False)
    torch.testing.assert_close(ours, theirs)
    ids = policy.tokenizer("a photo of a cat", add_special_tokens=False).input_ids
    assert len(ids) == 5, "the tiny tokenizer keeps prompt words whole"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(rollout):
    """The same generator gives the same samples on the GPU (noise is drawn on the CPU), and the
    GPU policy rescores them."""
    torch.manual_seed(0)
    gpu = DiffusionPolicy(DiffusionPolicyConfig(pretrained=str(TINY_SD))).to("cuda")
    sampler = DDIMSampler(DDIMSamplerConfig(num_steps=STEPS, batch_size=2))
    out = sampler.sample(gpu, contexts(), torch.Generator().manual_seed(1))
    assert out.log_probs.device.type == "cuda" and out.outputs["images"].device.type == "cuda"
    torch.testing.assert_close(out.data["trajectory"].cpu(), rollout.data["trajectory"], atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(out.log_probs.cpu(), rollout.log_probs, atol=1e-3, rtol=1e-3)
    with torch.no_grad():
        torch.testing.assert_close(gpu(out), out.log_probs, atol=1e-4, rtol=0)
        torch.testing.assert_close(gpu(rollout), rollout.log_probs.cuda(), atol=1e-3, rtol=0)
