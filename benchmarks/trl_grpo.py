"""polyrl's GRPO next to TRL's GRPOTrainer on the same tiny problem: CPU seconds on identical work.

Same model (``assets/tiny-gpt2``, full fine-tuning), prompts (``assets/tiny-gpt2/prompts.txt``),
reward (VADER sentiment, written once as a TRL-style batched function and used by both), group
size, prompts per iteration, completion length, number of iterations and optimiser settings.
One iteration = sample ``prompts x group`` completions, score them, one optimizer step
(TRL: ``per_device_train_batch_size = prompts x group``, ``steps_per_generation = 1``,
``num_iterations = 1``). Both use the paper's per-sequence loss average (TRL ``loss_type="grpo"``,
polyrl ``loss_aggregation: sequence_mean``), group-std scaling, clip 0.2 and the same beta.

Each side runs in its own single-threaded process (``OMP_NUM_THREADS=1``, ``torch.set_num_threads(1)``);
every iteration after the first (warm-up) is timed with ``time.process_time()`` (sampling, reward
and update; model loading excluded). A wrapper on GPT-2's backbone class counts its calls (policy
and reference) and the rows and tokens they process, with and without gradients, so the table shows
that both sides did the same passes; it also times them, and the backward passes, to show how much
of each side's time is model work that neither can skip. ``--pairs`` pairs of runs alternate which side
goes first. The first pair also reports the sentiment of both final models on the training
prompts under fixed sampling seeds.
TRL is an optional dependency: ``pip install -e ".[bench]"`` (or ``pip install trl``).

Usage::

    python benchmarks/trl_grpo.py [--pairs 5] [--iterations 30] [--group 8] [--prompts 4]
                                   [--markdown docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from peer import (REPO, interleaved_pairs, launch_side, mean_over, median_range, pair_arguments, parse_pair_args,
                  per_run, write_block)
MARK_BEGIN, MARK_END = "<!-- trl-benchmark:begin -->", "<!-- trl-benchmark:end -->"
COUNTS = [f"{g}_{k}" for g in ("nograd", "grad") for k in ("calls", "rows", "tokens", "s")]
TIMED = ["backward_s", "draw_s", "optimizer_s", "reward_s"]  # other work that both sides must do

_ANALYZER = None


def sentiment_reward(prompts, completions, completion_ids=None, **columns):
    """VADER compound sentiment of each completion (TRL's batched reward signature)."""
    global _ANALYZER
    t0 = time.process_time()
    if _ANALYZER is None:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        _ANALYZER = SentimentIntensityAnalyzer()
    scores = [float(_ANALYZER.polarity_scores(c)["compound"]) for c in completions]
    if LMCounter.active is not None:
        LMCounter.active.counts["reward_s"] += time.process_time() - t0
    return scores


def prompts() -> list[str]:
    return [p for p in (REPO / "assets" / "tiny-gpt2" / "prompts.txt").read_text().splitlines() if p.strip()]


class LMCounter:
    """Counts the passes of every GPT-2 backbone (the transformer under the LM head: policy,
    reference, any copy) and the rows and tokens they process, split by whether autograd records
    them. The backbone rather than the LM head's class: TRL's fused LM head calls the backbone and
    projects the completion positions itself. Installed on the class before any model loads, so
    that it sees every instance and every wrapper's call."""

    active: "LMCounter | None" = None

    def __init__(self) -> None:
        from transformers import GPT2Model

        self.reset()
        original, counts = GPT2Model.forward, self

        def forward(model, input_ids=None, *args, **kwargs):
            ids = input_ids if input_ids is not None else kwargs["inputs_embeds"][..., 0]
            g = "grad" if torch.is_grad_enabled() else "nograd"
            counts.counts[f"{g}_calls"] += 1
            counts.counts[f"{g}_rows"] += int(ids.shape[0])
            counts.counts[f"{g}_tokens"] += int(ids.numel())
            t0 = time.process_time()
            try:
                return original(model, input_ids, *args, **kwargs)
            finally:
                counts.counts[f"{g}_s"] += time.process_time() - t0

        def timed(fn, key):
            def call(*args, **kwargs):
                t0 = time.process_time()
                try:
                    return fn(*args, **kwargs)
                finally:
                    counts.counts[key] += time.process_time() - t0

            return call

        GPT2Model.forward = forward
        torch.autograd.backward = timed(torch.autograd.backward, "backward_s")
        torch.multinomial = timed(torch.multinomial, "draw_s")  # the token draws of sampling
        torch.optim.AdamW.step = timed(torch.optim.AdamW.step, "optimizer_s")
        LMCounter.active = self

    def reset(self) -> None:
        self.counts = dict.fromkeys(COUNTS + TIMED, 0)


# ------------------------------------------------------------------------------ polyrl
def run_polyrl(args, out: Path, counter: LMCounter) -> dict:
    from polyrl.host import Host
    from polyrl.loop import train
    from polyrl.rewards.text import callable_reward_spec
    from polyrl import hookimpl

    rows: list[dict] = []

    class BenchRewards:  # the same function as TRL's, registered as a polyrl reward component
        t0 = 0.0

        @hookimpl
        def polyrl_rewards(self):
            return [callable_reward_spec("vader_fn", sentiment_reward)]

        @hookimpl
        def polyrl_iteration_start(self, trainer, iteration):
            counter.reset()
            self.t0 = time.process_time()

        @hookimpl
        def polyrl_iteration_end(self, trainer, iteration, metrics, rollout):
            rows.append({"cpu_s": time.process_time() - self.t0, **counter.counts, "reward": metrics["reward_mean"]})

    host = Host()
    host.register(BenchRewards(), "bench_rewards")
    data = {
        "run": {"iterations": args.iterations, "prompts_per_iteration": args.prompts, "samples_per_prompt": args.group,
                "seed": args.seed, "output_dir": str(out), "progress": False, "report": False,
                "save_every": args.iterations, "threads": 1},
        "prompts": {"file": "assets/tiny-gpt2/prompts.txt"},
        "policy": {"name": "causal_lm", "pretrained": "assets/tiny-gpt2"},
        "sampler": {"name": "generate", "max_new_tokens": args.max_new_tokens, "temperature": 1.0,
                    "batch_size": args.prompts * args.group},
        "rewards": {"vader_fn": {"weight": 1.0}},
        "update": {"name": "grpo", "beta": args.beta, "clip_range": 0.2, "inner_epochs": 1,
                   "train_batch_size": args.prompts * args.group, "loss_aggregation": "sequence_mean"},
        "optimizer": {"lr": args.lr, "weight_decay": 0.0, "max_grad_norm": 1.0},
    }
    trainer = train(host.build_config(data), host)
    result = {"iterations": rows}
    if args.evaluate:
        result["eval"] = evaluate(trainer.policy, args.max_new_tokens)
        from polyrl.plugins.text import CausalLMConfig, CausalLMPolicy

        result["base_eval"] = evaluate(CausalLMPolicy(CausalLMConfig(pretrained=str(REPO / "assets" / "tiny-gpt2"))),
                                       args.max_new_tokens)
    return result


# ------------------------------------------------------------------------------ TRL
def run_trl(args, out: Path, counter: LMCounter) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    rows: list[dict] = []

    class StepTimer(TrainerCallback):
        """One optimizer step is one iteration: generation, rewards and the update run inside it."""

        t0 = 0.0

        def on_step_begin(self, *a, **k):
            counter.reset()
            self.t0 = time.process_time()

        def on_step_end(self, *a, **k):
            rows.append({"cpu_s": time.process_time() - self.t0, **counter.counts})

    model_dir = str(REPO / "assets" / "tiny-gpt2")
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.pad_token = tok.pad_token or tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    batch = args.prompts * args.group
    config = GRPOConfig(
        output_dir=str(out), max_steps=args.iterations, per_device_train_batch_size=batch,
        gradient_accumulation_steps=1, steps_per_generation=1, num_iterations=1, num_generations=args.group,
        max_completion_length=args.max_new_tokens, temperature=1.0, beta=args.beta, epsilon=0.2,
        loss_type="grpo", scale_rewards="group", learning_rate=args.lr, lr_scheduler_type="constant",
        weight_decay=0.0, max_grad_norm=1.0, logging_steps=1, save_strategy="no", report_to="none",
        use_cpu=True, seed=args.seed, disable_dropout=True, bf16=False, disable_tqdm=True,
    )
    trainer = GRPOTrainer(model=model, reward_funcs=[sentiment_reward], args=config, processing_class=tok,
                          train_dataset=Dataset.from_dict({"prompt": prompts()}), callbacks=[StepTimer()])
    trainer.train()
    logs = [h for h in trainer.state.log_history if "reward" in h]
    for row, log in zip(rows, logs):
        row["reward"] = log["reward"]
    result = {"iterations": rows}
    if args.evaluate:
        from polyrl.plugins.text import CausalLMConfig, CausalLMPolicy

        trainer.model.save_pretrained(out / "final")
        tok.save_pretrained(out / "final")
        result["eval"] = evaluate(CausalLMPolicy(CausalLMConfig(pretrained=str(out / "final"))), args.max_new_tokens)
    return result


# ------------------------------------------------------------------------------ evaluation
@torch.no_grad()
def evaluate(policy, max_new_tokens: int, per_prompt: int = 4, seed: int = 1234) -> float:
    from polyrl import Context
    from polyrl.plugins.text import TextSampler, TextSamplerConfig

    sampler = TextSampler(TextSamplerConfig(max_new_tokens=max_new_tokens, temperature=1.0))
    contexts = [Context(prompt=p, group=i) for i, p in enumerate(prompts()) for _ in range(per_prompt)]
    scores = []
    for k in range(0, len(contexts), 64):
        r = sampler.sample(policy, contexts[k : k + 64], torch.Generator().manual_seed(seed * 1_000_003 + k))
        scores += sentiment_reward(r.prompts, r.outputs["texts"])
    return statistics.fmean(scores)


# ------------------------------------------------------------------------------ driver
def one_side(args) -> None:
    torch.set_num_threads(1)
    counter = LMCounter()
    with tempfile.TemporaryDirectory() as tmp:
        result = (run_polyrl if args.side == "polyrl" else run_trl)(args, Path(tmp) / args.side, counter)
    Path(args.result).write_text(json.dumps(result))


def launch(args, side: str, result: Path, evaluate_models: bool) -> dict:
    return launch_side(__file__, side, result, [
        "--iterations", str(args.iterations), "--prompts", str(args.prompts), "--group", str(args.group),
        "--max-new-tokens", str(args.max_new_tokens), "--lr", str(args.lr), "--beta", str(args.beta),
        "--seed", str(args.seed)] + (["--evaluate"] if evaluate_models else []))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    pair_arguments(ap, iterations=30)
    ap.add_argument("--prompts", type=int, default=4, help="prompts per iteration")
    ap.add_argument("--group", type=int, default=8, help="samples per prompt (GRPO's G)")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--beta", type=float, default=0.04)
    ap.add_argument("--evaluate", action="store_true", help=argparse.SUPPRESS)
    args = parse_pair_args(ap)
    if args.side:
        return one_side(args)
    try:
        import trl as trl_mod
    except ImportError:
        sys.exit("TRL is not installed: pip install -e '.[bench]' (or pip install trl)")
    import transformers

    with tempfile.TemporaryDirectory() as tmp:
        pairs = interleaved_pairs(
            args.pairs, lambda s, i: launch(args, s, Path(tmp) / f"{s}{i}.json", evaluate_models=i == 0), digits=3)

    def total(side: str, key: str) -> float:  # per iteration, over the timed iterations of every run
        return mean_over(pairs, side, key)

    def work(side: str) -> float:  # what both sides must do: passes, token draws, reward, optimizer step
        return sum(total(side, k) for k in ("nograd_s", "grad_s") + tuple(TIMED))

    def rest(side: str) -> float:
        return total(side, "cpu_s") - work(side)

    def rng(xs: list[float], f: str = ".3f") -> str:
        return median_range(xs, f)

    ours, theirs = per_run(pairs, "polyrl"), per_run(pairs, "trl")
    ratios = [t / o for o, t in zip(ours, theirs)]
    last = lambda xs: statistics.fmean(xs[-5:])  # noqa: E731
    first = pairs[0]
    rewards = {s: [r["reward"] for r in first[s]["iterations"]] for s in ("polyrl", "trl")}

    def passes(side: str, g: str) -> str:
        return " / ".join(f"{total(side, f'{g}_{k}'):.0f}" for k in ("calls", "rows", "tokens"))

    lines = [
        f"GRPO on the tiny text world: {args.iterations} iterations x {args.prompts} prompts x G={args.group}, "
        f"{args.max_new_tokens} new tokens, lr {args.lr}, beta {args.beta}, seed {args.seed}; {args.pairs} interleaved "
        f"pairs of runs, the {args.iterations - 1} iterations after the first timed; CPU seconds of single-threaded "
        f"processes (x86_64); torch {torch.__version__}, transformers {transformers.__version__}, "
        f"TRL {trl_mod.__version__}.",
        "",
        "| per iteration | polyrl `grpo` | TRL `GRPOTrainer` |",
        "|---|---|---|",
        f"| LM backbone calls / rows / tokens without gradients (sampling, reference) | {passes('polyrl', 'nograd')} "
        f"| {passes('trl', 'nograd')} |",
        f"| LM backbone calls / rows / tokens with gradients (update) | {passes('polyrl', 'grad')} | {passes('trl', 'grad')} |",
        f"| CPU s per iteration, median (range) of {args.pairs} | {rng(ours)} | {rng(theirs)} |",
        f"| of which backbone forward without gradients (s) | {total('polyrl', 'nograd_s'):.3f} "
        f"| {total('trl', 'nograd_s'):.3f} |",
        f"| of which backbone forward with gradients (s) | {total('polyrl', 'grad_s'):.3f} | {total('trl', 'grad_s'):.3f} |",
        f"| of which backward (s) | {total('polyrl', 'backward_s'):.3f} | {total('trl', 'backward_s'):.3f} |",
        f"| of which token draws (`torch.multinomial`) (s) | {total('polyrl', 'draw_s'):.3f} | {total('trl', 'draw_s'):.3f} |",
        f"| of which reward (s) | {total('polyrl', 'reward_s'):.3f} | {total('trl', 'reward_s'):.3f} |",
        f"| of which optimizer step (s) | {total('polyrl', 'optimizer_s'):.3f} | {total('trl', 'optimizer_s'):.3f} |",
        f"| everything else (s): LM head, logits processing, loss, tokenizer, bookkeeping | {rest('polyrl'):.3f} "
        f"| {rest('trl'):.3f} |",
        f"| train reward, first iteration (first pair) | {rewards['polyrl'][0]:.3f} | {rewards['trl'][0]:.3f} |",
        f"| train reward, mean of the last 5 iterations (first pair) | {last(rewards['polyrl']):.3f} "
        f"| {last(rewards['trl']):.3f} |",
        f"| sentiment of the final model, fixed seeds (first pair; base {first['polyrl']['base_eval']:.3f}) "
        f"| {first['polyrl']['eval']:.3f} | {first['trl']['eval']:.3f} |",
        "",
        f"**Speed polyrl / TRL (TRL's CPU seconds over polyrl's, per pair): median {rng(ratios)}.**",
        f"The work both sides must do (backbone passes, token draws, reward, optimizer step) is "
        f"{100 * work('polyrl') / total('polyrl', 'cpu_s'):.0f}% of polyrl's CPU time and "
        f"{100 * work('trl') / total('trl', 'cpu_s'):.0f}% of TRL's: with the same work, polyrl could be at most "
        f"{total('trl', 'cpu_s') / work('polyrl'):.2f}x TRL's speed (TRL's time over polyrl's share of that work).",
    ]
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        write_block(args.markdown, MARK_BEGIN, MARK_END, text, "## Next to TRL's GRPOTrainer (`benchmarks/trl_grpo.py`)")


if __name__ == "__main__":
    main()
