"""The ``diffusion`` policy: a Stable-Diffusion-1.x UNet (with a LoRA adapter) as a DDIM policy.

The policy owns the pipeline's modules (UNet, VAE, text encoder) as registered submodules, so
``policy.to(device)`` and ``accelerate.prepare(policy)`` see them all, and exposes the three
operations the sampler and the updates share:

* :meth:`DiffusionPolicy.encode_prompts`: prompts → text embeddings ``[B, L, D]``;
* :meth:`DiffusionPolicy.predict_noise`: the classifier-free-guided UNet output;
* :meth:`DiffusionPolicy.forward`: the log-probs of a rollout's recorded DDIM steps, with
  gradients, recomputed by the same code path the sampler used.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from polyrl import Rollout
from polyrl.plugins.diffusers_base import DiffusersPolicy, DiffusersPolicyConfig

from .ddim import ddim_step_with_logprob

__all__ = ["DiffusionPolicy", "DiffusionPolicyConfig"]


@dataclass
class DiffusionPolicyConfig(DiffusersPolicyConfig):
    """A Stable Diffusion 1.x pipeline trained through a LoRA adapter on its UNet."""

    pretrained: str = "assets/tiny-sd"
    """Hub id or local folder of a Stable-Diffusion-1.x diffusers pipeline (e.g.
    ``CompVis/stable-diffusion-v1-4``). A relative folder is looked up in the current directory,
    then in the polyrl checkout."""
    torch_dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    """Storage dtype of the frozen weights (VAE, text encoder, UNet base weights). Trainable
    parameters (the LoRA, or the whole UNet with ``train_full_unet``) always stay float32."""
    lora_rank: int = 4
    """Rank ``r`` of the LoRA adapter on the UNet (DDPO uses 4)."""
    lora_target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    """UNet module names that receive LoRA layers (the attention projections, as in DDPO)."""
    train_full_unet: bool = False
    """Train every UNet weight instead of a LoRA adapter (needs far more memory; no reference
    policy is available then, so KL-regularised updates cannot be used)."""

    policy_name = "diffusion"
    full_training_setting = "train_full_unet"
    accepted_what = "a Stable-Diffusion-1.x diffusers pipeline folder"  # named by check(); not a setting
    accepted_classes = ("StableDiffusionPipeline",)

    @property
    def uses_lora(self) -> bool:
        return not self.train_full_unet


_SD_LOAD_KWARGS = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}


# ----------------------------------------------------------------------------------- policy
class DiffusionPolicy(DiffusersPolicy):
    """A Stable Diffusion 1.x model as a policy over DDIM denoising steps.

    Registered submodules: ``unet`` (frozen base + trainable LoRA, or fully trainable), ``vae`` and
    ``text_encoder`` (frozen). Non-module attributes: ``tokenizer``, ``scheduler`` (a
    :class:`diffusers.DDIMScheduler` built from the checkpoint's scheduler config) and
    ``pipeline`` (the diffusers pipeline sharing these modules, for plain inference). Loading, the
    adapter, the reference policy and saving are :class:`~polyrl.plugins.diffusers_base.DiffusersPolicy`'s.
    """

    load_as = "StableDiffusionPipeline"
    denoiser_name = "unet"
    load_kwargs = _SD_LOAD_KWARGS

    def __init__(self, config: DiffusionPolicyConfig | None = None, pipeline=None) -> None:
        super().__init__(config or DiffusionPolicyConfig(), pipeline)

    @property
    def unet_dtype(self) -> torch.dtype:
        """The dtype the UNet is called in (its frozen base weights' dtype)."""
        return self.denoiser_dtype

    def make_scheduler(self, scheduler):
        """The scheduler the policy samples with, built from the checkpoint's scheduler config
        (a ``DDIMScheduler``)."""
        from diffusers import DDIMScheduler

        return DDIMScheduler.from_config(scheduler.config)

    def lora_state_dict(self):
        """The adapter under the key names of diffusers' SD-1.x LoRA format."""
        from diffusers.utils import convert_state_dict_to_diffusers

        return convert_state_dict_to_diffusers(super().lora_state_dict())

    # ------------------------------------------------------------------ shapes
    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """``(C, h, w)`` of the UNet's latents (``4, 64, 64`` for SD 1.x at 512 px)."""
        c = self.unet.config
        h, w = (c.sample_size, c.sample_size) if isinstance(c.sample_size, int) else tuple(c.sample_size)
        return (c.in_channels, h, w)

    # ------------------------------------------------------------------ building blocks
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Text embeddings ``[B, L, D]`` float32 (``L`` = tokenizer max length, 77 for SD), as
        :meth:`StableDiffusionPipeline.encode_prompt` computes them (no clip-skip)."""
        tok = self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        device = self.text_encoder.device
        mask = tok.attention_mask.to(device) if getattr(self.text_encoder.config, "use_attention_mask", False) else None
        return self.text_encoder(tok.input_ids.to(device), attention_mask=mask)[0].float()

    def predict_noise(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        prompt_embeds: torch.Tensor,
        negative_prompt_embeds: torch.Tensor,
        guidance_scale: float,
    ) -> torch.Tensor:
        """The guided UNet output ``[B, C, h, w]`` float32 at latents ``[B, C, h, w]`` and
        per-sample timesteps ``[B]``.

        With ``guidance_scale > 1`` (as in diffusers) the UNet runs once on the doubled batch
        ``[negative; positive]`` and returns ``uncond + g·(text − uncond)``; otherwise it runs on
        the prompt embeddings only. (DDIM's ``scale_model_input`` is the identity.)
        """
        dt = self.unet_dtype  # the frozen base weights' dtype
        if guidance_scale > 1.0:
            x = torch.cat([latents, latents]).to(dt)
            t = torch.cat([timesteps, timesteps])
            emb = torch.cat([negative_prompt_embeds, prompt_embeds]).to(dt)
            out = self.unet(x, t, encoder_hidden_states=emb).sample.float()
            uncond, text = out.chunk(2)
            return uncond + guidance_scale * (text - uncond)
        return self.unet(latents.to(dt), timesteps, encoder_hidden_states=prompt_embeds.to(dt)).sample.float()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` float32 in ``[0, 1]`` from latents ``[B, C, h, w]``."""
        return self.decode_latents(latents)

    def set_num_steps(self, num_steps: int) -> None:
        """Set the scheduler's number of inference steps (it fixes the previous-timestep gap)."""
        if self.scheduler.num_inference_steps != num_steps:
            self.scheduler.set_timesteps(num_steps)

    # ------------------------------------------------------------------ log-probs
    def forward(self, rollout: Rollout, steps: torch.Tensor | None = None) -> torch.Tensor:
        """Log-probs of the rollout's recorded DDIM steps, with gradients.

        Args:
            rollout: a rollout from the ``ddim`` sampler: ``data`` holds ``trajectory``
                ``[B, T + 1, C, h, w]`` (step ``j`` goes from ``trajectory[:, j]`` to
                ``trajectory[:, j + 1]``), ``timesteps`` and ``prev_timesteps`` ``[B, T]`` (each
                step's timestep and the one it lands on), ``prompt_embeds`` ``[B, L, D]``;
                ``shared["negative_prompt_embeds"]`` ``[1, L, D]``; ``meta`` holds ``eta``,
                ``guidance_scale`` and ``num_steps``.
            steps: ``None`` for all ``T`` steps, one UNet call per step (``B`` samples per call);
                or a LongTensor ``[B, K]`` of step indices per sample, all ``B·K`` of them in one
                UNet call (twice that batch with guidance): the caller bounds ``K`` (``ddpo``'s
                ``steps_per_call``).

        Returns:
            ``[B, T]`` or ``[B, K]`` float32: ``log π(x_{j+1} | x_j)`` under the current
            weights, the same quantity the sampler recorded in ``rollout.log_probs``. The step
            reads only the rollout and the scheduler's fixed schedule, never its mutable state.
        """
        data, meta = rollout.data, rollout.meta
        trajectory, timesteps = data["trajectory"], data["timesteps"]
        if "prev_timesteps" not in data:
            raise ValueError("the rollout has no 'prev_timesteps': rescore rollouts recorded by the 'ddim' sampler")
        prev_timesteps = data["prev_timesteps"]
        b, t_total = timesteps.shape
        device = self.device
        if steps is None:  # every step, one UNet call per step: memory bounded by B, not B·T
            every = torch.arange(t_total).expand(b, t_total)
            return torch.cat([self(rollout, every[:, j : j + 1]) for j in range(t_total)], dim=1)
        if steps.dim() != 2 or steps.shape[0] != b:
            raise ValueError(f"steps must be a LongTensor [B={b}, K], got {tuple(steps.shape)}")
        src = trajectory.device
        k = steps.shape[1]
        steps = steps.to(device=src, dtype=torch.long)
        rows = torch.arange(b, device=src)[:, None].expand(b, k)
        x = trajectory[rows, steps].flatten(0, 1).to(device)  # [B·K, C, h, w], sample-major
        x_next = trajectory[rows, steps + 1].flatten(0, 1).to(device)
        t = timesteps.to(src)[rows, steps].flatten().to(device)
        t_prev = prev_timesteps.to(src)[rows, steps].flatten().to(device)
        pos = data["prompt_embeds"].to(device).repeat_interleave(k, dim=0)
        neg = rollout.shared["negative_prompt_embeds"].to(device).expand(b * k, -1, -1)
        eps = self.predict_noise(x, t, pos, neg, float(meta["guidance_scale"]))  # one UNet call for all B·K steps
        _, log_prob = ddim_step_with_logprob(self.scheduler, eps, t, x, float(meta["eta"]), prev_sample=x_next,
                                             prev_timestep=t_prev)
        return log_prob.reshape(b, k)
