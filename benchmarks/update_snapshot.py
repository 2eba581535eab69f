"""What keeping a failed update resumable costs, for a full fine-tune of a GPT-2-small-size model.

``run.update_snapshot: memory`` copies the trainable weights and the optimizer and update states
before every update, so that any failure during it saves the state before it; ``none`` keeps no
copy (a failure before the update's first optimizer step still saves that state; a later one leaves
the newest periodic checkpoint). ``auto`` (the default) is ``memory`` up to 50 M trainable
parameters and ``none`` above, so the 124 M model here runs as ``none``.

Each setting runs in its own process (3 GRPO iterations, full fine-tuning, random weights in the
GPT-2 small layout with the tiny tokenizer); pairs alternate; the table gives the peak resident
memory and the median seconds of an update (after the first iteration).

    python benchmarks/update_snapshot.py --pairs 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def make_model(folder: Path) -> int:
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(ROOT / "assets" / "tiny-gpt2")
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=128, n_embd=768, n_layer=12, n_head=12))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def child(model: str, snapshot: str, out: str) -> None:
    import resource

    import torch

    torch.set_num_threads(1)
    from polyrl.host import Host
    from polyrl.loop import train

    data = {
        "run": {"iterations": 3, "prompts_per_iteration": 2, "samples_per_prompt": 2, "output_dir": out,
                "progress": False, "report": False, "save_every": 100, "update_snapshot": snapshot},
        "prompts": {"file": str(ROOT / "assets" / "tiny-gpt2" / "prompts.txt")},
        "policy": {"name": "causal_lm", "pretrained": model, "lora_rank": 0},
        "sampler": {"name": "generate", "max_new_tokens": 8},
        "rewards": {"sentiment": {}},
        "update": {"name": "grpo", "train_batch_size": 4},
        "optimizer": {"lr": 1e-5},
    }
    host = Host()
    trainer = train(host.build_config(data), host)
    rows = [json.loads(l) for l in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    print(json.dumps({"peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                      "update_s": statistics.median(r["time/update"] for r in rows[1:]),
                      "snapshot": trainer.snapshot_updates}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    with tempfile.TemporaryDirectory() as tmp:
        n = make_model(Path(tmp) / "model")
        results: dict[str, list[dict]] = {"memory": [], "none": [], "auto": []}
        for p in range(args.pairs):
            order = ["memory", "none", "auto"] if p % 2 == 0 else ["auto", "none", "memory"]
            for mode in order:
                cmd = [sys.executable, __file__, "--child", str(Path(tmp) / "model"), mode, str(Path(tmp) / f"run-{p}-{mode}")]
                out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"))
                if out.returncode != 0:
                    raise SystemExit(out.stderr[-3000:])
                results[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"full fine-tune of a {n / 1e6:.0f} M-parameter causal LM (GPT-2 small layout), {args.pairs} runs each\n")
    print("| run.update_snapshot | copies the state | peak RSS GB (median, range) | update s/it (median, range) |")
    print("|---|---|---|---|")
    for mode in ("memory", "none", "auto"):
        rs = results[mode]
        rss, upd = [r["peak_rss_gb"] for r in rs], [r["update_s"] for r in rs]
        print(f"| {mode} | {'yes' if rs[0]['snapshot'] else 'no'} | {statistics.median(rss):.2f} ({min(rss):.2f}-{max(rss):.2f}) "
              f"| {statistics.median(upd):.2f} ({min(upd):.2f}-{max(upd):.2f}) |")


if __name__ == "__main__":
    main()
