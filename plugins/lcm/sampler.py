"""The ``lcm`` sampler: few-step latent-consistency sampling that records every step (RLCM)."""

from __future__ import annotations

from dataclasses import dataclass

from typing import Iterator

import torch

from polyrl import ConfigError, Context, Rollout, Sampler

from .lcm import lcm_step_with_logprob, lcm_timesteps, next_timesteps

__all__ = ["LCMSampler", "LCMSamplerConfig"]


@dataclass
class LCMSamplerConfig:
    """Latent-consistency sampling with the guidance embedding, recording every step."""

    num_steps: int = 8
    """Consistency steps ``T`` per sample (RLCM: 8, 16 for prompt alignment; 2-4 already give
    usable images). At least 2: with one step the image does not depend on the recorded action."""
    guidance_scale: float = 8.0
    """Guidance scale; the UNet gets the embedding of ``w = guidance_scale − 1`` as
    ``timestep_cond`` (RLCM and LCM_Dreamshaper_v7 use 8). Training recomputes log-probs with the
    same value."""
    original_inference_steps: int | None = None
    """Steps of the solver the model was distilled with, from which the timesteps are taken
    (``null``: the scheduler config's ``original_inference_steps``, 50 for LCM-SD)."""
    batch_size: int = 8
    """Samples run through the UNet together. Results do not depend on it: all noise is drawn per
    sample up front."""

    def check(self) -> None:
        """Reject impossible settings before any model loads."""
        if self.num_steps < 2:
            raise ConfigError(
                f"sampler.num_steps must be >= 2, got {self.num_steps}: the image is decoded from the last step's "
                "consistency output, so with one step it does not depend on any recorded action"
            )
        if self.original_inference_steps is not None and not self.num_steps <= self.original_inference_steps <= 1000:
            raise ConfigError(
                f"sampler.original_inference_steps must be in [num_steps={self.num_steps}, 1000] or null, "
                f"got {self.original_inference_steps}"
            )
        if self.guidance_scale < 1:
            raise ConfigError(
                f"sampler.guidance_scale must be >= 1 (w = guidance_scale - 1 >= 0), got {self.guidance_scale}"
            )
        if self.batch_size < 1:
            raise ConfigError(f"sampler.batch_size must be >= 1, got {self.batch_size}")

    def check_run(self, cfg) -> None:
        """The ``lcm`` sampler needs a latent-consistency policy (``lcm``)."""
        from .policy import LCMPolicyConfig

        if not isinstance(cfg.policy.params, LCMPolicyConfig):
            raise ConfigError(
                f"sampler.name: sampler 'lcm' samples latent consistency models and needs policy 'lcm', got "
                f"{cfg.policy.name!r}"
            )


class LCMSampler(Sampler):
    """Samples images from an :class:`~polyrl.plugins.lcm.policy.LCMPolicy` and records the
    consistency trajectory that its ``forward`` rescores."""

    modality = "image"

    def __init__(self, config: LCMSamplerConfig | None = None) -> None:
        self.config = config or LCMSamplerConfig()

    def timesteps(self, policy) -> torch.Tensor:
        """The ``[T]`` LCM timesteps for ``num_steps`` on ``policy``'s scheduler."""
        sch = policy.scheduler.config
        original = self.config.original_inference_steps or int(sch.get("original_inference_steps", 50))
        return lcm_timesteps(self.config.num_steps, original, int(sch.num_train_timesteps))

    @torch.no_grad()
    def sample(self, policy, contexts: list[Context], generator: torch.Generator) -> Rollout:
        """All of :meth:`sample_chunks`, concatenated."""
        return Rollout.cat(list(self.sample_chunks(policy, contexts, generator)))

    @torch.no_grad()
    def sample_chunks(self, policy, contexts: list[Context], generator: torch.Generator) -> Iterator[Rollout]:
        """Run ``T`` consistency steps on ``B = len(contexts)`` latents and decode the last ``f``.

        Random numbers come from ``generator`` on its device (a CPU generator gives the same
        samples on every device), in this order: initial latents ``[B, C, h, w]``, then step noise
        ``[B, T, C, h, w]``.

        Returns a :class:`Rollout` with
            ``log_probs`` ``[B, T]`` and ``mask`` ``[B, T]`` (all True);
            ``data``: ``trajectory`` ``[B, T + 1, C, h, w]`` (the chain of latents: step ``j`` goes
            from ``trajectory[:, j]`` to its re-noised ``trajectory[:, j + 1]``), ``timesteps`` / ``next_timesteps`` ``[B, T]`` long, ``prompt_embeds``
            ``[B, L, D]``;
            ``outputs["images"]`` ``[B, 3, H, W]`` float in ``[0, 1]``, decoded from the last
            step's consistency output;
            ``meta`` = ``{"guidance_scale", "num_steps"}``.
        All tensors live on the policy's device. Yields one rollout per ``batch_size`` samples as
        soon as it is decoded (their concatenation is the whole batch's rollout), so that rewards
        can score a chunk while the next one samples.
        """
        if not hasattr(policy, "guidance_cond"):
            raise TypeError(f"the lcm sampler needs an LCM policy, got {type(policy).__name__}")
        cfg = self.config
        b, n = len(contexts), cfg.num_steps
        device = policy.device
        prompts = [c.prompt for c in contexts]
        ts = self.timesteps(policy).to(device)
        ts_next = next_timesteps(ts)
        c, h, w = policy.latent_shape
        gen_device = generator.device
        init = torch.randn((b, c, h, w), generator=generator, device=gen_device) * policy.scheduler.init_noise_sigma
        noise = torch.randn((b, n, c, h, w), generator=generator, device=gen_device)

        for s in range(0, b, cfg.batch_size):
            e = min(s + cfg.batch_size, b)
            emb = policy.encode_prompts(prompts[s:e])
            cond = policy.guidance_cond(cfg.guidance_scale, e - s)
            x = init[s:e].to(device)
            chain, lps = [x], []
            denoised = x
            for i in range(n):
                t, t_next = ts[i].expand(e - s), ts_next[i].expand(e - s)
                out = policy.predict(x, t, emb, cond)
                x, denoised, lp = lcm_step_with_logprob(policy.scheduler, out, t, t_next, x, noise=noise[s:e, i])
                chain.append(x)
                lps.append(lp)
            log_probs = torch.stack(lps, dim=1)
            yield Rollout(
                contexts=list(contexts[s:e]),
                log_probs=log_probs,
                mask=torch.ones_like(log_probs, dtype=torch.bool),
                data={
                    "trajectory": torch.stack(chain, dim=1),
                    "timesteps": ts.expand(e - s, n).clone(),
                    "next_timesteps": ts_next.expand(e - s, n).clone(),
                    "prompt_embeds": emb,
                },
                outputs={"images": policy.decode(denoised)},
                meta={"guidance_scale": cfg.guidance_scale, "num_steps": n},
            )
