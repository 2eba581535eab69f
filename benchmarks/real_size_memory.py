"""Peak memory of one training iteration at real size, with and without each memory switch.

The models have the real architectures and sizes, with random weights built here and saved in
the real formats (the Hub is not needed): a Stable-Diffusion-1.5 pipeline (860 M-parameter UNet,
512 px), an LCM-Dreamshaper-v7-layout pipeline (the same UNet with a guidance embedding), and a
0.5 B causal LM with Qwen2-0.5B's shape. Each variant is one ``polyrl train`` run of one
iteration in its own process; its peak resident memory (``ru_maxrss`` of that process) is the
number reported. The work per iteration is deliberately small (one 512 px sample of one
denoising step with DDPO's classifier-free guidance for SD-1.5, of two consistency steps for the
LCM, the fewest its sampler accepts; 8 completions of 64 tokens for the LM, ``--new-tokens`` for longer ones) so that a CPU finishes it: the memory of the weights, the optimizer and one micro-batch's
activations is what the switches change, and it does not grow with the number of steps.

    python benchmarks/real_size_memory.py --families sd15 lcm lm --threads 2

Models are written once to ``--cache`` (about 10 GB) and reused. Each run's own output folder
(its checkpoint is as large as the model) is deleted as soon as its memory is read; pass
``--keep-runs`` to keep them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------------------ model folders
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=[320, 640, 1280, 1280],
                 down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
                 up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
                 cross_attention_dim=768, attention_head_dim=8)
SD15_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, sample_size=512, layers_per_block=2,
                block_out_channels=[128, 256, 512, 512],
                down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)
CLIP_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu")
SD_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                    clip_sample=False, set_alpha_to_one=False, steps_offset=1)
QWEN2_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                 tie_word_embeddings=True, rope_theta=1000000.0, rms_norm_eps=1e-6)


def build_sd(folder: Path, lcm: bool) -> None:
    """An SD-1.5 (or LCM-Dreamshaper-v7) layout pipeline with random weights, saved as diffusers does."""
    import torch
    from diffusers import (AutoencoderKL, DDIMScheduler, LatentConsistencyModelPipeline, LCMScheduler,
                           StableDiffusionPipeline, UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15_UNET, **({"time_cond_proj_dim": 256} if lcm else {}))
    vae = AutoencoderKL(**SD15_VAE)
    text = CLIPTextModel(CLIPTextConfig(**CLIP_TEXT))
    tokenizer = CLIPTokenizer.from_pretrained(ROOT / "assets" / "tiny-sd" / "tokenizer")
    if lcm:
        scheduler = LCMScheduler(**SD_SCHEDULER, original_inference_steps=50, timestep_scaling=10.0)
        pipe = LatentConsistencyModelPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                              scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                              requires_safety_checker=False)
    else:
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                       scheduler=DDIMScheduler(**SD_SCHEDULER), safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)


def build_lm(folder: Path) -> None:
    """A causal LM with Qwen2-0.5B's shape and random weights (GPT-2's tokenizer: ids stay in range)."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**QWEN2_05B))
    model.save_pretrained(folder, safe_serialization=True)
    AutoTokenizer.from_pretrained(ROOT / "assets" / "tiny-gpt2").save_pretrained(folder)


# ------------------------------------------------------------------------------ runs
def image_config(pretrained: str, lcm: bool, head: str) -> dict:
    sampler = ({"name": "lcm", "num_steps": 2, "guidance_scale": 8.0, "batch_size": 1} if lcm else
               {"name": "ddim", "num_steps": 1, "eta": 1.0, "guidance_scale": 5.0, "batch_size": 1})
    return {
        "run": {"iterations": 1, "prompts_per_iteration": 1, "samples_per_prompt": 1, "seed": 0, "report": False,
                "progress": False, "save_every": 100, "update_snapshot": "none"},
        "prompts": {"items": ["a photo of a cat"]},
        "policy": {"name": "lcm" if lcm else "diffusion", "pretrained": pretrained,
                   "lora_rank": 8 if lcm else 4, **({"lora_alpha": 8} if lcm else {})},
        "sampler": sampler,
        "rewards": {"aesthetic": {"weight": 1.0, "model": "ViT-L-14", "pretrained": None, "head": head}},
        "update": {"name": "ddpo", "train_batch_size": 1, "gradient_accumulation_batches": 1},
        "optimizer": {"lr": 3e-4},
    }


def text_config(pretrained: str, new_tokens: int = 64, iterations: int = 1) -> dict:
    return {
        "run": {"iterations": iterations, "prompts_per_iteration": 2, "samples_per_prompt": 4, "seed": 0, "report": False,
                "progress": False, "save_every": 100, "update_snapshot": "none"},
        "prompts": {"items": ["Once upon a time", "The weather today"]},
        "policy": {"name": "causal_lm", "pretrained": pretrained, "lora_rank": 0},
        "sampler": {"name": "generate", "max_new_tokens": new_tokens, "stop_at_eos": False, "batch_size": 8},
        "rewards": {"length_penalty": {"weight": 1.0, "target": 32}},
        "update": {"name": "grpo", "beta": 0.04, "train_batch_size": 8, "gradient_accumulation_batches": 1},
        "optimizer": {"lr": 1e-6},
    }


IMAGE_VARIANTS = [
    ("baseline (float32 everywhere)", []),
    ("frozen VAE and text encoder in bf16 (`policy.frozen_dtype: bfloat16`)", ["policy.frozen_dtype=bfloat16"]),
    ("UNet base weights in bf16 (`policy.torch_dtype: bfloat16`, `run.mixed_precision: bf16`)",
     ["policy.torch_dtype=bfloat16", "run.mixed_precision=bf16"]),
    ("gradient checkpointing (`policy.gradient_checkpointing: true`)", ["policy.gradient_checkpointing=true"]),
    ("VAE decode one image at a time (`policy.vae_decode_batch_size: 1`)", ["policy.vae_decode_batch_size=1"]),
    ("aesthetic CLIP in bf16 (`rewards.aesthetic.dtype: bfloat16`)", ["rewards.aesthetic.dtype=bfloat16"]),
    ("all of the above", ["policy.torch_dtype=bfloat16", "run.mixed_precision=bf16", "policy.gradient_checkpointing=true",
                          "policy.vae_decode_batch_size=1", "rewards.aesthetic.dtype=bfloat16"]),
]

TEXT_VARIANTS = [
    ("baseline (float32, AdamW, reference copy for the KL, log-probs in chunks of 512 tokens)", []),
    ("log-probs through one float32 [B, T, vocab] log-softmax (`policy.log_prob_chunk_tokens: 0`)",
     ["policy.log_prob_chunk_tokens=0"]),
    ("no KL, so no reference copy (`update.beta: 0`)", ["update.beta=0"]),
    ("8-bit AdamW moments (`optimizer.implementation: 8bit`)", ["optimizer.implementation=8bit"]),
    ("gradient checkpointing (`policy.gradient_checkpointing: true`)", ["policy.gradient_checkpointing=true"]),
    ("bf16 compute (`run.mixed_precision: bf16`), reference copy in bf16 (`policy.torch_dtype: bfloat16`)",
     ["run.mixed_precision=bf16", "policy.torch_dtype=bfloat16"]),
    ("all of the above but the KL", ["optimizer.implementation=8bit", "policy.gradient_checkpointing=true",
                                     "run.mixed_precision=bf16", "policy.torch_dtype=bfloat16"]),
    ("the LM head in chunks (`policy.chunk_lm_head: true`)", ["policy.chunk_lm_head=true"]),
    ("all of the above but the KL, with the LM head in chunks",
     ["optimizer.implementation=8bit", "policy.gradient_checkpointing=true", "run.mixed_precision=bf16",
      "policy.torch_dtype=bfloat16", "policy.chunk_lm_head=true"]),
]


def run_variant(config: dict, overrides: list[str], threads: int, workdir: Path, keep: bool = False) -> dict:
    """One ``polyrl train`` of the config in a fresh process: its peak RSS (GB), seconds, exit code.

    The run's folder is deleted afterwards unless ``keep``: at real size every run saves a checkpoint
    of gigabytes, and a full table would otherwise leave tens of gigabytes behind."""
    out = Path(tempfile.mkdtemp(prefix="run-", dir=workdir))
    cfg = dict(config, run=dict(config["run"], output_dir=str(out / "run"), threads=threads))
    path = out / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "polyrl.cli", "train", str(path), *overrides]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), CUDA_VISIBLE_DEVICES="")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        print(output[-3000:], file=sys.stderr)
    if not keep:
        shutil.rmtree(out, ignore_errors=True)
    return {"peak_rss_gb": usage.ru_maxrss / 1024**2, "seconds": seconds, "exit": code}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--families", nargs="+", default=["sd15", "lcm", "lm"], choices=["sd15", "lcm", "lm"])
    ap.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "polyrl-real-size"))
    ap.add_argument("--head", default=str(ROOT.parent / "shared" / "assets" / "sac+logos+ava1-l14-linearMSE.pth"),
                    help="the LAION aesthetic head (.pth) the image runs score with")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=64, help="tokens per completion of the LM runs (8 completions)")
    ap.add_argument("--lm-iterations", type=int, default=1,
                    help="iterations of the LM runs; from the second on, the optimizer's state exists during the "
                         "backward pass, so that activations add to the peak")
    ap.add_argument("--only", nargs="*", type=int, default=None, help="indices of the variants to run")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--keep-runs", action="store_true", help="keep each run's output folder (checkpoints included)")
    args = ap.parse_args()
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    results = []
    for family in args.families:
        folder = cache / family
        if not (folder / ("config.json" if family == "lm" else "model_index.json")).is_file():
            print(f"building the {family} model in {folder} ...", file=sys.stderr, flush=True)
            build_lm(folder) if family == "lm" else build_sd(folder, lcm=family == "lcm")
        config = text_config(str(folder), args.new_tokens, args.lm_iterations) if family == "lm" else image_config(str(folder), family == "lcm", args.head)
        variants = TEXT_VARIANTS if family == "lm" else IMAGE_VARIANTS
        for i, (name, overrides) in enumerate(variants):
            if args.only is not None and i not in args.only:
                continue
            r = run_variant(config, overrides, args.threads, cache, keep=args.keep_runs)
            r.update(family=family if family != "lm" else
                     f"lm, 8 x {args.new_tokens} tokens, {args.lm_iterations} iteration(s)", variant=name,
                     overrides=overrides)
            results.append(r)
            print(f"{family:5s} | {name} | {r['peak_rss_gb']:.2f} GB | {r['seconds']:.0f} s | exit {r['exit']}", flush=True)
    print("\n| model | variant | peak RSS (GB) | seconds |\n|---|---|---:|---:|")
    for r in results:
        status = "" if r["exit"] == 0 else f" (exit {r['exit']})"
        print(f"| {r['family']} | {r['variant']} | {r['peak_rss_gb']:.2f}{status} | {r['seconds']:.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
