"""ImageReward: BLIP (ViT-L/16 image encoder + BERT text encoder with cross-attention) and an MLP
head, trained on 137k human rankings of text-to-image samples.

The score is the authors' (``ImageReward.score`` in THUDM/ImageReward)::

    image_embeds = blip.visual_encoder(preprocess(image))                   # all tokens, final LayerNorm
    text = blip.tokenizer(prompt, padding="max_length", truncation=True, max_length=35)
    h = blip.text_encoder(text.input_ids, text.attention_mask,
                          encoder_hidden_states=image_embeds).last_hidden_state[:, 0]   # [CLS]
    score = (mlp(h) - 0.16717362830052426) / 1.0333394966054072            # about -2..2, mean 0 on their data

The authors ship their own copy of BLIP; here the same network is built from transformers' BLIP
classes, whose modules compute the same functions: ``BlipVisionModel`` (LayerNorm eps 1e-6, exact
GELU, fused ``qkv``, final ``post_layernorm`` over all tokens) for ``visual_encoder``, and
``BlipTextModel`` without pooler (BLIP's "med" BERT: no token-type embeddings, cross-attention in
every layer) for ``text_encoder``. The checkpoint keeps the authors' key names and is renamed on
load::

    blip.visual_encoder.cls_token            → vision.embeddings.class_embedding
    blip.visual_encoder.pos_embed            → vision.embeddings.position_embedding
    blip.visual_encoder.patch_embed.proj.*   → vision.embeddings.patch_embedding.*
    blip.visual_encoder.blocks.{i}.norm1/attn.qkv/attn.proj/norm2/mlp.fc1/mlp.fc2
                                             → vision.encoder.layers.{i}.layer_norm1/self_attn.qkv/
                                               self_attn.projection/layer_norm2/mlp.fc1/mlp.fc2
    blip.visual_encoder.norm.*               → vision.post_layernorm.*
    blip.text_encoder.*                      → text.* (same names)
    mlp.layers.{0,2,4,6,7}.*                 → head.layers.{0,2,4,6,7}.* (the aesthetic-style MLP)

``blip.vision_proj`` and ``blip.text_proj`` (BLIP's contrastive projections, unused by the score)
and the ``position_ids`` buffer (checked to be ``0..n-1``) are the only keys accepted without a
destination; every other key must map onto the architecture with its exact shape, and every
parameter of the architecture must be in the checkpoint.

The checkpoint is ``ImageReward.pt`` of the Hub repository ``THUDM/ImageReward``, read with
``torch.load(weights_only=True)``; the text encoder's configuration is that repository's
``med_config.json``; the tokenizer is ``google-bert/bert-base-uncased`` with BLIP's two added tokens
(``[DEC]`` as bos, ``[ENC]``), 30524 ids.

Preprocessing is the authors' ``_transform(224)`` on tensors: the shorter side resized to 224
(bicubic, antialiased), centre crop, OpenAI CLIP mean and std.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping

import torch
from torch import nn

from polyrl.paths import model_load_errors
from polyrl.types import DTYPES, ConfigError, Reward, Rollout

from .aesthetic import AestheticMLP
from .hps import check_file_reference, check_state_dict, fetch_hub_file, resize_center_crop
from .pickscore import check_pretrained_reference, pretrained_reference

__all__ = ["ImageRewardConfig", "ImageRewardModel", "ImageRewardReward", "convert_image_reward_state_dict",
           "load_image_reward"]

SCORE_MEAN = 0.16717362830052426
"""The authors' normalisation of the MLP output: ``(mlp(h) - mean) / std``."""
SCORE_STD = 1.0333394966054072
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
UNUSED_KEYS = ("blip.vision_proj.weight", "blip.vision_proj.bias", "blip.text_proj.weight", "blip.text_proj.bias")
"""Checkpoint keys ImageReward does not use (BLIP's contrastive projections)."""

_VISION_RENAMES = [
    (r"^cls_token$", "embeddings.class_embedding"),
    (r"^pos_embed$", "embeddings.position_embedding"),
    (r"^patch_embed\.proj\.", "embeddings.patch_embedding."),
    (r"^blocks\.(\d+)\.norm1\.", r"encoder.layers.\1.layer_norm1."),
    (r"^blocks\.(\d+)\.norm2\.", r"encoder.layers.\1.layer_norm2."),
    (r"^blocks\.(\d+)\.attn\.qkv\.", r"encoder.layers.\1.self_attn.qkv."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.\1.self_attn.projection."),
    (r"^blocks\.(\d+)\.mlp\.(fc[12])\.", r"encoder.layers.\1.mlp.\2."),
    (r"^norm\.", "post_layernorm."),
]


class ImageRewardModel(nn.Module):
    """BLIP's ViT, BLIP's cross-attending BERT and the MLP head, in transformers' BLIP modules."""

    def __init__(self, med_config: Mapping[str, Any], vision_width: int = 1024, vision_layers: int = 24,
                 vision_heads: int = 16, patch_size: int = 16, image_size: int = 224) -> None:
        super().__init__()
        from transformers import BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

        self.image_size = image_size
        self.vision = BlipVisionModel(BlipVisionConfig(
            hidden_size=vision_width, intermediate_size=4 * vision_width, num_hidden_layers=vision_layers,
            num_attention_heads=vision_heads, image_size=image_size, patch_size=patch_size, hidden_act="gelu",
            layer_norm_eps=1e-6, attention_dropout=0.0))
        med = dict(med_config)  # its encoder_width is replaced by the ViT's width, as the authors do
        if med.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"med_config: only absolute position embeddings are supported, got {med['position_embedding_type']!r}")
        text_cfg = BlipTextConfig(
            vocab_size=med["vocab_size"], hidden_size=med["hidden_size"], encoder_hidden_size=vision_width,
            intermediate_size=med["intermediate_size"], num_hidden_layers=med["num_hidden_layers"],
            num_attention_heads=med["num_attention_heads"], max_position_embeddings=med["max_position_embeddings"],
            hidden_act=med.get("hidden_act", "gelu"), layer_norm_eps=med.get("layer_norm_eps", 1e-12),
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=med.get("pad_token_id", 0),
            bos_token_id=None, eos_token_id=None, sep_token_id=None)
        self.text = BlipTextModel(text_cfg, add_pooling_layer=False)
        self.head = AestheticMLP(med["hidden_size"])

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``[B]`` normalised ImageReward scores of preprocessed images and tokenised prompts."""
        dtype = self.vision.embeddings.patch_embedding.weight.dtype  # the encoders' dtype; the head stays float32
        image_embeds = self.vision(pixel_values=pixel_values.to(dtype)).last_hidden_state
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        h = self.text(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image_embeds,
                      encoder_attention_mask=image_atts).last_hidden_state[:, 0, :]
        return (self.head(h.float()) - SCORE_MEAN) / SCORE_STD


def convert_image_reward_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The authors' keys renamed to :class:`ImageRewardModel`'s; unused keys dropped (checked:
    BLIP's projections, the ``position_ids`` buffer, which must be ``0..n-1``); keys of no known
    form are kept as they are, so that the strict check names them."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key in UNUSED_KEYS:
            continue
        if key == "blip.text_encoder.embeddings.position_ids":
            if not torch.equal(value.reshape(-1).long(), torch.arange(value.numel())):
                raise ValueError("ImageReward checkpoint: blip.text_encoder.embeddings.position_ids is not 0..n-1")
            continue
        if key.startswith("blip.visual_encoder."):
            rest = key[len("blip.visual_encoder."):]
            for pattern, repl in _VISION_RENAMES:
                if re.search(pattern, rest):
                    out["vision." + re.sub(pattern, repl, rest)] = value
                    break
            else:
                out[key] = value
        elif key.startswith("blip.text_encoder."):
            out["text." + key[len("blip.text_encoder."):]] = value
        elif key.startswith("mlp.layers."):
            out["head." + key[len("mlp."):]] = value
        else:
            out[key] = value
    return out


def load_image_reward(checkpoint: str | os.PathLike, med_config: str | os.PathLike, device: torch.device | str = "cpu",
                      **vision: int) -> ImageRewardModel:
    """An :class:`ImageRewardModel` with the weights of ``checkpoint`` (the authors' format,
    strictly checked), in eval mode without gradients. ``vision`` overrides the ViT-L/16 sizes
    (``vision_width``, ``vision_layers``, ``vision_heads``, ``patch_size``, ``image_size``)."""
    med = json.loads(Path(med_config).read_text())
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                           "max_position_embeddings") if k not in med]
    if missing:
        raise ValueError(f"med_config {str(med_config)!r}: missing {missing}")
    raw = torch.load(str(checkpoint), map_location="cpu", weights_only=True)
    if isinstance(raw, Mapping) and isinstance(raw.get("state_dict"), Mapping):
        raw = raw["state_dict"]
    if not isinstance(raw, Mapping):
        raise ValueError(f"ImageReward checkpoint {str(checkpoint)!r}: expected a state dict, got {type(raw).__name__}")
    state = convert_image_reward_state_dict(raw)
    model = ImageRewardModel(med, **vision)
    expected = {k: v.shape for k, v in model.state_dict().items() if k != "text.embeddings.position_ids"}
    check_state_dict(state, expected, f"ImageReward checkpoint {str(checkpoint)!r}")
    result = model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    leftover = [k for k in result.missing_keys if k != "text.embeddings.position_ids"]
    if leftover or result.unexpected_keys:  # pragma: no cover - check_state_dict already caught these
        raise ValueError(f"ImageReward checkpoint: missing {leftover}, unexpected {result.unexpected_keys}")
    return model.to(device).eval().requires_grad_(False)


def load_blip_tokenizer(ref: str, cache_dir: str | None = None):
    """BLIP's tokenizer: BERT's (``google-bert/bert-base-uncased``) with ``[DEC]`` added as bos and ``[ENC]``
    as an additional special token, as the authors' ``init_tokenizer``."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(pretrained_reference(ref), cache_dir=cache_dir)
    except OSError as e:
        raise OSError(
            f"image_reward.tokenizer: cannot load {ref!r} ({type(e).__name__}: {e}). Without network access, download "
            f"it elsewhere (`huggingface-cli download {ref} --local-dir <folder>`) and give the folder"
        ) from e
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tok


@dataclass
class ImageRewardConfig:
    """Settings of the ImageReward reward."""

    checkpoint: str = "hf-hub:THUDM/ImageReward/ImageReward.pt"
    """The weights in the authors' format (``blip.visual_encoder.*``, ``blip.text_encoder.*``,
    ``mlp.layers.*``): a local ``.pt`` file or ``hf-hub:<org>/<repo>/<file>`` downloaded once."""
    med_config: str = "hf-hub:THUDM/ImageReward/med_config.json"
    """The text encoder's BERT configuration (``med_config.json``): a local file or
    ``hf-hub:<org>/<repo>/<file>``."""
    tokenizer: str = "google-bert/bert-base-uncased"
    """BERT tokenizer (Hub id or folder); BLIP's ``[DEC]`` and ``[ENC]`` tokens are added to it."""
    vision_width: int = 1024
    """Width of the ViT image encoder (ViT-L/16: 1024)."""
    vision_layers: int = 24
    """Number of ViT blocks (ViT-L/16: 24)."""
    vision_heads: int = 16
    """Attention heads per ViT block (ViT-L/16: 16)."""
    patch_size: int = 16
    """ViT patch size in pixels."""
    image_size: int = 224
    """Input resolution of the ViT (images are resized and centre-cropped to it)."""
    max_length: int = 35
    """Prompt length in tokens (the authors pad and truncate to 35)."""
    cache_dir: str | None = None
    """Where Hub downloads are kept; ``null`` for the Hugging Face cache."""
    batch_size: int = 16
    """Images scored at once."""
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    """The dtype of the BLIP image and text encoders (``bfloat16`` halves their memory; the scores then
    carry bf16 rounding); the MLP head and the scores stay float32."""

    def check(self) -> None:
        """Reject impossible settings before any model loads."""
        if self.dtype not in DTYPES:
            raise ConfigError(f"image_reward.dtype: {self.dtype!r} is not one of {sorted(DTYPES)}")
        for name in ("vision_width", "vision_layers", "vision_heads", "patch_size", "image_size", "max_length", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"image_reward.{name} must be >= 1, got {getattr(self, name)}")
        if self.vision_width % self.vision_heads:
            raise ConfigError(f"image_reward.vision_width ({self.vision_width}) must be divisible by vision_heads ({self.vision_heads})")
        if self.image_size % self.patch_size:
            raise ConfigError(f"image_reward.image_size ({self.image_size}) must be divisible by patch_size ({self.patch_size})")
        check_file_reference(self.checkpoint, "image_reward.checkpoint")
        check_file_reference(self.med_config, "image_reward.med_config")
        check_pretrained_reference(self.tokenizer, "image_reward.tokenizer", needs=("tokenizer_config.json", "vocab.txt"))


class ImageRewardReward(Reward):
    """ImageReward of each image with its prompt, ``[B]``, computed batched under ``no_grad`` on
    the policy's device."""

    reads = "images"

    def __init__(self, cfg: ImageRewardConfig, device: torch.device | str = "cpu") -> None:
        self.cfg = cfg
        self.device = torch.device(device)
        cache = cfg.cache_dir and str(Path(cfg.cache_dir).expanduser())
        with model_load_errors("rewards.image_reward.med_config", cfg.med_config, "a local BLIP config file"):
            med = fetch_hub_file(cfg.med_config, cache, "image_reward.med_config")
        with model_load_errors("rewards.image_reward.checkpoint", cfg.checkpoint, "a local checkpoint file"):
            ckpt = fetch_hub_file(cfg.checkpoint, cache, "image_reward.checkpoint")
        with model_load_errors("rewards.image_reward.tokenizer", cfg.tokenizer, "a local BERT tokenizer folder"):
            self.tokenizer = load_blip_tokenizer(cfg.tokenizer, cache)
        self.model = load_image_reward(ckpt, med, self.device, vision_width=cfg.vision_width,
                                       vision_layers=cfg.vision_layers, vision_heads=cfg.vision_heads,
                                       patch_size=cfg.patch_size, image_size=cfg.image_size)
        self.model.vision.to(DTYPES[cfg.dtype])
        self.model.text.to(DTYPES[cfg.dtype])
        vocab = self.model.text.config.vocab_size
        if len(self.tokenizer) > vocab:
            raise ValueError(f"image_reward: the tokenizer has {len(self.tokenizer)} ids but the text encoder {vocab}")

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """The authors' ``_transform`` on a float batch in ``[0, 1]``."""
        s = self.cfg.image_size
        return resize_center_crop(images, s, (s, s), OPENAI_MEAN, OPENAI_STD, clamp=True)

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tok = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=self.cfg.max_length,
                             return_tensors="pt")
        return tok["input_ids"].to(self.device), tok["attention_mask"].to(self.device)

    @torch.no_grad()
    def __call__(self, rollout: Rollout) -> torch.Tensor:
        images, prompts = rollout.outputs["images"], rollout.prompts
        out = []
        for i in range(0, len(prompts), self.cfg.batch_size):
            x = self.preprocess(images[i : i + self.cfg.batch_size].to(self.device))
            ids, mask = self.tokenize(prompts[i : i + self.cfg.batch_size])
            out.append(self.model(x, ids, mask))
        return torch.cat(out).float().cpu()
