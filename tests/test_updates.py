"""Update algorithms against hand computations on small tensors."""

from __future__ import annotations

import math

import pytest
import torch

from polyrl.plugins.updates.ddpo import ddpo_loss
from polyrl.plugins.updates.grpo import grpo_loss
from polyrl.stats import PerPromptStatTracker, group_advantages


def test_ddpo_loss_by_hand():
    logp = torch.tensor([-1.0, -2.0, -0.5], requires_grad=True)
    old = torch.tensor([-1.0, -2.1, -0.4])
    adv = torch.tensor([1.0, 2.0, -1.0])
    eps = 0.05
    loss, stats = ddpo_loss(logp, old, adv, eps)
    # ratios: 1, e^0.1 = 1.10517, e^-0.1 = 0.904837
    r = [1.0, math.exp(0.1), math.exp(-0.1)]
    per = [
        max(-1.0 * r[0], -1.0 * min(max(r[0], 1 - eps), 1 + eps)),
        max(-2.0 * r[1], -2.0 * min(max(r[1], 1 - eps), 1 + eps)),  # clipped: -2 * 1.05
        max(1.0 * r[2], 1.0 * min(max(r[2], 1 - eps), 1 + eps)),  # clipped: 0.95 > 0.9048
    ]
    assert loss.item() == pytest.approx(sum(per) / 3, rel=1e-6)
    assert stats["approx_kl"] == pytest.approx(0.5 * (0 + 0.01 + 0.01) / 3, rel=1e-5)
    assert stats["clipfrac"] == pytest.approx(2 / 3)
    loss.backward()
    # only the unclipped sample carries gradient: d/dlogp (-A r) = -A r = -1 for sample 0
    assert logp.grad.tolist() == pytest.approx([-1 / 3, 0.0, 0.0])


def test_ddpo_loss_ignores_invalid_steps():
    logp = torch.tensor([-1.0, -1.0])
    loss, _ = ddpo_loss(logp, logp.clone(), torch.tensor([1.0, 5.0]), 0.1, valid=torch.tensor([True, False]))
    assert loss.item() == pytest.approx(-1.0)


def test_grpo_loss_by_hand_with_k3_kl():
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.7, 0.0]], requires_grad=True)
    old = torch.tensor([[-1.1, -2.0, -3.0], [-0.5, -0.4, 0.0]])
    ref = torch.tensor([[-1.0, -1.5, -3.0], [-0.6, -0.7, 0.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    adv = torch.tensor([0.5, -1.0])
    eps, beta = 0.2, 0.1
    loss, stats = grpo_loss(logp, old, adv, mask, eps, beta, ref, "sequence_mean")

    def tok(lp, o, rf, a):
        r = math.exp(lp - o)
        surr = min(r * a, min(max(r, 1 - eps), 1 + eps) * a)
        d = rf - lp
        return -surr + beta * (math.exp(d) - d - 1)

    seq0 = sum(tok(logp[0, t].item(), old[0, t].item(), ref[0, t].item(), 0.5) for t in range(3)) / 3
    seq1 = sum(tok(logp[1, t].item(), old[1, t].item(), ref[1, t].item(), -1.0) for t in range(2)) / 2
    assert loss.item() == pytest.approx((seq0 + seq1) / 2, rel=1e-6)
    kl = [math.exp(d) - d - 1 for d in (0.0, 0.5, 0.0, -0.1, 0.0)]
    assert stats["kl_ref"] == pytest.approx(sum(kl) / 5, rel=1e-5)
    # ratio e^0.1 = 1.105 and e^-0.3 = 0.741: the second is outside [0.8, 1.2]
    assert stats["clipfrac"] == pytest.approx(1 / 5)

    token_loss, _ = grpo_loss(logp, old, adv, mask, eps, beta, ref, "token_mean")
    all_tokens = [tok(logp[0, t].item(), old[0, t].item(), ref[0, t].item(), 0.5) for t in range(3)] + [
        tok(logp[1, t].item(), old[1, t].item(), ref[1, t].item(), -1.0) for t in range(2)
    ]
    assert token_loss.item() == pytest.approx(sum(all_tokens) / 5, rel=1e-6)


def test_grpo_loss_on_policy_gradient_is_advantage_weighted_score():
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -0.7]], requires_grad=True)
    adv = torch.tensor([2.0, -1.0])
    loss, _ = grpo_loss(logp, logp.detach().clone(), adv, torch.ones(2, 2, dtype=torch.bool), 0.2)
    loss.backward()
    assert logp.grad.flatten().tolist() == pytest.approx([-0.5, -0.5, 0.25, 0.25])


def test_group_advantages():
    rewards = torch.tensor([1.0, 3.0, 10.0, 10.0, 0.0, 4.0])
    groups = [0, 0, 1, 1, 2, 2]
    adv = group_advantages(rewards, groups, eps=0.0 + 1e-12)
    std = torch.tensor([1.0, 3.0]).std().item()  # unbiased: sqrt(2)
    assert adv[:2].tolist() == pytest.approx([-1 / std, 1 / std], rel=1e-5)
    assert adv[2:4].tolist() == pytest.approx([0.0, 0.0], abs=1e-6)
    assert group_advantages(rewards, groups, scale=False)[4:].tolist() == pytest.approx([-2.0, 2.0])


def test_per_prompt_tracker_switches_from_batch_to_prompt_stats():
    tracker = PerPromptStatTracker(buffer_size=4, min_count=3)
    prompts = ["cat", "cat", "dog", "dog"]
    r1 = torch.tensor([1.0, 2.0, 10.0, 20.0])
    adv = tracker.update(prompts, r1)
    mean, std = r1.mean(), r1.std(unbiased=False)
    assert adv.tolist() == pytest.approx(((r1 - mean) / (std + 1e-6)).tolist(), rel=1e-5)
    r2 = torch.tensor([3.0, 4.0, 30.0, 40.0])
    adv = tracker.update(prompts, r2)
    cat = torch.tensor([1.0, 2.0, 3.0, 4.0])
    dog = torch.tensor([10.0, 20.0, 30.0, 40.0])
    expected = torch.cat([(r2[:2] - cat.mean()) / (cat.std(unbiased=False) + 1e-6),
                          (r2[2:] - dog.mean()) / (dog.std(unbiased=False) + 1e-6)])
    assert adv.tolist() == pytest.approx(expected.tolist(), rel=1e-5)
    tracker.update(["cat"], torch.tensor([5.0]))
    assert list(tracker.buffers["cat"]) == [2.0, 3.0, 4.0, 5.0]  # bounded buffer
    restored = PerPromptStatTracker(buffer_size=4, min_count=3)
    restored.load_state_dict(tracker.state_dict())
    assert restored.buffers == tracker.buffers
