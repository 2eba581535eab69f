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
import math
import os
import signal
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import yaml
from accelerate import Accelerator
from tqdm.auto import tqdm

from . import atomic, trackers
from .checkpoint import (full_optimizer_state, latest_checkpoint, leftover_tmp, load_checkpoint, rng_state,
                         save_checkpoint, set_rng_state, shard_optimizer_state)
from .config import RunConfig
from .context import UpdateContext
from .errors import NonFiniteError, PolyrlError, RunStopped
from .heldout import HeldOut
from .host import Host
from .optim import apply_numeric_settings, build_optimizer
from .prompts import PromptSource
from .resume import check_resume
from .stats import as_floats
from .types import ConfigError, Policy, RewardOutput, Rollout

#: The signals that ask a run to stop: the first one finishes the iteration, saves and stops; a
#: second one stops at once (the checkpoint of the last completed iteration is still written).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
#: ``run.update_snapshot: auto`` copies the state before each update up to this many trainable parameters
SNAPSHOT_AUTO_MAX = 50_000_000


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
        sharded: True when the policy's parameters are shards (FSDP2 through accelerate's profile,
            or ``shard_policy``); checkpoints, ``policy/`` and the report then gather them, with
            every process taking part.

    Args:
        shard_policy: ``fn(policy, accelerator)``, called on every process after the components are
            built and before the optimizer is, to shard the policy in place (e.g. FSDP2's
            ``fully_shard`` on each transformer block, then on the policy, as accelerate's FSDP2
            profile does). Its trainable parameters must then be DTensors; accelerate prepares
            only the optimizer (the sharded policy is not wrapped in DDP). For launches where
            accelerate does not shard (its FSDP plugin is GPU-only: CPU process groups); on GPUs
            use the accelerate profile and leave it None.
    """

    def __init__(self, config: RunConfig, host: Host, resume: bool = False,
                 shard_policy: Callable[[Policy, Accelerator], Any] | None = None) -> None:
        self.config = config
        self.host = host
        run = config.run
        self.run_dir = Path(run.output_dir)
        if not resume and latest_checkpoint(self.run_dir) is not None:
            raise ConfigError(
                f"run.output_dir {str(self.run_dir)!r} already holds a run with checkpoints; continue it with "
                f"`polyrl train --resume {self.run_dir}` or choose another run.output_dir"
            )
        # launched as several processes on a machine without a GPU: one CPU process group (without
        # cpu=True accelerate would start each process as a separate one-process run)
        several = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
        self.accelerator = Accelerator(cpu=run.cpu or several, mixed_precision=run.mixed_precision,
                                       **trackers.accelerator_kwargs(run.log_with, self.run_dir))
        if self.accelerator.distributed_type.value == "DEEPSPEED":
            # before any model loads: ZeRO partitions what the checkpoints and policy/ read whole
            raise ConfigError(
                "accelerate's DeepSpeed mode is not supported by the loop: its checkpoints, policy/ export and "
                "sampling would read ZeRO's partitioned parameters and optimizer states as if whole, and a run could "
                "not be resumed. Launch with configs/accelerate/fsdp2.yaml (FSDP2 sharding, resumable) instead"
            )
        if run.threads:
            torch.set_num_threads(run.threads)
        numeric_notes = apply_numeric_settings(run)
        if self.accelerator.is_main_process:
            if run.mixed_precision == "fp16" and self.accelerator.device.type == "cpu":
                print("polyrl: mixed_precision fp16 has no autocast on a CPU: this run computes in float32 "
                      "(bf16 has one on CPUs)", file=sys.stderr, flush=True)
            for note in numeric_notes:
                print(f"polyrl: {note}", file=sys.stderr, flush=True)
        self.iteration = 0
        self.completed = 0
        self.sample_batch = 0
        self.prompts = PromptSource(config.prompts, run.seed)
        if self.accelerator.is_main_process:  # after the prompts: a bad prompt file is the only line then
            print(f"polyrl: {launch_summary(self.accelerator)}", file=sys.stderr, flush=True)
        torch.manual_seed(derive_seed(run.seed, "init", self.accelerator.process_index))

        # Components: the policy first (samplers and rewards may share its device and tokenizer).
        policy: Policy = host.build_policy(config)
        self.policy = policy.to(self.accelerator.device)
        self.sampler = host.build_sampler(config, self.policy)
        self.rewards = host.build_rewards(config, self.policy)
        self.update = host.build_update(config)
        self.heldout = HeldOut(self) if config.eval is not None else None  # rewards the update never sees
        if shard_policy is not None or self.accelerator.distributed_type.value == "FSDP":
            # sharding keeps each process's own slice: start from process 0's weights, as DDP does
            # (the trainable initialisation, LoRA's or a value head's, is drawn per process)
            _broadcast_trainable(self.policy, self.accelerator)
        if shard_policy is not None:
            shard_policy(self.policy, self.accelerator)
            if not _sharded(self.policy):
                raise ConfigError("shard_policy left the policy's trainable parameters unsharded (no DTensors)")
        params = self.policy.trainable_parameters()
        if not params:
            raise ConfigError(f"policy {config.policy.name!r} has no trainable parameters")
        opt = config.optimizer
        optimizer = build_optimizer(params, opt)
        if shard_policy is not None:  # already sharded: no DDP wrapper around it
            self.model, self.optimizer = self.policy, self.accelerator.prepare(optimizer)
        else:
            self.model, self.optimizer = self.accelerator.prepare(self.policy, optimizer)
        self.sharded = _sharded(self.policy)
        if self.sharded:  # accelerate's FSDP2 replaces the parameters with DTensor ones
            params = self.policy.trainable_parameters()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, opt.lr_factor(run.iterations))
        self._trainable = params
        n_trainable = sum(p.numel() for p in params)
        #: copy the state before each update (see ``run.update_snapshot``)
        self.snapshot_updates = run.update_snapshot == "memory" or (
            run.update_snapshot == "auto" and n_trainable <= SNAPSHOT_AUTO_MAX)
        self.phase = "setup"
        self._stop_requested = False
        self.on_sample_chunk: Any = None  # set by the loop while a batch samples (async rewards)
        self._update_context: UpdateContext | None = None  # the iteration's, built by the loop
        self.optimizer_steps = 0  # optimizer steps taken in this process (a failed update: did it step?)
        self._stop_signal: int | None = None
        self._stopped_together = False  # every process raised RunStopped at the same point
        self._saving = False

    # ------------------------------------------------------------------ helpers for updates
    def update_context(self) -> UpdateContext:
        """What the update sees of the run in the iteration in progress (built once per iteration)."""
        ctx = self._update_context
        if ctx is None or ctx.iteration != self.iteration:
            ctx = self._update_context = UpdateContext.from_trainer(self)
        return ctx

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
        """Clip the gradient norm (``optimizer.max_grad_norm``), step, zero; returns the norm.

        A non-finite gradient norm (a NaN or infinite loss, or an overflow) raises
        :class:`NonFiniteError` before the step, so the weights stay finite; the loop then stops with
        the checkpoint of the last completed iteration."""
        params = self._trainable  # the list is built once, not at every step
        max_norm = self.config.optimizer.max_grad_norm
        if max_norm > 0:
            norm = self.accelerator.clip_grad_norm_(params, max_norm)
        else:
            grads = [p.grad.norm() for p in params if p.grad is not None]
            norm = torch.stack(grads).norm() if grads else torch.tensor(0.0)
        if callable(getattr(norm, "full_tensor", None)):  # sharded gradients: the global norm
            norm = norm.full_tensor()
        # the optimizer step's one host sync: whether the step may run must be known before it runs
        value = float(norm)
        if not math.isfinite(value):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteError(
                f"the gradient norm became {value} in iteration {self.iteration} (a NaN or infinite loss or reward); "
                f"no weights were changed by it. Lower optimizer.lr, check the rewards, or set "
                f"optimizer.max_grad_norm, then continue with --resume"
            )
        self.optimizer.step()
        self.optimizer_steps += 1
        self.optimizer.zero_grad(set_to_none=True)
        return value

    # ------------------------------------------------------------------ checkpoints
    def _state(self, everywhere: bool = True) -> dict[str, Any]:
        """The state a checkpoint holds; with a sharded policy every process must call it (the
        weights and the optimizer's moments are gathered into full tensors; ``everywhere=False``:
        only the main process keeps the optimizer's, the one that writes)."""
        keep = everywhere or self.accelerator.is_main_process
        return {
            "trainable": self.policy.trainable_state_dict(),
            "optimizer": {
                "optimizer": full_optimizer_state(self.optimizer, keep=keep),
                "scheduler": self.scheduler.state_dict(),
            },
            "update": copy.deepcopy(self.update.state_dict()),
            "rewards": {name: copy.deepcopy(fn.state_dict()) for name, _, fn in self.rewards if hasattr(fn, "state_dict")},
        }

    def _restore(self, state: dict[str, Any]) -> None:
        self.policy.load_trainable_state_dict(state["trainable"])
        self.optimizer.load_state_dict(shard_optimizer_state(self.optimizer, state["optimizer"]["optimizer"]))
        self.scheduler.load_state_dict(state["optimizer"]["scheduler"])
        self.update.load_state_dict(state["update"])
        for name, _, fn in self.rewards:
            if hasattr(fn, "load_state_dict"):
                fn.load_state_dict(state.get("rewards", {}).get(name, {}))

    def save(self, iteration: int, state: dict[str, Any] | None = None) -> None:
        """Write a checkpoint of the state after ``iteration``: the main process writes. Unsharded,
        only the main process needs to call it (no collectives); sharded, every process must
        (the state is gathered)."""
        if not self.accelerator.is_main_process and not self.sharded:
            return
        state = state or self._state(everywhere=False)
        if not self.accelerator.is_main_process:
            return
        self._saving = True
        try:
            save_checkpoint(
                self.run_dir, iteration, state["trainable"],
                {"optimizer": state["optimizer"], "update": state["update"], "rewards": state["rewards"],
                 "rng": rng_state()},
                {"seed": self.config.run.seed}, keep=self.config.run.keep_checkpoints,
                config_text=self.config_text(),
            )
        finally:
            self._saving = False

    def save_policy(self) -> None:
        """Write ``policy/`` (see the policy's ``save_pretrained``): unsharded, the main process
        writes and only it needs to call this; sharded, every process must (the weights are
        gathered; rank 0 writes)."""
        if self.sharded or self.accelerator.is_main_process:
            self.policy.save_pretrained(str(self.run_dir / "policy"))

    def gathered(self) -> contextlib.AbstractContextManager:
        """Around what calls the policy on some processes only, or a different number of times on
        each (the report's samples, the held-out evaluation): with a sharded policy every process
        enters it together and every parameter is gathered for the block, so that the policy's
        passes inside need no collectives. Nothing happens without sharding."""
        if self.sharded and hasattr(self.policy, "unsharded"):
            return self.policy.unsharded(recurse=True)
        return contextlib.nullcontext()

    def config_text(self) -> str:
        return yaml.safe_dump(self.config.to_dict(), sort_keys=False)

    def resume(self) -> list[str]:
        """Restore the newest checkpoint and make ``metrics.jsonl`` agree with it (the checkpoint is
        the single source of truth for where the run stands). Returns messages to show."""
        path = latest_checkpoint(self.run_dir)
        if path is None:
            raise ConfigError(f"--resume: no checkpoint under {str(self.run_dir / 'checkpoints')!r}")
        ckpt = load_checkpoint(path)
        done = int(ckpt["trainer"]["iteration"])
        messages: list[str] = []
        self._restore(ckpt)
        set_rng_state(ckpt["rng"])
        self._apply_optimizer_settings()
        self.completed = self.iteration = done
        if self.accelerator.is_main_process:
            messages += self._trim_metrics(self.completed)
        return messages

    def _apply_optimizer_settings(self) -> None:
        """After a restore: the configured AdamW settings win over the ones saved with its state
        (a changed ``optimizer.lr`` is applied, never silently ignored)."""
        opt = self.config.optimizer
        for group in self.optimizer.param_groups:
            group["initial_lr"] = opt.lr
            group.update(betas=(opt.beta1, opt.beta2), eps=opt.eps, weight_decay=opt.weight_decay)
        self.scheduler.base_lrs = [opt.lr for _ in self.optimizer.param_groups]
        factor = opt.lr_factor(self.config.run.iterations)
        self.scheduler.lr_lambdas = [factor for _ in self.optimizer.param_groups]
        for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
            group["lr"] = base * factor(self.scheduler.last_epoch)

    def _trim_metrics(self, completed: int) -> list[str]:
        """Keep the metrics of iterations ``<= completed`` (once each); torn lines are dropped and reported.
        The file is replaced atomically, and only when something changes."""
        path = self.run_dir / "metrics.jsonl"
        if not path.exists():
            return []
        records, warnings = atomic.read_jsonl(path)
        kept, seen = [], set()
        for r in records:
            it = r.get("iteration")
            if isinstance(it, int) and 1 <= it <= completed and it not in seen:
                kept.append(r)
                seen.add(it)
        if warnings or len(kept) != len(records):
            atomic.write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
        return warnings

    # ------------------------------------------------------------------ logging
    def _mean_over_processes(self, values: dict[str, float]) -> dict[str, float]:
        if self.accelerator.num_processes == 1 or not values:
            return values
        keys = sorted(values)
        t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=self.accelerator.device)
        t = self.accelerator.reduce(t, reduction="mean")
        return dict(zip(keys, t.tolist()))

    @contextlib.contextmanager
    def _signals_defer(self) -> Iterator[None]:
        """SIGINT (Ctrl-C) and SIGTERM (what schedulers send): the first finishes the iteration, saves
        and stops; a second one stops now (the checkpoint of the last completed iteration is still
        written). A second signal that arrives while a checkpoint is being written waits for the write."""

        def handler(signum, frame):  # noqa: ARG001
            name = signal.Signals(signum).name
            if self._stop_requested and not self._saving:
                raise RunStopped(signum)
            if not self._stop_requested:
                self._stop_requested = True
                self._stop_signal = signum
                again = "Ctrl-C" if signum == signal.SIGINT else name
                tqdm.write(f"polyrl: {name} received: stopping after this iteration ({again} again to stop now)",
                           file=sys.stderr)

        previous = {}
        try:
            for sig in STOP_SIGNALS:
                previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread
            yield
            return
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)


def _broadcast_trainable(policy: Policy, acc: Accelerator) -> None:
    """Every process's trainable parameters become process 0's (before sharding)."""
    if acc.num_processes > 1:
        with torch.no_grad():
            for p in policy.trainable_parameters():
                torch.distributed.broadcast(p.data, src=0)


def _sharded(policy: torch.nn.Module) -> bool:
    """Whether the policy's parameters are shards (DTensors: FSDP2)."""
    return any(hasattr(p, "device_mesh") and hasattr(p, "placements") for p in policy.parameters())


def launch_summary(acc: Accelerator) -> str:
    """One line: how many processes, on which device, in which distributed mode, with how many
    CPU threads each."""
    n = acc.num_processes
    mode = acc.distributed_type.value if n > 1 or acc.distributed_type.value != "NO" else "none"
    if n > 1 and torch.distributed.is_initialized():
        mode += f", {torch.distributed.get_backend()}"
    return (f"{n} process{'es' if n != 1 else ''} on {acc.device.type}, distributed: {mode}, "
            f"{torch.get_num_threads()} CPU thread{'s' if torch.get_num_threads() != 1 else ''} each, "
            f"mixed precision: {acc.mixed_precision}")


def train(config: RunConfig, host: Host, resume: bool = False,
          shard_policy: Callable[[Policy, Accelerator], Any] | None = None) -> Trainer:
    """Run (or with ``resume`` continue) the configured RL fine-tuning. Returns the trainer.
    ``shard_policy``: see :class:`Trainer` (sharding where accelerate does not apply it)."""
    changes = check_resume(config) if resume else []  # refused changes stop here, before any model loads
    trainer = Trainer(config, host, resume=resume, shard_policy=shard_policy)
    acc, run, hook = trainer.accelerator, config.run, host.pm.hook
    messages = changes + (trainer.resume() if resume else [])
    if acc.is_main_process:
        trainer.run_dir.mkdir(parents=True, exist_ok=True)
        for path in leftover_tmp(trainer.run_dir):  # a checkpoint write that a crash cut short
            messages.append(f"removed an incomplete checkpoint write: {path.name}")
            import shutil

            shutil.rmtree(path, ignore_errors=True)
        if not resume:
            messages += trainer._trim_metrics(0)  # a fresh start: metrics of an earlier attempt are dropped
        atomic.write_text(trainer.run_dir / "config.yaml", trainer.config_text())
        atomic.write_text(trainer.run_dir / "plugins.json", json.dumps(host.plugin_versions(), indent=2))
        for m in messages:
            tqdm.write(f"polyrl: {m}", file=sys.stderr)
    from . import report

    trackers.start(trainer)
    if run.report and trainer.completed == 0:
        with trainer.gathered():  # sharded: every process gathers, the main one samples
            if acc.is_main_process:
                report.record_samples(trainer, tag=0)
    _lifecycle(trainer, "setup")
    hook.polyrl_run_start(trainer=trainer)

    bar = tqdm(total=run.iterations, initial=trainer.completed, desc="polyrl", unit="it",
               disable=not (run.progress and acc.is_main_process), dynamic_ncols=True)
    snapshot: dict[str, Any] | None = None
    in_update, steps_before = False, 0  # the update (and learned rewards) may have changed the state
    reward_pool = ThreadPoolExecutor(1, thread_name_prefix="polyrl-reward") if run.async_rewards else None
    # chunk by chunk only through the default sample hook (wrappers may observe it): a plugin's
    # own sample hook returns one batch
    # and when no reward needs whole groups (a win rate among the group)
    samplers = [i for i in hook.polyrl_sample.get_hookimpls() if not (i.hookwrapper or i.wrapper)]
    chunked = (reward_pool is not None and len(samplers) == 1
               and not any(getattr(fn, "scores_groups", False) for _, _, fn in trainer.rewards))
    try:
        with trainer._signals_defer():
            for it in range(trainer.completed + 1, run.iterations + 1):
                trainer.iteration = it
                hook.polyrl_iteration_start(trainer=trainer, iteration=it)
                torch.manual_seed(derive_seed(run.seed, it, acc.process_index, "torch"))
                contexts = trainer.prompts.contexts(
                    it, acc.process_index, acc.num_processes, run.prompts_per_iteration, run.samples_per_prompt
                )

                trainer.phase = "sample"
                t0 = time.perf_counter()
                batches: list[Rollout] = []
                pending = []  # rewards of earlier chunks and batches, computing while the next one samples
                size = len(contexts) // run.sample_batches
                for k in range(run.sample_batches):
                    trainer.sample_batch = k
                    if chunked:  # the default sample hook reports each chunk as soon as it is ready
                        trainer.on_sample_chunk = lambda chunk: pending.append(
                            reward_pool.submit(hook.polyrl_reward, trainer=trainer, rollout=chunk))
                    batch = hook.polyrl_sample(trainer=trainer, contexts=contexts[k * size : (k + 1) * size])
                    trainer.on_sample_chunk = None
                    batches.append(batch)
                    if reward_pool is not None and not chunked:
                        pending.append(reward_pool.submit(hook.polyrl_reward, trainer=trainer, rollout=batch))

                trainer.phase = "reward"
                t1 = time.perf_counter()
                if reward_pool is not None:
                    scored = [f.result() for f in pending]
                else:
                    scored = [hook.polyrl_reward(trainer=trainer, rollout=b) for b in batches]
                rollout, rewards = Rollout.cat(batches), RewardOutput.cat(scored)
                if rewards.components:  # each reward's per-sample score [B, K], for updates that
                    # normalise rewards separately (GRPO's multi_objective_aggregation)
                    rollout.outputs["reward_components"] = torch.stack(
                        [v.sum(1) if v.dim() == 2 else v for v in rewards.components.values()], dim=1)

                trainer.phase = "update"
                t2 = time.perf_counter()
                in_update, steps_before = True, trainer.optimizer_steps
                snapshot = trainer._state() if trainer.snapshot_updates else None  # restored if the update fails
                trainer._update_context = UpdateContext.from_trainer(trainer)  # what the update step sees
                stats = dict(hook.polyrl_update(trainer=trainer, rollout=rollout, rewards=rewards.total) or {})
                lr = trainer.optimizer.param_groups[0]["lr"]  # the rate this iteration used
                with warnings.catch_warnings():  # the schedule is per iteration, and an iteration may make
                    # no optimizer step (an off-policy learner's warm-up): torch's order warning does not apply
                    warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
                    trainer.scheduler.step()
                t3 = time.perf_counter()
                for name, _, fn in trainer.rewards:  # learned rewards train on what was just sampled
                    if hasattr(fn, "learn"):
                        stats.update({f"reward_learn/{name}/{k}": v for k, v in (fn.learn(trainer, rollout) or {}).items()})
                t4 = time.perf_counter()
                trainer.phase = "log"
                trainer.completed = it
                snapshot, in_update = None, False

                all_rewards, components = _gathered_rewards(acc, rewards)  # the iteration's one host sync
                metrics = {
                    "iteration": it,
                    "reward_mean": all_rewards.mean().item(),  # (on the host already: no sync)
                    "reward_std": all_rewards.std(unbiased=False).item(),
                    **{f"reward/{k}": v for k, v in components.items()},
                    **trainer._mean_over_processes(
                        {"time/sample": t1 - t0, "time/reward": t2 - t1, "time/update": t3 - t2, "time/learn": t4 - t3,
                         "lr": lr,
                         **as_floats(stats or {})}  # an update's tensors (if any) in one read
                    ),
                }
                if trainer.heldout is not None and trainer.heldout.due(it, run.iterations):
                    trainer.phase = "eval"
                    with trainer.gathered():
                        metrics.update(trainer.heldout.run(trainer))
                    trainer.phase = "log"
                if acc.is_main_process:
                    atomic.append_line(trainer.run_dir / "metrics.jsonl", json.dumps(metrics))
                trackers.log_metrics(acc, metrics, step=it)
                hook.polyrl_iteration_end(trainer=trainer, iteration=it, metrics=metrics, rollout=rollout)
                bar.update(1)
                bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}", sample=f"{t1 - t0:.1f}s",
                                reward_t=f"{t2 - t1:.1f}s", update=f"{t3 - t2:.1f}s")

                periodic = it % run.save_every == 0 or it == run.iterations
                if periodic:
                    trainer.save(it)
                    acc.wait_for_everyone()
                # read after the periodic save, so that a signal that arrived during it stops here
                stop = torch.tensor(float(trainer._stop_requested), device=acc.device)
                stop = acc.reduce(stop, reduction="sum").item() > 0
                if stop and not periodic:
                    trainer.save(it)
                    acc.wait_for_everyone()
                if run.report and run.report_every and it % run.report_every == 0:
                    with trainer.gathered():
                        if acc.is_main_process:
                            report.record_samples(trainer, tag=it)
                if stop:
                    trainer._stopped_together = True
                    raise RunStopped(trainer._stop_signal or signal.SIGINT)
    except BaseException as error:
        bar.close()
        if reward_pool is not None:
            reward_pool.shutdown(wait=True, cancel_futures=True)
        saved = None
        if trainer.completed > 0 and trainer.phase != "setup":
            if snapshot is not None:  # the update had begun: go back to the state before it
                trainer._restore(snapshot)
            # without a snapshot, memory holds the state before the update only if it had not stepped
            consistent = snapshot is not None or not in_update or trainer.optimizer_steps == steps_before
            saved = latest_checkpoint(trainer.run_dir) == _ckpt(trainer, trainer.completed)
            # no second attempt into the failure that stopped the run: a full disk, or non-finite
            # weights outside the update (a non-finite gradient is caught before its step)
            retry = consistent and not saved and not isinstance(error, atomic.DiskFullError) and not (
                isinstance(error, NonFiniteError) and not in_update
            )
            # sharded, saving gathers (a collective): only where every process stopped at the same
            # point (the agreed stop; a non-finite global gradient norm), never after one process's error
            together = not trainer.sharded or trainer._stopped_together or (
                isinstance(error, NonFiniteError) and in_update)
            retry = retry and together
            if retry:
                try:
                    trainer.save(trainer.completed)
                    saved = True
                except (OSError, PolyrlError) as save_error:
                    if acc.is_main_process:
                        tqdm.write(f"polyrl: could not write the emergency checkpoint: {save_error}", file=sys.stderr)
            if acc.is_main_process:
                newest = latest_checkpoint(trainer.run_dir)
                what = (f"checkpoint of iteration {trainer.completed} saved" if saved else
                        f"newest checkpoint: {newest.name}" if newest is not None else "no checkpoint was written")
                if not consistent:
                    what += (" (the update had already changed the weights and run.update_snapshot kept no copy "
                             "of the state before it)")
                tqdm.write(
                    f"polyrl: stopped during iteration {trainer.iteration} ({_reason(error)}); {what}"
                    + (f"; continue with `polyrl train --resume {trainer.run_dir}`" if newest is not None else ""),
                    file=sys.stderr,
                )
                _outputs_after_stop(trainer, save_policy=bool(saved) and not trainer.sharded)
            if trainer.sharded and together:  # every process is here: agree on the outcome, then gather
                everywhere = acc.reduce(torch.tensor(float(bool(saved)), device=acc.device), reduction="sum")
                if everywhere.item() == acc.num_processes:
                    _quietly("saving policy/", trainer.save_policy)
        _quietly("closing the trackers", trackers.finish, acc)
        hook.polyrl_run_end(trainer=trainer, error=error)
        _lifecycle(trainer, "close")
        raise
    bar.close()
    if reward_pool is not None:
        reward_pool.shutdown()
    trainer.save_policy()
    if run.report:
        if not run.report_every or run.iterations % run.report_every:
            with trainer.gathered():
                if acc.is_main_process:
                    report.record_samples(trainer, tag=run.iterations)
        if acc.is_main_process:
            report.write_report(trainer.run_dir)
    acc.wait_for_everyone()
    trackers.finish(acc)
    hook.polyrl_run_end(trainer=trainer, error=None)
    _lifecycle(trainer, "close")
    return trainer


def _gathered_rewards(acc: Accelerator, rewards: RewardOutput) -> tuple[torch.Tensor, dict[str, float]]:
    """Every process's per-sample rewards (on the host) and the mean of each reward component over
    every process, read from the device in one transfer instead of one per component."""
    per_sample = lambda v: v.sum(1) if v.dim() == 2 else v  # noqa: E731
    everyone = acc.gather(rewards.per_sample.to(acc.device))
    means = [acc.gather(per_sample(v).to(acc.device)).mean() for v in rewards.components.values()]
    # float64 holds every value exactly; the rewards go back to their own dtype on the host
    host = torch.cat([everyone.reshape(-1).double(), *(m.reshape(1).double() for m in means)]).cpu()
    n = everyone.numel()
    return (host[:n].to(everyone.dtype).reshape(everyone.shape),
            dict(zip(rewards.components, host[n:].tolist())))


def _lifecycle(trainer: Trainer, method: str) -> None:
    """Call ``setup(trainer)`` or ``close()`` on the run's components: policy, sampler, update,
    rewards. A failing ``close`` is reported and the others still close."""
    components = [trainer.policy, trainer.sampler, trainer.update, *(fn for _, _, fn in trainer.rewards)]
    for component in components:
        fn = getattr(component, method, None)
        if not callable(fn):  # a component that does not subclass the base classes
            continue
        if method == "setup":
            fn(trainer)
            continue
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - closing must not hide the run's own outcome
            tqdm.write(f"polyrl: closing {type(component).__name__} failed: {type(e).__name__}: {e}", file=sys.stderr)


def _outputs_after_stop(trainer: Trainer, save_policy: bool) -> None:
    """A run that stopped early still gets its report, and ``policy/`` when the weights in memory
    are those of the checkpoint of the last completed iteration (main process)."""
    if save_policy:
        _quietly("saving policy/", trainer.policy.save_pretrained, str(trainer.run_dir / "policy"))
    if trainer.config.run.report:
        from . import report

        _quietly("writing the report", report.write_report, trainer.run_dir)


def _quietly(what: str, fn: Any, *args: Any) -> None:
    """Call ``fn(*args)`` on the way out of a failed run: a failure is reported on one line and
    never hides the error that stopped the run."""
    try:
        fn(*args)
    except Exception as e:  # noqa: BLE001
        tqdm.write(f"polyrl: {what} failed: {type(e).__name__}: {str(e)[:200]}", file=sys.stderr)


def _reason(error: BaseException) -> str:
    if isinstance(error, RunStopped):
        return signal.Signals(error.signum).name
    return type(error).__name__


def _ckpt(trainer: Trainer, iteration: int) -> Path:
    from .checkpoint import checkpoint_path

    return checkpoint_path(trainer.run_dir, iteration)
