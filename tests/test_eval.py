"""polyrl eval: held-out prompts, KL to the base policy, distinct-n, side-by-side base/trained views."""

from __future__ import annotations

import copy
import html
import json
from pathlib import Path

import pytest

from polyrl.cli import main
from polyrl.evaluate import evaluate, kl_estimate
from polyrl.host import Host
from polyrl.loop import train
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
HELD_OUT = ["The hotel room was", "My neighbour's dog", "This new phone is", "The museum guide said"]


@pytest.fixture(autouse=True)
def _cwd(monkeypatch):
    monkeypatch.chdir(ROOT)


def trained_run(tmp_path: Path, name: str, moved: bool) -> Path:
    data = copy.deepcopy(TEXT)
    data["run"]["output_dir"] = str(tmp_path / name)
    if not moved:  # every reward 0: zero advantages, zero gradients, and no weight decay: the weights stay
        data["rewards"]["sentiment"]["weight"] = 0.0
        data["optimizer"]["weight_decay"] = 0.0
    train(Host().build_config(data), Host())
    return tmp_path / name


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    import os

    here = os.getcwd()
    os.chdir(ROOT)
    try:
        return {"trained": trained_run(tmp, "trained", True), "unchanged": trained_run(tmp, "unchanged", False)}
    finally:
        os.chdir(here)


def test_kl_estimate_is_the_mean_log_ratio_with_its_standard_error():
    import torch

    out = kl_estimate([torch.tensor([1.0, 2.0]), torch.tensor([3.0])], [torch.tensor([0.5, 0.5]), torch.tensor([0.0])])
    # log-ratios 0.5, 1.5, 3.0: mean 5/3, sample std 1.258, stderr 1.258 / sqrt(3)
    assert out["kl_to_base"] == pytest.approx(5 / 3)
    assert out["kl_to_base_stderr"] == pytest.approx(1.2583057 / 3 ** 0.5, rel=1e-6)


def test_held_out_prompts_kl_and_distinct_n(tmp_path, runs):
    prompts = tmp_path / "held_out.txt"
    prompts.write_text("\n".join(HELD_OUT) + "\n")
    result = evaluate(runs["trained"], samples=8, batch=4, prompts=prompts)
    assert result["prompts"] == str(prompts) and result["iteration"] == 2
    rows = [json.loads(l) for l in (runs["trained"] / "eval" / "trained" / "samples.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == HELD_OUT * 2  # the held-out prompts, in order, cycled
    for stage in ("base", "trained"):
        for n in (1, 2, 3):
            assert 0 < result["diversity"][stage][f"distinct-{n}"] <= 1
    # the trained policy moved away from the base one: a positive KL, well above its standard error
    kl, se = result["trained"]["kl_to_base"], result["trained"]["kl_to_base_stderr"]
    assert kl > 0 and kl > 2 * se, (kl, se)
    page = (runs["trained"] / "eval" / "index.html").read_text()
    assert "kl_to_base" in page and "distinct-2" in page and "The hotel room was" in page
    # base and trained completions of the same prompts side by side
    base = [json.loads(l)["text"] for l in (runs["trained"] / "eval" / "base" / "samples.jsonl").read_text().splitlines()]
    for b, t in zip(base, (r["text"] for r in rows)):
        assert f"<td>{html.escape(b)}</td>\n<td>{html.escape(t)}</td>" in page.replace("</td><td>", "</td>\n<td>")
    assert base != [r["text"] for r in rows]
    assert json.loads((runs["trained"] / "eval" / "summary.json").read_text()) == json.loads(json.dumps(result))


def test_unchanged_weights_have_zero_kl_and_identical_samples(runs):
    result = evaluate(runs["unchanged"], samples=4, batch=4)
    assert result["trained"]["kl_to_base"] == 0.0
    assert result["base"] == {k: v for k, v in result["trained"].items() if not k.startswith("kl_to_base")}


def test_bad_held_out_prompts_are_refused_before_any_model_loads(tmp_path, runs, capsys):
    with pytest.raises(ConfigError, match=r"--prompts: .*no_such_file.txt"):
        evaluate(runs["trained"], prompts=tmp_path / "no_such_file.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(ConfigError, match="--prompts"):
        evaluate(runs["trained"], prompts=empty)
    assert main(["eval", str(runs["trained"]), "--prompts", str(tmp_path / "missing.txt")]) == 2
    assert "--prompts" in capsys.readouterr().err


@pytest.mark.slow
def test_image_run_side_by_side_grid(tmp_path):
    from PIL import Image

    from polyrl.cli import default_config
    from polyrl.config import apply_overrides

    run = tmp_path / "img"
    cfg = Host().build_config(apply_overrides(default_config(), [
        f"run.output_dir={run}", "run.iterations=1", "run.prompts_per_iteration=4", "run.samples_per_prompt=4",
        "run.report=false", "run.progress=false", "update.train_batch_size=16"]))
    train(cfg, Host())
    held_out = ROOT / "assets" / "tiny-lcm" / "prompts_heldout.txt"
    result = evaluate(run, samples=8, batch=8, prompts=held_out)
    assert "distinct-1" not in result["trained"] and result["trained"]["kl_to_base"] > 0
    grid = Image.open(run / "eval" / "side_by_side.png")
    assert grid.width >= 4 * 2 * 64 * 3 and grid.height > 2 * 3 * 64  # 4 pairs a row, enlarged, 2 rows + text
    rows = [json.loads(l) for l in (run / "eval" / "trained" / "samples.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == held_out.read_text().splitlines()[:8]
    assert "<img src='side_by_side.png'>" in (run / "eval" / "index.html").read_text()
