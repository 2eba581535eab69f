"""The causal LM policy's memory switches on the tiny GPT-2 (CPU): gradient checkpointing, float32
master weights, no reference copy without a KL term, chunked log-probs of the sampled tokens. Each
keeps the numbers it computes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from polyrl import ConfigError, Context
from polyrl.plugins.text import CausalLMConfig, CausalLMPolicy, TextSampler, TextSamplerConfig
from polyrl.plugins.text.logits import SamplingSettings, process_logits
from polyrl.plugins.text.policy import _entropy, _SampledTokenLogProbs

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "assets" / "tiny-gpt2"
PROMPTS = [p for p in (TINY / "prompts.txt").read_text().splitlines() if p.strip()] if TINY.is_dir() else []

pytestmark = pytest.mark.skipif(not (TINY / "model.safetensors").is_file(), reason="run scripts/make_tiny_gpt2.py first")


def make(seed: int = 0, **kw) -> CausalLMPolicy:
    """A policy whose trained weights are moved away from their initial values (LoRA's B is 0)."""
    torch.manual_seed(seed)
    policy = CausalLMPolicy(CausalLMConfig(pretrained=str(TINY), **kw))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.05)
    return policy


def sample(policy: CausalLMPolicy, n: int = 8, seed: int = 1, **kw):
    contexts = [Context(prompt=PROMPTS[i % len(PROMPTS)], group=i) for i in range(n)]
    with torch.no_grad():
        return TextSampler(TextSamplerConfig(max_new_tokens=16, **kw)).sample(policy, contexts, torch.Generator().manual_seed(seed))


def log_probs_and_grads(policy: CausalLMPolicy, rollout) -> tuple[torch.Tensor, list[torch.Tensor]]:
    policy.train()
    policy.zero_grad(set_to_none=True)
    lp = policy(rollout)
    (lp * torch.linspace(0.5, 1.5, lp.shape[1])).sum().backward()  # distinct weights per step
    return lp.detach(), [p.grad.clone() for p in policy.trainable_parameters()]


def saved_bytes(fn) -> dict[torch.dtype, int]:
    """Bytes of the storages autograd keeps for the backward pass while ``fn`` runs, by dtype
    (each storage once, however many operations save it or views of it)."""
    total: dict[torch.dtype, int] = {}
    seen: set[int] = set()

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total[t.dtype] = total.get(t.dtype, 0) + storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return total, out


class LargeFloat32(TorchDispatchMode):
    """Records the float32 tensors of more than ``limit`` elements that operations allocate
    (forward and backward), by operation; views of their inputs allocate nothing and are skipped."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.large: list[tuple[str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(a, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if (isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.numel() > self.limit
                    and t.untyped_storage().data_ptr() not in inputs):
                self.large.append((str(func), t.numel()))
        return out


# ---------------------------------------------------------------------------- gradient checkpointing
@pytest.mark.parametrize("lora_rank", [0, 4], ids=["full", "lora"])
def test_gradient_checkpointing_keeps_log_probs_and_gradients(lora_rank: int) -> None:
    results, saved = [], []
    for checkpointing in (False, True):
        policy = make(lora_rank=lora_rank, gradient_checkpointing=checkpointing)
        assert policy._base_model().is_activation_checkpointing == checkpointing
        rollout = sample(policy)
        policy.train()
        nbytes, _ = saved_bytes(lambda: policy(rollout))
        saved.append(sum(nbytes.values()))
        results.append(log_probs_and_grads(policy, rollout))
    (lp_a, g_a), (lp_b, g_b) = results
    torch.testing.assert_close(lp_b, lp_a, atol=1e-6, rtol=1e-6)
    assert len(g_a) == len(g_b) and all(g.abs().sum() > 0 for g in g_a)
    for a, b in zip(g_a, g_b):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-6)
    # the blocks' activations are recomputed, not kept: far less is saved for the backward pass
    assert saved[1] < 0.5 * saved[0], saved


def test_gradient_checkpointing_is_off_while_sampling() -> None:
    """Sampling (eval mode, KV cache) is the same with checkpointing on."""
    plain, checkpointed = make(), make(gradient_checkpointing=True)
    a, b = sample(plain, seed=3), sample(checkpointed, seed=3)
    assert torch.equal(a.data["input_ids"], b.data["input_ids"]) and torch.equal(a.log_probs, b.log_probs)


# ---------------------------------------------------------------------------- float32 master weights
def test_full_fine_tune_trains_float32_weights_whatever_torch_dtype() -> None:
    policy = CausalLMPolicy(CausalLMConfig(pretrained=str(TINY), torch_dtype="bfloat16", value_head=True))
    params = policy.trainable_parameters()
    assert params and all(p.dtype == torch.float32 for p in params)
    assert len(params) == len(list(policy.parameters()))  # every weight is trained
    rollout = sample(policy, n=4)
    policy.reference_log_probs(rollout)
    (ref,) = policy._ref_holder
    ref_params = dict(ref.named_parameters())
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in ref_params.values())
    # the master weights start at the loaded (bf16) values exactly
    for name, p in policy.model.named_parameters():
        assert torch.equal(p, ref_params[name].float()), name
    # a small update survives in float32 (it would round away in bf16)
    w = policy.model.transformer.h[0].mlp.c_fc.weight
    before = w.detach().clone()
    with torch.no_grad():
        w.add_(1e-6)
    assert not torch.equal(w, before)
    # NLPO's masking policy is frozen: in torch_dtype
    policy.set_action_mask({})
    assert all(p.dtype == torch.bfloat16 for p in policy.mask_model.parameters())


def test_lora_trains_float32_adapters_on_a_bf16_base() -> None:
    policy = CausalLMPolicy(CausalLMConfig(pretrained=str(TINY), torch_dtype="bfloat16", lora_rank=4))
    trained = [p for p in policy.parameters() if p.requires_grad]
    frozen = [p for p in policy.parameters() if not p.requires_grad]
    assert trained and all(p.dtype == torch.float32 for p in trained)
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)


# ---------------------------------------------------------------------------- no reference without KL
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_reference_copy_only_with_a_kl_term(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, beta: float) -> None:
    from polyrl.host import Host
    from polyrl.loop import train

    monkeypatch.chdir(REPO)
    data = {
        "run": {"iterations": 1, "prompts_per_iteration": 2, "samples_per_prompt": 4, "seed": 0, "progress": False,
                "report": False, "save_every": 1, "output_dir": str(tmp_path / "run")},
        "prompts": {"file": "assets/tiny-gpt2/prompts.txt"},
        "policy": {"name": "causal_lm", "pretrained": "assets/tiny-gpt2", "lora_rank": 0, "torch_dtype": "bfloat16"},
        "sampler": {"name": "generate", "max_new_tokens": 8},
        "rewards": {"sentiment": {"weight": 1.0}},
        "update": {"name": "grpo", "train_batch_size": 8, "beta": beta},
        "optimizer": {"lr": 1e-3},
    }
    host = Host()
    trainer = train(host.build_config(data), host)
    policy = trainer.policy
    assert all(p.dtype == torch.float32 for p in policy.trainable_parameters())
    if beta == 0:
        assert policy._ref_holder == []
    else:
        (ref,) = policy._ref_holder
        assert {p.dtype for p in ref.parameters()} == {torch.bfloat16}


# ---------------------------------------------------------------------------- chunked log-probs
@pytest.mark.parametrize("settings", [{}, {"temperature": 0.7}, {"top_k": 20}, {"temperature": 0.7, "top_k": 20},
                                      {"temperature": 0.9, "top_k": 50, "top_p": 0.9}],
                         ids=["t1", "t0.7", "t1-k20", "t0.7-k20", "t0.9-k50-p0.9"])
def test_chunked_log_probs_equal_the_full_log_softmax(settings: dict) -> None:
    policy = make()
    rollout = sample(policy, n=6, **settings)
    assert rollout.num_steps > 3
    results = {}
    for chunk in (0, 512, 5):  # 0: the full float32 log-softmax; 5: several chunks per row
        policy.config.log_prob_chunk_tokens = chunk
        results[chunk] = log_probs_and_grads(policy, rollout)
    lp_full, g_full = results[0]
    for chunk in (512, 5):
        lp, g = results[chunk]
        torch.testing.assert_close(lp, lp_full, atol=1e-6, rtol=1e-6)
        for a, b in zip(g_full, g):
            torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-6)
    # steps [B, K] and the reference pass take the same path
    policy.config.log_prob_chunk_tokens = 5
    steps = torch.stack([torch.randperm(rollout.num_steps, generator=torch.Generator().manual_seed(i))[:3] for i in range(6)])
    torch.testing.assert_close(policy(rollout, steps), lp_full.gather(1, steps), atol=1e-6, rtol=1e-6)


def test_chunked_log_probs_under_nlpo_action_mask() -> None:
    policy = make()
    policy.set_action_mask({}, top_p=0.5, min_tokens=3)  # a small support: the mask matters
    rollout = sample(policy, n=6, temperature=0.8)
    results = {}
    for chunk in (0, 4):
        policy.config.log_prob_chunk_tokens = chunk
        results[chunk] = log_probs_and_grads(policy, rollout)
    torch.testing.assert_close(results[4][0], results[0][0], atol=1e-6, rtol=1e-6)
    for a, b in zip(results[0][1], results[4][1]):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(results[4][0], rollout.log_probs, atol=1e-4, rtol=0)  # the sampled distribution


@pytest.mark.parametrize("settings", [{}, {"temperature": 0.8, "top_k": 20}], ids=["t1", "t0.8-k20"])
def test_chunked_entropies_equal_the_full_log_softmax(settings: dict) -> None:
    """The actor-critic updates' pass (log-probs, entropies, values) takes the chunked path too:
    the same entropies, and the same gradients through a loss that uses both."""
    policy = make(value_head=True)
    rollout = sample(policy, n=6, **settings)
    assert rollout.num_steps > 3
    results = {}
    for chunk in (0, 5):
        policy.config.log_prob_chunk_tokens = chunk
        policy.train()
        policy.zero_grad(set_to_none=True)
        params = list(policy.trainable_parameters())
        out = policy(rollout, with_values=True, with_entropy=True)
        assert set(out) == {"log_probs", "values", "entropy"}
        (out["log_probs"].sum() - 0.3 * out["entropy"].sum() + out["values"].sum()).backward()
        results[chunk] = ({k: v.detach() for k, v in out.items()}, [p.grad.clone() for p in params])
    full, chunked = results[0], results[5]
    assert (full[0]["entropy"][rollout.mask] > 0).all()
    assert (full[0]["entropy"][~rollout.mask] == 0).all()
    for key in ("log_probs", "entropy", "values"):
        torch.testing.assert_close(chunked[0][key], full[0][key], atol=1e-6, rtol=1e-6)
    for a, b in zip(full[1], chunked[1]):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(chunked[0]["log_probs"], policy(rollout).detach(), atol=1e-6, rtol=1e-6)


def test_chunked_entropy_holds_no_float32_batch_by_vocab_tensor() -> None:
    """Synthetic bf16 logits [8, 96, 2048]: with the entropy, the chunked forward and backward still
    produce no float32 tensor larger than one chunk and keep only the logits."""
    B, T, V, chunk = 8, 96, 2048, 32
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(B, T, V, generator=g) * 3).to(torch.bfloat16)
    tokens = torch.randint(0, V, (B, T), generator=g)
    settings = SamplingSettings(temperature=0.7, top_k=100)
    x = logits.clone().requires_grad_(True)
    mode = LargeFloat32(limit=chunk * V)
    with mode:
        nbytes, (lp, ent) = saved_bytes(lambda: _SampledTokenLogProbs.apply(x, tokens, None, settings, None, chunk, True))
        (lp.sum() + ent.sum()).backward()
    assert mode.large == [] and nbytes.get(torch.float32, 0) == 0, (mode.large, nbytes)
    y = logits.clone().requires_grad_(True)
    logp_all = process_logits(y, settings).log_softmax(-1)
    full_lp = logp_all.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    full_ent = _entropy(logp_all)
    (full_lp.sum() + full_ent.sum()).backward()
    torch.testing.assert_close(lp, full_lp, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ent, full_ent, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(x.grad, y.grad, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_chunked_log_probs_hold_no_float32_batch_by_vocab_tensor(dtype: torch.dtype) -> None:
    """Synthetic logits [8, 96, 2048]: no operation of the chunked forward or backward produces a
    float32 tensor larger than one chunk (except, for float32 logits, their gradient), and the
    backward keeps only the logits (in their dtype); the unchunked path produces and keeps
    [B, T, V] float32 tensors."""
    B, T, V, chunk = 8, 96, 2048, 32
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(B, T, V, generator=g) * 3).to(dtype)
    tokens = torch.randint(0, V, (B, T), generator=g)
    settings = SamplingSettings(temperature=0.7, top_k=100)

    def chunked(x):
        return _SampledTokenLogProbs.apply(x, tokens, None, settings, None, chunk)

    def full(x):
        return process_logits(x, settings).log_softmax(-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)

    measured = {}
    for name, fn in (("chunked", chunked), ("full", full)):
        x = logits.clone().requires_grad_(True)
        mode = LargeFloat32(limit=chunk * V)
        with mode:
            nbytes, lp = saved_bytes(lambda: fn(x))
            lp.sum().backward()
        measured[name] = (mode.large, nbytes.get(torch.float32, 0), lp.detach(), x.grad)
    large, saved_f32, lp, grad = measured["chunked"]
    # temporaries of one chunk of 32 tokens at a time; float32 logits get a float32 gradient
    assert len(large) == (1 if dtype == torch.float32 else 0), large
    assert saved_f32 <= (logits.numel() * 4 if dtype == torch.float32 else 0), saved_f32  # the logits only
    full_large, full_saved = measured["full"][:2]
    assert len(full_large) >= 3 and full_saved >= B * T * V * 4, (full_large, full_saved)  # what the check catches
    torch.testing.assert_close(lp, measured["full"][2], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(grad, measured["full"][3], atol=1e-6, rtol=1e-6)


def test_log_prob_chunk_tokens_is_checked() -> None:
    with pytest.raises(ConfigError, match="log_prob_chunk_tokens"):
        CausalLMConfig(log_prob_chunk_tokens=-1).check()
    CausalLMConfig(log_prob_chunk_tokens=0).check()
