"""The loop end to end on the tiny text model: run directory, exact resume, crash checkpoints."""

from __future__ import annotations

import copy
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from polyrl import hookimpl
from polyrl.checkpoint import latest_checkpoint
from polyrl.host import Host
from polyrl.loop import train
from polyrl.types import ConfigError

BASE = {
    "run": {"iterations": 4, "prompts_per_iteration": 2, "samples_per_prompt": 4, "seed": 7,
            "save_every": 2, "progress": False, "report": False},
    "prompts": {"file": "assets/tiny-gpt2/prompts.txt"},
    "policy": {"name": "causal_lm", "pretrained": "assets/tiny-gpt2", "lora_rank": 8},
    "sampler": {"name": "generate", "max_new_tokens": 8, "temperature": 1.0},
    "rewards": {"sentiment": {"weight": 1.0}},
    "update": {"name": "grpo", "train_batch_size": 4, "inner_epochs": 2, "beta": 0.05},
    "optimizer": {"lr": 5e-3},
}
ROOT = Path(__file__).parent.parent


@pytest.fixture(autouse=True)
def _cwd(monkeypatch):
    monkeypatch.chdir(ROOT)


def config(tmp_path, name, **run):
    data = copy.deepcopy(BASE)
    data["run"].update(output_dir=str(tmp_path / name), **run)
    return data


def metrics(run_dir):
    rows = [json.loads(l) for l in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


class CrashInUpdate:
    """Raises after the update of ``iteration`` has already changed the weights."""

    def __init__(self, iteration: int) -> None:
        self.iteration = iteration

    @hookimpl(wrapper=True)
    def polyrl_update(self, trainer, rollout, rewards):
        result = yield
        if trainer.iteration == self.iteration:
            raise RuntimeError("simulated failure after the optimizer step")
        return result


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("full")
    host = Host()
    train(host.build_config(config(tmp, "full")), host)
    return tmp / "full"


def test_run_directory_contents(uninterrupted):
    run = uninterrupted
    assert (run / "config.yaml").is_file() and (run / "plugins.json").is_file()
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2, 3, 4]
    for key in ("reward_mean", "reward/sentiment", "time/sample", "time/reward", "time/update", "loss", "kl_ref"):
        assert key in rows[0], key
    ckpt = latest_checkpoint(run)
    assert ckpt.name == "iter_000004"
    assert {p.name for p in ckpt.iterdir()} == {"trainable.safetensors", "optimizer.pt", "update.pt", "rewards.pt", "rng.pt",
                                              "config.yaml", "trainer.json"}
    assert (run / "policy" / "adapter_config.json").is_file()  # peft format
    plugins = json.loads((run / "plugins.json").read_text())
    assert plugins["text"]["distribution"] == "polyrl"


def test_resume_reproduces_the_uninterrupted_run(tmp_path, uninterrupted):
    host = Host()
    train(host.build_config(config(tmp_path, "split", iterations=2)), host)
    assert [r["iteration"] for r in metrics(tmp_path / "split")] == [1, 2]
    data = copy.deepcopy(config(tmp_path, "split"))  # same run, 4 iterations
    host = Host()
    train(host.build_config(data), host, resume=True)
    assert metrics(tmp_path / "split") == metrics(uninterrupted)


def test_crash_mid_update_leaves_a_resumable_checkpoint(tmp_path, uninterrupted):
    host = Host()
    host.register(CrashInUpdate(iteration=3), "crash")
    data = config(tmp_path, "crash", save_every=100)
    with pytest.raises(RuntimeError, match="simulated failure"):
        train(host.build_config(data), host)
    assert latest_checkpoint(tmp_path / "crash").name == "iter_000002"
    host = Host()
    train(host.build_config(data), host, resume=True)
    assert metrics(tmp_path / "crash") == metrics(uninterrupted)


def test_existing_run_is_never_overwritten(uninterrupted):
    host = Host()
    data = copy.deepcopy(BASE)
    data["run"]["output_dir"] = str(uninterrupted)
    before = (uninterrupted / "metrics.jsonl").read_text()
    with pytest.raises(ConfigError, match="already holds a run"):
        train(host.build_config(data), host)
    assert (uninterrupted / "metrics.jsonl").read_text() == before


@pytest.mark.slow
def test_ctrl_c_stops_after_the_iteration_and_saves(tmp_path):
    run = tmp_path / "sigint"
    cmd = [sys.executable, "-m", "polyrl.cli", "train", "run.iterations=50", "run.report=false",
           f"run.output_dir={run}", "run.save_every=100"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not ((run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").read_text()):
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-2000:]
    done = len((run / "metrics.jsonl").read_text().splitlines())
    assert 1 <= done < 50
    assert latest_checkpoint(run).name == f"iter_{done:06d}"
    assert f"polyrl train --resume {run}" in err


class EventRecorder:
    def __init__(self) -> None:
        self.events: list[tuple] = []

    @hookimpl
    def polyrl_configure(self, config):
        self.events.append(("configure", config.run.iterations))

    @hookimpl
    def polyrl_run_start(self, trainer):
        self.events.append(("run_start", trainer.completed))

    @hookimpl
    def polyrl_iteration_end(self, trainer, iteration, metrics, rollout):
        self.events.append(("iteration_end", iteration, rollout.batch_size, round(metrics["reward_mean"], 6)))

    @hookimpl
    def polyrl_run_end(self, trainer, error):
        self.events.append(("run_end", type(error).__name__ if error else None))


def test_event_hooks_fire_in_order_with_their_arguments(tmp_path):
    host = Host()
    rec = EventRecorder()
    host.register(rec, "events")
    data = config(tmp_path, "events", iterations=2)
    train(host.build_config(data), host)
    rows = metrics(tmp_path / "events")
    assert rec.events == [
        ("configure", 2),
        ("run_start", 0),
        ("iteration_end", 1, 8, round(rows[0]["reward_mean"], 6)),
        ("iteration_end", 2, 8, round(rows[1]["reward_mean"], 6)),
        ("run_end", None),
    ]
    host = Host()
    rec = EventRecorder()
    host.register(rec, "events")
    host.register(CrashInUpdate(iteration=1), "crash")
    with pytest.raises(RuntimeError):
        train(host.build_config(config(tmp_path, "events-crash", iterations=2)), host)
    assert rec.events[-1] == ("run_end", "RuntimeError")


def test_rewards_are_composed_by_weight_and_logged_each(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "tests" / "local_plugins"))
    data = config(tmp_path, "composed", iterations=2)
    data["plugins"] = ["polyrl_length_plugin"]
    data["rewards"] = {"sentiment": {"weight": 2.0}, "completion_length": {"weight": -0.05}}
    host = Host()
    train(host.build_config(data), host)
    for row in metrics(tmp_path / "composed"):
        expected = 2.0 * row["reward/sentiment"] - 0.05 * row["reward/completion_length"]
        assert row["reward_mean"] == pytest.approx(expected, rel=1e-5, abs=1e-6)
        assert row["reward/completion_length"] > 0


def test_lr_schedule_warms_up_and_decays(tmp_path):
    data = config(tmp_path, "lr", iterations=4)
    data["optimizer"].update(lr_schedule="linear", warmup_iterations=1, lr=0.01)
    host = Host()
    train(host.build_config(data), host)
    lrs = [r["lr"] for r in metrics(tmp_path / "lr")]
    assert lrs == pytest.approx([0.005, 0.01, 0.01 * 2 / 3, 0.01 * 1 / 3])


def test_eval_scores_base_and_trained_policy_on_the_same_noise(uninterrupted):
    from polyrl.evaluate import evaluate

    first = evaluate(uninterrupted, samples=8, seed=1)
    assert first["iteration"] == 4
    assert set(first["base"]) == {"reward_mean", "reward/sentiment", "reward/sentiment_std"}
    assert first["trained"]["reward_mean"] != first["base"]["reward_mean"]
    again = evaluate(uninterrupted, samples=8, seed=1, baseline=False)
    assert again["trained"] == first["trained"]  # fixed seeds: the same samples
    lines = (uninterrupted / "eval" / "trained" / "samples.jsonl").read_text().splitlines()
    assert len(lines) == 8 and "text" in json.loads(lines[0])
    with pytest.raises(ConfigError, match="no checkpoint for iteration 3"):
        evaluate(uninterrupted, iteration=3)
