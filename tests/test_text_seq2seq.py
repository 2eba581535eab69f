"""The encoder-decoder policy on a tiny T5 built here from a config (random weights, the tiny
world's tokenizer): exact log-probs, reference, LoRA saving, value head, and training in the loop."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from polyrl import ConfigError, Context
from polyrl.host import Host
from polyrl.loop import train
from polyrl.plugins.text import CausalLMConfig, Seq2SeqLMPolicy, Seq2SeqSampler, TextSamplerConfig

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "assets" / "tiny-gpt2"
PROMPTS = ["This movie was", "I bought this kettle and", "The plot in this musical was", "Hi"]


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory) -> Path:
    from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration

    out = tmp_path_factory.mktemp("tiny-t5")
    tok = AutoTokenizer.from_pretrained(TINY)
    cfg = T5Config(vocab_size=len(tok), d_model=32, d_ff=64, d_kv=8, num_layers=2, num_heads=4, dropout_rate=0.1,
                   pad_token_id=0, eos_token_id=0, decoder_start_token_id=0)
    torch.manual_seed(0)
    T5ForConditionalGeneration(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def sample(policy, n=4, seed=0, **kw):
    sampler = Seq2SeqSampler(TextSamplerConfig(**{"max_new_tokens": 10, **kw}))
    return sampler.sample(policy, [Context(prompt=PROMPTS[i % 4], group=i) for i in range(n)], torch.Generator().manual_seed(seed))


def test_layout_and_exact_log_probs(t5_dir: Path):
    policy = Seq2SeqLMPolicy(CausalLMConfig(pretrained=str(t5_dir), value_head=True))
    r = sample(policy, n=6, temperature=0.8, top_k=50, top_p=0.95)
    B, T = r.log_probs.shape
    assert r.data["decoder_input_ids"].shape == r.data["decoder_attention_mask"].shape == (B, T)
    assert (r.data["decoder_input_ids"][:, 0] == policy.decoder_start_token_id).all()
    assert torch.equal(r.data["decoder_input_ids"][:, 1:], r.data["completion_ids"][:, :-1])
    assert r.data["input_ids"].shape[1] == r.meta["prompt_length"]
    policy.train()  # training mode: the dropout (T5's config rate 0.1 too) is disabled
    out = policy(r, with_values=True, with_entropy=True)
    assert policy.model.training and torch.allclose(out["log_probs"], r.log_probs, atol=1e-4)
    assert out["values"].shape == (B, T) and (out["entropy"][r.mask] > 0).all()
    assert torch.allclose(policy.reference_log_probs(r), r.log_probs, atol=1e-4)
    # the EOS ends a completion and padding follows, as for causal LMs
    r2 = sample(policy, n=8, seed=1, max_new_tokens=40)
    for i in range(8):
        n = int(r2.mask[i].sum())
        assert r2.mask[i, :n].all() and not r2.mask[i, n:].any()
    assert torch.allclose(policy(r2), r2.log_probs, atol=1e-4)


def test_lora_reference_and_saving(t5_dir: Path, tmp_path: Path):
    from peft import PeftModel
    from transformers import AutoModelForSeq2SeqLM

    policy = Seq2SeqLMPolicy(CausalLMConfig(pretrained=str(t5_dir), lora_rank=4))
    r = sample(policy, seed=2)
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.add_(0.5)
    moved = policy(r)
    assert not torch.allclose(moved, r.log_probs, atol=1e-2)
    assert torch.allclose(policy.reference_log_probs(r), r.log_probs, atol=1e-4)
    policy.save_pretrained(str(tmp_path / "adapter"))
    loaded = PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(t5_dir), tmp_path / "adapter").eval()
    kw = {k: r.data[k] for k in ("input_ids", "attention_mask", "decoder_input_ids", "decoder_attention_mask")}
    with torch.no_grad():
        assert torch.allclose(loaded(**kw).logits, policy.model.eval()(**kw).logits, atol=1e-5)


def test_nlpo_mask_and_dataset_reset_on_seq2seq(t5_dir: Path):
    policy = Seq2SeqLMPolicy(CausalLMConfig(pretrained=str(t5_dir)))
    policy.set_action_mask({}, top_p=0.5, min_tokens=3)
    ctx = [Context(prompt=p, group=i, extra={"ref": " it was really great fun"}) for i, p in enumerate(PROMPTS)]
    sampler = Seq2SeqSampler(TextSamplerConfig(max_new_tokens=8, reset_column="ref"))
    r = sampler.sample(policy, ctx, torch.Generator().manual_seed(0))
    assert "nlpo_top_p" in r.meta and r.data["forced"].any(1).all()
    assert torch.allclose(policy(r), r.log_probs, atol=1e-4)


def base_config(t5_dir: Path, tmp_path: Path, update: dict) -> dict:
    return {
        "run": {"iterations": 2, "prompts_per_iteration": 2, "samples_per_prompt": 4, "seed": 0, "progress": False,
                "report": False, "output_dir": str(tmp_path / update["name"])},
        "prompts": {"items": PROMPTS},
        "policy": {"name": "seq2seq_lm", "pretrained": str(t5_dir), "value_head": update["name"] == "ppo"},
        "sampler": {"name": "seq2seq_generate", "max_new_tokens": 6},
        "rewards": {"perplexity": {"weight": -1.0, "output": "nll"}},  # base-model NLL: varies per sample
        "update": update,
        "optimizer": {"lr": 1e-3},
    }


@pytest.mark.parametrize("update", [{"name": "ppo", "train_batch_size": 4, "inner_epochs": 1},
                                    {"name": "grpo", "train_batch_size": 4}], ids=["ppo", "grpo"])
def test_seq2seq_trains_in_the_loop(t5_dir: Path, tmp_path: Path, update: dict):
    host = Host()
    trainer = train(host.build_config(base_config(t5_dir, tmp_path, update)), host)
    rows = [json.loads(l) for l in (tmp_path / update["name"] / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2] and all(r["grad_norm"] > 0 for r in rows)
    assert (tmp_path / update["name"] / "policy" / "config.json").is_file()
    assert isinstance(trainer.policy, Seq2SeqLMPolicy) and all(r["reward/perplexity"] > 0 for r in rows)


def test_policy_and_sampler_must_match(t5_dir: Path, tmp_path: Path):
    host = Host()
    data = base_config(t5_dir, tmp_path, {"name": "grpo", "train_batch_size": 4})
    bad = copy.deepcopy(data)
    bad["sampler"]["name"] = "generate"
    with pytest.raises(ConfigError, match="sampler.name: 'generate' samples causal_lm.*accepted: 'seq2seq_generate'"):
        host.build_config(bad)
    with pytest.raises(ConfigError, match="cannot be loaded as AutoModelForSeq2SeqLM"):
        Seq2SeqLMPolicy(CausalLMConfig(pretrained=str(TINY)))
