"""Prompts from a dataset by id, configuration and split: a Hub dataset id, or a local folder the
``datasets`` library reads (parquet files), besides the plain files of test_text_prompts.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from polyrl.config import PromptsConfig, from_dict
from polyrl.prefetch import needs
from polyrl.prompts import hub_dataset_id, load_prompts
from polyrl.types import ConfigError

pd = pytest.importorskip("pandas")
pytest.importorskip("datasets")
ROOT = Path(__file__).parent.parent


@pytest.fixture
def parquet_dataset(tmp_path):
    """A dataset folder with two configurations (``easy``, ``hard``), each with train and test splits."""
    root = tmp_path / "ds"
    for config, n in (("easy", 3), ("hard", 2)):
        (root / config).mkdir(parents=True)
        for split in ("train", "test"):
            pd.DataFrame({"question": [f"{config} {split} {i}" for i in range(n)], "answer": list(range(n))}) \
                .to_parquet(root / config / f"{split}-00000-of-00001.parquet")
    (root / "README.md").write_text(
        "---\nconfigs:\n"
        "- config_name: easy\n  data_files:\n  - split: train\n    path: easy/train-*\n  - split: test\n    path: easy/test-*\n"
        "- config_name: hard\n  data_files:\n  - split: train\n    path: hard/train-*\n  - split: test\n    path: hard/test-*\n"
        "---\n")
    return root


def test_a_local_datasets_folder_by_configuration_and_split(parquet_dataset):
    cfg = from_dict(PromptsConfig, {"dataset": str(parquet_dataset), "dataset_config": "hard", "split": "test",
                                    "prompt_column": "question"}, "prompts")
    rows = load_prompts(cfg)
    assert rows == [("hard test 0", {"answer": 0}), ("hard test 1", {"answer": 1})]
    easy = load_prompts(from_dict(PromptsConfig, {"dataset": str(parquet_dataset), "dataset_config": "easy",
                                                  "prompt_column": "question"}, "prompts"))
    assert [p for p, _ in easy] == ["easy train 0", "easy train 1", "easy train 2"]
    with pytest.raises(ConfigError, match=r"prompts.split='dev': Unknown split"):
        load_prompts(from_dict(PromptsConfig, {"dataset": str(parquet_dataset), "dataset_config": "easy", "split": "dev",
                                               "prompt_column": "question"}, "prompts"))
    with pytest.raises(ConfigError, match=r"prompts.dataset_config='medium'"):
        load_prompts(from_dict(PromptsConfig, {"dataset": str(parquet_dataset), "dataset_config": "medium",
                                               "prompt_column": "question"}, "prompts"))


def test_what_is_read_as_a_hub_id(tmp_path):
    assert hub_dataset_id("openai/gsm8k") == "openai/gsm8k"
    assert hub_dataset_id("assets/tiny-gpt2") is None  # a local folder
    assert hub_dataset_id("./data/prompts") is None and hub_dataset_id("prompts.jsonl") is None
    with pytest.raises(ConfigError, match=r"did you mean 'assets/tiny-gpt2'"):
        from_dict(PromptsConfig, {"dataset": "assets/tiny-gpt"}, "prompts")
    with pytest.raises(ConfigError, match="dataset_config applies only"):
        (tmp_path / "p.jsonl").write_text('{"prompt": "hi"}\n')
        from_dict(PromptsConfig, {"dataset": str(tmp_path / "p.jsonl"), "dataset_config": "x"}, "prompts")


def test_a_hub_dataset_is_listed_by_prefetch():
    from polyrl.host import Host

    data = yaml.safe_load((ROOT / "configs/grpo_tiny_text.yaml").read_text())
    data["prompts"] = {"dataset": "openai/gsm8k", "dataset_config": "main", "split": "test", "prompt_column": "question"}
    [need] = needs(Host(plugins=[]).build_config(data))
    assert need.key == "prompts.dataset" and need.what == "Hub dataset openai/gsm8k, configuration main, split test"
    assert "--repo-type dataset" in need.manual


def test_a_hub_dataset_offline_is_one_line(tmp_path):
    data = yaml.safe_load((ROOT / "configs/grpo_tiny_text.yaml").read_text())
    data["prompts"] = {"dataset": "polyrl-nobody/no-such-dataset", "split": "train"}
    data["run"]["output_dir"] = str(tmp_path / "out")
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(data))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run([sys.executable, "-m", "polyrl.cli", "train", str(tmp_path / "run.yaml")], env=env,
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    [line] = [l for l in proc.stderr.splitlines() if l.startswith("polyrl: error:")]
    assert "prompts.dataset: cannot load 'polyrl-nobody/no-such-dataset'" in line and "HF_HUB_OFFLINE" in line
    assert "hf download polyrl-nobody/no-such-dataset --repo-type dataset" in line
