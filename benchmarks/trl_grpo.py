"""polyrl's GRPO next to TRL's GRPOTrainer on the same tiny problem, in one process.

Same model (``assets/tiny-gpt2``, full fine-tuning), prompts (``assets/tiny-gpt2/prompts.txt``),
reward (VADER sentiment, written once as a TRL-style batched function and used by both), group
size, prompts per iteration, completion length, number of iterations and optimiser settings.
One iteration = sample ``prompts x group`` completions, score them, one optimizer step
(TRL: ``per_device_train_batch_size = prompts x group``, ``steps_per_generation = 1``,
``num_iterations = 1``). Both use the paper's per-sequence loss average (TRL ``loss_type="grpo"``,
polyrl ``loss_aggregation: sequence_mean``), group-std scaling, clip 0.2 and the same beta.

Prints the time per iteration (sampling + reward + update) and the final reward of both, and the
sentiment of both final models on the held-out openings under the same fixed sampling seeds.
TRL is an optional dependency: ``pip install -e ".[bench]"`` (or ``pip install trl``).

Usage::

    python benchmarks/trl_grpo.py [--iterations 30] [--group 8] [--prompts 4] [--threads 1]
                                   [--markdown docs/text_results.md]
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

REPO = Path(__file__).resolve().parent.parent
MARK_BEGIN, MARK_END = "<!-- trl-benchmark:begin -->", "<!-- trl-benchmark:end -->"

_ANALYZER = None


def sentiment_reward(prompts, completions, completion_ids=None, **columns):
    """VADER compound sentiment of each completion (TRL's batched reward signature)."""
    global _ANALYZER
    if _ANALYZER is None:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        _ANALYZER = SentimentIntensityAnalyzer()
    return [float(_ANALYZER.polarity_scores(c)["compound"]) for c in completions]


def prompts() -> list[str]:
    return [p for p in (REPO / "assets" / "tiny-gpt2" / "prompts.txt").read_text().splitlines() if p.strip()]


# ------------------------------------------------------------------------------ polyrl
def run_polyrl(args, out: Path) -> dict:
    from polyrl.host import Host
    from polyrl.loop import train
    from polyrl.rewards.text import callable_reward_spec
    from polyrl import hookimpl

    class BenchRewards:  # the same function as TRL's, registered as a polyrl reward component
        @hookimpl
        def polyrl_rewards(self):
            return [callable_reward_spec("vader_fn", sentiment_reward)]

    host = Host()
    host.register(BenchRewards(), "bench_rewards")
    data = {
        "run": {"iterations": args.iterations, "prompts_per_iteration": args.prompts, "samples_per_prompt": args.group,
                "seed": args.seed, "output_dir": str(out), "progress": False, "report": False,
                "save_every": args.iterations},
        "prompts": {"file": "assets/tiny-gpt2/prompts.txt"},
        "policy": {"name": "causal_lm", "pretrained": "assets/tiny-gpt2"},
        "sampler": {"name": "generate", "max_new_tokens": args.max_new_tokens, "temperature": 1.0,
                    "batch_size": args.prompts * args.group},
        "rewards": {"vader_fn": {"weight": 1.0}},
        "update": {"name": "grpo", "beta": args.beta, "clip_range": 0.2, "inner_epochs": 1,
                   "train_batch_size": args.prompts * args.group, "loss_aggregation": "sequence_mean"},
        "optimizer": {"lr": args.lr, "weight_decay": 0.0, "max_grad_norm": 1.0},
    }
    start = time.perf_counter()
    trainer = train(host.build_config(data), host)
    wall = time.perf_counter() - start
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    per_it = [r["time/sample"] + r["time/reward"] + r["time/update"] for r in rows]
    return {"rewards": [r["reward_mean"] for r in rows], "iteration_s": per_it, "wall_s": wall, "policy": trainer.policy}


# ------------------------------------------------------------------------------ TRL
def run_trl(args, out: Path) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self._t = 0.0

        def on_step_begin(self, *a, **k):
            self._t = time.perf_counter()

        def on_step_end(self, *a, **k):
            self.times.append(time.perf_counter() - self._t)

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
        use_cpu=True, seed=args.seed, disable_dropout=True, bf16=False,
    )
    timer = StepTimer()
    trainer = GRPOTrainer(model=model, reward_funcs=[sentiment_reward], args=config, processing_class=tok,
                          train_dataset=Dataset.from_dict({"prompt": prompts()}), callbacks=[timer])
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    logs = [h for h in trainer.state.log_history if "reward" in h]
    trainer.model.save_pretrained(out / "final")
    tok.save_pretrained(out / "final")
    return {"rewards": [h["reward"] for h in logs], "iteration_s": timer.times, "wall_s": wall, "model_dir": out / "final"}


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iterations", type=int, default=30)
    ap.add_argument("--prompts", type=int, default=4, help="prompts per iteration")
    ap.add_argument("--group", type=int, default=8, help="samples per prompt (GRPO's G)")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--beta", type=float, default=0.04)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads for both (the tiny model runs fastest on one)")
    ap.add_argument("--markdown", help="also write the comparison into this markdown file (between its benchmark markers)")
    args = ap.parse_args()
    try:
        import trl  # noqa: F401
    except ImportError:
        sys.exit("TRL is not installed: pip install -e '.[bench]' (or pip install trl)")
    torch.set_num_threads(args.threads)

    from polyrl.plugins.text import CausalLMConfig, CausalLMPolicy

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ours = run_polyrl(args, tmp / "polyrl")
        theirs = run_trl(args, tmp / "trl")
        ours_eval = evaluate(ours["policy"], args.max_new_tokens)
        theirs_eval = evaluate(CausalLMPolicy(CausalLMConfig(pretrained=str(theirs["model_dir"]))), args.max_new_tokens)
        base_eval = evaluate(CausalLMPolicy(CausalLMConfig(pretrained=str(REPO / "assets" / "tiny-gpt2"))), args.max_new_tokens)

    def steady(times: list[float]) -> float:  # the first iteration includes warm-up
        return statistics.median(times[1:] if len(times) > 1 else times)

    t_ours, t_theirs = steady(ours["iteration_s"]), steady(theirs["iteration_s"])
    last = lambda xs: statistics.fmean(xs[-5:])  # noqa: E731
    import trl as trl_mod
    import transformers

    lines = [
        f"GRPO on the tiny text world: {args.iterations} iterations x {args.prompts} prompts x G={args.group}, "
        f"{args.max_new_tokens} new tokens, lr {args.lr}, beta {args.beta}, seed {args.seed}, "
        f"{args.threads} torch thread(s), CPU; polyrl vs TRL {trl_mod.__version__} (transformers {transformers.__version__}).",
        "",
        "| | polyrl grpo | TRL GRPOTrainer |",
        "|---|---|---|",
        f"| time per iteration (median, s) | {t_ours:.3f} | {t_theirs:.3f} |",
        f"| wall time of the run (s, model loading included) | {ours['wall_s']:.1f} | {theirs['wall_s']:.1f} |",
        f"| train reward, first iteration | {ours['rewards'][0]:.3f} | {theirs['rewards'][0]:.3f} |",
        f"| train reward, mean of the last 5 iterations | {last(ours['rewards']):.3f} | {last(theirs['rewards']):.3f} |",
        f"| held-out sentiment of the final model (base {base_eval:.3f}) | {ours_eval:.3f} | {theirs_eval:.3f} |",
        "",
        f"Time per iteration, TRL / polyrl: {t_theirs / t_ours:.2f}x.",
    ]
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        path = Path(args.markdown)
        body = path.read_text() if path.is_file() else ""
        block = f"{MARK_BEGIN}\n{text}\n{MARK_END}"
        if MARK_BEGIN in body and MARK_END in body:
            body = body[: body.index(MARK_BEGIN)] + block + body[body.index(MARK_END) + len(MARK_END):]
        else:
            body = body.rstrip() + "\n\n## Next to TRL's GRPOTrainer\n\nProduced by `python benchmarks/trl_grpo.py --markdown " \
                   f"{args.markdown}`.\n\n{block}\n"
        path.write_text(body)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
