"""The lilGym language-model agent: the supervised warm-up's data and effect, and multi-turn rollouts."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from polyrl.host import Host
from polyrl.plugins.lilgym import actions as A
from polyrl.plugins.lilgym.lm import (LilGymLMConfig, LilGymLMPolicy, LilGymTextSampler, LilGymTextSamplerConfig,
                                      action_target, build_prompt)
from polyrl.types import ConfigError, Context

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).parent / "fixtures" / "lilgym"
WARMED = "assets/tiny-gpt2-lilgym"


@pytest.fixture(scope="module")
def warmup():
    spec = importlib.util.spec_from_file_location("lilgym_lm_warmup", ROOT / "scripts" / "lilgym_lm_warmup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_warmup_pairs_are_valid_actions_of_their_worlds_in_the_agents_prompt_format(warmup):
    pairs = warmup.make_pairs("TowerScratch", "train", episodes=12, seed=3, data_dir=str(FIXTURES))
    assert len(pairs) > 12  # several turns per episode
    from polyrl.plugins.lilgym.data import load_examples

    examples = {ex.id: ex for ex in load_examples("tower", "scratch", "train", str(FIXTURES))}
    kinds = set()
    for p in pairs:
        assert A.is_valid("tower", p["world"], p["action"])  # valid in the world the prompt shows
        assert A.parse_action("tower", p["target"]) == p["action"] and p["target"] == action_target("tower", p["action"])
        assert p["target"].startswith(" ") and p["target"].endswith("\n")
        assert p["prompt"] == build_prompt(examples[p["example_id"]], p["world"], "tower")  # what the agent reads
        kinds.add(A.decode("tower", p["action"]).kind)
    assert kinds == {"stop", "add", "remove"}
    # episodes start from the empty world and follow the actions taken
    assert pairs[0]["world"] == [[], [], []]
    again = warmup.make_pairs("TowerScratch", "train", episodes=12, seed=3, data_dir=str(FIXTURES))
    assert [(p["prompt"], p["action"]) for p in again] == [(p["prompt"], p["action"]) for p in pairs]  # seeded


@pytest.mark.slow  # about 10 s of training on an idle CPU thread, several times that on a busy one
def test_a_tiny_warmup_raises_the_parse_rate(warmup):
    torch.manual_seed(0)
    # the base review model; short prompts (cut from the left to the world and "action:") keep the steps cheap
    policy = LilGymLMPolicy(LilGymLMConfig(max_action_tokens=12, max_prompt_tokens=24))
    train = warmup.make_pairs("TowerScratch", "train", episodes=40, seed=0, data_dir=str(FIXTURES))
    held = warmup.make_pairs("TowerScratch", "dev", episodes=8, seed=1, data_dir=str(FIXTURES))
    before = warmup.parse_rate(policy, held, seed=0, appearance="tower")
    losses = warmup.warm_up(policy, train, steps=200, batch_size=8, lr=1e-2, seed=0)
    after = warmup.parse_rate(policy, held, seed=0, appearance="tower")
    assert before["parse_rate"] == 0.0  # it writes review prose
    assert sum(losses[-20:]) < 0.3 * sum(losses[:20])
    assert after["parse_rate"] >= 0.05 and after["valid_rate"] > 0.0, (before, after)  # 0.11 and 0.09 on x86-64


class Scripted:
    """Writes the given lines, one per turn, through the real policy's tokenizer (stands in for the LM's text)."""

    appearance = "tower"

    def __init__(self, policy, lines):
        self.p, self.cfg, self.lm, self.lines, self.turn = policy, policy.cfg, policy.lm, lines, 0
        self.tokenizer = policy.tokenizer

    def encode_prompts(self, prompts):
        return self.p.encode_prompts(prompts)

    def generate(self, ids, mask, generator, deterministic=False):
        tok = self.p.tokenizer(self.lines[self.turn], add_special_tokens=False)["input_ids"]
        self.turn += 1
        n, a = ids.shape[0], self.cfg.max_action_tokens
        t = torch.full((n, a), self.lm.pad_token_id)
        t[:, : len(tok)] = torch.tensor(tok)
        m = torch.zeros(n, a, dtype=torch.bool)
        m[:, : len(tok)] = True
        return t, torch.full((n, a), -0.5) * m, m

    def decode(self, tokens, mask):
        return self.p.decode(tokens, mask)


@pytest.fixture(scope="module")
def warmed_policy():
    torch.manual_seed(0)
    return LilGymLMPolicy(LilGymLMConfig(pretrained=WARMED))


def _sampler(**kw):
    return LilGymTextSampler(LilGymTextSamplerConfig(task="TowerScratch", split="dev", data_dir=str(FIXTURES), **kw))


def test_multi_turn_rollout_masks_rewards_and_parse_counts(warmed_policy):
    policy = warmed_policy
    a, k = policy.cfg.max_action_tokens, 11
    lines = [" add left yellow\n", " remove left\n", " stop\n"]
    sampler = _sampler()
    ex = sampler.examples[0]  # "There is a yellow block.": false on the empty world
    r = sampler.sample(Scripted(policy, lines), [Context(ex.id, group=0)], torch.Generator().manual_seed(0))
    n = [len(policy.tokenizer(x, add_special_tokens=False)["input_ids"]) for x in lines]
    mask = r.mask.view(k, a)
    for t in range(k):  # each turn's own tokens, newline included, then padding; no turn after the STOP
        assert mask[t].tolist() == ([True] * n[t] + [False] * (a - n[t]) if t < 3 else [False] * a)
    rewards = r.outputs["env_rewards"].view(k, a)
    stop = -1.0  # STOP on the empty world again, where the statement is false
    expected = torch.zeros(k, a)
    expected[0, n[0] - 1], expected[1, n[1] - 1], expected[2, n[2] - 1] = -0.1, -0.1, stop
    assert torch.equal(rewards, expected)  # each turn's reward on its last token, nothing elsewhere
    assert (r.log_probs.view(k, a)[~mask] == 0).all() and (r.log_probs.view(k, a)[mask] == -0.5).all()
    assert r.outputs["episode_lengths"].tolist() == [3]
    # the final world and its sentence, for the run report
    img = r.outputs["images"]
    assert img.shape[:2] == (1, 3) and 0 <= img.min() and img.max() <= 1 and img.std() > 0
    assert r.outputs["captions"] == [f"{ex.sentence} [{str(ex.target).lower()}]"]
    assert r.outputs["lilgym_parse_rate"].tolist() == [1.0] and r.outputs["lilgym_valid_turns"].tolist() == [3.0]
    # GRPO's reward of the episode is its return
    from polyrl.plugins.updates.common import sequence_rewards
    from polyrl.rewards.env import EnvReward, EnvRewardConfig

    assert sequence_rewards(EnvReward(EnvRewardConfig())(r)).item() == pytest.approx(-0.2 + stop)

    # an unparsable turn ends the episode with -1 on its last token and counts against the parse rate
    r = _sampler().sample(Scripted(policy, [" add left yellow\n", " hello there\n"]), [Context(ex.id, group=0)],
                          torch.Generator().manual_seed(0))
    assert r.outputs["lilgym_parse_rate"].tolist() == [0.5] and r.outputs["lilgym_unparsable"].tolist() == [1.0]
    assert r.outputs["env_rewards"].sum().item() == pytest.approx(-1.1) and r.outputs["lilgym_success"].tolist() == [0.0]


def test_stop_forcing_records_the_forced_stop_as_text_with_its_log_probs(warmed_policy):
    policy = warmed_policy
    a, k = policy.cfg.max_action_tokens, 11
    sampler = _sampler(stop_forcing=True)
    ex = sampler.examples[0]  # "There is a yellow block.": false on the empty world, true after ADD LEFT YELLOW
    first = A.encode("tower", A.Action("add", box=0, color=0))
    # the first turn builds the goal; the second writes prose, which stop forcing turns into STOP (+1)
    lines = [action_target("tower", first), " hello there\n"]
    r = sampler.sample(Scripted(policy, lines), [Context(ex.id, group=0)], torch.Generator().manual_seed(0))
    stop_ids = policy.tokenizer(" stop\n", add_special_tokens=False)["input_ids"]
    assert r.data["action_ids"][0, 1, : len(stop_ids)].tolist() == stop_ids  # recorded as "stop"
    mask = r.mask.view(k, a)
    assert mask[1].sum().item() == len(stop_ids) and not mask[2:].any()
    assert r.outputs["env_rewards"].view(k, a)[1, len(stop_ids) - 1].item() == 1.0
    assert r.outputs["lilgym_success"].tolist() == [1.0] and r.outputs["lilgym_success_no_sf"].tolist() == [0.0]
    with torch.no_grad():
        recomputed = policy(r)
    turn = slice(a, 2 * a)  # the recorded STOP's log-probs are the policy's own
    assert torch.allclose(recomputed[0, turn], r.log_probs[0, turn], atol=1e-4) and r.log_probs[0, turn].sum() < 0


def test_stop_forcing_fraction_draws_which_episodes_are_forced(warmed_policy):
    policy = warmed_policy
    first = A.encode("tower", A.Action("add", box=0, color=0))
    lines = [action_target("tower", first), " hello there\n"]  # the goal, then prose: forced STOP or unparsable

    def run(fraction):
        sampler = _sampler(stop_forcing=True, stop_forcing_fraction=fraction)
        ex = sampler.examples[0]
        r = sampler.sample(Scripted(policy, lines), [Context(ex.id, group=i) for i in range(16)],
                           torch.Generator().manual_seed(0))
        return r.outputs["lilgym_success"], r.outputs["lilgym_unparsable"]

    won, unparsable = run(0.5)
    assert 0 < won.sum() < 16 and torch.equal(won + unparsable, torch.ones(16))  # each episode one or the other
    won_all, _ = run(1.0)
    assert won_all.sum() == 16
    won_none, unparsable_none = run(0.0)
    assert won_none.sum() == 0 and unparsable_none.sum() == 16
    with pytest.raises(ConfigError, match="stop_forcing_fraction"):
        LilGymTextSamplerConfig(stop_forcing_fraction=1.5).check()


def test_no_stop_forcing_while_evaluating(warmed_policy):
    """Stop forcing is training-only: under ``evaluating`` (the report, the held-out evaluation,
    ``polyrl eval``, ``polyrl sample``) the goal-then-prose episode fails as the agent played it."""
    from polyrl.scoring import evaluating

    policy = warmed_policy
    first = A.encode("tower", A.Action("add", box=0, color=0))
    lines = [action_target("tower", first), " hello there\n"]
    sampler = _sampler(stop_forcing=True, stop_forcing_fraction=0.5)
    ex = sampler.examples[0]
    contexts = [Context(ex.id, group=i) for i in range(8)]
    with evaluating(policy.lm, sampler):
        assert sampler.training is False
        r = sampler.sample(Scripted(policy, lines), contexts, torch.Generator().manual_seed(0))
    assert "training" not in vars(sampler) and sampler.training is True  # the class default again
    assert r.outputs["lilgym_success"].sum() == 0 and r.outputs["lilgym_unparsable"].sum() == 8
    trained = _sampler(stop_forcing=True).sample(Scripted(policy, lines), contexts, torch.Generator().manual_seed(0))
    assert trained.outputs["lilgym_success"].sum() == 8


def test_warmed_up_agent_rollouts_recompute_and_the_loop_logs_the_parse_rate(tmp_path, warmed_policy):
    r = _sampler().sample(warmed_policy, [Context("TowerScratch", group=g // 2) for g in range(4)],
                          torch.Generator().manual_seed(0))
    assert r.outputs["lilgym_parse_rate"].mean() > 0.5  # the warmed-up model writes actions
    with torch.no_grad():
        assert torch.allclose(warmed_policy(r), r.log_probs, atol=1e-4)
    from polyrl.loop import train

    host = Host()
    cfg = host.build_config({
        "run": {"iterations": 2, "prompts_per_iteration": 2, "samples_per_prompt": 2, "output_dir": str(tmp_path / "lm"),
                "cpu": True, "report": False, "progress": False},
        "prompts": {"items": ["TowerScratch"]},
        "policy": {"name": "lilgym_lm", "pretrained": WARMED},
        "sampler": {"name": "lilgym_text", "task": "TowerScratch", "split": "dev", "data_dir": str(FIXTURES),
                    "stop_forcing": True},
        "rewards": {"env_reward": {"weight": 1.0}, "lilgym_parse_rate": {"weight": 0.0}},
        "update": {"name": "grpo", "train_batch_size": 2, "scale_rewards": "batch"},
    })
    train(cfg, host)
    rows = [json.loads(line) for line in (tmp_path / "lm" / "metrics.jsonl").read_text().splitlines()]
    assert [row["iteration"] for row in rows] == [1, 2]
    assert all(0.0 <= row["reward/lilgym_parse_rate"] <= 1.0 for row in rows)
    assert max(row["reward/lilgym_parse_rate"] for row in rows) > 0.0
