"""Success rates on lilGym dev splits: a random policy and agents trained through polyrl's loop.

For each task, this script

1. evaluates random policies (uniform over the valid actions, and uniform over all actions) on
   every example of the evaluation split, without stop forcing, with three seeds;
2. trains each agent with ``polyrl.loop.train`` (the loop ``polyrl train`` runs) from its config
   in ``configs/``, once per seed (``run.seed``, three seeds), timing the CPU each run uses and
   counting its environment steps of training;
3. evaluates each trained agent the same way (greedy, and sampled with the run's seed);

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
                     ("causal LM (tiny GPT-2 after the warm-up), GRPO", "configs/lilgym_lm_tower_scratch.yaml")],
    "TowerFlipIt": [("CNN + sentence encoder, PPO", "configs/lilgym_tower_flipit.yaml")],
    "ScatterScratch": [("CNN + sentence encoder, PPO", "configs/lilgym_scatter_scratch.yaml")],
    "ScatterFlipIt": [("CNN + sentence encoder, PPO", "configs/lilgym_scatter_flipit.yaml")],
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
- **TowerScratch: why PPO learned to stop at once, and what fixed it** (train split, 1,000 episodes per row, seed 0):

  | policy | return, no stop forcing | success, no stop forcing | return, stop forcing | success, stop forcing |
  |---|---|---|---|---|
  | STOP at once | -0.95 | 2.7% | -0.95 | 2.7% |
  | uniform over valid actions | -1.06 | 12.4% | -0.55 | 37.8% |
  | 1 random ADD, then STOP | -0.86 | 12.0% | -0.85 | 12.2% |
  | 3 random ADDs, then STOP | -0.87 | 21.4% | -0.75 | 25.9% |
  | 10 random ADDs, then STOP | -1.18 | 40.8% | -0.45 | 61.5% |

  Without stop forcing, the return (what PPO maximises) ranks short episodes first while the success rate ranks
  long ones first: a sentence-blind "10 ADDs, then STOP" succeeds 15 times as often as STOP at once but returns
  less (-1.18 against -0.95), because nine more step penalties cost more than the extra successes bring. With stop
  forcing, wandering pays (-0.45 against -0.95), but with the forced STOP recorded as the agent's action every
  forced STOP is a STOP credited with +1 in a state where the goal holds, which an untrained agent cannot tell
  from the states around it, while its own STOP where the goal does not hold costs little more than continuing (a
  continuation that rarely reaches the goal is worth about -1 too). The update is then not the gradient of the
  stop-forced return (the recorded STOP was not drawn from the policy), and STOP gains probability everywhere. The
  previous config (stop forcing in every episode, STOP at probability 1/2 on the empty world, entropy 0.01, 100
  iterations of 32 episodes) went from 1.9-step episodes and 16% training success in its first iteration to 1.1
  steps and 3% by iterations 21-40 (dev: 2.5% greedy, 3.3% sampled). With the STOP prior and entropy 0.1 below but
  stop forcing in every episode, training episodes start at 6.1 steps with 38% success and a training return of
  -0.55 (iterations 1-10), and PPO drives them down to 2.8 steps, 18% and -0.80 (iterations 21-40): the update
  lowers its own objective.

  What fixed it, each a setting of the config: (1) a STOP prior, `policy.initial_stop_logit: -3` (STOP at 4.7% on
  the empty world instead of 1/2), so that early episodes build for about 7 steps before they stop; (2) stop
  forcing in half of the episodes, drawn per episode (`sampler.stop_forcing_fraction: 0.5`): the other half
  credits +1 only to a STOP the agent chooses where the goal holds, which is what the test protocol asks for; (3)
  entropy 0.1, as lilGym's baselines, and 250 iterations (about 33,000 env steps). The reward and the evaluation
  are unchanged. Sampled, each of the three training seeds is above the uniform-valid baseline (17.4% against
  10.6%). Greedy (9.4%) is not: the most likely single action compares STOP with each of the 9 ADDs on its own, so
  the greedy agent stops sooner than the sampled one (seed 0: 1.9 against 4.4 steps per episode). Runs of one seed
  (dev, sampled, mean of two evaluation seeds): prior -3 with stop forcing in every episode, 80 iterations: 9.8%;
  prior -3 with stop forcing in half of the episodes, 80 iterations: 13.2%, 250 iterations: 16.3%; the same with
  64 episodes per iteration for 125 iterations: 16.9%. Earlier variants without the prior (150 iterations, entropy
  0.1): no stop forcing 7.4%, stop forcing in half of the episodes 8.0%; stop forcing without recording the forced
  STOP: 0% (never stops by itself); the config without recording the forced STOP: 3.0% (its episodes run to the
  horizon).
- **TowerFlipIt**: stopping at once always fails (the start world has the wrong value), so changing the world
  pays off early and PPO improves the success rate well beyond random on statements it never saw.
- **Language-model agent** (`configs/lilgym_lm_tower_scratch.yaml`): the tiny GPT-2 of `assets/` was trained on
  product reviews and never writes a parsable action (parse rate 0%), so every episode ends on its first turn with
  -1 and GRPO's advantages are all zero. *Warm-up* (`scripts/lilgym_lm_warmup.py`, once: 3.0 CPU minutes, seed 0;
  its result ships as `assets/tiny-gpt2-lilgym`): 10,655 (prompt, action) pairs from 1,500 uniform-valid
  TowerScratch episodes of the train split, the prompt exactly as the agent reads it and the target the action
  taken (`" add left yellow\\n"`), 600 AdamW steps of 32 pairs on all weights, loss on the action tokens only. The
  parse rate of sampled actions on 748 dev turns goes from 0.0% to 99.1% (92.2% valid in their world); the
  warmed-up model plays about like the uniform-valid baseline (dev, seed 0: sampled 10.4%, greedy 0.0%: its greedy
  episodes end on an invalid action after about 5 turns). *RL* (the TowerScratch row, 1.6 CPU minutes per run;
  made by `python scripts/lilgym_results.py --tasks TowerScratch --agents "causal LM"`, one training run per seed
  0, 1, 2, each evaluated greedy and sampled with its seed): GRPO from the warmed-up model for 60 iterations of 4
  examples x 8 episodes (about 6,500 env steps), the episode's return as the reward of all its turns' tokens,
  advantages scaled by the batch's standard deviation (groups where every episode fails differ only by step
  penalties, which a group's own scale would amplify), lr 1e-4, and stop forcing in training with the forced STOP
  recorded as the text "stop" with its log-probs (as the paper's PPO+SF records it). It keeps writing actions;
  greedy it matches the CNN agent, sampled it stays below the CNN agent and the uniform-valid baseline: GRPO
  drifts to short episodes as PPO does (see above). Without stop forcing and with lr 3e-4, the parse rate fell
  from 95% to 20% within four iterations (an unparsable turn or a wrong STOP ends a failing episode at -1, more
  than a long failing episode returns, so GRPO reinforced ending episodes with any text); with stop forcing, lr
  2e-4 and 100 iterations (one seed), it ended every episode on its first turn, mostly with STOP (1.2% on dev).
  With a KL penalty to the warmed-up model (`--override update.beta=0.1`, 2.2 CPU minutes per run), the sampled
  policy stays near it (11.0% (11.0, 11.0, 11.0)) but the greedy one fails more often (4.1% (12.3, 0.0, 0.0)); its
  parse rate is 97.3% sampled, 99.9% greedy.
  With stop forcing in half the episodes, as the CNN agent trains (`--override sampler.stop_forcing_fraction=0.5`,
  1.0 CPU minute per run), it learns to stop on its first or second turn: 1.6% sampled (1.8, 1.2, 1.8), 2.5% greedy,
  about 2 env steps per episode.
- **Scatter**: the uniform-valid baseline almost never succeeds because STOP is 1 of up to 2,661 valid actions
  (it wanders until the horizon). The CNN agent's factorised distribution picks the action type first, so it
  STOPs at a rate it learns; trained as the paper's baseline (stop forcing with the forced STOP recorded,
  entropy 0.1) for 20 iterations of 32 episodes it builds and stops.
- **Scatter REMOVE rules** (`sampler.remove_rule`): `lilgym-2023` (default), the rules of the code the paper's
  results come from, where REMOVE is valid only at an item's top-left cell and removes nothing in the middle and
  right boxes; `lilgym-2024`, lilGym's later rules (valid wherever an item covers the cell, in every box). On the
  313 ScatterFlipIt dev start worlds, no REMOVE is valid in 240 under `lilgym-2023` (and one that changes the world
  exists in 23), against 0 and 313 under `lilgym-2024`. Every number on this page uses `lilgym-2023`.
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
    out = {
        "greedy": greedy["success"],
        "return": statistics.mean(r["return"] for r in sampled),
        "sampled_mean": statistics.mean(r["success"] for r in sampled),
        "sampled": [r["success"] for r in sampled],
        "episodes": greedy["episodes"],
        "eval_env_steps": greedy["env_steps"] + sum(r["env_steps"] for r in sampled),
    }
    if lm:  # the language-model agent: the share of its turns whose text names an action
        out["parse_rate_greedy"] = greedy["parse_rate"]
        out["parse_rate"] = statistics.mean(r["parse_rate"] for r in sampled)
    return out


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
    data = apply_overrides(load_yaml(REPO / config), [f"run.output_dir={run_dir}", "run.progress=false", "run.report=false", *overrides])
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
        "*sampled* draws from the policy. Random policies: mean of seeds " + ", ".join(map(str, args.seeds)) + ";",
        "trained agents: one training run per seed (`run.seed` " + ", ".join(map(str, args.seeds)) + "), each evaluated",
        "greedy and sampled; the mean, then each seed's number in parentheses. Training env steps and CPU time",
        "are per training run (mean over the seeds; CPU seconds of the process).",
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
            if r.get("greedy_per_seed"):
                greedy += " (" + ", ".join(f"{100 * g:.1f}" for g in r["greedy_per_seed"]) + ")"
            sampled = f"{100 * r['sampled_mean']:.1f}% (" + ", ".join(f"{100 * s:.1f}" for s in r["sampled"]) + ")"
            cpu = "-" if not r["train_cpu_s"] else f"{r['train_cpu_s'] / 60:.1f} min"
            steps = "-" if not r["train_env_steps"] else f"{r['train_env_steps']:,}"
            lines.append(f"| {r['agent']} | {r.get('config', '-')} | {greedy} | {sampled} | {r['return']:+.2f} | {steps} | {cpu} |")
        lines.append("")
        for r in rows:
            if r.get("parse_rate"):
                rate = lambda v: f"{100 * statistics.mean(v):.1f}% (" + ", ".join(f"{100 * x:.1f}" for x in v) + ")"  # noqa: E731
                lines += [f"Parse rate (the share of an agent's turns whose text names an action), {r['agent']}: "
                          f"greedy {rate(r['parse_rate_greedy'])}, sampled {rate(r['parse_rate'])}.", ""]
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
            per_seed = []
            for seed in args.seeds:
                run_dir = runs / f"{Path(config).stem}-seed{seed}"
                if run_dir.exists():
                    import shutil

                    shutil.rmtree(run_dir)
                policy, info = train_agent(config, run_dir, [f"run.seed={seed}", *args.override])
                ev = evaluate(policy, task, [seed], lm="_lm_" in config)
                per_seed.append({**ev, **info})
                print(f"{task} {label} seed {seed}: {ev} {info}", file=sys.stderr)
            rows.append({
                "agent": label, "config": f"`{config}`", "seeds": list(args.seeds),
                "greedy": statistics.mean(r["greedy"] for r in per_seed),
                "greedy_per_seed": [r["greedy"] for r in per_seed],
                "sampled_mean": statistics.mean(r["sampled_mean"] for r in per_seed),
                "sampled": [r["sampled_mean"] for r in per_seed],
                "return": statistics.mean(r["return"] for r in per_seed),
                "episodes": per_seed[0]["episodes"],
                "train_env_steps": int(statistics.mean(r["train_env_steps"] for r in per_seed)),
                "train_cpu_s": statistics.mean(r["train_cpu_s"] for r in per_seed),
                "per_seed": per_seed,
                **({key: [r[key] for r in per_seed] for key in ("parse_rate_greedy", "parse_rate")}
                   if "parse_rate" in per_seed[0] else {}),
            })
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
