"""Flow-GRPO, Flow-GRPO-Fast, DiffusionNFT, RLCM and DDPO on the tiny image world, one reward.

    python benchmarks/flow_vs_rlcm_ddpo.py [--iterations 20] [--seeds 0 1 2] [--threads 1]

Every method trains on the same 8 captions with the same verifiable reward, ``shape_match`` (the
fraction of the caption's colour, shape and position that a pixel detector finds), the same number
of samples per iteration (8 captions x 8) and the same number of iterations, each with its own
model and its config's hyperparameters:

* Flow-GRPO: ``configs/flow_grpo_tiny_shape_match.yaml`` (the tiny flow model, 6 SDE steps);
* Flow-GRPO-Fast: ``configs/flow_grpo_fast_tiny_shape_match.yaml`` (a window of 2 SDE steps);
* DiffusionNFT: ``configs/diffusion_nft_tiny_shape_match.yaml`` (6 ODE steps, clean samples only);
* RLCM: ``configs/rlcm_tiny_clip_score.yaml`` (the tiny LCM, 4 steps, ``ddpo``) with the reward
  replaced by ``shape_match``;
* DDPO: ``configs/ddpo_tiny_clip_score.yaml`` (the tiny SD, 20 DDIM steps, guidance 5) likewise.

The base models differ, so, as in ``rlcm_vs_ddpo.py`` (whose measures this script reuses), the
comparison is to the same reward **gain** over each run's start (the mean of its first 3
iterations; curves smoothed over 3 iterations). Some methods do not gain at all in a short run, so
the target is a fixed gain (``--target``, +0.025 of the reward, i.e. about one attribute in 13
samples) rather than the smallest of the methods' gains; for each method: the iterations, reward
queries and wall-clock seconds (sample + reward + update) until its smoothed gain first reaches
the target, or "not reached". Medians over the seeds that reach it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("rlcm_vs_ddpo", ROOT / "benchmarks" / "rlcm_vs_ddpo.py")
_base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_base)
run, gains, cost_to, start, smoothed = _base.run, _base.gains, _base.cost_to, _base.start, _base.smoothed

SHAPE_MATCH = ["rewards={shape_match: {weight: 1.0}}"]
METHODS = {
    "Flow-GRPO (tiny flow, 6 SDE steps)": ("configs/flow_grpo_tiny_shape_match.yaml", []),
    "Flow-GRPO-Fast (tiny flow, 2-step SDE window)": ("configs/flow_grpo_fast_tiny_shape_match.yaml", []),
    "DiffusionNFT (tiny flow, 6 ODE steps)": ("configs/diffusion_nft_tiny_shape_match.yaml", []),
    "RLCM (tiny LCM, 4 steps)": ("configs/rlcm_tiny_clip_score.yaml", SHAPE_MATCH),
    "DDPO (tiny SD, 20 DDIM steps)": ("configs/ddpo_tiny_clip_score.yaml", SHAPE_MATCH),
}
COMMON = ["run.prompts_per_iteration=8", "run.samples_per_prompt=8"]


def run_or_reuse(config: str, iterations: int, seed: int, out: Path, extra: list[str]) -> list[dict]:
    """The rows of ``out/metrics.jsonl`` when a finished run of this config, seed and length is
    already there (``--out`` of an earlier call); otherwise train it."""
    from polyrl.config import apply_overrides, load_yaml

    done = out / "metrics.jsonl"
    if done.is_file():
        rows = [json.loads(line) for line in done.read_text().splitlines() if line.strip()]
        if len(rows) >= iterations:
            data = apply_overrides(load_yaml(ROOT / config), extra)
            batch = data["run"]["prompts_per_iteration"] * data["run"]["samples_per_prompt"]
            return [{**r, "samples": batch} for r in rows[:iterations]]
    return run(config, iterations, seed, out, extra)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--target", type=float, default=0.025, help="the reward gain to reach")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), help="a subset of the method labels")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--out", default="", help="keep the runs here, and reuse the finished ones found there "
                        "(default: a temporary folder)")
    parser.add_argument("--json", default="", help="also write the results here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = {k: METHODS[k] for k in args.methods}
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(args.out) if args.out else Path(tmp)
        runs = {label: [run_or_reuse(cfg, args.iterations, s, base / f"{Path(cfg).stem}-seed{s}", COMMON + extra)
                        for s in args.seeds] for label, (cfg, extra) in methods.items()}
    results: dict = {"reward": "shape_match", "iterations": args.iterations, "seeds": args.seeds, "runs": {}}
    per_seed: dict[str, list[dict]] = {label: [] for label in methods}
    for k, seed in enumerate(args.seeds):
        best = {label: max(gains(rows[k])) for label, rows in runs.items()}
        target = args.target
        for label, rows in runs.items():
            cost = cost_to(rows[k], target)
            per_seed[label].append({"target": target, "start": start(rows[k]), "end": smoothed(rows[k])[-1],
                                    "best_gain": best[label], **(cost or {})})
    print(f"\nThe tiny image world, reward shape_match, {args.iterations} iterations of 64 samples, seeds {args.seeds}")
    print("| method | reward: start -> last (smoothed) | best gain | target gain | reached | iterations to target | "
          "reward queries | wall-clock s | s / iteration |")
    print("|---|---|---|---|---|---:|---:|---:|---:|")
    for label, costs in per_seed.items():
        reached = [c for c in costs if "seconds" in c]
        med = {key: statistics.median(c[key] for c in costs) for key in ("start", "end", "best_gain", "target")}
        for key in ("iterations", "queries", "seconds"):
            med[key] = statistics.median(c[key] for c in reached) if reached else float("nan")
        results.setdefault("target", args.target)
        per_it = statistics.median(
            sum(r["time/sample"] + r["time/reward"] + r["time/update"] for r in rows) / len(rows) for rows in runs[label])
        results["runs"][label] = {"median": med, "per_seed": costs, "seconds_per_iteration": per_it,
                                  "reached": len(reached)}
        print(f"| {label} | {med['start']:.3f} -> {med['end']:.3f} | {med['best_gain']:+.3f} | +{med['target']:.3f} | "
              f"{len(reached)}/{len(costs)} | {med['iterations']:.0f} | {med['queries']:.0f} | {med['seconds']:.1f} | "
              f"{per_it:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return results


if __name__ == "__main__":
    main()
