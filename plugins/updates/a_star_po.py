"""A*-PO: policy optimisation via optimal advantage regression (Brantley et al., 2025).

Two stages:

1. **Offline** (once, when the run starts): for every prompt of the prompt source,
   ``num_reference_samples`` completions are drawn from the reference policy (the policy before
   any update) and scored with the run's rewards; the optimal value of the KL-regularised objective
   is estimated as ``V*(x) = beta1 * log mean_j exp(r_j / beta1)``. The table is kept in the
   update's state, so a resumed run does not sample it again.
2. **Online**: one (or more) sample per prompt from the current policy, regressed onto the
   optimal advantage::

       loss = mean_i (beta2 * [log pi(y_i) - log pi_ref(y_i)] - (r_i - V*(x_i)))^2

   with sequence log-probs summed over the valid steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from polyrl.context import UpdateContext
from polyrl.stats import UpdateStats
from polyrl.types import ConfigError, Context, Rollout, Update

from .common import check_batching, sequence_rewards, windows


@dataclass
class AStarPOConfig:
    """Settings of the A*-PO update (defaults from the paper's math runs)."""

    beta1: float = 0.5
    """Temperature of the soft maximum that estimates ``V*`` from the reference samples."""
    beta2: float = 1e-3
    """Weight of the log-ratio to the reference policy in the regression (the KL strength)."""
    num_reference_samples: int = 8
    """Completions sampled from the reference policy per prompt to estimate ``V*``."""
    reference_batch_size: int = 64
    """Completions sampled (and scored) together while estimating ``V*``."""
    inner_epochs: int = 1
    """Optimisation passes over each iteration's samples."""
    train_batch_size: int = 8
    """Samples per micro-batch on each process."""
    gradient_accumulation_batches: int = 1
    """Micro-batches per optimizer step."""

    def check(self) -> None:
        for name in ("beta1", "beta2"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"update.{name} must be > 0, got {getattr(self, name)}")
        for name in ("num_reference_samples", "reference_batch_size", "inner_epochs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"update.{name} must be >= 1, got {getattr(self, name)}")

    def check_run(self, cfg: Any) -> None:
        check_batching("a_star_po", cfg.run.batch_size, self.train_batch_size, self.gradient_accumulation_batches)


def optimal_value(rewards: torch.Tensor, beta1: float) -> float:
    """``beta1 * log mean_j exp(r_j / beta1)`` of a prompt's reference rewards (stable)."""
    r = rewards.double().flatten() / beta1
    return float(beta1 * (torch.logsumexp(r, 0) - math.log(r.numel())))


def a_star_po_loss(
    logp: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor, rewards: torch.Tensor, v_star: torch.Tensor,
    beta2: float, *, tensor_stats: bool = False,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """``mean((beta2 * log pi/pi_ref - (r - V*))^2)``: ``logp``, ``ref``, ``mask`` ``[b, T]``;
    ``rewards``, ``v_star`` ``[b]``. The statistics are Python floats, or with ``tensor_stats``
    0-dim tensors on the loss's device (no host sync; see :class:`UpdateStats`)."""
    m = mask.to(logp.dtype)
    log_ratio = ((logp - ref) * m).sum(1)  # [b]
    adv = rewards - v_star
    loss = ((beta2 * log_ratio - adv) ** 2).mean()
    with torch.no_grad():
        stats = {"log_ratio_ref": log_ratio.detach().mean(), "advantage_mean": adv.mean()}
    return loss, (stats if tensor_stats else {k: v.item() for k, v in stats.items()})


class AStarPO(Update):
    def __init__(self, cfg: AStarPOConfig) -> None:
        self.cfg = cfg
        self.v_star: dict[str, float] = {}

    # -------------------------------------------------------------------------- stage 1
    @torch.no_grad()
    def setup(self, ctx: UpdateContext) -> None:
        """Estimate ``V*`` for every prompt (unless restored from a checkpoint). ``ctx``: the
        update's context, or the loop's trainer (whose context is used)."""
        ctx = UpdateContext.of(ctx)
        prompts = list(dict.fromkeys(p for p, _ in ctx.prompt_rows))
        if all(p in self.v_star for p in prompts):
            return
        if ctx.completed > 0:
            raise ConfigError("a_star_po: the checkpoint holds no V* for some prompts; start a new run")
        from accelerate.utils import gather_object

        acc = ctx.accelerator
        extras = {p: e for p, e in ctx.prompt_rows}
        mine = prompts[acc.process_index :: acc.num_processes]
        n = self.cfg.num_reference_samples
        contexts = [Context(prompt=p, group=i, extra=dict(extras[p])) for i, p in enumerate(mine) for _ in range(n)]
        scores: dict[str, list[float]] = {}
        step = max(n, self.cfg.reference_batch_size // n * n)  # whole groups per batch
        for k in range(0, len(contexts), step):
            batch = contexts[k : k + step]
            _, scored = ctx.sample_and_score(batch, f"a_star_po/v_star/{k}")
            rewards = scored.per_sample
            for c, r in zip(batch, rewards.tolist()):
                scores.setdefault(c.prompt, []).append(r)
        local = {p: optimal_value(torch.tensor(v), self.cfg.beta1) for p, v in scores.items()}
        if acc.num_processes > 1:
            for part in gather_object([local]):
                self.v_star.update(part)
        else:
            self.v_star.update(local)

    # -------------------------------------------------------------------------- stage 2
    def step(self, ctx: UpdateContext, rollout: Rollout, rewards: torch.Tensor) -> dict[str, float]:
        ctx = UpdateContext.of(ctx)
        cfg = self.cfg
        device = ctx.accelerator.device
        missing = [c.prompt for c in rollout.contexts if c.prompt not in self.v_star]
        if missing:
            raise ValueError(f"a_star_po: no V* for prompts {missing[:3]} (V* is estimated for the prompt source at run start)")
        rollout = rollout.to(device)
        rewards = sequence_rewards(rewards).float().to(device)
        v_star = torch.tensor([self.v_star[c.prompt] for c in rollout.contexts], dtype=torch.float32, device=device)
        rollout.ref_log_probs = ctx.policy.reference_log_probs(rollout)
        g = ctx.generator("update")
        stats = UpdateStats("loss", "log_ratio_ref", "advantage_mean", "grad_norm")  # read once, at the end
        for _ in range(cfg.inner_epochs):
            perm = torch.randperm(rollout.batch_size, generator=g)
            for window in windows(perm, cfg.train_batch_size, cfg.gradient_accumulation_batches):
                for micro, idx in ctx.accumulate(window):
                    mb = rollout.select(idx)
                    i = idx.to(device)
                    with micro:
                        logp = ctx.model(mb)
                        loss, step_stats = a_star_po_loss(logp, mb.ref_log_probs, mb.mask, rewards[i], v_star[i],
                                                          cfg.beta2, tensor_stats=True)
                        micro.backward(loss)
                    stats.add("loss", loss)
                    stats.update(step_stats)
                stats.add("grad_norm", ctx.optimizer_step())
        stats.add("v_star_mean", v_star.mean())
        return stats.means()  # the update's one read of its statistics

    def state_dict(self) -> dict[str, Any]:
        return {"v_star": dict(self.v_star)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.v_star = {str(k): float(v) for k, v in state["v_star"].items()}
