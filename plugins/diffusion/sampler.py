"""The ``ddim`` sampler: classifier-free-guided DDIM with η > 0, recording every step (DDPO)."""

from __future__ import annotations

from dataclasses import dataclass

from typing import Iterator

import torch

from polyrl import ConfigError, Context, Rollout, Sampler

from .ddim import ddim_step_with_logprob, previous_timesteps

__all__ = ["DDIMSampler", "DDIMSamplerConfig"]


@dataclass
class DDIMSamplerConfig:
    """Stochastic DDIM sampling with classifier-free guidance."""

    num_steps: int = 10
    """Denoising steps ``T`` per sample. Stable Diffusion and DDPO use 50; 10 keeps the tiny model
    fast on a CPU."""
    eta: float = 1.0
    """DDIM's η in (0, 1]: the noise scale of each step (1 = DDPM-like, DDPO's setting). It must
    be > 0, because a deterministic step has no log-probability to train."""
    guidance_scale: float = 5.0
    """Classifier-free guidance weight ``g`` (DDPO uses 5); ``<= 1`` disables guidance. Training
    recomputes log-probs with the same value."""
    batch_size: int = 8
    """Samples denoised together in one UNet batch (the UNet sees twice as many with guidance).
    Results do not depend on it: all noise is drawn per sample up front."""
    negative_prompt: str = ""
    """Prompt of the unconditional branch of guidance (SD's default is the empty prompt)."""

    def check(self) -> None:
        """Reject impossible settings before any model loads."""
        if self.num_steps < 1:
            raise ConfigError(f"sampler.num_steps must be >= 1, got {self.num_steps}")
        if not 0 < self.eta <= 1:
            raise ConfigError(
                f"sampler.eta must be in (0, 1], got {self.eta}: with eta = 0 DDIM is deterministic and has "
                "no log-probability to train"
            )
        if self.guidance_scale < 0:
            raise ConfigError(f"sampler.guidance_scale must be >= 0, got {self.guidance_scale}")
        if self.batch_size < 1:
            raise ConfigError(f"sampler.batch_size must be >= 1, got {self.batch_size}")


class DDIMSampler(Sampler):
    """Samples images from a :class:`~polyrl.plugins.diffusion.policy.DiffusionPolicy` and records
    the DDIM trajectory that its ``forward`` rescores."""

    modality = "image"

    def __init__(self, config: DDIMSamplerConfig | None = None) -> None:
        self.config = config or DDIMSamplerConfig()

    @torch.no_grad()
    def sample(self, policy, contexts: list[Context], generator: torch.Generator) -> Rollout:
        """All of :meth:`sample_chunks`, concatenated."""
        return Rollout.cat(list(self.sample_chunks(policy, contexts, generator)))

    @torch.no_grad()
    def sample_chunks(self, policy, contexts: list[Context], generator: torch.Generator) -> Iterator[Rollout]:
        """Denoise ``B = len(contexts)`` latents and decode them.

        All random numbers come from ``generator``, drawn on its device (a CPU generator gives
        the same samples on every device) in this order: initial latents ``[B, C, h, w]``, then
        step noise ``[B, T, C, h, w]``. The same generator state gives the same rollout.

        Returns a :class:`Rollout` with
            ``log_probs`` ``[B, T]`` and ``mask`` ``[B, T]`` (all True);
            ``data``: ``trajectory`` ``[B, T + 1, C, h, w]`` (the chain of latents: step ``j``
            goes from ``trajectory[:, j]`` to ``trajectory[:, j + 1]``; stored once), ``timesteps``
            / ``prev_timesteps`` ``[B, T]`` long (each step's timestep and the one it lands on),
            ``prompt_embeds`` ``[B, L, D]``; ``shared["negative_prompt_embeds"]`` ``[1, L, D]`` (the
            negative prompt's, stored once);
            ``outputs["images"]`` ``[B, 3, H, W]`` float in ``[0, 1]``;
            ``meta`` = ``{"eta", "guidance_scale", "num_steps"}``.
        All tensors live on the policy's device. Yields one rollout per ``batch_size`` samples as
        soon as it is decoded (their concatenation is the whole batch's rollout), so that rewards
        can score a chunk while the next one samples.
        """
        if not hasattr(policy, "predict_noise"):
            raise TypeError(f"the ddim sampler needs a diffusion policy, got {type(policy).__name__}")
        cfg = self.config
        b, n_steps = len(contexts), cfg.num_steps
        device = policy.device
        prompts = [c.prompt for c in contexts]

        policy.set_num_steps(n_steps)
        scheduler = policy.scheduler
        timesteps = scheduler.timesteps.to(device=device, dtype=torch.long)  # [T], descending
        prev_timesteps = previous_timesteps(scheduler, timesteps)  # [T]: where each step lands
        c, h, w = policy.latent_shape
        gen_device = generator.device
        init = torch.randn((b, c, h, w), generator=generator, device=gen_device) * scheduler.init_noise_sigma
        noise = torch.randn((b, n_steps, c, h, w), generator=generator, device=gen_device)

        negative = policy.encode_prompts([cfg.negative_prompt])  # [1, L, D], stored once
        for s in range(0, b, cfg.batch_size):
            e = min(s + cfg.batch_size, b)
            pos = policy.encode_prompts(prompts[s:e])
            neg = negative.expand(e - s, -1, -1)
            x = init[s:e].to(device)
            chain, lps = [x], []
            for i, t in enumerate(timesteps):
                tt = t.expand(e - s)
                eps = policy.predict_noise(x, tt, pos, neg, cfg.guidance_scale)
                x, lp = ddim_step_with_logprob(scheduler, eps, tt, x, cfg.eta, noise=noise[s:e, i],
                                               prev_timestep=prev_timesteps[i].expand(e - s))
                chain.append(x)
                lps.append(lp)
            log_probs = torch.stack(lps, dim=1)
            yield Rollout(
                contexts=list(contexts[s:e]),
                log_probs=log_probs,
                mask=torch.ones_like(log_probs, dtype=torch.bool),
                data={
                    "trajectory": torch.stack(chain, dim=1),
                    "timesteps": timesteps.expand(e - s, n_steps).clone(),
                    "prev_timesteps": prev_timesteps.expand(e - s, n_steps).clone(),
                    "prompt_embeds": pos,
                },
                outputs={"images": policy.decode(x)},
                meta={"eta": cfg.eta, "guidance_scale": cfg.guidance_scale, "num_steps": n_steps},
                shared={"negative_prompt_embeds": negative},
            )
