"""CLIP score: prompt-image alignment as the cosine of open_clip image and text embeddings.

Also what the CLIP-based image rewards share (the aesthetic reward uses it too): loading an
open_clip model, and batched preprocessing.

``load_open_clip(model, pretrained)`` accepts

* a built-in open_clip model name with a pretrained tag or checkpoint file
  (``ViT-L-14`` + ``openai``; downloads go to ``cache_dir``);
* ``local-dir:<folder>`` or a plain folder holding ``open_clip_config.json`` and the weights
  (``open_clip_model.safetensors``), the format of ``assets/tiny-clip``; a relative folder is
  looked up in the current directory, then in the polyrl checkout;
* ``hf-hub:<org/repo>``.

:func:`preprocess_images` is CLIP's evaluation preprocessing (resize the shorter side to the
model's input size with bicubic interpolation, centre crop, normalise with the model's mean and
std) on a float batch ``[B, 3, H, W]`` in ``[0, 1]``, on the images' device, so that rewards need
no PIL round trip.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

from polyrl.paths import model_load_errors, resolve_path
from polyrl.types import DTYPES, ConfigError, Reward, Rollout

__all__ = ["ClipPreprocess", "ClipScore", "ClipScoreConfig", "load_open_clip", "model_reference", "preprocess_images"]


def model_reference(model: str) -> str:
    """The open_clip model identifier for ``model``: a folder with ``open_clip_config.json``
    becomes ``local-dir:<absolute folder>``; names and ``hf-hub:`` ids are returned unchanged."""
    if model.startswith("local-dir:"):
        folder = resolve_path(model[len("local-dir:"):])
        return f"local-dir:{Path(folder).resolve()}"
    if model.startswith("hf-hub:"):
        return model
    folder = resolve_path(model)
    if Path(folder).is_dir():
        return f"local-dir:{Path(folder).resolve()}"
    return model


def check_model_reference(model: str, pretrained: str | None, key: str) -> None:
    """Reject, before anything loads, a model that is neither a folder with an open_clip config,
    an ``hf-hub:`` id, nor a built-in open_clip model name (``key`` prefixes the message)."""
    import open_clip

    ref = model_reference(model)
    if ref.startswith("local-dir:"):
        folder = Path(ref[len("local-dir:"):])
        if not (folder / "open_clip_config.json").is_file():
            raise ConfigError(
                f"{key}.model: {str(folder)!r} has no open_clip_config.json; a folder in open_clip's local-dir format, "
                "an hf-hub: id or a built-in open_clip model name is accepted"
            )
        return
    if ref.startswith("hf-hub:"):
        return
    names = open_clip.list_models()
    if ref.replace("/", "-") not in names:
        from polyrl.config import suggest

        raise ConfigError(
            f"{key}.model: {model!r} is not an open_clip model name{suggest(model, names)} nor a folder "
            "(looked in the current directory and the polyrl checkout); accepted: a built-in name such as "
            "'ViT-L-14', 'local-dir:<folder>' or a folder with open_clip_config.json, 'hf-hub:<org/repo>'"
        )
    if pretrained and not Path(resolve_path(pretrained)).is_file():
        tags = open_clip.list_pretrained_tags_by_model(ref.replace("/", "-"))
        if pretrained not in tags:
            raise ConfigError(
                f"{key}.pretrained: {pretrained!r} is neither a checkpoint file nor a pretrained tag of {model!r}; "
                f"tags: {tags}"
            )


def load_open_clip(model: str, pretrained: str | None = None, cache_dir: str | None = None,
                   device: torch.device | str = "cpu") -> tuple[Any, Any, "ClipPreprocess"]:
    """``(model, tokenizer, preprocess)``: the open_clip model in eval mode without gradients on
    ``device``, its tokenizer, and the tensor preprocessing matching its image transform."""
    import open_clip

    ref = model_reference(model)
    kwargs: dict[str, Any] = {"cache_dir": cache_dir}
    if not ref.startswith(("local-dir:", "hf-hub:")) and pretrained:
        p = resolve_path(pretrained)
        kwargs["pretrained"] = p if Path(p).is_file() else pretrained
    try:
        clip, _, transform = open_clip.create_model_and_transforms(ref, device=device, **kwargs)
    except RuntimeError as e:
        if "download" in str(e).lower() or "connect" in str(e).lower():
            raise OSError(
                f"cannot load open_clip model {model!r} with pretrained={pretrained!r}: {e}. Without network access, "
                "download the weights elsewhere and pass the checkpoint file as 'pretrained' (or put them in "
                f"cache_dir={cache_dir!r})"
            ) from e
        raise
    clip.eval().requires_grad_(False)
    tokenizer = open_clip.get_tokenizer(ref, cache_dir=cache_dir)
    return clip, tokenizer, ClipPreprocess.from_transform(transform, clip)


_OPEN_CLIP = "a local folder in open_clip's local-dir format (open_clip_config.json and weights), or a built-in name with a local checkpoint file as pretrained"


def _shown(model: str, pretrained: str | None) -> str:
    """``model`` as errors name it: with its pretrained tag or file for a built-in name."""
    return f"{model} (pretrained={pretrained})" if pretrained and not model.startswith(("local-dir:", "hf-hub:")) else model


class ClipPreprocess:
    """CLIP's eval preprocessing on tensors: shorter side → ``size`` (bicubic, antialiased),
    centre crop to ``size × size``, clamp to ``[0, 1]``, normalise by ``mean`` / ``std``."""

    def __init__(self, size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        self.size, self.mean, self.std = int(size), tuple(mean), tuple(std)

    @classmethod
    def from_transform(cls, transform: Any, model: Any = None) -> "ClipPreprocess":
        """Read size, mean and std from an open_clip eval transform (``Compose`` of Resize,
        CenterCrop, ..., Normalize), falling back to the model's ``preprocess_cfg``."""
        from torchvision import transforms as T

        size, mean, std = None, None, None
        for t in getattr(transform, "transforms", []):
            if isinstance(t, T.Resize):
                size = t.size if isinstance(t.size, int) else min(t.size)
            if isinstance(t, T.CenterCrop):
                size = t.size[0] if isinstance(t.size, (tuple, list)) else t.size
            if isinstance(t, T.Normalize):
                mean, std = tuple(t.mean), tuple(t.std)
        cfg = getattr(getattr(model, "visual", None), "preprocess_cfg", {}) or {}
        size = size or _first(cfg.get("size")) or _first(getattr(model.visual, "image_size", 224))
        mean = mean or tuple(cfg.get("mean", (0.48145466, 0.4578275, 0.40821073)))
        std = std or tuple(cfg.get("std", (0.26862954, 0.26130258, 0.27577711)))
        return cls(size, mean, std)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return preprocess_images(images, self.size, self.mean, self.std)


def _first(v: Any) -> Any:
    return v[0] if isinstance(v, (tuple, list)) else v


def preprocess_images(images: torch.Tensor, size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """``[B, 3, H, W]`` float in ``[0, 1]`` → ``[B, 3, size, size]`` normalised float32, as
    open_clip's eval transform (``Resize(size, bicubic)``, ``CenterCrop(size)``, ``ToTensor``,
    ``Normalize``) computes it on the same image as a PIL image, up to resampling rounding."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images [B, 3, H, W], got {tuple(images.shape)}")
    x = images.float()
    h, w = x.shape[-2:]
    nh, nw = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)  # as torchvision's Resize(size)
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
    top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
    x = x[..., top : top + size, left : left + size].clamp(0, 1)
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


# ----------------------------------------------------------------------------------- the reward
@dataclass
class ClipScoreConfig:
    """Settings of the CLIP score (prompt-image alignment) reward."""

    model: str = "assets/tiny-clip"
    """The CLIP model: a folder in open_clip's ``local-dir`` format (``open_clip_config.json`` +
    weights, such as ``assets/tiny-clip``), an open_clip model name (``ViT-L-14``) with
    ``pretrained``, or ``hf-hub:<org/repo>``."""
    pretrained: str | None = None
    """open_clip pretrained tag (``openai``, ``laion2b_s32b_b82k``...) or checkpoint file for a
    model name; ignored for folders and hub ids."""
    cache_dir: str | None = None
    """Where open_clip keeps downloaded weights; ``null`` for open_clip's default."""
    template: str = "{prompt}"
    """The text scored against each image; ``{prompt}`` is replaced by the sample's prompt
    (e.g. ``"a photo of {prompt}"``)."""
    scale: float = 1.0
    """Multiplies the cosine similarity (CLIPScore uses 2.5 with a floor at 0; here no floor)."""
    batch_size: int = 64
    """Images and texts encoded at once."""
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    """Dtype of the CLIP model's weights and activations (the score is float32): ``bfloat16`` or
    ``float16`` halve its memory; the scores move by about 1e-3 on the cosine scale."""

    def check(self) -> None:
        """Reject impossible settings before any model loads."""
        if self.dtype not in DTYPES:
            raise ConfigError(f"clip_score.dtype: {self.dtype!r} is not one of {sorted(DTYPES)}")
        if "{prompt}" not in self.template:
            raise ConfigError(f"clip_score.template must contain '{{prompt}}', got {self.template!r}")
        if self.batch_size < 1:
            raise ConfigError(f"clip_score.batch_size must be >= 1, got {self.batch_size}")
        check_model_reference(self.model, self.pretrained, "clip_score")


class OpenClipEmbeddings:
    """Batched, L2-normalised open_clip embeddings, text embeddings cached per text (prompts repeat).

    The class using it sets ``clip`` (an open_clip model), ``tokenizer``, ``preprocess`` (a callable
    from images ``[B, 3, H, W]`` in [0, 1] to the model's input), ``device``, ``cfg.batch_size`` and
    ``_text_cache = {}``."""

    @torch.no_grad()
    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings ``[B, D]`` float32 of images ``[B, 3, H, W]`` in [0, 1]."""
        dtype = DTYPES[getattr(self.cfg, "dtype", "float32")]
        out = [F.normalize(self.clip.encode_image(self.preprocess(c.to(self.device)).to(dtype)).float(), dim=-1)
               for c in images.split(self.cfg.batch_size)]
        return torch.cat(out)

    @torch.no_grad()
    def text_features(self, texts: list[str]) -> torch.Tensor:
        """L2-normalised text embeddings ``[N, D]`` float32 (cached per text: prompts repeat)."""
        todo = [t for t in dict.fromkeys(texts) if t not in self._text_cache]
        for i in range(0, len(todo), self.cfg.batch_size):
            chunk = todo[i : i + self.cfg.batch_size]
            emb = F.normalize(self.clip.encode_text(self.tokenizer(chunk).to(self.device)).float(), dim=-1)
            self._text_cache.update(zip(chunk, emb))
        return torch.stack([self._text_cache[t] for t in texts])


class ClipScore(OpenClipEmbeddings, Reward):
    """``scale · cos(CLIP_image(image), CLIP_text(template(prompt)))`` per sample, ``[B]``,
    computed batched under ``no_grad`` on the policy's device (or the CPU without a policy)."""

    reads = "images"

    def __init__(self, cfg: ClipScoreConfig, device: torch.device | str = "cpu") -> None:
        self.cfg = cfg
        self.device = torch.device(device)
        cache = cfg.cache_dir and str(Path(cfg.cache_dir).expanduser())
        with model_load_errors("rewards.clip_score.model", _shown(cfg.model, cfg.pretrained), _OPEN_CLIP):
            self.clip, self.tokenizer, self.preprocess = load_open_clip(cfg.model, cfg.pretrained, cache, self.device)
        self.clip.to(DTYPES[cfg.dtype])
        self._text_cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def __call__(self, rollout: Rollout) -> torch.Tensor:
        texts = [self.cfg.template.format(prompt=p) for p in rollout.prompts]
        img = self.image_features(rollout.outputs["images"])
        txt = self.text_features(texts)
        return (self.cfg.scale * (img * txt).sum(-1)).float().cpu()
