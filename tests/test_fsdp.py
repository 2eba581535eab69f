"""FSDP2 on two CPU processes (gloo): the LoRA policy trains exactly as under DDP, and the loop
itself runs sharded: checkpoints, ``--resume``, ``policy/``, the report and the held-out evaluation.

torch's ``fully_shard`` runs on CPU with gloo; accelerate turns its FSDP and DeepSpeed profiles on
for GPU (and other accelerator) process groups only, so the sharding that its FSDP2 profile applies
(``fully_shard`` on every transformer block, then on the policy) is applied here by the worker
directly (through the loop's ``shard_policy`` argument), and the runs through
``accelerate launch --config_file configs/accelerate/fsdp2.yaml`` are left to GPU machines.
"""

from __future__ import annotations

import itertools
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


def launch(*args: str | Path) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(HERE / "fsdp_worker.py"), *map(str, args)]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=HERE.parent)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


@pytest.mark.slow
@pytest.mark.distributed
def test_fsdp2_matches_ddp_losses_weights_and_reference(tmp_path: Path) -> None:
    launch("ddp", tmp_path)
    launch("fsdp", tmp_path)
    launch("fsdp-head", tmp_path)  # with the LM head applied chunk by chunk (policy.chunk_lm_head)
    for rank, mode in itertools.product(range(2), ("fsdp", "fsdp-head")):
        ddp = json.loads((tmp_path / f"ddp{rank}.json").read_text())
        fsdp = json.loads((tmp_path / f"{mode}{rank}.json").read_text())
        tol = 1e-6 if mode == "fsdp" else 1e-5  # the chunked head's matmuls round differently
        # and AdamW turns that rounding, on near-zero gradients, into a fraction of a step (lr 1e-2)
        w_tol = tol if mode == "fsdp" else 2e-3
        assert fsdp["sharded"] == ["DTensor"] and ddp["sharded"] == ["Parameter"]
        # same reductions in the same order on CPU: equal to float rounding (bit-equal in practice)
        assert fsdp["losses"] == pytest.approx(ddp["losses"], abs=tol)
        assert len(set(ddp["losses"])) == 3  # the updates changed the loss
        # the reference policy (adapter disabled) under FSDP2: the base model, before and after training
        torch.testing.assert_close(torch.tensor(fsdp["ref"]), torch.tensor(ddp["ref"]), rtol=0, atol=tol)
        assert fsdp["ref_after"] == fsdp["ref"]
        assert fsdp["round_trip"] and ddp["round_trip"]  # full state -> shards -> full state
        w_ddp = load_file(str(tmp_path / f"ddp{rank}.safetensors"))
        w_fsdp = load_file(str(tmp_path / f"{mode}{rank}.safetensors"))
        assert w_fsdp.keys() == w_ddp.keys() and any("lora_B" in k for k in w_ddp)
        for k in w_ddp:  # full tensors (gathered), the same names as without sharding
            assert w_fsdp[k].shape == w_ddp[k].shape, k
            torch.testing.assert_close(w_fsdp[k], w_ddp[k], rtol=0, atol=w_tol, msg=k)
        assert any(w_ddp[k].abs().sum() > 0 for k in w_ddp if "lora_B" in k)  # lora_B starts at 0: trained
    first = load_file(str(tmp_path / "fsdp0.safetensors"))
    second = load_file(str(tmp_path / "fsdp1.safetensors"))
    assert all(torch.equal(first[k], second[k]) for k in first)


def loop_config(run_dir: Path) -> dict:
    """Four GRPO iterations (KL term: the reference through the disabled adapter), a checkpoint
    every two, the report every two, and a held-out evaluation of three samples in batches of one
    (two sampling calls on one process, one on the other)."""
    return {
        "run": {"iterations": 4, "prompts_per_iteration": 4, "samples_per_prompt": 2, "seed": 3,
                "output_dir": str(run_dir), "cpu": True, "progress": False, "save_every": 2,
                "report": True, "report_every": 2},
        "prompts": {"items": ["This movie was", "I bought this blender and", "The hotel room", "My new phone"]},
        "policy": {"name": "causal_lm", "pretrained": "assets/tiny-gpt2", "lora_rank": 4},
        "sampler": {"name": "generate", "max_new_tokens": 6},
        "rewards": {"sentiment": {}},
        "eval": {"every": 2, "samples": 3, "batch": 1, "rewards": {"sentiment": {}}},
        "update": {"name": "grpo", "beta": 0.04, "train_batch_size": 2, "gradient_accumulation_batches": 2,
                   "inner_epochs": 2},
        "optimizer": {"lr": 5e-3, "max_grad_norm": 1.0},
    }


def metrics(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


def checkpoint(run_dir: Path, iteration: int) -> tuple[dict, dict, dict]:
    folder = run_dir / "checkpoints" / f"iter_{iteration:06d}"
    manifest = json.loads((folder / "trainer.json").read_text())
    optimizer = torch.load(folder / "optimizer.pt", weights_only=True)["optimizer"]
    return manifest, load_file(str(folder / "trainable.safetensors")), optimizer


def adapter(policy_dir: Path) -> dict[str, torch.Tensor]:
    """The LoRA weights of ``policy/`` as plain peft loads them, under the policy's own names."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(HERE.parent / "assets" / "tiny-gpt2"))
    model = PeftModel.from_pretrained(base, str(policy_dir))
    return {f"model.{k}": v for k, v in model.state_dict().items() if "lora_" in k}


@pytest.mark.slow
@pytest.mark.distributed
def test_fsdp2_loop_saves_resumes_and_matches_ddp(tmp_path: Path) -> None:
    configs = {}
    for name in ("fsdp", "ddp", "stopped"):
        configs[name] = tmp_path / f"{name}.yaml"
        configs[name].write_text(yaml.safe_dump(loop_config(tmp_path / name)))
    launch("loop", configs["fsdp"], tmp_path, "fsdp")
    launch("loop", configs["ddp"], tmp_path, "ddp")
    for rank in range(2):
        info = json.loads((tmp_path / f"fsdp-loop{rank}.json").read_text())
        assert info == {"sharded": True, "parameter": "DTensor", "num_processes": 2}
        assert json.loads((tmp_path / f"ddp-loop{rank}.json").read_text())["sharded"] is False
    full = metrics(tmp_path / "fsdp")
    assert [r["iteration"] for r in full] == [1, 2, 3, 4]
    assert "eval/reward_mean" in full[1] and "eval/reward_mean" in full[3]
    assert len({r["reward_mean"] for r in full}) == 4 and all(r["kl_ref"] > 0 for r in full)

    # the sharded loop trains as DDP does: same samples, rewards, losses and weights
    ddp = metrics(tmp_path / "ddp")
    assert [r.keys() for r in full] == [r.keys() for r in ddp]
    for a, b in zip(full, ddp):
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), (a["iteration"], k)
    w_fsdp = load_file(str(tmp_path / "fsdp-loop0.safetensors"))
    w_ddp = load_file(str(tmp_path / "ddp-loop0.safetensors"))
    assert w_fsdp.keys() == w_ddp.keys()
    for k in w_ddp:
        torch.testing.assert_close(w_fsdp[k], w_ddp[k], rtol=0, atol=1e-6, msg=k)
    w_rank1 = load_file(str(tmp_path / "fsdp-loop1.safetensors"))
    assert all(torch.equal(w_fsdp[k], w_rank1[k]) for k in w_fsdp)

    # checkpoints hold full tensors: the weights, and AdamW's moments in the unsharded layout
    manifest, trainable, optimizer = checkpoint(tmp_path / "fsdp", 4)
    assert "optimizer.pt" in manifest["files"] and manifest["iteration"] == 4
    assert all(torch.equal(trainable[k], w_fsdp[k]) for k in w_fsdp)
    _, _, optimizer_ddp = checkpoint(tmp_path / "ddp", 4)
    shapes = [tuple(v.shape) for v in trainable.values()]
    assert [tuple(s["exp_avg"].shape) for s in optimizer["state"].values()] == shapes
    for i, s in optimizer["state"].items():
        for k in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(s[k], optimizer_ddp["state"][i][k], rtol=1e-5, atol=1e-7)

    # policy/ is the plain peft adapter of the final weights
    loaded = adapter(tmp_path / "fsdp" / "policy")
    assert loaded.keys() == trainable.keys()
    assert all(torch.equal(loaded[k], trainable[k]) for k in trainable)
    # the report was sampled on the main process alone, with the shards gathered for it
    report = tmp_path / "fsdp" / "report"
    assert all(json.loads((report / f"iter_{i:06d}.json").read_text())["texts"] for i in (0, 2, 4))

    # stopped by SIGTERM after iteration 2 (its stop path writes the checkpoint and policy/), then resumed
    launch("loop", configs["stopped"], tmp_path, "fsdp", 2)
    stopped = tmp_path / "stopped"
    assert [p.name for p in sorted((stopped / "checkpoints").iterdir())] == ["iter_000002"]
    _, trainable2, _ = checkpoint(stopped, 2)
    loaded2 = adapter(stopped / "policy")
    assert all(torch.equal(loaded2[k], trainable2[k]) for k in trainable2)
    launch("loop", configs["stopped"], tmp_path, "fsdp", 0, "resume")
    assert metrics(stopped) == full  # every metric of every iteration, bit for bit
    _, trainable4, optimizer4 = checkpoint(stopped, 4)
    assert all(torch.equal(trainable4[k], trainable[k]) for k in trainable)
    for i, s in optimizer["state"].items():
        assert all(torch.equal(s[k], optimizer4["state"][i][k]) for k in s)
    resumed = load_file(str(tmp_path / "fsdp-loop0.safetensors"))  # written by the resumed run
    assert all(torch.equal(resumed[k], w_fsdp[k]) for k in w_fsdp)


@pytest.mark.slow
@pytest.mark.distributed
def test_fsdp2_full_fine_tuning_policy_folder_loads_with_transformers(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    launch("save", tmp_path)
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "policy"))
    before = load_file(str(tmp_path / "full-before.safetensors"))
    loaded = model.state_dict()
    assert set(before) <= set(loaded)
    for k in before:  # every weight gathered whole (each moved off its pretrained value before sharding)
        assert torch.equal(loaded[k], before[k]), k
    assert torch.equal(loaded["lm_head.weight"], loaded["transformer.wte.weight"])
    head, head_before = (load_file(str(tmp_path / f)) for f in ("policy/value_head.safetensors", "head-before.safetensors"))
    assert head.keys() == head_before.keys() and all(torch.equal(head[k], head_before[k]) for k in head)
