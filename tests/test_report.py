"""The run report: curves of every logged quantity, captioned samples, text diversity, early stops."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from polyrl import hookimpl, report
from polyrl.host import Host
from polyrl.loop import train
from polyrl.report import captioned_grid, distinct_n, diversity, metric_panels, reward_curves, smooth, write_report

ROOT = Path(__file__).parent.parent


def rows_of(n: int, **extra) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(1, n + 1):
        r = {"iteration": i, "reward_mean": 0.5 + 0.01 * i, "reward_std": 0.1, "reward/clip_score": 0.5 + 0.01 * i,
             "time/sample": 1.0, "time/update": 2.0, "lr": 1e-3, "loss": float(rng.normal()), "clipfrac": 0.2,
             "clipfrac_low": 0.1, "clipfrac_high": 0.1 + 0.001 * i, "grad_norm": 1.0 + i, "completion_length": 10 + i}
        r.update({k: v(i) if callable(v) else v for k, v in extra.items()})
        rows.append(r)
    return rows


def test_distinct_n_counts_distinct_word_ngrams_over_all_of_them():
    texts = ["a b a b", "a b c"]
    assert distinct_n(texts, 1) == pytest.approx(3 / 7)  # a b a b a b c: {a, b, c}
    assert distinct_n(texts, 2) == pytest.approx(3 / 5)  # ab ba ab | ab bc
    assert distinct_n(texts, 3) == pytest.approx(3 / 3)
    assert distinct_n(["one"], 2) == 0.0
    assert diversity(["x y", "x y"]) == {"distinct-1": 0.5, "distinct-2": 0.5, "distinct-3": 0.0}


def test_smoothing_starts_at_the_first_value_and_keeps_constants():
    assert smooth([3.0, 3.0, 3.0], 5) == pytest.approx([3.0, 3.0, 3.0])
    out = smooth([0.0, 10.0], 2)  # weight 1/2: (0.5*0 + 0.5*10) / (1 - 0.25)... bias-corrected mean
    assert out[0] == 0.0 and out[1] == pytest.approx(10 * 0.5 / 0.75)
    assert smooth([1.0, 2.0], 1) == [1.0, 2.0]


def test_one_curve_per_quantity():
    # one reward of weight 1 is the total: one curve, named after the reward
    assert reward_curves(rows_of(5)) == [("reward_mean", "clip_score")]
    two = rows_of(5, **{"reward/aesthetic": 5.0, "reward_mean": lambda i: 0.5 + 0.01 * i + 5.0})
    assert reward_curves(two) == [("reward_mean", "total (weighted)"), ("reward/aesthetic", "aesthetic"),
                                  ("reward/clip_score", "clip_score")]
    weighted = rows_of(5, reward_mean=lambda i: 2 * (0.5 + 0.01 * i))
    assert [k for k, _ in reward_curves(weighted)] == ["reward_mean", "reward/clip_score"]
    panels, constant = metric_panels(rows_of(5, **{"eval/reward_mean": 0.3}))
    assert panels == [["loss"], ["grad_norm"], ["completion_length"], ["clipfrac_high"]]
    assert constant == {"lr": 1e-3, "clipfrac": 0.2, "clipfrac_low": 0.1}
    varying = rows_of(5, clipfrac=lambda i: 0.1 * i, kl_ref=lambda i: 0.01 * i)
    panels, _ = metric_panels(varying)
    assert panels[:3] == [["loss"], ["kl_ref"], ["clipfrac", "clipfrac_high"]]


def test_report_of_a_run_folder(tmp_path):
    run = tmp_path / "run"
    (run / "report").mkdir(parents=True)
    (run / "config.yaml").write_text("run: {iterations: 30}\n")
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows_of(24)) + '{"iteration": 25, "rew')
    texts = {0: ["good day to you", "a bad film"], 24: ["great great great", "great great"]}
    for it, tx in texts.items():
        rec = {"iteration": it, "prompts": ["Hello", "The film"], "rewards": {"sentiment": [0.1 * it, -0.5]},
               "texts": tx, "distinct": diversity(tx)}
        (run / "report" / f"iter_{it:06d}.json").write_text(json.dumps(rec))
    page = write_report(run).read_text()
    out = run / "report"
    for f in ("reward.png", "metrics.png", "time.png", "diversity.png"):
        assert f"<img src='{f}'>" in page and Image.open(out / f).width > 600
    assert "24 iterations" in page and "stopped early: after iteration 24 of 30" in page  # the torn line is skipped
    assert "lr = 0.001" in page  # constants are listed, not plotted
    assert "exponential moving average over about 3 iterations" in page
    assert "<td>Hello</td><td>good day to you</td><td>great great great</td>" in page  # first and last, same prompt
    # distinct-1/2/3 of the last texts: 1 word of 5, 1 bigram of 3, 1 trigram of 1
    assert "<tr><td>24</td><td class='num'>0.200</td><td class='num'>0.333</td><td class='num'>1.000</td></tr>" in page
    assert "iteration 0" in page


def test_captioned_grid_puts_text_under_enlarged_images():
    images = torch.zeros(3, 3, 64, 64)
    images[:, 1] = 1.0  # green squares
    grid = captioned_grid(images, ["a green square on the left"] * 3, [["clip_score 0.812"]] * 3)
    arr = np.asarray(grid)
    assert grid.width == 3 * (192 + 10) + 10  # 64-pixel images enlarged three times
    tile = arr[10:10 + 192, 10:10 + 192]
    assert (tile[..., 1] == 255).all() and (tile[..., 0] == 0).all()  # nearest-neighbour: the pixels stay sharp
    text = arr[10 + 192:, 10:10 + 192]
    dark = (text.sum(-1) < 200).sum()
    blue = ((text[..., 2] > 100) & (text[..., 0] < 60)).sum()
    assert dark > 100 and blue > 50  # a caption (dark) and a reward line (blue) under the image


class StopInIteration:
    def __init__(self, iteration: int) -> None:
        self.iteration = iteration

    @hookimpl(wrapper=True)
    def polyrl_update(self, trainer, rollout, rewards):
        result = yield
        if trainer.iteration == self.iteration:
            raise RuntimeError("the run failed here")
        return result


RUN = {
    "run": {"iterations": 4, "prompts_per_iteration": 2, "samples_per_prompt": 4, "seed": 5, "save_every": 10,
            "progress": False, "report": True},
    "prompts": {"file": "assets/tiny-gpt2/prompts.txt"},
    "policy": {"name": "causal_lm", "pretrained": "assets/tiny-gpt2", "lora_rank": 8},
    "sampler": {"name": "generate", "max_new_tokens": 8},
    "rewards": {"sentiment": {"weight": 1.0}},
    "update": {"name": "grpo", "train_batch_size": 4, "beta": 0.0},
    "optimizer": {"lr": 5e-3},
}


def test_a_run_that_stops_early_gets_its_report_and_policy(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    data = copy.deepcopy(RUN)
    data["run"]["output_dir"] = str(tmp_path / "run")
    host = Host()
    host.pm.register(StopInIteration(3))
    with pytest.raises(RuntimeError, match="the run failed here"):
        train(host.build_config(data), host)
    run = tmp_path / "run"
    page = (run / "report" / "index.html").read_text()
    assert "2 iterations" in page and "stopped early: after iteration 2 of 4" in page
    assert (run / "policy" / "adapter_config.json").is_file()  # the weights of the checkpoint of iteration 2
    assert (run / "checkpoints" / "iter_000002").is_dir()


def test_a_failing_report_never_hides_the_error_that_stopped_the_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    data = copy.deepcopy(RUN)
    data["run"]["output_dir"] = str(tmp_path / "run")
    host = Host()
    host.pm.register(StopInIteration(2))

    def broken(run_dir):
        raise OSError("the report folder went away")

    monkeypatch.setattr(report, "write_report", broken)
    with pytest.raises(RuntimeError, match="the run failed here"):
        train(host.build_config(data), host)
    err = capsys.readouterr().err
    assert "writing the report failed: OSError: the report folder went away" in err
    assert (tmp_path / "run" / "policy" / "adapter_config.json").is_file()


def test_lilgym_report_captions_each_episode_with_its_sentence(tmp_path, monkeypatch):
    """Env runs get the report too: the reward curves, and the fixed-seed episodes' final worlds
    captioned with their sentences (the sampler's ``captions``) rather than the task name."""
    from polyrl.config import apply_overrides, load_yaml

    monkeypatch.chdir(ROOT)
    if not (ROOT.parent / "shared" / "data" / "lilgym").is_dir():
        pytest.skip("lilGym data not found beside the checkout")
    data = apply_overrides(load_yaml(ROOT / "configs" / "lilgym_tower_scratch.yaml"),
                           ["run.iterations=2", "run.prompts_per_iteration=8", f"run.output_dir={tmp_path / 'run'}",
                            "run.progress=false"])
    from polyrl.plugins.lilgym.sampler import LilGymSampler

    modes = []  # sampler.training at each call: the report's samples are drawn without stop forcing
    original = LilGymSampler.sample
    monkeypatch.setattr(LilGymSampler, "sample",
                        lambda self, *a, **k: (modes.append((self.training, self.stop_forcing_now())), original(self, *a, **k))[1])
    host = Host()
    train(host.build_config(data), host)
    assert modes == [(False, False), (True, True), (True, True), (False, False)]  # report, 2 iterations, report
    out = tmp_path / "run" / "report"
    records = [json.loads(p.read_text()) for p in sorted(out.glob("iter_*.json"))]
    assert [r["iteration"] for r in records] == [0, 2]
    for r in records:
        assert len(r["captions"]) == len(r["prompts"]) and set(r["prompts"]) == {"TowerScratch"}
        assert all(c.endswith(("[true]", "[false]")) and len(c) > 20 for c in r["captions"])
        assert r["captions"] == records[0]["captions"]  # the same episodes at every recorded iteration
    assert (out / "samples_over_iterations.png").is_file() and (out / "reward.png").is_file()
    page = (out / "index.html").read_text()
    assert "2 iterations" in page and "reward/lilgym_success" in json.dumps(
        [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()])
