"""RLCM vs DDPO on the tiny image world: reward gain per CPU second, each at its own tuned learning rate.

    python benchmarks/rlcm_vs_ddpo.py [--reward incompressibility] [--budget 100] [--target 0.1]
                                      [--lrs 3e-3 1e-2 3e-2 0.1 0.3 1] [--seeds 0 1 2] [--out DIR] [--json FILE]

The two methods train on the same task: ``configs/rlcm_tiny_<reward>.yaml`` (the tiny LCM, 4
consistency steps) and ``configs/ddpo_tiny_<reward>.yaml`` (the tiny SD it was distilled from, 20
DDIM steps with classifier-free guidance), the same 8 captions, the same reward and the same number
of samples (reward queries) per iteration; each keeps its own config's model, sampler and update
settings. Only the learning rate is changed, and the same way for both:

1. **sweep**: one run per learning rate in ``--lrs`` on the first seed; the rate with the largest
   area under the reward-gain curve (below) is the method's tuned rate. A run that stops on a
   non-finite gradient (diverges) cannot be chosen; it is reported as such.
2. **seeds**: the tuned rate on every seed in ``--seeds`` (the sweep's run of the first seed is
   reused).

Every run trains in its own process, one at a time, with one thread (``OMP_NUM_THREADS=1``,
``torch.set_num_threads(1)``), and is timed in **CPU seconds** of that process
(``time.process_time()``, counted from after model loading, over whole iterations: sampling,
reward, update and logging), which other jobs on the machine do not inflate the way they inflate
wall-clock time. A run stops at the end of the first iteration that takes it past ``--budget`` CPU
seconds: both methods get the same budget, not the same number of iterations.

Measures, from each run's rewards (the mean over the iteration's samples, drawn before its update):

* **gain**: the reward minus the method's base reward, the mean reward of iteration 1 (the base
  model's samples, before any update) over the seeds;
* **mean gain over the budget** (the normalised area under the gain-vs-CPU-time curve): the gain
  of iteration ``i`` held from the end of iteration ``i - 1`` to the end of iteration ``i``,
  integrated over ``[0, budget]`` and divided by ``budget``;
* **time to target**: CPU seconds and reward queries until the gain, averaged over the last 3
  iterations (96 samples for both methods), first reaches ``--target`` (a fixed gain, chosen
  before the runs), or "not reached" within the budget.

It prints the sweep and a markdown table with each measure's median and range (min-max) over the
seeds. ``--out`` keeps the runs and reuses the finished ones found there.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from polyrl import hookimpl
from polyrl.config import apply_overrides, load_yaml
from polyrl.host import Host
from polyrl.loop import train

ROOT = Path(__file__).resolve().parent.parent
METHODS = {"RLCM (tiny LCM, 4 steps)": "configs/rlcm_tiny_{reward}.yaml",
           "DDPO (tiny SD, 20 DDIM steps)": "configs/ddpo_tiny_{reward}.yaml"}
WINDOW = 3  # iterations averaged for the time to target (3 x 32 samples for both methods)


# ---------------------------------------------------------------------------- fixed-iteration runs
# (shared with benchmarks/flow_vs_rlcm_ddpo.py: wall-clock phase times, gain over each run's own start)


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


# ---------------------------------------------------------------------------- timed runs


class BudgetSpent(Exception):
    """Raised after the iteration that took the run past its CPU-time budget."""


class CpuClock:
    """Plugin recording the process's CPU seconds since the run's start at every iteration's end,
    and stopping the run once they pass the budget."""

    def __init__(self, budget: float) -> None:
        self.budget, self.t0, self.rows = budget, 0.0, []

    @hookimpl
    def polyrl_run_start(self, trainer) -> None:  # noqa: ARG002
        self.t0 = time.process_time()  # models are loaded: their loading is not counted

    @hookimpl
    def polyrl_iteration_end(self, trainer, iteration, metrics, rollout) -> None:  # noqa: ARG002
        cpu = time.process_time() - self.t0
        self.rows.append({"iteration": iteration, "cpu_s": cpu, "reward_mean": metrics["reward_mean"]})
        if cpu >= self.budget:
            raise BudgetSpent(f"{cpu:.1f} CPU s after iteration {iteration}")


def one_run(spec: dict) -> None:
    """Train one configuration in this process until the CPU budget is spent; write ``cpu.json``."""
    from polyrl.errors import NonFiniteError

    torch.set_num_threads(spec["threads"])
    out = Path(spec["out"])
    cap = spec["max_iterations"]
    data = apply_overrides(load_yaml(ROOT / spec["config"]), [
        f"run.iterations={cap}", f"run.output_dir={out}", f"run.seed={spec['seed']}", "run.progress=false",
        "run.report=false", f"run.save_every={cap}", f"optimizer.lr={spec['lr']}", *spec["extra"],
    ])
    host = Host()
    clock = CpuClock(spec["budget"])
    host.register(clock, "cpu-clock")
    cfg = host.build_config(data)
    status = "iteration cap"
    try:
        train(cfg, host)
    except BudgetSpent:
        status = "budget"
    except NonFiniteError as e:
        status = f"diverged: {e}".split(". ")[0]
    result = {**spec, "status": status, "samples": cfg.run.batch_size, "rows": clock.rows}
    (out / "cpu.json").write_text(json.dumps(result, indent=1))


def timed_run(config: str, seed: int, lr: float, budget: float, out: Path, threads: int = 1,
              max_iterations: int = 2000, extra: list[str] | None = None) -> dict:
    """One run in a fresh single-threaded process (or the finished one already in ``out``)."""
    spec = {"config": config, "seed": seed, "lr": lr, "budget": budget, "out": str(out), "threads": threads,
            "max_iterations": max_iterations, "extra": extra or []}
    done = out / "cpu.json"
    if done.is_file():
        result = json.loads(done.read_text())
        if all(result.get(k) == v for k, v in spec.items() if k != "out"):
            return result
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    with open(out / "log.txt", "w") as log:
        proc = subprocess.run([sys.executable, __file__, "--one-run", json.dumps(spec)], env=env,
                              stdout=log, stderr=subprocess.STDOUT, check=False)
    if proc.returncode != 0 or not done.is_file():
        raise RuntimeError(f"the run of {config} at lr {lr}, seed {seed} failed (exit {proc.returncode}); "
                           f"see {out / 'log.txt'}")
    return json.loads(done.read_text())


def mean_gain(result: dict, base: float, budget: float) -> float:
    """The area under the gain-vs-CPU-time step curve over ``[0, budget]``, divided by ``budget``.
    A diverged run holds its last gain for the rest of the budget."""
    area, before = 0.0, 0.0
    for r in result["rows"]:
        end = min(r["cpu_s"], budget)
        area += (r["reward_mean"] - base) * max(0.0, end - before)
        before = end
    if before < budget and result["rows"]:
        area += (result["rows"][-1]["reward_mean"] - base) * (budget - before)
    return area / budget


def windowed_gains(result: dict, base: float, window: int = WINDOW) -> list[float]:
    vals = [r["reward_mean"] - base for r in result["rows"]]
    return [sum(vals[max(0, i - window + 1) : i + 1]) / len(vals[max(0, i - window + 1) : i + 1])
            for i in range(len(vals))]


def to_target(result: dict, base: float, target: float, budget: float) -> dict | None:
    """CPU seconds, reward queries and iterations until the windowed gain first reaches ``target``
    (the first ``window - 1`` iterations, whose window is incomplete, do not count)."""
    for i, (r, g) in enumerate(zip(result["rows"], windowed_gains(result, base))):
        if i + 1 >= WINDOW and g >= target and r["cpu_s"] <= budget:
            return {"cpu_s": r["cpu_s"], "queries": (i + 1) * result["samples"], "iterations": i + 1}
    return None


def spread(values: list[float], fmt: str) -> str:
    """``median [min–max]``."""
    if not values:
        return "–"
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{format(statistics.median(values), fmt)} [{format(min(values), fmt)}–{format(max(values), fmt)}]"


def censored_median(values: list[float | None], fmt: str) -> str:
    """Median and range where a run that did not reach the target counts as ``> budget``."""
    n = len(values)
    reached = sorted(v for v in values if v is not None)
    if not reached:
        return f"not reached ({n} of {n})"
    key = sorted(values, key=lambda v: math.inf if v is None else v)
    med = key[(n - 1) // 2] if n % 2 else None
    if n % 2 == 0:
        a, b = key[n // 2 - 1], key[n // 2]
        med = None if b is None else (a + b) / 2
    text = "not reached" if med is None else format(med, fmt)
    hi = "not reached" if len(reached) < n else format(reached[-1], fmt)
    return f"{text} [{format(reached[0], fmt)}–{hi}]" + (f" ({n - len(reached)} of {n} not reached)"
                                                        if len(reached) < n else "")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reward", default="incompressibility", choices=["clip_score", "compressibility", "incompressibility"])
    parser.add_argument("--budget", type=float, default=100.0, help="CPU seconds per run, the same for both methods")
    parser.add_argument("--target", type=float, default=0.1, help="the fixed reward gain to reach (in the reward's "
                        "units; 0.1 kB for incompressibility)")
    parser.add_argument("--lrs", type=float, nargs="+", default=[3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0],
                        help="learning rates swept")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="the first one is the sweep's")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), help="a subset of the method labels")
    parser.add_argument("--threads", type=int, default=1, help="torch and OpenMP threads of each run (1: the "
                        "measure reported)")
    parser.add_argument("--max-iterations", type=int, default=2000, help="stop a run here if the budget is not spent")
    parser.add_argument("--out", default="", help="keep the runs here, and reuse the finished ones found there "
                        "(default: a temporary folder)")
    parser.add_argument("--json", default="", help="also write the results here")
    parser.add_argument("--one-run", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one_run:
        one_run(json.loads(args.one_run))
        return {}
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    torch.set_num_threads(1)

    def go(base_dir: Path, label: str, lr: float, seed: int) -> dict:
        config = METHODS[label].format(reward=args.reward)
        out = base_dir / f"{Path(config).stem}-lr{lr:g}-seed{seed}-budget{args.budget:g}"
        t = time.perf_counter()
        r = timed_run(config, seed, lr, args.budget, out, args.threads, args.max_iterations)
        last = r["rows"][-1] if r["rows"] else {"iteration": 0, "cpu_s": 0.0}
        print(f"  {label}, lr {lr:g}, seed {seed}: {last['iteration']} iterations, {last['cpu_s']:.0f} CPU s "
              f"({r['status']}; {time.perf_counter() - t:.0f} s wall)", flush=True)
        return r

    results: dict = {"reward": args.reward, "budget_cpu_s": args.budget, "target": args.target, "lrs": args.lrs,
                     "seeds": args.seeds, "methods": {}}
    with tempfile.TemporaryDirectory() as tmp:
        base_dir = Path(args.out) if args.out else Path(tmp)
        for label in args.methods:
            sweep = {lr: go(base_dir, label, lr, args.seeds[0]) for lr in args.lrs}
            # iteration 1 is the base model's samples: the same at every rate of one seed
            base0 = sweep[args.lrs[0]]["rows"][0]["reward_mean"]
            scores = {lr: mean_gain(r, base0, args.budget) for lr, r in sweep.items()}
            ok = [lr for lr in args.lrs if not sweep[lr]["status"].startswith("diverged")]
            if not ok:
                raise SystemExit(f"{label}: every learning rate in {args.lrs} diverged")
            best = max(ok, key=lambda lr: scores[lr])
            runs = [sweep[best]] + [go(base_dir, label, best, s) for s in args.seeds[1:]]
            base = statistics.fmean(r["rows"][0]["reward_mean"] for r in runs)
            results["methods"][label] = {
                "config": METHODS[label].format(reward=args.reward), "tuned_lr": best, "base_reward": base,
                "sweep": {f"{lr:g}": {"mean_gain": mean_gain(r, base, args.budget), "status": r["status"],
                                      "iterations": len(r["rows"]),
                                      "last_gain": windowed_gains(r, base)[-1] if r["rows"] else None}
                          for lr, r in sweep.items()},
                "per_seed": [{"seed": s, "mean_gain": mean_gain(r, base, args.budget),
                              "last_gain": windowed_gains(r, base)[-1], "iterations": len(r["rows"]),
                              "cpu_s_per_iteration": r["rows"][-1]["cpu_s"] / len(r["rows"]),
                              "to_target": to_target(r, base, args.target, args.budget), "status": r["status"]}
                             for s, r in zip(args.seeds, runs)],
            }

    print(f"\nLearning-rate sweep (seed {args.seeds[0]}, {args.budget:g} CPU s per run): mean gain over the budget")
    print("| method | learning rate | mean gain over the budget | gain at the end (last 3 iterations) | iterations | run |")
    print("|---|---:|---:|---:|---:|---|")
    for label, m in results["methods"].items():
        for lr, s in m["sweep"].items():
            mark = " (tuned)" if float(lr) == m["tuned_lr"] else ""
            print(f"| {label} | {lr}{mark} | {s['mean_gain']:+.4f} | {s['last_gain']:+.4f} | {s['iterations']} | "
                  f"{s['status'].split(' (')[0]} |")

    n = len(args.seeds)
    print(f"\nRLCM vs DDPO on the tiny world, reward {args.reward}, {args.budget:g} CPU s per run, each at its tuned "
          f"learning rate, seeds {args.seeds}: median [min–max] over the {n} seeds")
    print(f"| method | tuned lr | base reward | mean gain over {args.budget:g} CPU s | gain at the end | "
          f"CPU s to +{args.target:g} | reward queries to +{args.target:g} | iterations in budget | CPU s / iteration |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for label, m in results["methods"].items():
        ps = m["per_seed"]
        hit = [p["to_target"] for p in ps]
        m["median"] = {
            "mean_gain": statistics.median(p["mean_gain"] for p in ps),
            "last_gain": statistics.median(p["last_gain"] for p in ps),
            "cpu_s_per_iteration": statistics.median(p["cpu_s_per_iteration"] for p in ps),
        }
        print(f"| {label} | {m['tuned_lr']:g} | {m['base_reward']:.4f} | {spread([p['mean_gain'] for p in ps], '+.4f')} | "
              f"{spread([p['last_gain'] for p in ps], '+.4f')} | "
              f"{censored_median([h and h['cpu_s'] for h in hit], '.1f')} | "
              f"{censored_median([h and h['queries'] for h in hit], '.0f')} | "
              f"{spread([p['iterations'] for p in ps], '.0f')} | {spread([p['cpu_s_per_iteration'] for p in ps], '.2f')} |")
    labels = list(results["methods"])
    if len(labels) == 2:
        a, b = (results["methods"][k]["median"]["mean_gain"] for k in labels)
        if b > 0:
            results["ratio_mean_gain"] = a / b
            print(f"\n{labels[0]} / {labels[1]}, median mean gain over the budget: {a / b:.1f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
