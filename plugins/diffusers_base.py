"""What every diffusers policy shares: loading, the LoRA adapter, saving, the adapter-off reference.

The image families (``diffusion`` for Stable Diffusion 1.x, ``lcm`` for latent consistency models,
``flow`` for SD3 / FLUX flow-matching transformers) differ in their step with log-prob (a pure
function in each family's own module) and in how their denoiser is called; the rest is here:

* :class:`DiffusersPolicyConfig`: the settings every family has (``pretrained``, ``revision``,
  ``variant``, ``torch_dtype``, ``frozen_dtype``, the LoRA's ``lora_rank``/``lora_alpha``/
  ``lora_target_modules``) and their checks, run before any model loads;
* :func:`load_pipeline`: a diffusers pipeline from a Hub id or a folder, in the configured dtype,
  with a clear error for a folder of the wrong kind and for an unreachable Hub;
* :class:`DiffusersPolicy`: a :class:`~polyrl.types.Policy` that owns the pipeline's modules, freezes
  the VAE and text encoders in ``frozen_dtype``, puts a float32 LoRA adapter on the denoiser (the
  UNet or the transformer) or trains it whole, runs the reference policy with the adapter disabled,
  and saves what plain diffusers loads (``pipe.load_lora_weights(folder)``, or the denoiser's own
  folder for a full fine-tune).

A family subclasses both and sets the class attributes that name its pipeline classes and its
denoiser (see :class:`DiffusersPolicy`). This module imports no heavy library at import time.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch

from polyrl import ConfigError, Policy, Rollout
from polyrl.types import DTYPES
from polyrl.paths import check_model_source, model_load_errors, resolve_path

__all__ = ["DiffusersPolicy", "DiffusersPolicyConfig", "dtype_kwarg", "load_pipeline", "pipeline_class_of",
           "wrong_class_message"]


#: Which built-in policy trains which pipeline class (for the hint of a refusal).
POLICY_OF = {"StableDiffusionPipeline": "diffusion", "LatentConsistencyModelPipeline": "lcm",
             "StableDiffusion3Pipeline": "flow", "FluxPipeline": "flow"}

#: The frozen parts a diffusers text-to-image pipeline may hold.
FROZEN_PARTS = ("vae", "text_encoder", "text_encoder_2", "text_encoder_3")


def dtype_kwarg() -> str:
    """``from_pretrained``'s dtype keyword: diffusers renamed ``torch_dtype`` to ``dtype`` (the old
    name warns). Looked up when a pipeline loads, so that importing this module needs no diffusers."""
    try:
        from diffusers.utils.deprecation_utils import _resolve_dtype  # noqa: F401
    except ImportError:  # pragma: no cover - older diffusers
        return "torch_dtype"
    return "dtype"


@dataclass
class DiffusersPolicyConfig:
    """A diffusers text-to-image pipeline trained through a LoRA adapter on its denoiser."""

    pretrained: str = ""
    """Hub id or local folder of a diffusers pipeline. A relative folder is looked up in the
    current directory, then in the polyrl checkout."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) of ``pretrained``; ignored for local folders."""
    variant: str | None = None
    """Weight variant to load (``fp16`` loads ``*.fp16.safetensors``); ``null`` for the default."""
    torch_dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    """Storage dtype of the denoiser's frozen base weights (and of the VAE and text encoders unless
    ``frozen_dtype`` is set). Trainable parameters (the LoRA) always stay float32."""
    frozen_dtype: Literal["float32", "float16", "bfloat16"] | None = None
    """Dtype of the frozen VAE and text encoders (``null``: ``torch_dtype``). ``bfloat16`` halves
    their memory; the denoiser and every step and log-prob are unaffected."""
    lora_rank: int = 4
    """Rank ``r`` of the LoRA adapter on the denoiser."""
    lora_alpha: float | None = None
    """LoRA scaling numerator ``alpha`` (the update is scaled by ``alpha / r``); ``null`` means
    ``alpha = lora_rank``."""
    lora_target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    """Denoiser module names (or name suffixes) that receive LoRA layers."""
    gradient_checkpointing: bool = False
    """Recompute the denoiser's activations in the backward pass instead of keeping them
    (diffusers' ``enable_gradient_checkpointing``): the trained passes' activation memory drops to
    about one block's, for roughly a third more update time. Log-probs and gradients are unchanged."""
    compile: bool = False
    """Compile the denoiser's forward with ``torch.compile`` (inductor; parameter names and saved
    files unchanged). The first calls compile (minutes; again when a batch shape or the adapter's
    on/off state is new), later ones run fused kernels: worth it on GPUs for long runs with fixed
    shapes. Log-probs equal the eager ones up to float rounding (about 1e-6)."""
    vae_decode_batch_size: int | None = None
    """Decode at most this many latents per VAE call (``null``: a whole sampling batch at once).
    At 512 px and above the VAE decoder's activations dominate sampling memory; 1-4 bounds them.
    The images are the same up to float rounding (about 1e-6)."""

    #: What ``check`` names as the accepted kind of folder (class attribute, not a setting).
    accepted_what = "a diffusers pipeline folder"
    #: The pipeline classes (``model_index.json``'s ``_class_name``) the family trains (class attribute).
    accepted_classes: ClassVar[tuple[str, ...]] = ()
    #: The policy's registered name, for messages (class attribute).
    policy_name: ClassVar[str] = "this"
    #: The setting that trains the whole denoiser instead of a LoRA, for messages (class attribute).
    full_training_setting: ClassVar[str] = "a full fine-tune"

    def check(self) -> None:
        """Reject impossible settings before any model loads, a local folder of another pipeline
        class included."""
        what = self.accepted_what
        if not self.pretrained:
            raise ConfigError(f"policy.pretrained is empty: give a Hub id or {what}")
        if self.lora_rank < 1:
            raise ConfigError(f"policy.lora_rank must be >= 1, got {self.lora_rank}")
        if self.lora_alpha is not None and self.lora_alpha <= 0:
            raise ConfigError(f"policy.lora_alpha must be > 0 (or null for lora_rank), got {self.lora_alpha}")
        if self.vae_decode_batch_size is not None and self.vae_decode_batch_size < 1:
            raise ConfigError(f"policy.vae_decode_batch_size must be >= 1 or null, got {self.vae_decode_batch_size}")
        if self.uses_lora and not self.lora_target_modules:
            raise ConfigError("policy.lora_target_modules is empty: name the modules that get LoRA layers")
        check_model_source(self.pretrained, "policy.pretrained", what)
        name = pipeline_class_of(self.pretrained)
        if name is not None and self.accepted_classes and name not in self.accepted_classes:
            raise ConfigError(wrong_class_message(self.pretrained, name, self.accepted_classes, self.policy_name))

    @property
    def uses_lora(self) -> bool:
        """Whether the denoiser trains through a LoRA adapter (families with a full fine-tune
        setting override this)."""
        return True

    @property
    def effective_lora_alpha(self) -> float:
        return float(self.lora_alpha if self.lora_alpha is not None else self.lora_rank)


# ----------------------------------------------------------------------------------- loading
def pipeline_class_of(pretrained: str, revision: str | None = None) -> str | None:
    """The ``_class_name`` of a local pipeline folder's ``model_index.json`` (None when
    ``pretrained`` is not a local folder: a Hub id is looked up when it loads)."""
    source = Path(resolve_path(pretrained))
    if not source.is_dir():
        return None
    index = source / "model_index.json"
    if not index.is_file():
        raise ConfigError(
            f"policy.pretrained: {pretrained!r} is a folder but not a diffusers pipeline (no model_index.json)"
        )
    try:
        return json.loads(index.read_text()).get("_class_name")
    except (OSError, ValueError) as e:
        raise ConfigError(f"policy.pretrained: cannot read {index}: {e}") from e


def wrong_class_message(pretrained: str, name: str | None, classes: Sequence[str], policy: str = "this") -> str:
    """The refusal of a pipeline of class ``name`` by the ``policy`` family, which trains ``classes``."""
    hint = f" (use policy '{POLICY_OF[name]}' for a {name})" if name in POLICY_OF else ""
    return (f"policy.pretrained: {pretrained!r} holds a {name}; the {policy} policy accepts a Hub id or a folder of "
            f"{sorted(classes)}{hint}")


def load_pipeline(config: DiffusersPolicyConfig, classes: Sequence[str], load_as: str | None = None, **kwargs: Any):
    """``from_pretrained`` of ``config.pretrained`` with a clear error; returns the pipeline.

    Args:
        config: the policy settings (``pretrained``, ``revision``, ``variant``, ``torch_dtype``).
        classes: the pipeline classes (``model_index.json``'s ``_class_name``) this family accepts;
            another class is refused with a message naming the accepted ones.
        load_as: the diffusers pipeline class to load with (``None``: the folder's own class).
        kwargs: passed to ``from_pretrained`` (e.g. ``safety_checker=None``).

    Components that the pipeline's index lists as null (an SD3 saved without its T5 encoder) are
    passed as ``None``. Every part loads in ``torch_dtype``; :class:`DiffusersPolicy` then casts the
    frozen parts to ``frozen_dtype``.
    """
    import diffusers
    from diffusers import DiffusionPipeline

    source = resolve_path(config.pretrained)
    local = Path(source).exists()
    what = f"a Hub id or a folder of {sorted(classes)}"
    if local and not (Path(source) / "model_index.json").is_file():
        raise ConfigError(
            f"policy.pretrained: {source!r} is a folder but not a diffusers pipeline (no model_index.json); {what} is accepted"
        )
    revision = None if local else config.revision
    with model_load_errors("policy.pretrained", config.pretrained, f"a local diffusers pipeline folder of {sorted(classes)}"):
        index = DiffusionPipeline.load_config(source, revision=revision)
    name = index.get("_class_name")
    if name not in classes:
        raise ConfigError(wrong_class_message(config.pretrained, name, classes, config.policy_name))
    nulls = {k: None for k, v in index.items() if isinstance(v, list) and len(v) == 2 and v[0] is None}
    nulls.update(kwargs)
    cls = getattr(diffusers, load_as or name)
    with model_load_errors("policy.pretrained", config.pretrained, f"a local diffusers pipeline folder of {sorted(classes)}"):
        return cls.from_pretrained(source, revision=revision, variant=config.variant,
                                   **{dtype_kwarg(): DTYPES[config.torch_dtype]}, **nulls)


# ----------------------------------------------------------------------------------- policy
class DiffusersPolicy(Policy):
    """The shared part of the diffusers policies.

    A family sets:

    * ``pipeline_classes``: the pipeline classes it accepts (``model_index.json``'s ``_class_name``);
    * ``load_as``: the class to load with (``None``: the folder's own);
    * ``denoiser_name``: the trained module's attribute on the pipeline (``"unet"``,
      ``"transformer"``); the module is registered under that name, and LoRA files are saved
      under that prefix;
    * ``load_kwargs``: extra ``from_pretrained`` arguments;

    and may override :meth:`check_pipeline` (refuse a loaded pipeline), :meth:`make_scheduler`
    (the scheduler it samples with) and :meth:`lora_state_dict` (the saved key names).

    Registered submodules: the denoiser (frozen base + float32 LoRA, or fully trainable), ``vae``
    and each text encoder present (frozen, in ``frozen_dtype``). Plain attributes: ``pipeline``
    (the diffusers pipeline sharing these modules, for plain inference), ``scheduler``, the
    tokenizers, ``denoiser_dtype`` (the dtype the denoiser is called in).
    """

    modality = "image"
    pipeline_classes: tuple[str, ...] = ()
    """The accepted pipeline classes (empty: the config's ``accepted_classes``)."""
    load_as: str | None = None
    denoiser_name: str = "unet"
    load_kwargs: dict[str, Any] = {}

    def __init__(self, config: DiffusersPolicyConfig, pipeline: Any = None) -> None:
        super().__init__()
        self.config = config
        classes = self.pipeline_classes or config.accepted_classes
        if pipeline is None:
            pipeline = load_pipeline(config, classes, self.load_as, **self.load_kwargs)
        elif type(pipeline).__name__ not in classes:
            raise ConfigError(f"{type(self).__name__} accepts {sorted(classes)}, got a {type(pipeline).__name__}")
        scheduler = self.make_scheduler(pipeline.scheduler)
        if scheduler is not pipeline.scheduler:
            pipeline.scheduler = scheduler
        self.check_pipeline(pipeline)
        pipeline.set_progress_bar_config(disable=True)

        denoiser = getattr(pipeline, self.denoiser_name)
        setattr(self, self.denoiser_name, denoiser)
        denoiser.requires_grad_(False)
        if config.uses_lora:
            self.add_lora(denoiser)
            self.denoiser_dtype = DTYPES[config.torch_dtype]
        else:  # a full fine-tune trains float32 weights whatever the storage dtype
            denoiser.to(torch.float32).requires_grad_(True)
            self.denoiser_dtype = torch.float32
        if config.gradient_checkpointing:
            denoiser.enable_gradient_checkpointing()
        if config.compile:
            denoiser.compile()  # in place: the module, its parameters and their names stay
        frozen = DTYPES[config.frozen_dtype or config.torch_dtype]
        for part in FROZEN_PARTS:
            module = getattr(pipeline, part, None)
            if module is not None:
                if module.dtype != frozen:
                    module.to(frozen)
                module.requires_grad_(False).eval()
            setattr(self, part, module)
        for part in ("tokenizer", "tokenizer_2", "tokenizer_3"):
            setattr(self, part, getattr(pipeline, part, None))
        self.scheduler = pipeline.scheduler

        # a plain attribute (DiffusionPipeline is not an nn.Module): not registered a second time
        self.pipeline = pipeline

    # ------------------------------------------------------------------ family hooks
    def make_scheduler(self, scheduler):
        """The scheduler the policy samples with (default: the checkpoint's own)."""
        return scheduler

    def check_pipeline(self, pipe) -> None:
        """Reject a loaded pipeline this policy cannot train (families add checks)."""

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        """The adapter's weights under the key names plain diffusers loads for this family
        (default: PEFT's names, as diffusers' own LoRA training scripts save them)."""
        from peft.utils import get_peft_model_state_dict

        return get_peft_model_state_dict(self.denoiser)

    # ------------------------------------------------------------------ the denoiser and its adapter
    @property
    def denoiser(self) -> torch.nn.Module:
        """The trained module (the UNet or the transformer)."""
        return getattr(self, self.denoiser_name)

    def add_lora(self, denoiser: torch.nn.Module) -> None:
        """Put a LoRA adapter (Gaussian-initialised A, zero B: the policy starts as the base model)
        on ``config.lora_target_modules``; its weights train in float32 whatever the base dtype."""
        from peft import LoraConfig

        cfg = self.config
        denoiser.add_adapter(LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.effective_lora_alpha,
                                        init_lora_weights="gaussian", target_modules=list(cfg.lora_target_modules)))
        for p in denoiser.parameters():
            if p.requires_grad:
                p.data = p.data.float()
        if not self.trainable_parameters():
            raise ConfigError(
                f"policy.lora_target_modules {list(cfg.lora_target_modules)} matched no {self.denoiser_name} module"
            )

    @contextlib.contextmanager
    def adapter_disabled(self) -> Iterator[None]:
        """Within this context the denoiser runs without its LoRA adapter: the reference policy."""
        if not self.config.uses_lora:
            raise NotImplementedError(
                f"the {self.config.policy_name} policy has no reference model with "
                f"{self.config.full_training_setting}: true (no adapter to disable); use a LoRA adapter for "
                "KL-regularised updates"
            )
        self.denoiser.disable_adapters()
        try:
            yield
        finally:
            self.denoiser.enable_adapters()

    @torch.no_grad()
    def reference_log_probs(self, rollout: Rollout, steps: torch.Tensor | None = None) -> torch.Tensor:
        """:meth:`forward` under the base model (adapter disabled), without gradients."""
        with self.adapter_disabled():
            return self.forward(rollout, steps)

    # ------------------------------------------------------------------ images
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` float32 in ``[0, 1]`` from VAE latents ``[B, C, h, w]``:
        ``z / scaling_factor (+ shift_factor)``, then the VAE decoder (``vae_decode_batch_size``
        latents per call)."""
        vae = self.vae
        z = latents.to(device=vae.device, dtype=vae.dtype) / vae.config.scaling_factor
        if getattr(vae.config, "shift_factor", None):
            z = z + vae.config.shift_factor
        n = self.config.vae_decode_batch_size or max(len(z), 1)
        image = torch.cat([vae.decode(chunk).sample for chunk in z.split(n)])
        return (image.float() / 2 + 0.5).clamp(0, 1)

    # ------------------------------------------------------------------ saving
    def save_pretrained(self, path: str) -> None:
        """Write the trained weights where plain diffusers loads them.

        LoRA: ``pytorch_lora_weights.safetensors`` in ``path``, for
        ``<Pipeline>.from_pretrained(base).load_lora_weights(path)``. Full fine-tune:
        ``path/<denoiser>`` for ``<Denoiser>.from_pretrained(path, subfolder="<denoiser>")``.
        """
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        if not self.config.uses_lora:
            self.denoiser.save_pretrained(out / self.denoiser_name, safe_serialization=True)
            return
        lora = {k: v.detach().cpu().contiguous() for k, v in self.lora_state_dict().items()}
        name = self.denoiser_name
        type(self.pipeline).save_lora_weights(
            save_directory=str(out),
            **{f"{name}_lora_layers": lora,
               f"{name}_lora_adapter_metadata": self.denoiser.peft_config["default"].to_dict()},
            safe_serialization=True,
        )
