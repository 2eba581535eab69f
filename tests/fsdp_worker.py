"""Worker for test_fsdp.py, started on two CPU processes (gloo) by ``torch.distributed.run``.

``ddp`` / ``fsdp`` / ``fsdp-head``: the LoRA policy in DistributedDataParallel, or sharded with
FSDP2 as accelerate's FSDP2 profile does (``fully_shard`` on every transformer block, then on the
policy); ``fsdp-head`` also applies the LM head chunk by chunk (``chunk_lm_head``).
Both train three GRPO steps (with the KL term, the reference through the disabled adapter) on the
same fixed rollouts and advantages, and record the losses, the reference log-probs and the
trainable weights (gathered to full tensors by the policy).

``save OUT``: a fully fine-tuned policy with a value head, its weights moved off the pretrained
ones, is sharded and saved with ``save_pretrained`` by both processes (rank 0 writes); the weights
before sharding are kept beside it to compare.

``loop CONFIG OUT [ddp|fsdp] [STOP_AFTER] [resume]``: the loop's own :func:`polyrl.loop.train` on
the run config ``CONFIG``, with the policy sharded by ``shard_policy`` (``fsdp``) or in DDP
(``ddp``). With ``STOP_AFTER`` > 0 the main process sends itself SIGTERM at the end of that
iteration (what a scheduler does), so the run stops there through its own stop path; ``resume``
continues the run. Each process records its final trainable weights and whether the policy was
sharded.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from safetensors.torch import save_file

from polyrl import Context, hookimpl
from polyrl.plugins.text import CausalLMConfig, CausalLMPolicy, TextSampler, TextSamplerConfig
from polyrl.plugins.updates.grpo import grpo_loss

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "assets" / "tiny-gpt2"


def shard_like_accelerate(policy: CausalLMPolicy, accelerator=None) -> None:  # noqa: ARG001
    """FSDP2 as accelerate's FSDP2 profile applies it: every GPT-2 block, then the policy."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for block in policy._base_model().transformer.h:  # inside the peft wrapper with LoRA
        fully_shard(block, mesh=mesh)
    fully_shard(policy, mesh=mesh)


def steps(mode: str, out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    prompts = [p for p in (TINY / "prompts.txt").read_text().splitlines() if p.strip()]
    torch.manual_seed(0)  # the same LoRA initialisation on every process and in both modes
    head = {"chunk_lm_head": True, "log_prob_chunk_tokens": 3} if mode == "fsdp-head" else {}
    policy = CausalLMPolicy(CausalLMConfig(pretrained=str(TINY), lora_rank=4, lora_alpha=8, **head))
    contexts = [Context(prompt=prompts[(4 * rank + i) % len(prompts)], group=i // 2) for i in range(4)]
    with torch.no_grad():
        rollout = TextSampler(TextSamplerConfig(max_new_tokens=6)).sample(
            policy, contexts, torch.Generator().manual_seed(rank))
    adv = torch.randn(4, generator=torch.Generator().manual_seed(100 + rank))
    if mode == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(policy)
    elif mode in ("fsdp", "fsdp-head"):
        shard_like_accelerate(policy)
        model = policy
    else:
        raise SystemExit(f"mode must be ddp, fsdp or fsdp-head, got {mode!r}")
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


def save(out_dir: str) -> None:
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    policy = CausalLMPolicy(CausalLMConfig(pretrained=str(TINY), lora_rank=0, value_head=True))
    with torch.no_grad():
        for i, p in enumerate(policy.parameters()):
            p.add_(0.01 * (i + 1))
    out = Path(out_dir)
    if dist.get_rank() == 0:
        save_file({k: v.contiguous() for k, v in policy.model.state_dict().items() if k != "lm_head.weight"},
                  str(out / "full-before.safetensors"))  # (lm_head is tied to the embeddings)
        save_file(dict(policy.value_head.state_dict()), str(out / "head-before.safetensors"))
    shard_like_accelerate(policy)
    policy.save_pretrained(str(out / "policy"))
    dist.destroy_process_group()


class StopAfter:
    """Sends SIGTERM to the main process at the end of one iteration."""

    def __init__(self, iteration: int) -> None:
        self.iteration = iteration

    @hookimpl
    def polyrl_iteration_end(self, trainer, iteration, metrics, rollout):  # noqa: ARG002
        if iteration == self.iteration and trainer.accelerator.is_main_process:
            os.kill(os.getpid(), signal.SIGTERM)


def loop(config_path: str, out_dir: str, mode: str, stop_after: int, resume: bool) -> None:
    from polyrl.errors import RunStopped
    from polyrl.host import Host
    from polyrl.loop import train

    host = Host()
    if stop_after > 0:
        host.register(StopAfter(stop_after), "stop-after")
    cfg = host.build_config(yaml.safe_load(Path(config_path).read_text()))
    try:
        trainer = train(cfg, host, resume=resume, shard_policy=shard_like_accelerate if mode == "fsdp" else None)
    except RunStopped:
        if stop_after <= 0:
            raise
        return
    rank = trainer.accelerator.process_index
    state = trainer.policy.trainable_state_dict()  # every process (gathers the shards)
    out = Path(out_dir)
    save_file(state, str(out / f"{mode}-loop{rank}.safetensors"))
    (out / f"{mode}-loop{rank}.json").write_text(json.dumps({
        "sharded": trainer.sharded,
        "parameter": type(next(trainer.policy.parameters())).__name__,
        "num_processes": trainer.accelerator.num_processes,
    }))


if __name__ == "__main__":
    torch.set_num_threads(1)
    if sys.argv[1] == "save":
        save(sys.argv[2])
    elif sys.argv[1] == "loop":
        loop(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]) if len(sys.argv) > 5 else 0,
             len(sys.argv) > 6 and sys.argv[6] == "resume")
    else:
        steps(sys.argv[1], sys.argv[2])
