"""GRPO's loss and advantage variants against their reference definitions on fixed tensors.

The reference functions below transcribe, in plain torch, TRL's ``GRPOTrainer`` (``compute_loss``
and the advantage computation of ``_generate_and_score_completions``) and ``RLOOTrainer``
(``_compute_loss``), which implement the papers: DAPO (arXiv:2503.14476; clip-higher, token-level
loss), Dr. GRPO (arXiv:2503.20783; constant normaliser, no std scaling), GSPO (arXiv:2507.18071;
sequence-level ratio), PPO Lite (arXiv:2508.08221; batch std) and GDPO (arXiv:2601.05242;
per-reward group normalisation). Hand-computed literals check the same definitions where the
numbers are simple enough to write down.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch

from polyrl import ConfigError, hookimpl
from polyrl.config import field_docs
from polyrl.plugins.updates.grpo import (
    GRPOConfig, batch_normalize, gdpo_rewards, grpo_advantages, grpo_loss,
)
from polyrl.plugins.updates.rloo import RLOOConfig, rloo_loss

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "assets" / "tiny-gpt2"


# ------------------------------------------------------------------------------ references (TRL)
def trl_grpo_loss(logps, old, ref, mask, advantages, *, loss_type, eps_low, eps_high, beta, level,
                  max_completion_length=None, num_items_in_batch=None, num_processes=1, accumulation=1):
    """TRL GRPOTrainer.compute_loss for the clipped loss types, line by line (mask is float)."""
    advantages = advantages.unsqueeze(1)
    log_ratio = logps - old
    if level == "token":
        log_importance_weights = log_ratio
    else:
        log_importance_weights = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    coef_1 = torch.exp(log_importance_weights)
    if beta != 0.0:
        per_token_kl = torch.exp(ref - logps) - (ref - logps) - 1
    coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
    per_token_loss = -torch.min(coef_1 * advantages, coef_2 * advantages)
    if beta != 0.0:
        per_token_loss = per_token_loss + beta * per_token_kl
    if loss_type == "grpo":
        return ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean() / accumulation
    if loss_type == "bnpo":
        return (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0) / accumulation
    if loss_type == "dr_grpo":
        return (per_token_loss * mask).sum() / (per_token_loss.size(0) * max_completion_length) / accumulation
    if loss_type == "dapo":
        normalizer = num_items_in_batch.clamp(min=1.0) / num_processes
        return (per_token_loss * mask).sum() / normalizer
    raise ValueError(loss_type)


def trl_nanstd(x, dim=None, keepdim=False):
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    variance = torch.nanmean((x - mean) ** 2, dim=dim, keepdim=True)
    count = torch.sum(~torch.isnan(x), dim=dim, keepdim=True)
    variance = variance * count / (count - 1)
    std = torch.sqrt(variance)
    if not keepdim:
        std = std.squeeze(dim) if dim is not None else std.squeeze()
    return std


def trl_advantages(rewards_per_func, weights, num_generations, scale_rewards, aggregation):
    """TRL's advantages from ``[N, K]`` rewards of contiguous groups of ``num_generations``."""
    if aggregation == "sum_then_normalize":
        rewards = (rewards_per_func * weights.unsqueeze(0)).nansum(dim=1)
        mean_grouped = torch.nanmean(rewards.view(-1, num_generations), dim=1).repeat_interleave(num_generations)
        if scale_rewards in ("group", "none"):
            std = trl_nanstd(rewards.view(-1, num_generations), dim=1).repeat_interleave(num_generations)
        else:
            std = trl_nanstd(rewards).expand_as(rewards)
        advantages = rewards - mean_grouped
        if scale_rewards != "none":
            advantages = advantages / (std + 1e-4)
        return advantages
    grouped = rewards_per_func.view(-1, num_generations, rewards_per_func.shape[1])
    mean_k = torch.nanmean(grouped, dim=1, keepdim=True)
    std_k = trl_nanstd(grouped, dim=1, keepdim=True)
    reward_k = ((grouped - mean_k) / (std_k + 1e-4)).view(-1, rewards_per_func.shape[1])
    rewards = (reward_k * weights.unsqueeze(0)).nansum(dim=1)
    return (rewards - torch.nanmean(rewards)) / (trl_nanstd(rewards) + 1e-4)


def trl_rloo_loss(logps, old_logps, advantages, eps_low, eps_high):
    """TRL RLOOTrainer._compute_loss (sequence log-probs)."""
    coef_1 = torch.exp(logps - old_logps)
    coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
    return (-torch.min(coef_1 * advantages, coef_2 * advantages)).mean()


# ------------------------------------------------------------------------------ fixed tensors
def fixed_batch():
    """3 sequences of 4, 2 and 3 valid tokens; token and sequence ratios inside [0.8, 1.2], between
    1.2 and 1.28, above 1.28 and below 0.8."""
    logp = torch.tensor([[-1.0, -2.0, -0.5, -1.5], [-0.3, -0.9, 0.0, 0.0], [-2.0, -0.1, -0.7, 0.0]])
    old = torch.tensor([[-1.1, -2.0, -1.0, -1.7], [-0.5, -0.2, 0.0, 0.0], [-2.24, -0.1, -0.4, 0.0]])
    ref = torch.tensor([[-1.0, -1.8, -0.6, -1.4], [-0.4, -0.9, 0.0, 0.0], [-1.9, -0.3, -0.7, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    adv = torch.tensor([0.8, -1.3, 0.5])
    return logp, old, ref, mask, adv


LOSS_CASES = [
    (loss_type, level, eps, beta)
    for loss_type in ("grpo", "bnpo", "dr_grpo", "dapo")
    for level in ("token", "sequence")
    for eps in ((0.2, 0.2), (0.2, 0.28), (0.1, 0.35))
    for beta in (0.0, 0.04)
]


@pytest.mark.parametrize("loss_type,level,eps,beta", LOSS_CASES)
def test_loss_matches_trl(loss_type, level, eps, beta):
    logp0, old, ref, mask, adv = fixed_batch()
    eps_low, eps_high = eps
    logp = logp0.clone().requires_grad_(True)
    loss, stats = grpo_loss(
        logp, old, adv, mask, eps_low, beta, ref, loss_type, epsilon_high=eps_high, importance_sampling_level=level,
        max_completion_length=6, num_tokens=mask.sum().float(),
    )
    loss.backward()
    expected_logp = logp0.clone().requires_grad_(True)
    expected = trl_grpo_loss(
        expected_logp, old, ref, mask.float(), adv, loss_type=loss_type, eps_low=eps_low, eps_high=eps_high, beta=beta,
        level=level, max_completion_length=6, num_items_in_batch=mask.sum().float(),
    )
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6, abs=1e-7)
    assert torch.allclose(logp.grad, expected_logp.grad, atol=1e-7)
    assert (logp.grad[~mask] == 0).all()
    # clip fractions as TRL counts them: low (ratio < 1 - eps_low, A < 0), high (ratio > 1 + eps_high, A > 0)
    r = torch.exp(logp0 - old)
    if level == "sequence":
        r = torch.exp(((logp0 - old) * mask).sum(1) / mask.sum(1)).unsqueeze(1).expand_as(mask)
        weight = torch.zeros_like(mask, dtype=torch.float)
        weight[:, 0] = 1  # one ratio per sequence
    else:
        weight = mask.float()
    a = adv.unsqueeze(1).expand_as(r)
    low = (((r < 1 - eps_low) & (a < 0)).float() * weight).sum() / weight.sum()
    high = (((r > 1 + eps_high) & (a > 0)).float() * weight).sum() / weight.sum()
    assert stats["clipfrac_low"] == pytest.approx(low.item())
    assert stats["clipfrac_high"] == pytest.approx(high.item())


def test_clip_cases_are_exercised():
    """The fixed tensors clip on both sides, and clip-higher frees the ratios in (1.2, 1.28]."""
    logp, old, ref, mask, adv = fixed_batch()
    # token ratios: A > 0: 1.105, 1, 1.649, 1.221 | 1.271, 1, 0.741; A < 0: 1.221, 0.497
    sym = grpo_loss(logp, old, adv, mask, 0.2)[1]
    higher = grpo_loss(logp, old, adv, mask, 0.2, epsilon_high=0.28)[1]
    assert (sym["clipfrac_high"], higher["clipfrac_high"]) == pytest.approx((3 / 9, 1 / 9))
    assert sym["clipfrac_low"] == higher["clipfrac_low"] == pytest.approx(1 / 9)
    assert (sym["clipfrac"], higher["clipfrac"]) == pytest.approx((6 / 9, 3 / 9))  # either sign of A
    # sequence ratios: e^0.2 = 1.221 (A > 0), e^-0.25 = 0.779 (A < 0), e^-0.02 = 0.980
    seq = grpo_loss(logp, old, adv, mask, 0.2, importance_sampling_level="sequence")[1]
    seq_higher = grpo_loss(logp, old, adv, mask, 0.2, epsilon_high=0.28, importance_sampling_level="sequence")[1]
    assert (seq["clipfrac_high"], seq["clipfrac_low"], seq_higher["clipfrac_high"]) == pytest.approx((1 / 3, 1 / 3, 0.0))


def test_aggregations_by_hand():
    """On-policy (ratio 1): token loss -A. Sample 0 (A = 1) has 1 token, sample 1 (A = -1) has 3."""
    logp = torch.zeros(2, 4)
    mask = torch.tensor([[1, 0, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    adv = torch.tensor([1.0, -1.0])
    value = lambda loss_type, **kw: grpo_loss(logp, logp, adv, mask, 0.2, loss_type=loss_type, **kw)[0].item()  # noqa: E731
    assert value("grpo") == pytest.approx(0.0)  # (-1/1 + 3/3) / 2
    assert value("bnpo") == pytest.approx(0.5)  # (-1 + 3) / 4
    assert value("dr_grpo", max_completion_length=8) == pytest.approx(0.125)  # 2 / (2 * 8)
    assert value("dr_grpo") == pytest.approx(0.25)  # default constant: T = 4
    assert value("dapo", num_tokens=8.0) == pytest.approx(0.25)  # 2 / 8 tokens in the whole step
    assert value("sequence_mean") == value("grpo") and value("token_mean") == value("bnpo")  # old names
    with pytest.raises(ValueError, match="num_tokens"):
        value("dapo")
    with pytest.raises(ValueError, match="accepted"):
        value("seq_mean")


def test_clip_higher_by_hand():
    """A positive advantage with ratio e^0.24 = 1.2712: clipped at 1.2 by eps 0.2, free under 1.28."""
    logp = torch.tensor([[0.24]], requires_grad=True)
    old, mask, adv = torch.zeros(1, 1), torch.ones(1, 1, dtype=torch.bool), torch.tensor([2.0])
    sym, _ = grpo_loss(logp, old, adv, mask, 0.2)
    assert sym.item() == pytest.approx(-2.0 * 1.2)
    higher, stats = grpo_loss(logp, old, adv, mask, 0.2, epsilon_high=0.28)
    assert higher.item() == pytest.approx(-2.0 * math.exp(0.24), rel=1e-6)
    higher.backward()
    assert logp.grad.item() == pytest.approx(-2.0 * math.exp(0.24), rel=1e-6)
    assert stats["clipfrac"] == 0.0
    # a negative advantage with ratio e^-0.3 = 0.741 < 1 - 0.2: clipped, no gradient
    low, stats = grpo_loss(torch.tensor([[-0.3]]), old, torch.tensor([-1.0]), mask, 0.2, epsilon_high=0.28)
    assert low.item() == pytest.approx(0.8) and stats["clipfrac_low"] == 1.0


def test_gspo_sequence_ratio_by_hand():
    """Log-ratios 0.1 and -0.3: one sequence ratio e^-0.1 for both tokens; its gradient is shared."""
    logp = torch.tensor([[0.1, -0.3]], requires_grad=True)
    old, mask, adv = torch.zeros(1, 2), torch.ones(1, 2, dtype=torch.bool), torch.tensor([1.0])
    loss, _ = grpo_loss(logp, old, adv, mask, 0.2, importance_sampling_level="sequence")
    assert loss.item() == pytest.approx(-math.exp(-0.1), rel=1e-6)
    loss.backward()
    assert logp.grad.tolist()[0] == pytest.approx([-math.exp(-0.1) / 2] * 2, rel=1e-6)
    token, _ = grpo_loss(logp.detach(), old, adv, mask, 0.2)
    assert token.item() == pytest.approx(-(math.exp(0.1) + math.exp(-0.3)) / 2, rel=1e-6)


def test_dapo_normaliser_spans_the_accumulation_window():
    """Two micro-batches of unequal lengths: dapo's summed losses are one token mean over both
    (TRL's num_items_in_batch), and the same holds over two processes whose gradients are averaged."""
    logp0, old, ref, mask, adv = fixed_batch()
    n = mask.sum().float()
    parts = [[0], [1, 2]]
    logp = logp0.clone().requires_grad_(True)
    total = sum(grpo_loss(logp[i], old[i], adv[i], mask[i], 0.2, loss_type="dapo", num_tokens=n)[0] for i in parts)
    total.backward()
    whole = logp0.clone().requires_grad_(True)
    bnpo, _ = grpo_loss(whole, old, adv, mask, 0.2, loss_type="bnpo")
    bnpo.backward()
    assert total.item() == pytest.approx(bnpo.item(), rel=1e-6)
    assert torch.allclose(logp.grad, whole.grad, atol=1e-7)
    reference = sum(trl_grpo_loss(logp0[i], old[i], ref[i], mask[i].float(), adv[i], loss_type="dapo", eps_low=0.2,
                                  eps_high=0.2, beta=0.0, level="token", num_items_in_batch=n) for i in parts)
    assert total.item() == pytest.approx(reference.item(), rel=1e-6)
    # bnpo averages micro-batch means instead: not the token mean when the lengths differ
    bnpo_parts = sum(grpo_loss(logp0[i], old[i], adv[i], mask[i], 0.2, loss_type="bnpo")[0] for i in parts) / 2
    assert bnpo_parts.item() != pytest.approx(bnpo.item(), rel=1e-3)
    # two processes (one micro-batch each): per-process normaliser N / 2, gradients averaged by DDP
    per_process = [grpo_loss(logp0[i], old[i], adv[i], mask[i], 0.2, loss_type="dapo", num_tokens=n / 2)[0] for i in parts]
    assert (sum(per_process) / 2).item() == pytest.approx(bnpo.item(), rel=1e-6)


# ------------------------------------------------------------------------------ advantages
REWARDS = torch.tensor([
    [1.0, 0.0], [0.5, 1.0], [0.0, 1.0], [0.2, 0.0],     # group 0
    [0.9, 0.3], [0.9, 0.1], [0.1, 0.0], [0.4, 1.0],     # group 1
    [0.0, 0.0], [0.3, 1.0], [0.6, 0.5], [0.3, 0.0],     # group 2
])
WEIGHTS = torch.tensor([1.0, 0.5])
GROUPS = [0] * 4 + [1] * 4 + [2] * 4


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_sum_then_normalize_matches_trl(scale):
    expected = trl_advantages(REWARDS, WEIGHTS, 4, scale, "sum_then_normalize")
    total = (REWARDS * WEIGHTS).sum(1)
    got = grpo_advantages(total, GROUPS, scale)
    assert torch.allclose(got, expected, atol=1e-6)
    # groups are found by id, not position: a shuffled batch gets the same advantages, shuffled
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(0))
    shuffled = grpo_advantages(total[perm], [GROUPS[i] for i in perm], scale)
    assert torch.allclose(shuffled, expected[perm], atol=1e-6)


def test_batch_scale_uses_every_process():
    """With ``batch``, a process's std is that of all processes' rewards (here: the first 8 of 12)."""
    total = (REWARDS * WEIGHTS).sum(1)
    expected = trl_advantages(REWARDS, WEIGHTS, 4, "batch", "sum_then_normalize")
    local = grpo_advantages(total[:8], GROUPS[:8], "batch", batch_rewards=total)
    assert torch.allclose(local, expected[:8], atol=1e-6)


def test_gdpo_matches_trl():
    expected = trl_advantages(REWARDS, WEIGHTS, 4, "group", "normalize_then_sum")
    summed = gdpo_rewards(REWARDS, WEIGHTS.tolist(), GROUPS)
    got = batch_normalize(summed)
    assert torch.allclose(got, expected, atol=1e-6)
    # a process holding groups 0 and 1 normalises its sums with every process's
    local = batch_normalize(summed[:8], summed)
    assert torch.allclose(local, expected[:8], atol=1e-6)
    # and it differs from normalising the weighted total (the point of GDPO)
    assert not torch.allclose(got, trl_advantages(REWARDS, WEIGHTS, 4, "group", "sum_then_normalize"), atol=1e-2)


def test_gdpo_by_hand():
    """One group of two samples: the std of two values a, b is |a - b| / sqrt(2), so each reward
    becomes about -+0.707 whatever its scale; the total (weights 1, 1) about -+1.414."""
    comp = torch.tensor([[0.0, 10.0], [1.0, 30.0]])
    summed = gdpo_rewards(comp, [1.0, 1.0], [0, 0])
    z1 = 0.5 / (math.sqrt(0.5) + 1e-4)
    z2 = 10.0 / (math.sqrt(200.0) + 1e-4)
    assert summed.tolist() == pytest.approx([-(z1 + z2), z1 + z2], rel=1e-6)
    # the weighted total instead is dominated by the second reward's scale
    total = grpo_advantages(comp.sum(1), [0, 0], "group")
    assert total.tolist() == pytest.approx([-10.5 / (21 / math.sqrt(2) + 1e-4), 10.5 / (21 / math.sqrt(2) + 1e-4)], rel=1e-6)


def test_rloo_clip_higher_matches_trl():
    logp0, old, _, mask, adv = fixed_batch()
    m = mask.float()
    for eps_low, eps_high in ((0.2, 0.2), (0.2, 0.28), (0.05, 0.6)):
        logp = logp0.clone().requires_grad_(True)
        loss, stats = rloo_loss(logp, old, mask, adv, eps_low, eps_high)
        loss.backward()
        seq = logp0.clone().requires_grad_(True)
        expected = trl_rloo_loss((seq * m).sum(1), (old * m).sum(1), adv, eps_low, eps_high)
        expected.backward()
        assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
        assert torch.allclose(logp.grad, seq.grad, atol=1e-7)
        ratio = torch.exp(((logp0 - old) * m).sum(1))
        assert stats["clipfrac"] == pytest.approx(((ratio < 1 - eps_low) | (ratio > 1 + eps_high)).float().mean().item())


# ------------------------------------------------------------------------------ configuration
BASE = {
    "run": {"iterations": 2, "prompts_per_iteration": 2, "samples_per_prompt": 4, "seed": 3, "progress": False,
            "report": False, "save_every": 2},
    "prompts": {"file": "assets/tiny-gpt2/prompts.txt"},
    "policy": {"name": "causal_lm", "pretrained": "assets/tiny-gpt2"},
    "sampler": {"name": "generate", "max_new_tokens": 8},
    "rewards": {"sentiment": {"weight": 1.0}},
    "update": {"name": "grpo", "train_batch_size": 4},
    "optimizer": {"lr": 1e-3},
}


def build(update: dict, **sections):
    from polyrl.host import Host

    data = copy.deepcopy(BASE)
    data["update"].update(update)
    data.update(sections)
    return Host().build_config(data)


def test_config_migrates_old_values_and_rejects_bad_ones():
    params = build({}).update.params
    assert (params.loss_type, params.scale_rewards, params.clip_bounds) == ("grpo", "group", (0.2, 0.2))
    old = build({"loss_aggregation": "token_mean", "scale_rewards": False}).update.params
    assert (old.loss_type, old.loss_aggregation, old.scale_rewards) == ("bnpo", None, "none")
    assert build({"scale_rewards": True}).update.params.scale_rewards == "group"
    assert build({"loss_aggregation": "sequence_mean"}).update.params.loss_type == "grpo"
    assert build({"clip_range": 0.1, "epsilon_high": 0.28}).update.params.clip_bounds == (0.1, 0.28)
    # dr_grpo's constant comes from the sampler's max_new_tokens unless given
    assert build({"loss_type": "dr_grpo"}).update.params.max_completion_length == 8
    assert build({"loss_type": "dr_grpo", "max_completion_length": 20}).update.params.max_completion_length == 20
    for update, fragments in [
        ({"loss_aggregation": "token_mean", "loss_type": "dapo"}, ["update.loss_aggregation='token_mean'", "update.loss_type='bnpo'", "contradicts"]),
        ({"loss_type": "dapo2"}, ["update.loss_type", "'dapo2'", "'dr_grpo'", "did you mean 'dapo'"]),
        ({"scale_rewards": "grup"}, ["update.scale_rewards", "'grup'"]),
        ({"epsilon_low": 1.0}, ["update.epsilon_low must be in [0, 1)", "1.0"]),
        ({"epsilon_high": -0.1}, ["update.epsilon_high must be >= 0"]),
        ({"importance_sampling_level": "seq"}, ["update.importance_sampling_level", "'sequence'"]),
        ({"multi_objective_aggregation": "gdpo"}, ["'normalize_then_sum'"]),
        ({"max_completion_length": 0}, ["update.max_completion_length must be >= 1"]),
    ]:
        with pytest.raises(ConfigError) as info:
            build(update)
        for fragment in fragments:
            assert fragment in str(info.value), (fragment, str(info.value))
    with pytest.raises(ConfigError, match="epsilon_low"):
        build({"name": "rloo", "epsilon_low": 1.5})


def test_every_flag_is_documented(capsys):
    from polyrl.cli import main

    for cls, name in ((GRPOConfig, "grpo"), (RLOOConfig, "rloo")):
        docs = field_docs(cls)
        assert main(["config", "update", name]) == 0
        out = capsys.readouterr().out
        for f in cls.__dataclass_fields__:
            assert docs.get(f), (name, f)
            assert f"  {f} = " in out and docs[f].split()[0] in out, (name, f)


# ------------------------------------------------------------------------------ through the loop
pytestmark_tiny = pytest.mark.skipif(not (TINY / "model.safetensors").is_file(), reason="run scripts/make_tiny_gpt2.py first")


def _gradients(update: dict) -> torch.Tensor:
    """The gradient of the first optimizer step of iteration 1 (flattened), with the step skipped."""
    from polyrl.host import Host
    from polyrl.loop import Trainer

    host = Host()
    cfg = build(update, run={**BASE["run"], "iterations": 1, "output_dir": "unused"},
                sampler={"name": "generate", "max_new_tokens": 24})  # long enough for completions to end
    trainer = Trainer(cfg, host)
    trainer.iteration = 1
    contexts = trainer.prompts.contexts(1, 0, 1, cfg.run.prompts_per_iteration, cfg.run.samples_per_prompt)
    rollout = host.pm.hook.polyrl_sample(trainer=trainer, contexts=contexts)
    rewards = host.pm.hook.polyrl_reward(trainer=trainer, rollout=rollout)
    grads: list[torch.Tensor] = []

    def record() -> float:  # keep the gradient, leave the weights where they are
        params = trainer.policy.trainable_parameters()
        grads.append(torch.cat([p.grad.flatten() for p in params if p.grad is not None]).clone())
        trainer.optimizer.zero_grad(set_to_none=True)
        return 0.0

    trainer.optimizer_step = record
    trainer.update.step(trainer, rollout, rewards.total)
    assert len(grads) == 1 and bool(rollout.mask.sum(1).unique().numel() > 1)  # lengths differ
    return grads[0]


@pytestmark_tiny
def test_dapo_gradient_does_not_depend_on_accumulation(monkeypatch):
    monkeypatch.chdir(ROOT)
    whole = _gradients({"loss_type": "dapo", "train_batch_size": 8})
    accumulated = _gradients({"loss_type": "dapo", "train_batch_size": 2, "gradient_accumulation_batches": 4})
    assert torch.allclose(whole, accumulated, rtol=1e-4, atol=1e-7)
    # with one micro-batch on one process, dapo is bnpo; with four, bnpo averages micro-batch means
    assert torch.allclose(whole, _gradients({"loss_type": "bnpo", "train_batch_size": 8}), rtol=1e-4, atol=1e-7)
    bnpo_acc = _gradients({"loss_type": "bnpo", "train_batch_size": 2, "gradient_accumulation_batches": 4})
    assert not torch.allclose(whole, bnpo_acc, rtol=1e-3, atol=1e-6)


class ComponentsSeen:
    """A plugin that records each iteration's rollout (its reward components)."""

    def __init__(self) -> None:
        self.rollouts = []

    @hookimpl
    def polyrl_iteration_end(self, trainer, iteration, metrics, rollout):
        self.rollouts.append((metrics, rollout))


@pytestmark_tiny
@pytest.mark.parametrize("update", [
    {"loss_type": "dapo", "train_batch_size": 2, "gradient_accumulation_batches": 2, "epsilon_high": 0.28},
    {"loss_type": "dr_grpo", "scale_rewards": "none", "beta": 0.04},
    {"loss_type": "grpo", "importance_sampling_level": "sequence", "scale_rewards": "batch"},
    {"multi_objective_aggregation": "normalize_then_sum", "inner_epochs": 2},
], ids=["dapo", "dr_grpo", "gspo", "gdpo"])
def test_variant_trains_on_the_tiny_world(tmp_path, monkeypatch, update):
    import json

    from polyrl.host import Host
    from polyrl.loop import train

    monkeypatch.chdir(ROOT)
    seen = ComponentsSeen()
    host = Host()
    host.pm.register(seen)
    data = copy.deepcopy(BASE)
    data["update"].update(update)
    data["run"]["output_dir"] = str(tmp_path / "run")
    data["rewards"] = {"sentiment": {"weight": 1.0}, "perplexity": {"weight": 0.5}}
    train(host.build_config(data), host)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        for key in ("loss", "grad_norm", "clipfrac", "clipfrac_low", "clipfrac_high", "approx_kl", "advantage_abs_mean"):
            assert key in r and math.isfinite(r[key]), (key, r)
        assert r["grad_norm"] > 0
    metrics, rollout = seen.rollouts[-1]
    components = rollout.outputs["reward_components"]
    assert components.shape == (8, 2)
    assert components[:, 0].mean().item() == pytest.approx(metrics["reward/sentiment"], rel=1e-5)
    assert components[:, 1].mean().item() == pytest.approx(metrics["reward/perplexity"], rel=1e-5)
