"""Rewards that run a model, overlapped with sampling chunk by chunk (``run.async_rewards``).

The tiny LCM samples 32 images per iteration in chunks of 8 (one sampling batch); the reward is a
CLIP score on a ViT-B-32 with random weights (a model-sized reward: about as costly as sampling on
a CPU). Pairs of runs, scoring after sampling ("sync") and each chunk while the next one samples
("async"), alternate so that both see the same machine; the table gives medians over the pairs of
the seconds per iteration of sampling + scoring (what the overlap can save) and of the whole iteration.

    python benchmarks/reward_overlap.py --pairs 3 --iterations 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def one_run(async_rewards: bool, iterations: int, threads: int, out: Path) -> dict[str, float]:
    from polyrl.cli import default_config
    from polyrl.config import apply_overrides
    from polyrl.host import Host
    from polyrl.loop import train

    data = apply_overrides(default_config(), [
        f"run.output_dir={out}", f"run.iterations={iterations}", "run.progress=false", "run.report=false",
        f"run.threads={threads}", f"run.async_rewards={str(async_rewards).lower()}", "sampler.batch_size=8"])
    data["rewards"] = {"clip_score": {"model": "ViT-B-32", "batch_size": 8}}
    host = Host()
    train(host.build_config(data), host)
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()][1:]  # first: warm-up
    return {
        "sample+reward": statistics.median(r["time/sample"] + r["time/reward"] for r in rows),
        "iteration": statistics.median(sum(v for k, v in r.items() if k.startswith("time/")) for r in rows),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (the reward thread shares them)")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    import os

    os.chdir(ROOT)
    results: dict[bool, list[dict[str, float]]] = {False: [], True: []}
    with tempfile.TemporaryDirectory() as tmp:
        for p in range(args.pairs):
            for mode in ((False, True) if p % 2 == 0 else (True, False)):
                results[mode].append(one_run(mode, args.iterations, args.threads, Path(tmp) / f"{p}-{mode}"))
    print(f"| rewards | sample + reward s/it (median, range) | iteration s/it (median, range) |")
    print("|---|---|---|")
    for mode, name in ((False, "after sampling"), (True, "each chunk while the next samples")):
        rs = results[mode]
        cells = []
        for key in ("sample+reward", "iteration"):
            v = [r[key] for r in rs]
            cells.append(f"{statistics.median(v):.2f} ({min(v):.2f}-{max(v):.2f})")
        print(f"| {name} | {cells[0]} | {cells[1]} |")
    s = statistics.median(r["sample+reward"] for r in results[False]) / statistics.median(
        r["sample+reward"] for r in results[True])
    print(f"\nsample + reward: {s:.2f}x faster with the overlap ({args.pairs} pairs, {args.threads} thread(s))")


if __name__ == "__main__":
    main()
