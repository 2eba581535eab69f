"""The README's CPU recipe: two processes on a machine without a GPU, launched by `accelerate
launch` on the `polyrl` command line itself, form one run (not two one-process runs), and the
start line says so."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.distributed
def test_two_cpu_processes_form_one_run(tmp_path):
    launcher = Path(sys.executable).with_name("accelerate")
    out = tmp_path / "run"
    cmd = [str(launcher), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
           "-m", "polyrl.cli", "train", "configs/grpo_tiny_text.yaml", "run.iterations=2", "run.threads=1",
           f"run.output_dir={out}", "run.report=false", "run.progress=false", "run.prompts_per_iteration=2",
           "run.samples_per_prompt=2", "update.train_batch_size=4", "sampler.max_new_tokens=4"]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    starts = [l for l in proc.stderr.splitlines() if l.startswith("polyrl: ") and " on cpu, distributed: " in l]
    assert starts == ["polyrl: 2 processes on cpu, distributed: MULTI_CPU, gloo, 1 CPU thread each, "
                      "mixed precision: no"], proc.stderr[-3000:]
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2]  # one run, written once
