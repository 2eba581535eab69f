"""The ``flow_sde`` sampler: Flow-GRPO's SDE sampling of a flow-matching model, recording every
stochastic step (all steps, or a window of ``k`` as in Flow-GRPO-Fast / MixGRPO)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from polyrl import ConfigError, Context, Rollout, Sampler

from .sde import ode_step, sde_step_with_logprob

__all__ = ["FlowSDESampler", "FlowSDESamplerConfig"]


@dataclass
class FlowSDESamplerConfig:
    """Flow-GRPO's SDE sampling (the flow's Euler steps with marginal-preserving noise)."""

    num_steps: int = 10
    """Integration steps ``N`` per sample (Flow-GRPO trains SD3.5-M with 10, evaluates with 40)."""
    noise_level: float = 0.7
    """``a`` in the noise scale ``s = a·sqrt(σ / (1 − σ))`` (Flow-GRPO: 0.7). 0 samples the
    deterministic ODE and records no steps (for ``diffusion_nft``, which needs only the images)."""
    guidance_scale: float = 1.0
    """Classifier-free guidance scale (SD3; 1 = none, as Flow-GRPO-without-CFG and DiffusionNFT
    train); for a guidance-distilled FLUX, the value of its guidance embedding. Training rescores
    steps with the same value."""
    sde_window_size: int | None = None
    """null: every step is stochastic and recorded (Flow-GRPO). ``k``: only a window of ``k``
    consecutive steps is stochastic and recorded; the others are deterministic ODE steps that are
    not trained (Flow-GRPO-Fast, MixGRPO)."""
    sde_window_range: list[int] | None = None
    """``[lo, hi]``: the window starts at a step drawn uniformly from ``lo .. hi − k`` per sampling
    call (null: ``[0, num_steps // 2]``, Flow-GRPO-Fast's early steps; ``[s, s + k]`` fixes it)."""
    height: int | None = None
    """Image height in pixels (null: the model's default size)."""
    width: int | None = None
    """Image width in pixels (null: the model's default size)."""
    batch_size: int = 8
    """Samples run through the transformer together; results do not depend on it (all noise is
    drawn per sample up front)."""

    def check(self) -> None:
        """Reject impossible settings before any model loads."""
        if self.num_steps < 1:
            raise ConfigError(f"sampler.num_steps must be >= 1, got {self.num_steps}")
        if self.noise_level < 0:
            raise ConfigError(f"sampler.noise_level must be >= 0, got {self.noise_level}")
        if self.guidance_scale < 1:
            raise ConfigError(f"sampler.guidance_scale must be >= 1 (1 = no guidance), got {self.guidance_scale}")
        if self.batch_size < 1:
            raise ConfigError(f"sampler.batch_size must be >= 1, got {self.batch_size}")
        for name in ("height", "width"):
            v = getattr(self, name)
            if v is not None and (v < 16 or v % 16):
                raise ConfigError(f"sampler.{name} must be a multiple of 16 (>= 16) or null, got {v}")
        if self.sde_window_size is not None:
            if not 1 <= self.sde_window_size <= self.num_steps:
                raise ConfigError(
                    f"sampler.sde_window_size must be in [1, num_steps={self.num_steps}] or null, got {self.sde_window_size}"
                )
            lo, hi = self.window_range
            if not 0 <= lo <= hi - self.sde_window_size or hi > self.num_steps:
                raise ConfigError(
                    f"sampler.sde_window_range {[lo, hi]} must satisfy 0 <= lo <= hi - sde_window_size "
                    f"({self.sde_window_size}) and hi <= num_steps ({self.num_steps})"
                )
        elif self.sde_window_range is not None:
            raise ConfigError("sampler.sde_window_range needs sampler.sde_window_size")
        if self.sde_window_range is not None and len(self.sde_window_range) != 2:
            raise ConfigError(f"sampler.sde_window_range must be [lo, hi], got {self.sde_window_range}")

    @property
    def window_range(self) -> tuple[int, int]:
        if self.sde_window_range is None:
            return 0, max(self.num_steps // 2, self.sde_window_size or 1)
        return int(self.sde_window_range[0]), int(self.sde_window_range[1])

    def check_run(self, cfg) -> None:
        """``flow_sde`` samples the ``flow`` policy."""
        from .policy import FlowPolicyConfig

        if not isinstance(cfg.policy.params, FlowPolicyConfig):
            raise ConfigError(f"sampler.name: sampler 'flow_sde' needs policy 'flow', got {cfg.policy.name!r}")


class FlowSDESampler(Sampler):
    """Samples images from a :class:`~polyrl.plugins.flow.policy.FlowPolicy` and records the SDE
    steps that its ``forward`` rescores."""

    modality = "image"

    def __init__(self, config: FlowSDESamplerConfig | None = None) -> None:
        self.config = config or FlowSDESamplerConfig()
        self.config.check()

    def stochastic_steps(self, generator: torch.Generator) -> list[int]:
        """The step indices that are stochastic (and recorded) in this sampling call."""
        cfg = self.config
        if cfg.noise_level == 0:
            return []
        if cfg.sde_window_size is None:
            return list(range(cfg.num_steps))
        lo, hi = cfg.window_range
        start = lo + int(torch.randint(0, hi - cfg.sde_window_size - lo + 1, (1,), generator=generator))
        return list(range(start, start + cfg.sde_window_size))

    @torch.no_grad()
    def sample(self, policy, contexts: list[Context], generator: torch.Generator) -> Rollout:
        """Integrate ``N`` steps from Gaussian latents and decode.

        Random numbers come from ``generator`` in this order: the window start (windowed
        sampling), initial latents ``[B, ...]``, step noise ``[B, N, ...]``.

        Returns a :class:`Rollout` with ``log_probs``/``mask`` ``[B, T]`` (``T`` = stochastic steps),
        ``data``: ``trajectory`` ``[B, T + 1, ...]`` (the chain through the stochastic steps, which
        are consecutive: step ``j`` goes from ``trajectory[:, j]`` to ``trajectory[:, j + 1]``;
        ``[B, 0, ...]`` without stochastic steps), ``sigmas``/``next_sigmas``/``step_index``
        ``[B, T]``, ``prompt_embeds``, ``pooled_prompt_embeds``, ``final_latents`` ``[B, ...]`` (the clean latents) and
        ``schedule`` ``[B, N]`` (the sampling sigmas); ``outputs["images"]``; ``shared``: ``negative_prompt_embeds`` ``[1, L, D]`` and
        ``negative_pooled_prompt_embeds`` ``[1, P]`` with guidance (the empty prompt's, once); ``meta``:
        ``guidance_scale``, ``noise_level``, ``sigma_max``, ``num_steps``, ``height``, ``width``.
        """
        if not hasattr(policy, "velocity"):
            raise TypeError(f"the flow_sde sampler needs a flow policy, got {type(policy).__name__}")
        cfg = self.config
        b, n = len(contexts), cfg.num_steps
        height, width = policy.image_size(cfg.height, cfg.width)
        policy.set_latent_grid(height, width)
        sigmas = policy.sigmas(n, height, width)
        # Flow-GRPO's sigma_max: the first sigma below 1 (the schedule's second one when it starts at 1)
        sigma_max = float(sigmas[1]) if float(sigmas[0]) >= 1 and n > 1 else float(sigmas[0])
        sde = self.stochastic_steps(generator)
        shape = policy.latent_shape(height, width)
        device = policy.device
        gen_device = generator.device
        init = torch.randn((b, *shape), generator=generator, device=gen_device)
        noise = torch.randn((b, n, *shape), generator=generator, device=gen_device)
        guided = cfg.guidance_scale > 1 and policy.layout == "sd3"
        prompts = [c.prompt for c in contexts]

        keys = ("trajectory", "log_probs", "final", "images", "emb", "pooled")
        acc: dict[str, list[torch.Tensor]] = {k: [] for k in keys}
        negative = None
        if guided:  # the empty prompt's embeddings, once for all samples
            negative = policy.encode_prompts([""])
        for s in range(0, b, cfg.batch_size):
            e = min(s + cfg.batch_size, b)
            embeds = policy.encode_prompts(prompts[s:e])
            neg = None if negative is None else {k: v.expand(e - s, *v.shape[1:]) for k, v in negative.items()}
            x = init[s:e].to(device).float()
            chain, lps = [], []
            for i in range(n):
                sig = sigmas[i].expand(e - s).to(device)
                sig_next = sigmas[i + 1].expand(e - s).to(device)
                v = policy.velocity(x, sig, embeds, neg, cfg.guidance_scale)
                if i in sde:
                    if not chain:
                        chain.append(x)
                    x, lp, _, _ = sde_step_with_logprob(v, x, sig, sig_next, cfg.noise_level, sigma_max,
                                                        noise=noise[s:e, i].to(device))
                    chain.append(x)
                    lps.append(lp)
                else:
                    x = ode_step(v, x, sig, sig_next)
            t = len(sde)
            acc["trajectory"].append(torch.stack(chain, 1) if t else x.new_zeros((e - s, 0, *shape)))
            acc["log_probs"].append(torch.stack(lps, 1) if t else x.new_zeros((e - s, 0)))
            acc["final"].append(x)
            acc["images"].append(policy.decode(x, height, width))
            acc["emb"].append(embeds["prompt_embeds"])
            acc["pooled"].append(embeds["pooled_prompt_embeds"])

        log_probs = torch.cat(acc["log_probs"])
        idx = torch.tensor(sde, dtype=torch.long)
        data = {
            "trajectory": torch.cat(acc["trajectory"]),
            "sigmas": sigmas[idx].to(device).expand(b, len(sde)).clone(),
            "next_sigmas": sigmas[idx + 1].to(device).expand(b, len(sde)).clone(),
            "step_index": idx.to(device).expand(b, len(sde)).clone(),
            "final_latents": torch.cat(acc["final"]),
            "schedule": sigmas[:-1].to(device).expand(b, n).clone(),
            "prompt_embeds": torch.cat(acc["emb"]),
            "pooled_prompt_embeds": torch.cat(acc["pooled"]),
        }
        return Rollout(
            contexts=list(contexts),
            log_probs=log_probs,
            mask=torch.ones_like(log_probs, dtype=torch.bool),
            data=data,
            outputs={"images": torch.cat(acc["images"])},
            meta={"guidance_scale": cfg.guidance_scale, "noise_level": cfg.noise_level, "sigma_max": sigma_max,
                  "num_steps": n, "height": height, "width": width},
            shared={} if negative is None else {"negative_prompt_embeds": negative["prompt_embeds"],
                                                "negative_pooled_prompt_embeds": negative["pooled_prompt_embeds"]},
        )
