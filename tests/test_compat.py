"""Declared compatibility: every policy x sampler x update of the built-in registry is either
refused before any model loads, with a message naming both components and what would fit, or
runs one iteration on the tiny models."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from polyrl import ComponentSpec, hookimpl
from polyrl.host import Host
from polyrl.types import CAPABILITIES, ROLLOUT_FORMATS, ConfigError

ROOT = Path(__file__).resolve().parent.parent
LILGYM = Path(__file__).parent / "fixtures" / "lilgym"
TEXT_PROMPTS = ["This movie was", "I bought this"]
IMAGE_PROMPTS = ["a red circle on the right", "a blue triangle on the left"]

# The smallest working settings of each built-in policy and sampler (tiny models of assets/).
POLICIES = {
    "diffusion": {"pretrained": "assets/tiny-sd"},
    "lcm": {"pretrained": "assets/tiny-lcm"},
    "causal_lm": {"pretrained": "assets/tiny-gpt2", "value_head": True},
    "seq2seq_lm": {"pretrained": "<t5>", "value_head": True},
    "gaussian": {"env": "Pendulum-v1", "hidden_sizes": [8], "value_head": True},
    "lilgym_cnn": {"appearance": "tower", "channels": [4, 8, 8], "hidden": 16},
    "lilgym_lm": {"max_action_tokens": 4, "value_head": True},
}
SAMPLERS = {
    "ddim": {"num_steps": 2},
    "lcm": {"num_steps": 2},
    "generate": {"max_new_tokens": 4},
    "seq2seq_generate": {"max_new_tokens": 4},
    "gym": {"max_episode_steps": 4},
    "lilgym": {"task": "TowerScratch", "split": "dev", "data_dir": str(LILGYM)},
    "lilgym_text": {"task": "TowerScratch", "split": "dev", "data_dir": str(LILGYM)},
}
REWARDS = {
    "ddim": {"jpeg_compressibility": {"weight": 1.0}},
    "lcm": {"jpeg_compressibility": {"weight": 1.0}},
    "generate": {"sentiment": {"weight": 1.0}},
    "seq2seq_generate": {"sentiment": {"weight": 1.0}},
    "gym": {"env_reward": {"weight": 1.0}},
    "lilgym": {"env_reward": {"weight": 1.0}},
    "lilgym_text": {"env_reward": {"weight": 1.0}},
}
PROMPTS = {"ddim": IMAGE_PROMPTS, "lcm": IMAGE_PROMPTS, "generate": TEXT_PROMPTS, "seq2seq_generate": TEXT_PROMPTS,
           "gym": ["Pendulum-v1"], "lilgym": ["TowerScratch"], "lilgym_text": ["TowerScratch"]}
# one micro-batch, one pass: the smallest update of each algorithm
UPDATE_SETTINGS = {"train_batch_size": 2, "inner_epochs": 1, "learning_starts": 4, "batch_size": 4,
                   "num_reference_samples": 2, "reference_batch_size": 4, "steps_per_iteration": 1}


def combinations(host: Host, updates: tuple[str, ...] | None = None) -> list[tuple[str, str, str]]:
    reg = host.registry
    return [(p, s, u) for p in sorted(reg["policy"]) for s in sorted(reg["sampler"]) for u in sorted(reg["update"])
            if p in POLICIES and s in SAMPLERS and (updates is None or u in updates)]


def run_config(host: Host, policy: str, sampler: str, update: str, out: Path, t5: str = "unused",
               demos: str = "") -> dict:
    u_cls = host.registry["update"][update].config_cls
    names = {f.name for f in dataclasses.fields(u_cls)}
    settings = {k: v for k, v in UPDATE_SETTINGS.items() if k in names}
    for kl in ("kl_coef", "beta"):  # policies without a reference train without the KL term
        if kl in names and policy in ("gaussian", "lilgym_cnn"):
            settings[kl] = 0.0
    if "kl_target" in names:
        settings["kl_target"] = None
    if update == "bc":
        settings["demos"] = demos or DEMOS[0]
    p = {k: (t5 if v == "<t5>" else v) for k, v in POLICIES[policy].items()}
    s = dict(SAMPLERS[sampler])
    prompts = {"items": PROMPTS.get(sampler, TEXT_PROMPTS)}
    if update == "dr_po" and sampler in ("generate", "seq2seq_generate"):
        s["reset_column"] = "response"
        prompts = {"file": RESETS[0]}
    return {
        "run": {"iterations": 1, "prompts_per_iteration": 2, "samples_per_prompt": 2, "output_dir": str(out),
                "cpu": True, "report": False, "progress": False, "save_every": 1},
        "prompts": prompts,
        "policy": {"name": policy, **p},
        "sampler": {"name": sampler, **s},
        "rewards": REWARDS.get(sampler, {"sentiment": {"weight": 1.0}}),
        "update": {"name": update, **settings},
    }


def outcome(host: Host, data: dict) -> str | None:
    """``None`` when the config is accepted, else the refusal message (only compatibility refusals:
    any other config error fails the test, it means the table above is wrong)."""
    try:
        host.build_config(data)
    except ConfigError as e:
        msg = str(e)
        assert msg.startswith(("sampler.name:", "update.name:")), msg
        return msg
    return None


DEMOS: list[str] = []  # a demonstrations file for bc
RESETS: list[str] = []  # a prompts file with dataset responses for dr_po


@pytest.fixture(scope="module")
def host(tmp_path_factory) -> Host:
    """The host, and two short random Pendulum episodes as demonstrations for ``bc``."""
    import numpy as np

    from polyrl.plugins.control.demonstrations import save_demos

    rng = np.random.default_rng(0)
    episodes = [{"observations": rng.normal(size=(5, 3)), "actions": rng.uniform(-2, 2, size=(5, 1)),
                 "next_observations": rng.normal(size=(5, 3)), "rewards": rng.normal(size=5),
                 "terminations": np.zeros(5, bool)} for _ in range(2)]
    folder = tmp_path_factory.mktemp("data")
    DEMOS[:] = [str(save_demos(folder / "pendulum.npz", episodes, "Pendulum-v1"))]
    rows = [{"prompt": p, "response": " it was good and I liked it"} for p in TEXT_PROMPTS]
    (folder / "reviews.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    RESETS[:] = [str(folder / "reviews.jsonl")]
    return Host()


def demos_readable() -> str | None:
    """Why the demonstrations file cannot be read (``None`` when it can): ``bc`` validates it while
    its config is read, so its combinations are only decidable with a readable file."""
    from polyrl.plugins.control.demonstrations import load_demos

    try:
        load_demos(DEMOS[0])
    except ConfigError as e:
        return str(e)
    return None


@pytest.mark.parametrize("with_bc", [False, True], ids=["updates", "bc"])
def test_every_builtin_combination_is_decided_before_loading(host, tmp_path, with_bc):
    if with_bc and demos_readable() is not None:
        pytest.skip(f"the demonstrations reader fails here: {demos_readable()}")
    updates = tuple(u for u in host.registry["update"] if (u == "bc") == with_bc)
    seen = {"accepted": [], "refused": []}
    for policy, sampler, update in combinations(host, updates):
        msg = outcome(host, run_config(host, policy, sampler, update, tmp_path / "r"))
        if msg is None:
            seen["accepted"].append((policy, sampler, update))
            continue
        seen["refused"].append((policy, sampler, update))
        if msg.startswith("sampler.name:"):  # the pair is refused: both named, and the samplers that fit
            assert repr(policy) in msg and repr(sampler) in msg and "accepted: " in msg, msg
        else:
            assert repr(update) in msg and repr(policy) in msg and repr(sampler) in msg, msg
            assert "updates that fit" in msg, msg
    total = len(POLICIES) * len(SAMPLERS) * len(updates)
    assert len(seen["accepted"]) + len(seen["refused"]) == total
    accepted = set(seen["accepted"])
    if with_bc:
        assert accepted == {("gaussian", "gym", "bc")}
        return
    # each policy has exactly its own sampler
    assert {(p, s) for p, s, _ in accepted} == {
        ("diffusion", "ddim"), ("lcm", "lcm"), ("causal_lm", "generate"), ("seq2seq_lm", "seq2seq_generate"),
        ("gaussian", "gym"), ("lilgym_cnn", "lilgym"), ("lilgym_lm", "lilgym_text")}
    # the pairs that used to pass the name checks and fail after loading are refused now
    for bad in [("causal_lm", "generate", "sac"), ("diffusion", "ddim", "ppo"), ("diffusion", "ddim", "nlpo"),
                ("lcm", "lcm", "ppo"), ("gaussian", "gym", "nlpo"), ("lilgym_cnn", "lilgym", "a_star_po"),
                ("gaussian", "gym", "a_star_po"), ("lilgym_cnn", "lilgym", "sac")]:
        assert bad not in accepted, bad
    for good in [("diffusion", "ddim", "ddpo"), ("lcm", "lcm", "rebel"), ("causal_lm", "generate", "ppo"),
                 ("causal_lm", "generate", "nlpo"), ("gaussian", "gym", "sac"), ("gaussian", "gym", "ppo"),
                 ("lilgym_cnn", "lilgym", "ppo"), ("lilgym_lm", "lilgym_text", "grpo")]:
        assert good in accepted, good


def test_refusals_name_both_components_and_what_fits(host, tmp_path):
    data = run_config(host, "diffusion", "ddim", "ppo", tmp_path)
    msg = outcome(host, data)
    assert "update 'ppo' needs a policy (or sampler) with " in msg and "value_head (" in msg
    assert "policy 'diffusion' with sampler 'ddim' has none" in msg
    assert "updates that fit policy 'diffusion' with sampler 'ddim': 'a_star_po', 'ddpo', 'grpo'" in msg
    msg = outcome(host, run_config(host, "causal_lm", "generate", "sac", tmp_path))
    assert "update 'sac' trains on transitions but policy 'causal_lm' with sampler 'generate' gives tokens" in msg
    # a capability that depends on the policy's settings: a fully trained UNet has no reference
    data = run_config(host, "diffusion", "ddim", "grpo", tmp_path)
    data["update"]["beta"] = 0.1
    assert outcome(host, data) is None
    data["policy"]["train_full_unet"] = True
    msg = outcome(host, data)
    assert "needs a policy (or sampler) with reference" in msg and "set update.beta: 0" in msg
    data["update"]["beta"] = 0.0
    assert outcome(host, data) is None
    # and one that depends on the update's: ppo's KL term needs a reference, the gaussian policy has none
    data = run_config(host, "gaussian", "gym", "ppo", tmp_path)
    data["update"]["kl_coef"] = 0.1
    assert "set update.kl_coef: 0" in outcome(host, data)
    # a pair refused before any update is looked at
    msg = outcome(host, run_config(host, "lilgym_lm", "lilgym", "grpo", tmp_path))
    assert msg.startswith("sampler.name: 'lilgym' samples lilgym_actions policies and policy 'lilgym_lm' is not one")
    assert "accepted: 'lilgym_text'" in msg


def test_specs_without_declarations_still_load_and_are_not_second_guessed(host, tmp_path):
    """A third-party spec written before the declared fields (modality/produces/reads only)."""

    @dataclasses.dataclass
    class _Settings:
        pass

    class OldPlugin:
        @hookimpl
        def polyrl_updates(self):
            return [ComponentSpec("old_update", lambda cfg: None, _Settings, description="no declarations")]

    h = Host()
    h.register(OldPlugin(), "old_plugin")
    data = run_config(h, "diffusion", "ddim", "ddpo", tmp_path)
    data["update"] = {"name": "old_update"}
    assert h.build_config(data).update.name == "old_update"
    spec = h.registry["update"]["old_update"]
    assert spec.formats == frozenset() and spec.requirements_for(_Settings()) == frozenset()


def test_declared_names_are_documented(host):
    for kind in ("policy", "sampler"):
        for spec in host.registry[kind].values():
            assert spec.formats and spec.formats <= set(ROLLOUT_FORMATS), (kind, spec.name)
    for spec in host.registry["update"].values():
        assert set(spec.accepts) <= set(ROLLOUT_FORMATS), spec.name
    for kind in ("policy", "sampler"):
        for spec in host.registry[kind].values():
            try:
                params = spec.config_cls()
            except TypeError:
                continue
            assert spec.capabilities_for(params) <= set(CAPABILITIES), spec.name
            assert spec.requirements_for(params) <= set(CAPABILITIES), spec.name


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory) -> Path:
    from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration

    out = tmp_path_factory.mktemp("tiny-t5")
    tok = AutoTokenizer.from_pretrained(ROOT / "assets" / "tiny-gpt2")
    cfg = T5Config(vocab_size=len(tok), d_model=16, d_ff=32, d_kv=8, num_layers=1, num_heads=2,
                   pad_token_id=0, eos_token_id=0, decoder_start_token_id=0)
    torch.manual_seed(0)
    T5ForConditionalGeneration(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.mark.slow
def test_every_accepted_combination_runs_one_iteration(host, tmp_path, t5_dir):
    from polyrl.loop import train

    updates = tuple(u for u in host.registry["update"] if u != "bc" or demos_readable() is None)
    accepted = [c for c in combinations(host, updates) if outcome(host, run_config(host, *c, tmp_path / "x")) is None]
    assert accepted
    failures = []
    for policy, sampler, update in accepted:
        out = tmp_path / f"{policy}-{sampler}-{update}"
        cfg = host.build_config(run_config(host, policy, sampler, update, out, t5=str(t5_dir)))
        try:
            train(cfg, host)
        except Exception as e:  # noqa: BLE001 - collect every failing combination, then report them all
            failures.append(f"{policy} + {sampler} + {update}: {type(e).__name__}: {str(e)[:300]}")
            continue
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert [r["iteration"] for r in rows] == [1], (policy, sampler, update)
    assert not failures, "\n".join(failures)
