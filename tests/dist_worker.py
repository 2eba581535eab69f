"""Worker for test_distributed.py, started on every process by `accelerate launch`.

Trains through the normal loop and records, per rank, the rewards and the advantages the update
used at each iteration, and the final trainable weights.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml
from safetensors.torch import save_file

from polyrl import hookimpl
from polyrl.host import Host
from polyrl.loop import train


class Recorder:
    def __init__(self) -> None:
        self.rows: list[dict] = []

    @hookimpl
    def polyrl_update(self, trainer, rollout, rewards):
        stats = trainer.update.step(trainer, rollout, rewards)
        self.rows.append({
            "iteration": trainer.iteration,
            "prompts": rollout.prompts,
            "rewards": rewards.tolist(),
            "advantages": trainer.update.last_advantages.tolist(),
        })
        return stats


def main(config_path: str, out_dir: str) -> None:
    host = Host()
    recorder = Recorder()
    host.register(recorder, "recorder")
    cfg = host.build_config(yaml.safe_load(Path(config_path).read_text()))
    trainer = train(cfg, host)
    rank = trainer.accelerator.process_index
    out = Path(out_dir)
    (out / f"rank{rank}.json").write_text(json.dumps({
        "num_processes": trainer.accelerator.num_processes,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "rows": recorder.rows,
    }))
    save_file(trainer.policy.trainable_state_dict(), str(out / f"rank{rank}.safetensors"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
