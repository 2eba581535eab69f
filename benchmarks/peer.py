"""What the peer benchmarks (``trl_ddpo.py``, ``trl_grpo.py``) share: running one side of a pair in
a fresh single-threaded process, the per-iteration statistics of interleaved pairs, and writing
a result table between markers of a markdown file.

A pair's result is ``{"polyrl": run, "trl": run}``; a run is ``{"iterations": [record, ...]}``
whose first record is the warm-up iteration (never timed).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SIDES = ("polyrl", "trl")


def pair_arguments(ap, iterations: int) -> None:
    """The options every peer benchmark starts with: ``--pairs`` and ``--iterations``."""
    ap.add_argument("--pairs", type=int, default=5, help="interleaved (polyrl, TRL) pairs of runs")
    ap.add_argument("--iterations", type=int, default=iterations, help="iterations per run; the first is warm-up")


def parse_pair_args(ap):
    """Add the options every peer benchmark ends with (``--seed``, ``--markdown``, and the hidden
    ``--side`` / ``--result`` of one side's run), parse, and check ``--iterations``."""
    import argparse

    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--markdown", help="also write the comparison into this markdown file (between its benchmark markers)")
    ap.add_argument("--side", choices=list(SIDES), help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.iterations < 2:
        sys.exit(f"--iterations must be >= 2 (the first is warm-up), got {args.iterations}")
    return args


def launch_side(script: str, side: str, result: Path, options: list[str]) -> dict:
    """Run ``script --side SIDE --result RESULT OPTIONS`` in a single-threaded process and return
    the JSON it wrote; exits with the run's stderr when it fails."""
    cmd = [sys.executable, str(Path(script).resolve()), "--side", side, "--result", str(result), *options]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"the {side} run failed:\n{proc.stderr[-4000:]}")
    return json.loads(result.read_text())


def interleaved_pairs(n: int, run, digits: int) -> list[dict]:
    """``n`` pairs, ``run(side, i)`` for both sides, alternating which starts; prints each pair's
    CPU seconds per timed iteration with ``digits`` decimals."""
    pairs = []
    for i in range(n):
        sides = SIDES if i % 2 == 0 else SIDES[::-1]
        got = {s: run(s, i) for s in sides}
        pairs.append(got)
        cpu = {s: statistics.fmean(r["cpu_s"] for r in got[s]["iterations"][1:]) for s in sides}
        print(f"pair {i + 1}: polyrl {cpu['polyrl']:.{digits}f} s/it, TRL {cpu['trl']:.{digits}f} s/it, "
              f"TRL/polyrl {cpu['trl'] / cpu['polyrl']:.3f}", flush=True)
    return pairs


def per_run(pairs: list[dict], side: str) -> list[float]:
    """Each run's mean CPU seconds per timed iteration, one per pair."""
    return [statistics.fmean(r["cpu_s"] for r in p[side]["iterations"][1:]) for p in pairs]


def mean_over(pairs: list[dict], side: str, key: str) -> float:
    """``key`` per iteration, averaged over the timed iterations of every run of ``side``."""
    return statistics.fmean(r[key] for p in pairs for r in p[side]["iterations"][1:])


def median_range(xs: list[float], f: str) -> str:
    """``median (min–max)`` with the format spec ``f``."""
    return f"{statistics.median(xs):{f}} ({min(xs):{f}}–{max(xs):{f}})"


def write_block(path: str, begin: str, end: str, text: str, heading: str) -> None:
    """Put ``text`` between the markers ``begin``/``end`` of the markdown file ``path`` (replacing
    what is there), or append it under ``heading`` when the file has no markers."""
    target = Path(path)
    body = target.read_text() if target.is_file() else ""
    block = f"{begin}\n{text}\n{end}"
    if begin in body and end in body:
        body = body[: body.index(begin)] + block + body[body.index(end) + len(end):]
    else:
        body = body.rstrip() + f"\n\n{heading}\n\n{block}\n"
    target.write_text(body)
    print(f"wrote {target}")
