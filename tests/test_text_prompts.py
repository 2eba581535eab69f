"""Prompt sources: inline items, text and JSONL files, and local datasets (JSONL / JSON / CSV files or
folders, and ``datasets`` save_to_disk folders when that library is installed)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from polyrl.config import PromptsConfig, from_dict
from polyrl.prompts import PromptSource, load_prompts
from polyrl.types import ConfigError

ROWS = [{"question": "2+2=", "answer": "4", "level": 1}, {"question": "3*3=", "answer": "9", "level": 2}]


def prompts(**kw) -> PromptsConfig:
    return from_dict(PromptsConfig, kw, "prompts")


def test_text_and_jsonl_files(tmp_path: Path):
    (tmp_path / "p.txt").write_text("This movie was\n\nI bought this\n")
    assert load_prompts(prompts(file=str(tmp_path / "p.txt"))) == [("This movie was", {}), ("I bought this", {})]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    got = load_prompts(prompts(file=str(tmp_path / "p.jsonl"), prompt_column="question"))
    assert got == [("2+2=", {"answer": "4", "level": 1}), ("3*3=", {"answer": "9", "level": 2})]
    with pytest.raises(ConfigError, match="needs a string 'prompt' column.*'answer', 'level', 'question'"):
        load_prompts(prompts(file=str(tmp_path / "p.jsonl")))


@pytest.mark.parametrize("kind", ["jsonl", "json", "json_columns", "csv", "folder"])
def test_dataset_files_and_folders(tmp_path: Path, kind: str):
    path = tmp_path / "data"
    if kind == "jsonl":
        path = tmp_path / "d.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    elif kind == "json":
        path = tmp_path / "d.json"
        path.write_text(json.dumps(ROWS))
    elif kind == "json_columns":
        path = tmp_path / "d.json"
        path.write_text(json.dumps({k: [r[k] for r in ROWS] for k in ROWS[0]}))
    elif kind == "csv":
        path = tmp_path / "d.csv"
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(ROWS[0]))
            w.writeheader()
            w.writerows(ROWS)
    else:  # a folder with one file per split
        path.mkdir()
        (path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
        (path / "test.jsonl").write_text(json.dumps({"question": "held out", "answer": "0"}) + "\n")
    rows = load_prompts(prompts(dataset=str(path), prompt_column="question"))
    assert [p for p, _ in rows] == ["2+2=", "3*3="]
    assert rows[0][1]["answer"] == "4" and str(rows[1][1]["level"]) == "2"  # CSV values are strings
    if kind == "folder":
        test = load_prompts(prompts(dataset=str(path), prompt_column="question", split="test"))
        assert test == [("held out", {"answer": "0"})]
        with pytest.raises(ConfigError, match="holds no dev.jsonl"):
            prompts(dataset=str(path), split="dev")


def test_dataset_errors_are_reported_before_loading(tmp_path: Path):
    with pytest.raises(ConfigError, match="exactly one of prompts.items"):
        prompts(items=["a"], dataset="x")
    with pytest.raises(ConfigError, match="no such file or folder"):
        prompts(dataset=str(tmp_path / "missing"))
    (tmp_path / "d.parquet").write_text("")
    with pytest.raises(ConfigError, match="accepted: \\['.jsonl', '.json', '.csv'\\]"):
        prompts(dataset=str(tmp_path / "d.parquet"))


def test_save_to_disk_folder_and_extra_columns_reach_contexts(tmp_path: Path):
    datasets = pytest.importorskip("datasets")
    d = datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS), "test": datasets.Dataset.from_list(ROWS[:1])})
    d.save_to_disk(str(tmp_path / "hf"))
    cfg = prompts(dataset=str(tmp_path / "hf"), prompt_column="question", shuffle=False)
    assert [p for p, _ in load_prompts(cfg)] == ["2+2=", "3*3="]
    with pytest.raises(ConfigError, match="no split 'dev'"):
        load_prompts(prompts(dataset=str(tmp_path / "hf"), prompt_column="question", split="dev"))
    ctx = PromptSource(cfg, seed=0).contexts(1, 0, 1, 2, 2)
    assert [c.prompt for c in ctx] == ["2+2=", "2+2=", "3*3=", "3*3="]
    assert ctx[2].extra == {"answer": "9", "level": 2} and ctx[0].group == ctx[1].group != ctx[2].group
