"""The text results table: sentiment and perplexity before/after RL on the tiny text world.

The tiny world's analogue of RL4LMs' IMDB task: prompts are review openings (``assets/tiny-gpt2``),
the reward is positive sentiment (VADER compound in [-1, 1]), and every run reports the sentiment
of its samples and their perplexity under the base model. Each algorithm gets the same budget
(iterations x prompts x samples per prompt, same completion length, learning rate and seeds); the
policy is evaluated before and after training on the held-out prompt openings, with fixed
sampling seeds.

Usage::

    python scripts/text_results.py                       # writes docs/text_results.md
    python scripts/text_results.py --algorithms ppo grpo --seeds 0 --iterations 10
    python scripts/text_results.py --write-reviews runs/tiny-reviews.jsonl   # DR-PO's reset data only
    python scripts/text_results.py --variants            # GRPO's loss variants: rewrites their section only
    python scripts/text_results.py --variants dapo gspo  # some of them
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import platform
import random
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent

# One budget for every algorithm: 30 iterations x 4 prompts x 8 samples of 16 tokens, lr 1e-4 (full
# fine-tuning of the tiny GPT-2), gradient-norm clip 1. Algorithm settings are each paper's
# defaults except where the tiny budget needs fewer passes; they are printed in the table.
BUDGET = {"iterations": 30, "prompts_per_iteration": 4, "samples_per_prompt": 8, "max_new_tokens": 16, "lr": 1e-4}
ALGORITHMS: dict[str, dict] = {
    "ppo": {"update": {"name": "ppo", "train_batch_size": 8, "inner_epochs": 4}, "value_head": True},
    "nlpo": {"update": {"name": "nlpo", "train_batch_size": 8, "inner_epochs": 4, "mask_update_interval": 5},
             "value_head": True},
    "grpo": {"update": {"name": "grpo", "train_batch_size": 8, "inner_epochs": 4, "beta": 0.04}},
    "rloo": {"update": {"name": "rloo", "train_batch_size": 8, "inner_epochs": 4, "kl_coef": 0.05}},
    "rebel": {"update": {"name": "rebel", "train_batch_size": 8, "inner_epochs": 4, "eta": 3.0}},
    "a_star_po": {"update": {"name": "a_star_po", "train_batch_size": 8, "inner_epochs": 4}, "one_sample": True},
    "dr_po": {"update": {"name": "dr_po", "train_batch_size": 8, "inner_epochs": 4}, "value_head": True, "reset": True},
}
# GRPO's loss and advantage variants, each the grpo row's settings with one thing changed (GSPO: its
# paper's clip range, which is for a sequence ratio); the same budget and seeds.
VARIANTS: dict[str, dict] = {
    "grpo": {},
    "bnpo": {"loss_type": "bnpo"},
    "dr_grpo": {"loss_type": "dr_grpo"},
    "dapo": {"loss_type": "dapo"},
    "bnpo_accumulate_4": {"loss_type": "bnpo", "gradient_accumulation_batches": 4},
    "dapo_accumulate_4": {"loss_type": "dapo", "gradient_accumulation_batches": 4},
    "clip_higher": {"epsilon_high": 0.28},
    "dapo_clip_higher": {"loss_type": "dapo", "epsilon_high": 0.28},
    "scale_batch": {"scale_rewards": "batch"},
    "scale_none": {"scale_rewards": "none"},
    "dr_grpo_scale_none": {"loss_type": "dr_grpo", "scale_rewards": "none"},
    "gspo": {"importance_sampling_level": "sequence", "epsilon_low": 3e-4, "epsilon_high": 4e-4},
    "gdpo": {"multi_objective_aggregation": "normalize_then_sum"},
}
EVAL_SAMPLES_PER_PROMPT = 4
EVAL_SEED = 1234


# ------------------------------------------------------------------------------ DR-PO's data
def write_reviews(path: Path, n: int = 400, seed: int = 7, threshold: float = 0.5) -> Path:
    """Positive reviews (VADER compound > ``threshold``) from the tiny world's own generator, as
    JSONL ``{"prompt": opening, "response": continuation}``: DR-PO's offline data (the preferred
    responses of a preference dataset). Held-out evaluation openings are excluded."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    spec = importlib.util.spec_from_file_location("make_tiny_gpt2", REPO / "scripts" / "make_tiny_gpt2.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    held_out = set(eval_prompts())
    analyzer = SentimentIntensityAnalyzer()
    rng = random.Random(seed)
    rows, seen = [], set()
    while len(rows) < n:
        opening, rest = gen.review(rng)
        if opening in held_out or (opening, rest) in seen:
            continue
        if analyzer.polarity_scores(opening + rest)["compound"] > threshold:
            seen.add((opening, rest))
            rows.append({"prompt": opening, "response": rest})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def eval_prompts() -> list[str]:
    return [p for p in (REPO / "assets" / "tiny-gpt2" / "prompts.txt").read_text().splitlines() if p.strip()]


# ------------------------------------------------------------------------------ runs
def run_config(name: str, seed: int, out: Path, iterations: int, reviews: Path | None, variant: dict | None = None) -> dict:
    spec = ALGORITHMS[name]
    b = dict(BUDGET, iterations=iterations)
    ppi, g = b["prompts_per_iteration"], b["samples_per_prompt"]
    if spec.get("one_sample"):  # A*-PO: one sample per prompt, as many samples per iteration
        ppi, g = ppi * g, 1
    data = {
        "run": {"iterations": b["iterations"], "prompts_per_iteration": ppi, "samples_per_prompt": g, "seed": seed,
                "output_dir": str(out), "progress": False, "report": False, "save_every": b["iterations"]},
        "prompts": {"file": "assets/tiny-gpt2/prompts.txt"},
        "policy": {"name": "causal_lm", "pretrained": "assets/tiny-gpt2", "value_head": bool(spec.get("value_head"))},
        "sampler": {"name": "generate", "max_new_tokens": b["max_new_tokens"], "temperature": 1.0},
        "rewards": {"sentiment": {"weight": 1.0}, "perplexity": {"weight": 0.0}},
        "update": {**copy.deepcopy(spec["update"]), **(variant or {})},
        "optimizer": {"lr": b["lr"], "max_grad_norm": 1.0},
    }
    if spec.get("reset"):
        data["prompts"] = {"file": str(reviews)}
        data["sampler"]["reset_column"] = "response"
    return data


@torch.no_grad()
def evaluate(policy, sampler, perplexity, sentiment, seed: int = EVAL_SEED) -> dict[str, float]:
    """Mean sentiment and corpus perplexity under the base model of samples for the held-out openings."""
    from polyrl import Context

    prompts = eval_prompts()
    contexts = [Context(prompt=p, group=i) for i, p in enumerate(prompts) for _ in range(EVAL_SAMPLES_PER_PROMPT)]
    was = policy.training
    policy.eval()
    scores, nll, tokens, lengths = [], 0.0, 0, []
    for k in range(0, len(contexts), 64):
        rollout = sampler.sample(policy, contexts[k : k + 64], torch.Generator().manual_seed(seed * 1_000_003 + k))
        scores.extend(sentiment(rollout).tolist())
        lp = perplexity.token_log_probs(rollout)
        nll -= float(lp.sum())
        tokens += int(rollout.mask.sum())
        lengths.extend(rollout.mask.sum(1).tolist())
    policy.train(was)
    return {"sentiment": statistics.fmean(scores), "perplexity": float(torch.tensor(nll / max(tokens, 1)).exp()),
            "length": statistics.fmean(lengths)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS), choices=list(ALGORITHMS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--iterations", type=int, default=BUDGET["iterations"])
    ap.add_argument("--runs-dir", default="runs/text-results")
    ap.add_argument("--out", default="docs/text_results.md")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the tiny model runs fastest on one)")
    ap.add_argument("--write-reviews", metavar="PATH", help="only write DR-PO's reset data (JSONL) to PATH")
    ap.add_argument("--variants", nargs="*", metavar="NAME", choices=list(VARIANTS),
                    help="run GRPO's loss variants (all when no name is given) and rewrite only their section")
    args = ap.parse_args()
    if args.write_reviews:
        print(f"wrote {write_reviews(Path(args.write_reviews))}")
        return
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(REPO))

    from polyrl.host import Host
    from polyrl.loop import train
    from polyrl.plugins.text import CausalLMConfig, CausalLMPolicy, TextSampler, TextSamplerConfig
    from polyrl.rewards.sentiment import VaderSentiment
    from polyrl.rewards.text import BasePerplexity, PerplexityConfig

    runs = Path(args.runs_dir + ("-variants" if args.variants is not None else ""))
    if runs.exists():
        shutil.rmtree(runs)
    runs.mkdir(parents=True)
    reviews = write_reviews(runs / "positive_reviews.jsonl") if args.variants is None else None
    sentiment = VaderSentiment()
    base_policy = CausalLMPolicy(CausalLMConfig(pretrained=str(REPO / "assets" / "tiny-gpt2")))
    eval_sampler = TextSampler(TextSamplerConfig(max_new_tokens=BUDGET["max_new_tokens"], temperature=1.0))
    perplexity = BasePerplexity(PerplexityConfig(), base_policy)
    before = evaluate(base_policy, eval_sampler, perplexity, sentiment)
    print(f"base model: {before}", flush=True)

    results: dict[str, list[dict]] = {}
    if args.variants is not None:
        runs_list = [(v, "grpo", VARIANTS[v]) for v in (args.variants or list(VARIANTS))]
    else:
        runs_list = [(name, name, None) for name in args.algorithms]
    for name, algorithm, variant in runs_list:
        for seed in args.seeds:
            host = Host()
            data = run_config(algorithm, seed, runs / f"{name}-seed{seed}", args.iterations, reviews, variant)
            t0 = time.perf_counter()
            trainer = train(host.build_config(data), host)
            wall = time.perf_counter() - t0
            rows = [json.loads(line) for line in (runs / f"{name}-seed{seed}" / "metrics.jsonl").read_text().splitlines()]
            after = evaluate(trainer.policy, eval_sampler, perplexity, sentiment)
            rec = {"seed": seed, "after": after, "wall_s": wall, "train_first": rows[0]["reward_mean"],
                   "train_last": statistics.fmean(r["reward_mean"] for r in rows[-3:]),
                   "iteration_s": statistics.fmean(r["time/sample"] + r["time/reward"] + r["time/update"] for r in rows[1:]),
                   "kl": rows[-1].get("kl_ref")}
            results.setdefault(name, []).append(rec)
            print(f"{name} seed {seed}: {rec}", flush=True)
            del trainer
    if args.variants is not None:
        write_variants(Path(args.out), before, results, args)
    else:
        write_table(Path(args.out), before, results, args)


def write_table(path: Path, before: dict, results: dict[str, list[dict]], args: argparse.Namespace) -> None:
    def mean_sd(values: list[float]) -> str:
        m = statistics.fmean(values)
        return f"{m:.3f} ± {statistics.pstdev(values):.3f}" if len(values) > 1 else f"{m:.3f}"

    b = dict(BUDGET, iterations=args.iterations)
    lines = [
        "# Text results: the tiny IMDB analogue",
        "",
        "Produced by `python scripts/text_results.py` (it rewrites this file). Task: continue the review "
        "openings of `assets/tiny-gpt2/prompts.txt` (held-out openings of the tiny world's corpus) so that "
        "the continuation is positive; reward = VADER compound sentiment in [-1, 1]. Every run also reports "
        "the perplexity of its samples under the base model (the `perplexity` reward with weight 0), as "
        "RL4LMs does for IMDB.",
        "",
        f"Budget, the same for every algorithm: {b['iterations']} iterations x {b['prompts_per_iteration']} prompts x "
        f"{b['samples_per_prompt']} samples ({b['prompts_per_iteration'] * b['samples_per_prompt']} completions of at most "
        f"{b['max_new_tokens']} tokens per iteration; A*-PO draws one sample for each of "
        f"{b['prompts_per_iteration'] * b['samples_per_prompt']} prompts, plus its offline V* samples), full fine-tuning of "
        f"the tiny GPT-2 with AdamW lr {b['lr']}, gradient-norm clip 1, temperature 1. "
        f"Seeds {', '.join(map(str, args.seeds))}; values are mean ± std over seeds. Evaluation: "
        f"{EVAL_SAMPLES_PER_PROMPT} samples for each of the {len(eval_prompts())} openings with fixed sampling seeds "
        "(the same noise before and after); perplexity is exp(total NLL / total tokens) under the base model.",
        "",
        "| algorithm | sentiment before | sentiment after | perplexity before | perplexity after | train reward first → last 3 | s / iteration | settings |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, recs in results.items():
        upd = {k: v for k, v in ALGORITHMS[name]["update"].items() if k != "name"}
        lines.append(
            f"| {name} | {before['sentiment']:.3f} | {mean_sd([r['after']['sentiment'] for r in recs])} | "
            f"{before['perplexity']:.2f} | {mean_sd([r['after']['perplexity'] for r in recs])} | "
            f"{statistics.fmean(r['train_first'] for r in recs):.3f} → {statistics.fmean(r['train_last'] for r in recs):.3f} | "
            f"{statistics.fmean(r['iteration_s'] for r in recs):.2f} | "
            + ", ".join(f"{k}={v}" for k, v in upd.items()) + " |"
        )
    lines += [
        "",
        "Notes:",
        "",
        "- PPO, NLPO and DR-PO train a value head on the policy (vf_coef 0.5, clipped value loss), with the "
        "adaptive token-level KL penalty (initial β 0.1, target 0.1) in the reward, GAE γ=1, λ=0.95.",
        "- NLPO samples from, and trains, the policy masked to the top-p=0.9 nucleus of a copy refreshed every "
        "5 iterations (at least 100 tokens kept); it is evaluated as it samples, with its mask.",
        "- DR-PO resets every sample to a random prefix of a positive review of the tiny corpus "
        "(`--write-reviews`, openings disjoint from the evaluation ones) and trains on that data's openings;"
        " forced tokens are excluded from the loss. It is evaluated without resets.",
        "- A*-PO estimates V* from 8 reference samples per prompt before training (β1 = 0.5, β2 = 1e-3); its weak "
        "KL (β2) lets the perplexity rise most.",
        "- REBEL's η was the only setting tried at several values (0.3, 1, 3 on seed 0; the train reward after "
        "30 iterations was about 0.0, 0.6 and 0.75): η = 3 is used. Every other setting is the algorithm's default.",
        f"- Machine: {platform.machine()} CPU, {args.threads} torch thread(s), torch {torch.__version__}; "
        "s / iteration is sampling + reward + update, and depends on the machine's load.",
        "",
        "Per run (seed: sentiment after, perplexity after, mean completion length after, wall time):",
        "",
    ]
    for name, recs in results.items():
        cells = "; ".join(
            f"seed {r['seed']}: {r['after']['sentiment']:.3f}, {r['after']['perplexity']:.2f}, "
            f"{r['after']['length']:.1f} tokens, {r['wall_s']:.0f} s" for r in recs
        )
        lines.append(f"- {name}: {cells}")
    lines.append(f"- base model: {before['sentiment']:.3f}, {before['perplexity']:.2f}, {before['length']:.1f} tokens")
    text = "\n".join(lines) + "\n"
    old = path.read_text() if path.is_file() else ""
    for marker in ("grpo-variants", "trl-benchmark"):  # keep the sections that other runs wrote
        section = _section(old, marker)
        if section:
            text += "\n" + section + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(f"wrote {path}")


def _section(text: str, marker: str) -> str:
    """The ``## `` section of ``text`` that holds ``<!-- marker:begin -->`` ... ``<!-- marker:end -->``."""
    begin, end = f"<!-- {marker}:begin -->", f"<!-- {marker}:end -->"
    if begin not in text or end not in text:
        return ""
    start = text.rfind("\n## ", 0, text.index(begin))
    return text[start + 1 if start >= 0 else text.index(begin) : text.index(end) + len(end)]


def write_variants(path: Path, before: dict, results: dict[str, list[dict]], args: argparse.Namespace) -> None:
    """Write (or replace) the section of GRPO's loss variants in ``path``, keeping the rest."""

    def mean_sd(values: list[float]) -> str:
        m = statistics.fmean(values)
        return f"{m:.3f} ± {statistics.pstdev(values):.3f}" if len(values) > 1 else f"{m:.3f}"

    base = {k: v for k, v in ALGORITHMS["grpo"]["update"].items() if k != "name"}
    lines = [
        "## GRPO's loss and advantage variants",
        "",
        "Produced by `python scripts/text_results.py --variants` (it rewrites this section only).",
        "",
        "<!-- grpo-variants:begin -->",
        f"Each row is the grpo row above ({', '.join(f'{k}={v}' for k, v in base.items())}, the same budget of "
        f"{args.iterations} iterations, seeds {', '.join(map(str, args.seeds))}) with the listed settings changed; "
        "values are mean ± std over seeds, evaluated as above.",
        "",
        "| variant | sentiment after | perplexity after | length after | train reward first → last 3 | s / iteration | changed settings |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, recs in results.items():
        changed = ", ".join(f"{k}={v}" for k, v in VARIANTS[name].items()) or "(none)"
        lines.append(
            f"| {name} | {mean_sd([r['after']['sentiment'] for r in recs])} | "
            f"{mean_sd([r['after']['perplexity'] for r in recs])} | "
            f"{statistics.fmean(r['after']['length'] for r in recs):.1f} | "
            f"{statistics.fmean(r['train_first'] for r in recs):.3f} → {statistics.fmean(r['train_last'] for r in recs):.3f} | "
            f"{statistics.fmean(r['iteration_s'] for r in recs):.2f} | {changed} |"
        )
    lines += [
        "",
        "Notes:",
        "",
        "- With one micro-batch per optimizer step on one process (train_batch_size=8, no accumulation), dapo's "
        "normaliser is that micro-batch's token count, so dapo computes exactly bnpo's loss; the two differ once "
        "several micro-batches are accumulated into one step (the `_accumulate_4` rows: 8 x 4 samples per "
        "optimizer step, one step per pass instead of four).",
        "- gspo uses the GSPO paper's clip range for its sequence ratio (3e-4, 4e-4); the token-level ranges "
        "(0.2) would almost never clip a length-normalised sequence ratio.",
        "- gdpo normalises each reward within its group before summing: here the perplexity reward has weight 0, "
        "so gdpo differs from grpo only by re-normalising the summed advantages over the batch.",
        "- Without std scaling (scale_none, dr_grpo_scale_none) the advantages are the raw centred rewards, smaller "
        "than the group-normalised ones when a group's rewards spread little, so at the same learning rate these "
        "runs move less in 30 iterations.",
        "- s / iteration depends on the machine's load while each row ran; it is not a speed comparison of the variants.",
        "",
        f"Base model: sentiment {before['sentiment']:.3f}, perplexity {before['perplexity']:.2f}, "
        f"length {before['length']:.1f} tokens. Machine: {platform.machine()} CPU, {args.threads} torch thread(s), "
        f"torch {torch.__version__}.",
        "",
        "Per run (seed: sentiment after, perplexity after, mean completion length after, wall time):",
        "",
    ]
    for name, recs in results.items():
        cells = "; ".join(
            f"seed {r['seed']}: {r['after']['sentiment']:.3f}, {r['after']['perplexity']:.2f}, "
            f"{r['after']['length']:.1f} tokens, {r['wall_s']:.0f} s" for r in recs
        )
        lines.append(f"- {name}: {cells}")
    lines.append("<!-- grpo-variants:end -->")
    section = "\n".join(lines)
    old = path.read_text() if path.is_file() else ""
    current = _section(old, "grpo-variants")
    if current:
        text = old.replace(current, section)
    else:
        trl = _section(old, "trl-benchmark")
        text = old.replace(trl, section + "\n\n" + trl) if trl else old.rstrip("\n") + "\n\n" + section + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
