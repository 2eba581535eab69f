"""Start-up time of the command line: how long polyrl takes before it can do anything.

    python benchmarks/start_time.py [--repeats 5] [--json out.json] [--compare before.json]

Times three commands, each in a fresh Python process (the median wall-clock over ``--repeats``
runs, after one warm-up run that fills the file-system cache):

* ``Host()``: ``python -c "from polyrl.host import Host; Host()"`` (discover and register every
  installed plugin);
* ``polyrl plugins``: list the installed plugins and their components;
* a rejected config: ``polyrl train update.clip_rnge=1e-4`` (a misspelt key of the embedded
  default run's update), refused before any model loads.

With ``--compare`` it prints both columns and the speed-up. Measure the "before" of a change
from a checkout of the older commit in the same minutes as the "after", so that both see the same
machine load. It also lists which heavy libraries
the ``Host()`` process imported (diffusers, transformers, peft, open_clip, gymnasium, mujoco,
sentence_transformers, torch._dynamo): none of them is needed to read the registry or to reject a
config. Run it on an idle machine: the numbers are wall-clock.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

HEAVY = ("diffusers", "transformers", "peft", "open_clip", "gymnasium", "mujoco", "sentence_transformers",
         "torch._dynamo")

COMMANDS = {
    "Host()": [sys.executable, "-c", "from polyrl.host import Host; Host()"],
    "polyrl plugins": [sys.executable, "-m", "polyrl.cli", "plugins"],
    "rejected config (polyrl train update.clip_rnge=1e-4)": [
        sys.executable, "-m", "polyrl.cli", "train", "update.clip_rnge=1e-4"],
}


def time_command(cmd: list[str], repeats: int) -> tuple[float, float]:
    """Median wall-clock and CPU (user + system) seconds of ``cmd`` over ``repeats`` runs (after one
    warm-up run). The CPU time depends less on what else the machine runs."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    subprocess.run(cmd, env=env, capture_output=True)
    wall, cpu = [], []
    for _ in range(repeats):
        r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        subprocess.run(cmd, env=env, capture_output=True)
        wall.append(time.perf_counter() - t0)
        r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu.append(r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime)
    return statistics.median(wall), statistics.median(cpu)


def heavy_imports() -> list[str]:
    """The heavy libraries a bare ``Host()`` imports."""
    code = (
        "import sys; from polyrl.host import Host; Host(); "
        f"print(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return out.stdout.split()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="write the medians to this file")
    parser.add_argument("--compare", help="a --json file of an earlier measurement, shown as the 'before' column")
    args = parser.parse_args()

    result = {name: time_command(cmd, args.repeats) for name, cmd in COMMANDS.items()}
    result["heavy imports of Host()"] = heavy_imports()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    before = None
    if args.compare:
        with open(args.compare) as f:
            before = json.load(f)

    print(f"median of {args.repeats} runs, seconds: wall-clock (CPU user + system) (CPU count {os.cpu_count()}, "
          f"load average {os.getloadavg()[0]:.1f})\n")
    cell = lambda v: f"{v[0]:.2f} ({v[1]:.2f})"  # noqa: E731
    if before is None:
        print("| command | s |\n|---|---:|")
        for name in COMMANDS:
            print(f"| {name} | {cell(result[name])} |")
    else:
        print("| command | before s | after s | wall-clock speed-up |\n|---|---:|---:|---:|")
        for name in COMMANDS:
            b, a = before.get(name), result[name]
            print(f"| {name} | {cell(b)} | {cell(a)} | {b[0] / a[0]:.1f}× |" if b else f"| {name} | – | {cell(a)} | – |")
    print(f"\nheavy libraries imported by Host(): {', '.join(result['heavy imports of Host()']) or 'none'}")
    if before is not None:
        print(f"(before: {', '.join(before.get('heavy imports of Host()', [])) or 'none'})")


if __name__ == "__main__":
    main()
