"""Sampling throughput: the ``vllm`` sampler against the built-in ``generate`` sampler.

    python benchmarks/vllm_sampler.py [--model DIR] [--lengths 64 256 1024] [--batch 32] [--iterations 2]

Runs in an environment with vLLM (``make test-vllm`` builds one). Both samplers draw ``--batch``
completions of the same prompts (``assets/tiny-gpt2/prompts.txt``) from the same weights, every
completion exactly ``N`` tokens long (EOS ignored), for each ``N`` in ``--lengths``. One iteration
is what the RL loop does before scoring: for ``vllm`` the transfer of the policy's weights into
the engine (merged LoRA) and the sampling, for ``generate`` the sampling. Reported: seconds per
iteration and generated tokens per second (median over ``--iterations``, after one warm-up
iteration), and the engine's start-up, which a run pays once.

Without ``--model`` the script builds a GPT-2 with the tiny model's shape (3 layers, width 128),
random weights and 2048 positions (the shipped tiny model has 128), so that 1024-token completions
fit; on a GPU, give a real model (``--model Qwen/Qwen2.5-0.5B``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from polyrl import Context
from polyrl.plugins.text import CausalLMConfig, CausalLMPolicy, TextSampler, TextSamplerConfig
from polyrl.plugins.text.vllm_sampler import VLLMSampler, VLLMSamplerConfig

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "assets" / "tiny-gpt2"


def long_tiny_gpt2(folder: Path, positions: int) -> str:
    """The tiny GPT-2's architecture with ``positions`` positions and random weights (seed 0)."""
    from transformers import AutoConfig, AutoTokenizer, GPT2LMHeadModel

    config = AutoConfig.from_pretrained(TINY)
    config.n_positions = positions
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(TINY).save_pretrained(folder)
    return str(folder)


def run(sampler, policy, contexts: list[Context], iterations: int, sync) -> tuple[float, float]:
    """Median seconds per iteration and generated tokens per second."""
    sampler.sample(policy, contexts, torch.Generator().manual_seed(0))  # warm-up
    seconds, tokens = [], []
    for i in range(iterations):
        with torch.no_grad():  # stands in for the update: the weights change every iteration
            for p in policy.trainable_parameters():
                p.mul_(1.0 + 1e-4)
        sync()
        t0 = time.perf_counter()
        rollout = sampler.sample(policy, contexts, torch.Generator().manual_seed(i + 1))
        sync()
        seconds.append(time.perf_counter() - t0)
        tokens.append(int(rollout.mask.sum()))
    s = statistics.median(seconds)
    return s, statistics.median(tokens) / s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="causal LM folder or Hub id (default: a long tiny GPT-2)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--batch", type=int, default=32, help="completions per iteration")
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("--lora-rank", type=int, default=8, help="0: full fine-tuning")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    prompts = [p for p in (TINY / "prompts.txt").read_text().splitlines() if p.strip()]
    contexts = [Context(prompt=prompts[i % len(prompts)], group=i) for i in range(args.batch)]
    longest = max(args.lengths)
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or long_tiny_gpt2(Path(tmp), 2 * longest)
        policy = CausalLMPolicy(CausalLMConfig(pretrained=model, lora_rank=args.lora_rank,
                                               lora_alpha=2 * max(1, args.lora_rank))).to(args.device)
        sync = torch.cuda.synchronize if policy.device.type == "cuda" else (lambda: None)
        engine = VLLMSampler(VLLMSamplerConfig(max_new_tokens=longest, stop_at_eos=False, max_model_len=2 * longest))
        t0 = time.perf_counter()
        engine.start(policy)
        startup = time.perf_counter() - t0
        rows = []
        for n in args.lengths:
            engine.config.max_new_tokens = n
            builtin = TextSampler(TextSamplerConfig(max_new_tokens=n, stop_at_eos=False, batch_size=args.batch))
            for name, sampler in (("generate", builtin), ("vllm", engine)):
                s, tps = run(sampler, policy, contexts, args.iterations, sync)
                rows.append({"sampler": name, "new_tokens": n, "seconds_per_iteration": s, "tokens_per_second": tps})
                print(f"{name:>8}  {n:>5} new tokens  {s:8.2f} s/iteration  {tps:9.0f} tokens/s", flush=True)
        engine.close()
    print(f"\nvLLM engine start-up: {startup:.1f} s (once per run); device: {policy.device.type}, "
          f"{args.batch} completions per iteration, LoRA rank {args.lora_rank}")
    print("\n| new tokens | generate s/it | vllm s/it | generate tok/s | vllm tok/s | speed-up |")
    print("|---:|---:|---:|---:|---:|---:|")
    for n in args.lengths:
        g, v = (next(r for r in rows if r["sampler"] == k and r["new_tokens"] == n) for k in ("generate", "vllm"))
        print(f"| {n} | {g['seconds_per_iteration']:.2f} | {v['seconds_per_iteration']:.2f} | "
              f"{g['tokens_per_second']:.0f} | {v['tokens_per_second']:.0f} | "
              f"{g['seconds_per_iteration'] / v['seconds_per_iteration']:.1f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps({"startup_seconds": startup, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
