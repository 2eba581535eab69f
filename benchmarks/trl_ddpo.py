"""polyrl's ``ddpo`` next to TRL 0.23.1's DDPOTrainer on identical work: CPU seconds per iteration.

Both sides train the tiny SD (``assets/tiny-sd``) through a LoRA (r 4, alpha 4, gaussian init, on
``to_q/to_k/to_v/to_out.0``, TRL's fixed adapter) on the same 8 captions (4 samples each: 32
samples per iteration), the same reward (JPEG compressibility, ``-kB`` at quality 95: polyrl's
``jpeg_size_kb``, called by both), DDIM with eta 1 and guidance 5 (guided in training too),
micro-batches of 16, one inner epoch, every step trained, clip 1e-4, advantages clipped at 10,
per-prompt reward tracking (buffer 32, min count 16), AdamW (lr 1e-2, weight decay 1e-4, eps 1e-8)
and gradient clipping at 5, float32, one optimizer step per micro-batch (its steps accumulated).

Each side runs in its own single-threaded process (``OMP_NUM_THREADS=1``, ``torch.set_num_threads(1)``)
for ``--iterations`` iterations; the first one (warm-up) is dropped and the others are timed with
``time.process_time()`` around the iteration only (model loading excluded). A forward pre-hook on
the UNet counts its calls and the rows it sees, with and without gradients, so the table shows that
both sides did the same passes. The runs alternate (polyrl first in even pairs, TRL first in odd
ones) to spread drift in the machine's speed evenly.

TRL 0.23.1 is the last TRL with DDPO; install it beside polyrl in a separate environment::

    python -m venv .venv-trl023 && .venv-trl023/bin/pip install -c scripts/constraints.txt trl==0.23.1 -e .

Usage::

    .venv-trl023/bin/python benchmarks/trl_ddpo.py [--pairs 5] [--iterations 3] [--steps 20]
        [--steps-per-call 1] [--markdown docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from peer import (REPO, interleaved_pairs, launch_side, mean_over, median_range, pair_arguments, parse_pair_args,
                  per_run, write_block)
CAPTIONS = ["a red circle on the right", "a red triangle at the top", "a green square on the left",
            "a green star at the bottom", "a blue triangle on the left", "a yellow circle at the bottom",
            "a yellow star on the left", "a purple square at the bottom"]
MARK_BEGIN, MARK_END = "<!-- trl-ddpo-benchmark:begin -->", "<!-- trl-ddpo-benchmark:end -->"


class UNetCounter:
    """Counts a UNet's forward calls and rows, split by whether autograd records them, and the CPU
    seconds spent in its forward passes and in backward passes (the UNet's; the loss's few ops are
    in it too): the model work that both sides must do."""

    def __init__(self, unet) -> None:
        import torch

        self.reset()
        self._t0 = 0.0
        unet.register_forward_pre_hook(self._pre, with_kwargs=True)
        unet.register_forward_hook(self._post)
        backward = torch.autograd.backward

        def timed_backward(*args, **kwargs):
            t0 = time.process_time()
            try:
                return backward(*args, **kwargs)
            finally:
                self.counts["backward_s"] += time.process_time() - t0

        torch.autograd.backward = timed_backward

    def reset(self) -> None:
        self.counts = {"sample_calls": 0, "sample_rows": 0, "train_calls": 0, "train_rows": 0,
                       "sample_forward_s": 0.0, "train_forward_s": 0.0, "backward_s": 0.0}

    @staticmethod
    def _kind() -> str:
        import torch

        return "train" if torch.is_grad_enabled() else "sample"

    def _pre(self, module, args, kwargs):
        x = args[0] if args else kwargs["sample"]
        self.counts[f"{self._kind()}_calls"] += 1
        self.counts[f"{self._kind()}_rows"] += int(x.shape[0])
        self._t0 = time.process_time()

    def _post(self, module, args, output):
        self.counts[f"{self._kind()}_forward_s"] += time.process_time() - self._t0


def reward_kb(images):
    """``-kB`` of each image as JPEG at quality 95 (the reward of both sides)."""
    from polyrl.rewards.jpeg import jpeg_size_kb

    return -jpeg_size_kb(images)


# ------------------------------------------------------------------------------ polyrl
def run_polyrl(args, out: Path) -> dict:
    from polyrl import hookimpl
    from polyrl.host import Host
    from polyrl.loop import train

    rows: list[dict] = []

    class Probe:
        counter: UNetCounter | None = None
        t0 = 0.0

        @hookimpl
        def polyrl_run_start(self, trainer):
            self.counter = UNetCounter(trainer.policy.unet)

        @hookimpl
        def polyrl_iteration_start(self, trainer, iteration):
            self.counter.reset()
            self.t0 = time.process_time()

        @hookimpl
        def polyrl_iteration_end(self, trainer, iteration, metrics, rollout):
            rows.append({"cpu_s": time.process_time() - self.t0, **self.counter.counts,
                         "reward": metrics["reward_mean"]})

    host = Host()
    host.register(Probe(), "bench_probe")
    data = {
        "run": {"iterations": args.iterations, "prompts_per_iteration": len(CAPTIONS),
                "samples_per_prompt": args.samples // len(CAPTIONS), "seed": args.seed, "output_dir": str(out),
                "progress": False, "report": False, "save_every": 10**6, "threads": 1},
        "prompts": {"items": CAPTIONS},
        "policy": {"name": "diffusion", "pretrained": str(REPO / "assets" / "tiny-sd"), "lora_rank": 4,
                   "lora_alpha": 4},
        "sampler": {"name": "ddim", "num_steps": args.steps, "eta": 1.0, "guidance_scale": 5.0,
                    "batch_size": args.samples},
        "rewards": {"jpeg_compressibility": {"weight": 1.0}},
        "update": {"name": "ddpo", "train_batch_size": args.train_batch, "gradient_accumulation_batches": 1,
                   "inner_epochs": 1, "clip_range": 1e-4, "adv_clip_max": 10.0, "tracker_buffer_size": 32,
                   "tracker_min_count": 16, "steps_per_call": args.steps_per_call},
        "optimizer": {"lr": 1e-2, "weight_decay": 1e-4, "eps": 1e-8, "max_grad_norm": 5.0},
    }
    train(host.build_config(data), host)
    return {"iterations": rows}


# ------------------------------------------------------------------------------ TRL
def run_trl(args, out: Path) -> dict:
    import itertools

    from accelerate import PartialState
    from trl import DDPOConfig, DDPOTrainer, DefaultDDPOStableDiffusionPipeline

    per_prompt = args.samples // len(CAPTIONS)
    order = itertools.cycle([c for c in CAPTIONS for _ in range(per_prompt)])  # 4 samples of each caption

    def prompt_fn():
        return next(order), {}

    def reward_fn(images, prompts, metadata):
        return reward_kb(images), {}

    config = DDPOConfig(
        num_epochs=args.iterations, seed=args.seed, log_with=None, logdir=str(out), save_freq=10**6,
        project_kwargs={"project_dir": str(out)}, mixed_precision="no", allow_tf32=False,
        sample_num_steps=args.steps, sample_eta=1.0, sample_guidance_scale=5.0, sample_batch_size=args.samples,
        sample_num_batches_per_epoch=1, train_batch_size=args.train_batch, train_gradient_accumulation_steps=1,
        train_num_inner_epochs=1, train_cfg=True, train_adv_clip_max=10.0, train_clip_range=1e-4,
        train_timestep_fraction=1.0, train_learning_rate=1e-2, train_adam_beta1=0.9, train_adam_beta2=0.999,
        train_adam_weight_decay=1e-4, train_adam_epsilon=1e-8, train_max_grad_norm=5.0,
        per_prompt_stat_tracking=True, per_prompt_stat_tracking_buffer_size=32,
        per_prompt_stat_tracking_min_count=16, async_reward_computation=False,
    )
    PartialState()  # the pipeline logs through accelerate (no LoRA weights in the folder) before the trainer starts
    pipeline = DefaultDDPOStableDiffusionPipeline(str(REPO / "assets" / "tiny-sd"), use_lora=True)
    trainer = DDPOTrainer(config, reward_fn, prompt_fn, pipeline)
    counter = UNetCounter(pipeline.unet)
    rows = []
    global_step = 0
    for epoch in range(args.iterations):
        counter.reset()
        rewards: list[float] = []
        hook = trainer.accelerator.log
        trainer.accelerator.log = lambda values, step=None, **kw: (  # read the iteration's reward mean
            rewards.append(float(values["reward_mean"])) if "reward_mean" in values else None)
        t0 = time.process_time()
        global_step = trainer.step(epoch, global_step)
        cpu = time.process_time() - t0
        trainer.accelerator.log = hook
        rows.append({"cpu_s": cpu, **counter.counts, "reward": rewards[0] if rewards else float("nan")})
    return {"iterations": rows}


# ------------------------------------------------------------------------------ driver
def one_side(args) -> None:
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        result = (run_polyrl if args.side == "polyrl" else run_trl)(args, Path(tmp) / args.side)
    Path(args.result).write_text(json.dumps(result))


def launch(args, side: str, result: Path) -> dict:
    return launch_side(__file__, side, result, [
        "--iterations", str(args.iterations), "--steps", str(args.steps), "--samples", str(args.samples),
        "--train-batch", str(args.train_batch), "--steps-per-call", str(args.steps_per_call), "--seed", str(args.seed)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    pair_arguments(ap, iterations=3)
    ap.add_argument("--steps", type=int, default=20, help="DDIM steps per sample")
    ap.add_argument("--samples", type=int, default=32, help="samples per iteration (a multiple of 8 captions)")
    ap.add_argument("--train-batch", type=int, default=16, help="samples per micro-batch")
    ap.add_argument("--steps-per-call", type=int, default=1,
                    help="polyrl's update.steps_per_call (1: one UNet call per step and micro-batch, as TRL)")
    args = parse_pair_args(ap)
    if args.samples % len(CAPTIONS) or args.samples % args.train_batch:
        sys.exit(f"--samples {args.samples} must be a multiple of {len(CAPTIONS)} and of --train-batch")
    if args.side:
        return one_side(args)
    try:
        import trl
        from trl import DDPOTrainer  # noqa: F401
    except ImportError:
        sys.exit("this environment has no TRL with DDPOTrainer (TRL <= 0.23.1; see the docstring)")
    import diffusers
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        pairs = interleaved_pairs(args.pairs, lambda s, i: launch(args, s, Path(tmp) / f"{s}{i}.json"), digits=2)

    ours, theirs = per_run(pairs, "polyrl"), per_run(pairs, "trl")
    ratios = [t / o for o, t in zip(ours, theirs)]
    counts = {s: pairs[0][s]["iterations"][1] for s in ("polyrl", "trl")}
    same = all(p[s]["iterations"][k][c] == counts[s][c] for p in pairs for s in counts
               for k in range(1, args.iterations) for c in ("sample_calls", "sample_rows", "train_calls", "train_rows"))

    def mean(side: str, key: str) -> float:  # per iteration, over the timed iterations of every run
        return mean_over(pairs, side, key)

    def work(side: str) -> float:  # the UNet's forward and backward passes
        return sum(mean(side, k) for k in ("sample_forward_s", "train_forward_s", "backward_s"))

    def rest(side: str) -> float:
        return mean(side, "cpu_s") - work(side)

    def rng(xs: list[float], f: str = ".2f") -> str:
        return median_range(xs, f)

    lines = [
        f"DDPO on the tiny SD: {args.samples} samples x {args.steps} DDIM steps (eta 1, guidance 5), micro-batches of "
        f"{args.train_batch}, 1 inner epoch, LoRA r4; polyrl `steps_per_call` {args.steps_per_call}; "
        f"{args.pairs} interleaved pairs of runs, {args.iterations - 1} timed iteration(s) each after a warm-up one; "
        f"CPU seconds of single-threaded processes (x86_64); torch {torch.__version__}, diffusers "
        f"{diffusers.__version__}, TRL {trl.__version__}.",
        "",
        "| per iteration | polyrl `ddpo` | TRL `DDPOTrainer` |",
        "|---|---|---|",
        f"| UNet calls / rows, sampling (no grad) | {counts['polyrl']['sample_calls']} / {counts['polyrl']['sample_rows']} "
        f"| {counts['trl']['sample_calls']} / {counts['trl']['sample_rows']} |",
        f"| UNet calls / rows, training (with grad) | {counts['polyrl']['train_calls']} / {counts['polyrl']['train_rows']} "
        f"| {counts['trl']['train_calls']} / {counts['trl']['train_rows']} |",
        f"| CPU s per iteration, median (range) of {args.pairs} | {rng(ours)} | {rng(theirs)} |",
        f"| of which UNet forward, sampling (s) | {mean('polyrl', 'sample_forward_s'):.2f} "
        f"| {mean('trl', 'sample_forward_s'):.2f} |",
        f"| of which UNet forward, training (s) | {mean('polyrl', 'train_forward_s'):.2f} "
        f"| {mean('trl', 'train_forward_s'):.2f} |",
        f"| of which backward (s) | {mean('polyrl', 'backward_s'):.2f} | {mean('trl', 'backward_s'):.2f} |",
        f"| everything else (s): text encoder, VAE, reward, optimizer, bookkeeping | {rest('polyrl'):.2f} "
        f"| {rest('trl'):.2f} |",
        "",
        f"**Speed polyrl / TRL (TRL's CPU seconds over polyrl's, per pair): median {rng(ratios, '.3f')}.**"
        + ("" if same else " (The UNet counts differed between runs: see the raw results.)"),
        f"UNet passes are {100 * work('polyrl') / mean('polyrl', 'cpu_s'):.0f}% of polyrl's CPU time and "
        f"{100 * work('trl') / mean('trl', 'cpu_s'):.0f}% of TRL's: with the same passes, polyrl could be at most "
        f"{mean('trl', 'cpu_s') / work('polyrl'):.2f}x TRL's speed (TRL's time over polyrl's UNet work alone).",
    ]
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        write_block(args.markdown, MARK_BEGIN, MARK_END, text, "## Next to TRL's DDPOTrainer (`benchmarks/trl_ddpo.py`)")


if __name__ == "__main__":
    main()
