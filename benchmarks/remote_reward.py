"""Throughput of ``polyrl serve-reward`` for cheap rewards, with 1, 4 and 16 concurrent clients.

Starts ``polyrl serve-reward`` in a separate process on a free localhost port, then runs N client
threads that each send requests back to back for ``--seconds`` (payloads are encoded beforehand,
so the numbers are the server's). Prints a table of requests/s, samples/s, the mean latency and the
mean number of samples the server scored per reward call (concurrent requests are merged).

    python benchmarks/remote_reward.py                       # jpeg_compressibility and sentiment
    python benchmarks/remote_reward.py --clients 1 4 16 --request-size 8 --seconds 5
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import torch

from polyrl.rewards.remote import encode_png, quantise_images

ROOT = Path(__file__).resolve().parent.parent


def start_server(reward: str, max_batch: int, window_ms: float) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "polyrl.cli", "serve-reward", reward, "--port", "0", "--device", "cpu",
         "--max-batch-size", str(max_batch), "--batch-window-ms", str(window_ms)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env={**os.environ, "POLYRL_REWARD_TOKEN": ""},
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        found = re.search(r"at (http://\S+) ", line)
        if found:
            return proc, found.group(1)
    proc.kill()
    raise SystemExit(f"serve-reward {reward} did not start")


def payload(reward: str, n: int, seed: int) -> bytes:
    g = torch.Generator().manual_seed(seed)
    prompts = [f"a red circle on the left {i}" for i in range(n)]
    if reward.startswith("jpeg"):
        images = quantise_images(torch.rand(n, 3, 64, 64, generator=g))
        return json.dumps({"prompts": prompts, "images": [encode_png(x) for x in images]}).encode()
    texts = ["I loved this film, the acting was wonderful and the story moving." for _ in range(n)]
    return json.dumps({"prompts": prompts, "texts": texts}).encode()


def measure(url: str, body: bytes, clients: int, seconds: float, n: int) -> dict[str, float]:
    before = httpx.get(url + "/info", timeout=10).json()["stats"]
    counts, latencies = [0] * clients, [0.0] * clients
    stop = time.monotonic() + seconds

    def client(k: int) -> None:
        transport = httpx.HTTPTransport(socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])
        with httpx.Client(timeout=60, headers={"Content-Type": "application/json"}, transport=transport) as http:
            while time.monotonic() < stop:
                t0 = time.perf_counter()
                r = http.post(url + "/score", content=body)
                r.raise_for_status()
                assert len(r.json()["rewards"]) == n
                latencies[k] += time.perf_counter() - t0
                counts[k] += 1

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    after = httpx.get(url + "/info", timeout=10).json()["stats"]
    requests = sum(counts)
    calls = after["reward_calls"] - before["reward_calls"]
    return {
        "requests_s": requests / elapsed,
        "samples_s": requests * n / elapsed,
        "latency_ms": 1000 * sum(latencies) / max(requests, 1),
        "batch": (after["samples"] - before["samples"]) / max(calls, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rewards", nargs="+", default=["jpeg_compressibility", "sentiment"])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--request-size", type=int, default=8, help="samples per request")
    parser.add_argument("--seconds", type=float, default=5.0, help="duration of each measurement")
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--batch-window-ms", type=float, default=5.0)
    args = parser.parse_args()
    torch.set_num_threads(1)

    print(f"request size {args.request_size} samples, {args.seconds:g} s per row, server --max-batch-size "
          f"{args.max_batch_size} --batch-window-ms {args.batch_window_ms:g}, {os.cpu_count()} CPUs\n")
    print("| reward | clients | requests/s | samples/s | latency ms | samples per reward call |")
    print("|---|---:|---:|---:|---:|---:|")
    for reward in args.rewards:
        proc, url = start_server(reward, args.max_batch_size, args.batch_window_ms)
        try:
            body = payload(reward, args.request_size, 0)
            measure(url, body, 1, 0.5, args.request_size)  # warm-up
            for clients in args.clients:
                m = measure(url, body, clients, args.seconds, args.request_size)
                print(f"| {reward} | {clients} | {m['requests_s']:.0f} | {m['samples_s']:.0f} | "
                      f"{m['latency_ms']:.1f} | {m['batch']:.1f} |", flush=True)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


if __name__ == "__main__":
    main()
