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

import contextlib

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from polyrl import ConfigError, Policy, Rollout
from polyrl.paths import check_model_source, model_load_errors, resolve_path

from .ddim import ddim_step_with_logprob

__all__ = ["DiffusionPolicy", "DiffusionPolicyConfig"]

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}



def _dtype_kwarg() -> str:
    """``from_pretrained``'s dtype keyword: diffusers renamed ``torch_dtype`` to ``dtype`` (the old
    name warns). Looked up when a pipeline loads, so that importing this module needs no diffusers."""
    try:
        from diffusers.utils.deprecation_utils import _resolve_dtype  # noqa: F401
    except ImportError:  # pragma: no cover - older diffusers
        return "torch_dtype"
    return "dtype"


@dataclass
class DiffusionPolicyConfig:
    """A Stable Diffusion 1.x pipeline trained through a LoRA adapter on its UNet."""

    pretrained: str = "assets/tiny-sd"
    """Hub id or local folder of a Stable-Diffusion-1.x diffusers pipeline (e.g.
    ``CompVis/stable-diffusion-v1-4``). A relative folder is looked up in the current directory,
    then in the polyrl checkout."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) of ``pretrained``; ignored for local folders."""
    variant: str | None = None
    """Weight variant to load (``fp16`` loads ``*.fp16.safetensors``); ``null`` for the default."""
    torch_dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    """Storage dtype of the frozen weights (VAE, text encoder, UNet base weights). Trainable
    parameters (the LoRA, or the whole UNet with ``train_full_unet``) always stay float32."""
    lora_rank: int = 4
    """Rank ``r`` of the LoRA adapter on the UNet (DDPO uses 4)."""
    lora_alpha: float | None = None
    """LoRA scaling numerator ``alpha`` (the update is scaled by ``alpha / r``); ``null`` means
    ``alpha = lora_rank``."""
    lora_target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    """UNet module names that receive LoRA layers (the attention projections, as in DDPO)."""
    train_full_unet: bool = False
    """Train every UNet weight instead of a LoRA adapter (needs far more memory; no reference
    policy is available then, so KL-regularised updates cannot be used)."""

    def check(self) -> None:
        """Reject impossible settings before any model loads."""
        check_policy_settings(self, "a Stable-Diffusion-1.x diffusers pipeline folder")


def check_policy_settings(cfg, what: str) -> None:
    """Checks shared by the diffusers-pipeline policy configs (``diffusion``, ``lcm``): the fields
    ``pretrained``, ``lora_rank``, ``lora_alpha``, ``lora_target_modules``, ``train_full_unet``.
    ``what`` names the accepted kind of folder in the error messages."""
    if not cfg.pretrained:
        raise ConfigError(f"policy.pretrained is empty: give a Hub id or {what}")
    if cfg.lora_rank < 1:
        raise ConfigError(f"policy.lora_rank must be >= 1, got {cfg.lora_rank}")
    if cfg.lora_alpha is not None and cfg.lora_alpha <= 0:
        raise ConfigError(f"policy.lora_alpha must be > 0 (or null for lora_rank), got {cfg.lora_alpha}")
    if not cfg.train_full_unet and not cfg.lora_target_modules:
        raise ConfigError("policy.lora_target_modules is empty: name the UNet modules that get LoRA layers")
    check_model_source(cfg.pretrained, "policy.pretrained", what)


# ----------------------------------------------------------------------------------- loading
def load_pipeline(config, pipeline_class: str = "StableDiffusionPipeline"):
    """``<pipeline_class>.from_pretrained`` for ``config.pretrained`` with a clear error.

    ``pipeline_class`` names a diffusers pipeline class (``StableDiffusionPipeline``,
    ``LatentConsistencyModelPipeline``). The safety checker is never loaded (rewards see the raw
    images).
    """
    import diffusers

    cls = getattr(diffusers, pipeline_class)
    source = resolve_path(config.pretrained)
    local = Path(source).exists()
    if local and not (Path(source) / "model_index.json").is_file():
        raise ConfigError(
            f"policy.pretrained: {source!r} is a folder but not a diffusers pipeline (no model_index.json); "
            f"a Hub id or a diffusers pipeline folder loadable by {pipeline_class} is accepted"
        )
    with model_load_errors("policy.pretrained", config.pretrained, f"a local diffusers pipeline folder loadable by {pipeline_class}"):
        return cls.from_pretrained(
            source,
            revision=None if local else config.revision,
            variant=config.variant,
            **{_dtype_kwarg(): _DTYPES[config.torch_dtype]},
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )


# ----------------------------------------------------------------------------------- policy
class DiffusionPolicy(Policy):
    """A Stable Diffusion 1.x model as a policy over DDIM denoising steps.

    Registered submodules: ``unet`` (frozen base + trainable LoRA, or fully trainable), ``vae`` and
    ``text_encoder`` (frozen). Non-module attributes: ``tokenizer``, ``scheduler`` (a
    :class:`diffusers.DDIMScheduler` built from the checkpoint's scheduler config) and
    ``pipeline`` (the diffusers pipeline sharing these modules, for plain inference).
    """

    modality = "image"
    pipeline_class = "StableDiffusionPipeline"
    """The diffusers pipeline class that loads ``config.pretrained``."""

    def __init__(self, config: DiffusionPolicyConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or DiffusionPolicyConfig()
        pipe = load_pipeline(config, self.pipeline_class)
        pipe.scheduler = self.make_scheduler(pipe.scheduler.config)
        self.check_pipeline(pipe)
        pipe.set_progress_bar_config(disable=True)

        self.unet = pipe.unet
        self.vae = pipe.vae
        self.text_encoder = pipe.text_encoder
        self.tokenizer = pipe.tokenizer
        self.scheduler = pipe.scheduler
        self.vae.requires_grad_(False).eval()
        self.text_encoder.requires_grad_(False).eval()
        self.unet.requires_grad_(False)
        if config.train_full_unet:
            self.unet.to(torch.float32).requires_grad_(True)
            self.unet_dtype = torch.float32
        else:
            from peft import LoraConfig

            self.unet.add_adapter(
                LoraConfig(
                    r=config.lora_rank,
                    lora_alpha=config.lora_alpha if config.lora_alpha is not None else config.lora_rank,
                    init_lora_weights="gaussian",
                    target_modules=list(config.lora_target_modules),
                )
            )
            for p in self.unet.parameters():  # the adapter trains in float32 whatever the base dtype
                if p.requires_grad:
                    p.data = p.data.float()
            self.unet_dtype = _DTYPES[config.torch_dtype]
            if not self.trainable_parameters():
                raise ConfigError(
                    f"policy.lora_target_modules {list(config.lora_target_modules)} matched no UNet module"
                )
        # a plain attribute (DiffusionPipeline is not an nn.Module): not registered a second time
        self.pipeline = pipe

    def make_scheduler(self, config):
        """The scheduler the policy samples with, built from the checkpoint's scheduler config
        (a ``DDIMScheduler``)."""
        from diffusers import DDIMScheduler

        return DDIMScheduler.from_config(config)

    def check_pipeline(self, pipe) -> None:
        """Reject a loaded pipeline this policy cannot train (subclasses add checks)."""

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
        vae = self.vae
        z = latents.to(device=vae.device, dtype=vae.dtype) / vae.config.scaling_factor
        if getattr(vae.config, "shift_factor", None):
            z = z + vae.config.shift_factor
        image = vae.decode(z).sample
        return (image.float() / 2 + 0.5).clamp(0, 1)

    def set_num_steps(self, num_steps: int) -> None:
        """Set the scheduler's number of inference steps (it fixes the previous-timestep gap)."""
        if self.scheduler.num_inference_steps != num_steps:
            self.scheduler.set_timesteps(num_steps)

    # ------------------------------------------------------------------ log-probs
    def forward(self, rollout: Rollout, steps: torch.Tensor | None = None) -> torch.Tensor:
        """Log-probs of the rollout's recorded DDIM steps, with gradients.

        Args:
            rollout: a rollout from the ``ddim`` sampler: ``data`` holds ``latents`` and
                ``next_latents`` ``[B, T, C, h, w]``, ``timesteps`` ``[B, T]``, ``prompt_embeds``
                and ``negative_prompt_embeds`` ``[B, L, D]``; ``meta`` holds ``eta``,
                ``guidance_scale`` and ``num_steps``.
            steps: ``None`` for all ``T`` steps, or a LongTensor ``[B, K]`` of step indices per
                sample (each column is one batched UNet call over the ``B`` samples, each at its
                own step).

        Returns:
            ``[B, T]`` or ``[B, K]`` float32: ``log π(next_latents | latents)`` under the current
            weights, the same quantity the sampler recorded in ``rollout.log_probs``.
        """
        data, meta = rollout.data, rollout.meta
        latents, next_latents, timesteps = data["latents"], data["next_latents"], data["timesteps"]
        b, t_total = timesteps.shape
        self.set_num_steps(int(meta["num_steps"]))
        device = self.device
        if steps is None:
            steps = torch.arange(t_total).expand(b, t_total)
        if steps.dim() != 2 or steps.shape[0] != b:
            raise ValueError(f"steps must be a LongTensor [B={b}, K], got {tuple(steps.shape)}")
        steps = steps.to(device=latents.device, dtype=torch.long)
        rows = torch.arange(b, device=latents.device)
        pos = data["prompt_embeds"].to(device)
        neg = data["negative_prompt_embeds"].to(device)
        columns = []
        for k in range(steps.shape[1]):
            j = steps[:, k]
            x = latents[rows, j].to(device)
            x_next = next_latents[rows, j].to(device)
            t = timesteps.to(latents.device)[rows, j].to(device)
            eps = self.predict_noise(x, t, pos, neg, float(meta["guidance_scale"]))
            _, log_prob = ddim_step_with_logprob(self.scheduler, eps, t, x, float(meta["eta"]), prev_sample=x_next)
            columns.append(log_prob)
        return torch.stack(columns, dim=1)

    @contextlib.contextmanager
    def adapter_disabled(self) -> Iterator[None]:
        """Within this context the UNet runs without its LoRA adapter (the reference policy)."""
        if self.config.train_full_unet:
            raise NotImplementedError(
                "the diffusion policy has no reference model with train_full_unet: true "
                "(no adapter to disable); use a LoRA adapter for KL-regularised updates"
            )
        self.unet.disable_adapters()
        try:
            yield
        finally:
            self.unet.enable_adapters()

    @torch.no_grad()
    def reference_log_probs(self, rollout: Rollout, steps: torch.Tensor | None = None) -> torch.Tensor:
        """:meth:`forward` under the base model (LoRA adapter disabled), without gradients."""
        with self.adapter_disabled():
            return self.forward(rollout, steps)

    # ------------------------------------------------------------------ saving
    def save_pretrained(self, path: str) -> None:
        """Write the trained weights where plain diffusers loads them.

        LoRA: ``pytorch_lora_weights.safetensors`` in ``path``, for
        ``StableDiffusionPipeline.from_pretrained(base).load_lora_weights(path)``. Full UNet:
        ``path/unet`` for ``UNet2DConditionModel.from_pretrained(path, subfolder="unet")``.
        """
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        if self.config.train_full_unet:
            self.unet.save_pretrained(out / "unet", safe_serialization=True)
            return
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        lora = convert_state_dict_to_diffusers(get_peft_model_state_dict(self.unet))
        lora = {k: v.detach().cpu().contiguous() for k, v in lora.items()}
        type(self.pipeline).save_lora_weights(
            save_directory=str(out),
            unet_lora_layers=lora,
            unet_lora_adapter_metadata=self.unet.peft_config["default"].to_dict(),
            safe_serialization=True,
        )
