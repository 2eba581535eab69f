"""PickScore: a CLIP ViT-H/14 fine-tuned on the Pick-a-Pic human preferences.

The score is the authors' (``calc_probs`` in the PickScore repository, before its softmax over
images)::

    image_embs = normalize(model.get_image_features(processor(images)))
    text_embs  = normalize(model.get_text_features(processor(text=prompt, padding=True, truncation=True, max_length=77)))
    score      = model.logit_scale.exp() * <text_embs, image_embs>        # about 18-24 on typical samples

The model is a transformers ``CLIPModel`` (Hub id ``yuvalkirstain/PickScore_v1`` or a local folder
saved with ``save_pretrained``); the processor (tokenizer and image settings) comes from
``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` as in the authors' code, or from any folder holding a
saved ``CLIPProcessor``. Weights load through ``from_pretrained`` (safetensors, or
``torch.load(weights_only=True)`` for ``.bin`` files), and loading fails unless every key of the
checkpoint matches the architecture: no key missing, none unexpected, no shape different.

Image preprocessing follows the processor's image settings (``CLIPImageProcessor``): the shorter
side resized to ``size["shortest_edge"]`` (bicubic, antialiased), a centre crop to ``crop_size``
placed as transformers does, normalisation by ``image_mean`` / ``image_std``; computed on tensors
on the reward's device.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

from polyrl.paths import model_load_errors, resolve_path
from polyrl.types import DTYPES, ConfigError, Reward, Rollout

from .hps import resize_center_crop

__all__ = ["PickScoreConfig", "PickScoreReward", "check_pretrained_reference", "load_transformers_strict"]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def pretrained_reference(ref: str) -> str:
    """A folder (looked up in the current directory, then in the polyrl checkout) as its
    absolute path; anything else (a Hub id) unchanged."""
    p = Path(resolve_path(ref)).expanduser()
    return str(p.resolve()) if p.is_dir() else ref


def check_pretrained_reference(ref: str, key: str, needs: tuple[str, ...] = ("config.json",)) -> None:
    """Reject, before anything loads, a reference that is neither a folder holding one of the
    files ``needs`` nor a Hub id ``org/name``."""
    p = Path(resolve_path(ref)).expanduser()
    if p.is_dir():
        if not any((p / n).is_file() for n in needs):
            raise ConfigError(
                f"{key}: folder {ref!r} has none of {list(needs)}; give a folder saved with save_pretrained or a Hub id"
            )
        return
    if not _HUB_ID.match(ref):
        raise ConfigError(f"{key}: {ref!r} is neither a folder nor a Hub id of the form 'org/name'")


def _offline_error(what: str, ref: str, e: Exception) -> OSError:
    return OSError(
        f"{what}: cannot load {ref!r} ({type(e).__name__}: {e}). Without network access, download it on a machine "
        f"with access (`huggingface-cli download {ref} --local-dir <folder>`) and give the folder instead"
    )


def load_transformers_strict(cls: Any, ref: str, what: str, cache_dir: str | None = None) -> Any:
    """``cls.from_pretrained(ref)`` in eval mode without gradients, refusing any checkpoint whose
    keys or shapes differ from the architecture (transformers itself only warns)."""
    path = pretrained_reference(ref)
    try:
        model, info = cls.from_pretrained(path, cache_dir=cache_dir, output_loading_info=True)
    except OSError as e:
        raise _offline_error(what, ref, e) from e
    except RuntimeError as e:  # a shape mismatch
        raise ValueError(f"{what} {ref!r} does not match the {cls.__name__} architecture: {e}") from e
    bad = {k: list(v) for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")}
    if bad:
        raise ValueError(f"{what} {ref!r} does not match the {cls.__name__} architecture: {bad}")
    return model.eval().requires_grad_(False)


def _entry(d: Any, key: str) -> Any:
    """``d[key]`` of an image processor's size settings (a dict or transformers' ``SizeDict``)."""
    if isinstance(d, int):
        return d
    try:
        return d[key]
    except (KeyError, TypeError):
        return getattr(d, key, None)


def _features(out: Any) -> torch.Tensor:
    """Projected embeddings from ``get_*_features`` (a tensor, or an output with ``pooler_output``)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@dataclass
class PickScoreConfig:
    """Settings of the PickScore reward."""

    model: str = "yuvalkirstain/PickScore_v1"
    """The PickScore model: a Hub id or a folder holding a transformers ``CLIPModel``
    (``config.json`` + weights)."""
    processor: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
    """Where the tokenizer and image settings come from: a Hub id or a folder holding a saved
    ``CLIPProcessor`` (the authors use the processor of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``)."""
    cache_dir: str | None = None
    """Where Hub downloads are kept; ``null`` for the Hugging Face cache."""
    scale: float = 1.0
    """Multiplies the authors' score (Flow-GRPO trains on the score divided by 26: ``scale: 0.03846``)."""
    batch_size: int = 32
    """Images and prompts encoded at once."""
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    """Dtype of the PickScore model's weights and activations (the score is float32): ``bfloat16``
    or ``float16`` halve its memory (ViT-H/14: 3.9 to 2.0 GB)."""

    def check(self) -> None:
        """Reject impossible settings before any model loads."""
        if self.batch_size < 1:
            raise ConfigError(f"pickscore.batch_size must be >= 1, got {self.batch_size}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"pickscore.dtype: {self.dtype!r} is not one of {sorted(DTYPES)}")
        check_pretrained_reference(self.model, "pickscore.model")
        check_pretrained_reference(self.processor, "pickscore.processor", needs=("preprocessor_config.json", "processor_config.json"))


class PickScoreReward(Reward):
    """``scale · logit_scale.exp() · cos(image, prompt)`` per sample, ``[B]``, computed batched
    under ``no_grad`` on the policy's device."""

    reads = "images"

    def __init__(self, cfg: PickScoreConfig, device: torch.device | str = "cpu") -> None:
        from transformers import AutoProcessor, CLIPModel

        self.cfg = cfg
        self.device = torch.device(device)
        cache = cfg.cache_dir and str(Path(cfg.cache_dir).expanduser())
        with model_load_errors("rewards.pickscore.processor", cfg.processor, "a local CLIPProcessor folder"):
            try:
                processor = AutoProcessor.from_pretrained(pretrained_reference(cfg.processor), cache_dir=cache)
            except OSError as e:
                raise _offline_error("pickscore.processor", cfg.processor, e) from e
        self.tokenizer = processor.tokenizer
        ip = processor.image_processor
        size = _entry(ip.size, "shortest_edge")
        if size is None:
            raise ValueError(f"pickscore.processor {cfg.processor!r}: expected a shortest_edge resize, got size={ip.size}")
        crop = (_entry(ip.crop_size, "height"), _entry(ip.crop_size, "width")) if ip.do_center_crop else (size, size)
        self.size, self.crop = int(size), (int(crop[0]), int(crop[1]))
        self.mean, self.std = tuple(ip.image_mean), tuple(ip.image_std)
        with model_load_errors("rewards.pickscore.model", cfg.model, "a local CLIPModel folder"):
            self.model = load_transformers_strict(CLIPModel, cfg.model, "pickscore.model", cache).to(self.device)
        self.dtype = DTYPES[cfg.dtype]
        self.model.to(self.dtype)
        self._text_cache: dict[str, torch.Tensor] = {}

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """The CLIP image processor's resize, crop and normalisation on a float batch in ``[0, 1]``."""
        return resize_center_crop(images, self.size, self.crop, self.mean, self.std, floor_crop=True, clamp=True)

    @torch.no_grad()
    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        out = []
        for chunk in images.split(self.cfg.batch_size):
            x = self.preprocess(chunk.to(self.device)).to(self.dtype)
            out.append(F.normalize(_features(self.model.get_image_features(pixel_values=x)).float(), dim=-1))
        return torch.cat(out)

    @torch.no_grad()
    def text_features(self, texts: list[str]) -> torch.Tensor:
        todo = [t for t in dict.fromkeys(texts) if t not in self._text_cache]
        for i in range(0, len(todo), self.cfg.batch_size):
            chunk = todo[i : i + self.cfg.batch_size]
            tok = self.tokenizer(chunk, padding=True, truncation=True, max_length=77, return_tensors="pt").to(self.device)
            emb = _features(self.model.get_text_features(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]))
            self._text_cache.update(zip(chunk, F.normalize(emb.float(), dim=-1)))
        return torch.stack([self._text_cache[t] for t in texts])

    @torch.no_grad()
    def __call__(self, rollout: Rollout) -> torch.Tensor:
        img = self.image_features(rollout.outputs["images"])
        txt = self.text_features(rollout.prompts)
        scale = self.model.logit_scale.exp().float()
        return (self.cfg.scale * scale * (img * txt).sum(-1)).float().cpu()
