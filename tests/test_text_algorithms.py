"""The text algorithm set on the real tiny GPT-2 (assets/tiny-gpt2): value head and entropy, NLPO's
action mask, DR-PO's dataset resets, and every update training through the loop (CPU, no mocks)."""

from __future__ import annotations

import copy
import importlib.util
import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from polyrl import ConfigError, Context
from polyrl.host import Host
from polyrl.loop import train
from polyrl.plugins.text import CausalLMConfig, CausalLMPolicy, TextSampler, TextSamplerConfig
from polyrl.plugins.text.logits import SamplingSettings, process_logits, top_p_keep

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "assets" / "tiny-gpt2"
PROMPTS = [p for p in (TINY / "prompts.txt").read_text().splitlines() if p.strip()]

pytestmark = pytest.mark.skipif(not (TINY / "model.safetensors").is_file(), reason="run scripts/make_tiny_gpt2.py first")


def contexts(n: int, extra: list[dict] | None = None) -> list[Context]:
    return [Context(prompt=PROMPTS[i % len(PROMPTS)], group=i, extra=(extra[i] if extra else {})) for i in range(n)]


def reviews(n: int, seed: int = 1) -> list[tuple[str, str]]:
    """(opening, continuation) pairs from the tiny world's own review generator."""
    spec = importlib.util.spec_from_file_location("make_tiny_gpt2", ROOT / "scripts" / "make_tiny_gpt2.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rng = random.Random(seed)
    return [mod.review(rng) for _ in range(n)]


@pytest.fixture(scope="module")
def policy() -> CausalLMPolicy:
    return CausalLMPolicy(CausalLMConfig(pretrained=str(TINY), value_head=True))


# ---------------------------------------------------------------------------- value head, entropy
def test_value_head_and_entropy(policy: CausalLMPolicy, tmp_path: Path) -> None:
    assert policy.has_value_head and not CausalLMPolicy(CausalLMConfig(pretrained=str(TINY))).has_value_head
    settings = dict(temperature=0.8, top_k=40)
    r = TextSampler(TextSamplerConfig(max_new_tokens=10, **settings)).sample(policy, contexts(6), torch.Generator().manual_seed(0))
    out = policy(r, with_values=True, with_entropy=True)
    assert set(out) == {"log_probs", "values", "entropy"}
    for v in out.values():
        assert v.shape == r.log_probs.shape and (v[~r.mask] == 0).all() and torch.isfinite(v).all()
    assert torch.allclose(out["log_probs"], r.log_probs, atol=1e-4)
    assert torch.allclose(policy(r), out["log_probs"])
    # entropy of step 0 of sample 0, by hand from the model's logits under the sampler's settings
    P = r.meta["prompt_length"]
    prompt = r.data["input_ids"][0, :P][r.data["attention_mask"][0, :P].bool()]  # without the left padding
    with torch.no_grad():
        logits = policy.model(input_ids=prompt[None]).logits[0, -1]
    probs = process_logits(logits, SamplingSettings(**settings)).softmax(-1)
    nz = probs[probs > 0]
    assert out["entropy"][0, 0].item() == pytest.approx(-(nz * nz.log()).sum().item(), rel=1e-4)
    assert (probs > 0).sum() == 40
    # gradients reach the value head and the model; the head is saved with the trained weights
    policy.zero_grad(set_to_none=True)
    (out["values"].sum() + out["entropy"].sum()).backward()
    assert policy.value_head.weight.grad.abs().sum() > 0
    assert {"value_head.weight", "value_head.bias"} <= set(policy.trainable_state_dict())
    policy.zero_grad(set_to_none=True)
    policy.save_pretrained(str(tmp_path / "p"))
    saved = load_file(str(tmp_path / "p" / "value_head.safetensors"))
    assert torch.equal(saved["weight"], policy.value_head.weight.detach())
    with pytest.raises(ValueError, match="value_head"):
        CausalLMPolicy(CausalLMConfig(pretrained=str(TINY)))(r, with_values=True)


def test_value_head_with_lora_is_trainable() -> None:
    lora = CausalLMPolicy(CausalLMConfig(pretrained=str(TINY), lora_rank=4, value_head=True))
    names = set(lora.trainable_state_dict())
    assert "value_head.weight" in names and all("lora_" in n or n.startswith("value_head") for n in names)


# ---------------------------------------------------------------------------- NLPO's action mask
def test_top_p_keep_by_hand() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert top_p_keep(logits, 0.7, 1).tolist() == [[True, True, False, False]]  # 0.5 + 0.3 reaches 0.7
    assert top_p_keep(logits, 0.45, 1).tolist() == [[True, False, False, False]]
    assert top_p_keep(logits, 0.45, 3).tolist() == [[True, True, True, False]]  # at least 3 tokens
    assert top_p_keep(logits, 0.45, 1, always=3).tolist() == [[True, False, False, True]]  # EOS always


def test_masked_sampling_is_the_trained_distribution(policy: CausalLMPolicy) -> None:
    trained = copy.deepcopy(policy)
    trained.set_action_mask({}, top_p=0.5, min_tokens=2)  # psi = the initial weights
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # theta moves away from psi
        for p in trained.model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    sampler = TextSampler(TextSamplerConfig(max_new_tokens=12, temperature=0.9))
    r = sampler.sample(trained, contexts(8), torch.Generator().manual_seed(1))
    assert r.meta["nlpo_top_p"] == 0.5 and r.meta["nlpo_min_tokens"] == 2
    lp = trained(r)
    assert torch.allclose(lp, r.log_probs, atol=1e-4), (lp - r.log_probs).abs().max()
    # every sampled token is inside psi's nucleus (or EOS)
    P = r.meta["prompt_length"]
    with torch.no_grad():
        am = r.data["attention_mask"]
        psi = trained.mask_model(input_ids=r.data["input_ids"], attention_mask=am,
                                 position_ids=(am.cumsum(-1) - 1).clamp(min=0)).logits[:, P - 1 : -1]
    keep = top_p_keep(psi, 0.5, 2, trained.eos_token_id)
    chosen = keep.gather(-1, r.data["completion_ids"].unsqueeze(-1)).squeeze(-1)
    assert chosen[r.mask].all()
    # masking renormalises: the masked log-probs are above the unmasked ones
    from polyrl.plugins.updates.nlpo import unmasked

    plain = trained(unmasked(r))
    assert (lp[r.mask] >= plain[r.mask] - 1e-5).all() and (lp[r.mask] > plain[r.mask] + 1e-3).any()
    # a checkpointed psi is rebuilt from the trained weights alone
    again = copy.deepcopy(policy)
    again.load_trainable_state_dict(trained.trainable_state_dict())
    again.set_action_mask(policy.trainable_state_dict(), top_p=0.5, min_tokens=2)
    assert torch.allclose(again(r), r.log_probs, atol=1e-4)
    trained.set_action_mask(None)
    assert trained.mask_model is None and "nlpo_top_p" not in sampler.sample(trained, contexts(2), g).meta


# ---------------------------------------------------------------------------- DR-PO's dataset resets
def test_dataset_reset_forces_prefixes_masked_out(policy: CausalLMPolicy) -> None:
    pairs = reviews(8)
    ctx = [Context(prompt=o, group=i, extra={"response": c}) for i, (o, c) in enumerate(pairs)]
    sampler = TextSampler(TextSamplerConfig(max_new_tokens=24, reset_column="response", reset_fraction=1.0))
    r = sampler.sample(policy, ctx, torch.Generator().manual_seed(3))
    forced = r.data["forced"]
    P = r.meta["prompt_length"]
    for i, (_, cont) in enumerate(pairs):
        ids = policy.tokenizer(cont, add_special_tokens=False)["input_ids"]
        h = int(forced[i].sum())
        assert 1 <= h <= len(ids) - 1, (h, len(ids))
        assert forced[i, :h].all() and not forced[i, h:].any(), "the forced tokens are a prefix"
        assert r.data["completion_ids"][i, :h].tolist() == ids[:h]
        assert not r.mask[i, :h].any() and (r.log_probs[i, :h] == 0).all() and r.mask[i, h]
        assert (r.data["attention_mask"][i, P : P + h] == 1).all()
        assert r.outputs["completion_ids"][i][:h] == ids[:h]  # the reward sees the whole response
    assert torch.allclose(policy(r), r.log_probs, atol=1e-4)
    none = TextSampler(TextSamplerConfig(max_new_tokens=8, reset_column="response", reset_fraction=0.0))
    assert not none.sample(policy, ctx, torch.Generator().manual_seed(3)).data["forced"].any()
    with pytest.raises(ValueError, match="has no such column"):
        sampler.sample(policy, contexts(2), torch.Generator().manual_seed(0))


# ---------------------------------------------------------------------------- every update trains
BASE = {
    "run": {"iterations": 3, "prompts_per_iteration": 2, "samples_per_prompt": 4, "seed": 3, "progress": False,
            "report": False, "save_every": 3},
    "prompts": {"file": "assets/tiny-gpt2/prompts.txt"},
    "policy": {"name": "causal_lm", "pretrained": "assets/tiny-gpt2"},
    "sampler": {"name": "generate", "max_new_tokens": 8},
    "rewards": {"sentiment": {"weight": 1.0}},
    "optimizer": {"lr": 1e-3},
}
UPDATES = {
    "ppo": ({"inner_epochs": 2, "train_batch_size": 4}, ["vf_loss", "pg_loss", "entropy", "kl_ref", "kl_coef", "vf_clipfrac"]),
    "nlpo": ({"inner_epochs": 2, "train_batch_size": 4, "mask_update_interval": 2, "mask_min_tokens": 10},
             ["vf_loss", "mask_refreshed", "kl_ref"]),
    "dr_po": ({"inner_epochs": 2, "train_batch_size": 4}, ["vf_loss", "reset_fraction", "reset_length"]),
    "grpo": ({"train_batch_size": 4, "beta": 0.04}, ["kl_ref", "clipfrac"]),
    "rloo": ({"train_batch_size": 4, "inner_epochs": 2}, ["kl_ref", "clipfrac", "approx_kl"]),
    "rebel": ({"train_batch_size": 4, "kl_coef": 0.01}, ["logratio_diff", "reward_diff_abs", "kl_ref"]),
    "a_star_po": ({"train_batch_size": 4, "num_reference_samples": 2, "reference_batch_size": 32},
                  ["v_star_mean", "log_ratio_ref"]),
}


def _config(tmp_path: Path, name: str) -> dict:
    data = copy.deepcopy(BASE)
    update, _ = UPDATES[name]
    data["update"] = {"name": name, **update}
    data["run"]["output_dir"] = str(tmp_path / name)
    if name in ("ppo", "nlpo", "dr_po"):
        data["policy"]["value_head"] = True
    if name == "dr_po":
        rows = [{"prompt": o, "response": c} for o, c in reviews(16)]
        tmp_path.mkdir(parents=True, exist_ok=True)
        (tmp_path / "reviews.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        data["prompts"] = {"file": str(tmp_path / "reviews.jsonl")}
        data["sampler"].update(reset_column="response", max_new_tokens=16)
    if name == "a_star_po":
        data["run"]["samples_per_prompt"] = 1
        data["run"]["prompts_per_iteration"] = 8
        data["prompts"] = {"items": PROMPTS[:8]}
    return data


@pytest.fixture(autouse=True)
def _cwd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)


@pytest.mark.parametrize("name", list(UPDATES))
def test_update_trains_on_the_tiny_world(tmp_path: Path, name: str) -> None:
    host = Host()
    trainer = train(host.build_config(_config(tmp_path, name)), host)
    run = tmp_path / name
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2, 3]
    _, keys = UPDATES[name]
    for r in rows:
        for key in ["loss", "grad_norm", *keys]:
            assert key in r and r[key] == r[key], (name, key, r.get(key))  # present and not NaN
        assert r["grad_norm"] > 0
    # the weights moved away from the pretrained model
    initial = load_file(str(TINY / "model.safetensors"))
    trained = load_file(str(run / "checkpoints" / "iter_000003" / "trainable.safetensors"))
    moved = [k for k, v in trained.items() if k.startswith("model.") and k[6:] in initial and not torch.equal(v, initial[k[6:]])]
    assert moved, name
    # the update's state survives a checkpoint round trip
    state = copy.deepcopy(trainer.update.state_dict())
    fresh = host.build_update(host.build_config(_config(tmp_path / "again", name)))
    fresh.load_state_dict(state)
    if name == "a_star_po":
        assert set(fresh.v_star) == set(PROMPTS[:8])
    if name in ("ppo", "nlpo", "dr_po"):
        assert fresh.kl_coef == trainer.update.kl_coef != BASE["optimizer"]["lr"]
    if name == "nlpo":
        assert rows[1]["mask_refreshed"] == 1.0 and rows[0]["mask_refreshed"] == 0.0
        assert set(fresh.mask_state) == set(trainer.policy.trainable_state_dict())


def test_a_star_po_estimates_v_star_from_reference_samples(tmp_path: Path) -> None:
    from polyrl.plugins.updates.a_star_po import optimal_value

    data = _config(tmp_path, "a_star_po")
    data["run"]["iterations"] = 1
    host = Host()
    trainer = train(host.build_config(data), host)
    # recompute V* of the first prompt from the same reference samples (same generator, same policy)
    fresh = CausalLMPolicy(CausalLMConfig(pretrained=str(TINY)))
    sampler = trainer.sampler
    ctx = [Context(prompt=p, group=i) for i, p in enumerate(PROMPTS[:8]) for _ in range(2)]
    g = torch.Generator().manual_seed(__import__("polyrl.loop", fromlist=["derive_seed"]).derive_seed(3, 0, 0, "a_star_po/v_star/0"))
    r = sampler.sample(fresh, ctx, g)
    scores = trainer.rewards[0][2](r)
    assert trainer.update.v_star[PROMPTS[0]] == pytest.approx(optimal_value(scores[:2], 0.5), abs=1e-5)
    assert optimal_value(torch.tensor([0.0, 1.0]), 0.5) == pytest.approx(0.5 * torch.log(torch.tensor((1 + 2.718281828**2) / 2)).item(), rel=1e-6)


def test_actor_critic_updates_need_a_value_head(tmp_path: Path) -> None:
    host = Host()
    for name in ("ppo", "nlpo", "dr_po"):
        data = _config(tmp_path, name)
        data["policy"]["value_head"] = False
        with pytest.raises(ConfigError, match="policy.value_head=false.*accepted: true"):
            host.build_config(data)
    data = _config(tmp_path, "dr_po")
    data["sampler"].pop("reset_column")
    with pytest.raises(ConfigError, match="sampler.reset_column"):
        host.build_config(data)


def test_nlpo_and_ppo_share_settings_and_docs() -> None:
    from dataclasses import fields

    from polyrl.config import field_docs
    from polyrl.plugins.updates.nlpo import NLPOConfig
    from polyrl.plugins.updates.ppo import PPOConfig

    ppo, nlpo = field_docs(PPOConfig), field_docs(NLPOConfig)
    for f in fields(PPOConfig):
        assert f.name in nlpo and nlpo[f.name] == ppo[f.name], f.name
        assert getattr(NLPOConfig(), f.name) == getattr(PPOConfig(), f.name), f.name


@pytest.mark.slow
def test_cli_ppo_config_raises_sentiment(tmp_path: Path) -> None:
    """`polyrl train configs/ppo_tiny_text.yaml` (shortened) raises sentiment and logs perplexity."""
    import os
    import subprocess
    import sys

    run = tmp_path / "ppo"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "polyrl.cli", "train", "configs/ppo_tiny_text.yaml", f"run.output_dir={run}",
         "run.iterations=12", "optimizer.lr=3e-4", "run.progress=false", "run.report=false"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    first = sum(r["reward/sentiment"] for r in rows[:2]) / 2
    last = sum(r["reward/sentiment"] for r in rows[-3:]) / 3
    assert last > first + 0.3, (first, last)
    assert all(1.0 < r["reward/perplexity"] < 50 for r in rows)
    assert (run / "policy" / "value_head.safetensors").is_file()


WORKER = '''
import json, sys
from pathlib import Path
import yaml
from safetensors.torch import save_file
from polyrl.host import Host
from polyrl.loop import train

host = Host()
trainer = train(host.build_config(yaml.safe_load(Path(sys.argv[1]).read_text())), host)
rank = trainer.accelerator.process_index
save_file(trainer.policy.trainable_state_dict(), str(Path(sys.argv[2]) / f"rank{rank}.safetensors"))
(Path(sys.argv[2]) / f"rank{rank}.json").write_text(json.dumps(
    {"n": trainer.accelerator.num_processes, "kl_coef": trainer.update.kl_coef}))
'''


@pytest.mark.slow
@pytest.mark.distributed
def test_ppo_with_value_head_keeps_two_processes_identical(tmp_path: Path) -> None:
    """PPO through `accelerate launch` on two CPU processes: the LoRA and value-head weights and the
    adaptive KL coefficient stay identical on both ranks."""
    import os
    import socket
    import subprocess
    import sys

    import yaml

    config = {
        "run": {"iterations": 2, "prompts_per_iteration": 2, "samples_per_prompt": 2, "seed": 3, "cpu": True,
                "output_dir": str(tmp_path / "run"), "progress": False, "report": False},
        "prompts": {"items": PROMPTS[:4]},
        "policy": {"name": "causal_lm", "pretrained": "assets/tiny-gpt2", "lora_rank": 4, "value_head": True},
        "sampler": {"name": "generate", "max_new_tokens": 6},
        "rewards": {"sentiment": {}},
        "update": {"name": "ppo", "train_batch_size": 2, "inner_epochs": 2},
        "optimizer": {"lr": 5e-3},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    (tmp_path / "worker.py").write_text(WORKER)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [str(Path(sys.executable).with_name("accelerate")), "launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
           str(tmp_path / "worker.py"), str(tmp_path / "config.yaml"), str(tmp_path)]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["n"] for r in ranks] == [2, 2] and ranks[0]["kl_coef"] == ranks[1]["kl_coef"] != 0.1
    w0, w1 = (load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(2))
    assert "value_head.weight" in w0 and w0.keys() == w1.keys()
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k
