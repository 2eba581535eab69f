"""HPS v2 / v2.1 (Human Preference Score): an open_clip ViT-H/14 fine-tuned on human preferences.

The score is the cosine of the image and prompt embeddings of the fine-tuned CLIP, as the
authors' ``hpsv2.score`` computes it (``image_features @ text_features.T`` of L2-normalised
features; about 0.2-0.35 on typical samples, higher is preferred)::

    model = open_clip ViT-H-14, random init, then checkpoint["state_dict"]
    score = <normalize(model.encode_image(preprocess(image))), normalize(model.encode_text(tokenize(prompt)))>

The checkpoint is ``HPS_v2.1_compressed.pt`` (or ``HPS_v2_compressed.pt`` for v2.0) of the Hub
repository ``xswu/HPSv2``: a torch file holding ``{"state_dict": ...}`` with open_clip's key names.
It is read with ``torch.load(weights_only=True)`` and checked strictly against the architecture
(every key present, none extra, every shape equal) before it is loaded.

Preprocessing is the transform the authors' scoring code builds (``create_model_and_transforms(...,
light_augmentation=True)``, whose evaluation transform resizes the *longer* side): ``ToTensor``,
the longer side resized to 224 (bicubic, on the float tensor, so antialiased as torchvision does
and not clamped), zero padding to 224 × 224 centred (black, before normalisation), normalisation
with the OpenAI CLIP mean and std. Square images are just resized.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping

import torch
import torch.nn.functional as F

from polyrl.paths import model_load_errors, resolve_path
from polyrl.types import DTYPES, ConfigError, Reward, Rollout

from .clip_score import OpenClipEmbeddings

__all__ = [
    "HPSConfig",
    "HPSReward",
    "check_state_dict",
    "fetch_hub_file",
    "load_hps_model",
    "resize_center_crop",
    "resize_longest_pad",
]

HPS_CHECKPOINT = "hf-hub:xswu/HPSv2/HPS_v2.1_compressed.pt"
"""HPS v2.1 on the Hugging Face Hub (repository ``xswu/HPSv2``, file ``HPS_v2.1_compressed.pt``)."""


# --------------------------------------------------------------------------- shared helpers
def parse_hub_file(ref: str) -> tuple[str, str] | None:
    """``("org/repo", "path/in/repo")`` for ``hf-hub:org/repo/path/in/repo``, else ``None``."""
    if not ref.startswith("hf-hub:"):
        return None
    parts = ref[len("hf-hub:"):].strip("/").split("/")
    if len(parts) < 3 or not all(parts):
        return None
    return "/".join(parts[:2]), "/".join(parts[2:])


def check_file_reference(ref: str, key: str) -> None:
    """Reject, before anything loads, a reference that is neither an existing file nor
    ``hf-hub:<org>/<repo>/<file>``."""
    if ref.startswith("hf-hub:"):
        if parse_hub_file(ref) is None:
            raise ConfigError(f"{key}: {ref!r} is not of the form 'hf-hub:<org>/<repo>/<file in the repo>'")
        return
    if not Path(resolve_path(ref)).expanduser().is_file():
        raise ConfigError(f"{key}: no such file {ref!r}; give a local file or 'hf-hub:<org>/<repo>/<file in the repo>'")


def fetch_hub_file(ref: str, cache_dir: str | os.PathLike | None = None, what: str = "file") -> Path:
    """The local path of ``ref``: the file itself, or the Hub file ``hf-hub:<org>/<repo>/<file>``
    downloaded once into ``cache_dir`` (the Hugging Face cache by default). Without network access
    and without a cached copy, raises ``FileNotFoundError`` saying how to provide the file."""
    hub = parse_hub_file(ref)
    if hub is None:
        path = Path(resolve_path(ref)).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{what}: no such file {ref!r}")
        return path
    from huggingface_hub import hf_hub_download

    repo, filename = hub
    try:
        return Path(hf_hub_download(repo_id=repo, filename=filename, cache_dir=cache_dir))
    except Exception as e:  # no network, unknown repo or file, gated repo...
        raise FileNotFoundError(
            f"{what}: cannot fetch {filename!r} from the Hub repository {repo!r} ({type(e).__name__}: {e}). On a machine "
            f"with network access run `huggingface-cli download {repo} {filename}` (or download it from "
            f"https://huggingface.co/{repo}) and give the local file instead of {ref!r}"
        ) from e


def check_state_dict(state: Mapping[str, Any], expected: Mapping[str, torch.Size | tuple], what: str) -> None:
    """Raise ``ValueError`` naming every missing key, unexpected key and wrong shape of ``state``
    against ``expected`` (key → shape)."""
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{what}: expected a state dict of tensors, got {type(state).__name__}")
    got = {k: tuple(v.shape) for k, v in state.items()}
    want = {k: tuple(v) for k, v in expected.items()}
    missing, unexpected = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    wrong = {k: (got[k], want[k]) for k in sorted(set(want) & set(got)) if got[k] != want[k]}
    if missing or unexpected or wrong:
        def show(keys):  # long lists are cut, with their count
            return f"{keys[:8]}{f' and {len(keys) - 8} more' if len(keys) > 8 else ''} ({len(keys)})"

        raise ValueError(
            f"{what} does not match the architecture: missing {show(missing)}, unexpected {show(unexpected)}, "
            f"wrong shapes (got, expected) {dict(list(wrong.items())[:8])}"
        )


def resize_center_crop(images: torch.Tensor, size: int, crop: tuple[int, int], mean: tuple[float, ...],
                       std: tuple[float, ...], *, floor_crop: bool = False, clamp: bool = False) -> torch.Tensor:
    """``[B, 3, H, W]`` float in ``[0, 1]`` → ``[B, 3, crop_h, crop_w]`` normalised float32: the
    shorter side resized to ``size`` (bicubic, antialiased), a centre crop, ``(x - mean) / std``.

    ``floor_crop`` places the crop as transformers' image processors do (``(H - h) // 2``) rather
    than as torchvision's ``CenterCrop`` (``round((H - h) / 2)``); ``clamp`` clips to ``[0, 1]``
    after resizing, as a resize of 8-bit images does."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images [B, 3, H, W], got {tuple(images.shape)}")
    x = images.float()
    h, w = x.shape[-2:]
    nh, nw = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
    ch, cw = crop
    if nh < ch or nw < cw:
        raise ValueError(f"cannot crop {ch}x{cw} from an image resized to {nh}x{nw}")
    if floor_crop:
        top, left = (nh - ch) // 2, (nw - cw) // 2
    else:
        top, left = int(round((nh - ch) / 2.0)), int(round((nw - cw) / 2.0))
    x = x[..., top : top + ch, left : left + cw]
    if clamp:
        x = x.clamp(0, 1)
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


def resize_longest_pad(images: torch.Tensor, size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """``[B, 3, H, W]`` float in ``[0, 1]`` → ``[B, 3, size, size]`` normalised float32: the longer
    side resized to ``size`` (bicubic, antialiased, not clamped; each side ``round(side · size /
    longer)``), zero padding split evenly (the extra pixel right / bottom), ``(x - mean) / std``."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images [B, 3, H, W], got {tuple(images.shape)}")
    x = images.float()
    h, w = x.shape[-2:]
    scale = size / float(max(h, w))
    if scale != 1.0:
        nh, nw = round(h * scale), round(w * scale)
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
        ph, pw = size - nh, size - nw
        x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=0.0)
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


# --------------------------------------------------------------------------- the model
def architecture_reference(architecture: str) -> str:
    """The open_clip identifier of an architecture: a built-in model name unchanged, a folder
    holding ``open_clip_config.json`` as ``local-dir:<absolute folder>``."""
    name = architecture[len("local-dir:"):] if architecture.startswith("local-dir:") else architecture
    folder = Path(resolve_path(name)).expanduser()
    if folder.is_dir():
        return f"local-dir:{folder.resolve()}"
    return architecture


def check_architecture(architecture: str, key: str) -> None:
    import open_clip

    ref = architecture_reference(architecture)
    if ref.startswith("local-dir:"):
        if not (Path(ref[len("local-dir:"):]) / "open_clip_config.json").is_file():
            raise ConfigError(f"{key}: folder {architecture!r} has no open_clip_config.json")
        return
    names = open_clip.list_models()
    if ref not in names:
        from polyrl.config import suggest

        raise ConfigError(
            f"{key}: {architecture!r} is not an open_clip model name{suggest(architecture, names)} nor a folder with "
            "open_clip_config.json; HPS v2 / v2.1 use 'ViT-H-14'"
        )


def load_hps_model(checkpoint: str | os.PathLike, architecture: str = "ViT-H-14", device: torch.device | str = "cpu"):
    """``(model, tokenizer)``: the open_clip ``architecture`` with random weights replaced by
    ``checkpoint["state_dict"]`` (strictly checked), in eval mode without gradients."""
    import open_clip

    ref = architecture_reference(architecture)
    state = torch.load(str(checkpoint), map_location="cpu", weights_only=True)
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    # keys and shapes are checked on a weightless copy, before the (large) model is allocated
    with torch.device("meta"):
        skeleton = open_clip.create_model(ref, pretrained=None, load_weights=False, pretrained_text=False, device="meta")
    check_state_dict(state, {k: v.shape for k, v in skeleton.state_dict().items()},
                     f"HPS checkpoint {str(checkpoint)!r} (open_clip {architecture})")
    model = open_clip.create_model(ref, pretrained=None, load_weights=False, pretrained_text=False, device="cpu")
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    model = model.to(device).eval().requires_grad_(False)
    return model, open_clip.get_tokenizer(ref)


# --------------------------------------------------------------------------- the reward
@dataclass
class HPSConfig:
    """Settings of the HPS v2.1 (Human Preference Score) reward."""

    checkpoint: str = HPS_CHECKPOINT
    """The weights: a local ``.pt`` file holding ``{"state_dict": ...}`` in open_clip's key names,
    or ``hf-hub:<org>/<repo>/<file>`` downloaded once (default: HPS v2.1,
    ``hf-hub:xswu/HPSv2/HPS_v2.1_compressed.pt``; v2.0 is ``HPS_v2_compressed.pt``)."""
    architecture: str = "ViT-H-14"
    """The open_clip architecture the checkpoint belongs to: a built-in model name (HPS uses
    ``ViT-H-14``) or a folder holding ``open_clip_config.json``; built with random weights, which
    the checkpoint replaces."""
    cache_dir: str | None = None
    """Where Hub downloads are kept; ``null`` for the Hugging Face cache."""
    batch_size: int = 32
    """Images and prompts encoded at once."""
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    """Dtype of the HPS model's weights and activations (the score is float32): ``bfloat16`` or
    ``float16`` halve its memory (ViT-H/14: 3.9 to 2.0 GB); the scores move by about 1e-3."""

    def check(self) -> None:
        """Reject impossible settings before any model loads."""
        if self.batch_size < 1:
            raise ConfigError(f"hps.batch_size must be >= 1, got {self.batch_size}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"hps.dtype: {self.dtype!r} is not one of {sorted(DTYPES)}")
        check_file_reference(self.checkpoint, "hps.checkpoint")
        check_architecture(self.architecture, "hps.architecture")


class HPSReward(OpenClipEmbeddings, Reward):
    """HPS of each image with its prompt, ``[B]``: the cosine of the fine-tuned CLIP's image and
    text embeddings, computed batched under ``no_grad`` on the policy's device."""

    reads = "images"

    def __init__(self, cfg: HPSConfig, device: torch.device | str = "cpu") -> None:
        self.cfg = cfg
        self.device = torch.device(device)
        cache = cfg.cache_dir and str(Path(cfg.cache_dir).expanduser())
        with model_load_errors("rewards.hps.checkpoint", cfg.checkpoint, "a local checkpoint file"):
            path = fetch_hub_file(cfg.checkpoint, cache, "hps.checkpoint")
        self.model, self.tokenizer = load_hps_model(path, cfg.architecture, self.device)
        self.model.to(DTYPES[cfg.dtype])
        self.clip = self.model  # for the shared embedding methods
        pre = getattr(self.model.visual, "preprocess_cfg", {}) or {}
        size = getattr(self.model.visual, "image_size", 224)
        self.size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.mean = tuple(pre.get("mean", (0.48145466, 0.4578275, 0.40821073)))
        self.std = tuple(pre.get("std", (0.26862954, 0.26130258, 0.27577711)))
        self._text_cache: dict[str, torch.Tensor] = {}

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """The authors' scoring transform on a float batch in ``[0, 1]``."""
        return resize_longest_pad(images, self.size, self.mean, self.std)

    @torch.no_grad()
    def __call__(self, rollout: Rollout) -> torch.Tensor:
        img = self.image_features(rollout.outputs["images"])
        txt = self.text_features(rollout.prompts)
        return (img * txt).sum(-1).float().cpu()
