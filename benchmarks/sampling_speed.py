"""Sampling time per image: LCM at 2, 4 and 8 steps vs DDIM at 50 steps (the RLCM speed claim).

    python benchmarks/sampling_speed.py [--lcm assets/tiny-lcm] [--sd assets/tiny-sd] [--batch 16] [--repeats 3]

Times the polyrl samplers that RL uses (every step recorded with its log-probability; the images
decoded): ``lcm`` with guidance 8 (one UNet call per step, the guidance is an embedding) and ``ddim``
(η = 1) with classifier-free guidance 5 (two UNet passes per step, batched). Prints the median
seconds per image over ``--repeats`` batches, after one warm-up batch. Give Hub ids
(``--lcm SimianLuo/LCM_Dreamshaper_v7 --sd CompVis/stable-diffusion-v1-4``) on a GPU for the
real models; RLCM reports usable images in 2-4 steps, 1-4 s vs about 20 s for 50-step SD.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from polyrl import Context
from polyrl.plugins.diffusion import DDIMSampler, DDIMSamplerConfig, DiffusionPolicy, DiffusionPolicyConfig
from polyrl.plugins.lcm import LCMPolicy, LCMPolicyConfig, LCMSampler, LCMSamplerConfig


def time_sampler(policy, sampler, prompts: list[str], repeats: int) -> float:
    """Median seconds per image over ``repeats`` batches (after one warm-up batch)."""
    ctx = [Context(prompt=p, group=i) for i, p in enumerate(prompts)]
    sync = torch.cuda.synchronize if policy.device.type == "cuda" else (lambda: None)
    sampler.sample(policy, ctx, torch.Generator().manual_seed(0))
    times = []
    for r in range(repeats):
        sync()
        t0 = time.perf_counter()
        sampler.sample(policy, ctx, torch.Generator().manual_seed(r + 1))
        sync()
        times.append((time.perf_counter() - t0) / len(prompts))
    return statistics.median(times)


def main(argv: list[str] | None = None) -> list[tuple[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lcm", default="assets/tiny-lcm", help="LCM pipeline (folder or Hub id)")
    parser.add_argument("--sd", default="assets/tiny-sd", help="SD 1.x pipeline (folder or Hub id)")
    parser.add_argument("--batch", type=int, default=16, help="images per batch")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    prompts = [f"a {c} {s} on the left" for c in ("red", "green", "blue", "yellow") for s in ("circle", "square", "triangle", "star")]
    prompts = (prompts * (args.batch // len(prompts) + 1))[: args.batch]

    rows = []
    lcm = LCMPolicy(LCMPolicyConfig(pretrained=args.lcm, torch_dtype=args.dtype)).to(device).eval()
    for steps in (2, 4, 8):
        sampler = LCMSampler(LCMSamplerConfig(num_steps=steps, guidance_scale=8.0, batch_size=args.batch))
        rows.append((f"LCM, {steps} steps (guidance embedding, 1 UNet pass per step)", time_sampler(lcm, sampler, prompts, args.repeats)))
    del lcm
    sd = DiffusionPolicy(DiffusionPolicyConfig(pretrained=args.sd, torch_dtype=args.dtype)).to(device).eval()
    sampler = DDIMSampler(DDIMSamplerConfig(num_steps=50, eta=1.0, guidance_scale=5.0, batch_size=args.batch))
    rows.append(("DDIM, 50 steps (CFG 5, 2 UNet passes per step)", time_sampler(sd, sampler, prompts, args.repeats)))

    where = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"\nsampling time per image ({where}; batches of {args.batch}; {args.lcm} vs {args.sd})")
    print("| sampler | s / image | vs DDIM-50 |")
    print("|---|---|---|")
    ddim = rows[-1][1]
    for label, sec in rows:
        print(f"| {label} | {sec:.4f} | {ddim / sec:.1f}x faster |" if sec != ddim else f"| {label} | {sec:.4f} | 1.0x |")
    return rows


if __name__ == "__main__":
    main()
