"""Worker for test_fsdp.py, started on two CPU processes (gloo) by ``torch.distributed.run``.

``ddp`` wraps the LoRA policy in DistributedDataParallel; ``fsdp`` shards it with FSDP2 as
accelerate's FSDP2 profile does (``fully_shard`` on every transformer block, then on the policy).
Both train three GRPO steps (with the KL term, the reference through the disabled adapter) on the
same fixed rollouts and advantages, and record the losses, the reference log-probs and the
trainable weights (gathered to full tensors by the policy).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from polyrl import Context
from polyrl.plugins.text import CausalLMConfig, CausalLMPolicy, TextSampler, TextSamplerConfig
from polyrl.plugins.updates.grpo import grpo_loss

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "assets" / "tiny-gpt2"


def main(mode: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    prompts = [p for p in (TINY / "prompts.txt").read_text().splitlines() if p.strip()]
    torch.manual_seed(0)  # the same LoRA initialisation on every process and in both modes
    policy = CausalLMPolicy(CausalLMConfig(pretrained=str(TINY), lora_rank=4, lora_alpha=8))
    contexts = [Context(prompt=prompts[(4 * rank + i) % len(prompts)], group=i // 2) for i in range(4)]
    with torch.no_grad():
        rollout = TextSampler(TextSamplerConfig(max_new_tokens=6)).sample(
            policy, contexts, torch.Generator().manual_seed(rank))
    adv = torch.randn(4, generator=torch.Generator().manual_seed(100 + rank))
    if mode == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(policy)
    elif mode == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for block in policy.model.get_base_model().transformer.h:
            fully_shard(block, mesh=mesh)
        model = fully_shard(policy, mesh=mesh)
    else:
        raise SystemExit(f"mode must be ddp or fsdp, got {mode!r}")
    ref = policy.reference_log_probs(rollout)
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(3):
        logp = model(rollout)
        loss, _ = grpo_loss(logp, rollout.log_probs, adv, rollout.mask, 0.2, beta=0.04, ref=ref, loss_type="bnpo")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    state = policy.trainable_state_dict()
    ref_after = policy.reference_log_probs(rollout)  # the adapter is disabled: still the base model
    policy.load_trainable_state_dict(state)  # a checkpoint's full tensors go back into the shards
    again = policy.trainable_state_dict()
    out = Path(out_dir)
    save_file(state, str(out / f"{mode}{rank}.safetensors"))
    (out / f"{mode}{rank}.json").write_text(json.dumps({
        "losses": losses,
        "ref": ref.tolist(),
        "ref_after": ref_after.tolist(),
        "sharded": [type(p).__name__ for p in policy.parameters()][:1],
        "round_trip": all(torch.equal(again[k], state[k]) for k in state),
    }))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
