"""What an update algorithm sees of the run: :class:`UpdateContext`.

The loop builds one context per iteration and passes it to ``Update.step(ctx, rollout, rewards)``.
It holds the few things an update needs (the accelerator, the policy in its two forms, the
configuration, the loop position, the reward weights) and the operations it may perform
(``backward``, ``optimizer_step``, per-purpose generators, ``sample_and_score``), so that an
update does not depend on the rest of the trainer.

Gradient accumulation goes through :meth:`UpdateContext.accumulate`: it walks the micro-batches of
one optimizer step, skips the gradient all-reduce on all but the last one (``no_sync``) and
divides each micro-batch's loss by the number of micro-batches before its backward pass. The
statistics to log stay on the device in a :class:`polyrl.stats.UpdateStats` and are read once, at
the end (a read per micro-batch would stall a GPU each time)::

    stats = UpdateStats()
    for window in windows(perm, cfg.train_batch_size, cfg.gradient_accumulation_batches):
        for micro, idx in ctx.accumulate(window):
            with micro:                      # no gradient sync unless this is the last micro-batch
                loss = loss_fn(ctx.model(rollout.select(idx)))
                micro.backward(loss)         # backward(loss / len(window))
            stats.add("loss", loss)          # no host sync
        stats.add("grad_norm", ctx.optimizer_step())
    return stats.means()                     # one host sync
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Generic, Iterable, Iterator, Sequence, TypeVar

import torch

if TYPE_CHECKING:
    from accelerate import Accelerator

    from .config import RunConfig
    from .types import Context, Policy, RewardOutput, Rollout

T = TypeVar("T")


@dataclass
class UpdateContext:
    """The run as an update algorithm sees it during one iteration.

    The attribute names are those of the loop's trainer (``model``, ``policy``, ``accelerator``,
    ``config``, ``iteration``, ``generator``, ``no_sync``, ``backward``, ``optimizer_step``,
    ``rewards``), so an update written against the trainer runs unchanged on a context.
    """

    accelerator: Accelerator
    """The ``accelerate.Accelerator``: device, mixed precision, processes (``gather``, ``reduce``)."""
    model: Any
    """The policy as prepared by accelerate (DDP-wrapped on several processes): call it for
    log-probs whose gradients are synchronised across processes."""
    policy: Policy
    """The unwrapped policy: reference log-probs, values without gradients, its own settings."""
    config: RunConfig
    """The run's validated configuration (read it; do not change it)."""
    iteration: int
    """The iteration in progress, from 1 (during ``Update.setup``: the last completed one)."""
    completed: int = 0
    """The last completed iteration (0 before the first; after a resume, the restored one)."""
    rewards: tuple[tuple[str, float, Any], ...] = ()
    """The configured rewards as ``(name, weight, reward)``, in the order of the rollout's
    ``outputs["reward_components"]`` columns."""
    prompt_rows: Sequence[tuple[str, dict]] = ()
    """Every ``(prompt, extra columns)`` row of the run's prompt source."""
    backward_fn: Callable[[torch.Tensor], None] | None = field(default=None, repr=False)
    """What :meth:`backward` runs; None: ``accelerator.backward``."""
    optimizer_step_fn: Callable[[], float] | None = field(default=None, repr=False)
    """What :meth:`optimizer_step` runs (the trainer's clip, step and zero)."""
    sample_fn: Callable[[list[Context], torch.Generator], Rollout] | None = field(default=None, repr=False)
    """What :meth:`sample_and_score` samples with: the configured sampler on the unwrapped policy."""
    score_fn: Callable[[Rollout], RewardOutput] | None = field(default=None, repr=False)
    """What :meth:`sample_and_score` scores with: the loop's reward hook."""

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_trainer(cls, trainer: Any) -> UpdateContext:
        """The context of ``trainer``'s iteration in progress (:class:`polyrl.loop.Trainer`)."""
        sampler, policy, hook = trainer.sampler, trainer.policy, trainer.host.pm.hook

        def sample(contexts: list[Context], generator: torch.Generator) -> Rollout:
            return sampler.sample(policy, contexts, generator)

        def score(rollout: Rollout) -> RewardOutput:
            return hook.polyrl_reward(trainer=trainer, rollout=rollout)

        return cls(
            accelerator=trainer.accelerator, model=trainer.model, policy=policy, config=trainer.config,
            iteration=trainer.iteration, completed=trainer.completed, rewards=tuple(trainer.rewards),
            prompt_rows=trainer.prompts.rows, backward_fn=trainer.backward,
            optimizer_step_fn=trainer.optimizer_step, sample_fn=sample, score_fn=score,
        )

    @classmethod
    def of(cls, source: Any) -> UpdateContext:
        """``source`` itself if it is a context, else its context: a trainer's (``update_context()``),
        for plugins that still call ``update.step(trainer, ...)``."""
        if isinstance(source, cls):
            return source
        make = getattr(source, "update_context", None)
        if not callable(make):
            raise TypeError(
                f"an update needs an UpdateContext (or the loop's Trainer), got {type(source).__name__}"
            )
        return make()

    # ------------------------------------------------------------------ reading
    @property
    def reward_weights(self) -> dict[str, float]:
        """Each configured reward's weight, by name, in the order of :attr:`rewards`."""
        return {name: weight for name, weight, _ in self.rewards}

    def generator(self, purpose: str) -> torch.Generator:
        """A CPU generator seeded from (seed, iteration, process, purpose): the same draws on a
        resumed run, different ones on each process."""
        from .loop import derive_seed

        seed = derive_seed(self.config.run.seed, self.iteration, self.accelerator.process_index, purpose)
        return torch.Generator().manual_seed(seed)

    # ------------------------------------------------------------------ gradients
    def no_sync(self, sync: bool) -> contextlib.AbstractContextManager:
        """Around a micro-step's forward and backward: skip the gradient all-reduce unless ``sync``
        (the last micro-step before :meth:`optimizer_step`). :meth:`accumulate` does this for you."""
        return contextlib.nullcontext() if sync else self.accelerator.no_sync(self.model)

    def backward(self, loss: torch.Tensor) -> None:
        """Backpropagate ``loss`` (through accelerate: the mixed-precision loss scale applies)."""
        if self.backward_fn is not None:
            self.backward_fn(loss)
        else:
            self.accelerator.backward(loss)

    def optimizer_step(self) -> float:
        """Clip the gradient norm (``optimizer.max_grad_norm``), step, zero the gradients; returns
        the norm. A non-finite norm raises :class:`polyrl.errors.NonFiniteError` before the step.

        Reading the norm is the step's one host sync (the check must decide before the step);
        record the other statistics of an update with :class:`polyrl.stats.UpdateStats`, which reads
        them once, at the end."""
        if self.optimizer_step_fn is None:
            raise RuntimeError("this UpdateContext has no optimizer (it was built without optimizer_step_fn)")
        return self.optimizer_step_fn()

    def accumulate(self, items: Iterable[T], scale: int | float | None = None) -> Iterator[tuple[MicroStep, T]]:
        """The micro-steps of one optimizer step: yields ``(micro, item)`` for each of ``items``
        (the window's micro-batches).

        ``with micro:`` skips the gradient all-reduce on every micro-step but the last (which
        synchronises the accumulated gradient); ``micro.backward(loss)`` runs ``backward(loss /
        scale)`` inside it. ``scale`` defaults to the number of items, so the step's gradient is
        the mean of the micro-batch losses' gradients; pass the number of loss terms when a
        micro-step sums several (DDPO's denoising steps), or 1 for a loss that is already
        normalised over the whole step (GRPO's ``dapo``). Call :meth:`optimizer_step` after the loop.
        """
        items = list(items)
        if not items:
            raise ValueError("accumulate: an optimizer step needs at least one micro-batch")
        scale = len(items) if scale is None else scale
        if not scale > 0:
            raise ValueError(f"accumulate: scale must be > 0, got {scale}")
        for k, item in enumerate(items):
            yield MicroStep(self, k, len(items), scale), item

    # ------------------------------------------------------------------ sampling
    def sample_and_score(self, contexts: Sequence[Context], purpose: str) -> tuple[Rollout, RewardOutput]:
        """Sample ``contexts`` with the configured sampler from the unwrapped policy (without
        gradients, with :meth:`generator` of ``purpose``) and score them through the loop's reward
        hook (plugins that wrap it apply). For samples besides the iteration's rollout, such as
        A*-PO's reference samples."""
        if self.sample_fn is None or self.score_fn is None:
            raise RuntimeError("this UpdateContext cannot sample (it was built without sample_fn and score_fn)")
        with torch.no_grad():
            rollout = self.sample_fn(list(contexts), self.generator(purpose))
            return rollout, self.score_fn(rollout)


class MicroStep(Generic[T]):
    """One micro-batch of an optimizer step (see :meth:`UpdateContext.accumulate`).

    Attributes:
        index: its position in the step, from 0.
        count: the step's number of micro-batches.
        last: whether it is the last one (its backward pass synchronises the gradients).
        scale: what :meth:`backward` divides the loss by.
    """

    def __init__(self, ctx: UpdateContext, index: int, count: int, scale: int | float) -> None:
        self.ctx, self.index, self.count, self.scale = ctx, index, count, scale
        self.last = index == count - 1
        self._sync: contextlib.AbstractContextManager | None = None

    def __enter__(self) -> MicroStep:
        if self._sync is not None:
            raise RuntimeError("a micro-step is already entered")
        self._sync = self.ctx.no_sync(sync=self.last)
        self._sync.__enter__()
        return self

    def __exit__(self, *exc: Any) -> Any:
        sync, self._sync = self._sync, None
        return sync.__exit__(*exc) if sync is not None else None

    def backward(self, loss: torch.Tensor) -> None:
        """``ctx.backward(loss / scale)``; only inside ``with micro:`` (where the gradient sync is set)."""
        if self._sync is None:
            raise RuntimeError("micro.backward(loss) runs inside `with micro:` (which sets the gradient sync)")
        self.ctx.backward(loss if self.scale == 1 else loss / self.scale)
