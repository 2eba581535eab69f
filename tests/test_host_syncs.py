"""The updates keep their statistics on the device and read them once per update.

(a) Fixed-seed runs through the loop on the tiny models log the same metrics (the same floats) and
train the same weights (bit for bit) as the updates did when they read each statistic with
``.item()`` where they computed it: the numbers below were recorded with that form. A change meant
to change what is computed (a model, a sampler) re-records them: ``python tests/test_host_syncs.py``
prints the current ones.
(b) The host reads (``Tensor.item``, ``float(tensor)``, ``tolist``) of one update do not grow with
its micro-batches or denoising steps: the statistics are read once, and the gradient-norm check of
each optimizer step reads its norm.
(c) :class:`polyrl.stats.UpdateStats` gives the same floats as averaging the ``.item()`` values.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import pytest
import torch

from polyrl.host import Host
from polyrl.loop import train

ROOT = Path(__file__).resolve().parent.parent

TEXT = {
    "run": {"iterations": 2, "prompts_per_iteration": 2, "samples_per_prompt": 4, "seed": 5, "progress": False,
            "report": False, "save_every": 100},
    "prompts": {"file": "assets/tiny-gpt2/prompts.txt"},
    "policy": {"name": "causal_lm", "pretrained": "assets/tiny-gpt2"},
    "sampler": {"name": "generate", "max_new_tokens": 6},
    "rewards": {"sentiment": {"weight": 1.0}},
    "optimizer": {"lr": 1e-3},
}
LCM = {
    "run": {"iterations": 1, "prompts_per_iteration": 2, "samples_per_prompt": 4, "seed": 5, "progress": False,
            "report": False, "save_every": 100},
    "prompts": {"items": ["a red circle on the right", "a blue triangle on the left"]},
    "policy": {"name": "lcm", "pretrained": "assets/tiny-lcm", "lora_rank": 4},
    "sampler": {"name": "lcm", "num_steps": 4, "guidance_scale": 4.0},
    "rewards": {"jpeg_incompressibility": {}},
    "optimizer": {"lr": 1e-2},
}
TWO_REWARDS = {**TEXT, "rewards": {"sentiment": {"weight": 1.0}, "length_penalty": {"weight": 0.5}}}
#: name -> (base config, update settings, policy settings)
CASES = {
    "ddpo": (LCM, {"name": "ddpo", "train_batch_size": 2, "gradient_accumulation_batches": 2, "clip_range": 1e-4,
                   "tracker_min_count": 1000, "kl_coef": 0.1, "steps_per_call": 3}, {}),
    "grpo": (TEXT, {"name": "grpo", "train_batch_size": 2, "gradient_accumulation_batches": 2, "beta": 0.04,
                    "inner_epochs": 2}, {}),
    "grpo_dapo": (TWO_REWARDS, {"name": "grpo", "train_batch_size": 2, "gradient_accumulation_batches": 2, "beta": 0.04,
                         "loss_type": "dapo", "engine_correction": "token_truncate"}, {}),
    "ppo": (TEXT, {"name": "ppo", "train_batch_size": 2, "gradient_accumulation_batches": 2, "inner_epochs": 2,
                   "ent_coef": 0.01}, {"value_head": True}),
    "rloo": (TEXT, {"name": "rloo", "train_batch_size": 2, "gradient_accumulation_batches": 2, "inner_epochs": 2}, {}),
    "rebel": (TEXT, {"name": "rebel", "train_batch_size": 2, "kl_coef": 0.01}, {}),
    "reinforce": (TEXT, {"name": "reinforce", "train_batch_size": 2, "baseline": "ema"}, {}),
    "a_star_po": (TEXT, {"name": "a_star_po", "train_batch_size": 2, "gradient_accumulation_batches": 2,
                         "num_reference_samples": 2}, {}),
    "nlpo": (TEXT, {"name": "nlpo", "train_batch_size": 2, "gradient_accumulation_batches": 2,
                    "mask_update_interval": 1, "mask_min_tokens": 10}, {"value_head": True}),
    "dr_po": (TEXT, {"name": "dr_po", "train_batch_size": 2, "gradient_accumulation_batches": 2}, {"value_head": True}),
}
#: dr_po's dataset: openings and the responses its samples are reset to
REVIEWS = [
    {"prompt": "The film was", "response": " a quiet and lovely story with a warm ending"},
    {"prompt": "I thought the acting", "response": " was wooden and the plot made no sense at all"},
    {"prompt": "This movie", "response": " is the best thing I have seen this year"},
    {"prompt": "The soundtrack", "response": " felt loud and tired from the first scene"},
]


@pytest.fixture(autouse=True)
def _cwd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)


def config(tmp_path: Path, name: str) -> dict:
    base, update, policy = CASES[name]
    data = copy.deepcopy(base)
    data["update"] = dict(update)
    data["policy"].update(policy)
    data["run"]["output_dir"] = str(tmp_path / name)
    if name == "dr_po":
        tmp_path.mkdir(parents=True, exist_ok=True)
        (tmp_path / "reviews.jsonl").write_text("".join(json.dumps(r) + "\n" for r in REVIEWS))
        data["prompts"] = {"file": str(tmp_path / "reviews.jsonl")}
        data["sampler"] = {**data["sampler"], "reset_column": "response", "max_new_tokens": 12}
    return data


def weights_hash(trainer) -> str:
    """sha256 of the trained weights' bytes, in key order."""
    h = hashlib.sha256()
    for key, value in sorted(trainer.policy.trainable_state_dict().items()):
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def run_case(tmp_path: Path, name: str) -> tuple[list[dict], str]:
    """The logged metrics of every iteration (without the timings) and the trained weights' hash."""
    host = Host()
    trainer = train(host.build_config(config(tmp_path, name)), host)
    rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows], weights_hash(trainer)


# ---------------------------------------------------------------------------------- (a) same numbers
#: The platform the reference was recorded on: other CPU kernels (another instruction set, another
#: torch) round differently and sample other tokens, so the comparison is bit for bit only there.
RECORDED_ON = {"torch": "2.15.0", "cpu": "AVX512"}
#: name -> (the metrics of every iteration without the timings, sha256 of the trained weights), as
#: logged by the updates that read each statistic with ``.item()`` where they computed it
REFERENCE = {
    "ddpo": ([
        {"iteration": 1, "reward_mean": 1.680625081062317, "reward_std": 0.08859309554100037,
         "reward/jpeg_incompressibility": 1.680625081062317, "lr": 0.01, "loss": 0.011879361467435956,
         "approx_kl": 0.000633079043155238, "clipfrac": 0.5, "grad_norm": 0.106312220916152,
         "kl_ref": 0.0006495676934719086, "advantage_abs_mean": 0.8913546204566956, "tracker/prompts": 2.0},
    ], "7be6ce126f257f844ce18b234ebd779ff534ba0a934b136ae2136a718338c6ab"),
    "grpo": ([
        {"iteration": 1, "reward_mean": -0.11470001935958862, "reward_std": 0.42841291427612305,
         "reward/sentiment": -0.11470001935958862, "lr": 0.001, "loss": 0.03356367349624634,
         "kl_ref": 2.116958652914036, "approx_kl": 0.5886637643562245, "clipfrac": 0.3229166632518172,
         "clipfrac_low": 0.1458333320915699, "clipfrac_high": 0.15625000093132257, "grad_norm": 3.242611199617386,
         "completion_length": 6.0, "advantage_abs_mean": 0.8592856526374817},
        {"iteration": 2, "reward_mean": 0.10018749535083771, "reward_std": 0.37439337372779846,
         "reward/sentiment": 0.10018749535083771, "lr": 0.001, "loss": -0.019715111702680588,
         "kl_ref": 0.19045532739255577, "approx_kl": 0.09673470535204465, "clipfrac": 0.18750000558793545,
         "clipfrac_low": 0.07291666883975267, "clipfrac_high": 0.10416666977107525, "grad_norm": 1.500591203570366,
         "completion_length": 6.0, "advantage_abs_mean": 0.7694553136825562},
    ], "9b418cbc14318259659d6354cf941ad838c0342a23be6c5a3a8cb073d3371c6e"),
    "grpo_dapo": ([
        {"iteration": 1, "reward_mean": -0.14469999074935913, "reward_std": 0.42841291427612305,
         "reward/sentiment": -0.11470001935958862, "reward/length_penalty": -0.05999999865889549, "lr": 0.001,
         "loss": 0.004208587110042572, "kl_ref": 0.010197061114013195, "approx_kl": 0.010015868116170168,
         "clipfrac": 0.10416666977107525, "clipfrac_low": 0.0, "clipfrac_high": 0.06250000186264515,
         "grad_norm": 3.0091103315353394, "completion_length": 6.0, "advantage_abs_mean": 0.8592856526374817,
         "engine/logp_diff_mean": 4.139728844165802e-07, "engine/logp_diff_max": 2.1457672119140625e-06,
         "engine/is_weight_mean": 1.0, "engine/capped_fraction": 0.0},
        {"iteration": 2, "reward_mean": 0.0701875239610672, "reward_std": 0.37439337372779846,
         "reward/sentiment": 0.10018749535083771, "reward/length_penalty": -0.05999999865889549, "lr": 0.001,
         "loss": -0.006029084324836731, "kl_ref": 0.01898022583918646, "approx_kl": 0.006240305723622441,
         "clipfrac": 0.06250000186264515, "clipfrac_low": 0.02083333395421505, "clipfrac_high": 0.0416666679084301,
         "grad_norm": 2.1036030054092407, "completion_length": 6.0, "advantage_abs_mean": 0.7694552540779114,
         "engine/logp_diff_mean": 2.309631526031808e-07, "engine/logp_diff_max": 1.3709068298339844e-06,
         "engine/is_weight_mean": 1.0, "engine/capped_fraction": 0.0},
    ], "c8193d9540bc6d40ecd141396ee42e6966525a02d7480273dc8d34c72bc682a0"),
    "ppo": ([
        {"iteration": 1, "reward_mean": -0.11470001935958862, "reward_std": 0.42841291427612305,
         "reward/sentiment": -0.11470001935958862, "lr": 0.001, "kl_coef": 0.1, "kl_ref": -5.665545662244161e-08,
         "kl_ref_sequence": -3.3993273973464966e-07, "value_mean": 0.033232416957616806,
         "return_mean": -0.07203633338212967, "loss": 0.41656947135925293, "entropy": 1.6628925651311874,
         "pg_loss": -0.04084581648930907, "vf_loss": 0.9480884447693825, "approx_kl": 0.2319571515545795,
         "clipfrac": 0.3124999962747097, "vf_clipfrac": 0.3958333320915699, "grad_norm": 3.4868674874305725,
         "completion_length": 6.0},
        {"iteration": 2, "reward_mean": 0.09028749912977219, "reward_std": 0.36622434854507446,
         "reward/sentiment": 0.09028749912977219, "lr": 0.001, "kl_coef": 0.098, "kl_ref": 0.030186240871747334,
         "kl_ref_sequence": 0.181117445230484, "value_mean": -0.3442717492580414,
         "return_mean": 0.036788515746593475, "loss": 0.1748858019709587, "entropy": 0.7025787755846977,
         "pg_loss": -0.015773415565490723, "vf_loss": 0.3953700065612793, "approx_kl": 0.3856931696646271,
         "clipfrac": 0.18750000093132257, "vf_clipfrac": 0.34375000186264515, "grad_norm": 3.008176952600479,
         "completion_length": 6.0},
    ], "f4762090e5932c92235c57262bd0e4ddd0218a609d6426d8f2c80622d2fe6b0e"),
    "rloo": ([
        {"iteration": 1, "reward_mean": -0.11470001935958862, "reward_std": 0.42841291427612305,
         "reward/sentiment": -0.11470001935958862, "lr": 0.001, "kl_ref": -3.3993273973464966e-07,
         "advantage_abs_mean": 0.5026333928108215, "loss": -0.05314354598522186, "approx_kl": 13.971255960874796,
         "clipfrac": 0.6875, "clipfrac_low": 0.25, "clipfrac_high": 0.375, "grad_norm": 4.214582681655884},
        {"iteration": 2, "reward_mean": 0.045137498527765274, "reward_std": 0.35203200578689575,
         "reward/sentiment": 0.045137498527765274, "lr": 0.001, "kl_ref": 0.5889813303947449,
         "advantage_abs_mean": 0.36387839913368225, "loss": 0.013011664152145386, "approx_kl": 1.5940681416541735,
         "clipfrac": 0.625, "clipfrac_low": 0.3125, "clipfrac_high": 0.25, "grad_norm": 6.296301245689392},
    ], "41452e4de1719b87b4304d089fd20ffa5c55493e5f0f26d74e3cd74a91db2aff"),
    "rebel": ([
        {"iteration": 1, "reward_mean": -0.11470001935958862, "reward_std": 0.42841291427612305,
         "reward/sentiment": -0.11470001935958862, "lr": 0.001, "kl_ref": -3.3993273973464966e-07,
         "loss": 0.6158884174765467, "approx_kl": 0.15477088513017634, "logratio_diff": 0.10891985893249512,
         "reward_diff_abs": 0.4685000187903636, "grad_norm": 65.70540273824008},
        {"iteration": 2, "reward_mean": -0.028937499970197678, "reward_std": 0.367063045501709,
         "reward/sentiment": -0.028937499970197678, "lr": 0.001, "kl_ref": 0.1859697848558426,
         "loss": 7.003509385511279, "approx_kl": 5.614838893991649, "logratio_diff": 1.4412527680397034,
         "reward_diff_abs": 0.36050262302160263, "grad_norm": 143.53024768829346},
    ], "81b311c2e165c262996d8c586e39b8e495efe4d530b5c6fbee3a22f75d454ef6"),
    "reinforce": ([
        {"iteration": 1, "reward_mean": -0.11470001935958862, "reward_std": 0.42841291427612305,
         "reward/sentiment": -0.11470001935958862, "lr": 0.001, "loss": 0.09997212886810303,
         "grad_norm": 6.010700702667236, "advantage_abs_mean": 0.37697502970695496},
        {"iteration": 2, "reward_mean": 0.10018749535083771, "reward_std": 0.37439337372779846,
         "reward/sentiment": 0.10018749535083771, "lr": 0.001, "loss": 1.249598577618599,
         "grad_norm": 4.838906288146973, "advantage_abs_mean": 0.37134313583374023},
    ], "7a97f0a30921ffd8a821dd113d60e20ccd370232f9223111ada1e70a2c704965"),
    "a_star_po": ([
        {"iteration": 1, "reward_mean": -0.11470001935958862, "reward_std": 0.42841291427612305,
         "reward/sentiment": -0.11470001935958862, "lr": 0.001, "loss": 0.4749076757580042,
         "log_ratio_ref": 0.14520926773548126, "advantage_mean": -0.5616218745708466,
         "grad_norm": 0.026905116625130177, "v_star_mean": 0.4469218850135803},
        {"iteration": 2, "reward_mean": 0.10472500324249268, "reward_std": 0.2942638695240021,
         "reward/sentiment": 0.10472500324249268, "lr": 0.001, "loss": 0.3073616474866867,
         "log_ratio_ref": 0.20942571014165878, "advantage_mean": 0.08599048480391502,
         "grad_norm": 0.016138009261339903, "v_star_mean": 0.01873452216386795},
    ], "f65b16e3a8eb64f39b8371d9a831b3e87a75b5e1ddd421ce7cb273a0c29fb870"),
    "nlpo": ([
        {"iteration": 1, "reward_mean": 0.0056749917566776276, "reward_std": 0.465104877948761,
         "reward/sentiment": 0.0056749917566776276, "lr": 0.001, "kl_coef": 0.1, "kl_ref": 0.0,
         "kl_ref_sequence": 0.0, "value_mean": -0.019941648468375206, "return_mean": 0.018564360216259956,
         "loss": 0.3551615150645375, "entropy": 1.565410055220127, "pg_loss": -0.06746998755261302,
         "vf_loss": 0.8452630173414946, "approx_kl": 0.4038798119873077, "clipfrac": 0.4270833246409893,
         "vf_clipfrac": 0.5, "grad_norm": 2.4907097667455673, "completion_length": 6.0, "mask_refreshed": 1.0},
        {"iteration": 2, "reward_mean": -0.03193749859929085, "reward_std": 0.3971498906612396,
         "reward/sentiment": -0.03193749859929085, "lr": 0.001, "kl_coef": 0.098, "kl_ref": -0.015073316792647043,
         "kl_ref_sequence": -0.09043989330530167, "value_mean": -0.005751209799200296,
         "return_mean": -0.022325268015265465, "loss": 0.025248317746445537, "entropy": 0.7197367660701275,
         "pg_loss": -0.06138827628456056, "vf_loss": 0.17327318992465734, "approx_kl": 1.2829155572690292,
         "clipfrac": 0.41666665906086564, "vf_clipfrac": 0.3541666646488011, "grad_norm": 2.114530488848686,
         "completion_length": 6.0, "mask_refreshed": 1.0},
    ], "eb1195f1246108810ae3b7744679a3183cf456b766fe0b155c4fdef3817bac41"),
    "dr_po": ([
        {"iteration": 1, "reward_mean": -0.048362500965595245, "reward_std": 0.27684158086776733,
         "reward/sentiment": -0.048362500965595245, "lr": 0.001, "kl_coef": 0.1, "kl_ref": -1.0227615183049982e-07,
         "kl_ref_sequence": -4.2188912630081177e-07, "value_mean": 0.1740279644727707,
         "return_mean": 0.048166096210479736, "loss": 0.4724945593625307, "entropy": 1.734624370932579,
         "pg_loss": 0.07664009928703308, "vf_loss": 0.791708929464221, "approx_kl": 11.595142938196672,
         "clipfrac": 0.6896938197314739, "vf_clipfrac": 0.4970801789313555, "grad_norm": 10.163255736231804,
         "completion_length": 4.125, "reset_fraction": 1.0, "reset_length": 7.0},
        {"iteration": 2, "reward_mean": 0.2817874848842621, "reward_std": 0.39246174693107605,
         "reward/sentiment": 0.2817874848842621, "lr": 0.001, "kl_coef": 0.098, "kl_ref": 1.9992670694986978,
         "kl_ref_sequence": 7.497250556945801, "value_mean": 0.33674487471580505,
         "return_mean": -0.22816208004951477, "loss": 0.1827351446263492, "entropy": 1.2897927509620786,
         "pg_loss": -0.0041748033836483955, "vf_loss": 0.3738199044018984, "approx_kl": 1.685412352930199,
         "clipfrac": 0.5214443607255816, "vf_clipfrac": 0.4205672829411924, "grad_norm": 6.441190430894494,
         "completion_length": 3.75, "reset_fraction": 1.0, "reset_length": 5.375},
    ], "b96051c02d4571bd7963b03e4b30e175d3368840a379d70fbef2488fb7990d4f"),
}


def recorded_platform() -> bool:
    return (torch.__version__.split("+")[0] == RECORDED_ON["torch"]
            and torch.backends.cpu.get_cpu_capability() == RECORDED_ON["cpu"])


@pytest.mark.parametrize("name", list(CASES))
def test_metrics_and_weights_are_the_recorded_ones(tmp_path: Path, name: str) -> None:
    if not recorded_platform():
        pytest.skip(f"the reference numbers are bit-exact on torch {RECORDED_ON['torch']} with "
                    f"{RECORDED_ON['cpu']} CPU kernels; this is torch {torch.__version__}, "
                    f"{torch.backends.cpu.get_cpu_capability()}")
    rows, digest = run_case(tmp_path, name)
    expected, expected_digest = REFERENCE[name]
    assert rows == expected  # the same floats
    assert [list(r) for r in rows] == [list(r) for r in expected]  # in the same order
    assert digest == expected_digest  # the same weights, bit for bit


# ---------------------------------------------------------------------------------- (b) host reads
READS = ("item", "__float__", "__int__", "__bool__", "tolist")


class HostReads:
    """Counts the host reads of tensors while ``active``: ``item``, ``float()``, ``int()``,
    ``bool()``, and ``tolist`` of floating-point tensors (index tensors built on the host, which
    ``Rollout.select`` lists, are not device values)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.active = False
        self.counts = dict.fromkeys(READS, 0)
        for name in READS:
            real = getattr(torch.Tensor, name)

            def counting(t, *args, _real=real, _name=name, **kwargs):
                if self.active and (_name != "tolist" or t.is_floating_point()):
                    self.counts[_name] += 1
                return _real(t, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, counting)


def update_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, overrides: dict) -> dict[str, int]:
    """The host reads during the update of one iteration of case ``name`` with ``overrides``
    (``section.field: value``)."""
    data = config(tmp_path / "-".join(f"{k}={v}" for k, v in overrides.items()), name)
    data["run"]["iterations"] = 1
    for key, value in overrides.items():
        section, field = key.split(".")
        data[section][field] = value
    host = Host()
    cfg = host.build_config(data)
    cls = type(host.build_update(cfg))
    reads = HostReads(monkeypatch)
    real_step = cls.step

    def step(self, *args, **kwargs):
        reads.active = True
        try:
            return real_step(self, *args, **kwargs)
        finally:
            reads.active = False

    monkeypatch.setattr(cls, "step", step)
    # AdamW keeps its step counters on the host: its reads of them are no device syncs
    real_adamw = torch.optim.AdamW.step

    def adamw_step(self, *args, **kwargs):
        active, reads.active = reads.active, False
        try:
            return real_adamw(self, *args, **kwargs)
        finally:
            reads.active = active

    monkeypatch.setattr(torch.optim.AdamW, "step", adamw_step)
    train(cfg, host)
    monkeypatch.undo()
    monkeypatch.chdir(ROOT)
    return reads.counts


#: name -> settings with 2 and with 4 micro-batches per optimizer step (and, for ddpo, 2 and 4
#: denoising steps, one model call each): the same number of optimizer steps either way
FEW_AND_MANY = {
    "grpo": ({"update.train_batch_size": 4, "update.gradient_accumulation_batches": 2},
             {"update.train_batch_size": 2, "update.gradient_accumulation_batches": 4}),
    "ppo": ({"update.train_batch_size": 4, "update.gradient_accumulation_batches": 2},
            {"update.train_batch_size": 2, "update.gradient_accumulation_batches": 4}),
    "rloo": ({"update.train_batch_size": 4, "update.gradient_accumulation_batches": 2},
             {"update.train_batch_size": 2, "update.gradient_accumulation_batches": 4}),
    "ddpo": ({"update.train_batch_size": 4, "update.gradient_accumulation_batches": 2, "sampler.num_steps": 2,
              "update.steps_per_call": 1},
             {"update.train_batch_size": 2, "update.gradient_accumulation_batches": 4, "sampler.num_steps": 4,
              "update.steps_per_call": 1}),
}
#: optimizer steps of one update in FEW_AND_MANY (inner epochs x one window each)
OPTIMIZER_STEPS = {"grpo": 2, "ppo": 2, "rloo": 2, "ddpo": 1}


@pytest.mark.parametrize("name", [n if n != "ddpo" else pytest.param(n, marks=pytest.mark.slow) for n in FEW_AND_MANY])
def test_host_reads_do_not_grow_with_micro_batches_or_steps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            name: str) -> None:
    few, many = (update_reads(tmp_path, monkeypatch, name, overrides) for overrides in FEW_AND_MANY[name])
    for counts in (few, many):
        assert counts["item"] == 0 and counts["__int__"] == 0, counts
        # the non-finite gradient check of each optimizer step reads the norm: the only float()
        assert counts["__float__"] == OPTIMIZER_STEPS[name], counts
    # the update's statistics in one read (ddpo: also the per-prompt tracker's host-side rewards)
    assert few["tolist"] == many["tolist"] == (3 if name == "ddpo" else 1)
    if name == "ddpo":  # the text models' forward passes test their padding masks (transformers), these do not
        assert few["__bool__"] == many["__bool__"] == 0


def test_host_reads_grow_only_with_optimizer_steps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Micro-batches of 2 without accumulation: 4 optimizer steps per epoch, each reading its
    gradient norm once; the statistics are still read once."""
    counts = update_reads(tmp_path, monkeypatch, "grpo",
                          {"update.train_batch_size": 2, "update.gradient_accumulation_batches": 1})
    assert counts["item"] == 0 and counts["__float__"] == 2 * 4 and counts["tolist"] == 1, counts


# ---------------------------------------------------------------------------------- (c) UpdateStats
def test_update_stats_give_the_means_of_the_item_values() -> None:
    from polyrl.stats import UpdateStats, as_floats, read_scalars

    g = torch.Generator().manual_seed(0)
    values = [torch.rand((), generator=g) * 3 for _ in range(7)]
    stats = UpdateStats("loss", "unused", "clipfrac")
    for i, v in enumerate(values):
        stats.add("loss", v, factor=3 if i % 2 else 1)
        stats.update({"clipfrac": v.to(torch.bfloat16), "kl": v.double() / 7, "grad_norm": float(v) * 2})
    stats.add("count", torch.tensor(2**40 + 1))  # an integer beyond float32's exact range
    means = stats.means()
    items = [v.item() for v in values]
    assert list(means) == ["loss", "clipfrac", "kl", "grad_norm", "count"]
    assert means["loss"] == sum(x * 3 if i % 2 else x for i, x in enumerate(items)) / 7
    assert means["clipfrac"] == sum(v.to(torch.bfloat16).item() for v in values) / 7
    assert means["kl"] == sum((v.double() / 7).item() for v in values) / 7
    assert means["grad_norm"] == sum(x * 2 for x in items) / 7
    assert means["count"] == 2**40 + 1
    assert "loss" in stats and "unused" not in stats
    assert read_scalars([]) == [] and UpdateStats("a").means() == {}
    assert as_floats({"a": torch.tensor(0.25), "b": 3, "c": torch.tensor(True)}) == {"a": 0.25, "b": 3.0, "c": 1.0}
    with pytest.raises(ValueError, match="'loss'.*shape \\(2,\\)"):
        stats.add("loss", torch.zeros(2))



def test_losses_give_their_statistics_as_tensors_on_request() -> None:
    """``tensor_stats=True``: the same statistics as 0-dim tensors, whose ``.item()`` is the float
    the default form returns."""
    from polyrl.plugins.updates.a_star_po import a_star_po_loss
    from polyrl.plugins.updates.ddpo import ddpo_loss
    from polyrl.plugins.updates.grpo import engine_is_weights, grpo_loss
    from polyrl.plugins.updates.ppo import ppo_loss
    from polyrl.plugins.updates.rebel import rebel_loss
    from polyrl.plugins.updates.rloo import rloo_loss

    g = torch.Generator().manual_seed(3)
    x = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    logp, old, ref, values = x(4, 5).requires_grad_(), x(4, 5), x(4, 5), x(4, 5).requires_grad_()
    mask = torch.rand(4, 5, generator=g) > 0.3
    adv = x(4)
    calls = {
        "ddpo": lambda **kw: ddpo_loss(logp[:, 0], old[:, 0], adv, 0.2, mask[:, 0], **kw),
        "grpo": lambda **kw: grpo_loss(logp, old, adv, mask, 0.2, 0.1, ref, **kw),
        "engine": lambda **kw: engine_is_weights(old, ref, mask, "token_truncate", 2.0, **kw),
        "ppo": lambda **kw: ppo_loss(logp, old, x(4, 5), values, values + 0.1, x(4, 5), mask, 0.2, 0.2, 0.5,
                                     x(4, 5).abs(), 0.01, **kw),
        "rloo": lambda **kw: rloo_loss(logp, old, mask, adv, 0.2, 0.28, **kw),
        "rebel": lambda **kw: rebel_loss(logp, old, mask, adv, 1.0, **kw),
        "a_star_po": lambda **kw: a_star_po_loss(logp, ref, mask, adv, x(4), 1e-3, **kw),
    }
    for name, call in calls.items():
        state = g.get_state()
        floats = call()[1]
        g.set_state(state)
        tensors = call(tensor_stats=True)[1]
        assert list(floats) == list(tensors) and floats, name
        for key, value in tensors.items():
            assert isinstance(value, torch.Tensor) and value.dim() == 0 and not value.requires_grad, (name, key)
            assert isinstance(floats[key], float) and value.item() == floats[key], (name, key)


if __name__ == "__main__":  # the current numbers, in REFERENCE's form
    import sys
    import tempfile

    torch.set_num_threads(1)
    __import__("os").chdir(ROOT)
    for case in sys.argv[1:] or CASES:
        with tempfile.TemporaryDirectory() as tmp:
            print(repr(case), run_case(Path(tmp), case), flush=True)
