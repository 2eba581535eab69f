"""Tests of the LCM plugin (RLCM) on the tiny latent consistency model in ``assets/tiny-lcm``.

CPU only, no mocks: the consistency step is checked against diffusers' ``LCMScheduler.step`` and
a direct Gaussian density, the sampler against ``LatentConsistencyModelPipeline``, the saved LoRA
against plain ``load_lora_weights``; a few RLCM iterations (ddpo and rebel) run through the loop.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
from pathlib import Path

import pytest
import torch
from diffusers import LatentConsistencyModelPipeline, LCMScheduler

import polyrl
from polyrl import ComponentSpec, ConfigError, Context
from polyrl.config import ComponentConfig, field_docs, from_dict
from polyrl.host import Host
from polyrl.plugins import lcm as plugin
from polyrl.plugins.lcm import (
    LCMPolicy,
    LCMPolicyConfig,
    LCMSampler,
    LCMSamplerConfig,
    guidance_embedding,
    lcm_step_with_logprob,
    lcm_timesteps,
)
from polyrl.plugins.lcm.lcm import boundary_scalings, lcm_std, next_timesteps

ROOT = Path(polyrl.__file__).resolve().parent.parent
TINY_LCM = ROOT / "assets" / "tiny-lcm"
TINY_SD = ROOT / "assets" / "tiny-sd"
PROMPTS = ["a red circle on the left", "a blue star at the top", "a green square in the center", "a yellow triangle on the right"]
STEPS = 4


def contexts(prompts: list[str] = PROMPTS) -> list[Context]:
    return [Context(prompt=p, group=i) for i, p in enumerate(prompts)]


def perturb_lora(policy: LCMPolicy, seed: int = 0, scale: float = 0.1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


@pytest.fixture(scope="module")
def policy() -> LCMPolicy:
    """The default policy on tiny-lcm; tests must not change its weights."""
    torch.manual_seed(0)
    return LCMPolicy(LCMPolicyConfig(pretrained=str(TINY_LCM)))


@pytest.fixture(scope="module")
def rollout(policy):
    return LCMSampler(LCMSamplerConfig(num_steps=STEPS, batch_size=3)).sample(
        policy, contexts(), torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def perturbed() -> LCMPolicy:
    """r = 2, alpha = 6 and random (non-zero) LoRA weights."""
    torch.manual_seed(0)
    pol = LCMPolicy(LCMPolicyConfig(pretrained=str(TINY_LCM), lora_rank=2, lora_alpha=6.0))
    perturb_lora(pol)
    return pol


def scheduler(prediction_type: str = "epsilon") -> LCMScheduler:
    return LCMScheduler.from_pretrained(TINY_LCM, subfolder="scheduler", prediction_type=prediction_type)


# ------------------------------------------------------------------------------ the step
def test_timesteps_follow_reference():
    """The RLCM/LCM skipping-step schedule with 50 original steps."""
    assert lcm_timesteps(2).tolist() == [999, 499]
    assert lcm_timesteps(4).tolist() == [999, 759, 519, 279]
    assert lcm_timesteps(8).tolist() == [999, 879, 759, 639, 519, 399, 279, 159]
    assert lcm_timesteps(1).tolist() == [999]
    assert lcm_timesteps(16).tolist()[:3] == [999, 939, 879] and len(lcm_timesteps(16)) == 16
    assert next_timesteps(lcm_timesteps(4)).tolist() == [759, 519, 279, 279]
    with pytest.raises(ValueError, match="cannot exceed"):
        lcm_timesteps(51)
    # diffusers' own schedule agrees where the spacings agree (2 steps), and takes ours when given
    sch = scheduler()
    sch.set_timesteps(2)
    assert sch.timesteps.tolist() == [999, 499]
    sch.set_timesteps(timesteps=lcm_timesteps(8).tolist())
    assert sch.timesteps.tolist() == lcm_timesteps(8).tolist()


def test_action_std_follows_reference():
    """For 8 steps the action's std sqrt(1 - ᾱ_{n+1}) runs from about 0.99 down to 0.43."""
    std = lcm_std(scheduler(), next_timesteps(lcm_timesteps(8)))
    assert abs(std[0].item() - 0.99) < 0.005 and abs(std[-1].item() - 0.43) < 0.005
    assert (std[:-2] > std[1:-1]).all()


def test_guidance_embedding_matches_pipeline():
    w = torch.tensor([0.0, 3.0, 7.0])
    ours = guidance_embedding(w, 256)
    theirs = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=256)
    torch.testing.assert_close(ours, theirs)
    assert guidance_embedding(w, 7).shape == (3, 7)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_step_matches_lcm_scheduler_and_gaussian_density(prediction_type):
    """f and x_{n+1} as diffusers' LCMScheduler.step computes them; the log-prob is the Gaussian
    density N(√ᾱ_{n+1}·f, (1 − ᾱ_{n+1})·I), averaged over the non-batch dimensions."""
    sch = scheduler(prediction_type)
    ts = lcm_timesteps(STEPS)
    sch.set_timesteps(timesteps=ts.tolist())
    g = torch.Generator().manual_seed(0)
    b = 3
    for i, (t, t_next) in enumerate(zip(ts, next_timesteps(ts))):
        x = torch.randn(b, 4, 8, 8, generator=g)
        out = torch.randn(b, 4, 8, 8, generator=g)
        z = torch.randn(b, 4, 8, 8, generator=torch.Generator().manual_seed(100 + i))
        prev, f, log_prob = lcm_step_with_logprob(sch, out, t.expand(b), t_next.expand(b), x, noise=z)
        ref_prev, ref_f = sch.step(out, t, x, generator=torch.Generator().manual_seed(100 + i), return_dict=False)
        torch.testing.assert_close(f, ref_f, atol=1e-5, rtol=1e-5)
        if i < STEPS - 1:  # diffusers returns f itself at the last step; RLCM still re-noises it
            torch.testing.assert_close(prev, ref_prev, atol=1e-5, rtol=1e-5)
        # the density, computed directly
        a_next = sch.alphas_cumprod[t_next]
        mean, std = a_next.sqrt() * ref_f, (1 - a_next).sqrt()
        direct = torch.distributions.Normal(mean, std).log_prob(prev).mean(dim=(1, 2, 3))
        torch.testing.assert_close(log_prob, direct, atol=1e-5, rtol=1e-5)
        by_hand = (-((prev - mean) ** 2) / (2 * (1 - a_next)) - 0.5 * torch.log(2 * math.pi * (1 - a_next))).mean(dim=(1, 2, 3))
        torch.testing.assert_close(log_prob, by_hand, atol=1e-5, rtol=1e-5)
        # the consistency parameterisation of LCM (sigma_data 0.5, timestep scaling 10)
        c_skip, c_out = boundary_scalings(t)
        assert abs(c_skip.item() - 0.25 / ((10 * t.item()) ** 2 + 0.25)) < 1e-9
        assert abs(c_out.item() - 10 * t.item() / math.sqrt((10 * t.item()) ** 2 + 0.25)) < 1e-6
        # scoring a given sample gives the drawn one's log-prob
        _, _, scored = lcm_step_with_logprob(sch, out, t.expand(b), t_next.expand(b), x, prev_sample=prev)
        torch.testing.assert_close(scored, log_prob)


def test_step_is_batched_over_per_sample_timesteps_and_differentiable():
    sch = scheduler()
    ts = lcm_timesteps(8)
    g = torch.Generator().manual_seed(0)
    pick = torch.tensor([0, 7, 3, 5])
    t, t_next = ts[pick], next_timesteps(ts)[pick]
    x, out, prev = (torch.randn(4, 4, 8, 8, generator=g) for _ in range(3))
    _, _, batched = lcm_step_with_logprob(sch, out, t, t_next, x, prev_sample=prev)
    for i in range(4):
        _, _, single = lcm_step_with_logprob(sch, out[i : i + 1], int(t[i]), int(t_next[i]), x[i : i + 1],
                                             prev_sample=prev[i : i + 1])
        torch.testing.assert_close(batched[i : i + 1], single)
    drawn, _, _ = lcm_step_with_logprob(sch, out, t, t_next, x, generator=torch.Generator().manual_seed(5))
    expected, _, _ = lcm_step_with_logprob(sch, out, t, t_next, x, noise=torch.randn(x.shape, generator=torch.Generator().manual_seed(5)))
    assert torch.equal(drawn, expected)
    out.requires_grad_(True)
    _, _, lp = lcm_step_with_logprob(sch, out, t, t_next, x, prev_sample=prev)
    lp.sum().backward()
    assert out.grad is not None and out.grad.abs().sum() > 0


# ------------------------------------------------------------------------------ sampler
def test_sampler_rollout(policy, rollout):
    b, (c, h, w) = len(PROMPTS), policy.latent_shape
    assert rollout.log_probs.shape == (b, STEPS) and rollout.mask.all() and torch.isfinite(rollout.log_probs).all()
    assert rollout.data["trajectory"].shape == (b, STEPS + 1, c, h, w)  # the chain, stored once
    assert rollout.data["timesteps"].tolist() == [[999, 759, 519, 279]] * b
    assert rollout.data["next_timesteps"].tolist() == [[759, 519, 279, 279]] * b
    assert rollout.data["prompt_embeds"].shape[0] == b and "negative_prompt_embeds" not in rollout.data and not rollout.shared
    images = rollout.outputs["images"]
    assert images.shape == (b, 3, 64, 64) and images.min() >= 0 and images.max() <= 1
    assert (images[0] - images[1]).abs().mean() > 1e-2
    assert rollout.meta == {"guidance_scale": 8.0, "num_steps": STEPS}


def test_sampler_is_deterministic_and_chunk_independent(policy, rollout):
    again = LCMSampler(LCMSamplerConfig(num_steps=STEPS, batch_size=3)).sample(policy, contexts(), torch.Generator().manual_seed(1))
    assert torch.equal(again.log_probs, rollout.log_probs) and torch.equal(again.outputs["images"], rollout.outputs["images"])
    whole = LCMSampler(LCMSamplerConfig(num_steps=STEPS, batch_size=8)).sample(policy, contexts(), torch.Generator().manual_seed(1))
    torch.testing.assert_close(whole.data["trajectory"], rollout.data["trajectory"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(whole.log_probs, rollout.log_probs, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_sampler_matches_diffusers_pipeline(policy):
    """Step by step, the sampler's consistency outputs are those of LatentConsistencyModelPipeline
    (guidance embedding of w = 8 − 1 as timestep_cond, no negative prompt), and the image is
    decoded from the last one."""
    prompts = PROMPTS[:2]
    init = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(3))
    seen: dict[str, list[torch.Tensor]] = {"latents": [], "denoised": []}

    def capture(pipe, i, t, kw):
        seen["latents"].append(kw["latents"].clone())
        seen["denoised"].append(kw["denoised"].clone())
        return kw

    theirs = policy.pipeline(prompts, num_inference_steps=STEPS, timesteps=lcm_timesteps(STEPS).tolist(), guidance_scale=8.0,
                             latents=init.clone(), output_type="pt", generator=torch.Generator().manual_seed(4),
                             callback_on_step_end=capture, callback_on_step_end_tensor_inputs=["latents", "denoised"]).images
    emb, cond = policy.encode_prompts(prompts), policy.guidance_cond(8.0, 2)
    ts, x = lcm_timesteps(STEPS), init
    for i in range(STEPS):
        out = policy.predict(x, ts[i].expand(2), emb, cond)
        _, f, _ = lcm_step_with_logprob(policy.scheduler, out, ts[i], next_timesteps(ts)[i], x, noise=torch.zeros_like(x))
        torch.testing.assert_close(f, seen["denoised"][i], atol=1e-4, rtol=1e-4)
        x = seen["latents"][i]  # continue from the pipeline's re-noised latents
    torch.testing.assert_close(policy.decode(f), theirs, atol=1e-4, rtol=1e-4)
    # one step has no noise at all: the sampler's whole path equals the pipeline's
    one = LCMSampler(LCMSamplerConfig(num_steps=1)).sample(policy, contexts(prompts), torch.Generator().manual_seed(3))
    ref = policy.pipeline(prompts, num_inference_steps=1, guidance_scale=8.0, latents=init.clone(), output_type="pt").images
    torch.testing.assert_close(one.outputs["images"], ref, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------ forward
def test_forward_reproduces_sampler_log_probs_in_one_batched_call(policy, rollout):
    calls = []
    hook = policy.unet.register_forward_hook(lambda m, args, kwargs=None: calls.append(args[0].shape[0]))
    try:
        with torch.no_grad():
            all_steps = policy(rollout)
    finally:
        hook.remove()
    assert calls == [len(PROMPTS) * STEPS], "all B*T steps go through the UNet as one batch"
    torch.testing.assert_close(all_steps, rollout.log_probs, atol=1e-4, rtol=0)
    g = torch.Generator().manual_seed(0)
    steps = torch.stack([torch.randperm(STEPS, generator=g) for _ in range(rollout.batch_size)])
    with torch.no_grad():
        torch.testing.assert_close(policy(rollout, steps), rollout.log_probs.gather(1, steps), atol=1e-4, rtol=0)
        sub = rollout.select([2, 0])
        torch.testing.assert_close(policy(sub, steps[[2, 0], :1]), rollout.log_probs[[2, 0]].gather(1, steps[[2, 0], :1]),
                                   atol=1e-4, rtol=0)
    # the guidance embedding matters: another scale gives other log-probs
    other = dataclasses.replace(rollout, meta={**rollout.meta, "guidance_scale": 2.0})
    with torch.no_grad():
        assert (policy(other) - rollout.log_probs).abs().max() > 1e-3


def test_gradients_reach_lora_only(policy, rollout):
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert policy.unet.peft_config["default"].r == 8 and policy.unet.peft_config["default"].lora_alpha == 8
    policy.zero_grad(set_to_none=True)
    policy(rollout, torch.tensor([[0], [2], [3], [1]])).sum().backward()
    for n, p in policy.named_parameters():
        assert (p.grad is not None) == (n in trainable), n
    assert sum(p.grad.abs().sum() for n, p in policy.named_parameters() if ".lora_B." in n) > 0
    policy.zero_grad(set_to_none=True)


def test_lora_rank_and_alpha_are_configurable(perturbed):
    cfg = perturbed.unet.peft_config["default"]
    assert cfg.r == 2 and cfg.lora_alpha == 6.0
    layer = next(m for m in perturbed.unet.modules() if hasattr(m, "scaling") and isinstance(m.scaling, dict))
    assert layer.scaling["default"] == pytest.approx(3.0)


def test_reference_log_probs_are_the_base_model(perturbed, rollout):
    steps = torch.tensor([[0, 3], [1, 2], [2, 0], [3, 1]])
    with torch.no_grad():
        current = perturbed(rollout, steps)
    ref = perturbed.reference_log_probs(rollout, steps)
    torch.testing.assert_close(ref, rollout.log_probs.gather(1, steps), atol=1e-4, rtol=0)
    assert (current - ref).abs().max() > 1e-3
    with torch.no_grad():
        torch.testing.assert_close(perturbed(rollout, steps), current)


def test_save_pretrained_loads_in_plain_diffusers(perturbed, tmp_path):
    perturbed.save_pretrained(str(tmp_path))
    pipe = LatentConsistencyModelPipeline.from_pretrained(TINY_LCM)
    pipe.load_lora_weights(str(tmp_path))
    g = torch.Generator().manual_seed(0)
    x, emb = torch.randn(2, 4, 8, 8, generator=g), perturbed.encode_prompts(PROMPTS[:2])
    t, cond = torch.tensor([999, 279]), perturbed.guidance_cond(8.0, 2)
    with torch.no_grad():
        ours = perturbed.unet(x, t, encoder_hidden_states=emb, timestep_cond=cond).sample
        theirs = pipe.unet(x, t, encoder_hidden_states=emb, timestep_cond=cond).sample
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    state = perturbed.trainable_state_dict()
    perturb_lora(perturbed, seed=1)
    perturbed.load_trainable_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(perturbed.unet(x, t, encoder_hidden_states=emb, timestep_cond=cond).sample, ours)


# ------------------------------------------------------------------------------ plugin & config
def test_plugin_registers_components():
    (pol,) = plugin.polyrl_policies()
    (smp,) = plugin.polyrl_samplers()
    assert isinstance(pol, ComponentSpec) and pol.name == "lcm" and pol.modality == "image"
    assert smp.name == "lcm" and smp.produces == ("images",)
    for cls in (LCMPolicyConfig, LCMSamplerConfig):
        assert set(field_docs(cls)) == {f.name for f in dataclasses.fields(cls)}, cls


def run_config(**sections) -> dict:
    data = {
        "run": {"iterations": 2, "prompts_per_iteration": 2, "samples_per_prompt": 2, "progress": False,
                "report": False},
        "prompts": {"items": PROMPTS},
        "policy": {"name": "lcm", "pretrained": "assets/tiny-lcm"},
        "sampler": {"name": "lcm", "num_steps": 3},
        "rewards": {"jpeg_compressibility": {"weight": 1.0}},
        "update": {"name": "ddpo", "train_batch_size": 2},
    }
    for k, v in sections.items():  # run and optimizer settings are merged, other sections replaced
        data[k] = {**data.get(k, {}), **v} if k in ("run", "optimizer") else v
    return data


def test_config_errors_before_loading():
    host = Host()
    with pytest.raises(ConfigError, match="num_steps must be >= 2"):
        from_dict(LCMSamplerConfig, {"num_steps": 1}, "sampler")
    with pytest.raises(ConfigError, match="guidance_scale"):
        from_dict(LCMSamplerConfig, {"guidance_scale": 0.5}, "sampler")
    with pytest.raises(ConfigError, match="no such folder"):
        from_dict(LCMPolicyConfig, {"pretrained": "./models/no-lcm-here"}, "policy")
    with pytest.raises(ConfigError, match="sampled by 'lcm', not 'ddim'"):
        host.build_config(run_config(sampler={"name": "ddim"}))
    with pytest.raises(ConfigError, match="sampled by 'ddim', not 'lcm'"):
        host.build_config(run_config(policy={"name": "diffusion"}))
    other_policy = types.SimpleNamespace(policy=ComponentConfig("some_policy", object()))
    with pytest.raises(ConfigError, match="needs policy 'lcm'"):
        LCMSamplerConfig().check_run(other_policy)
    with pytest.raises(ConfigError, match="samples_per_prompt"):
        host.build_config(run_config(update={"name": "rebel", "train_batch_size": 2}, run={"samples_per_prompt": 1}))
    assert host.build_config(run_config()).sampler.params.num_steps == 3


def test_an_sd_folder_is_not_an_lcm():
    with pytest.raises(ConfigError, match="time_cond_proj_dim"):
        LCMPolicy(LCMPolicyConfig(pretrained=str(TINY_SD)))


# ------------------------------------------------------------------------------ training
@pytest.mark.slow
@pytest.mark.parametrize("update", [
    {"name": "ddpo", "train_batch_size": 4, "clip_range": 1.0e-4, "adv_clip_max": 10.0},
    {"name": "rebel", "train_batch_size": 4, "eta": 1.0},
])
def test_rlcm_trains_on_the_tiny_world(tmp_path, update):
    """A few RLCM iterations through the loop (tiny LCM, tiny CLIP score), with ddpo and with rebel."""
    from safetensors.torch import load_file

    from polyrl.loop import train

    run = tmp_path / update["name"]
    host = Host()
    data = run_config(update=update, run={"output_dir": str(run), "iterations": 2, "save_every": 2},
                      rewards={"clip_score": {"weight": 1.0}}, prompts={"file": "assets/tiny-lcm/prompts.txt"},
                      optimizer={"lr": 1.0e-4, "max_grad_norm": 5.0})
    train(host.build_config(data), host)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["iteration"] for m in metrics] == [1, 2]
    for m in metrics:
        assert -1 <= m["reward/clip_score"] <= 1 and math.isfinite(m["loss"]) and m["grad_norm"] > 0
    lora_b = [v for k, v in load_file(str(run / "checkpoints" / "iter_000002" / "trainable.safetensors")).items() if "lora_B" in k]
    assert lora_b and max(v.abs().max().item() for v in lora_b) > 0
    pipe = LatentConsistencyModelPipeline.from_pretrained(TINY_LCM)
    pipe.load_lora_weights(str(run / "policy"))
