"""The text plugin on the real tiny GPT-2 in assets/tiny-gpt2 (CPU, no mocks)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from polyrl import ConfigError, Context
from polyrl.plugins import text as text_plugin
from polyrl.plugins.text import CausalLMConfig, CausalLMPolicy, TextSampler, TextSamplerConfig

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "assets" / "tiny-gpt2"
PROMPTS = [p for p in (TINY / "prompts.txt").read_text().splitlines() if p.strip()]

pytestmark = pytest.mark.skipif(not (TINY / "model.safetensors").is_file(),
                                reason="run scripts/make_tiny_gpt2.py first")


def contexts(n: int) -> list[Context]:
    return [Context(prompt=PROMPTS[i % len(PROMPTS)], group=i) for i in range(n)]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def sample(policy: CausalLMPolicy, n: int = 8, seed: int = 0, **kw):
    sampler = TextSampler(TextSamplerConfig(**kw))
    with torch.no_grad():
        return sampler.sample(policy, contexts(n), gen(seed))


@pytest.fixture(scope="module")
def full() -> CausalLMPolicy:
    return CausalLMPolicy(CausalLMConfig(pretrained=str(TINY)))


@pytest.fixture(scope="module")
def lora() -> CausalLMPolicy:
    return CausalLMPolicy(CausalLMConfig(pretrained=str(TINY), lora_rank=4, lora_alpha=8))


def perturb_(params, seed: int, scale: float = 0.05) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * scale)


# ---------------------------------------------------------------------------- sampler
def test_sampler_shapes_and_outputs(full: CausalLMPolicy) -> None:
    r = sample(full, n=6, max_new_tokens=12)
    B, T = 6, r.num_steps
    P = r.meta["prompt_length"]
    assert 1 <= T <= 12 and r.log_probs.shape == r.mask.shape == (B, T)
    assert r.mask.dtype == torch.bool and r.log_probs.dtype == torch.float32
    assert r.data["input_ids"].shape == r.data["attention_mask"].shape == (B, P + T)
    assert torch.equal(r.data["completion_ids"], r.data["input_ids"][:, P:])
    assert set(r.meta) == {"temperature", "top_k", "top_p", "prompt_length"}
    # the prompt part is the left-padded tokenisation of the prompts
    for i, c in enumerate(r.contexts):
        ids = full.tokenizer(c.prompt)["input_ids"]
        assert r.data["input_ids"][i, P - len(ids) : P].tolist() == ids
        assert r.data["attention_mask"][i, : P - len(ids)].sum() == 0
    assert len(r.outputs["texts"]) == B and all(isinstance(t, str) for t in r.outputs["texts"])
    assert [len(x) for x in r.outputs["completion_ids"]] == r.mask.sum(1).tolist()
    assert r.outputs["texts"][0] == full.tokenizer.decode(r.outputs["completion_ids"][0], skip_special_tokens=True)
    assert (r.log_probs[r.mask] < 0).all() and torch.isfinite(r.log_probs).all()


def test_mask_semantics_at_eos(full: CausalLMPolicy) -> None:
    r = sample(full, n=16, max_new_tokens=80)
    eos, P = full.eos_token_id, r.meta["prompt_length"]
    comp = r.data["completion_ids"]
    ended = 0
    for i in range(r.batch_size):
        m = r.mask[i]
        n = int(m.sum())
        assert m[:n].all() and not m[n:].any(), "mask is a prefix"
        real = comp[i, :n].tolist()
        assert eos not in real[:-1], "nothing is generated after EOS"
        if real and real[-1] == eos:
            ended += 1
            assert (comp[i, n:] == full.pad_token_id).all()
            assert (r.log_probs[i, n:] == 0).all()
            assert (r.data["attention_mask"][i, P + n :] == 0).all()
            assert r.data["attention_mask"][i, P + n - 1] == 1, "the EOS token is a real action"
            assert r.log_probs[i, n - 1] < 0
        else:
            assert n == r.num_steps
    assert ended >= 8, "the tiny model ends most reviews with EOS within 80 tokens"
    # without stop_at_eos every step is a real action
    r2 = sample(full, n=4, max_new_tokens=40, stop_at_eos=False)
    assert r2.mask.all() and r2.num_steps == 40


def test_sampler_deterministic_given_generator(full: CausalLMPolicy) -> None:
    a = sample(full, n=8, seed=3, temperature=0.8, top_k=30)
    b = sample(full, n=8, seed=3, temperature=0.8, top_k=30)
    c = sample(full, n=8, seed=4, temperature=0.8, top_k=30)
    assert torch.equal(a.data["input_ids"], b.data["input_ids"])
    assert torch.equal(a.log_probs, b.log_probs) and a.outputs["texts"] == b.outputs["texts"]
    assert a.outputs["texts"] != c.outputs["texts"]


def test_sampler_chunks(full: CausalLMPolicy) -> None:
    r = sample(full, n=7, batch_size=3, max_new_tokens=10)
    assert r.log_probs.shape == (7, r.num_steps) and r.data["input_ids"].shape[0] == 7
    # rows of a chunk that stopped early are padded like EOS-ended rows
    lp = full(r)
    assert torch.allclose(lp, r.log_probs, atol=1e-4)


def test_empty_prompt(full: CausalLMPolicy) -> None:
    r = TextSampler(TextSamplerConfig(max_new_tokens=8)).sample(full, [Context(prompt=""), Context(prompt="This")], gen(0))
    assert r.meta["prompt_length"] >= 1 and torch.allclose(full(r), r.log_probs, atol=1e-4)


# ---------------------------------------------------------------------------- policy log-probs
@pytest.mark.parametrize("settings", [dict(temperature=0.7, top_k=20, top_p=0.9), dict(temperature=1.0)],
                         ids=["t0.7-k20-p0.9", "t1"])
def test_forward_reproduces_sampler_log_probs(full: CausalLMPolicy, settings: dict) -> None:
    r = sample(full, n=12, seed=1, max_new_tokens=24, **settings)
    lp = full(r)
    assert lp.shape == r.log_probs.shape and lp.requires_grad
    assert torch.isfinite(lp).all()
    assert (lp[~r.mask] == 0).all()
    assert torch.allclose(lp, r.log_probs, atol=1e-4), (lp - r.log_probs).abs().max()
    # steps [B, K] picks columns per sample
    g = gen(0)
    steps = torch.stack([torch.randperm(r.num_steps, generator=g)[:5] for _ in range(r.batch_size)])
    assert torch.allclose(full(r, steps), lp.gather(1, steps), atol=1e-6)


def test_filtering_changes_distribution(full: CausalLMPolicy) -> None:
    """The recomputation uses the rollout's settings: other settings give other log-probs."""
    r = sample(full, n=8, seed=2, temperature=0.7, top_k=20, top_p=0.9)
    other = r.select(range(r.batch_size))
    other.meta = {**r.meta, "temperature": 1.0, "top_k": 0, "top_p": 1.0}
    assert not torch.allclose(full(other), r.log_probs, atol=1e-3)


def test_forward_after_select_and_lora_matches(lora: CausalLMPolicy) -> None:
    r = sample(lora, n=8, seed=5, temperature=0.9, top_p=0.95)
    sub = r.select([6, 1, 3])
    assert torch.allclose(lora(sub), sub.log_probs, atol=1e-4)


# ---------------------------------------------------------------------------- gradients
def test_gradients_reach_only_lora(lora: CausalLMPolicy) -> None:
    r = sample(lora, n=4, max_new_tokens=8)
    lora.zero_grad(set_to_none=True)
    lora(r).sum().backward()
    named = dict(lora.named_parameters())
    trainable = {n for n, p in named.items() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert all(named[n].grad is not None for n in trainable)
    assert any(named[n].grad.abs().sum() > 0 for n in trainable if "lora_B" in n)
    assert all(p.grad is None for n, p in named.items() if n not in trainable)
    assert set(lora.trainable_state_dict()) == trainable
    lora.zero_grad(set_to_none=True)


def test_gradients_reach_all_params_full(full: CausalLMPolicy) -> None:
    r = sample(full, n=4, max_new_tokens=8)
    full.zero_grad(set_to_none=True)
    full(r).sum().backward()
    params = list(full.named_parameters())
    assert all(p.requires_grad for _, p in params)
    missing = [n for n, p in params if p.grad is None]
    assert not missing, missing
    full.zero_grad(set_to_none=True)


# ---------------------------------------------------------------------------- reference
def test_reference_full_is_the_initial_model() -> None:
    policy = CausalLMPolicy(CausalLMConfig(pretrained=str(TINY)))
    n_params, keys = len(list(policy.parameters())), set(policy.state_dict())
    r = sample(policy, n=6, seed=7)
    perturb_(policy.parameters(), seed=0)
    moved = policy(r)
    assert not torch.allclose(moved, r.log_probs, atol=1e-2)
    ref = policy.reference_log_probs(r)
    assert not ref.requires_grad
    assert torch.allclose(ref, r.log_probs, atol=1e-4)
    # the frozen copy is not a submodule: no extra parameters, state or trainable weights
    assert len(list(policy.parameters())) == n_params and set(policy.state_dict()) == keys
    steps = torch.tensor([[0, 2]] * r.batch_size)
    assert torch.allclose(policy.reference_log_probs(r, steps), r.log_probs[:, [0, 2]], atol=1e-4)


def test_reference_lora_disables_the_adapter() -> None:
    policy = CausalLMPolicy(CausalLMConfig(pretrained=str(TINY), lora_rank=4))
    r = sample(policy, n=6, seed=8)
    perturb_([p for n, p in policy.named_parameters() if "lora_" in n], seed=1, scale=0.5)
    moved = policy(r)
    assert not torch.allclose(moved, r.log_probs, atol=1e-2)
    assert torch.allclose(policy.reference_log_probs(r), r.log_probs, atol=1e-4)
    assert torch.allclose(policy(r), moved), "the adapter is enabled again afterwards"


# ---------------------------------------------------------------------------- saving
def test_lora_save_pretrained_loads_with_peft(tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    policy = CausalLMPolicy(CausalLMConfig(pretrained=str(TINY), lora_rank=4))
    perturb_([p for n, p in policy.named_parameters() if "lora_" in n], seed=2, scale=0.5)
    policy.save_pretrained(str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(TINY), tmp_path / "adapter").eval()
    x = torch.tensor([policy.tokenizer("This movie was really")["input_ids"]])
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(TINY)(input_ids=x).logits
        ours = policy.model.eval()(input_ids=x).logits
        theirs = loaded(input_ids=x).logits
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert not torch.allclose(ours, base, atol=1e-3)


def test_full_save_pretrained_loads_with_transformers(tmp_path: Path, full: CausalLMPolicy) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    full.save_pretrained(str(tmp_path / "model"))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "model")
    x = torch.tensor([tok("I bought this kettle and")["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(model(input_ids=x).logits, full.model(input_ids=x).logits, atol=1e-5)


# ---------------------------------------------------------------------------- plugin and config
def test_plugin_registration_and_relative_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    policies = {s.name: s for s in text_plugin.polyrl_policies()}
    samplers = {s.name: s for s in text_plugin.polyrl_samplers()}
    assert set(policies) == {"causal_lm", "seq2seq_lm"} and set(samplers) == {"generate", "seq2seq_generate", "vllm"}
    policy_spec, sampler_spec = policies["causal_lm"], samplers["generate"]
    assert policy_spec.modality == "text"
    assert sampler_spec.modality == "text" and "texts" in sampler_spec.produces
    monkeypatch.chdir(tmp_path)  # "assets/tiny-gpt2" is found relative to the repository root
    policy = policy_spec.factory(CausalLMConfig())
    assert isinstance(policy, CausalLMPolicy) and policy.tokenizer.padding_side == "left"
    assert type(policy.tokenizer).__name__.startswith("GPT2Tokenizer")
    assert policy.tokenizer.pad_token == policy.tokenizer.eos_token == "<|endoftext|>"
    sampler = sampler_spec.factory(TextSamplerConfig(max_new_tokens=4), policy=policy)
    assert sampler.sample(policy, contexts(2), gen(0)).batch_size == 2


def test_config_checks() -> None:
    from polyrl.config import field_docs

    for bad in (dict(temperature=0.0), dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5), dict(max_new_tokens=0)):
        with pytest.raises(ConfigError):
            TextSamplerConfig(**bad).check()
    with pytest.raises(ConfigError):
        CausalLMConfig(lora_rank=-1).check()
    for cls in (CausalLMConfig, TextSamplerConfig):
        docs = field_docs(cls)
        missing = [f for f in cls.__dataclass_fields__ if not docs.get(f)]
        assert not missing, f"{cls.__name__} fields without a docstring: {missing}"
