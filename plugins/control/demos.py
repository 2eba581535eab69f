"""``python -m polyrl.plugins.control.demos``: make or check demonstrations.

* ``expert CONFIG --out FILE [--episodes 10] [key=value ...]``: train an expert with ``polyrl
  train CONFIG`` (for example SAC on the environment reward), then write demonstrations of it;
* ``rollout --policy RUN_DIR/policy --out FILE [--episodes 10]``: write demonstrations of a
  saved policy;
* ``check FILE [--env ENV_ID]``: validate a (user-supplied) file and print a summary.

Demonstrations are episodes of the policy's *mean* action (``--stochastic`` samples instead).
The file format is described in :mod:`polyrl.plugins.control.demonstrations` and docs/imitation.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

import numpy as np
import torch

from polyrl.types import ConfigError

from .demonstrations import load_demos, save_demos


@torch.no_grad()
def rollout_episodes(policy, episodes: int, seed: int, deterministic: bool = True) -> list[dict[str, np.ndarray]]:
    """Run ``episodes`` episodes of ``policy`` and return their transitions (one dict per episode)."""
    from polyrl.types import Context

    from .sampler import GymSampler, GymSamplerConfig

    sampler = GymSampler(GymSamplerConfig(deterministic=deterministic))
    g = torch.Generator().manual_seed(seed)
    was_training = policy.training
    policy.eval()
    try:
        ro = sampler.sample(policy, [Context(prompt=policy.env_id, group=i) for i in range(episodes)], g)
    finally:
        sampler.close()
        policy.train(was_training)
    out = []
    for i in range(episodes):
        n = int(ro.mask[i].sum())
        out.append({
            "observations": ro.data["observations"][i, :n].numpy(),
            "actions": ro.data["actions"][i, :n].numpy(),
            "next_observations": ro.data["next_observations"][i, :n].numpy(),
            "rewards": ro.outputs["env_rewards"][i, :n].numpy(),
            "terminations": ro.data["terminations"][i, :n].numpy(),
        })
    return out


def write_policy_demos(policy_dir: str, out: str, episodes: int, seed: int, deterministic: bool = True) -> dict:
    from .policy import GaussianPolicy

    torch.set_num_threads(1)
    policy = GaussianPolicy.from_pretrained(policy_dir)
    eps = rollout_episodes(policy, episodes, seed, deterministic)
    path = save_demos(out, eps, policy.env_id)
    demos = load_demos(str(path))
    summary = {"file": str(out), "env_id": policy.env_id, "episodes": demos.num_episodes,
               "steps": int(demos.episode_lengths.sum()), "return_mean": float(demos.returns.mean()),
               "return_std": float(demos.returns.std(unbiased=False)), "deterministic": deterministic}
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m polyrl.plugins.control.demos",
                                     description="Make or check demonstrations for imitation learning (format: docs/imitation.md).")
    sub = parser.add_subparsers(dest="command", required=True)
    e = sub.add_parser("expert", help="train an expert with `polyrl train CONFIG`, then write its demonstrations")
    e.add_argument("config", help="run config of the expert (e.g. configs/sac_pendulum.yaml)")
    e.add_argument("overrides", nargs="*", help="dotted.key=value overrides of the config")
    r = sub.add_parser("rollout", help="write demonstrations of a saved policy")
    r.add_argument("--policy", required=True, help="a saved gaussian policy (a run's policy/ folder)")
    for s in (e, r):
        s.add_argument("--out", required=True, help="the .npz file to write")
        s.add_argument("--episodes", type=int, default=10, help="episodes to record (default 10)")
        s.add_argument("--seed", type=int, default=12345, help="seed of the recorded episodes")
        s.add_argument("--stochastic", action="store_true", help="sample actions instead of taking the mean")
    c = sub.add_parser("check", help="validate a demonstrations file and print a summary")
    c.add_argument("file")
    c.add_argument("--env", default=None, help="also check that it fits this environment")
    args = parser.parse_args(argv)
    try:
        if args.command == "check":
            info = None
            if args.env:
                from .envs import env_info

                info = env_info(args.env)
            d = load_demos(args.file, env_id=args.env, obs_dim=info.obs_dim if info else None,
                           action_dim=info.action_dim if info else None)
            print(json.dumps({"file": args.file, "env_id": d.env_id, "episodes": d.num_episodes,
                              "steps": int(d.episode_lengths.sum()), "obs_dim": d.observations.shape[1],
                              "action_dim": d.actions.shape[1],
                              "return_mean": None if d.returns is None else float(d.returns.mean())}, indent=2))
            return 0
        if args.episodes < 1:
            raise ConfigError(f"--episodes must be >= 1, got {args.episodes}")
        if args.command == "expert":
            from polyrl.config import apply_overrides, load_yaml
            from polyrl.host import Host
            from polyrl.loop import train

            torch.set_num_threads(1)
            host = Host()
            cfg = host.build_config(apply_overrides(load_yaml(args.config), args.overrides))
            if cfg.policy.name != "gaussian":
                raise ConfigError(f"policy.name: the expert must be a 'gaussian' policy, got {cfg.policy.name!r}")
            trainer = train(cfg, host)
            policy_dir = str(trainer.run_dir / "policy")
        else:
            policy_dir = args.policy
        summary = write_policy_demos(policy_dir, args.out, args.episodes, args.seed, not args.stochastic)
        summary["policy"] = policy_dir
        print(json.dumps(summary, indent=2))
        return 0
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
