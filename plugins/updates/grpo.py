"""GRPO: group-relative policy optimisation (Shao et al., 2024, arXiv:2402.03300), with the loss and
advantage variants that followed it, each selected by a config value and defined as in TRL's
``GRPOTrainer``.

``G`` samples per prompt form a group. Advantages (``scale_rewards``)::

    group: A_i = (R_i - mean_group R) / (std_group R + 1e-4)     (the GRPO paper)
    batch: A_i = (R_i - mean_group R) / (std_batch R + 1e-4)     (PPO Lite, arXiv:2508.08221)
    none:  A_i =  R_i - mean_group R                             (Dr. GRPO, arXiv:2503.20783)

(``std`` is Bessel-corrected; "batch" is every sample of the iteration on every process). With
several rewards, ``multi_objective_aggregation: normalize_then_sum`` is GDPO (Group reward-Decoupled
Normalization Policy Optimization, arXiv:2601.05242): each reward is normalised within its group
first, the weighted normalised rewards are summed, and the sum is normalised over the batch::

    A_i = (S_i - mean_batch S) / (std_batch S + 1e-4),  S_i = sum_k w_k (R_ik - mean_group R_k) / (std_group R_k + 1e-4)

The loss is the clipped surrogate plus, when ``beta > 0``, ``beta`` times the k3 estimator of the
KL to the reference policy::

    token level:    r_t = exp(logp_t - logp_old_t)
    sequence level: r_t = r = exp(sum_t m_t (logp_t - logp_old_t) / sum_t m_t)       (GSPO, arXiv:2507.18071)
    l_t = -min(r_t * A, clip(r_t, 1 - eps_low, 1 + eps_high) * A) + beta * (exp(ref_t - logp_t) - (ref_t - logp_t) - 1)

with the asymmetric "clip-higher" range of DAPO (arXiv:2503.14476; ``epsilon_high`` > ``epsilon_low``).
``loss_type`` aggregates ``l_t`` over the valid tokens ``m_t`` of a micro-batch of ``b`` samples::

    grpo:    mean_i (sum_t m_it l_it / sum_t m_it)              per-sequence mean, then over sequences
    bnpo:    sum_it m_it l_it / sum_it m_it                      token mean of the micro-batch
    dr_grpo: sum_it m_it l_it / (b * max_completion_length)     a constant normaliser (Dr. GRPO)
    dapo:    sum_it m_it l_it / N                                token mean of the optimizer step (DAPO)

``grpo``, ``bnpo`` and ``dr_grpo`` losses are divided by the number of accumulated micro-batches;
``dapo``'s ``N`` is the count of valid tokens in all micro-batches of the optimizer step on all
processes (divided by the number of processes, whose gradients are averaged), so the step's
gradient is that of one token mean over the step's whole batch. TRL counts ``N`` over its whole
generation batch, which is one optimizer step with its default ``steps_per_generation``.

When another engine samples (the ``vllm`` sampler), its log-probs ``logp_engine`` differ from the
trained model's even with the same weights (other kernels, other precision). ``engine_correction``
then recomputes the old log-probs with the trained model before the first optimizer step, uses
them in the ratio ``r_t``, and weights the policy term of each token by a truncated importance
weight (TRL's ``vllm_importance_sampling_correction``; verl's rollout correction)::

    token_truncate:    w_t = min(exp(logp_old_t - logp_engine_t), C)
    token_mask:        w_t = exp(logp_old_t - logp_engine_t), or 0 where it exceeds C
    sequence_truncate: w   = min(exp(sum_t m_t (logp_old_t - logp_engine_t)), C)
    sequence_mask:     w   = exp(sum_t m_t (logp_old_t - logp_engine_t)), or 0 where it exceeds C

    l_t = -w_t min(r_t A, clip(r_t, 1 - eps_low, 1 + eps_high) A) + beta * k3_t

with ``C = engine_correction_max``. The mismatch is logged: ``engine/logp_diff_mean`` and
``engine/logp_diff_max`` (``|logp_old - logp_engine|`` over valid tokens), ``engine/is_weight_mean``
and ``engine/capped_fraction`` (the tokens, or sequences, whose ratio exceeded ``C``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Sequence

import torch

from polyrl.context import UpdateContext
from polyrl.stats import UpdateStats
from polyrl.types import ConfigError, Rollout, Update

from .common import check_batching, checked_clip_bounds, sequence_rewards, windows

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
ENGINE_CORRECTIONS = ("off", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
LEGACY_AGGREGATION = {"sequence_mean": "grpo", "token_mean": "bnpo"}
SCALE_REWARDS = ("group", "batch", "none")
STD_EPS = 1e-4  # added to every std, as in TRL


@dataclass
class GRPOConfig:
    """Settings of the GRPO update. Defaults are GRPO's original form (per-sequence mean, group
    std, symmetric clip); TRL's ``GRPOTrainer`` now defaults to ``loss_type: dapo``."""

    beta: float = 0.0
    """Weight of the k3 KL penalty to the reference policy (0 disables it and skips reference passes)."""
    clip_range: float = 0.2
    """Ratio clip epsilon on both sides, ``[1 - clip_range, 1 + clip_range]``; ``epsilon_low`` and
    ``epsilon_high`` override either side."""
    epsilon_low: float | None = None
    """Lower clip: the ratio is clipped at ``1 - epsilon_low`` (in [0, 1)). null: ``clip_range``."""
    epsilon_high: float | None = None
    """Upper clip: the ratio is clipped at ``1 + epsilon_high`` (>= 0). null: ``clip_range``.
    DAPO's clip-higher uses ``epsilon_low: 0.2, epsilon_high: 0.28``."""
    inner_epochs: int = 1
    """Optimisation passes over each iteration's samples (GRPO's mu)."""
    train_batch_size: int = 8
    """Samples per micro-batch on each process."""
    gradient_accumulation_batches: int = 1
    """Micro-batches per optimizer step."""
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = "grpo"
    """How token losses are aggregated. grpo: mean over each sequence's tokens, then over sequences
    (the GRPO paper); bnpo: mean over the micro-batch's tokens; dr_grpo: sum over the micro-batch
    divided by ``train_batch_size * max_completion_length`` (Dr. GRPO); dapo: sum divided by the
    number of tokens of the whole optimizer step on all processes (DAPO's token-level loss)."""
    max_completion_length: int | None = None
    """dr_grpo's constant normaliser (tokens per completion). null: the sampler's
    ``max_new_tokens`` when it has one, else the rollout's number of steps ``T``."""
    scale_rewards: Literal["group", "batch", "none"] | bool = "group"
    """Divide the group-centred rewards by the std of the group ("group", the GRPO paper), of the
    whole iteration's batch on all processes ("batch"), or not at all ("none", Dr. GRPO). true
    and false are read as "group" and "none"."""
    importance_sampling_level: Literal["token", "sequence"] = "token"
    """token: one ratio per token. sequence: one ratio per sequence, the exponential of the mean
    token log-ratio (GSPO; pair it with ``loss_type: grpo`` to optimise GSPO's objective)."""
    multi_objective_aggregation: Literal["sum_then_normalize", "normalize_then_sum"] = "sum_then_normalize"
    """With several rewards: sum_then_normalize computes advantages from the weighted total;
    normalize_then_sum (GDPO) normalises each reward within its group, sums them with their
    weights and normalises the sum over the batch (``scale_rewards`` is then not used)."""
    engine_correction: Literal["off", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask"] = "off"
    """Correct for the mismatch between the sampling engine's log-probs (``vllm`` sampler) and the
    trained model's with truncated importance sampling (see the module docstring). off: the ratio
    uses the sampler's log-probs as they are. TRL's ``vllm_importance_sampling_mode`` (whose
    default there is sequence_mask); token_truncate is its original form."""
    engine_correction_max: float = 3.0
    """The importance weight's cap ``C`` (> 0): weights above it are truncated to it (``*_truncate``)
    or set to 0 (``*_mask``). TRL's ``vllm_importance_sampling_clip_max`` (default 3.0; its older
    ``vllm_importance_sampling_cap`` defaulted to 2.0)."""
    loss_aggregation: Literal["sequence_mean", "token_mean"] | None = None
    """Deprecated, read as ``loss_type``: sequence_mean is grpo, token_mean is bnpo. null: unset."""

    def check(self) -> None:
        if self.loss_aggregation is not None:
            mapped = LEGACY_AGGREGATION[self.loss_aggregation]
            if self.loss_type not in ("grpo", mapped):
                raise ConfigError(
                    f"update.loss_aggregation={self.loss_aggregation!r} (an old name for update.loss_type={mapped!r}) "
                    f"contradicts update.loss_type={self.loss_type!r}; set only update.loss_type, one of {list(LOSS_TYPES)}"
                )
            self.loss_type, self.loss_aggregation = mapped, None  # type: ignore[assignment]
        if isinstance(self.scale_rewards, bool):
            self.scale_rewards = "group" if self.scale_rewards else "none"
        if self.scale_rewards not in SCALE_REWARDS:
            raise ConfigError(f"update.scale_rewards={self.scale_rewards!r}; accepted: {list(SCALE_REWARDS)}, true, false")
        if self.loss_type not in LOSS_TYPES:
            raise ConfigError(f"update.loss_type={self.loss_type!r}; accepted: {list(LOSS_TYPES)}")
        if self.beta < 0:
            raise ConfigError(f"update.beta must be >= 0, got {self.beta}")
        self.clip_bounds  # checks clip_range, epsilon_low and epsilon_high
        if self.inner_epochs < 1:
            raise ConfigError(f"update.inner_epochs must be >= 1, got {self.inner_epochs}")
        if self.engine_correction not in ENGINE_CORRECTIONS:
            raise ConfigError(f"update.engine_correction={self.engine_correction!r}; accepted: {list(ENGINE_CORRECTIONS)}")
        if not self.engine_correction_max > 0:
            raise ConfigError(f"update.engine_correction_max must be > 0, got {self.engine_correction_max}")
        if self.max_completion_length is not None and self.max_completion_length < 1:
            raise ConfigError(f"update.max_completion_length must be >= 1 or null, got {self.max_completion_length}")

    @property
    def clip_bounds(self) -> tuple[float, float]:
        """``(epsilon_low, epsilon_high)`` with ``clip_range`` filling the unset ones."""
        return checked_clip_bounds(self.clip_range, self.epsilon_low, self.epsilon_high)

    def check_run(self, cfg: Any) -> None:
        if cfg.run.samples_per_prompt < 2:
            raise ConfigError(
                f"run.samples_per_prompt={cfg.run.samples_per_prompt}: grpo needs groups of at least 2 samples per prompt; "
                "accepted: any integer >= 2"
            )
        check_batching("grpo", cfg.run.batch_size, self.train_batch_size, self.gradient_accumulation_batches)
        if self.loss_type == "dr_grpo" and self.max_completion_length is None:
            length = getattr(cfg.sampler.params, "max_new_tokens", None)
            if isinstance(length, int) and length >= 1:
                self.max_completion_length = length


# ------------------------------------------------------------------------------------ advantages
def _std(x: torch.Tensor) -> torch.Tensor:
    return x.std() if x.numel() > 1 else torch.zeros((), dtype=x.dtype)


def _groups(groups: Sequence[int]) -> list[torch.Tensor]:
    gid = torch.as_tensor(list(groups))
    return [(gid == g).nonzero(as_tuple=True)[0] for g in torch.unique(gid)]


def grpo_advantages(
    rewards: torch.Tensor, groups: Sequence[int], scale_rewards: str = "group", batch_rewards: torch.Tensor | None = None
) -> torch.Tensor:
    """``[B]`` advantages from ``[B]`` rewards (see the module docstring). ``batch_rewards`` are the
    rewards of every process for ``scale_rewards="batch"`` (default: ``rewards``)."""
    rewards = rewards.detach().float().cpu()
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards={scale_rewards!r}; accepted: {list(SCALE_REWARDS)}")
    adv = torch.empty_like(rewards)
    for idx in _groups(groups):
        r = rewards[idx]
        adv[idx] = r - r.mean()
        if scale_rewards == "group":
            adv[idx] = adv[idx] / (_std(r) + STD_EPS)
    if scale_rewards == "batch":
        everything = rewards if batch_rewards is None else batch_rewards.detach().float().cpu()
        adv = adv / (_std(everything) + STD_EPS)
    return adv


def gdpo_rewards(components: torch.Tensor, weights: Sequence[float], groups: Sequence[int]) -> torch.Tensor:
    """GDPO's summed reward ``S [B]`` from ``[B, K]`` components: each normalised within its group
    (mean, Bessel std + 1e-4), then weighted and summed. Normalise ``S`` over the batch with
    :func:`batch_normalize` to get advantages."""
    components = components.detach().float().cpu()
    if components.dim() != 2 or components.shape[1] != len(weights):
        raise ValueError(f"components {tuple(components.shape)} do not match {len(weights)} reward weights")
    normalised = torch.empty_like(components)
    for idx in _groups(groups):
        c = components[idx]
        std = c.std(0) if c.shape[0] > 1 else torch.zeros(c.shape[1])
        normalised[idx] = (c - c.mean(0)) / (std + STD_EPS)
    return (normalised * torch.tensor(list(weights), dtype=torch.float32)).sum(1)


def batch_normalize(values: torch.Tensor, batch_values: torch.Tensor | None = None) -> torch.Tensor:
    """``(x - mean) / (std + 1e-4)`` with the mean and Bessel std of ``batch_values`` (every
    process's values; default ``values``)."""
    values = values.detach().float().cpu()
    everything = values if batch_values is None else batch_values.detach().float().cpu()
    return (values - everything.mean()) / (_std(everything) + STD_EPS)


# ------------------------------------------------------------------------------------ loss
def grpo_loss(
    logp: torch.Tensor,
    old: torch.Tensor,
    adv: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
    beta: float = 0.0,
    ref: torch.Tensor | None = None,
    loss_type: str = "grpo",
    *,
    epsilon_high: float | None = None,
    importance_sampling_level: str = "token",
    max_completion_length: int | None = None,
    num_tokens: float | torch.Tensor | None = None,
    is_weights: torch.Tensor | None = None,
    tensor_stats: bool = False,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """GRPO's loss on one micro-batch (see the module docstring).

    ``logp``, ``old``, ``ref``, ``mask`` are ``[b, T]``; ``adv`` is ``[b]``. ``clip_range`` is the
    lower clip epsilon and, unless ``epsilon_high`` is given, the upper one. ``loss_type`` also
    accepts the old names ``sequence_mean`` (grpo) and ``token_mean`` (bnpo). ``dr_grpo`` needs
    ``max_completion_length`` (default ``T``); ``dapo`` needs ``num_tokens``, the normaliser (the
    optimizer step's valid tokens on all processes divided by the number of processes).
    ``is_weights`` (``[b, T]`` or ``[b, 1]``) weight the policy term of each token (see
    :func:`engine_is_weights`). The statistics are Python floats, or with ``tensor_stats`` 0-dim
    tensors on the loss's device (no host sync; see :class:`polyrl.stats.UpdateStats`).
    """
    loss_type = LEGACY_AGGREGATION.get(loss_type, loss_type)
    eps_low, eps_high = clip_range, clip_range if epsilon_high is None else epsilon_high
    m = mask.to(logp.dtype)
    a = adv.to(logp.dtype).unsqueeze(1)
    log_ratio = logp - old
    if importance_sampling_level == "token":
        log_w = log_ratio
    elif importance_sampling_level == "sequence":  # GSPO: length-normalised sequence log-ratio, [b, 1]
        log_w = ((log_ratio * m).sum(1) / m.sum(1).clamp(min=1)).unsqueeze(1)
    else:
        raise ValueError(f"unknown importance_sampling_level {importance_sampling_level!r}; accepted: 'token', 'sequence'")
    ratio = torch.exp(log_w)
    per_token = -torch.minimum(ratio * a, torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * a)
    if is_weights is not None:  # the sampling engine's mismatch, [b, T] or [b, 1] (no gradient)
        per_token = per_token * is_weights.detach().to(per_token.dtype)
    n_tokens = m.sum().clamp(min=1)
    stats: dict[str, torch.Tensor] = {}
    if beta > 0:
        if ref is None:
            raise ValueError("grpo_loss: beta > 0 needs reference log-probs")
        d = ref - logp
        kl = torch.exp(d) - d - 1  # k3 estimator of KL(pi_theta || pi_ref)
        per_token = per_token + beta * kl
        stats["kl_ref"] = (kl.detach() * m).sum() / n_tokens
    per_token = per_token.expand_as(m)
    if loss_type == "grpo":
        loss = ((per_token * m).sum(1) / m.sum(1).clamp(min=1)).mean()
    elif loss_type == "bnpo":
        loss = (per_token * m).sum() / n_tokens
    elif loss_type == "dr_grpo":
        length = logp.shape[1] if max_completion_length is None else max_completion_length
        loss = (per_token * m).sum() / (logp.shape[0] * length)
    elif loss_type == "dapo":
        if num_tokens is None:
            raise ValueError("grpo_loss: loss_type 'dapo' needs num_tokens (the optimizer step's token count)")
        loss = (per_token * m).sum() / torch.as_tensor(num_tokens, dtype=logp.dtype, device=logp.device).clamp(min=1)
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}; accepted: {list(LOSS_TYPES)}")
    with torch.no_grad():
        d_old = (logp.detach() - old) * m
        stats["approx_kl"] = 0.5 * (d_old**2).sum() / n_tokens
        r = ratio.detach()
        a_ = a.expand_as(r)
        # the ratio outside the clip range, and where the clip removes the gradient (TRL's clip_ratio)
        weight = m if importance_sampling_level == "token" else torch.ones_like(r)
        count = weight.sum().clamp(min=1)
        outside = ((r < 1 - eps_low) | (r > 1 + eps_high)).to(m.dtype)
        stats["clipfrac"] = (outside * weight).sum() / count
        stats["clipfrac_low"] = (((r < 1 - eps_low) & (a_ < 0)).to(m.dtype) * weight).sum() / count
        stats["clipfrac_high"] = (((r > 1 + eps_high) & (a_ > 0)).to(m.dtype) * weight).sum() / count
    return loss, (stats if tensor_stats else {k: v.item() for k, v in stats.items()})


def engine_is_weights(
    old: torch.Tensor, engine: torch.Tensor, mask: torch.Tensor, mode: str, cap: float, *, tensor_stats: bool = False
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Truncated importance weights for the mismatch between the trained model's log-probs ``old``
    and the sampling engine's ``engine`` (both ``[B, T]``, no gradient): ``[B, T]`` for the token
    modes, ``[B, 1]`` for the sequence modes (see the module docstring), and the mismatch stats
    (Python floats, or with ``tensor_stats`` 0-dim tensors on the device)."""
    if mode not in ENGINE_CORRECTIONS or mode == "off":
        raise ValueError(f"unknown engine correction {mode!r}; accepted: {list(ENGINE_CORRECTIONS[1:])}")
    m = mask.to(old.dtype)
    diff = (old - engine.to(old.dtype)) * m
    if mode.startswith("sequence"):
        log_w, weight = diff.sum(1, keepdim=True), torch.ones_like(m[:, :1])
    else:
        log_w, weight = diff, m
    ratio = torch.exp(log_w)
    over = ratio > cap
    w = ratio.clamp(max=cap) if mode.endswith("truncate") else ratio.masked_fill(over, 0.0)
    valid = mask.bool()
    # host sync, once per update: the boolean index's size (a masked sum would change the mean's
    # summation order, and with it the logged value)
    gap = diff.abs()[valid]
    count = weight.sum().clamp(min=1)
    zero = torch.zeros((), dtype=gap.dtype, device=gap.device)
    stats = {
        "engine/logp_diff_mean": gap.mean() if gap.numel() else zero,
        "engine/logp_diff_max": gap.max() if gap.numel() else zero,
        "engine/is_weight_mean": (w * weight).sum() / count,
        "engine/capped_fraction": (over.to(m.dtype) * weight).sum() / count,
    }
    return w, (stats if tensor_stats else {k: v.item() for k, v in stats.items()})


# ------------------------------------------------------------------------------------ update
class GRPO(Update):
    def __init__(self, cfg: GRPOConfig) -> None:
        cfg.check()
        self.cfg = cfg

    def advantages(self, ctx: UpdateContext, rollout: Rollout, rewards: torch.Tensor) -> torch.Tensor:
        """``[B]`` advantages of this process's samples (gathering batch statistics across processes)."""
        ctx = UpdateContext.of(ctx)
        cfg, acc = self.cfg, ctx.accelerator
        groups = [c.group for c in rollout.contexts]

        def everywhere(x: torch.Tensor) -> torch.Tensor:
            return acc.gather(x.float().to(acc.device)).cpu() if acc.num_processes > 1 else x

        if cfg.multi_objective_aggregation == "normalize_then_sum":
            components = rollout.outputs.get("reward_components")
            weights = list(ctx.reward_weights.values())
            if not isinstance(components, torch.Tensor) or components.shape != (rollout.batch_size, len(weights)):
                raise ValueError(
                    "update.multi_objective_aggregation='normalize_then_sum' needs the reward components on the rollout "
                    f"(rollout.outputs['reward_components'], [B={rollout.batch_size}, K={len(weights)}]), which the "
                    "loop adds from the reward hook's components; a plugin that calls this update itself must add them too"
                )
            summed = gdpo_rewards(components, weights, groups)
            return batch_normalize(summed, everywhere(summed))
        rewards = sequence_rewards(rewards).detach().float().cpu()
        batch = everywhere(rewards) if cfg.scale_rewards == "batch" else None
        return grpo_advantages(rewards, groups, cfg.scale_rewards, batch)

    @torch.no_grad()
    def correct_engine(self, ctx: UpdateContext, rollout: Rollout) -> dict[str, torch.Tensor]:
        """Recompute the old log-probs with the trained model (in micro-batches), keep the sampler's
        as ``data["engine_log_probs"]``, and put the truncated importance weights in
        ``data["engine_is_weights"]``; returns the mismatch stats (0-dim tensors, not yet read)."""
        cfg = self.cfg
        engine = rollout.data.get("engine_log_probs", rollout.log_probs)
        old = torch.cat([ctx.model(rollout.select(idx)).detach().float()
                         for idx in torch.arange(rollout.batch_size).split(cfg.train_batch_size)])
        weights, stats = engine_is_weights(old, engine, rollout.mask, cfg.engine_correction, cfg.engine_correction_max,
                                           tensor_stats=True)
        rollout.data["engine_log_probs"] = engine
        rollout.data["engine_is_weights"] = weights
        rollout.log_probs = old
        return stats

    @staticmethod
    def step_tokens(acc: Any, mask: torch.Tensor, steps: Sequence[Sequence[torch.Tensor]]) -> torch.Tensor:
        """``[S]``: the valid tokens of each optimizer step's samples (``steps``: their micro-batch
        indices) summed over every process and divided by the number of processes (dapo's
        normaliser), with one gather for all the steps of an epoch."""
        local = torch.stack([mask[torch.cat(list(w)).to(mask.device)].float().sum() for w in steps])
        if acc.num_processes == 1:
            return local
        return acc.gather(local).reshape(acc.num_processes, len(steps)).sum(0) / acc.num_processes

    def step(self, ctx: UpdateContext, rollout: Rollout, rewards: torch.Tensor) -> dict[str, float]:
        ctx = UpdateContext.of(ctx)
        cfg = self.cfg
        acc = ctx.accelerator
        device = acc.device
        adv = self.advantages(ctx, rollout, rewards).to(device)
        rollout = rollout.to(device)
        if cfg.beta > 0:
            rollout.ref_log_probs = ctx.policy.reference_log_probs(rollout)
        engine_stats = self.correct_engine(ctx, rollout) if cfg.engine_correction != "off" else {}
        b = rollout.batch_size
        eps_low, eps_high = cfg.clip_bounds
        g = ctx.generator("update")
        stats = UpdateStats()  # read once, at the end
        for _ in range(cfg.inner_epochs):
            perm = torch.randperm(b, generator=g)
            steps = list(windows(perm, cfg.train_batch_size, cfg.gradient_accumulation_batches))
            if cfg.loss_type == "dapo":  # each step's valid tokens on all processes, per process
                tokens = self.step_tokens(acc, rollout.mask, steps)
            for k, window in enumerate(steps):
                num_tokens = tokens[k] if cfg.loss_type == "dapo" else None
                # dapo's normaliser already spans the whole step; the others average the micro-batches
                for micro, idx in ctx.accumulate(window, scale=1 if cfg.loss_type == "dapo" else None):
                    mb = rollout.select(idx)
                    with micro:
                        logp = ctx.model(mb)  # [b, T]
                        loss, step_stats = grpo_loss(
                            logp, mb.log_probs, adv[idx.to(device)], mb.mask, eps_low, cfg.beta, mb.ref_log_probs,
                            cfg.loss_type, epsilon_high=eps_high, importance_sampling_level=cfg.importance_sampling_level,
                            max_completion_length=cfg.max_completion_length, num_tokens=num_tokens,
                            is_weights=mb.data.get("engine_is_weights"), tensor_stats=True,
                        )
                        micro.backward(loss)
                    # logged per micro-batch on the scale of a whole-step loss
                    stats.add("loss", loss, factor=len(window) if cfg.loss_type == "dapo" else 1)
                    stats.update(step_stats)
                stats.add("grad_norm", ctx.optimizer_step())
        stats.add("completion_length", rollout.mask.float().sum(1).mean())
        stats.add("advantage_abs_mean", adv.abs().mean())
        stats.update(engine_stats)
        return stats.means()  # the update's one read of its statistics
