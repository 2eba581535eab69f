"""``policy.chunk_lm_head``: the LM head applied chunk by chunk, so that no ``[B, T, vocab]``
logits exist. Log-probs, entropies, values and gradients against the unchunked head, on the tiny
GPT-2 (tied embeddings; full fine-tune and LoRA) and on a tiny Qwen2 (untied head, LoRA on the
head itself); no tensor of more than one chunk's logits in the forward or backward pass; the
refusals; and a training iteration of grpo and of ppo through the loop."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from polyrl import ConfigError, Context
from polyrl.plugins.text import CausalLMConfig, CausalLMPolicy, TextSampler, TextSamplerConfig

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "assets" / "tiny-gpt2"
PROMPTS = [p for p in (TINY / "prompts.txt").read_text().splitlines() if p.strip()] if TINY.is_dir() else []

pytestmark = pytest.mark.skipif(not (TINY / "model.safetensors").is_file(), reason="run scripts/make_tiny_gpt2.py first")


@pytest.fixture(scope="module")
def tiny_qwen2(tmp_path_factory) -> Path:
    """A Qwen2 with an untied LM head and random weights, saved as transformers does (GPT-2's tokenizer)."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-qwen2")
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=1130, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                                         max_position_embeddings=256))
    model.save_pretrained(folder, safe_serialization=True)
    AutoTokenizer.from_pretrained(TINY).save_pretrained(folder)
    return folder


def make(pretrained: Path, seed: int = 0, **kw) -> CausalLMPolicy:
    """A policy whose trained weights are moved away from their initial values (LoRA's B is 0)."""
    torch.manual_seed(seed)
    policy = CausalLMPolicy(CausalLMConfig(pretrained=str(pretrained), **kw))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.05)
    return policy


def sample(policy: CausalLMPolicy, n: int = 6, **kw):
    contexts = [Context(prompt=PROMPTS[i % len(PROMPTS)], group=i) for i in range(n)]
    with torch.no_grad():
        return TextSampler(TextSamplerConfig(max_new_tokens=16, **kw)).sample(policy, contexts,
                                                                            torch.Generator().manual_seed(1))


def pass_and_grads(policy: CausalLMPolicy, rollout, chunked_head: bool, chunk: int):
    """Log-probs, entropies, values and the gradients of a loss that uses all three."""
    policy.config.chunk_lm_head = chunked_head
    policy.config.log_prob_chunk_tokens = chunk
    policy.train()
    policy.zero_grad(set_to_none=True)
    out = policy(rollout, with_values=True, with_entropy=True)
    w = torch.linspace(0.5, 1.5, out["log_probs"].shape[1])  # distinct weights per step
    ((out["log_probs"] * w).sum() - 0.3 * out["entropy"].sum() + out["values"].sum()).backward()
    return {k: v.detach() for k, v in out.items()}, [p.grad.clone() for p in policy.trainable_parameters()]


CASES = [("gpt2-full", None, {}), ("gpt2-lora", None, {"lora_rank": 4}),
         ("qwen2-lora-on-the-head", "qwen2", {"lora_rank": 4, "lora_target_modules": ["q_proj", "v_proj", "lm_head"]})]


@pytest.mark.parametrize("name,family,kw", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("settings", [{}, {"temperature": 0.8, "top_k": 20}], ids=["t1", "t0.8-k20"])
def test_chunked_head_equals_the_full_logits(name, family, kw, settings, tiny_qwen2) -> None:
    policy = make(tiny_qwen2 if family == "qwen2" else TINY, value_head=True, **kw)
    rollout = sample(policy, **settings)
    T = rollout.num_steps
    assert T > 5
    full, full_grads = pass_and_grads(policy, rollout, chunked_head=False, chunk=0)
    assert all(g.abs().sum() > 0 for g in full_grads)
    if family == "qwen2":  # the adapter on the head is trained, and the head is not the embeddings
        names = [n for n, p in policy.named_parameters() if p.requires_grad]
        assert any("lm_head" in n and "lora" in n for n in names), names
    for chunk in (5, T + 3):  # several chunks per row; several rows per chunk
        out, grads = pass_and_grads(policy, rollout, chunked_head=True, chunk=chunk)
        for key in ("log_probs", "entropy", "values"):
            torch.testing.assert_close(out[key], full[key], atol=1e-5, rtol=1e-5)
        for a, b in zip(full_grads, grads):
            torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    # [B, K] steps, the plain log-prob pass and the reference pass take the chunked head too
    policy.config.chunk_lm_head, policy.config.log_prob_chunk_tokens = True, 5
    steps = torch.stack([torch.randperm(T, generator=torch.Generator().manual_seed(i))[:4] for i in range(6)])
    torch.testing.assert_close(policy(rollout, steps).detach(), full["log_probs"].gather(1, steps), atol=1e-5, rtol=1e-5)
    chunked_ref = policy.reference_log_probs(rollout)
    policy.config.chunk_lm_head, policy.config.log_prob_chunk_tokens = False, 0
    torch.testing.assert_close(chunked_ref, policy.reference_log_probs(rollout), atol=1e-5, rtol=1e-5)


class LargestLogits(TorchDispatchMode):
    """The largest number of rows (elements / vocab) of any tensor whose last dimension is the
    vocabulary that an operation produces, forward and backward; the head weight's gradient
    (``[hidden, vocab]``, transposed) is not logits and is skipped."""

    def __init__(self, vocab: int, hidden: int) -> None:
        super().__init__()
        self.vocab, self.hidden, self.rows = vocab, hidden, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if (isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] == self.vocab
                    and tuple(t.shape) != (self.hidden, self.vocab)):
                self.rows = max(self.rows, t.numel() // self.vocab)
        return out


@pytest.mark.parametrize("lora_rank", [0, 4], ids=["full", "lora"])
def test_chunked_head_makes_no_batch_by_vocab_tensor(lora_rank: int) -> None:
    policy = make(TINY, lora_rank=lora_rank, value_head=True)
    rollout = sample(policy, n=8)
    B, T, V, chunk = 8, rollout.num_steps, policy._base_model().config.vocab_size, 4
    rows = {}
    for chunked_head in (False, True):
        policy.config.chunk_lm_head, policy.config.log_prob_chunk_tokens = chunked_head, chunk
        policy.train()
        policy.zero_grad(set_to_none=True)
        mode = LargestLogits(V, policy._base_model().config.hidden_size)
        with mode:
            out = policy(rollout, with_values=True, with_entropy=True)
            (out["log_probs"].sum() + out["entropy"].sum()).backward()
        rows[chunked_head] = mode.rows
    assert rows[False] >= B * T  # the [B, T, V] logits: what the check catches
    assert rows[True] <= max(chunk, B), rows  # one chunk, and the single checked logit per row


def test_chunk_lm_head_refusals(tmp_path: Path, tiny_qwen2: Path) -> None:
    with pytest.raises(ConfigError, match="log_prob_chunk_tokens > 0"):
        CausalLMConfig(chunk_lm_head=True, log_prob_chunk_tokens=0).check()
    CausalLMConfig(chunk_lm_head=True).check()
    # a model whose configuration says it post-processes its logits
    capped = tmp_path / "capped"
    capped.mkdir()
    for f in tiny_qwen2.iterdir():
        (capped / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((capped / "config.json").read_text())
    (capped / "config.json").write_text(json.dumps({**cfg, "final_logit_softcapping": 30.0}))
    (capped / "model.safetensors").write_bytes(b"not weights")  # refused before any weights load
    with pytest.raises(ConfigError, match="final_logit_softcapping"):
        CausalLMPolicy(CausalLMConfig(pretrained=str(capped), chunk_lm_head=True))
    # a model whose logits are not head(hidden), whatever its configuration says: found on the first pass
    policy = make(TINY, chunk_lm_head=True, log_prob_chunk_tokens=4)
    rollout = sample(policy, n=2)
    policy._base_model().register_forward_hook(lambda m, args, out: out.__setitem__("logits", out["logits"] * 2) or out)
    with pytest.raises(ConfigError, match="not its output embeddings"):
        policy(rollout)


def test_seq2seq_refuses_the_chunked_head(tmp_path: Path) -> None:
    from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration

    from polyrl.plugins.text.seq2seq import Seq2SeqLMPolicy

    tok = AutoTokenizer.from_pretrained(TINY)
    T5ForConditionalGeneration(T5Config(vocab_size=len(tok), d_model=32, d_ff=64, d_kv=8, num_layers=1, num_heads=4,
                                        pad_token_id=0, eos_token_id=0, decoder_start_token_id=0)).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not weights")  # refused before any weights load
    with pytest.raises(ConfigError, match="only for causal_lm"):
        Seq2SeqLMPolicy(CausalLMConfig(pretrained=str(tmp_path), chunk_lm_head=True))


@pytest.mark.parametrize("update", ["grpo", "ppo"])
def test_training_with_the_chunked_head_matches_the_full_head(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             update: str) -> None:
    """Two iterations through the loop: the same metrics and weights with and without the chunked head."""
    from polyrl.host import Host
    from polyrl.loop import train

    monkeypatch.chdir(REPO)
    results = []
    for chunked_head in (False, True):
        data = {
            "run": {"iterations": 2, "prompts_per_iteration": 2, "samples_per_prompt": 4, "seed": 0, "progress": False,
                    "report": False, "save_every": 10, "output_dir": str(tmp_path / f"run{int(chunked_head)}")},
            "prompts": {"file": "assets/tiny-gpt2/prompts.txt"},
            "policy": {"name": "causal_lm", "pretrained": "assets/tiny-gpt2", "lora_rank": 0,
                       "value_head": update == "ppo", "chunk_lm_head": chunked_head, "log_prob_chunk_tokens": 4},
            "sampler": {"name": "generate", "max_new_tokens": 8},
            "rewards": {"sentiment": {"weight": 1.0}},
            "update": {"name": update, "train_batch_size": 8},
            "optimizer": {"lr": 1e-3},
        }
        host = Host()
        trainer = train(host.build_config(data), host)
        rows = [json.loads(line) for line in (tmp_path / f"run{int(chunked_head)}" / "metrics.jsonl").read_text().splitlines()]
        weights = {k: v.clone() for k, v in trainer.policy.trainable_state_dict().items()}
        results.append((rows, weights))
    (rows_a, w_a), (rows_b, w_b) = results
    assert len(rows_a) == len(rows_b) == 2
    for a, b in zip(rows_a, rows_b):
        assert {"loss", "grad_norm"} <= set(a)
        for key in a:
            if isinstance(a[key], float) and not key.startswith(("time", "throughput")) and "seconds" not in key:
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), key
    # Adam turns rounding-level gradient differences of near-zero gradients into differences of a
    # fraction of a step (lr 1e-3); the steps themselves are the same
    initial = CausalLMPolicy(CausalLMConfig(pretrained=str(TINY))).trainable_state_dict()
    moved = max(float((w_a[k] - initial[k]).abs().max()) for k in w_a if k in initial)
    assert moved > 1.5e-3, moved
    for k in w_a:
        torch.testing.assert_close(w_b[k], w_a[k], atol=2e-4, rtol=0)
