"""Failures a person can act on: a model that cannot be loaded offline, a mistyped local path, a
missing file. Each ends in one ``polyrl: error:`` paragraph naming the config key and the fix;
``--debug`` shows the traceback instead."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from polyrl.cli import main
from polyrl.host import Host
from polyrl.types import ConfigError

ROOT = Path(__file__).parent.parent

TEXT = """\
run: {iterations: 1, prompts_per_iteration: 2, samples_per_prompt: 2, progress: false, report: false, threads: 1}
prompts: {items: [hello, world]}
policy: {name: causal_lm, pretrained: assets/tiny-gpt2}
sampler: {name: generate, max_new_tokens: 4}
rewards: {sentiment: {weight: 1.0}}
update: {name: grpo, train_batch_size: 4}
"""

IMAGE = """\
run: {iterations: 1, prompts_per_iteration: 2, samples_per_prompt: 2, progress: false, report: false, threads: 1}
prompts: {items: [a red circle]}
policy: {name: lcm, pretrained: assets/tiny-lcm}
sampler: {name: lcm, num_steps: 2}
rewards: {clip_score: {weight: 1.0}}
update: {name: ddpo, train_batch_size: 2}
"""


def one_paragraph(stderr: str, *fragments: str) -> str:
    """The single ``polyrl: error:`` line of ``stderr``, checked to hold every fragment, with no
    traceback anywhere."""
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("polyrl: error:")]
    assert len(errors) == 1, stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def write(tmp_path: Path, text: str, name: str = "run.yaml", **changes) -> Path:
    data = yaml.safe_load(text)
    data["run"]["output_dir"] = str(tmp_path / "out")
    for dotted, value in changes.items():
        node = data
        *parents, last = dotted.split("__")
        for k in parents:
            node = node[k]
        node[last] = value
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


# ----------------------------------------------------------------------------- before any model loads
@pytest.mark.parametrize("policy_text,key,typo,fix", [
    (TEXT, "policy__pretrained", "assets/tiny-gpt", "assets/tiny-gpt2"),
    (TEXT, "policy__pretrained", "./assets/tiny-gtp2", "assets/tiny-gpt2"),
    (IMAGE, "policy__pretrained", "assets/tiny-lc", "assets/tiny-lcm"),
])
def test_a_mistyped_local_path_is_not_sent_to_the_hub(tmp_path, capsys, policy_text, key, typo, fix):
    cfg = write(tmp_path, policy_text, **{key: typo})
    assert main(["train", str(cfg)]) == 2
    one_paragraph(capsys.readouterr().err, "policy.pretrained", repr(typo), f"did you mean {fix!r}")
    assert not (tmp_path / "out").exists(), "refused before the run folder is made"


def test_debug_shows_the_traceback(tmp_path):
    cfg = write(tmp_path, TEXT, policy__pretrained="assets/tiny-gpt")
    with pytest.raises(ConfigError, match="did you mean"):
        main(["--debug", "train", str(cfg)])


def test_a_missing_prompt_file_names_its_key(tmp_path, capsys):
    data = yaml.safe_load(TEXT)
    data["prompts"] = {"file": str(tmp_path / "prompts.txt")}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(data))
    assert main(["train", str(tmp_path / "run.yaml")]) == 2
    one_paragraph(capsys.readouterr().err, "prompts.file", "prompts.txt")


def test_unquoted_no_is_full_precision(tmp_path):
    text = TEXT.replace("threads: 1}", "threads: 1, mixed_precision: no}")
    data = yaml.safe_load(text)
    assert data["run"]["mixed_precision"] is False  # what YAML 1.1 makes of it
    cfg = Host(plugins=[]).build_config(data)
    assert cfg.run.mixed_precision == "no"
    assert cfg.to_dict()["run"]["mixed_precision"] == "no"
    with pytest.raises(ConfigError, match=r"run.mixed_precision: 0 is not accepted"):
        Host(plugins=[]).build_config({**data, "run": {**data["run"], "mixed_precision": 0}})


def test_threads_are_checked():
    data = yaml.safe_load(TEXT)
    data["run"]["threads"] = -1
    with pytest.raises(ConfigError, match=r"run.threads=-1 is out of range"):
        Host(plugins=[]).build_config(data)


# ----------------------------------------------------------------------------- at load time, offline
OFFLINE_CASES = {
    # name: (base config, changes, fragments the error must hold)
    "text_hub_id": (TEXT, {"policy__pretrained": "polyrl-nobody/no-such-model"},
                    ["policy.pretrained", "'polyrl-nobody/no-such-model'", "HF_HUB_OFFLINE", "polyrl prefetch",
                     "hf download polyrl-nobody/no-such-model", "local transformers model folder"]),
    "diffusion_hub_id": (IMAGE, {"policy__pretrained": "polyrl-nobody/no-such-pipeline"},
                         ["policy.pretrained", "HF_HUB_OFFLINE", "polyrl prefetch", "diffusers pipeline folder"]),
    "clip_weights": (IMAGE, {"rewards__clip_score": {"model": "RN50", "pretrained": "openai"}},
                     ["rewards.clip_score.model", "RN50 (pretrained=openai)", "HF_HUB_OFFLINE", "polyrl prefetch",
                      "local checkpoint file"]),
    "aesthetic_head": (IMAGE, {"rewards__clip_score": None,
                               "rewards__aesthetic": {"model": "assets/tiny-clip",
                                                      "head": "http://127.0.0.1:9/sac+logos+ava1-l14-linearMSE.pth"}},
                       ["rewards.aesthetic.head", "put it at"]),
}

CHILD = textwrap.dedent("""
    import contextlib, io, json, sys
    import torch
    torch.set_num_threads(1)
    from polyrl.cli import main
    out = {}
    for name, path in json.loads(sys.argv[1]).items():
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            try:
                rc = main(["train", path])
            except BaseException as e:  # reported to the test as a failure, with its type
                rc = f"raised {type(e).__name__}: {e}"
        out[name] = [rc, err.getvalue()]
    print(json.dumps(out))
""")


@pytest.mark.slow
def test_models_that_cannot_be_loaded_offline(tmp_path):
    paths = {}
    for name, (base, changes, _) in OFFLINE_CASES.items():
        case = tmp_path / name
        case.mkdir()
        changes = dict(changes)
        drop = [k for k, v in changes.items() if v is None]
        path = write(case, base, **{k: v for k, v in changes.items() if v is not None})
        if drop:
            data = yaml.safe_load(path.read_text())
            for k in drop:
                section, key = k.split("__")
                del data[section][key]
            path.write_text(yaml.safe_dump(data))
        paths[name] = str(path)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "POLYRL_CACHE": str(tmp_path / "c")}
    env.pop("HF_HUB_CACHE", None)
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(paths)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, (_, _, fragments) in OFFLINE_CASES.items():
        rc, stderr = results[name]
        assert rc == 2, (name, rc, stderr[-2000:])
        one_paragraph(stderr, *fragments)
