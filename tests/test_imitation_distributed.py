"""SMILING + SAC on two processes (`accelerate launch`, CPU): every network stays identical on both.

The policy is synchronised by the prepared model; the critics, the temperature and the score
networks are the update's and the reward's own, and must be kept identical by averaging their
gradients. This file is also the worker that `accelerate launch` starts on each process.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.distributed
def test_two_processes_keep_policy_critics_and_score_networks_identical(tmp_path):
    import numpy as np
    import torch
    import yaml

    from polyrl.plugins.control.demonstrations import save_demos

    rng = np.random.default_rng(0)
    episode = {"observations": rng.normal(size=(40, 3)).astype(np.float32),
               "actions": rng.uniform(-2, 2, size=(40, 1)).astype(np.float32),
               "next_observations": rng.normal(size=(40, 3)).astype(np.float32),
               "rewards": np.zeros(40, np.float32), "terminations": np.zeros(40, bool)}
    demos = save_demos(tmp_path / "demos.npz", [episode], "Pendulum-v1")
    config = {
        "run": {"iterations": 2, "prompts_per_iteration": 1, "samples_per_prompt": 1, "seed": 5,
                "output_dir": str(tmp_path / "run"), "cpu": True, "progress": False, "report": False},
        "prompts": {"items": ["Pendulum-v1"]},
        "policy": {"name": "gaussian", "env": "Pendulum-v1", "hidden_sizes": [16, 16]},
        "sampler": {"name": "gym", "max_episode_steps": 40},
        "rewards": {"smiling": {"demos": str(demos), "num_levels": 5, "expert_epochs": 5, "batch_size": 32,
                                "hidden_dim": 16, "learn_every": 40, "learn_samples": 64},
                    "env_reward": {"weight": 0.0}},
        "update": {"name": "sac", "batch_size": 16, "learning_starts": 16, "critic_hidden_sizes": [16, 16],
                   "replay_rewards": "recompute", "updates_per_step": 0.25},
        "optimizer": {"lr": 1e-3, "weight_decay": 0.0},
    }
    cfg_path = tmp_path / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(config))
    launcher = Path(sys.executable).with_name("accelerate")
    cmd = [str(launcher), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
           __file__, str(cfg_path), str(tmp_path)]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=HERE.parent)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]

    states = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert [s["num_processes"] for s in states] == [2, 2]
    # the ranks sampled different episodes...
    assert not torch.equal(states[0]["last_observations"], states[1]["last_observations"])
    # ...and still hold the same networks, which did train
    for group in ("policy", "critic", "learner", "log_alpha"):
        a, b = states[0][group], states[1][group]
        for k in a:
            assert torch.equal(a[k], b[k]), (group, k)
    assert states[0]["grad_steps"] > 0 and states[0]["rounds"] == 2


def worker(config_path: str, out_dir: str) -> None:
    import torch
    import yaml

    from polyrl import hookimpl
    from polyrl.host import Host
    from polyrl.loop import train

    host = Host()
    cfg = host.build_config(yaml.safe_load(Path(config_path).read_text()))
    last: dict = {}

    class Keep:
        @hookimpl
        def polyrl_iteration_end(self, trainer, iteration, metrics, rollout):
            last["obs"] = rollout.data["observations"].clone()

    host.register(Keep(), "keep")
    trainer = train(cfg, host)
    update, smiling = trainer.update, {name: fn for name, _, fn in trainer.rewards}["smiling"]
    torch.save({
        "num_processes": trainer.accelerator.num_processes,
        "last_observations": last["obs"],
        "policy": trainer.policy.trainable_state_dict(),
        "critic": {k: v.detach().clone() for k, v in update.critic.state_dict().items()},
        "log_alpha": {"log_alpha": update.log_alpha.detach().clone()},
        "learner": {k: v.detach().clone() for k, v in smiling.learner.state_dict().items()},
        "grad_steps": update.grad_steps,
        "rounds": smiling.rounds,
    }, Path(out_dir) / f"rank{trainer.accelerator.process_index}.pt")


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2])
