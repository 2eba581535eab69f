"""The ``lcm`` policy: a latent consistency model (LCM) with a LoRA adapter on its UNet (RLCM).

The model is a diffusers ``LatentConsistencyModelPipeline`` with the layout of
``SimianLuo/LCM_Dreamshaper_v7``: an SD-1.x VAE and text encoder, a UNet with
``time_cond_proj_dim`` (the guidance embedding enters as ``timestep_cond``), and an
``LCMScheduler``. Loading, the LoRA adapter, the reference policy (adapter disabled) and the saved
adapter format are those of :class:`~polyrl.plugins.diffusion.policy.DiffusionPolicy`; what differs
is the step: :meth:`LCMPolicy.forward` rescores recorded consistency steps with
:func:`~polyrl.plugins.lcm.lcm.lcm_step_with_logprob`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from polyrl import ConfigError, Rollout
from polyrl.plugins.diffusion.policy import DiffusionPolicy, DiffusionPolicyConfig

from .lcm import guidance_embedding, lcm_step_with_logprob

__all__ = ["LCMPolicy", "LCMPolicyConfig"]


@dataclass
class LCMPolicyConfig(DiffusionPolicyConfig):
    """A latent consistency model pipeline trained through a LoRA adapter on its UNet. The
    settings are the ``diffusion`` policy's; the defaults below differ (RLCM's)."""

    pretrained: str = "assets/tiny-lcm"
    """Hub id or local folder of a diffusers ``LatentConsistencyModelPipeline`` (e.g.
    ``SimianLuo/LCM_Dreamshaper_v7``). A relative folder is looked up in the current directory,
    then in the polyrl checkout."""
    lora_rank: int = 8
    """Rank ``r`` of the LoRA adapter on the UNet (RLCM: 8 for aesthetic, 16 for the other tasks)."""
    lora_alpha: float | None = 8.0
    """LoRA scaling numerator ``alpha`` (the update is scaled by ``alpha / r``; RLCM: 8 with r 8,
    32 with r 16); ``null`` means ``alpha = lora_rank``."""

    policy_name = "lcm"
    accepted_what = "a diffusers LatentConsistencyModelPipeline folder"
    #: LCM checkpoints are saved as LCM pipelines or as SD pipelines with a distilled UNet
    #: (the policy refuses a UNet that takes no guidance embedding).
    accepted_classes = ("LatentConsistencyModelPipeline", "StableDiffusionPipeline")


class LCMPolicy(DiffusionPolicy):
    """A latent consistency model as a policy over its few sampling steps (RLCM).

    Registered submodules: ``unet`` (frozen base + trainable LoRA), ``vae`` and ``text_encoder``
    (frozen). ``scheduler`` is the checkpoint's ``LCMScheduler`` (only its schedule and config are
    read); ``pipeline`` is the diffusers ``LatentConsistencyModelPipeline`` sharing the modules.
    """

    load_as = "LatentConsistencyModelPipeline"

    def __init__(self, config: LCMPolicyConfig | None = None, pipeline=None) -> None:
        super().__init__(config or LCMPolicyConfig(), pipeline)

    def make_scheduler(self, scheduler):
        """An ``LCMScheduler`` from the checkpoint's scheduler config (its schedule, prediction
        type and ``timestep_scaling``)."""
        from diffusers import LCMScheduler

        return LCMScheduler.from_config(scheduler.config)

    def check_pipeline(self, pipe) -> None:
        if getattr(pipe.unet.config, "time_cond_proj_dim", None) is None:
            raise ConfigError(
                f"policy.pretrained: {self.config.pretrained!r} has a UNet without time_cond_proj_dim, so it takes no "
                "guidance embedding: it is not a latent consistency model (use policy 'diffusion' for SD models)"
            )

    @property
    def guidance_dim(self) -> int:
        """Width of the guidance embedding the UNet takes (``time_cond_proj_dim``, 256 for LCM-SD)."""
        return int(self.unet.config.time_cond_proj_dim)

    # ------------------------------------------------------------------ building blocks
    def guidance_cond(self, guidance_scale: float, batch: int) -> torch.Tensor:
        """``timestep_cond`` ``[B, time_cond_proj_dim]`` for ``w = guidance_scale − 1``."""
        w = torch.full((batch,), float(guidance_scale) - 1.0)
        return guidance_embedding(w, self.guidance_dim).to(self.device)

    def predict(self, latents: torch.Tensor, timesteps: torch.Tensor, prompt_embeds: torch.Tensor,
                timestep_cond: torch.Tensor) -> torch.Tensor:
        """The UNet output ``[B, C, h, w]`` float32 at latents ``[B, C, h, w]``, per-sample
        timesteps ``[B]``, prompt embeddings ``[B, L, D]`` and guidance embedding ``[B, E]``. One
        UNet call: no negative prompt, no doubled batch (guidance is in the embedding)."""
        dt = self.unet_dtype
        out = self.unet(latents.to(dt), timesteps, encoder_hidden_states=prompt_embeds.to(dt),
                        timestep_cond=timestep_cond.to(dt))
        return out.sample.float()

    def predict_noise(self, *args, **kwargs):  # pragma: no cover - guards against the ddim sampler
        raise TypeError("an LCM policy is sampled by the 'lcm' sampler, not 'ddim'")

    def set_num_steps(self, num_steps: int) -> None:  # LCM timesteps are computed by the sampler
        return None

    # ------------------------------------------------------------------ log-probs
    def forward(self, rollout: Rollout, steps: torch.Tensor | None = None) -> torch.Tensor:
        """Log-probs of the rollout's recorded consistency steps, with gradients.

        Args:
            rollout: a rollout from the ``lcm`` sampler: ``data`` holds ``trajectory``
                ``[B, T + 1, C, h, w]`` (step ``j`` goes from ``trajectory[:, j]`` to
                ``trajectory[:, j + 1]``), ``timesteps`` and ``next_timesteps``
                ``[B, T]``, ``prompt_embeds`` ``[B, L, D]``; ``meta["guidance_scale"]``.
            steps: ``None`` for all ``T`` steps, or a LongTensor ``[B, K]`` of step indices per
                sample.

        Returns:
            ``[B, T]`` or ``[B, K]`` float32 ``log π(x_{j+1} | x_j)`` under the current
            weights. All ``B·K`` steps go through the UNet as one batch.
        """
        data = rollout.data
        trajectory = data["trajectory"]
        timesteps, next_ts = data["timesteps"], data["next_timesteps"]
        b, t_total = timesteps.shape
        if steps is None:
            steps = torch.arange(t_total).expand(b, t_total)
        if steps.dim() != 2 or steps.shape[0] != b:
            raise ValueError(f"steps must be a LongTensor [B={b}, K], got {tuple(steps.shape)}")
        device = self.device
        k = steps.shape[1]
        src = trajectory.device
        steps = steps.to(device=src, dtype=torch.long)
        rows = torch.arange(b, device=src)[:, None].expand(b, k)
        x = trajectory[rows, steps].flatten(0, 1).to(device)
        x_next = trajectory[rows, steps + 1].flatten(0, 1).to(device)
        t = timesteps.to(src)[rows, steps].flatten().to(device)
        t_next = next_ts.to(src)[rows, steps].flatten().to(device)
        emb = data["prompt_embeds"].to(device).repeat_interleave(k, dim=0)
        cond = self.guidance_cond(float(rollout.meta["guidance_scale"]), b * k)
        out = self.predict(x, t, emb, cond)
        _, _, log_prob = lcm_step_with_logprob(self.scheduler, out, t, t_next, x, prev_sample=x_next)
        return log_prob.reshape(b, k)
