"""polyrl sample: the trained (or base) policy of a run folder, on prompts given on the command line
or in a file; the same command gives the same samples; images as PNG files and a grid; errors
before any model loads; nothing already written is overwritten."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from PIL import Image

from polyrl.cli import main
from polyrl.config import apply_overrides, load_yaml
from polyrl.host import Host
from polyrl.loop import train
from polyrl.sample import sample_run
from polyrl.types import ConfigError

ROOT = Path(__file__).parent.parent
TEXT = {
    "run": {"iterations": 2, "prompts_per_iteration": 2, "samples_per_prompt": 4, "seed": 1, "save_every": 5,
            "progress": False, "report": False},
    "prompts": {"file": "assets/tiny-gpt2/prompts.txt"},
    "policy": {"name": "causal_lm", "pretrained": "assets/tiny-gpt2", "lora_rank": 8},
    "sampler": {"name": "generate", "max_new_tokens": 8, "temperature": 1.0},
    "rewards": {"sentiment": {"weight": 1.0}},
    "update": {"name": "grpo", "train_batch_size": 4, "beta": 0.0},
    "optimizer": {"lr": 2e-2},
}


@pytest.fixture(autouse=True)
def _cwd(monkeypatch):
    monkeypatch.chdir(ROOT)


@pytest.fixture(scope="module")
def text_run(tmp_path_factory) -> Path:
    import os

    here = os.getcwd()
    os.chdir(ROOT)
    try:
        data = copy.deepcopy(TEXT)
        data["run"]["output_dir"] = str(tmp_path_factory.mktemp("sample") / "text")
        train(Host().build_config(data), Host())
        return Path(data["run"]["output_dir"])
    finally:
        os.chdir(here)


def rows(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "samples.jsonl").read_text().splitlines()]


def test_text_samples_are_reproducible_and_the_base_policy_differs(text_run: Path, tmp_path: Path, capsys) -> None:
    prompts = ["The hotel room was", "My neighbour's dog"]
    assert main(["sample", str(text_run), *prompts, "-n", "3", "--seed", "7"]) == 0
    default = text_run / "samples" / "iter_000002-seed7"
    assert str(default) in capsys.readouterr().out
    first = rows(default)
    assert [r["prompt"] for r in first] == [prompts[0]] * 3 + [prompts[1]] * 3
    assert [r["sample"] for r in first] == list(range(6)) and all(r["seed"] == 7 for r in first)
    assert all(r["text"] for r in first) and len({r["text"] for r in first}) > 1
    # the same command, elsewhere: the same samples
    again = sample_run(text_run, prompts, samples_per_prompt=3, seed=7, out=tmp_path / "again")
    assert [r["text"] for r in rows(again)] == [r["text"] for r in first]
    # the base model, same noise: other texts; another seed: other texts
    base = sample_run(text_run, prompts, samples_per_prompt=3, seed=7, base=True, out=tmp_path / "base")
    assert [r["text"] for r in rows(base)] != [r["text"] for r in first]
    other = sample_run(text_run, prompts, samples_per_prompt=3, seed=8, out=tmp_path / "other")
    assert [r["text"] for r in rows(other)] != [r["text"] for r in first]
    # a folder that holds samples is not overwritten
    before = (default / "samples.jsonl").read_bytes()
    assert main(["sample", str(text_run), *prompts, "-n", "3", "--seed", "7"]) == 2
    assert "already holds samples" in capsys.readouterr().err
    assert (default / "samples.jsonl").read_bytes() == before


def test_prompts_from_a_file_or_the_run(text_run: Path, tmp_path: Path) -> None:
    file = tmp_path / "prompts.txt"
    file.write_text("The museum guide said\nThis new phone is\n")
    got = rows(sample_run(text_run, prompts_file=str(file), samples_per_prompt=1, out=tmp_path / "file"))
    assert [r["prompt"] for r in got] == ["The museum guide said", "This new phone is"]
    own = [p for p in (ROOT / "assets" / "tiny-gpt2" / "prompts.txt").read_text().splitlines() if p.strip()]
    got = rows(sample_run(text_run, samples_per_prompt=1, out=tmp_path / "own"))
    assert sorted(r["prompt"] for r in got) == sorted(own)


def test_bad_requests_fail_before_any_model_loads(text_run: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a polyrl run directory"):
        sample_run(tmp_path, ["x"])
    with pytest.raises(ConfigError, match="no checkpoint for iteration 99"):
        sample_run(text_run, ["x"], iteration=99)
    with pytest.raises(ConfigError, match="not both"):
        sample_run(text_run, ["x"], prompts_file="p.txt")
    with pytest.raises(ConfigError, match="must be >= 1"):
        sample_run(text_run, ["x"], samples_per_prompt=0)
    with pytest.raises(ConfigError, match="empty prompt"):
        sample_run(text_run, ["x", " "])


def test_image_samples_are_png_files_and_a_grid(tmp_path: Path) -> None:
    data = apply_overrides(load_yaml(ROOT / "configs" / "rlcm_tiny_clip_score.yaml"),
                           ["run.iterations=1", "run.prompts_per_iteration=2", "run.samples_per_prompt=2",
                            "sampler.batch_size=4", "update.train_batch_size=4", "run.progress=false",
                            "run.report=false", f"run.output_dir={tmp_path / 'run'}"])
    train(Host().build_config(data), Host())
    out = sample_run(tmp_path / "run", ["a red circle on the right", "a blue triangle on the left"],
                     samples_per_prompt=2, seed=3, batch=3)
    got = rows(out)
    assert [r["image"] for r in got] == ["0000.png", "0001.png", "0002.png", "0003.png"]
    sizes = {Image.open(out / r["image"]).size for r in got}
    assert len(sizes) == 1 and min(next(iter(sizes))) >= 8
    pixels = [Image.open(out / r["image"]).tobytes() for r in got]
    assert len(set(pixels)) == 4  # different noise per sample
    grid = Image.open(out / "grid.png")
    assert grid.width > 2 * next(iter(sizes))[0]
    # the same request: the same images
    again = sample_run(tmp_path / "run", ["a red circle on the right", "a blue triangle on the left"],
                       samples_per_prompt=2, seed=3, batch=3, out=tmp_path / "again")
    assert [Image.open(again / r["image"]).tobytes() for r in rows(again)] == pixels
