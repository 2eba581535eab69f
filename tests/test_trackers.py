"""run.log_with: metrics and fixed-seed samples reach the trackers; tensorboard event files read back."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest

from polyrl.cli import default_config
from polyrl.config import apply_overrides
from polyrl.host import Host
from polyrl.loop import train
from polyrl.trackers import flatten, normalise
from polyrl.types import ConfigError

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

ROOT = Path(__file__).parent.parent
TEXT = {
    "run": {"iterations": 2, "prompts_per_iteration": 2, "samples_per_prompt": 4, "seed": 3, "save_every": 5,
            "progress": False, "report": True, "report_every": 1, "log_with": "tensorboard"},
    "prompts": {"file": "assets/tiny-gpt2/prompts.txt"},
    "policy": {"name": "causal_lm", "pretrained": "assets/tiny-gpt2", "lora_rank": 8},
    "sampler": {"name": "generate", "max_new_tokens": 8, "temperature": 1.0},
    "rewards": {"sentiment": {"weight": 1.0}},
    "update": {"name": "grpo", "train_batch_size": 4, "beta": 0.05},
    "optimizer": {"lr": 5e-3},
}


@pytest.fixture(autouse=True)
def _cwd(monkeypatch):
    monkeypatch.chdir(ROOT)


def events(run_dir: Path) -> EventAccumulator:
    logdir = run_dir / "logs" / "polyrl"
    assert list(logdir.glob("events.out.tfevents.*")), f"no event file in {logdir}"
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def text_of(acc: EventAccumulator, tag: str) -> dict[int, str]:
    return {e.step: b"".join(e.tensor_proto.string_val).decode() for e in acc.Tensors(f"{tag}/text_summary")}


def test_log_with_accepts_names_lists_and_none():
    assert normalise("tensorboard") == ["tensorboard"]
    assert normalise(["wandb", "TensorBoard", "wandb"]) == ["wandb", "tensorboard"]
    assert normalise("none") == [] and normalise([]) == [] and normalise(None) == []
    with pytest.raises(ConfigError, match=r"run.log_with: unknown tracker 'tensorbord' \(did you mean 'tensorboard'\?\); "
                                          r"accepted: \['tensorboard', 'trackio', 'wandb'\] or none"):
        normalise(["tensorbord"])
    with pytest.raises(ConfigError, match="run.log_with"):
        Host().build_config(apply_overrides(default_config(), ["run.log_with=[mlflow]"]))
    cfg = Host().build_config(apply_overrides(default_config(), ["run.log_with=tensorboard"]))
    assert cfg.run.log_with == ["tensorboard"]
    # the hyper-parameters every tracker receives are flat scalars
    flat = flatten(cfg.to_dict())
    assert flat["run.iterations"] == 40 and flat["run.log_with"] == '["tensorboard"]'
    assert all(v is None or isinstance(v, (bool, int, float, str)) for v in flat.values())


@pytest.mark.parametrize("name", ["wandb", "trackio"])
def test_a_missing_tracker_package_is_named_before_any_model_loads(tmp_path, name):
    if importlib.util.find_spec(name) is not None:
        pytest.skip(f"{name} is installed")
    data = copy.deepcopy(TEXT)
    data["run"].update(output_dir=str(tmp_path / "run"), log_with=[name])
    with pytest.raises(ConfigError, match=rf"'{name}' is selected but the {name} package is not installed; "
                                          rf"install it with `pip install {name}`"):
        Host().build_config(data)  # the config check, before any model loads


def test_tensorboard_receives_every_iteration_and_the_text_samples(tmp_path):
    data = copy.deepcopy(TEXT)
    data["run"]["output_dir"] = str(tmp_path / "run")
    train(Host().build_config(data), Host())
    run = tmp_path / "run"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    acc = events(run)
    scalars = acc.Tags()["scalars"]
    for key in ("reward_mean", "reward/sentiment", "loss", "grad_norm", "kl_ref", "time/sample"):
        assert key in scalars, (key, scalars)
        assert [e.step for e in acc.Scalars(key)] == [1, 2]
        assert [e.value for e in acc.Scalars(key)] == pytest.approx([r[key] for r in rows], rel=1e-6)
    assert "iteration" not in scalars
    # the fixed-seed samples of iterations 0, 1 and 2: a table of prompt, completion and reward
    texts = text_of(acc, "samples/texts")
    assert sorted(texts) == [0, 1, 2]
    for step, table in texts.items():
        record = json.loads((run / "report" / f"iter_{step:06d}.json").read_text())
        assert "| prompt | completion | sentiment |" in table
        first = record["texts"][0].replace("|", "\\|").replace("\n", " ")
        assert first in table and f"{record['rewards']['sentiment'][0]:.4g}"[:4] in table
        assert [e.value for e in acc.Scalars("samples/distinct-2") if e.step == step] == pytest.approx(
            [record["distinct"]["distinct-2"]])
    # the run's settings as hyper-parameters
    assert list((run / "logs" / "polyrl").glob("*/hparams.yml"))


@pytest.mark.slow
def test_tensorboard_receives_captioned_images(tmp_path):
    run = tmp_path / "img"
    cfg = Host().build_config(apply_overrides(default_config(), [
        f"run.output_dir={run}", "run.iterations=1", "run.prompts_per_iteration=4", "run.samples_per_prompt=4",
        "run.log_with=[tensorboard]", "run.progress=false", "update.train_batch_size=16"]))
    train(cfg, Host())
    acc = events(run)
    grids = acc.Images("samples/grid")
    assert [g.step for g in grids] == [0, 1]
    assert grids[0].width > 8 * 64 and grids[0].height > 64  # enlarged tiles with text under them
    captions = text_of(acc, "samples/captions")
    record = json.loads((run / "report" / "iter_000001.json").read_text())
    for prompt, score in zip(record["prompts"], record["rewards"]["clip_score"]):
        assert f"{prompt} \\| clip_score {score:.3f}" in captions[1]
    assert [e.step for e in acc.Scalars("reward/clip_score")] == [1]


@pytest.mark.slow
def test_wandb_offline_run_is_written_in_the_run_folder(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    data = copy.deepcopy(TEXT)
    data["run"].update(output_dir=str(tmp_path / "run"), log_with=["wandb"], iterations=1)
    train(Host().build_config(data), Host())
    run_id = json.loads((tmp_path / "run" / "trackers.json").read_text())["wandb_id"]
    offline = list((tmp_path / "run" / "wandb").glob(f"offline-run-*-{run_id}"))
    assert offline and list(offline[0].glob("*.wandb"))
    # the fixed-seed texts of iterations 0 and 1 as tables
    for step in (0, 1):
        (table,) = (offline[0] / "files" / "media" / "table" / "samples").glob(f"texts_{step}_*.table.json")
        record = json.loads((tmp_path / "run" / "report" / f"iter_{step:06d}.json").read_text())
        content = json.loads(table.read_text())
        assert content["columns"] == ["prompt", "completion", "sentiment"]
        assert [row[1] for row in content["data"]] == record["texts"]
