"""PPO: proximal policy optimisation with a value head (Schulman et al., 2017), in the form that
RL4LMs and Ziegler et al. (2019) use for language models, generic over ``[B, T]`` steps.

Per iteration:

1. Step rewards ``r_t``: a ``[B]`` reward is placed at each sample's last valid step; a ``[B, T]``
   reward (environments) is used as it is. With ``kl_coef > 0`` the token-level KL to the
   reference policy enters the reward: ``r_t -= beta * (log pi_old(a_t) - log pi_ref(a_t))``.
2. Values ``V(s_t)`` of the policy before the update (``policy(rollout, with_values=True)``) and
   generalised advantage estimation over the valid steps (the last valid step is terminal)::

       delta_t = r_t + gamma * V(s_{t+1}) - V(s_t)
       A_t = delta_t + gamma * lam * A_{t+1}          returns R_t = A_t + V(s_t)

   then the advantages are whitened over all valid steps of all processes.
3. ``inner_epochs`` passes over shuffled micro-batches, each minimising::

       ratio = exp(logp - logp_old)
       pg = max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps))
       vf = 0.5 * max((V - R)^2, (V_old + clip(V - V_old, -eps_v, eps_v) - R)^2)
       loss = mean(pg) + vf_coef * mean(vf) - ent_coef * mean(entropy)

   (means over the micro-batch's valid steps).
4. Adaptive KL: with ``kl_target`` set, ``beta <- beta * (1 + 0.1 * clip((KL - target) / target,
   -0.2, 0.2))`` where ``KL`` is the mean per-step KL of the iteration's samples (RL4LMs' form).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch

from polyrl.context import UpdateContext
from polyrl.stats import UpdateStats
from polyrl.types import ConfigError, Rollout, Update

from .common import check_batching, windows


@dataclass
class PPOConfig:
    """Settings of the PPO update (defaults from RL4LMs' IMDB runs and the PPO paper)."""

    kl_coef: float = 0.1
    """Initial weight ``beta`` of the token-level KL penalty in the reward (0 disables it and
    skips reference passes)."""
    kl_target: float | None = 0.1
    """Target of the adaptive KL controller (mean per-step KL); null keeps ``beta`` fixed."""
    gamma: float = 1.0
    """Discount of GAE."""
    lam: float = 0.95
    """GAE's lambda (1 gives Monte-Carlo returns minus values, 0 one-step TD errors)."""
    clip_range: float = 0.2
    """Ratio clip epsilon of the surrogate."""
    clip_range_value: float | None = 0.2
    """Clip of the value prediction around the values before the update; null disables it."""
    vf_coef: float = 0.5
    """Weight of the value loss."""
    ent_coef: float = 0.0
    """Weight of the entropy bonus (subtracted from the loss)."""
    whiten_advantages: bool = True
    """Normalise the advantages to zero mean and unit variance over the iteration's valid steps."""
    inner_epochs: int = 4
    """Optimisation passes over each iteration's samples."""
    train_batch_size: int = 8
    """Samples per micro-batch on each process."""
    gradient_accumulation_batches: int = 1
    """Micro-batches per optimizer step."""

    def check(self) -> None:
        _check_ppo_fields(self)

    def check_run(self, cfg: Any) -> None:
        _check_ppo_run(self, cfg, "ppo")


def _check_ppo_fields(cfg: Any) -> None:
    if cfg.kl_coef < 0:
        raise ConfigError(f"update.kl_coef must be >= 0, got {cfg.kl_coef}")
    if cfg.kl_target is not None and cfg.kl_target <= 0:
        raise ConfigError(f"update.kl_target must be > 0 or null (fixed beta), got {cfg.kl_target}")
    if not 0 <= cfg.gamma <= 1:
        raise ConfigError(f"update.gamma must be in [0, 1], got {cfg.gamma}")
    if not 0 <= cfg.lam <= 1:
        raise ConfigError(f"update.lam must be in [0, 1], got {cfg.lam}")
    if cfg.clip_range <= 0:
        raise ConfigError(f"update.clip_range must be > 0, got {cfg.clip_range}")
    if cfg.clip_range_value is not None and cfg.clip_range_value <= 0:
        raise ConfigError(f"update.clip_range_value must be > 0 or null (no value clipping), got {cfg.clip_range_value}")
    if cfg.inner_epochs < 1:
        raise ConfigError(f"update.inner_epochs must be >= 1, got {cfg.inner_epochs}")


def _check_ppo_run(cfg: Any, run: Any, name: str) -> None:
    check_batching(name, run.run.batch_size, cfg.train_batch_size, cfg.gradient_accumulation_batches)
    params = run.policy.params
    if getattr(params, "value_head", True) is False:
        raise ConfigError(
            f"policy.value_head=false: {name} trains a value head on the policy; accepted: true "
            f"(set policy.value_head: true)"
        )


# ---------------------------------------------------------------------------------- pieces
def step_rewards(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` step rewards: a ``[B]`` reward goes to each sample's last valid step; a
    ``[B, T]`` reward is kept (and zeroed on invalid steps)."""
    m = mask.bool()
    if rewards.dim() == 2:
        if rewards.shape != mask.shape:
            raise ValueError(f"per-step rewards {tuple(rewards.shape)} must match the mask {tuple(mask.shape)}")
        return torch.where(m, rewards.float(), torch.zeros_like(rewards, dtype=torch.float32))
    b, t = m.shape
    steps = torch.arange(t, device=m.device).expand(b, t)
    last = torch.where(m, steps, torch.full_like(steps, -1)).max(1).values  # [B]; -1: no valid step
    out = torch.zeros((b, t), dtype=torch.float32, device=m.device)
    has = last >= 0
    # a scatter rather than a boolean index, which would read its size on the host (a sync); a row
    # without a valid step writes a 0 into its (zero) first step
    value = torch.where(has, rewards.float().to(m.device), torch.zeros((), device=m.device))
    return out.scatter_(1, last.clamp(min=0).unsqueeze(1), value.unsqueeze(1))


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the valid steps of each row.

    ``rewards``, ``values``, ``mask`` are ``[B, T]``. Invalid steps are skipped (the next state of
    a valid step is the next valid one; after the last valid step the episode has ended, value 0)
    and get advantage and return 0. Returns ``(advantages, returns)``, ``returns = A + V``.
    """
    m = mask.bool()
    b, t = m.shape
    adv = torch.zeros((b, t), dtype=torch.float32, device=rewards.device)
    last_gae = torch.zeros(b, dtype=torch.float32, device=rewards.device)
    next_value = torch.zeros(b, dtype=torch.float32, device=rewards.device)
    for k in reversed(range(t)):
        delta = rewards[:, k] + gamma * next_value - values[:, k]
        current = delta + gamma * lam * last_gae
        valid = m[:, k]
        adv[:, k] = torch.where(valid, current, torch.zeros_like(current))
        last_gae = torch.where(valid, current, last_gae)
        next_value = torch.where(valid, values[:, k].float(), next_value)
    returns = torch.where(m, adv + values, torch.zeros_like(adv))
    return adv, returns


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, accelerator: Any = None, eps: float = 1e-8) -> torch.Tensor:
    """``(x - mean) / std`` over the valid entries (of every process when ``accelerator`` is
    given; biased variance), 0 on invalid entries."""
    m = mask.to(x.dtype)
    stats = torch.stack([(x * m).sum(), (x * x * m).sum(), m.sum()]).double()
    if accelerator is not None and accelerator.num_processes > 1:
        stats = accelerator.reduce(stats.to(accelerator.device), reduction="sum").to(x.device)
    n = stats[2].clamp(min=1)
    mean = stats[0] / n
    var = (stats[1] / n - mean**2).clamp(min=0)
    out = (x - mean.to(x.dtype)) * torch.rsqrt(var.to(x.dtype) + eps)
    return out * m


def ppo_loss(
    logp: torch.Tensor,
    old: torch.Tensor,
    adv: torch.Tensor,
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
    clip_range_value: float | None = 0.2,
    vf_coef: float = 0.5,
    entropy: torch.Tensor | None = None,
    ent_coef: float = 0.0,
    *,
    tensor_stats: bool = False,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """PPO's loss on ``[b, T]`` tensors (``adv`` and ``returns`` per step); means over valid steps.

    Returns the loss and ``pg_loss``, ``vf_loss``, ``entropy``, ``approx_kl``
    (``0.5 * mean(dlogp^2)``), ``clipfrac`` and ``vf_clipfrac``: Python floats, or with
    ``tensor_stats`` 0-dim tensors on the loss's device (no host sync; see :class:`UpdateStats`).
    """
    m = mask.float()
    n = m.sum().clamp(min=1)
    mean = lambda x: (x * m).sum() / n  # noqa: E731
    ratio = torch.exp(logp - old)
    pg = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1 - clip_range, 1 + clip_range))
    pg_loss = mean(pg)
    vf1 = (values - returns) ** 2
    if clip_range_value is not None:
        clipped = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
        vf2 = (clipped - returns) ** 2
        vf = torch.maximum(vf1, vf2)
    else:
        vf2, vf = vf1, vf1
    vf_loss = 0.5 * mean(vf)
    loss = pg_loss + vf_coef * vf_loss
    stats: dict[str, torch.Tensor] = {}
    if entropy is not None:
        ent = mean(entropy)
        if ent_coef:
            loss = loss - ent_coef * ent
        stats["entropy"] = ent.detach()
    with torch.no_grad():
        d = (logp.detach() - old) * m
        stats.update(
            pg_loss=pg_loss.detach(),
            vf_loss=vf_loss.detach(),
            approx_kl=0.5 * (d**2).sum() / n,
            clipfrac=(((ratio.detach() - 1).abs() > clip_range).float() * m).sum() / n,
            vf_clipfrac=((vf2.detach() > vf1.detach()).float() * m).sum() / n,
        )
    return loss, (stats if tensor_stats else {k: v.item() for k, v in stats.items()})


def adaptive_kl_coef(beta: float, kl: float, target: float | None) -> float:
    """RL4LMs' controller: ``beta * (1 + 0.1 * clip((kl - target) / target, -0.2, 0.2))``."""
    if target is None:
        return beta
    error = min(max((kl - target) / target, -0.2), 0.2)
    return beta * (1.0 + 0.1 * error)


# ---------------------------------------------------------------------------------- update
class PPO(Update):
    """PPO on any policy with a value head (``has_value_head``); see the module doc."""

    name = "ppo"

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        self.kl_coef = float(cfg.kl_coef)

    # hooks for variants (NLPO) -----------------------------------------------------------
    def kl_rollout(self, ctx: UpdateContext, rollout: Rollout) -> tuple[Rollout, torch.Tensor]:
        """The rollout whose distribution the KL penalty measures, and its log-probs under the
        sampling policy. PPO: the rollout itself and its recorded log-probs."""
        return rollout, rollout.log_probs

    def after_step(self, ctx: UpdateContext) -> dict[str, float]:
        return {}

    def rollout_stats(self, rollout: Rollout) -> dict[str, torch.Tensor]:
        """Statistics of the rollout logged after the update's own (0-dim tensors, read with them)."""
        return {}

    # -------------------------------------------------------------------------------------
    def _check_policy(self, ctx: UpdateContext) -> None:
        if not getattr(ctx.policy, "has_value_head", False):
            raise ConfigError(
                f"update {self.name!r} needs a policy with a value head, but {type(ctx.policy).__name__} has none; "
                "for causal_lm / seq2seq_lm set policy.value_head: true"
            )

    @torch.no_grad()
    def _old_values(self, ctx: UpdateContext, rollout: Rollout) -> torch.Tensor:
        parts = []
        for i in range(0, rollout.batch_size, self.cfg.train_batch_size):
            mb = rollout.select(torch.arange(i, min(i + self.cfg.train_batch_size, rollout.batch_size)))
            parts.append(ctx.policy(mb, with_values=True)["values"].float())
        return torch.cat(parts)

    def step(self, ctx: UpdateContext, rollout: Rollout, rewards: torch.Tensor) -> dict[str, float]:
        ctx = UpdateContext.of(ctx)
        cfg = self.cfg
        self._check_policy(ctx)
        acc = ctx.accelerator
        device = acc.device
        rollout = rollout.to(device)
        mask = rollout.mask
        m = mask.float()
        token_rewards = step_rewards(rewards.to(device), mask)
        out = UpdateStats()  # read once, at the end
        out.add("kl_coef", self.kl_coef)

        if cfg.kl_coef > 0:
            kl_rollout, old_for_kl = self.kl_rollout(ctx, rollout)
            ref = ctx.policy.reference_log_probs(kl_rollout)
            kl = (old_for_kl - ref) * m  # [B, T]
            token_rewards = token_rewards - self.kl_coef * kl
            stats = torch.stack([kl.sum(), m.sum(), kl.sum(1).mean()]).double()
            if acc.num_processes > 1:
                stats = acc.reduce(stats.to(device), reduction="sum")
                stats[2] = stats[2] / acc.num_processes
            # read with the other statistics at the end: the adapted coefficient is the next iteration's
            out.update({"kl_ref": stats[0] / stats[1].clamp(min=1), "kl_ref_sequence": stats[2]})

        old_values = self._old_values(ctx, rollout)
        adv, returns = gae(token_rewards, old_values, mask, cfg.gamma, cfg.lam)
        out.update({"value_mean": (old_values * m).sum() / m.sum().clamp(min=1),
                    "return_mean": (returns * m).sum() / m.sum().clamp(min=1)})
        if cfg.whiten_advantages:
            adv = masked_whiten(adv, mask, acc)

        b = rollout.batch_size
        g = ctx.generator("update")
        for _ in range(cfg.inner_epochs):
            perm = torch.randperm(b, generator=g)
            for window in windows(perm, cfg.train_batch_size, cfg.gradient_accumulation_batches):
                for micro, idx in ctx.accumulate(window):
                    mb = rollout.select(idx)
                    i = idx.to(device)
                    with micro:
                        res = ctx.model(mb, with_values=True, with_entropy=True)
                        loss, step_stats = ppo_loss(
                            res["log_probs"], mb.log_probs, adv[i], res["values"], old_values[i], returns[i], mb.mask,
                            cfg.clip_range, cfg.clip_range_value, cfg.vf_coef, res.get("entropy"), cfg.ent_coef,
                            tensor_stats=True,
                        )
                        micro.backward(loss)
                    out.add("loss", loss)
                    out.update(step_stats)
                out.add("grad_norm", ctx.optimizer_step())
        out.add("completion_length", m.sum(1).mean())
        out.update(self.after_step(ctx))
        out.update(self.rollout_stats(rollout))
        means = out.means()  # the update's one read of its statistics
        if "kl_ref" in means:
            self.kl_coef = adaptive_kl_coef(self.kl_coef, means["kl_ref"], cfg.kl_target)
        return means

    def state_dict(self) -> dict[str, Any]:
        return {"kl_coef": self.kl_coef}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.kl_coef = float(state["kl_coef"])
