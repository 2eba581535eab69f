"""Supervised warm-up of the lilGym language-model agent: teach a causal LM to write valid actions.

The ``lilgym_lm`` agent reads each turn's prompt (the sentence, the target, the world in words,
``action:``; see :func:`polyrl.plugins.lilgym.lm.build_prompt`) and writes the action as text. A
language model trained on other text never writes one, so every RL episode ends on its first turn
with the same reward and GRPO has nothing to learn from. This script

1. plays episodes on a split (the train split by default) with a policy uniform over the valid
   actions (the environment's action mask) and keeps every turn as a pair (the prompt exactly as
   the agent sees it, the action taken written as the agent must write it: ``" add left
   yellow\\n"``); the target is a valid action of the world in the prompt, so the warmed-up model
   plays roughly like the uniform-valid baseline and RL starts from there;
2. fine-tunes the causal LM on the pairs (all weights, AdamW, cross-entropy on the action tokens
   only, prompts encoded and cut as the agent encodes them), seeded;
3. measures the **parse rate** (the fraction of sampled actions whose text names an action) and the
   **valid rate** (names one the world allows) on pairs of held-out episodes of the dev split,
   before and after, sampling as the agent samples (temperature 1);
4. saves the model and tokenizer in the Hugging Face format to ``--out`` (with ``warmup_log.txt``):
   point ``policy.pretrained`` at that folder.

Usage (CPU, about 3 CPU minutes on one thread)::

    python scripts/lilgym_lm_warmup.py --out assets/tiny-gpt2-lilgym

``assets/tiny-gpt2-lilgym`` ships the result of exactly this command (seed 0); the config
``configs/lilgym_lm_tower_scratch.yaml`` starts RL from it.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent


def make_pairs(task: str, split: str, episodes: int, seed: int, data_dir: str | None = None,
               statements: str = "all") -> list[dict[str, Any]]:
    """``(prompt, action)`` pairs from ``episodes`` episodes of uniform-valid play on ``task``/``split``.

    Each pair is ``{"prompt", "action" (the action index), "target" (its text), "example_id",
    "world"}``; ``world`` is the world the prompt describes (a copy), in which ``action`` is valid."""
    from polyrl.plugins.lilgym.env import LilGymEnv
    from polyrl.plugins.lilgym.lm import action_target, build_prompt
    from polyrl.plugins.lilgym.sampler import LilGymSamplerConfig, _examples

    examples = _examples(LilGymSamplerConfig(task=task, split=split, data_dir=data_dir, statements=statements))
    env = LilGymEnv(task, split, data=examples, stop_forcing=False)
    rng = np.random.default_rng(seed)
    pairs: list[dict[str, Any]] = []
    for _ in range(episodes):
        _, info = env.reset(seed=int(rng.integers(2**31 - 1)), options={"example_index": int(rng.integers(len(examples)))})
        done = False
        while not done:
            valid = np.flatnonzero(info["action_mask"])
            action = int(rng.choice(valid))
            pairs.append({"prompt": build_prompt(env.example, env.world, env.appearance), "action": action,
                          "target": action_target(env.appearance, action), "example_id": env.example.id,
                          "world": [[dict(o) for o in box] for box in env.world]})
            _, _, term, trunc, info = env.step(action)
            done = term or trunc
    return pairs


def encode_pairs(policy, pairs: list[dict[str, Any]]):
    """A text rollout of the pairs for ``policy.lm``: prompts encoded as the agent encodes them
    (left-padded, cut from the left to ``max_prompt_tokens``), then the target's tokens (right-padded
    to ``max_action_tokens``); ``mask`` is True on the target's tokens."""
    from polyrl.types import Context, Rollout

    a = policy.cfg.max_action_tokens
    prompt_ids, prompt_mask = policy.encode_prompts([p["prompt"] for p in pairs])
    ids = torch.full((len(pairs), a), policy.lm.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(pairs), a), dtype=torch.bool)
    for i, p in enumerate(pairs):
        tok = policy.tokenizer(p["target"], add_special_tokens=False)["input_ids"]
        if len(tok) > a:
            raise ValueError(f"action text {p['target']!r} is {len(tok)} tokens, more than policy.max_action_tokens={a}")
        ids[i, : len(tok)] = torch.tensor(tok)
        mask[i, : len(tok)] = True
    return Rollout(
        contexts=[Context("") for _ in pairs], log_probs=torch.zeros(len(pairs), a), mask=mask,
        data={"input_ids": torch.cat([prompt_ids, ids], 1), "attention_mask": torch.cat([prompt_mask, mask], 1).long()},
        meta={"temperature": 1.0, "top_k": 0, "top_p": 1.0},
    )


@torch.no_grad()
def parse_rate(policy, pairs: list[dict[str, Any]], seed: int, appearance: str, batch: int = 64) -> dict[str, float]:
    """Sample one action per pair's prompt as the agent does; the fraction whose text names an action
    (``parse_rate``) and names one valid in the pair's world (``valid_rate``)."""
    from polyrl.plugins.lilgym import actions as A

    g = torch.Generator().manual_seed(seed)
    was_training = policy.training
    policy.eval()
    parsed = valid = 0
    try:
        for k in range(0, len(pairs), batch):
            chunk = pairs[k : k + batch]
            ids, mask = policy.encode_prompts([p["prompt"] for p in chunk])
            tokens, _, m = policy.generate(ids, mask, g)
            for p, text in zip(chunk, policy.decode(tokens, m)):
                action = A.parse_action(appearance, text)
                if action is not None:
                    parsed += 1
                    valid += int(A.is_valid(appearance, p["world"], action))
    finally:
        policy.train(was_training)
    n = max(len(pairs), 1)
    return {"parse_rate": parsed / n, "valid_rate": valid / n}


def warm_up(policy, pairs: list[dict[str, Any]], steps: int, batch_size: int, lr: float, seed: int,
            log=None) -> list[float]:
    """Fine-tune ``policy.lm`` on the pairs (``steps`` AdamW steps, linear decay, loss on the action
    tokens only); returns the loss of each step."""
    g = torch.Generator().manual_seed(seed)
    rollout = encode_pairs(policy, pairs)
    params = [p for p in policy.lm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / max(steps, 1))
    policy.train()
    losses: list[float] = []
    for step in range(steps):
        idx = torch.randint(len(pairs), (batch_size,), generator=g)
        mb = rollout.select(idx)
        logp = policy.lm(mb)
        m = mb.mask.float().to(logp.device)
        loss = -(logp * m).sum() / m.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if log is not None and (step + 1) % max(steps // 10, 1) == 0:
            log(f"step {step + 1:5d}  lr {sched.get_last_lr()[0]:.2e}  loss (mean of the last {max(steps // 10, 1)}) "
                f"{sum(losses[-max(steps // 10, 1):]) / max(steps // 10, 1):.4f}")
    return losses


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder to write the warmed-up model to (Hugging Face format)")
    parser.add_argument("--pretrained", default="assets/tiny-gpt2", help="the causal LM to start from")
    parser.add_argument("--task", default="TowerScratch",
                        choices=["TowerScratch", "TowerFlipIt", "ScatterScratch", "ScatterFlipIt"])
    parser.add_argument("--split", default="train", help="split the training pairs come from")
    parser.add_argument("--statements", default="all", choices=["all", "fit", "heldout"],
                        help="side of the statement partition the training pairs come from (FlipIt: fit)")
    parser.add_argument("--data-dir", default=None, help="lilGym JSON folder (default: the usual search path)")
    parser.add_argument("--episodes", type=int, default=1500, help="uniform-valid episodes that make the training pairs")
    parser.add_argument("--eval-episodes", type=int, default=100, help="dev-split episodes whose turns measure the parse rate")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--max-action-tokens", type=int, default=12)
    parser.add_argument("--max-prompt-tokens", type=int, default=112)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--device", default="cpu", help="torch device to train on (cpu, cuda)")
    args = parser.parse_args(argv)

    from polyrl.plugins.lilgym.data import TASKS
    from polyrl.plugins.lilgym.lm import LilGymLMConfig, LilGymLMPolicy

    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    appearance = TASKS[args.task][0]
    cfg = LilGymLMConfig(appearance=appearance, pretrained=args.pretrained, max_action_tokens=args.max_action_tokens,
                         max_prompt_tokens=args.max_prompt_tokens)
    cfg.check()
    out = Path(args.out)
    lines: list[str] = []

    def log(msg: str) -> None:
        lines.append(msg)
        print(msg, file=sys.stderr, flush=True)

    cpu0, wall0 = time.process_time(), time.perf_counter()
    policy = LilGymLMPolicy(cfg).to(args.device)
    train_pairs = make_pairs(args.task, args.split, args.episodes, args.seed, args.data_dir, args.statements)
    eval_split, eval_statements = ("dev", "heldout") if args.task.endswith("FlipIt") else ("dev", "all")
    eval_pairs = make_pairs(args.task, eval_split, args.eval_episodes, args.seed + 1, args.data_dir, eval_statements)
    log(f"lilGym LM warm-up: {args.task}, {len(train_pairs)} (prompt, valid action) pairs from {args.episodes} "
        f"uniform-valid episodes of the {args.split} split (statements: {args.statements}); parse rate measured on "
        f"{len(eval_pairs)} turns of {args.eval_episodes} {eval_split} episodes (statements: {eval_statements})")
    log(f"model: {args.pretrained}; full fine-tuning, {args.steps} AdamW steps of {args.batch_size} pairs, lr {args.lr} "
        f"(linear decay), seed {args.seed}, {torch.get_num_threads()} CPU thread(s)")
    log(f"example pair: {train_pairs[0]['prompt']!r} -> {train_pairs[0]['target']!r}")
    before = parse_rate(policy, eval_pairs, args.seed, appearance)
    log(f"before: parse rate {before['parse_rate']:.3f}, valid rate {before['valid_rate']:.3f}")
    warm_up(policy, train_pairs, args.steps, args.batch_size, args.lr, args.seed, log)
    after = parse_rate(policy, eval_pairs, args.seed, appearance)
    log(f"after:  parse rate {after['parse_rate']:.3f}, valid rate {after['valid_rate']:.3f}")
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    log(f"CPU time {cpu:.0f} s (wall {wall:.0f} s)")
    policy.save_pretrained(str(out))
    (out / "warmup_log.txt").write_text(
        "python scripts/lilgym_lm_warmup.py " + " ".join(argv if argv is not None else sys.argv[1:]) + "\n"
        + "\n".join(lines) + "\n")
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
