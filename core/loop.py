"""The RL loop. Every modality and every algorithm runs through :func:`train`, top to bottom:

    contexts = prompts for this iteration
    rollout  = sample(policy, contexts)              # no grad; log-probs [B, T]
    rewards  = reward(rollout)                       # weighted components, each logged
    metrics  = update(policy, rollout, rewards)      # advantages, loss, optimizer steps
    log, checkpoint, report

Components come from plugins (see :mod:`polyrl.hookspecs`); the phases are pluggy hooks whose
defaults call the configured components.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import torch
import yaml
from accelerate import Accelerator
from tqdm.auto import tqdm

from .checkpoint import latest_checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .config import RunConfig
from .host import Host
from .prompts import PromptSource
from .types import ConfigError, Policy, RewardOutput, Rollout


def derive_seed(*parts: Any) -> int:
    """A stable 63-bit seed from any parts (seed, iteration, process, purpose)."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class Trainer:
    """What the phases share: config, accelerator, components, and the loop position.

    Attributes:
        config: the validated :class:`RunConfig`.
        accelerator: the ``accelerate.Accelerator`` (device, mixed precision, processes).
        policy: the unwrapped policy (for sampling and reference log-probs).
        model: the policy as prepared by accelerate (DDP-wrapped on several processes); call it
            to get log-probs with gradients that are synchronised across processes.
        sampler, rewards (list of ``(name, weight, fn)``), update, optimizer.
        iteration: the iteration in progress (1-based); ``completed`` the last finished one.
        run_dir: where the run writes.
    """

    def __init__(self, config: RunConfig, host: Host, resume: bool = False) -> None:
        self.config = config
        self.host = host
        run = config.run
        self.run_dir = Path(run.output_dir)
        if not resume and latest_checkpoint(self.run_dir) is not None:
            raise ConfigError(
                f"run.output_dir {str(self.run_dir)!r} already holds a run with checkpoints; continue it with "
                f"`polyrl train --resume {self.run_dir}` or choose another run.output_dir"
            )
        self.accelerator = Accelerator(cpu=run.cpu, mixed_precision=run.mixed_precision)
        self.iteration = 0
        self.completed = 0
        self.sample_batch = 0
        self.prompts = PromptSource(config.prompts, run.seed)
        torch.manual_seed(derive_seed(run.seed, "init", self.accelerator.process_index))

        # Components: the policy first (samplers and rewards may share its device and tokenizer).
        policy: Policy = host.build_policy(config)
        self.policy = policy.to(self.accelerator.device)
        self.sampler = host.build_sampler(config, self.policy)
        self.rewards = host.build_rewards(config, self.policy)
        self.update = host.build_update(config)
        params = self.policy.trainable_parameters()
        if not params:
            raise ConfigError(f"policy {config.policy.name!r} has no trainable parameters")
        opt = config.optimizer
        optimizer = torch.optim.AdamW(
            params, lr=opt.lr, betas=(opt.beta1, opt.beta2), eps=opt.eps, weight_decay=opt.weight_decay
        )
        self.model, self.optimizer = self.accelerator.prepare(self.policy, optimizer)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, opt.lr_factor(run.iterations))
        self.phase = "setup"
        self._stop_requested = False

    # ------------------------------------------------------------------ helpers for updates
    def generator(self, purpose: str) -> torch.Generator:
        """A CPU generator seeded from (seed, iteration, process, purpose)."""
        seed = derive_seed(self.config.run.seed, self.iteration, self.accelerator.process_index, purpose)
        return torch.Generator().manual_seed(seed)

    def no_sync(self, sync: bool) -> contextlib.AbstractContextManager:
        """Around a micro-step's forward and backward: skip the gradient all-reduce unless ``sync``
        (the last micro-step before :meth:`optimizer_step`)."""
        return contextlib.nullcontext() if sync else self.accelerator.no_sync(self.model)

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    def optimizer_step(self) -> float:
        """Clip the gradient norm (``optimizer.max_grad_norm``), step, zero; returns the norm."""
        params = self.policy.trainable_parameters()
        max_norm = self.config.optimizer.max_grad_norm
        if max_norm > 0:
            norm = self.accelerator.clip_grad_norm_(params, max_norm)
        else:
            grads = [p.grad.norm() for p in params if p.grad is not None]
            norm = torch.stack(grads).norm() if grads else torch.tensor(0.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    # ------------------------------------------------------------------ checkpoints
    def _state(self) -> dict[str, Any]:
        return {
            "trainable": self.policy.trainable_state_dict(),
            "optimizer": {
                "optimizer": copy.deepcopy(self.optimizer.state_dict()),
                "scheduler": self.scheduler.state_dict(),
            },
            "update": copy.deepcopy(self.update.state_dict()),
            "rewards": {name: copy.deepcopy(fn.state_dict()) for name, _, fn in self.rewards if hasattr(fn, "state_dict")},
        }

    def _restore(self, state: dict[str, Any]) -> None:
        self.policy.load_trainable_state_dict(state["trainable"])
        self.optimizer.load_state_dict(state["optimizer"]["optimizer"])
        self.scheduler.load_state_dict(state["optimizer"]["scheduler"])
        self.update.load_state_dict(state["update"])
        for name, _, fn in self.rewards:
            if hasattr(fn, "load_state_dict"):
                fn.load_state_dict(state.get("rewards", {}).get(name, {}))

    def save(self, iteration: int, state: dict[str, Any] | None = None) -> None:
        """Write a checkpoint of the state after ``iteration`` (main process only; no collectives)."""
        if not self.accelerator.is_main_process:
            return
        state = state or self._state()
        save_checkpoint(
            self.run_dir, iteration, state["trainable"],
            {"optimizer": state["optimizer"], "update": state["update"], "rewards": state["rewards"],
             "rng": rng_state()},
            {"seed": self.config.run.seed}, keep=self.config.run.keep_checkpoints,
        )

    def resume(self) -> None:
        path = latest_checkpoint(self.run_dir)
        if path is None:
            raise ConfigError(f"--resume: no checkpoint under {str(self.run_dir / 'checkpoints')!r}")
        ckpt = load_checkpoint(path)
        self._restore(ckpt)
        set_rng_state(ckpt["rng"])
        self.completed = self.iteration = int(ckpt["trainer"]["iteration"])
        metrics = self.run_dir / "metrics.jsonl"
        if self.accelerator.is_main_process and metrics.is_file():  # drop iterations after the checkpoint
            kept = [l for l in metrics.read_text().splitlines() if l and json.loads(l)["iteration"] <= self.completed]
            metrics.write_text("".join(l + "\n" for l in kept))

    # ------------------------------------------------------------------ logging
    def _mean_over_processes(self, values: dict[str, float]) -> dict[str, float]:
        if self.accelerator.num_processes == 1 or not values:
            return values
        keys = sorted(values)
        t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=self.accelerator.device)
        t = self.accelerator.reduce(t, reduction="mean")
        return dict(zip(keys, t.tolist()))

    @contextlib.contextmanager
    def _sigint_defers(self) -> Iterator[None]:
        """First Ctrl-C: finish the iteration, save, stop. Second: stop now (a checkpoint is still written)."""
        previous = signal.getsignal(signal.SIGINT)

        def handler(signum, frame):  # noqa: ARG001
            if self._stop_requested:
                raise KeyboardInterrupt
            self._stop_requested = True
            tqdm.write("polyrl: stopping after this iteration (Ctrl-C again to stop now)", file=sys.stderr)

        try:
            signal.signal(signal.SIGINT, handler)
        except ValueError:  # not the main thread
            yield
            return
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)


def train(config: RunConfig, host: Host, resume: bool = False) -> Trainer:
    """Run (or with ``resume`` continue) the configured RL fine-tuning. Returns the trainer."""
    trainer = Trainer(config, host, resume=resume)
    acc, run, hook = trainer.accelerator, config.run, host.pm.hook
    if resume:
        trainer.resume()
    if acc.is_main_process:
        trainer.run_dir.mkdir(parents=True, exist_ok=True)
        (trainer.run_dir / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
        (trainer.run_dir / "plugins.json").write_text(json.dumps(host.plugin_versions(), indent=2))
    from . import report

    if acc.is_main_process and run.report and trainer.completed == 0:
        report.record_samples(trainer, tag=0)
    hook.polyrl_run_start(trainer=trainer)

    bar = tqdm(total=run.iterations, initial=trainer.completed, desc="polyrl", unit="it",
               disable=not (run.progress and acc.is_main_process), dynamic_ncols=True)
    snapshot: dict[str, Any] | None = None
    reward_pool = ThreadPoolExecutor(1, thread_name_prefix="polyrl-reward") if run.async_rewards else None
    try:
        with trainer._sigint_defers():
            for it in range(trainer.completed + 1, run.iterations + 1):
                trainer.iteration = it
                torch.manual_seed(derive_seed(run.seed, it, acc.process_index, "torch"))
                contexts = trainer.prompts.contexts(
                    it, acc.process_index, acc.num_processes, run.prompts_per_iteration, run.samples_per_prompt
                )

                trainer.phase = "sample"
                t0 = time.perf_counter()
                batches: list[Rollout] = []
                pending = []  # rewards of earlier batches, computing while the next batch samples
                size = len(contexts) // run.sample_batches
                for k in range(run.sample_batches):
                    trainer.sample_batch = k
                    batch = hook.polyrl_sample(trainer=trainer, contexts=contexts[k * size : (k + 1) * size])
                    batches.append(batch)
                    if reward_pool is not None:
                        pending.append(reward_pool.submit(hook.polyrl_reward, trainer=trainer, rollout=batch))

                trainer.phase = "reward"
                t1 = time.perf_counter()
                if reward_pool is not None:
                    scored = [f.result() for f in pending]
                else:
                    scored = [hook.polyrl_reward(trainer=trainer, rollout=b) for b in batches]
                rollout, rewards = Rollout.cat(batches), RewardOutput.cat(scored)

                trainer.phase = "update"
                t2 = time.perf_counter()
                snapshot = trainer._state()  # restored if the update fails half-way
                stats = dict(hook.polyrl_update(trainer=trainer, rollout=rollout, rewards=rewards.total) or {})
                lr = trainer.optimizer.param_groups[0]["lr"]  # the rate this iteration used
                trainer.scheduler.step()
                t3 = time.perf_counter()
                for name, _, fn in trainer.rewards:  # learned rewards train on what was just sampled
                    if hasattr(fn, "learn"):
                        stats.update({f"reward_learn/{name}/{k}": v for k, v in (fn.learn(trainer, rollout) or {}).items()})
                t4 = time.perf_counter()
                trainer.phase = "log"
                trainer.completed = it
                snapshot = None

                all_rewards = acc.gather(rewards.per_sample.to(acc.device)).cpu()
                per_sample = lambda v: v.sum(1) if v.dim() == 2 else v  # noqa: E731
                metrics = {
                    "iteration": it,
                    "reward_mean": all_rewards.mean().item(),
                    "reward_std": all_rewards.std(unbiased=False).item(),
                    **{f"reward/{k}": acc.gather(per_sample(v).to(acc.device)).mean().item()
                       for k, v in rewards.components.items()},
                    **trainer._mean_over_processes(
                        {"time/sample": t1 - t0, "time/reward": t2 - t1, "time/update": t3 - t2, "time/learn": t4 - t3,
                         "lr": lr,
                         **{k: float(v) for k, v in (stats or {}).items()}}
                    ),
                }
                if acc.is_main_process:
                    with (trainer.run_dir / "metrics.jsonl").open("a") as f:
                        f.write(json.dumps(metrics) + "\n")
                hook.polyrl_iteration_end(trainer=trainer, iteration=it, metrics=metrics, rollout=rollout)
                bar.update(1)
                bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}", sample=f"{t1 - t0:.1f}s",
                                reward_t=f"{t2 - t1:.1f}s", update=f"{t3 - t2:.1f}s")

                stop = torch.tensor(float(trainer._stop_requested), device=acc.device)
                stop = acc.reduce(stop, reduction="sum").item() > 0
                if it % run.save_every == 0 or it == run.iterations or stop:
                    trainer.save(it)
                    acc.wait_for_everyone()
                if acc.is_main_process and run.report and run.report_every and it % run.report_every == 0:
                    report.record_samples(trainer, tag=it)
                if stop:
                    raise KeyboardInterrupt
    except BaseException as error:
        bar.close()
        if reward_pool is not None:
            reward_pool.shutdown(wait=True, cancel_futures=True)
        if trainer.completed > 0 and trainer.phase != "setup":
            if snapshot is not None:  # the update had begun: go back to the state before it
                trainer._restore(snapshot)
            if latest_checkpoint(trainer.run_dir) != _ckpt(trainer, trainer.completed):
                trainer.save(trainer.completed)
            if acc.is_main_process:
                tqdm.write(
                    f"polyrl: stopped during iteration {trainer.iteration} ({type(error).__name__}); "
                    f"checkpoint of iteration {trainer.completed} saved; continue with "
                    f"`polyrl train --resume {trainer.run_dir}`",
                    file=sys.stderr,
                )
        hook.polyrl_run_end(trainer=trainer, error=error)
        raise
    bar.close()
    if reward_pool is not None:
        reward_pool.shutdown()
    policy_dir = trainer.run_dir / "policy"
    if acc.is_main_process:
        trainer.policy.save_pretrained(str(policy_dir))
        if run.report:
            if not run.report_every or run.iterations % run.report_every:
                report.record_samples(trainer, tag=run.iterations)
            report.write_report(trainer.run_dir)
    acc.wait_for_everyone()
    hook.polyrl_run_end(trainer=trainer, error=None)
    return trainer


def _ckpt(trainer: Trainer, iteration: int) -> Path:
    from .checkpoint import checkpoint_path

    return checkpoint_path(trainer.run_dir, iteration)
