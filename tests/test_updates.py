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


# ---------------------------------------------------------------------------- REBEL
def test_rebel_loss_by_hand():
    from polyrl.plugins.updates.rebel import rebel_loss

    # two pairs: rows (0, 1) and (2, 3); the last step of row 1 and row 3 is padding
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -9.0], [-1.5, -0.5], [-2.0, 7.0]], requires_grad=True)
    old = torch.tensor([[-1.2, -2.1], [-0.4, 3.0], [-1.5, -0.7], [-1.0, 0.0]])
    mask = torch.tensor([[True, True], [True, False], [True, True], [True, False]])
    rewards = torch.tensor([1.0, 0.0, 0.5, 2.0])
    eta = 0.5
    loss, stats = rebel_loss(logp, old, mask, rewards, eta)
    # log pi/pi_t per sequence: 0.2 + 0.1 = 0.3, -0.1, 0.0 + 0.2 = 0.2, -1.0
    pred = [(0.3 - (-0.1)) / eta, (0.2 - (-1.0)) / eta]  # 0.8, 2.4
    target = [1.0 - 0.0, 0.5 - 2.0]  # 1.0, -1.5
    expected = ((pred[0] - target[0]) ** 2 + (pred[1] - target[1]) ** 2) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert stats["approx_kl"] == pytest.approx(0.5 * (0.09 + 0.01 + 0.04 + 1.0) / 4, rel=1e-5)
    assert stats["logratio_diff"] == pytest.approx((0.8 + 2.4) / 2, rel=1e-6)
    assert stats["reward_diff_abs"] == pytest.approx((1.0 + 1.5) / 2)
    loss.backward()
    # d/d logp[y] = 2 (pred - target) / eta / N on valid steps, minus that for y'; padding gets 0
    g0 = 2 * (pred[0] - target[0]) / eta / 2
    g1 = 2 * (pred[1] - target[1]) / eta / 2
    assert logp.grad.tolist() == [pytest.approx([g0, g0]), pytest.approx([-g0, 0.0]),
                                  pytest.approx([g1, g1]), pytest.approx([-g1, 0.0])]


def test_rebel_pairs_consecutive_samples_of_each_group():
    from polyrl.plugins.updates.rebel import pair_indices

    assert pair_indices([0, 0, 0, 0, 1, 1]).tolist() == [[0, 1], [2, 3], [4, 5]]
    assert pair_indices([3, 5, 3, 5]).tolist() == [[0, 2], [1, 3]]
    with pytest.raises(ValueError, match="group 1 has 3 samples"):
        pair_indices([0, 0, 1, 1, 1])


def test_rebel_rejects_odd_groups_and_batches_before_loading():
    import copy

    from polyrl.host import Host
    from polyrl.types import ConfigError

    data = {
        "run": {"prompts_per_iteration": 2, "samples_per_prompt": 4},
        "prompts": {"items": ["This movie was"]},
        "policy": {"name": "causal_lm"},
        "sampler": {"name": "generate"},
        "rewards": {"sentiment": {}},
        "update": {"name": "rebel", "train_batch_size": 4},
    }
    host = Host()
    assert host.build_config(data).update.params.eta == 1.0
    for run, update, fragments in [
        ({"samples_per_prompt": 3}, {}, ["run.samples_per_prompt=3", "even"]),
        ({"samples_per_prompt": 1}, {}, ["run.samples_per_prompt=1", "even"]),
        ({}, {"train_batch_size": 1}, ["update.train_batch_size=1", "accepted: an even divisor of 8: [2, 4, 8]"]),
        ({}, {"eta": 0.0}, ["update.eta must be > 0"]),
    ]:
        bad = copy.deepcopy(data)
        bad["run"].update(run)
        bad["update"].update(update)
        with pytest.raises(ConfigError) as info:
            host.build_config(bad)
        for fragment in fragments:
            assert fragment in str(info.value), (fragment, str(info.value))


# ---------------------------------------------------------------------------- PPO
def test_step_rewards_place_sequence_rewards_at_the_last_valid_step():
    from polyrl.plugins.updates.ppo import step_rewards

    mask = torch.tensor([[True, True, False], [False, True, True], [False, False, False]])
    out = step_rewards(torch.tensor([1.0, 2.0, 3.0]), mask)
    assert out.tolist() == [[0.0, 1.0, 0.0], [0.0, 0.0, 2.0], [0.0, 0.0, 0.0]]
    per_step = torch.tensor([[0.5, 0.25, 9.0], [1.0, 2.0, 3.0], [4.0, 4.0, 4.0]])
    assert step_rewards(per_step, mask).tolist() == [[0.5, 0.25, 0.0], [0.0, 2.0, 3.0], [0.0, 0.0, 0.0]]


def test_gae_by_hand():
    from polyrl.plugins.updates.ppo import gae

    gamma, lam = 0.9, 0.8
    rewards = torch.tensor([[0.0, 0.5, 1.0, 0.0], [0.0, 2.0, 0.0, 0.0]])
    values = torch.tensor([[0.2, 0.4, 0.6, 9.0], [7.0, 0.1, 0.3, 9.0]])
    # row 0: steps 0..2 valid, step 3 padding; row 1: step 0 forced (invalid), steps 1..2 valid
    mask = torch.tensor([[True, True, True, False], [False, True, True, False]])
    adv, ret = gae(rewards, values, mask, gamma, lam)
    d2 = 1.0 - 0.6  # terminal: no bootstrap
    d1 = 0.5 + gamma * 0.6 - 0.4
    d0 = 0.0 + gamma * 0.4 - 0.2
    a2, a1 = d2, d1 + gamma * lam * d2
    a0 = d0 + gamma * lam * a1
    assert adv[0].tolist() == pytest.approx([a0, a1, a2, 0.0])
    e2 = 0.0 - 0.3
    e1 = 2.0 + gamma * 0.3 - 0.1 + gamma * lam * e2
    assert adv[1].tolist() == pytest.approx([0.0, e1, e2, 0.0])
    assert ret[0].tolist() == pytest.approx([a0 + 0.2, a1 + 0.4, a2 + 0.6, 0.0])
    assert ret[1].tolist() == pytest.approx([0.0, e1 + 0.1, e2 + 0.3, 0.0])
    # gamma = lam = 1: advantages are reward-to-go minus value
    adv1, _ = gae(rewards, values, mask, 1.0, 1.0)
    assert adv1[0, :3].tolist() == pytest.approx([1.5 - 0.2, 1.5 - 0.4, 1.0 - 0.6])


def test_masked_whiten():
    from polyrl.plugins.updates.ppo import masked_whiten

    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, 5.0]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    out = masked_whiten(x, mask)
    valid = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    expected = (valid - 3.0) / valid.var(unbiased=False).sqrt()
    assert out[mask].tolist() == pytest.approx(expected.tolist(), rel=1e-5)
    assert out[0, 2].item() == 0.0


def test_ppo_loss_by_hand():
    from polyrl.plugins.updates.ppo import ppo_loss

    logp = torch.tensor([[-1.0, -0.5], [-2.0, -1.0]], requires_grad=True)
    old = torch.tensor([[-1.1, -0.5], [-1.5, -1.0]])
    adv = torch.tensor([[1.0, -0.5], [2.0, 3.0]])
    values = torch.tensor([[0.5, 1.0], [0.0, 0.0]], requires_grad=True)
    old_values = torch.tensor([[0.2, 1.0], [0.1, 0.0]])
    returns = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    entropy = torch.tensor([[2.0, 1.0], [0.5, 0.0]])
    mask = torch.tensor([[True, True], [True, False]])
    eps, eps_v, vf_coef, ent_coef = 0.2, 0.1, 0.5, 0.01
    loss, stats = ppo_loss(logp, old, adv, values, old_values, returns, mask, eps, eps_v, vf_coef, entropy, ent_coef)
    clip = lambda x, lo, hi: min(max(x, lo), hi)  # noqa: E731
    pg, vf = [], []
    for (i, j) in [(0, 0), (0, 1), (1, 0)]:
        r = math.exp(logp[i, j].item() - old[i, j].item())
        a = adv[i, j].item()
        pg.append(max(-a * r, -a * clip(r, 1 - eps, 1 + eps)))
        v, vo, R = values[i, j].item(), old_values[i, j].item(), returns[i, j].item()
        vc = vo + clip(v - vo, -eps_v, eps_v)
        vf.append(max((v - R) ** 2, (vc - R) ** 2))
    ent = (2.0 + 1.0 + 0.5) / 3
    expected = sum(pg) / 3 + vf_coef * 0.5 * sum(vf) / 3 - ent_coef * ent
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert stats["pg_loss"] == pytest.approx(sum(pg) / 3, rel=1e-6)
    assert stats["vf_loss"] == pytest.approx(0.5 * sum(vf) / 3, rel=1e-6)
    assert stats["entropy"] == pytest.approx(ent)
    # ratios e^0.1 (inside [0.8, 1.2]), 1, e^-0.5 = 0.61 (outside): one of three clipped
    assert stats["clipfrac"] == pytest.approx(1 / 3)
    # value (0,0): 0.5 vs old 0.2 is clipped to 0.3 -> (0.3 - 1)^2 > (0.5 - 1)^2: the clipped term wins
    # value (1,0): 0.0 vs old 0.1 is within 0.1 -> both terms equal
    assert stats["vf_clipfrac"] == pytest.approx(1 / 3)
    assert stats["approx_kl"] == pytest.approx(0.5 * (0.01 + 0.0 + 0.25) / 3, rel=1e-5)
    loss.backward()
    # the value at (0, 0) is past the clip: the max picks the clipped (constant) term -> no gradient
    assert values.grad[0, 0].item() == 0.0
    # value (0, 1): unclipped, d/dv 0.5 * vf_coef * (v - R)^2 / 3 = vf_coef * (1 - 0) / 3
    assert values.grad[0, 1].item() == pytest.approx(vf_coef * 1.0 / 3)
    assert values.grad[1, 1].item() == 0.0 and logp.grad[1, 1].item() == 0.0
    # logp (1, 0): ratio 0.61 < 0.8 with A = 2 > 0 -> min picks the unclipped term -> gradient -A r / 3
    assert logp.grad[1, 0].item() == pytest.approx(-2.0 * math.exp(-0.5) / 3, rel=1e-5)


def test_adaptive_kl_controller():
    from polyrl.plugins.updates.ppo import adaptive_kl_coef

    assert adaptive_kl_coef(0.1, 0.1, 0.1) == pytest.approx(0.1)
    assert adaptive_kl_coef(0.1, 0.11, 0.1) == pytest.approx(0.1 * (1 + 0.1 * 0.1))
    assert adaptive_kl_coef(0.1, 5.0, 0.1) == pytest.approx(0.1 * 1.02)  # error clipped at +0.2
    assert adaptive_kl_coef(0.1, 0.0, 0.1) == pytest.approx(0.1 * 0.98)
    assert adaptive_kl_coef(0.1, 5.0, None) == 0.1


# ---------------------------------------------------------------------------- RLOO, A*-PO, NLPO's mask
def test_leave_one_out_advantages_by_hand():
    from polyrl.plugins.updates.rloo import leave_one_out_advantages

    rewards = torch.tensor([1.0, 2.0, 6.0, 0.0, 4.0])
    adv = leave_one_out_advantages(rewards, [0, 0, 0, 1, 1])
    assert adv.tolist() == pytest.approx([1 - 4.0, 2 - 3.5, 6 - 1.5, 0 - 4.0, 4 - 0.0])
    with pytest.raises(ValueError, match="group 2 has a single sample"):
        leave_one_out_advantages(torch.tensor([1.0, 2.0, 3.0]), [0, 0, 2])


def test_rloo_loss_by_hand():
    from polyrl.plugins.updates.rloo import rloo_loss

    logp = torch.tensor([[-1.0, -0.5], [-2.0, 3.0]], requires_grad=True)
    old = torch.tensor([[-1.1, -0.5], [-1.5, 0.0]])
    mask = torch.tensor([[True, True], [True, False]])
    adv = torch.tensor([2.0, 1.0])
    eps = 0.2
    loss, stats = rloo_loss(logp, old, mask, adv, eps)
    r0, r1 = math.exp(0.1), math.exp(-0.5)  # sequence ratios (the masked step does not count)
    per = [max(-2.0 * r0, -2.0 * min(max(r0, 1 - eps), 1 + eps)), max(-1.0 * r1, -1.0 * min(max(r1, 1 - eps), 1 + eps))]
    assert loss.item() == pytest.approx(sum(per) / 2, rel=1e-6)
    assert stats["clipfrac"] == pytest.approx(0.5) and stats["approx_kl"] == pytest.approx(0.5 * (0.01 + 0.25) / 2, rel=1e-5)
    loss.backward()
    # sample 0 is inside the clip: d/dlogp_t of -A r / 2 = -A r / 2 on every valid step; sample 1 is below
    # 1 - eps with A > 0, where the pessimistic max keeps the unclipped term: gradient -A r / 2 on its valid step
    assert logp.grad[0].tolist() == pytest.approx([-2.0 * r0 / 2] * 2, rel=1e-5)
    assert logp.grad[1].tolist() == pytest.approx([-1.0 * r1 / 2, 0.0], rel=1e-5)
    # with A < 0 a ratio below 1 - eps is clipped: no gradient
    logp.grad = None
    rloo_loss(logp, old, mask, torch.tensor([2.0, -1.0]), eps)[0].backward()
    assert logp.grad[1].tolist() == [0.0, 0.0]


def test_a_star_po_loss_and_optimal_value_by_hand():
    from polyrl.plugins.updates.a_star_po import a_star_po_loss, optimal_value

    assert optimal_value(torch.tensor([0.0, 1.0, 1.0, 0.0]), 0.5) == pytest.approx(0.5 * math.log((2 + 2 * math.e**2) / 4))
    assert optimal_value(torch.tensor([0.3, 0.3]), 0.1) == pytest.approx(0.3)
    assert optimal_value(torch.tensor([0.0, 1.0]), 1e-3) == pytest.approx(1.0 - 1e-3 * math.log(2), rel=1e-4)  # soft max
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, 0.0]], requires_grad=True)
    ref = torch.tensor([[-1.5, -2.0, -1.0], [-1.0, -0.25, 9.0]])
    mask = torch.tensor([[True, True, False], [True, True, False]])
    rewards, v_star, beta2 = torch.tensor([1.0, 0.0]), torch.tensor([0.25, 0.5]), 0.1
    loss, stats = a_star_po_loss(logp, ref, mask, rewards, v_star, beta2)
    lr0, lr1 = (-3.0) - (-3.5), (-1.0) - (-1.25)  # sequence log-ratios over the valid steps
    e0, e1 = beta2 * lr0 - (1.0 - 0.25), beta2 * lr1 - (0.0 - 0.5)
    assert loss.item() == pytest.approx((e0**2 + e1**2) / 2, rel=1e-6)
    assert stats["log_ratio_ref"] == pytest.approx((lr0 + lr1) / 2)
    loss.backward()
    assert logp.grad.tolist() == [pytest.approx([e0 * beta2, e0 * beta2, 0.0]), pytest.approx([e1 * beta2, e1 * beta2, 0.0])]


def test_nlpo_action_mask_by_hand():
    from polyrl.plugins.text.logits import apply_action_mask

    processed = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4]]))
    psi = torch.log(torch.tensor([[0.6, 0.3, 0.05, 0.05]]))  # the masking policy's nucleus at p=0.8: tokens 0, 1
    masked = apply_action_mask(processed, psi, 0.8, 1)
    assert masked.softmax(-1).tolist() == [pytest.approx([1 / 3, 2 / 3, 0.0, 0.0])]
    with_eos = apply_action_mask(processed, psi, 0.8, 1, always=3)  # EOS stays allowed
    assert with_eos.softmax(-1).tolist() == [pytest.approx([0.1 / 0.7, 0.2 / 0.7, 0.0, 0.4 / 0.7])]
    # a row whose support would be empty (the policy's own top-k filter kept only token 3) is left unmasked
    only3 = torch.tensor([[float("-inf"), float("-inf"), float("-inf"), 0.0]])
    assert torch.equal(apply_action_mask(only3, psi, 0.8, 1), only3)
