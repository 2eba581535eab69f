"""FSDP2 on two CPU processes (gloo) trains the LoRA policy exactly as DDP does.

torch's ``fully_shard`` runs on CPU with gloo; accelerate turns its FSDP and DeepSpeed profiles on
for GPU (and other accelerator) process groups only, so the sharding that its FSDP2 profile applies
(``fully_shard`` on every transformer block, then on the policy) is applied here by the worker
directly, and the runs through ``accelerate launch --config_file configs/accelerate/fsdp2.yaml``
are left to GPU machines.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

HERE = Path(__file__).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(mode: str, out: Path) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(HERE / "fsdp_worker.py"), mode, str(out)]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=HERE.parent)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


@pytest.mark.slow
@pytest.mark.distributed
def test_fsdp2_matches_ddp_losses_weights_and_reference(tmp_path: Path) -> None:
    launch("ddp", tmp_path)
    launch("fsdp", tmp_path)
    for rank in range(2):
        ddp = json.loads((tmp_path / f"ddp{rank}.json").read_text())
        fsdp = json.loads((tmp_path / f"fsdp{rank}.json").read_text())
        assert fsdp["sharded"] == ["DTensor"] and ddp["sharded"] == ["Parameter"]
        # same reductions in the same order on CPU: equal to float rounding (bit-equal in practice)
        assert fsdp["losses"] == pytest.approx(ddp["losses"], abs=1e-6)
        assert len(set(ddp["losses"])) == 3  # the updates changed the loss
        # the reference policy (adapter disabled) under FSDP2: the base model, before and after training
        torch.testing.assert_close(torch.tensor(fsdp["ref"]), torch.tensor(ddp["ref"]), rtol=0, atol=1e-6)
        assert fsdp["ref_after"] == fsdp["ref"]
        assert fsdp["round_trip"] and ddp["round_trip"]  # full state -> shards -> full state
        w_ddp = load_file(str(tmp_path / f"ddp{rank}.safetensors"))
        w_fsdp = load_file(str(tmp_path / f"fsdp{rank}.safetensors"))
        assert w_fsdp.keys() == w_ddp.keys() and any("lora_B" in k for k in w_ddp)
        for k in w_ddp:  # full tensors (gathered), the same names as without sharding
            assert w_fsdp[k].shape == w_ddp[k].shape, k
            torch.testing.assert_close(w_fsdp[k], w_ddp[k], rtol=0, atol=1e-6, msg=k)
        assert any(w_ddp[k].abs().sum() > 0 for k in w_ddp if "lora_B" in k)  # lora_B starts at 0: trained
    first = load_file(str(tmp_path / "fsdp0.safetensors"))
    second = load_file(str(tmp_path / "fsdp1.safetensors"))
    assert all(torch.equal(first[k], second[k]) for k in first)
