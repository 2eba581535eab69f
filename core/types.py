"""The data types that flow through the loop, and the base classes of the four component roles.

Shapes use ``B`` for the number of samples a process holds in one iteration and ``T`` for the
number of decision steps per sample: generated tokens for a language model, denoising steps for a
diffusion model, consistency steps for a consistency model, environment steps for an agent.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

__all__ = [
    "Context",
    "Rollout",
    "RewardOutput",
    "Policy",
    "Sampler",
    "Reward",
    "Update",
    "ComponentSpec",
    "ConfigError",
    "ROLLOUT_FORMATS",
    "CAPABILITIES",
    "DTYPES",
]

#: The dtype names that configs accept for weights (``torch_dtype``, ``frozen_dtype``, a reward's
#: ``dtype``), and the torch dtypes they name.
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ConfigError(ValueError):
    """A run configuration that cannot be run. The message names the bad key and what is accepted."""


@dataclass
class Context:
    """One thing to generate for: a prompt (text or image model) or an environment reset.

    ``group`` identifies the samples drawn for the same prompt in one iteration (all ``G`` of a
    group live on the same process). ``extra`` carries dataset columns that rewards may read.
    """

    prompt: str
    group: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Rollout:
    """What a sampler returns: everything needed to score the samples and to recompute log-probs.

    Attributes:
        contexts: ``B`` contexts, one per sample.
        log_probs: ``[B, T]`` float, log-probability of each action under the sampling policy
            (no gradient).
        mask: ``[B, T]`` bool, True where a step is a real action (False for padding after EOS).
        data: modality tensors with the batch dimension first (for diffusion ``latents
            [B, T, C, H, W]``, ``next_latents``, ``timesteps [B, T]``, ``prompt_embeds``; for text
            ``input_ids [B, L]``, ``attention_mask``...). Policies read them to recompute log-probs.
        outputs: what rewards read: ``images`` float ``[B, 3, H, W]`` in ``[0, 1]``, ``texts``
            (list of ``B`` strings), ``completion_ids``...; optionally ``captions`` (``B`` strings),
            which the run report prints with each image instead of its prompt (an episode's sentence).
        meta: sampling settings that the trained distribution must share (guidance scale, eta,
            temperature...). Scalars only.
        shared: tensors that every sample shares, stored once without a batch dimension (the
            negative prompt's embeddings ``[1, L, D]`` of classifier-free guidance): ``select``
            and ``cat`` keep them as they are, ``to`` moves them.
        ref_log_probs: ``[B, T]`` log-probs under the reference policy, filled in by updates that
            need a KL term.
    """

    contexts: list[Context]
    log_probs: torch.Tensor
    mask: torch.Tensor
    data: dict[str, torch.Tensor] = field(default_factory=dict)
    outputs: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    ref_log_probs: torch.Tensor | None = None
    shared: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        b = len(self.contexts)
        if self.log_probs.dim() != 2 or self.log_probs.shape[0] != b:
            raise ValueError(f"log_probs must be [B={b}, T], got {tuple(self.log_probs.shape)}")
        if self.mask.shape != self.log_probs.shape:
            raise ValueError(
                f"mask {tuple(self.mask.shape)} must match log_probs {tuple(self.log_probs.shape)}"
            )

    @property
    def batch_size(self) -> int:
        return len(self.contexts)

    @property
    def num_steps(self) -> int:
        return self.log_probs.shape[1]

    @property
    def prompts(self) -> list[str]:
        return [c.prompt for c in self.contexts]

    def select(self, index: torch.Tensor | Sequence[int]) -> "Rollout":
        """A new rollout holding the samples at ``index`` (a 1-D index along the batch)."""
        idx = torch.as_tensor(index, dtype=torch.long)
        il = idx.tolist()

        def pick(v: Any) -> Any:
            if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == self.batch_size:
                return v[idx.to(v.device)]
            if isinstance(v, list) and len(v) == self.batch_size:
                return [v[i] for i in il]
            return v

        return Rollout(
            contexts=[self.contexts[i] for i in il],
            log_probs=pick(self.log_probs),
            mask=pick(self.mask),
            data={k: pick(v) for k, v in self.data.items()},
            outputs={k: pick(v) for k, v in self.outputs.items()},
            meta=dict(self.meta),
            ref_log_probs=None if self.ref_log_probs is None else pick(self.ref_log_probs),
            shared=dict(self.shared),
        )

    @staticmethod
    def cat(rollouts: Sequence["Rollout"]) -> "Rollout":
        """One rollout from several sampling batches (samples concatenated in order).

        ``log_probs`` and ``mask`` are padded along ``T`` when the batches differ in length;
        every other tensor must agree beyond the batch dimension.
        """
        if len(rollouts) == 1:
            return rollouts[0]
        t = max(r.num_steps for r in rollouts)

        def pad(x: torch.Tensor, value: float | bool) -> torch.Tensor:
            return torch.nn.functional.pad(x, (0, t - x.shape[1]), value=value) if x.shape[1] < t else x

        def join(key: str, values: list[Any]) -> Any:
            first = values[0]
            if isinstance(first, torch.Tensor):
                shapes = {tuple(v.shape[1:]) for v in values}
                if len(shapes) > 1:
                    raise ValueError(
                        f"sampling batches disagree on the shape of {key!r}: {sorted(shapes)}; this sampler needs "
                        "run.sample_batches=1"
                    )
                return torch.cat(values)
            if isinstance(first, list):
                return [x for v in values for x in v]
            return first

        first = rollouts[0]
        return Rollout(
            contexts=[c for r in rollouts for c in r.contexts],
            log_probs=torch.cat([pad(r.log_probs, 0.0) for r in rollouts]),
            mask=torch.cat([pad(r.mask, False) for r in rollouts]),
            data={k: join(f"data.{k}", [r.data[k] for r in rollouts]) for k in first.data},
            outputs={k: join(f"outputs.{k}", [r.outputs[k] for r in rollouts]) for k in first.outputs},
            meta=dict(first.meta),
            ref_log_probs=None,
            shared=dict(first.shared),
        )

    def to(self, device: torch.device | str) -> "Rollout":
        move = lambda v: v.to(device) if isinstance(v, torch.Tensor) else v  # noqa: E731
        return dataclasses.replace(
            self,
            log_probs=move(self.log_probs),
            mask=move(self.mask),
            data={k: move(v) for k, v in self.data.items()},
            ref_log_probs=move(self.ref_log_probs),
            shared={k: move(v) for k, v in self.shared.items()},
        )


@dataclass
class RewardOutput:
    """The composed reward of a rollout.

    ``total`` is the weighted sum of ``components``; each component is logged as
    ``reward/<name>`` (its mean per sample). A component is ``[B]`` (one reward per sample, e.g. an
    image score) or ``[B, T]`` (one reward per step, e.g. environment rewards; zero on masked
    steps). When any component is per-step, ``total`` is ``[B, T]`` and ``[B]`` components are
    added at each sample's last valid step; otherwise ``total`` is ``[B]``. ``per_sample`` gives
    the ``[B]`` return either way.
    """

    total: torch.Tensor
    components: dict[str, torch.Tensor]

    @staticmethod
    def cat(outputs: Sequence["RewardOutput"]) -> "RewardOutput":
        """Rewards of several sampling batches, concatenated (per-step ones padded along ``T``)."""
        if len(outputs) == 1:
            return outputs[0]

        def join(values: list[torch.Tensor]) -> torch.Tensor:
            if values[0].dim() == 2:
                t = max(v.shape[1] for v in values)
                values = [torch.nn.functional.pad(v, (0, t - v.shape[1])) for v in values]
            return torch.cat(values)

        return RewardOutput(
            total=join([o.total for o in outputs]),
            components={k: join([o.components[k] for o in outputs]) for k in outputs[0].components},
        )

    @property
    def per_sample(self) -> torch.Tensor:
        """``[B]``: the total, summed over steps when it is per step."""
        return self.total.sum(1) if self.total.dim() == 2 else self.total


class Policy(nn.Module):
    """The trainable generative model.

    A policy is an ``nn.Module`` whose ``forward`` recomputes log-probs *with* gradients, so that
    the loop can hand it to ``accelerator.prepare`` and every trainable parameter (LoRA included)
    takes part in gradient synchronisation across processes.

    Subclasses implement:

    * ``forward(rollout, steps=None) -> [B, K]``: log-probs of the rollout's recorded actions.
      ``steps`` is ``None`` (all ``T`` steps; returns ``[B, T]``) or a LongTensor ``[B, K]`` of step
      indices chosen per sample (returns ``[B, K]``). Diffusion policies use the latter to visit
      timesteps in a shuffled order per sample; language models compute all tokens in one pass.
      Policies that serve actor-critic updates (PPO) also accept ``with_values=True`` and/or
      ``with_entropy=True`` and then return a dict ``{"log_probs": [B, K], "values": [B, K],
      "entropy": [B, K]}`` (the value head is part of the policy module, so its gradients are
      synchronised like the rest). ``has_value_head`` tells updates whether values exist.
    * ``reference_log_probs(rollout, steps=None)``: the same under the reference policy (the base
      model with the adapter disabled), without gradients.
    * ``trainable_state_dict()`` / ``load_trainable_state_dict(sd)``: the trained weights only,
      for checkpoints (saved as safetensors).
    * ``save_pretrained(path)``: the trained weights in the format the ecosystem loads directly.
    """

    modality: str = "any"
    has_value_head: bool = False

    @property
    def device(self) -> torch.device:
        """Where the policy's parameters live (the loop moves it to the accelerator's device)."""
        return next(self.parameters()).device

    def forward(self, rollout: Rollout, steps: torch.Tensor | None = None) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    @torch.no_grad()
    def reference_log_probs(self, rollout: Rollout, steps: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no reference policy")

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """CPU copies of the trainable parameters, by name (the frozen model's ``state_dict`` is
        never built)."""
        return {n: p.detach().to("cpu", copy=True).contiguous() for n, p in self.named_parameters() if p.requires_grad}

    def load_trainable_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        expected = set(self.trainable_state_dict())
        got = set(state)
        if expected != got:
            missing, unexpected = sorted(expected - got)[:5], sorted(got - expected)[:5]
            raise ValueError(f"checkpoint does not match the policy: missing {missing}, unexpected {unexpected}")
        self.load_state_dict(dict(state), strict=False)

    def save_pretrained(self, path: str) -> None:  # pragma: no cover - every policy overrides
        raise NotImplementedError

    def setup(self, trainer: Any) -> None:
        """Called by the loop on every process once the run's components are built and a
        checkpoint (if any) is restored, before the first iteration. Default: nothing."""

    def close(self) -> None:
        """Called by the loop when the run stops, normally or not, to release what ``setup`` or
        the constructor acquired (files, threads, environments). Must be safe to call twice."""


class Sampler:
    """Turns contexts into a :class:`Rollout` (called under ``torch.no_grad``).

    ``sample(policy, contexts, generator) -> Rollout`` with ``B = len(contexts)``. The policy is
    the unwrapped module. ``generator`` seeds all sampling noise so that runs are reproducible.
    """

    modality: str = "any"
    training: bool = True
    """False while the samples are for evaluation (the report's fixed-seed samples, the held-out
    evaluation, ``polyrl eval``, ``polyrl sample``; set through :func:`polyrl.scoring.evaluating`):
    a sampler with training-only behaviour (lilGym's stop forcing) then turns it off."""

    def sample(self, policy: Policy, contexts: list[Context], generator: torch.Generator) -> Rollout:  # pragma: no cover
        raise NotImplementedError

    def sample_chunks(self, policy: Policy, contexts: list[Context], generator: torch.Generator) -> Iterator[Rollout]:
        """The same samples as :meth:`sample`, yielded in chunks as soon as each is ready, whose
        concatenation (:meth:`Rollout.cat`) equals ``sample``'s rollout. With ``run.async_rewards``
        the loop scores each chunk in the background while the next one samples. Default: one
        chunk, the whole ``sample``. Samplers that work in batches (``ddim``, ``lcm``) override it."""
        yield self.sample(policy, contexts, generator)

    def setup(self, trainer: Any) -> None:
        """Called by the loop before the first iteration (after a resume's restore). Default: nothing."""

    def close(self) -> None:
        """Called by the loop when the run stops: close environments, worker pools, files. Must be
        safe to call twice. Default: nothing."""


class Reward:
    """Scores a rollout: ``__call__(rollout) -> [B]`` (or ``[B, T]`` per step) float tensor,
    higher is better. Called under ``torch.no_grad``.

    ``reads`` names the rollout output the reward needs (``"images"``, ``"texts"``); the host
    checks before any model loads that the chosen sampler produces it.

    A *learned* reward (a discriminator, SMILING's score networks) also overrides ``learn``,
    which the loop calls on every process after each iteration's update with that iteration's
    rollout, and ``state_dict`` / ``load_state_dict``, which are saved in checkpoints
    (``rewards.pt``) and restored on resume. Plain rewards leave all three as they are.
    """

    reads: str = "any"
    scores_groups: bool = False
    """True when a sample's reward depends on the other samples of its group (a win rate among the
    group): such a reward always sees whole sampling batches, never chunks of them."""

    def __call__(self, rollout: Rollout) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def setup(self, trainer: Any) -> None:
        """Called by the loop before the first iteration (after a resume's restore). Default: nothing."""

    def learn(self, trainer: Any, rollout: Rollout) -> dict[str, float]:
        """Train on this iteration's rollout (learned rewards only); returns metrics to log."""
        return {}

    def close(self) -> None:
        """Called by the loop when the run stops. Must be safe to call twice. Default: nothing."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} has no state, got keys {sorted(state)}")


class Update:
    """The learning algorithm. ``step(ctx, rollout, rewards) -> metrics``.

    ``ctx`` is a :class:`polyrl.context.UpdateContext`: the accelerator, the prepared model (call
    it for log-probs with gradients), the unwrapped policy, the run config, seeded generators,
    ``backward``, ``optimizer_step``, ``accumulate`` (the micro-batches of one optimizer step, with
    gradient sync and loss scaling handled in one place) and ``sample_and_score``. ``rewards`` is
    ``[B]`` (or ``[B, T]`` per step) for this process's samples. Updates that need cross-process
    statistics gather them with ``ctx.accelerator``. Any state that must survive a resume
    (statistics trackers, adaptive coefficients) goes in ``state_dict``.
    """

    def setup(self, trainer: Any) -> None:
        """Called by the loop on every process before the first iteration, once the policy is
        built and a checkpoint (if any) is restored: stages that must run before training
        (A*-PO's V*, NLPO's masking policy). Default: nothing."""

    def step(self, trainer: Any, rollout: Rollout, rewards: torch.Tensor) -> dict[str, float]:  # pragma: no cover
        raise NotImplementedError

    def close(self) -> None:
        """Called by the loop when the run stops. Must be safe to call twice. Default: nothing."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} has no state, got keys {sorted(state)}")


#: The rollout formats a policy rescores, a sampler records and an update trains on (``ComponentSpec.rollout``
#: and ``ComponentSpec.accepts``). Plugins may add their own; these are the built-in ones.
ROLLOUT_FORMATS: dict[str, str] = {
    "diffusion_steps": "one action per denoising step of a diffusion sampler (latents, next latents, timesteps)",
    "consistency_steps": "one action per step of a consistency-model sampler (re-noised consistency outputs)",
    "flow_steps": "one action per integration step of a stochastic flow-matching sampler",
    "tokens": "one action per generated token of a language model",
    "env_steps": "one action per environment step, with the observation it was taken in",
    "transitions": "environment steps with next observations and terminations, for off-policy updates",
}

#: Capabilities a policy (or a sampler) declares and updates or samplers require
#: (``ComponentSpec.capabilities`` and ``ComponentSpec.requires``). Plugins may add their own.
CAPABILITIES: dict[str, str] = {
    "step_log_probs": "policy: forward(rollout, steps=[B, K]) rescores any subset of steps per sample",
    "value_head": "policy: forward(..., with_values=True) returns state values (actor-critic updates)",
    "entropy": "policy: forward(..., with_entropy=True) returns the entropy of each step's distribution",
    "reference": "policy: reference_log_probs() under the base model (adapter disabled or a frozen copy)",
    "token_mask": "policy: set_action_mask() restricts sampling to the top-p tokens of a frozen copy (NLPO)",
    "squashed_actions": "policy: tanh-squashed Gaussian actions with dist_params/log_prob_raw (SAC)",
    "action_likelihood": "policy: log-likelihood and mean of given environment actions (behaviour cloning)",
    "causal_lm": "policy: a decoder-only language model (sampled by 'generate')",
    "seq2seq_lm": "policy: an encoder-decoder language model (sampled by 'seq2seq_generate')",
    "lilgym_actions": "policy: factorised lilGym action heads over the image and the sentence",
    "lilgym_text_actions": "policy: a language model that writes lilGym actions as text",
    "box_actions": "policy: continuous actions for a gymnasium Box action space",
    "dataset_resets": "sampler: resets samples to prefixes of dataset responses (DR-PO)",
    "flow_step_means": "policy: forward(..., with_mean=True) returns each SDE step's mean (Flow-GRPO's KL)",
    "flow_velocity": "policy: forward(..., velocity_at=(x, sigma)) returns the velocity at given latents (DiffusionNFT)",
}



def _as_set(value: Any, params: Any) -> frozenset[str]:
    if callable(value):
        value = value(params)
    if isinstance(value, str):
        return frozenset((value,))
    return frozenset(value or ())


@dataclass
class ComponentSpec:
    """What a plugin contributes through a registration hook.

    Attributes:
        name: the name a run config selects it by (``policy: {name: ...}``).
        factory: ``factory(config)`` builds the component from its config dataclass instance.
            Samplers and rewards are built after the policy and also receive ``policy=`` as a
            keyword, so that they can share its device and tokenizer.
        config_cls: the component's config dataclass (every field documented).
        modality: ``"image"``, ``"text"``, ``"env"`` or ``"any"``; a sampler's modality must match
            its policy's, a reward's ``reads`` must be produced by the sampler.
        produces / reads: for samplers, the rollout outputs they fill (``("images",)``); for
            rewards, the outputs they need.
        description: one line for ``polyrl plugins``.
        provider: filled in by the host: the plugin that registered it.
        rollout: policies: the rollout format(s) the policy rescores; samplers: the format(s) the
            sampler records (a name of :data:`ROLLOUT_FORMATS`, or a tuple of them). A policy and
            a sampler fit when they share a format. Empty: not declared (any).
        capabilities: policies (and samplers): what the component offers (names of
            :data:`CAPABILITIES`), a set or a function of the component's config object that
            returns one (a LoRA policy has a reference, a fully fine-tuned one may not). It is
            called on the validated config, before any model loads.
        accepts: updates: the rollout formats they train on. Empty: any.
        requires: updates and samplers: the capabilities they need from the policy (and, for an
            update, from the sampler), a set or a function of the component's *own* config (grpo
            needs ``reference`` only when ``beta > 0``).

    The new fields default to "not declared", so that specs written before them still load: the
    host then checks only ``modality``, ``produces`` and ``reads``.
    """

    name: str
    factory: Callable[..., Any]
    config_cls: type
    modality: str = "any"
    produces: tuple[str, ...] = ()
    reads: tuple[str, ...] = ()
    description: str = ""
    provider: str = ""
    rollout: str | tuple[str, ...] = ()
    capabilities: Any = frozenset()
    accepts: tuple[str, ...] = ()
    requires: Any = frozenset()

    @property
    def formats(self) -> frozenset[str]:
        """The declared rollout formats (``rollout`` as a set; empty when not declared)."""
        return _as_set(self.rollout, None)

    def capabilities_for(self, params: Any) -> frozenset[str]:
        """The capabilities of this component built from ``params`` (its config object)."""
        return _as_set(self.capabilities, params)

    def requirements_for(self, params: Any) -> frozenset[str]:
        """The capabilities this component needs when built from ``params`` (its config object)."""
        return _as_set(self.requires, params)

    def requirement_hints(self, params: Any) -> dict[str, str]:
        """``{capability: hint}`` for the needs that ``requires`` explains (when it is, or returns,
        a mapping of capability to a sentence such as "set update.beta: 0 to train without it")."""
        value = self.requires(params) if callable(self.requires) else self.requires
        return {k: v for k, v in value.items() if v} if isinstance(value, Mapping) else {}
