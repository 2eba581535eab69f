"""DDPO's update with the log-probs of several denoising steps per model call (``steps_per_call``).

The embedded default run (RLCM: the tiny LCM, 4 steps, 32 samples, micro-batches of 16), a few
iterations per setting, settings alternating over pairs; the median seconds of the update phase
(the first iteration not counted). The gradients are the same (tests/test_batched_steps.py).

    python benchmarks/batched_steps.py --pairs 3 --iterations 4
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def one_run(k: int, iterations: int, out: Path) -> float:
    from polyrl.cli import default_config
    from polyrl.config import apply_overrides
    from polyrl.host import Host
    from polyrl.loop import train

    data = apply_overrides(default_config(), [f"run.output_dir={out}", f"run.iterations={iterations}", "run.threads=1",
                                              "run.progress=false", "run.report=false", f"update.steps_per_call={k}"])
    host = Host()
    train(host.build_config(data), host)
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()][1:]
    return statistics.median(r["time/update"] for r in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=4)
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4])
    args = parser.parse_args()
    os.chdir(ROOT)
    times: dict[int, list[float]] = {k: [] for k in args.steps}
    with tempfile.TemporaryDirectory() as tmp:
        for p in range(args.pairs):
            for k in (args.steps if p % 2 == 0 else list(reversed(args.steps))):
                times[k].append(one_run(k, args.iterations, Path(tmp) / f"{p}-{k}"))
    base = statistics.median(times[args.steps[0]])
    print("| steps_per_call | update s/it (median, range) | speed-up |")
    print("|---:|---|---:|")
    for k, v in times.items():
        print(f"| {k} | {statistics.median(v):.2f} ({min(v):.2f}-{max(v):.2f}) | {base / statistics.median(v):.2f}x |")


if __name__ == "__main__":
    main()
