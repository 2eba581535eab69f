"""The lilGym agent: factorised masked policy, episode sampler, and training through the loop."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from polyrl.host import Host
from polyrl.plugins.lilgym.evaluate import RandomPolicy, evaluate_split
from polyrl.plugins.lilgym.policy import NEG, LilGymCNNConfig, LilGymCNNPolicy, action_log_prob_table
from polyrl.plugins.lilgym.sampler import LilGymSampler, LilGymSamplerConfig, select_statements
from polyrl.types import ConfigError, Context

FIXTURES = Path(__file__).parent / "fixtures" / "lilgym"


@pytest.fixture(scope="module")
def tower_policy():
    torch.manual_seed(0)
    return LilGymCNNPolicy(LilGymCNNConfig(appearance="tower", channels=[4, 8, 8], hidden=32))


def test_factorised_table_is_a_masked_distribution_with_the_right_marginals():
    torch.manual_seed(0)
    n = 5
    layout = ((4, 3), (4,))  # 1 + 12 + 4 = 17 actions
    mask = torch.rand(n, 17) > 0.4
    mask[:, 0] = True
    mask[0, 13:] = False  # no REMOVE at all in row 0
    mask[1, 1:] = False  # only STOP in row 1
    type_logits, pos, attr, rem = torch.randn(n, 3), torch.randn(n, 4), torch.randn(n, 3), torch.randn(n, 4)
    table = action_log_prob_table(type_logits, [pos, attr], [rem], mask, layout)
    p = table.exp()
    assert torch.allclose(p.sum(-1), torch.ones(n), atol=1e-5)
    assert (p[~mask] == 0).all() and (table[~mask] <= NEG / 2).all()
    assert p[1, 0] == pytest.approx(1.0)
    # p(type = ADD) is the softmax of the type logits over the types that have a valid action
    for i in range(n):
        types = torch.tensor([True, bool(mask[i, 1:13].any()), bool(mask[i, 13:].any())])
        expected = torch.softmax(type_logits[i].masked_fill(~types, -1e9), -1)
        got = torch.stack([p[i, 0], p[i, 1:13].sum(), p[i, 13:].sum()])
        assert torch.allclose(got, expected, atol=1e-5)
        # p(position | ADD) renormalises over positions with a valid attribute
        add = mask[i, 1:13].view(4, 3)
        if add.any():
            pos_ok = add.any(-1)
            cond = p[i, 1:13].view(4, 3).sum(-1) / p[i, 1:13].sum()
            assert torch.allclose(cond, torch.softmax(pos[i].masked_fill(~pos_ok, -1e9), -1), atol=1e-5)


def test_sampler_records_what_the_policy_recomputes(tower_policy):
    sampler = LilGymSampler(LilGymSamplerConfig(task="TowerFlipIt", split="dev", data_dir=str(FIXTURES)), tower_policy)
    contexts = [Context("TowerFlipIt", group=g) for g in range(3) for _ in range(2)]
    r = sampler.sample(tower_policy, contexts, torch.Generator().manual_seed(1))
    b, t = r.mask.shape
    assert (b, t) == (6, 11)
    assert r.outputs["example_ids"][0::2] == r.outputs["example_ids"][1::2]  # one example per group
    assert r.data["images"].shape == (6, 11, 50, 190, 3) and r.data["action_masks"].shape == (6, 11, 13)
    lengths = r.mask.sum(1)
    assert (lengths >= 1).all() and torch.equal(lengths, r.outputs["episode_lengths"])
    assert (r.outputs["env_rewards"][~r.mask] == 0).all() and (r.log_probs[~r.mask] == 0).all()
    assert r.mask[:, 0].all() and (r.mask[:, 1:] <= r.mask[:, :-1]).all()  # True while the episode runs
    # every recorded action was valid under the recorded mask
    acts = r.data["actions"][r.mask]
    assert r.data["action_masks"][r.mask].gather(1, acts.unsqueeze(1)).all()
    out = tower_policy(r, with_values=True, with_entropy=True)
    assert torch.allclose(out["log_probs"], r.log_probs, atol=1e-5)
    assert out["values"].shape == (6, 11) and (out["entropy"][r.mask] > 0).all()
    steps = torch.zeros(6, 1, dtype=torch.long)
    assert torch.allclose(tower_policy(r, steps=steps)[:, 0], r.log_probs[:, 0], atol=1e-5)
    again = sampler.sample(tower_policy, contexts, torch.Generator().manual_seed(1))
    assert torch.equal(again.data["actions"], r.data["actions"])  # seeded


def test_gradients_reach_the_image_sentence_and_heads_but_not_a_frozen_encoder(tower_policy):
    sampler = LilGymSampler(LilGymSamplerConfig(task="TowerScratch", split="dev", data_dir=str(FIXTURES)), tower_policy)
    r = sampler.sample(tower_policy, [Context("TowerScratch", group=g) for g in range(4)], torch.Generator().manual_seed(0))
    tower_policy.zero_grad()
    out = tower_policy(r, with_values=True, with_entropy=True)
    (out["log_probs"].sum() + out["values"].sum() + out["entropy"].sum()).backward()
    assert tower_policy.cnn[0].weight.grad.abs().sum() > 0
    assert tower_policy.sentence_proj.weight.grad.abs().sum() > 0
    assert tower_policy.value.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in tower_policy.encoder.parameters())
    assert not any(k.startswith("encoder.") for k in tower_policy.trainable_state_dict())


def test_stop_forcing_records_the_executed_stop():
    policy = RandomPolicy("tower")
    cfg = LilGymSamplerConfig(task="TowerScratch", split="dev", data_dir=str(FIXTURES), stop_forcing=True)
    r = LilGymSampler(cfg, policy).sample(policy, [Context("t3", group=0)], torch.Generator().manual_seed(0))
    # "no black blocks" holds on the empty world: the first step is a forced STOP with +1
    assert r.data["actions"][0, 0] == 0 and r.mask[0].tolist() == [True] + [False] * 10
    assert r.outputs["env_rewards"][0, 0] == 1.0 and r.outputs["lilgym_success"][0] == 1.0
    assert r.outputs["lilgym_success_no_sf"][0] == 0.0 and "(forced)" in r.outputs["texts"][0]


def test_stop_forcing_without_recording_keeps_the_drawn_action():
    policy = RandomPolicy("tower")
    cfg = LilGymSamplerConfig(task="TowerScratch", split="dev", data_dir=str(FIXTURES), stop_forcing=True,
                              record_forced_stop=False)
    contexts = [Context("t3", group=g) for g in range(8)]
    r = LilGymSampler(cfg, policy).sample(policy, contexts, torch.Generator().manual_seed(0))
    # the environment stops every episode at once (+1) whatever was drawn; the rollout keeps the draws
    assert r.mask[:, 1:].sum() == 0 and (r.outputs["env_rewards"][:, 0] == 1.0).all()
    drawn = r.data["actions"][:, 0]
    assert (drawn != 0).any()  # some ADD (10 valid actions on the empty world, STOP is one of them)
    assert torch.allclose(r.log_probs[:, 0], torch.full((8,), -torch.log(torch.tensor(10.0))))
    assert all(("(forced)" in t) == bool(a != 0) for t, a in zip(r.outputs["texts"], drawn))


def test_stop_forcing_fraction_draws_which_episodes_are_forced():
    policy = RandomPolicy("tower")
    contexts = [Context("t3", group=g) for g in range(16)]  # the goal holds on the empty world
    n_forced = {}
    for fraction in (0.0, 0.5, 1.0):
        cfg = LilGymSamplerConfig(task="TowerScratch", split="dev", data_dir=str(FIXTURES), stop_forcing_fraction=fraction)
        sampler = LilGymSampler(cfg, policy)
        r = sampler.sample(policy, contexts, torch.Generator().manual_seed(3))
        forced = torch.tensor([env.stop_forcing for env in sampler._envs])
        # a forced episode ends at once with +1; an unforced one continues unless the random policy drew STOP
        one_step = r.mask.sum(1) == 1
        assert (one_step[forced]).all() and (r.outputs["env_rewards"][forced, 0] == 1.0).all()
        assert (r.data["actions"][~forced & ~one_step, 0] != 0).all()
        n_forced[fraction] = int(forced.sum())
    assert n_forced[0.0] == 0 and n_forced[1.0] == 16 and 3 <= n_forced[0.5] <= 13
    with pytest.raises(ConfigError, match=r"stop_forcing_fraction must be in \[0, 1\], got 1.5"):
        LilGymSamplerConfig(task="TowerScratch", split="dev", data_dir=str(FIXTURES), stop_forcing_fraction=1.5).check()


def test_initial_stop_logit_sets_the_prior_of_stop():
    torch.manual_seed(0)
    policy = LilGymCNNPolicy(LilGymCNNConfig(appearance="tower", channels=[4, 8, 8], hidden=32, initial_stop_logit=-3.0))
    assert policy.type_head.bias.tolist() == [-3.0, 0.0, 0.0]
    with torch.no_grad():
        policy.type_head.weight.zero_()  # only the bias decides the action type
    empty = torch.zeros(13, dtype=torch.bool)
    empty[:10] = True  # the empty world: STOP and the 9 ADDs, no REMOVE
    images = torch.full((1, 50, 190, 3), 255, dtype=torch.uint8)
    ids, smask = policy.tokenize(["There is a yellow block."])
    with torch.no_grad():
        table, _ = policy.heads(policy.features(images, policy.encode(ids, smask), torch.ones(1, dtype=torch.long)),
                                empty.unsqueeze(0))
    p_stop = float(table[0, 0].exp())
    assert p_stop == pytest.approx(1 / (1 + torch.e**3), rel=1e-4)  # sigmoid(-3): 4.7% instead of 1/2


def test_statement_partition_is_disjoint_and_keeps_worlds_together():
    sampler = LilGymSampler(LilGymSamplerConfig(task="TowerFlipIt", split="dev", data_dir=str(FIXTURES)))
    fit = select_statements(sampler.examples, "fit", 0.5)
    held = select_statements(sampler.examples, "heldout", 0.5)
    assert {e.id for e in fit}.isdisjoint(e.id for e in held) and len(fit) + len(held) == len(sampler.examples)
    assert {e.sentence for e in fit}.isdisjoint(e.sentence for e in held)


def test_random_baseline_evaluates_every_example_once():
    res = evaluate_split(RandomPolicy("tower"), "TowerFlipIt", "dev", data_dir=str(FIXTURES), seed=0, deterministic=False)
    assert res["episodes"] == 3 and 3 <= res["env_steps"] <= 33 and 0 <= res["success"] <= 1


def test_config_checks_before_models_load(tmp_path):
    host = Host()
    data = {
        "run": {"iterations": 1, "prompts_per_iteration": 4, "output_dir": str(tmp_path / "r")},
        "prompts": {"items": ["TowerScratch"]},
        "policy": {"name": "lilgym_cnn", "appearance": "scatter"},
        "sampler": {"name": "lilgym", "task": "TowerScratch", "split": "dev", "data_dir": str(FIXTURES)},
        "rewards": {"env_reward": {"weight": 1.0}},
        "update": {"name": "ppo", "kl_coef": 0.0, "train_batch_size": 4},
    }
    with pytest.raises(ConfigError, match="policy.appearance='scatter' does not match sampler.task='TowerScratch'"):
        host.build_config(data)
    data["policy"]["appearance"] = "tower"
    data["sampler"]["split"] = "test"
    with pytest.raises(ConfigError, match="tower_scratch_test.json' not found"):
        host.build_config(data)
    data["sampler"]["split"] = "dev"
    data["sampler"]["task"] = "TowerScratsch"
    with pytest.raises(ConfigError, match="did you mean 'TowerScratch'"):
        host.build_config(data)


def test_training_through_the_loop_with_ppo(tmp_path):
    from polyrl.loop import train

    host = Host()
    cfg = host.build_config({
        "run": {"iterations": 2, "prompts_per_iteration": 8, "output_dir": str(tmp_path / "run"), "cpu": True,
                "report": False, "progress": False},
        "prompts": {"items": ["TowerScratch"]},
        "policy": {"name": "lilgym_cnn", "appearance": "tower", "channels": [4, 8, 8], "hidden": 32},
        "sampler": {"name": "lilgym", "task": "TowerScratch", "split": "dev", "data_dir": str(FIXTURES)},
        "rewards": {"env_reward": {"weight": 1.0}, "lilgym_success": {"weight": 0.0}},
        "update": {"name": "ppo", "kl_coef": 0.0, "kl_target": None, "train_batch_size": 4, "inner_epochs": 1},
    })
    trainer = train(cfg, host)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2]
    for r in rows:
        assert 0.0 <= r["reward/lilgym_success"] <= 1.0 and "vf_loss" in r and "entropy" in r
    assert (tmp_path / "run" / "policy" / "model.safetensors").is_file()
    assert trainer.completed == 2


def test_stop_forcing_schedule_follows_the_training_iteration():
    cfg = LilGymSamplerConfig(task="TowerScratch", split="dev", data_dir=str(FIXTURES), stop_forcing_iterations=3)
    sampler = LilGymSampler(cfg)
    assert [(setattr(sampler, "iteration", i), sampler.stop_forcing_now())[1] for i in (0, 1, 3, 4)] == [False, True, True, False]
    always = LilGymSampler(LilGymSamplerConfig(task="TowerScratch", split="dev", data_dir=str(FIXTURES)))
    assert always.stop_forcing_now()
    always.training = False  # evaluation (polyrl.scoring.evaluating): never
    assert not always.stop_forcing_now()
    with pytest.raises(ConfigError, match="stop_forcing_iterations must be >= 0"):
        LilGymSamplerConfig(task="TowerScratch", split="dev", data_dir=str(FIXTURES), stop_forcing_iterations=-1).check()


# ----------------------------------------------------------------------------- language-model agent
@pytest.fixture(scope="module")
def lm_policy():
    from polyrl.plugins.lilgym.lm import LilGymLMConfig, LilGymLMPolicy

    torch.manual_seed(0)
    return LilGymLMPolicy(LilGymLMConfig(max_action_tokens=6))


def test_lm_agent_turns_recompute_and_unparsable_actions_are_invalid(lm_policy):
    from polyrl.plugins.lilgym.lm import LilGymTextSampler, LilGymTextSamplerConfig, build_prompt

    sampler = LilGymTextSampler(LilGymTextSamplerConfig(task="TowerFlipIt", split="dev", data_dir=str(FIXTURES)), lm_policy)
    r = sampler.sample(lm_policy, [Context("TowerFlipIt", group=g) for g in range(4)], torch.Generator().manual_seed(0))
    assert r.mask.shape == (4, 11 * 6) and r.data["prompt_ids"].shape[:2] == (4, 11)
    out = lm_policy(r, with_entropy=True)
    assert torch.allclose(out["log_probs"], r.log_probs, atol=1e-4)
    turns = r.mask.view(4, 11, 6).any(-1).sum(1)
    for i in range(4):
        # the base review model writes prose: an unparsable first action ends the episode with -1
        if r.outputs["lilgym_unparsable"][i]:
            rewards = r.outputs["env_rewards"][i]
            assert rewards.sum() <= -1.0 and rewards[rewards != 0][-1] == -1.0 and r.outputs["lilgym_success"][i] == 0
        last = int(r.mask[i].nonzero().max())
        assert r.outputs["env_rewards"][i, last] != 0  # the turn's reward sits on its last token
    assert (turns >= 1).all()
    ex = sampler.examples[0]
    prompt = build_prompt(ex, ex.world_copy(), "tower")
    assert prompt.splitlines()[1:] == ["make it false", "left: black yellow", "middle: -", "right: blue", "action:"]


def test_lm_agent_plays_a_parsed_action():
    from polyrl.plugins.lilgym.lm import LilGymTextSampler, LilGymTextSamplerConfig

    class Scripted:
        """Writes "remove left" then "stop" (the test stands in for the LM's text)."""

        appearance = "tower"

        def __init__(self, policy):
            self.p = policy
            self.cfg = policy.cfg
            self.lm = policy.lm
            self.turn = 0

        def encode_prompts(self, prompts):
            return self.p.encode_prompts(prompts)

        def generate(self, ids, mask, generator, deterministic=False):
            text = ["remove left\n", "stop\n"][min(self.turn, 1)]
            self.turn += 1
            tok = self.p.tokenizer(text, add_special_tokens=False)["input_ids"]
            n, a = ids.shape[0], self.cfg.max_action_tokens
            t = torch.full((n, a), self.lm.pad_token_id)
            t[:, : len(tok)] = torch.tensor(tok)
            m = torch.zeros(n, a, dtype=torch.bool)
            m[:, : len(tok)] = True
            return t, torch.zeros(n, a), m

        def decode(self, tokens, mask):
            return self.p.decode(tokens, mask)

    from polyrl.plugins.lilgym.lm import LilGymLMConfig, LilGymLMPolicy

    policy = LilGymLMPolicy(LilGymLMConfig(max_action_tokens=12))
    sampler = LilGymTextSampler(LilGymTextSamplerConfig(task="TowerFlipIt", split="dev", data_dir=str(FIXTURES)), policy)
    r = sampler.sample(Scripted(policy), [Context("f1-0", group=0)], torch.Generator().manual_seed(0))
    assert "remove left, stop" in r.outputs["texts"][0]  # removing the yellow block flips the statement
    assert r.outputs["lilgym_success"][0] == 1.0 and r.outputs["env_rewards"][0].sum() == pytest.approx(0.9)


@pytest.mark.parametrize("update", [{"name": "grpo", "train_batch_size": 2},
                                    {"name": "ppo", "train_batch_size": 2, "kl_coef": 0.05, "inner_epochs": 1}])
def test_lm_agent_trains_through_the_loop(tmp_path, update):
    from polyrl.loop import train

    host = Host()
    cfg = host.build_config({
        "run": {"iterations": 1, "prompts_per_iteration": 2, "samples_per_prompt": 2, "output_dir": str(tmp_path / "lm"),
                "cpu": True, "report": False, "progress": False},
        "prompts": {"items": ["TowerScratch"]},
        "policy": {"name": "lilgym_lm", "max_action_tokens": 4, "value_head": update["name"] == "ppo"},
        "sampler": {"name": "lilgym_text", "task": "TowerScratch", "split": "dev", "data_dir": str(FIXTURES)},
        "rewards": {"env_reward": {"weight": 1.0}, "lilgym_success": {"weight": 0.0}, "lilgym_steps": {"weight": 0.0}},
        "update": update,
    })
    train(cfg, host)
    row = json.loads((tmp_path / "lm" / "metrics.jsonl").read_text().splitlines()[0])
    assert row["iteration"] == 1 and "loss" in row and "reward/lilgym_success" in row
    assert row["reward/lilgym_steps"] >= 1.0  # turns per episode
    if update["name"] == "ppo":
        assert "vf_loss" in row and "kl_ref" in row  # value head and reference policy of the LM


def test_policies_and_samplers_must_pair(tmp_path):
    host = Host()
    with pytest.raises(ConfigError, match="policy 'lilgym_cnn' plays episodes through sampler 'lilgym', not 'lilgym_text'"):
        host.build_config({
            "run": {"iterations": 1, "prompts_per_iteration": 2, "samples_per_prompt": 2, "output_dir": str(tmp_path / "r")},
            "prompts": {"items": ["TowerScratch"]},
            "policy": {"name": "lilgym_cnn"},
            "sampler": {"name": "lilgym_text", "task": "TowerScratch", "split": "dev", "data_dir": str(FIXTURES)},
            "rewards": {"env_reward": {"weight": 1.0}},
            "update": {"name": "grpo", "train_batch_size": 4},
        })


def test_scatter_episodes_recompute_with_2661_masked_actions():
    torch.manual_seed(0)
    policy = LilGymCNNPolicy(LilGymCNNConfig(appearance="scatter", channels=[4, 8, 8], hidden=32))
    sampler = LilGymSampler(LilGymSamplerConfig(task="ScatterFlipIt", split="dev", data_dir=str(FIXTURES)), policy)
    r = sampler.sample(policy, [Context("ScatterFlipIt", group=g) for g in range(3)], torch.Generator().manual_seed(2))
    assert r.data["action_masks"].shape == (3, 11, 2661)
    acts = r.data["actions"][r.mask]
    assert r.data["action_masks"][r.mask].gather(1, acts.unsqueeze(1)).all()
    assert torch.allclose(policy(r), r.log_probs, atol=1e-5)


# ----------------------------------------------------------------------------- GPU configs
GPU_CONFIGS = {
    "lilgym_gpu_bert_tower_scratch": [],
    "lilgym_gpu_bert_tower_flipit": ["sampler.split=dev", "sampler.statements=fit"],  # FlipIt train is not offline
    "lilgym_gpu_bert_scatter_scratch": [],
    "lilgym_gpu_bert_scatter_flipit": ["sampler.split=dev", "sampler.statements=fit"],
    "lilgym_gpu_lm_tower_scratch": [],
}


@pytest.mark.parametrize("name", sorted(GPU_CONFIGS))
def test_gpu_configs_validate_with_hub_models_at_the_papers_scale(name):
    from polyrl.config import apply_overrides, load_yaml

    root = Path(__file__).resolve().parent.parent
    cfg = Host().build_config(apply_overrides(load_yaml(root / "configs" / f"{name}.yaml"), GPU_CONFIGS[name]))
    assert not cfg.run.cpu
    p = cfg.policy.params
    if "_bert_" in name:
        assert p.sentence_encoder == "bert-base-uncased" and not p.train_encoder
        u = cfg.update.params
        assert (u.ent_coef, u.inner_epochs, u.gamma, u.lam) == (0.1, 10, 0.99, 0.95)
        assert cfg.sampler.params.stop_forcing and cfg.sampler.params.remove_rule == "lilgym-2023"
        assert cfg.run.prompts_per_iteration * cfg.run.iterations >= 500_000  # episodes: about 4M env steps
    else:
        assert p.pretrained == "Qwen/Qwen2.5-0.5B-Instruct"


def test_sentence_encoder_accepts_local_folders_and_hub_ids_only():
    LilGymCNNConfig(sentence_encoder="assets/tiny-gpt2").check()
    LilGymCNNConfig(sentence_encoder="bert-base-uncased").check()
    LilGymCNNConfig(sentence_encoder="google/bert_uncased_L-2_H-128_A-2").check()
    for bad in ("assets/no-such-model", "not a hub id", "a/b/c"):
        with pytest.raises(ConfigError, match="neither a transformers model folder"):
            LilGymCNNConfig(sentence_encoder=bad).check()
    with pytest.raises(ConfigError, match="remove_rule 'lilgym-2022'.*lilgym-2023"):
        LilGymSamplerConfig(task="ScatterScratch", split="dev", remove_rule="lilgym-2022").check()
