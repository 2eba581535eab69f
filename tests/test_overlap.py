"""Rewards overlap sampling chunk by chunk (``run.async_rewards`` with one sampling batch): the
same metrics as scoring the whole batch afterwards, each chunk scored while the next one samples."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from polyrl import hookimpl
from polyrl.cli import default_config
from polyrl.config import apply_overrides
from polyrl.host import Host
from polyrl.loop import train

ROOT = Path(__file__).parent.parent


@pytest.fixture(autouse=True)
def _cwd(monkeypatch):
    monkeypatch.chdir(ROOT)


class RewardTimes:
    """Records when each reward call starts (and its batch size) and when sampling ends."""

    def __init__(self) -> None:
        self.rewards: list[tuple[float, int]] = []
        self.sampled: list[float] = []

    @hookimpl(wrapper=True)
    def polyrl_reward(self, trainer, rollout):
        self.rewards.append((time.perf_counter(), rollout.batch_size))
        return (yield)

    @hookimpl(hookwrapper=True)
    def polyrl_sample(self, trainer, contexts):
        yield  # an old-style wrapper observes without counting as a sample hook of its own
        self.sampled.append(time.perf_counter())


def run(tmp_path: Path, name: str, *overrides: str, plugin=None) -> list[dict]:
    data = apply_overrides(default_config(), [f"run.output_dir={tmp_path / name}", "run.iterations=2",
                                              "run.progress=false", "run.report=false", "sampler.batch_size=8",
                                              *overrides])
    host = Host()
    if plugin is not None:
        host.register(plugin, "times")
    train(host.build_config(data), host)
    rows = [json.loads(l) for l in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


def test_chunked_async_rewards_change_nothing_and_overlap(tmp_path):
    times = RewardTimes()
    chunked = run(tmp_path, "async", "run.async_rewards=true", plugin=times)
    whole = run(tmp_path, "sync")
    # the same samples; the reward model sees batches of 8 instead of 32, which changes its float
    # sums in the last bits only
    assert [r.keys() for r in chunked] == [r.keys() for r in whole]
    for a, b in zip(chunked, whole):
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-7), k
    assert [n for _, n in times.rewards] == [8, 8, 8, 8] * 2  # each chunk of 8 scored on its own
    starts = [t for t, _ in times.rewards]
    assert all(t < end for t, end in zip(starts[0::4], times.sampled))  # scoring began before sampling ended


def test_a_plugin_sample_hook_gets_whole_batch_rewards(tmp_path):
    class OwnSample:
        @hookimpl
        def polyrl_sample(self, trainer, contexts):
            return trainer.sampler.sample(trainer.policy, contexts, trainer.generator("own"))

    times = RewardTimes()
    data = apply_overrides(default_config(), [f"run.output_dir={tmp_path / 'own'}", "run.iterations=1",
                                              "run.progress=false", "run.report=false", "sampler.batch_size=8",
                                              "run.async_rewards=true"])
    host = Host()
    host.register(OwnSample(), "own")
    host.register(times, "times")
    train(host.build_config(data), host)
    assert [n for _, n in times.rewards] == [32]
