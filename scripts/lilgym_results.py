"""Success rates on lilGym dev splits: a random policy and agents trained through polyrl's loop.

For each task, this script

1. evaluates random policies (uniform over the valid actions, and uniform over all actions) on
   every example of the evaluation split, without stop forcing, with three seeds;
2. trains each agent with ``polyrl.loop.train`` (the loop ``polyrl train`` runs) from its config
   in ``configs/``, timing the CPU it uses and counting the environment steps of training;
3. evaluates the trained agent the same way (greedy, and sampled with three seeds);

and writes a markdown table (``--out``, default ``docs/lilgym_results.md``) with the raw numbers in
``RUN_DIR/results.json``.

Usage (CPU)::

    python scripts/lilgym_results.py --tasks TowerScratch TowerFlipIt --threads 1

The lilGym data must be available (see ``python -m polyrl.plugins.lilgym.data where``). For
TowerFlipIt only the dev split is distributed offline: its agents train on the dev statements of
one side of a fixed partition (``sampler.statements: fit``) and all FlipIt numbers are measured on
the other side (``heldout``), statements the agent never saw.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent

AGENTS = {
    # task -> [(agent label, config file)]
    "TowerScratch": [("CNN + sentence encoder, PPO", "configs/lilgym_tower_scratch.yaml"),
                     ("causal LM (tiny GPT-2), GRPO", "configs/lilgym_lm_tower_scratch.yaml")],
    "TowerFlipIt": [("CNN + sentence encoder, PPO", "configs/lilgym_tower_flipit.yaml")],
    "ScatterScratch": [],
    "ScatterFlipIt": [],
}


PUBLISHED = """
## Published baselines (lilGym paper)

The per-task success rates of the lilGym paper (Wu et al., ACL 2023, "lilGym: Natural Language Visual
Reasoning with Reinforcement Learning", aclanthology.org/2023.acl-long.512) could not be retrieved for this
page: the paper's results table is not reproduced here, and no number from it is quoted. Its baselines'
training set-up, as released in lilgym-baselines (github.com/lil-lab/lilgym-baselines, commit 04920fa,
2023-07-10), is:

| | C3+BERT | ViLT |
|---|---|---|
| network | 3-layer CNN on the image + frozen `bert-base-uncased` sentence features | `dandelin/vilt-b32-mlm` (fine-tuned; a separate ViLT for the critic) |
| action distribution | factorised: type (STOP/ADD/REMOVE), then position, then attributes; no action mask (an invalid action ends the episode with -1) | same |
| algorithm | PPO + GAE (gamma 0.99, lambda 0.95), stop forcing in training (PPO+SF) | same |
| budget | 4,000,000 env steps, 2,048 steps per update, 10 epochs x 32 minibatches | same |
| optimiser | Adam, lr 3e-4, linear decay | AdamW, lr 3e-5, cosine, 1% warm-up |
| entropy / value coefficients | 0.1 / 0.5 | 0.1 / 0.5 |
| evaluation | greedy, without stop forcing | same |

polyrl's agents above differ from these baselines in every budget-related respect: a few thousand to tens of
thousands of env steps on one CPU thread instead of 4M on a GPU, a tiny sentence encoder (`assets/tiny-gpt2`)
instead of BERT, and a masked action distribution (invalid actions have probability 0). The GPU configs
`configs/lilgym_gpu_*.yaml` set polyrl up at the baselines' scale (`bert-base-uncased` features, 4M env steps,
entropy 0.1, 10 epochs, stop forcing); their numbers are not on this page.
"""


NOTES = """
## Notes

- **Environment** (`polyrl.plugins.lilgym`, registered with gymnasium as `polyrl/<Task>-v0`): lilGym's four
  tasks, 13 tower / 2661 scatter actions with the action mask in `info`, rewards +1/-1 for a right/wrong
  STOP, -0.1 per other action, -1 and truncation for an invalid action, horizon 11, stop forcing for training
  only. The statements' programs run in a whitelisting AST interpreter, which returns the NLVR label on every
  one of the 989 FlipIt dev worlds (676 tower, 313 scatter).
- **Return** is the mean episode return of the sampled policy: the quantity PPO maximises.
- **FlipIt data**: only the dev split of FlipIt is distributed with the offline data, so the FlipIt agent
  trains on the start worlds of one side of a fixed partition of the dev statements (`statements: fit`, by a
  hash of the sentence) and every FlipIt number above is measured on the other side (`statements: heldout`).
  With lilGym's FlipIt train split in the data folder, set `sampler.split: train, sampler.statements: all`.
- **TowerScratch**: under lilGym's rewards, stopping at once (return -0.95; 2.5% of the dev statements hold on
  the empty world) is worth more than wandering (random: about -1.1), and building the world a statement asks
  for pays only to an agent that understands the statement. Within this CPU budget the CNN agent does not
  learn that: it improves its return over random by learning to stop early, which lowers its success rate.
  Variants run separately on similar budgets (up to about 150 iterations; not rerun by this script) did no
  better on dev without stop forcing: no stop forcing (collapses to stopping at once), stop forcing without
  recording the forced STOP (reaches a goal state in 60% of training episodes but never stops by itself: 0%),
  a curriculum from stop forcing to none, a lower STOP prior (`policy.initial_stop_logit`). lilGym's own PPO
  baselines train for millions of steps with BERT or ViLT features.
- **TowerFlipIt**: stopping at once always fails (the start world has the wrong value), so changing the world
  pays off early and PPO improves the success rate well beyond random on statements it never saw.
- **Language-model agent**: the tiny GPT-2 of `assets/` was trained on product reviews; it writes review prose,
  never a parsable action, so every episode ends on its first turn with -1, every group has equal rewards and
  GRPO's advantages are zero: it cannot start learning. The agent (multi-turn prompts, parsing, per-token
  rewards, recomputed log-probs) works with any causal LM folder (`policy.pretrained`).
- **Scatter**: random baselines only (the CPU budget of this machine did not allow training on the 2661-action
  tasks).
- Data: lilGym's JSON files (MIT; NLVR sentences and worlds CC-BY-4.0), read from the shared data folder.
"""


def eval_protocol(task: str) -> dict[str, Any]:
    """The evaluation split of a task (FlipIt: the held-out half of the dev statements)."""
    if task.endswith("FlipIt"):
        return {"split": "dev", "statements": "heldout"}
    return {"split": "dev", "statements": "all"}


def evaluate(policy, task: str, seeds: list[int], lm: bool = False) -> dict[str, Any]:
    from polyrl.plugins.lilgym.evaluate import evaluate_split

    proto = eval_protocol(task)
    fn = evaluate_split
    if lm:
        from polyrl.plugins.lilgym.lm import evaluate_split_text as fn  # noqa: N813
    greedy = fn(policy, task, proto["split"], seed=0, deterministic=True, statements=proto["statements"])
    sampled = [fn(policy, task, proto["split"], seed=s, deterministic=False, statements=proto["statements"])
               for s in seeds]
    return {
        "greedy": greedy["success"],
        "return": statistics.mean(r["return"] for r in sampled),
        "sampled_mean": statistics.mean(r["success"] for r in sampled),
        "sampled": [r["success"] for r in sampled],
        "episodes": greedy["episodes"],
        "eval_env_steps": greedy["env_steps"] + sum(r["env_steps"] for r in sampled),
    }


def random_baselines(task: str, seeds: list[int]) -> list[dict[str, Any]]:
    from polyrl.plugins.lilgym.data import TASKS
    from polyrl.plugins.lilgym.evaluate import RandomPolicy, evaluate_split

    appearance = TASKS[task][0]
    proto = eval_protocol(task)
    rows = []
    for masked, label in ((True, "random (uniform over valid actions)"), (False, "random (uniform over all actions)")):
        res = [evaluate_split(RandomPolicy(appearance, masked), task, proto["split"], seed=s, deterministic=False,
                              statements=proto["statements"]) for s in seeds]
        rows.append({"agent": label, "greedy": None, "sampled_mean": statistics.mean(r["success"] for r in res),
                     "return": statistics.mean(r["return"] for r in res),
                     "sampled": [r["success"] for r in res], "episodes": res[0]["episodes"],
                     "train_env_steps": 0, "train_cpu_s": 0.0, "train_wall_s": 0.0})
    return rows


def train_agent(config: str, run_dir: Path, overrides: list[str]) -> tuple[Any, dict[str, Any]]:
    from polyrl.config import apply_overrides, load_yaml
    from polyrl.host import Host
    from polyrl.loop import train

    host = Host()
    data = apply_overrides(load_yaml(REPO / config), [f"run.output_dir={run_dir}", "run.progress=false", *overrides])
    cfg = host.build_config(data)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    trainer = train(cfg, host)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    batch = cfg.run.prompts_per_iteration * cfg.run.samples_per_prompt
    steps = sum(r["reward/lilgym_steps"] * batch for r in rows)  # mean episode length x episodes
    info = {
        "iterations": cfg.run.iterations,
        "episodes_per_iteration": batch,
        "train_env_steps": int(round(steps)),
        "train_cpu_s": cpu,
        "train_wall_s": wall,
        "final_train_success": statistics.mean(r.get("reward/lilgym_success", 0.0) for r in rows[-10:]),
    }
    return trainer.policy, info


def markdown(results: dict[str, Any], args: argparse.Namespace) -> str:
    lines = [
        "# lilGym: success rates on the dev split",
        "",
        "Produced by `python scripts/lilgym_results.py "
        + " ".join(["--tasks", *args.tasks, "--threads", str(args.threads)]) + "`"
        + f" on {results['machine']} (PyTorch {results['torch']}).",
        "",
        "Success rate: the fraction of episodes that end with a positive reward (a STOP while the",
        "statement's program has the target value), over every example of the evaluation split, once each,",
        "**without stop forcing** (lilGym's test-time protocol). *Greedy* takes the most likely action;",
        "*sampled* draws from the policy (mean of seeds " + ", ".join(map(str, args.seeds)) + "). Training",
        "env steps and CPU time are those of the `polyrl train` run of the config (CPU seconds of the process).",
        "",
    ]
    for task, rows in results["tasks"].items():
        proto = eval_protocol(task)
        where = "dev split" if proto["statements"] == "all" else "held-out half of the dev statements"
        lines += [f"## {task} ({where}, {rows[0]['episodes']} episodes)", "",
                  "| agent | config | success (greedy) | success (sampled) | return (sampled) | training env steps | training CPU time |",
                  "|---|---|---|---|---|---|---|"]
        for r in rows:
            greedy = "n/a" if r["greedy"] is None else f"{100 * r['greedy']:.1f}%"
            sampled = f"{100 * r['sampled_mean']:.1f}% (" + ", ".join(f"{100 * s:.1f}" for s in r["sampled"]) + ")"
            cpu = "-" if not r["train_cpu_s"] else f"{r['train_cpu_s'] / 60:.1f} min"
            steps = "-" if not r["train_env_steps"] else f"{r['train_env_steps']:,}"
            lines.append(f"| {r['agent']} | {r.get('config', '-')} | {greedy} | {sampled} | {r['return']:+.2f} | {steps} | {cpu} |")
        lines.append("")
    lines += PUBLISHED.strip("\n").splitlines() + [""]
    lines += NOTES.strip("\n").splitlines()
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=["TowerScratch", "TowerFlipIt"], choices=sorted(AGENTS))
    parser.add_argument("--agents", nargs="+", default=None, help="only agents whose label starts with one of these")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--runs", default="runs/lilgym-results", help="where the training runs are written")
    parser.add_argument("--out", default="docs/lilgym_results.md")
    parser.add_argument("--override", action="append", default=[], help="dotted.key=value for every training run")
    parser.add_argument("--render-only", action="store_true", help="rewrite --out from RUNS/results.json")
    args = parser.parse_args(argv)
    if args.render_only:
        results = json.loads((Path(args.runs) / "results.json").read_text())
        Path(args.out).write_text(markdown(results, args))
        return 0
    torch.set_num_threads(args.threads)
    runs = Path(args.runs)
    results: dict[str, Any] = {"machine": f"{platform.machine()} {platform.system()}, {torch.get_num_threads()} CPU thread",
                               "torch": torch.__version__, "tasks": {}, "notes": []}
    for task in args.tasks:
        rows = random_baselines(task, args.seeds)
        for label, config in AGENTS[task]:
            if args.agents and not any(label.startswith(a) for a in args.agents):
                continue
            if not (REPO / config).is_file():
                print(f"lilgym_results: {config} not found, skipping {label}", file=sys.stderr)
                continue
            run_dir = runs / Path(config).stem
            if run_dir.exists():
                import shutil

                shutil.rmtree(run_dir)
            policy, info = train_agent(config, run_dir, args.override)
            ev = evaluate(policy, task, args.seeds, lm="_lm_" in config)
            rows.append({"agent": label, "config": f"`{config}`", **ev, **info})
            print(f"{task} {label}: {ev} {info}", file=sys.stderr)
        results["tasks"][task] = rows
        runs.mkdir(parents=True, exist_ok=True)
        (runs / "results.json").write_text(json.dumps(results, indent=2))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(markdown(results, args))
    print(f"lilgym_results: wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
