"""Imitation results: SMILING, DAC and BC on Pendulum and HalfCheetah, normalised returns.

    python scripts/imitation_results.py                       # the whole grid, then the table
    python scripts/imitation_results.py --envs pendulum --seeds 0 --jobs 2
    python scripts/imitation_results.py --table-only          # rebuild the table from finished runs

For each environment the script (1) makes the expert and its demonstrations if they are missing
(``python -m polyrl.plugins.control.demos expert configs/sac_<env>.yaml``), (2) measures the
expert's and uniformly random actions' returns on the evaluation episodes, (3) trains every
(method, number of demonstration episodes, seed) with ``polyrl train configs/<method>_<env>.yaml``
(overriding only the seed, the output folder and the number of demonstration episodes), and (4)
evaluates each final policy on the same evaluation episodes (fixed seeds, mean action):

    normalised return = (return - random) / (expert - random)

Runs already finished under ``--runs`` are reused (an interrupted run is resumed), so the grid
can be built in several sittings. Each run's CPU time is measured on its own process. The table
goes to ``docs/imitation_results.md``; every run's numbers to ``--runs/<env>/<run>/result.json``.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
ENVS = {
    "pendulum": {"env_id": "Pendulum-v1", "name": "Pendulum-v1"},
    "halfcheetah": {"env_id": "HalfCheetah-v5", "name": "HalfCheetah-v5 (MuJoCo)"},
}
METHODS = {"smiling": "SMILING", "dac": "DAC", "bc": "BC"}
DEMO_KEY = {"smiling": "rewards.smiling.demo_episodes", "dac": "rewards.discriminator.demo_episodes",
            "bc": "update.demo_episodes"}
SEED_KEY = {"smiling": "rewards.smiling.seed", "dac": "rewards.discriminator.seed"}
EVAL_SEED = 2024


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def child_env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore")


def run_measured(cmd: list[str], log_path: Path) -> tuple[int, float, float]:
    """Run ``cmd``; returns (exit code, wall seconds, CPU seconds of that process and its children)."""
    start = time.perf_counter()
    with log_path.open("a") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=child_env())
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, time.perf_counter() - start, usage.ru_utime + usage.ru_stime


def config_of(env: str, method: str) -> Path:
    return ROOT / "configs" / f"{method}_{env}.yaml"


def demos_path(env: str) -> Path:
    data = yaml.safe_load(config_of(env, "smiling").read_text())
    return ROOT / data["rewards"]["smiling"]["demos"]


def expert_dir(env: str) -> Path:
    return ROOT / yaml.safe_load(config_of(env, "sac").read_text())["run"]["output_dir"]


def ensure_expert(env: str, runs: Path) -> dict:
    """Demonstrations (made if missing) and the reference returns of the expert and of random actions."""
    ref_path = runs / env / "reference.json"
    if ref_path.is_file():
        return json.loads(ref_path.read_text())
    demos = demos_path(env)
    (runs / env).mkdir(parents=True, exist_ok=True)
    cpu = wall = None
    if not demos.is_file():
        log(f"{env}: training the expert and writing {demos.relative_to(ROOT)}")
        code, wall, cpu = run_measured([sys.executable, "-m", "polyrl.plugins.control.demos", "expert",
                                        str(config_of(env, "sac")), "run.progress=false", "--out", str(demos)],
                                       runs / env / "expert.log")
        if code != 0:
            raise SystemExit(f"expert training failed; see {runs / env / 'expert.log'}")
    import numpy as np

    from polyrl.plugins.control.envs import evaluate, random_returns
    from polyrl.plugins.control.policy import GaussianPolicy

    expert = GaussianPolicy.from_pretrained(str(expert_dir(env) / "policy"))
    with np.load(demos, allow_pickle=False) as z:
        demo_returns = z["returns"].tolist()
        demo_lengths = z["episode_lengths"].tolist()
    expert_config = yaml.safe_load(config_of(env, "sac").read_text())
    ref = {
        "env_id": ENVS[env]["env_id"],
        "expert_eval_returns": evaluate(expert, args.eval_episodes, EVAL_SEED),
        "random_eval_returns": random_returns(ENVS[env]["env_id"], args.eval_episodes, EVAL_SEED),
        "demo_returns": demo_returns,
        "demo_steps": int(sum(demo_lengths)),
        "expert_env_steps": expert_env_steps(expert_config),
        "expert_cpu_s": cpu,
        "expert_wall_s": wall,
    }
    ref["expert"] = statistics.fmean(ref["expert_eval_returns"])
    ref["random"] = statistics.fmean(ref["random_eval_returns"])
    ref_path.write_text(json.dumps(ref, indent=2))
    return ref


def expert_env_steps(config: dict) -> int:
    from polyrl.plugins.control.envs import env_info

    horizon = env_info(config["policy"]["env"], config["sampler"].get("max_episode_steps", 0)).max_episode_steps
    run = config["run"]
    return run["iterations"] * run["prompts_per_iteration"] * run["samples_per_prompt"] * horizon


def run_one(env: str, method: str, n_demos: int, seed: int, runs: Path, ref: dict) -> dict:
    run_dir = runs / env / f"{method}-demos{n_demos}-seed{seed}"
    result_path = run_dir / "result.json"
    if result_path.is_file():
        return json.loads(result_path.read_text())
    config = config_of(env, method)
    overrides = [f"run.seed={seed}", f"run.output_dir={run_dir}", "run.progress=false", "run.report=false", f"{DEMO_KEY[method]}={n_demos}"]
    if method in SEED_KEY:
        overrides.append(f"{SEED_KEY[method]}={seed}")
    if (run_dir / "checkpoints").is_dir():
        cmd = [sys.executable, "-m", "polyrl.cli", "train", "--resume", str(run_dir)]
    else:
        cmd = [sys.executable, "-m", "polyrl.cli", "train", str(config), *overrides]
    run_dir.mkdir(parents=True, exist_ok=True)
    log(f"start {run_dir.relative_to(ROOT)}")
    code, wall, cpu = run_measured(cmd, run_dir / "train.log")
    if code != 0:
        raise RuntimeError(f"{run_dir}: training failed (exit {code}); see {run_dir / 'train.log'}")

    from polyrl.plugins.control.envs import evaluate
    from polyrl.plugins.control.policy import GaussianPolicy

    returns = evaluate(GaussianPolicy.from_pretrained(str(run_dir / "policy")), args.eval_episodes, EVAL_SEED)
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if l.strip()]
    result = {
        "env": env, "method": method, "demo_episodes": n_demos, "seed": seed,
        "env_steps": expert_env_steps(cfg),
        "learns_from_env_steps": method != "bc",
        "eval_returns": returns,
        "return": statistics.fmean(returns),
        "normalised": (statistics.fmean(returns) - ref["random"]) / (ref["expert"] - ref["random"]),
        "train_return_last": rows[-1].get("reward/env_reward"),
        "cpu_s": cpu, "wall_s": wall,
    }
    result_path.write_text(json.dumps(result, indent=2))
    log(f"done  {run_dir.relative_to(ROOT)}: normalised {result['normalised']:.3f} ({cpu / 60:.1f} CPU min)")
    return result


def fmt(values: list[float]) -> str:
    if not values:
        return "—"
    m = statistics.fmean(values)
    if len(values) == 1:
        return f"{m:.2f} (1 seed)"
    return f"{m:.2f} ± {statistics.pstdev(values):.2f}"


def write_table(runs: Path, out: Path) -> None:
    lines = [
        "# Imitation results: SMILING vs DAC vs BC",
        "",
        f"Generated by `python scripts/imitation_results.py` on {datetime.date.today().isoformat()} from the runs' "
        "`result.json` files (`runs/imitation/<env>/<method>-demos<N>-seed<S>/`). Protocol, settings and "
        "discussion: [imitation.md](imitation.md).",
        "",
        "Normalised return of the final policy: (return − random) / (expert − random), each return the mean over "
        f"{args.eval_episodes} evaluation episodes (fixed seeds, the policy's mean action), expert = the SAC policy "
        "that made the demonstrations, random = uniform random actions. Mean ± standard deviation over seeds "
        "(population std), then the per-seed values. Demonstrations are state-only for SMILING and DAC, "
        "state-action for BC. CPU time: user + system time of one run's process (one thread).",
        "",
    ]
    found_any = False
    for env, meta in ENVS.items():
        ref_path = runs / env / "reference.json"
        if not ref_path.is_file():
            continue
        ref = json.loads(ref_path.read_text())
        results = [json.loads(p.read_text()) for p in sorted((runs / env).glob("*/result.json"))]
        if not results:
            continue
        found_any = True
        expert_cpu = f", {ref['expert_cpu_s'] / 60:.0f} CPU min" if ref.get("expert_cpu_s") else ""
        lines += [
            f"## {meta['name']}",
            "",
            f"Expert (SAC on the environment reward, {ref['expert_env_steps']:,} env steps{expert_cpu}): "
            f"evaluation return {ref['expert']:.1f}; its demonstrations: {len(ref['demo_returns'])} episodes, "
            f"mean return {statistics.fmean(ref['demo_returns']):.1f}. Random actions: {ref['random']:.1f}.",
            "",
            "| method | demo episodes | normalised return | per seed | env steps per run | CPU min per run |",
            "|---|---:|---:|---|---:|---:|",
        ]
        for method, label in METHODS.items():
            for n in sorted({r["demo_episodes"] for r in results if r["method"] == method}):
                rs = sorted((r for r in results if r["method"] == method and r["demo_episodes"] == n), key=lambda r: r["seed"])
                per_seed = ", ".join(f"{r['normalised']:.2f} (s{r['seed']})" for r in rs)
                steps = f"{rs[0]['env_steps']:,}" if rs[0]["learns_from_env_steps"] else f"0 (offline; {rs[0]['env_steps']:,} for logging)"
                lines.append(f"| {label} | {n} | {fmt([r['normalised'] for r in rs])} | {per_seed} | {steps} | "
                             f"{statistics.fmean(r['cpu_s'] for r in rs) / 60:.1f} |")
        lines.append("")
        lines += compare(results)
    if not found_any:
        lines.append("No finished runs yet.")
    out.write_text("\n".join(lines) + "\n")
    log(f"wrote {out}")


def compare(results: list[dict]) -> list[str]:
    """One factual line per demonstration count: SMILING's mean against DAC's, and whether the gap
    exceeds the seeds' spread."""
    out = []
    for n in sorted({r["demo_episodes"] for r in results}):
        s = [r["normalised"] for r in results if r["method"] == "smiling" and r["demo_episodes"] == n]
        d = [r["normalised"] for r in results if r["method"] == "dac" and r["demo_episodes"] == n]
        if not s or not d:
            continue
        ms, md = statistics.fmean(s), statistics.fmean(d)
        spread = max(statistics.pstdev(s) if len(s) > 1 else 0.0, statistics.pstdev(d) if len(d) > 1 else 0.0)
        verdict = ("SMILING above DAC" if ms > md else "SMILING not above DAC")
        within = " (the gap is within one seed standard deviation)" if abs(ms - md) <= spread else ""
        out.append(f"- {n} demonstration episode{'s' if n > 1 else ''}: {verdict}: {ms:.2f} vs {md:.2f}{within}.")
    return out + [""] if out else []


def main() -> int:
    global args
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--envs", nargs="+", default=list(ENVS), choices=list(ENVS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--demos", nargs="+", type=int, default=[1, 10], help="demonstration episodes")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=1, help="runs at the same time (each uses one thread)")
    parser.add_argument("--eval-episodes", type=int, default=10)
    parser.add_argument("--runs", default=str(ROOT / "runs" / "imitation"))
    parser.add_argument("--out", default=str(ROOT / "docs" / "imitation_results.md"))
    parser.add_argument("--table-only", action="store_true", help="only rebuild the table from finished runs")
    args = parser.parse_args()
    runs = Path(args.runs).resolve()
    import torch

    torch.set_num_threads(1)
    if not args.table_only:
        refs = {env: ensure_expert(env, runs) for env in args.envs}
        jobs = [(env, m, n, s) for env in args.envs for n in args.demos for m in args.methods for s in args.seeds]
        with cf.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            futures = [pool.submit(run_one, env, m, n, s, runs, refs[env]) for env, m, n, s in jobs]
            for f in cf.as_completed(futures):
                f.result()
    write_table(runs, Path(args.out))
    return 0


args: argparse.Namespace

if __name__ == "__main__":
    raise SystemExit(main())
