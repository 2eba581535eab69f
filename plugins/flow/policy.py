"""The ``flow`` policy: a flow-matching text-to-image transformer (SD3 or FLUX layout) with LoRA.

The model is any diffusers pipeline in one of two layouts, a Hub id or a folder:

* **SD3** (``StableDiffusion3Pipeline``: ``SD3Transformer2DModel``, ``FlowMatchEulerDiscreteScheduler``,
  up to three text encoders; a pipeline saved without T5 has ``text_encoder_3``/``tokenizer_3``
  null and is loaded with them set to ``None``), e.g. ``stabilityai/stable-diffusion-3.5-medium``;
* **FLUX** (``FluxPipeline``: ``FluxTransformer2DModel`` on packed 2x2 latent patches, CLIP + T5,
  guidance as an embedding for guidance-distilled models), e.g. ``black-forest-labs/FLUX.1-dev``.

The policy owns the transformer (frozen base + trainable LoRA on its attention projections, the
joint-attention context projections ``add_*_proj``/``to_add_out`` included), the VAE and the text
encoders (frozen, in ``frozen_dtype``). It exposes what the ``flow_sde`` sampler and the updates
share: :meth:`FlowPolicy.encode_prompts`, :meth:`FlowPolicy.velocity` (classifier-free guidance
optional), :meth:`FlowPolicy.decode`, and :meth:`FlowPolicy.forward`, which rescores recorded SDE
steps with :func:`~polyrl.plugins.flow.sde.sde_step_with_logprob`. The reference policy is the same
transformer with the adapter disabled. :meth:`FlowPolicy.save_pretrained` writes
``pytorch_lora_weights.safetensors`` that plain diffusers loads with ``pipe.load_lora_weights``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from polyrl import ConfigError, Rollout
from polyrl.plugins.diffusers_base import DiffusersPolicy, DiffusersPolicyConfig

from .sde import flow_noise_scale, sde_step_with_logprob

__all__ = ["FlowPolicy", "FlowPolicyConfig", "LAYOUTS"]

#: Pipeline class -> layout.
LAYOUTS = {"StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux"}

#: Flow-GRPO's LoRA targets: the attention projections of the image stream and of the text stream.
DEFAULT_TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                   "attn.add_v_proj", "attn.to_add_out"]


@dataclass
class FlowPolicyConfig(DiffusersPolicyConfig):
    """A flow-matching text-to-image pipeline (SD3 or FLUX layout) trained through a LoRA adapter
    on its transformer's attention."""

    pretrained: str = "assets/tiny-flow"
    """Hub id or local folder of a diffusers ``StableDiffusion3Pipeline`` or ``FluxPipeline``
    (e.g. ``stabilityai/stable-diffusion-3.5-medium``, ``black-forest-labs/FLUX.1-dev``). A
    relative folder is looked up in the current directory, then in the polyrl checkout."""
    torch_dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    """Storage dtype of the transformer's frozen base weights (and of the VAE and text encoders
    unless ``frozen_dtype`` is set). The LoRA weights always train in float32, and every SDE step
    and log-prob is computed in float32."""
    lora_rank: int = 32
    """Rank ``r`` of the LoRA adapter (Flow-GRPO: 32)."""
    lora_alpha: float | None = 64.0
    """LoRA scaling numerator ``alpha`` (update scaled by ``alpha / r``; Flow-GRPO: 64); ``null``
    means ``alpha = lora_rank``."""
    lora_target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    """Transformer module names (suffixes) that get LoRA layers: by default the image-stream and the
    text-stream (joint attention) projections, as Flow-GRPO."""
    max_sequence_length: int | None = None
    """Tokens of the T5 part of the prompt embeddings (the pipelines' ``max_sequence_length``).
    ``null``: the pipeline's default (SD3 256, FLUX 512) when it has a T5 encoder, 0 without one
    (an SD3 pipeline saved without T5, as the tiny flow model)."""

    policy_name = "flow"
    accepted_what = "a diffusers SD3 / FLUX pipeline folder"  # named by check(); not a setting
    accepted_classes = tuple(LAYOUTS)

    def check(self) -> None:
        """Reject impossible settings before any model loads."""
        if self.max_sequence_length is not None and not 0 <= self.max_sequence_length <= 512:
            raise ConfigError(f"policy.max_sequence_length must be in [0, 512] or null, got {self.max_sequence_length}")
        super().check()


class FlowPolicy(DiffusersPolicy):
    """A flow-matching transformer as a policy over Flow-GRPO's SDE steps.

    Registered submodules: ``transformer`` (frozen base + trainable LoRA), ``vae`` and the text
    encoders (frozen, in ``frozen_dtype``). ``scheduler`` is the checkpoint's
    ``FlowMatchEulerDiscreteScheduler`` (its shift settings give the sigmas); ``pipeline`` is the
    diffusers pipeline sharing the modules. Loading, the adapter, the reference policy and saving
    are :class:`~polyrl.plugins.diffusers_base.DiffusersPolicy`'s.
    """

    denoiser_name = "transformer"

    def __init__(self, config: FlowPolicyConfig | None = None, pipeline: Any = None) -> None:
        super().__init__(config or FlowPolicyConfig(), pipeline)
        self.layout = LAYOUTS[type(self.pipeline).__name__]

    @property
    def transformer_dtype(self) -> torch.dtype:
        """The dtype the transformer is called in (its frozen base weights' dtype)."""
        return self.denoiser_dtype

    # ------------------------------------------------------------------ shapes and schedule
    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def image_size(self, height: int | None = None, width: int | None = None) -> tuple[int, int]:
        """``(H, W)`` in pixels: the given values, else the transformer's ``sample_size`` × the
        VAE factor (SD3), else the pipeline's default (FLUX)."""
        if height and width:
            return int(height), int(width)
        if self.layout == "sd3":
            s = self.transformer.config.sample_size * self.vae_scale_factor
        else:
            s = getattr(self.pipeline, "default_sample_size", 128) * self.vae_scale_factor
        return int(height or s), int(width or s)

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        """Shape of one sample's latents as the transformer takes them: ``(C, h, w)`` (SD3) or
        packed ``(h/2 · w/2, 4C)`` (FLUX)."""
        h, w = height // self.vae_scale_factor, width // self.vae_scale_factor
        c = self.transformer.config.in_channels
        if self.layout == "flux":
            return ((h // 2) * (w // 2), c)  # in_channels already counts the 2x2 packing
        return (c, h, w)

    def sigmas(self, num_steps: int, height: int, width: int) -> torch.Tensor:
        """The ``num_steps + 1`` sigmas (the last 0) that the layout's pipeline would sample with,
        the scheduler's timestep shift applied (static ``shift``, or FLUX's resolution-dependent
        ``mu`` with ``use_dynamic_shifting``)."""
        import numpy as np

        sch = self.scheduler
        kwargs: dict[str, Any] = {}
        if self.layout == "flux":
            kwargs["sigmas"] = np.linspace(1.0, 1 / num_steps, num_steps)
        if sch.config.get("use_dynamic_shifting", False):
            from diffusers.pipelines.flux.pipeline_flux import calculate_shift

            seq = self.latent_shape(height, width)
            seq_len = seq[0] if self.layout == "flux" else (seq[1] * seq[2]) // self.transformer.config.patch_size**2
            kwargs["mu"] = calculate_shift(seq_len, sch.config.get("base_image_seq_len", 256),
                                           sch.config.get("max_image_seq_len", 4096), sch.config.get("base_shift", 0.5),
                                           sch.config.get("max_shift", 1.15))
        if "sigmas" in kwargs:
            sch.set_timesteps(sigmas=kwargs.pop("sigmas"), device="cpu", **kwargs)
        else:
            sch.set_timesteps(num_steps, device="cpu", **kwargs)
        return sch.sigmas.detach().float().cpu().clone()

    # ------------------------------------------------------------------ building blocks
    @property
    def sequence_length(self) -> int:
        """Tokens of the T5 part of the prompt embeddings (see ``max_sequence_length``)."""
        if self.config.max_sequence_length is not None:
            return self.config.max_sequence_length
        t5 = self.text_encoder_3 if self.layout == "sd3" else self.text_encoder_2
        return 0 if t5 is None else (256 if self.layout == "sd3" else 512)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """``{"prompt_embeds": [B, L, D], "pooled_prompt_embeds": [B, P]}`` float32, as the
        layout's pipeline encodes them (``encode_prompt``)."""
        device = self.text_encoder.device
        if self.layout == "sd3":
            emb, _, pooled, _ = self.pipeline.encode_prompt(
                prompt=list(prompts), prompt_2=None, prompt_3=None, device=device, do_classifier_free_guidance=False,
                max_sequence_length=self.sequence_length,
            )
        else:
            emb, pooled, _ = self.pipeline.encode_prompt(
                prompt=list(prompts), prompt_2=None, device=device, max_sequence_length=self.sequence_length or 512
            )
        return {"prompt_embeds": emb.float(), "pooled_prompt_embeds": pooled.float()}

    def _transformer(self, latents: torch.Tensor, sigma: torch.Tensor, emb: torch.Tensor, pooled: torch.Tensor,
                     guidance_scale: float) -> torch.Tensor:
        dt = self.transformer_dtype
        if self.layout == "sd3":
            out = self.transformer(hidden_states=latents.to(dt), timestep=sigma * 1000,
                                   encoder_hidden_states=emb.to(dt), pooled_projections=pooled.to(dt), return_dict=False)[0]
            return out.float()
        b, n, _ = latents.shape
        h, w = self._flux_grid(n)
        img_ids = self.pipeline._prepare_latent_image_ids(b, h, w, latents.device, dt)
        txt_ids = torch.zeros(emb.shape[1], 3, device=latents.device, dtype=dt)
        guidance = None
        if getattr(self.transformer.config, "guidance_embeds", False):
            guidance = torch.full((b,), float(guidance_scale), device=latents.device, dtype=torch.float32)
        out = self.transformer(hidden_states=latents.to(dt), timestep=sigma.to(dt), guidance=guidance,
                               pooled_projections=pooled.to(dt), encoder_hidden_states=emb.to(dt), txt_ids=txt_ids,
                               img_ids=img_ids, return_dict=False)[0]
        return out.float()

    def _flux_grid(self, n: int) -> tuple[int, int]:
        side = int(round(n**0.5))
        grid = getattr(self, "_grid", None)
        return grid if grid and grid[0] * grid[1] == n else (side, n // side)

    def velocity(self, latents: torch.Tensor, sigma: torch.Tensor, embeds: dict[str, torch.Tensor],
                 negative: dict[str, torch.Tensor] | None = None, guidance_scale: float = 1.0) -> torch.Tensor:
        """The (guided) velocity ``[B, ...]`` float32 at latents ``[B, ...]`` and per-sample sigmas
        ``[B]`` in [0, 1].

        SD3 with ``guidance_scale > 1`` and ``negative`` embeddings: classifier-free guidance,
        ``v_u + g·(v_c − v_u)``, on one doubled batch as the pipeline does. FLUX: a
        guidance-distilled transformer takes ``guidance_scale`` as its guidance embedding (no
        doubled batch); otherwise guidance is not used.
        """
        sigma = sigma.to(latents.device, torch.float32)
        emb, pooled = embeds["prompt_embeds"].to(latents.device), embeds["pooled_prompt_embeds"].to(latents.device)
        if self.layout == "sd3" and guidance_scale > 1.0 and negative is not None:
            out = self._transformer(
                torch.cat([latents, latents]), torch.cat([sigma, sigma]),
                torch.cat([negative["prompt_embeds"].to(latents.device), emb]),
                torch.cat([negative["pooled_prompt_embeds"].to(latents.device), pooled]), guidance_scale,
            )
            uncond, cond = out.chunk(2)
            return uncond + guidance_scale * (cond - uncond)
        return self._transformer(latents, sigma, emb, pooled, guidance_scale)

    def decode(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` float32 in ``[0, 1]`` from the transformer's latents:
        unpacked (FLUX), ``z / scaling_factor + shift_factor``, VAE decoder."""
        if self.layout == "flux":
            latents = self.pipeline._unpack_latents(latents, height, width, self.vae_scale_factor)
        return self.decode_latents(latents)

    def set_latent_grid(self, height: int, width: int) -> None:
        """FLUX: remember the packed-latent grid ``(h/2, w/2)`` of the image size being sampled."""
        if self.layout == "flux":
            self._grid = (height // self.vae_scale_factor // 2, width // self.vae_scale_factor // 2)

    # ------------------------------------------------------------------ log-probs
    def _select(self, rollout: Rollout, steps: torch.Tensor | None) -> tuple[dict[str, torch.Tensor], int, int]:
        data = rollout.data
        b, t_total = data["sigmas"].shape
        if steps is None:
            steps = torch.arange(t_total).expand(b, t_total)
        if steps.dim() != 2 or steps.shape[0] != b:
            raise ValueError(f"steps must be a LongTensor [B={b}, K], got {tuple(steps.shape)}")
        k = steps.shape[1]
        src = data["trajectory"].device
        steps = steps.to(device=src, dtype=torch.long)
        rows = torch.arange(b, device=src)[:, None].expand(b, k)
        device = self.device
        pick = lambda key: data[key][rows, steps].flatten(0, 1).to(device)  # noqa: E731
        rep = lambda key: data[key].to(device).repeat_interleave(k, dim=0)  # noqa: E731
        traj = data["trajectory"]
        sel = {"latents": traj[rows, steps].flatten(0, 1).to(device),
               "next_latents": traj[rows, steps + 1].flatten(0, 1).to(device), "sigmas": pick("sigmas"),
               "next_sigmas": pick("next_sigmas"), "prompt_embeds": rep("prompt_embeds"),
               "pooled_prompt_embeds": rep("pooled_prompt_embeds")}
        for key in ("negative_prompt_embeds", "negative_pooled_prompt_embeds"):
            if key in rollout.shared:  # stored once: the same for every sample
                v = rollout.shared[key].to(device)
                sel[key] = v.expand(b * k, *v.shape[1:])
        return sel, b, k

    def step_outputs(self, rollout: Rollout, steps: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``{"log_probs": [B, K], "mean": [B, K, ...], "std": [B, K], "noise_scale": [B, K]}`` of the
        recorded SDE steps under the current weights (with gradients): the Gaussian step of
        :func:`~polyrl.plugins.flow.sde.sde_step_with_logprob` at the stored latents (``std`` is
        ``s·sqrt(−dt)``, ``noise_scale`` is ``s``)."""
        meta = rollout.meta
        sel, b, k = self._select(rollout, steps)
        height, width = int(meta["height"]), int(meta["width"])
        self.set_latent_grid(height, width)
        negative = None
        if "negative_prompt_embeds" in sel:
            negative = {"prompt_embeds": sel["negative_prompt_embeds"],
                        "pooled_prompt_embeds": sel["negative_pooled_prompt_embeds"]}
        v = self.velocity(sel["latents"], sel["sigmas"], sel, negative, float(meta["guidance_scale"]))
        _, log_prob, mean, std = sde_step_with_logprob(
            v, sel["latents"], sel["sigmas"], sel["next_sigmas"], float(meta["noise_level"]), float(meta["sigma_max"]),
            prev_sample=sel["next_latents"],
        )
        s = flow_noise_scale(sel["sigmas"].float(), float(meta["noise_level"]), float(meta["sigma_max"]))
        return {"log_probs": log_prob.reshape(b, k), "mean": mean.reshape(b, k, *mean.shape[1:]),
                "std": std.reshape(b, k), "noise_scale": s.reshape(b, k)}

    def forward(self, rollout: Rollout, steps: torch.Tensor | None = None, with_mean: bool = False,
                velocity_at: tuple[torch.Tensor, torch.Tensor] | None = None):
        """Log-probs ``[B, T]`` (or ``[B, K]`` for ``steps`` ``[B, K]``) of the rollout's recorded SDE
        steps, with gradients; with ``with_mean=True`` the dict of :meth:`step_outputs` (Flow-GRPO's
        KL is on the step means). All ``B·K`` steps go through the transformer as one batch.

        With ``velocity_at=(x [B, ...], sigma [B])``: the unguided velocity ``[B, ...]`` (FLUX: at
        the rollout's embedded guidance) at those latents for the rollout's prompts, with
        gradients (DiffusionNFT trains on it). It goes through ``forward`` so that a
        DDP-wrapped policy synchronises the gradients.

        ``rollout.data``: ``trajectory`` ``[B, T + 1, ...]`` (step ``j`` goes from ``trajectory[:, j]``
        to ``trajectory[:, j + 1]``), ``sigmas``/``next_sigmas`` ``[B, T]``, ``prompt_embeds``
        ``[B, L, D]``, ``pooled_prompt_embeds`` ``[B, P]``; ``rollout.shared``: the negative
        prompt's ``negative_prompt_embeds``/``negative_pooled_prompt_embeds`` with guidance; ``meta``:
        ``guidance_scale``, ``noise_level``, ``sigma_max``, ``height``, ``width``.
        """
        if velocity_at is not None:
            return self.rollout_velocity(rollout, *velocity_at)
        out = self.step_outputs(rollout, steps)
        return out if with_mean else out["log_probs"]

    def rollout_velocity(self, rollout: Rollout, latents: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The unguided velocity at ``latents`` ``[B, ...]`` and sigmas ``[B]`` for the rollout's
        prompt embeddings (no classifier-free guidance; FLUX's guidance embedding at
        ``meta["guidance_scale"]``)."""
        meta, data, device = rollout.meta, rollout.data, self.device
        self.set_latent_grid(int(meta["height"]), int(meta["width"]))
        embeds = {"prompt_embeds": data["prompt_embeds"].to(device),
                  "pooled_prompt_embeds": data["pooled_prompt_embeds"].to(device)}
        scale = float(meta["guidance_scale"]) if self.layout == "flux" else 1.0
        return self.velocity(latents.to(device), sigma.to(device), embeds, None, scale)

    @torch.no_grad()
    def reference_step_outputs(self, rollout: Rollout, steps: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """:meth:`step_outputs` under the base model (adapter disabled), without gradients."""
        with self.adapter_disabled():
            return self.step_outputs(rollout, steps)
