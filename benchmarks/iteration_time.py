"""Time per iteration, split into sample / reward / update, for the tiny image and text runs.

    python benchmarks/iteration_time.py [--iterations 6]

Runs ``configs/rlcm_tiny_compressibility.yaml``, ``configs/ddpo_tiny_compressibility.yaml`` and
``configs/grpo_tiny_text.yaml`` one after the other in this process, on this machine's CPU (or GPU), and prints a table of median seconds per
phase over the iterations after the first (which includes warm-up).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch

from polyrl.config import apply_overrides, load_yaml
from polyrl.host import Host
from polyrl.loop import train

ROOT = Path(__file__).resolve().parent.parent
RUNS = {
    "image / ddpo on the tiny LCM (RLCM; 32 samples x 4 steps)": "configs/rlcm_tiny_compressibility.yaml",
    "image / ddpo on the tiny SD (32 samples x 20 DDIM steps, CFG)": "configs/ddpo_tiny_compressibility.yaml",
    "text / grpo (tiny GPT-2, 32 samples x 16 tokens)": "configs/grpo_tiny_text.yaml",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=6)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, path in RUNS.items():
            data = apply_overrides(load_yaml(ROOT / path), [
                f"run.iterations={args.iterations}", f"run.output_dir={tmp}/{Path(path).stem}",
                "run.progress=false", "run.report=false", f"run.save_every={args.iterations}",
            ])
            host = Host()
            train(host.build_config(data), host)
            metrics = [json.loads(l) for l in (Path(tmp) / Path(path).stem / "metrics.jsonl").read_text().splitlines()]
            steady = metrics[1:] or metrics
            med = {k: statistics.median(m[k] for m in steady) for k in ("time/sample", "time/reward", "time/update")}
            rows.append((label, med, metrics[0]["reward_mean"], metrics[-1]["reward_mean"]))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    print(f"\nmedian seconds per iteration on {device}, iterations 2..{args.iterations}")
    print(f"| run | sample | reward | update | total | reward it.1 -> it.{args.iterations} |")
    print("|---|---|---|---|---|---|")
    for label, med, r0, r1 in rows:
        total = sum(med.values())
        print(f"| {label} | {med['time/sample']:.3f} | {med['time/reward']:.4f} | {med['time/update']:.3f} | "
              f"{total:.3f} | {r0:.3f} -> {r1:.3f} |")


if __name__ == "__main__":
    main()
