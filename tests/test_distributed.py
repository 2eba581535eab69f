"""Two processes through `accelerate launch` on CPU: weights stay identical, advantages are global."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

HERE = Path(__file__).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.distributed
def test_two_processes_keep_lora_weights_identical_and_gather_rewards(tmp_path):
    iterations = 3
    config = {
        "run": {"iterations": iterations, "prompts_per_iteration": 2, "samples_per_prompt": 2, "seed": 3,
                "output_dir": str(tmp_path / "run"), "cpu": True, "progress": False, "report": False},
        "prompts": {"items": ["This movie was", "I bought this blender and", "The hotel room", "My new phone"]},
        "policy": {"name": "causal_lm", "pretrained": "assets/tiny-gpt2", "lora_rank": 4},
        "sampler": {"name": "generate", "max_new_tokens": 6},
        "rewards": {"sentiment": {}},
        # min_count above anything reachable: every advantage uses the gathered batch's statistics
        "update": {"name": "ddpo", "train_batch_size": 2, "gradient_accumulation_batches": 2,
                   "clip_range": 0.2, "tracker_min_count": 1000},
        "optimizer": {"lr": 5e-3},
    }
    cfg_path = tmp_path / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(config))
    launcher = Path(sys.executable).with_name("accelerate")
    cmd = [str(launcher), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
           str(HERE / "dist_worker.py"), str(cfg_path), str(tmp_path)]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=HERE.parent)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]

    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["num_processes"] for r in ranks] == [2, 2], ranks[0]["distributed_type"]

    # identical trainable weights, and they did change
    w0, w1 = (load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(2))
    assert w0.keys() == w1.keys() and len(w0) > 0
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k
    lora_b = [k for k in w0 if "lora_B" in k]
    assert lora_b and any(w0[k].abs().sum() > 0 for k in lora_b)  # lora_B starts at zero

    # ranks drew different prompts; advantages were normalised with both ranks' rewards
    for it in range(iterations):
        rows = [ranks[r]["rows"][it] for r in range(2)]
        assert rows[0]["prompts"] != rows[1]["prompts"]
        all_rewards = torch.tensor(rows[0]["rewards"] + rows[1]["rewards"])
        mean, std = all_rewards.mean(), all_rewards.std(unbiased=False)
        for r in range(2):
            expected = (torch.tensor(rows[r]["rewards"]) - mean) / (std + 1e-6)
            assert torch.allclose(torch.tensor(rows[r]["advantages"]), expected, atol=1e-5), (it, r)
