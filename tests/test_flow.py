"""Tests of the flow plugin (Flow-GRPO, DiffusionNFT) on the tiny SD3-layout model in ``assets/tiny-flow``.

CPU only, no mocks: the SDE step and its log-prob are checked against numbers computed with
Flow-GRPO's ``sde_step_with_logprob`` on fixed tensors, the sampler's ODE against the plain
``StableDiffusion3Pipeline``, the saved LoRA against plain ``load_lora_weights``; a few iterations
of ``flow_grpo`` and ``diffusion_nft`` run through the loop.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
from pathlib import Path

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

import polyrl
from polyrl import ConfigError, Context
from polyrl.config import ComponentConfig, field_docs, from_dict
from polyrl.host import Host
from polyrl.plugins import flow as plugin
from polyrl.plugins.flow import (
    DiffusionNFTConfig, FlowGRPOConfig, FlowPolicy, FlowPolicyConfig, FlowSDESampler, FlowSDESamplerConfig,
    ode_step, sde_step_with_logprob,
)
from polyrl.plugins.flow.grpo import flow_kl
from polyrl.plugins.flow.nft import nft_loss

ROOT = Path(polyrl.__file__).resolve().parent.parent
TINY_FLOW = ROOT / "assets" / "tiny-flow"
PROMPTS = ["a red circle on the left", "a blue star at the top", "a green square in the center", "a yellow triangle on the right"]


def contexts(prompts: list[str] = PROMPTS) -> list[Context]:
    return [Context(prompt=p, group=i) for i, p in enumerate(prompts)]


def perturb_lora(policy: FlowPolicy, seed: int = 0, scale: float = 0.1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


@pytest.fixture(scope="module")
def policy() -> FlowPolicy:
    """The policy on tiny-flow with a rank-4 adapter; tests must not change its weights."""
    torch.manual_seed(0)
    return FlowPolicy(FlowPolicyConfig(pretrained=str(TINY_FLOW), lora_rank=4, lora_alpha=4.0))


@pytest.fixture(scope="module")
def rollout(policy):
    return FlowSDESampler(FlowSDESamplerConfig(num_steps=4, batch_size=3)).sample(
        policy, contexts(), torch.Generator().manual_seed(1))


# ------------------------------------------------------------------------------ the step
# Reference numbers: Flow-GRPO's sde_step_with_logprob (flow_grpo/diffusers_patch/
# sd3_sde_with_logprob.py) called with a FlowMatchEulerDiscreteScheduler(shift=3.0) set to 10 steps,
# at step indices 0, 4 and 9 (sigma 1 -> 0.9601, 0.7904 -> 0.7073, 0.0089 -> 0), noise_level 0.7,
# on the tensors of _fixed_tensors().
REF_LOG_PROB = [-0.81935388, -1.7417691, -8722.9746]
REF_STD_DEV_T = [3.5056713, 1.3592027, 0.066441059]  # Flow-GRPO's std_dev_t: s, not s * sqrt(-dt)
REF_MEAN_SUM = [-0.59018821, -0.31475389, 0.46694195]
REF_MEAN_FIRST = [0.75500005, 0.59790599, 0.20575695]
REF_MEAN_LAST = [0.11462243, -0.49662852, -0.91268623]


def _fixed_tensors():
    n = 3 * 2 * 2 * 2
    i = torch.arange(n, dtype=torch.float32)
    v = torch.sin(i).reshape(3, 2, 2, 2)
    x = torch.cos(0.7 * i).reshape(3, 2, 2, 2)
    prev = 0.5 * torch.sin(1.3 * i + 0.2).reshape(3, 2, 2, 2)
    return v, x, prev


def _reference_sigmas():
    sch = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    sch.set_timesteps(10)
    steps = torch.tensor([0, 4, 9])
    return sch.sigmas[steps], sch.sigmas[steps + 1], float(sch.sigmas[1])


def test_sde_step_and_log_prob_match_flow_grpo():
    v, x, prev = _fixed_tensors()
    sigma, sigma_next, sigma_max = _reference_sigmas()
    x_next, log_prob, mean, std = sde_step_with_logprob(v, x, sigma, sigma_next, 0.7, sigma_max, prev_sample=prev)
    torch.testing.assert_close(log_prob, torch.tensor(REF_LOG_PROB), rtol=2e-6, atol=1e-5)
    torch.testing.assert_close(mean.flatten(1).sum(1), torch.tensor(REF_MEAN_SUM), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mean.flatten(1)[:, 0], torch.tensor(REF_MEAN_FIRST), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(mean.flatten(1)[:, -1], torch.tensor(REF_MEAN_LAST), rtol=1e-6, atol=1e-6)
    s = torch.tensor(REF_STD_DEV_T)
    torch.testing.assert_close(std.flatten(), s * (sigma - sigma_next).sqrt(), rtol=1e-6, atol=1e-7)
    assert torch.equal(x_next, prev)


def test_sde_step_samples_its_gaussian_and_is_float32():
    v, x, _ = _fixed_tensors()
    sigma, sigma_next, sigma_max = _reference_sigmas()
    eps = torch.cos(torch.arange(24.0)).reshape(3, 2, 2, 2)
    x_next, log_prob, mean, std = sde_step_with_logprob(v.half(), x.bfloat16(), sigma, sigma_next, 0.7, sigma_max,
                                                        noise=eps)
    assert x_next.dtype == log_prob.dtype == torch.float32
    torch.testing.assert_close(x_next, mean + std * eps)
    direct = torch.distributions.Normal(mean, std.expand_as(mean)).log_prob(x_next).flatten(1).mean(1)
    torch.testing.assert_close(log_prob, direct)
    # a = 0 would be the ODE: the mean then is the Euler step
    _, _, mean0, _ = sde_step_with_logprob(v, x, sigma, sigma_next, 1e-12, sigma_max, prev_sample=x)
    torch.testing.assert_close(mean0, ode_step(v, x, sigma, sigma_next))


def test_kl_forms_and_nft_loss():
    mean, ref = torch.ones(2, 3), torch.zeros(2, 3)
    s, dt = torch.tensor([0.5, 1.0]), torch.tensor([-0.1, -0.2])
    torch.testing.assert_close(flow_kl(mean, ref, s, dt), torch.tensor([2.0, 0.5]))
    torch.testing.assert_close(flow_kl(mean, ref, s, dt, "gaussian"), torch.tensor([20.0, 2.5]))
    # NFT: with v = v_old the positive and negative predictions coincide with the old one
    g = torch.Generator().manual_seed(0)
    v, x0, noise = (torch.randn(2, 4, 2, 2, generator=g) for _ in range(3))
    sigma = torch.tensor([0.3, 0.8])
    xs = (1 - sigma.view(2, 1, 1, 1)) * x0 + sigma.view(2, 1, 1, 1) * noise
    loss, stats = nft_loss(v, v, xs, x0, sigma, torch.tensor([1.0, 0.0]), 1.0, 5.0)
    assert stats["positive_loss"] == pytest.approx(stats["negative_loss"])
    # the gradient of the positive branch pulls x0+ towards x0, the negative branch pushes away
    w = v.clone().requires_grad_(True)
    loss_pos, _ = nft_loss(w, v, xs, x0, sigma, torch.ones(2), 1.0, 5.0)
    loss_pos.backward()
    direction = (xs - sigma.view(2, 1, 1, 1) * v - x0)  # x0+ - x0 at w = v
    assert (w.grad * direction).sum() < 0  # d x0+ / dv = -sigma: descending lowers ||x0+ - x0||
    w.grad = None
    loss_neg, _ = nft_loss(w, v, xs, x0, sigma, torch.zeros(2), 1.0, 5.0)
    loss_neg.backward()
    assert (w.grad * direction).sum() > 0


# ------------------------------------------------------------------------------ policy and sampler
def test_tiny_flow_is_a_plain_sd3_pipeline():
    pipe = StableDiffusion3Pipeline.from_pretrained(TINY_FLOW, text_encoder_3=None, tokenizer_3=None)
    assert type(pipe.transformer).__name__ == "SD3Transformer2DModel"
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler" and pipe.scheduler.config.shift == 3.0
    size = sum(f.stat().st_size for f in TINY_FLOW.rglob("*") if f.is_file())
    assert size < 10e6


def test_sampler_rollout_and_forward_reproduce_log_probs(policy, rollout):
    b, t = 4, 4
    assert rollout.log_probs.shape == (b, t) and rollout.mask.all()
    assert rollout.data["trajectory"].shape == (b, t + 1, 4, 8, 8) and rollout.outputs["images"].shape == (b, 3, 64, 64)
    sig = rollout.data["sigmas"][0]
    assert sig[0] == 1.0 and (sig[1:] < sig[:-1]).all() and rollout.meta["sigma_max"] == pytest.approx(float(sig[1]))
    assert torch.equal(rollout.data["trajectory"][:, -1], rollout.data["final_latents"])  # all steps stochastic
    with torch.no_grad():
        again = policy(rollout)
        subset = policy(rollout, torch.tensor([[3, 0]] * b))
        ref = policy.reference_log_probs(rollout)
    torch.testing.assert_close(again, rollout.log_probs, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(subset, rollout.log_probs[:, [3, 0]], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(ref, rollout.log_probs, atol=1e-4, rtol=1e-5)  # LoRA B starts at zero


def test_sampler_is_chunk_independent_and_windowed(policy):
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    a = FlowSDESampler(FlowSDESamplerConfig(num_steps=4, batch_size=4)).sample(policy, contexts(), g())
    b = FlowSDESampler(FlowSDESamplerConfig(num_steps=4, batch_size=1)).sample(policy, contexts(), g())
    torch.testing.assert_close(a.outputs["images"], b.outputs["images"], atol=1e-5, rtol=1e-5)
    win = FlowSDESampler(FlowSDESamplerConfig(num_steps=6, sde_window_size=2, sde_window_range=[1, 5]))
    r = win.sample(policy, contexts(), torch.Generator().manual_seed(5))
    steps = r.data["step_index"][0]
    assert r.log_probs.shape == (4, 2) and 1 <= int(steps[0]) <= 3 and int(steps[1]) == int(steps[0]) + 1
    sched = r.data["schedule"][0]
    torch.testing.assert_close(r.data["sigmas"][0], sched[steps])
    with torch.no_grad():
        torch.testing.assert_close(policy(r), r.log_probs, atol=1e-4, rtol=1e-5)
    guided = FlowSDESampler(FlowSDESamplerConfig(num_steps=2, guidance_scale=3.0)).sample(
        policy, contexts(PROMPTS[:2]), torch.Generator().manual_seed(0))
    assert guided.shared["negative_prompt_embeds"].shape[0] == 1 and "negative_prompt_embeds" not in guided.data
    with torch.no_grad():
        torch.testing.assert_close(policy(guided), guided.log_probs, atol=1e-4, rtol=1e-5)


def test_ode_sampling_matches_the_diffusers_pipeline(policy):
    """noise_level 0 is the flow's Euler ODE: the same images as StableDiffusion3Pipeline."""
    sampler = FlowSDESampler(FlowSDESamplerConfig(num_steps=5, noise_level=0.0, guidance_scale=2.0))
    gen = torch.Generator().manual_seed(7)
    ours = sampler.sample(policy, contexts(PROMPTS[:2]), gen)
    assert ours.log_probs.shape == (2, 0)
    init = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(7))
    pipe = StableDiffusion3Pipeline.from_pretrained(TINY_FLOW, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        theirs = pipe(PROMPTS[:2], num_inference_steps=5, guidance_scale=2.0, latents=init, height=64, width=64,
                      output_type="pt", max_sequence_length=0).images
    torch.testing.assert_close(ours.outputs["images"], theirs.float(), atol=2e-4, rtol=1e-4)


def test_gradients_reach_lora_only(policy, rollout):
    policy.zero_grad(set_to_none=True)
    out = policy(rollout, torch.tensor([[1]] * 4), with_mean=True)
    assert set(out) == {"log_probs", "mean", "std", "noise_scale"}
    out["log_probs"].sum().backward()
    grads = {n for n, p in policy.named_parameters() if p.grad is not None}
    assert grads and all("lora" in n for n in grads)
    assert any("add_q_proj" in n for n in grads)  # the joint (text-stream) attention is adapted too
    policy.zero_grad(set_to_none=True)


def test_save_pretrained_loads_in_plain_diffusers(tmp_path):
    torch.manual_seed(0)
    pol = FlowPolicy(FlowPolicyConfig(pretrained=str(TINY_FLOW), lora_rank=2, lora_alpha=6.0))
    perturb_lora(pol)
    pol.save_pretrained(str(tmp_path))
    assert (tmp_path / "pytorch_lora_weights.safetensors").is_file()
    pipe = StableDiffusion3Pipeline.from_pretrained(TINY_FLOW, text_encoder_3=None, tokenizer_3=None)
    base = StableDiffusion3Pipeline.from_pretrained(TINY_FLOW, text_encoder_3=None, tokenizer_3=None)
    pipe.load_lora_weights(str(tmp_path))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    emb = pol.encode_prompts(PROMPTS[:2])
    kw = dict(timestep=torch.tensor([900.0, 300.0]), encoder_hidden_states=emb["prompt_embeds"],
              pooled_projections=emb["pooled_prompt_embeds"])
    with torch.no_grad():
        ours = pol.transformer(hidden_states=x, **kw).sample
        theirs = pipe.transformer(hidden_states=x, **kw).sample
        plain = base.transformer(hidden_states=x, **kw).sample
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    assert (plain - ours).abs().max() > 1e-3


# ------------------------------------------------------------------------------ plugin & config
def test_plugin_registers_components():
    (pol,) = plugin.polyrl_policies()
    (smp,) = plugin.polyrl_samplers()
    updates = {s.name: s for s in plugin.polyrl_updates()}
    assert pol.name == "flow" and pol.rollout == "flow_steps" and smp.produces == ("images",)
    assert set(updates) == {"flow_grpo", "diffusion_nft"}
    assert "reference" in updates["flow_grpo"].requirements_for(FlowGRPOConfig(beta=0.04))
    assert "reference" not in updates["flow_grpo"].requirements_for(FlowGRPOConfig(beta=0.0))
    for cls in (FlowPolicyConfig, FlowSDESamplerConfig, FlowGRPOConfig, DiffusionNFTConfig):
        assert set(field_docs(cls)) == {f.name for f in dataclasses.fields(cls)}, cls


def run_config(**sections) -> dict:
    data = {
        "run": {"iterations": 2, "prompts_per_iteration": 2, "samples_per_prompt": 2, "progress": False,
                "report": False},
        "prompts": {"items": PROMPTS},
        "policy": {"name": "flow", "pretrained": "assets/tiny-flow", "lora_rank": 4},
        "sampler": {"name": "flow_sde", "num_steps": 3},
        "rewards": {"shape_match": {"weight": 1.0}},
        "update": {"name": "flow_grpo", "train_batch_size": 2},
    }
    for k, v in sections.items():
        data[k] = {**data.get(k, {}), **v} if k in ("run", "optimizer") else v
    return data


def test_config_errors_before_loading():
    host = Host()
    with pytest.raises(ConfigError, match="sde_window_size"):
        from_dict(FlowSDESamplerConfig, {"num_steps": 4, "sde_window_size": 5}, "sampler")
    with pytest.raises(ConfigError, match="sde_window_range"):
        from_dict(FlowSDESamplerConfig, {"num_steps": 6, "sde_window_size": 2, "sde_window_range": [3, 4]}, "sampler")
    with pytest.raises(ConfigError, match="no such folder"):
        from_dict(FlowPolicyConfig, {"pretrained": "./models/no-flow-here"}, "policy")
    with pytest.raises(ConfigError, match="StableDiffusionPipeline; the flow policy accepts"):
        from_dict(FlowPolicyConfig, {"pretrained": "assets/tiny-sd"}, "policy")
    with pytest.raises(ConfigError, match="noise_level"):
        host.build_config(run_config(sampler={"name": "flow_sde", "noise_level": 0.0}))
    with pytest.raises(ConfigError, match="needs policy 'flow'"):
        FlowSDESamplerConfig().check_run(types.SimpleNamespace(policy=ComponentConfig("lcm", object())))
    with pytest.raises(ConfigError):  # a flow update on a diffusion policy's rollouts
        host.build_config(run_config(policy={"name": "diffusion"}, sampler={"name": "ddim"}))
    cfg = host.build_config(run_config(update={"name": "diffusion_nft", "train_batch_size": 2},
                                       sampler={"name": "flow_sde", "noise_level": 0.0}))
    assert cfg.update.params.nft_beta == 1.0


# ------------------------------------------------------------------------------ training
def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("name, update, sampler", [
    ("flow_grpo", {"name": "flow_grpo", "train_batch_size": 2, "gradient_accumulation_batches": 2, "beta": 0.04},
     {"num_steps": 3}),
    ("flow_grpo_window", {"name": "flow_grpo", "train_batch_size": 4, "beta": 0.04},
     {"num_steps": 4, "sde_window_size": 2}),
    ("diffusion_nft", {"name": "diffusion_nft", "train_batch_size": 2, "gradient_accumulation_batches": 2},
     {"num_steps": 3, "noise_level": 0.0}),
])
def test_flow_updates_train_on_the_tiny_world(tmp_path, name, update, sampler):
    """A few iterations through the loop; the KL is 0 at the first update (the adapter starts as
    the identity) and the LoRA trained and saved loads in plain diffusers."""
    from safetensors.torch import load_file

    from polyrl.loop import train

    run = tmp_path / name
    host = Host()
    data = run_config(update=update, sampler={"name": "flow_sde", **sampler},
                      run={"output_dir": str(run), "iterations": 2, "save_every": 2}, optimizer={"lr": 1.0e-3},
                      rewards={"clip_score": {"weight": 1.0}, "shape_match": {"weight": 0.0}})  # clip_score: never a tie
    train(host.build_config(data), host)
    metrics = _metrics(run)
    assert [m["iteration"] for m in metrics] == [1, 2]
    for m in metrics:
        assert 0 <= m["reward/shape_match"] <= 1 and math.isfinite(m["loss"])
        assert m["advantage_abs_mean"] > 0 and m["grad_norm"] > 0
    if name.startswith("flow_grpo"):
        # one optimizer step per iteration: the whole first update runs at the base weights, where
        # the KL is exactly 0 and every ratio is 1
        assert metrics[0]["kl"] == 0.0 and metrics[0]["clipfrac"] == 0.0
        assert metrics[1]["kl"] > 0.0
    else:
        assert metrics[0]["old_deviation"] == pytest.approx(0.0, abs=1e-12)
    lora_b = [v for k, v in load_file(str(run / "checkpoints" / "iter_000002" / "trainable.safetensors")).items()
              if "lora_B" in k]
    assert lora_b and max(v.abs().max().item() for v in lora_b) > 0
    pipe = StableDiffusion3Pipeline.from_pretrained(TINY_FLOW, text_encoder_3=None, tokenizer_3=None)
    pipe.load_lora_weights(str(run / "policy"))


# ------------------------------------------------------------------------------ the FLUX layout
@pytest.fixture(scope="module")
def tiny_flux(tmp_path_factory) -> Path:
    """A FluxPipeline folder with random weights in the real format: a 1+1-block FluxTransformer2DModel
    with a guidance embedding on 2x2-packed latents, the tiny SD's VAE and CLIP text encoder, a
    1-layer T5 encoder with a Unigram tokenizer, FLUX's resolution-dependent shift."""
    from diffusers import AutoencoderKL, FluxPipeline, FluxTransformer2DModel
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

    words = "a red green blue yellow purple circle square triangle star on the left right top bottom center at in".split()
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("\u2581" + w, -1.0) for w in words]
    tk = Tokenizer(models.Unigram(vocab, unk_id=2))
    tk.pre_tokenizer, tk.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    torch.manual_seed(0)
    sd = ROOT / "assets" / "tiny-sd"
    vae = AutoencoderKL.from_pretrained(sd / "vae")
    vae.register_to_config(shift_factor=0.08)
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15),
        vae=vae, text_encoder=CLIPTextModel.from_pretrained(sd / "text_encoder"),
        tokenizer=CLIPTokenizer.from_pretrained(sd / "tokenizer"),
        text_encoder_2=T5EncoderModel(T5Config(vocab_size=len(vocab), d_model=32, d_kv=8, d_ff=64, num_layers=1,
                                               num_heads=4, pad_token_id=0, eos_token_id=1)),
        tokenizer_2=T5TokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                    extra_ids=0),
        transformer=FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                           attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                           pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 6, 6)),
    )
    folder = tmp_path_factory.mktemp("tiny-flux")
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.mark.slow
def test_flux_layout_sampling_log_probs_and_lora(tiny_flux, tmp_path):
    from diffusers import FluxPipeline

    pol = FlowPolicy(FlowPolicyConfig(pretrained=str(tiny_flux), lora_rank=2, max_sequence_length=12))
    assert pol.layout == "flux" and pol.latent_shape(64, 64) == (16, 16)
    # the ODE with the embedded guidance is FluxPipeline's sampling, the resolution-dependent shift included
    ode = FlowSDESampler(FlowSDESamplerConfig(num_steps=3, noise_level=0.0, guidance_scale=3.5, height=64, width=64))
    ours = ode.sample(pol, contexts(PROMPTS[:2]), torch.Generator().manual_seed(7))
    pipe = FluxPipeline.from_pretrained(tiny_flux)
    pipe.set_progress_bar_config(disable=True)
    init = torch.randn(2, 16, 16, generator=torch.Generator().manual_seed(7))  # packed latents
    with torch.no_grad():
        theirs = pipe(PROMPTS[:2], num_inference_steps=3, guidance_scale=3.5, height=64, width=64, latents=init,
                      output_type="pt", max_sequence_length=12).images
    torch.testing.assert_close(ours.outputs["images"], theirs.float(), atol=1e-4, rtol=1e-4)
    # SDE rollouts are rescored exactly; the LoRA (joint and single blocks) loads with FluxPipeline
    sde = FlowSDESampler(FlowSDESamplerConfig(num_steps=3, guidance_scale=3.5, height=64, width=64))
    rollout = sde.sample(pol, contexts(PROMPTS[:2]), torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(pol(rollout), rollout.log_probs, atol=1e-4, rtol=1e-5)
    perturb_lora(pol)
    pol.save_pretrained(str(tmp_path))
    pipe.load_lora_weights(str(tmp_path))
    emb = pol.encode_prompts(PROMPTS[:2])
    pol.set_latent_grid(64, 64)
    with torch.no_grad():
        v_ours = pol.velocity(init, torch.tensor([0.9, 0.4]), emb, None, 3.5)
        pol.transformer, saved = pipe.transformer, pol.transformer
        try:
            v_theirs = pol.velocity(init, torch.tensor([0.9, 0.4]), emb, None, 3.5)
        finally:
            pol.transformer = saved
    torch.testing.assert_close(v_theirs, v_ours, atol=1e-5, rtol=1e-5)
