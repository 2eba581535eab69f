"""RLCM vs DDPO on the tiny image world: wall-clock and reward queries to reach the same reward gain.

    python benchmarks/rlcm_vs_ddpo.py [--reward incompressibility] [--iterations 40] [--seeds 0]

Trains ``configs/rlcm_tiny_<reward>.yaml`` (the tiny LCM, 4 consistency steps) and
``configs/ddpo_tiny_<reward>.yaml`` (the tiny SD it was distilled from, 20 DDIM steps with
classifier-free guidance) one after the other in this process, with the same prompts, the same
reward, the same number of samples per iteration and update batching (the RLCM config's) and the
same update algorithm (``ddpo``, each with its paper's hyperparameters from its config), for
``--iterations`` each. Then, from each run's ``metrics.jsonl``:

* the reward curve is smoothed (mean of the last 3 iterations) and read as the **gain** over the
  run's own start (the mean reward of its first 3 iterations): the two base models differ (the
  tiny SD draws what its captions ask more often than its 4-step LCM twin), so equal gains, not
  equal rewards, are what both runs can reach;
* the **target** is the lower of the two runs' best smoothed gain, so that both reach it;
* for each run: iterations, reward queries (samples scored) and wall-clock seconds (sample +
  reward + update time, summed) until the smoothed gain first reaches the target.

It prints a markdown table with the ratio DDPO / RLCM of both costs. With ``--seeds 0 1 2`` the
costs are medians over seeds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch

from polyrl.config import apply_overrides, load_yaml
from polyrl.host import Host
from polyrl.loop import train

ROOT = Path(__file__).resolve().parent.parent


def run(config: str, iterations: int, seed: int, out: Path, extra: list[str]) -> list[dict]:
    data = apply_overrides(load_yaml(ROOT / config), [
        f"run.iterations={iterations}", f"run.output_dir={out}", f"run.seed={seed}", "run.progress=false",
        "run.report=false", f"run.save_every={iterations}", *extra,
    ])
    host = Host()
    cfg = host.build_config(data)
    train(cfg, host)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        r["samples"] = cfg.run.batch_size
    return rows


def smoothed(rows: list[dict], window: int = 3) -> list[float]:
    vals = [r["reward_mean"] for r in rows]
    return [sum(vals[max(0, i - window + 1) : i + 1]) / len(vals[max(0, i - window + 1) : i + 1]) for i in range(len(vals))]


def start(rows: list[dict], window: int = 3) -> float:
    """The run's starting reward: the mean over its first ``window`` iterations."""
    return sum(r["reward_mean"] for r in rows[:window]) / len(rows[:window])


def gains(rows: list[dict]) -> list[float]:
    """The smoothed reward minus the run's starting reward, per iteration."""
    return [v - start(rows) for v in smoothed(rows)]


def cost_to(rows: list[dict], target: float) -> dict | None:
    """Iterations, reward queries and seconds until the smoothed gain first reaches ``target``."""
    seconds = queries = 0.0
    for i, (r, s) in enumerate(zip(rows, gains(rows))):
        seconds += r["time/sample"] + r["time/reward"] + r["time/update"]
        queries += r["samples"]
        if s >= target:
            return {"iterations": i + 1, "queries": queries, "seconds": seconds}
    return None


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reward", default="incompressibility", choices=["clip_score", "compressibility", "incompressibility"])
    parser.add_argument("--iterations", type=int, default=40)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--out", default="", help="keep the runs here (default: a temporary folder)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    configs = {"RLCM (tiny LCM, 4 steps)": f"configs/rlcm_tiny_{args.reward}.yaml",
               "DDPO (tiny SD, 20 DDIM steps)": f"configs/ddpo_tiny_{args.reward}.yaml"}
    # the same samples per iteration and update batching for both (from the RLCM config)
    rl = load_yaml(ROOT / configs["RLCM (tiny LCM, 4 steps)"])
    same = [f"run.{k}={rl['run'][k]}" for k in ("prompts_per_iteration", "samples_per_prompt")]
    same += [f"update.{k}={rl['update'][k]}" for k in ("train_batch_size", "gradient_accumulation_batches")]
    extra = {"RLCM (tiny LCM, 4 steps)": [], "DDPO (tiny SD, 20 DDIM steps)": same + ["sampler.num_steps=20"]}
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(args.out) if args.out else Path(tmp)
        runs = {label: [run(cfg, args.iterations, s, base / f"{Path(cfg).stem}-seed{s}", extra[label]) for s in args.seeds]
                for label, cfg in configs.items()}
    results: dict = {"reward": args.reward, "iterations": args.iterations, "seeds": args.seeds, "runs": {}}
    per_seed_costs = {label: [] for label in configs}
    for k, seed in enumerate(args.seeds):
        target = min(max(gains(rows[k])) for rows in runs.values())
        for label, rows in runs.items():
            per_seed_costs[label].append(cost_to(rows[k], target) | {"target": target, "start": start(rows[k]),
                                                                      "end": smoothed(rows[k])[-1]})
    print(f"\nRLCM vs DDPO on the tiny world, reward {args.reward}, {args.iterations} iterations, seeds {args.seeds}")
    print("| method | reward: start -> last (smoothed) | target gain | iterations to target | reward queries | wall-clock s | s / iteration |")
    print("|---|---|---|---|---|---|---|")
    med = {}
    for label, costs in per_seed_costs.items():
        m = {key: statistics.median(c[key] for c in costs) for key in ("iterations", "queries", "seconds", "target", "start", "end")}
        per_it = statistics.median(
            sum(r["time/sample"] + r["time/reward"] + r["time/update"] for r in rows) / len(rows) for rows in runs[label])
        med[label] = m
        results["runs"][label] = {"median": m, "per_seed": costs, "seconds_per_iteration": per_it}
        print(f"| {label} | {m['start']:.4f} -> {m['end']:.4f} | +{m['target']:.4f} | {m['iterations']:.0f} | "
              f"{m['queries']:.0f} | {m['seconds']:.1f} | {per_it:.2f} |")
    (rl, dd) = (med[k] for k in configs)
    results["ratio_seconds"] = dd["seconds"] / rl["seconds"]
    results["ratio_queries"] = dd["queries"] / rl["queries"]
    print(f"\nDDPO / RLCM to the same reward gain: wall-clock {results['ratio_seconds']:.2f}x, "
          f"reward queries {results['ratio_queries']:.2f}x")
    return results


if __name__ == "__main__":
    main()
