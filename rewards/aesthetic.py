"""The LAION aesthetic predictor as a reward (DDPO's and RLCM's aesthetic task).

Images are scored by a linear MLP on L2-normalised CLIP image features (the LAION improved aesthetic predictor)::

    features = normalize(CLIP_ViT-L/14_openai.encode_image(preprocess(images)))     # [B, 768]
    score    = Linear(768,1024) → Dropout(0.2) → Linear(1024,128) → Dropout(0.2)
               → Linear(128,64) → Dropout(0.1) → Linear(64,16) → Linear(16,1)       # no activations

The head's weights are ``sac+logos+ava1-l14-linearMSE.pth`` (state-dict keys
``layers.{0,2,4,6,7}.{weight,bias}``), read from a local file or downloaded once from
``head`` (a URL) into a cache folder. They are loaded with ``torch.load(weights_only=True)`` and
checked strictly: every key present, none extra, every shape as the architecture expects.
Preprocessing is CLIP's (resize to 224, centre crop, CLIP mean/std), done on tensors on the
policy's device. Scores are about 1-10; Stable Diffusion samples start near 5.5-6.
"""

from __future__ import annotations

import os
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from polyrl.paths import model_load_errors, resolve_path
from polyrl.types import DTYPES, ConfigError, Reward, Rollout

from .clip_score import _OPEN_CLIP, _shown, check_model_reference, load_open_clip

__all__ = ["AestheticConfig", "AestheticMLP", "AestheticReward", "drop_text_tower", "fetch_head", "load_aesthetic_head"]

#: The attributes of an open_clip model that only its text tower uses (CLIP and CustomTextCLIP).
TEXT_TOWER = ("transformer", "token_embedding", "positional_embedding", "ln_final", "text_projection", "text",
              "attn_mask")

HEAD_URL = (
    "https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/sac+logos+ava1-l14-linearMSE.pth"
)
"""Where the LAION aesthetic head is published."""


def default_cache_dir() -> Path:
    """``$POLYRL_CACHE``, else ``$XDG_CACHE_HOME/polyrl``, else ``~/.cache/polyrl``."""
    if os.environ.get("POLYRL_CACHE"):
        return Path(os.environ["POLYRL_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "polyrl"


class AestheticMLP(nn.Module):
    """The LAION improved-aesthetic-predictor head: five linear layers, no activations."""

    def __init__(self, input_dim: int = 768) -> None:
        super().__init__()
        self.input_dim = input_dim
        self.layers = nn.Sequential(
            nn.Linear(input_dim, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``[B, input_dim]`` (L2-normalised CLIP image features) → ``[B]`` scores."""
        return self.layers(features).squeeze(-1)


def _is_url(source: str) -> bool:
    return urllib.parse.urlparse(source).scheme in ("http", "https", "ftp")


def fetch_head(source: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The local file of the head: ``source`` itself if it is a path, else the cached download of
    the URL ``source`` (downloaded on first use). Raises ``FileNotFoundError`` naming where to put
    the file when it is missing and cannot be downloaded."""
    if not _is_url(source):
        path = Path(resolve_path(source)).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"aesthetic head: no such file {source!r}; give a local .pth file or a URL (default {HEAD_URL})"
            )
        return path
    folder = Path(cache_dir).expanduser() if cache_dir else default_cache_dir() / "aesthetic"
    target = folder / Path(urllib.parse.unquote(urllib.parse.urlparse(source).path)).name
    if target.is_file():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    try:
        torch.hub.download_url_to_file(source, str(part), progress=False)
    except Exception as e:  # no network, HTTP error, DNS failure...
        part.unlink(missing_ok=True)
        raise FileNotFoundError(
            f"aesthetic head: cannot download {source} ({type(e).__name__}: {e}). Download it on a machine with "
            f"network access and put it at {target} (or set the reward's 'head' to the local file)"
        ) from e
    part.replace(target)
    return target


def load_aesthetic_head(path: str | os.PathLike, input_dim: int = 768) -> AestheticMLP:
    """An :class:`AestheticMLP` with the weights in ``path`` (``torch.load(weights_only=True)``),
    checked strictly: the same keys as the architecture, each with the expected shape."""
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"aesthetic head {str(path)!r}: expected a state dict of tensors, got {type(state).__name__}")
    head = AestheticMLP(input_dim)
    expected = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    missing, unexpected = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    wrong = {k: (got[k], expected[k]) for k in sorted(set(expected) & set(got)) if got[k] != expected[k]}
    if missing or unexpected or wrong:
        raise ValueError(
            f"aesthetic head {str(path)!r} does not match Linear({input_dim},1024)→Linear(1024,128)→Linear(128,64)"
            f"→Linear(64,16)→Linear(16,1) (keys layers.{{0,2,4,6,7}}.{{weight,bias}}): missing {missing}, "
            f"unexpected {unexpected}, wrong shapes (got, expected) {wrong}"
        )
    head.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return head.eval().requires_grad_(False)


@dataclass
class AestheticConfig:
    """Settings of the LAION aesthetic reward."""

    head: str = HEAD_URL
    """The aesthetic MLP's weights: a local ``.pth`` file, or a URL downloaded once into
    ``cache_dir`` (default: the LAION ``sac+logos+ava1-l14-linearMSE.pth``)."""
    cache_dir: str | None = None
    """Where downloads are kept (the head, and open_clip's weights); ``null`` is
    ``$POLYRL_CACHE`` or ``~/.cache/polyrl``."""
    model: str = "ViT-L-14"
    """The CLIP image encoder: an open_clip model name, a folder in open_clip's ``local-dir``
    format (``open_clip_config.json`` + weights) or ``hf-hub:<org/repo>``. Its embedding width must
    be the head's input width (768 for ViT-L/14)."""
    pretrained: str | None = "openai"
    """open_clip pretrained tag (``openai``) or checkpoint file for ``model`` (ignored for
    folders and hub ids)."""
    batch_size: int = 32
    """Images encoded by CLIP at once."""
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    """Dtype of the CLIP image encoder's weights and activations (the head and the score stay
    float32). ``float16``/``bfloat16`` halve the encoder's memory (ViT-L/14: 1.2 to 0.6 GB); the
    scores move by about 1e-2 on the 1-10 scale. Only the image tower is kept either way: the text
    tower (0.5 GB for ViT-L/14 in float32) is dropped after loading."""

    def check(self) -> None:
        """Reject impossible settings before any model loads."""
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype: {self.dtype!r} is not one of {sorted(DTYPES)}")
        if not _is_url(self.head) and not Path(resolve_path(self.head)).expanduser().is_file():
            raise ConfigError(
                f"head: no such file {self.head!r}; give a local .pth file or a URL (default {HEAD_URL})"
            )
        check_model_reference(self.model, self.pretrained, "aesthetic")


class AestheticReward(Reward):
    """LAION aesthetic score of each image, ``[B]``, computed batched under ``no_grad`` on the
    policy's device (or the CPU without a policy)."""

    reads = "images"

    def __init__(self, cfg: AestheticConfig, device: torch.device | str = "cpu") -> None:
        self.cfg = cfg
        self.device = torch.device(device)
        cache = cfg.cache_dir and str(Path(cfg.cache_dir).expanduser())
        with model_load_errors("rewards.aesthetic.model", _shown(cfg.model, cfg.pretrained), _OPEN_CLIP):
            self.clip, _, self.preprocess = load_open_clip(cfg.model, cfg.pretrained, cache, self.device)
        drop_text_tower(self.clip)
        self.dtype = DTYPES[cfg.dtype]
        self.clip.to(self.dtype)
        dim = _embed_dim(self.clip)
        with model_load_errors("rewards.aesthetic.head", cfg.head, "a local .pth file"):
            head_file = fetch_head(cfg.head, cache and Path(cache) / "aesthetic")
        self.head = load_aesthetic_head(head_file, dim).to(self.device)

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised CLIP image features ``[B, D]`` float32 of images ``[B, 3, H, W]`` in [0, 1]."""
        out = []
        for chunk in images.split(self.cfg.batch_size):
            x = self.preprocess(chunk.to(self.device)).to(self.dtype)
            out.append(F.normalize(self.clip.encode_image(x).float(), dim=-1))
        return torch.cat(out)

    @torch.no_grad()
    def __call__(self, rollout: Rollout) -> torch.Tensor:
        return self.head(self.features(rollout.outputs["images"])).float().cpu()


def drop_text_tower(clip) -> int:
    """Remove the text tower of an open_clip model that only encodes images (the aesthetic score
    never reads text); returns the number of parameters removed."""
    before = sum(p.numel() for p in clip.parameters())
    for name in TEXT_TOWER:
        if name in getattr(clip, "_modules", {}) or name in getattr(clip, "_parameters", {}) \
                or name in getattr(clip, "_buffers", {}):
            setattr(clip, name, None)
    return before - sum(p.numel() for p in clip.parameters())


def _embed_dim(clip) -> int:
    proj = getattr(clip.visual, "output_dim", None)
    if proj:
        return int(proj)
    with torch.no_grad():  # pragma: no cover - models without output_dim
        size = clip.visual.image_size
        size = size if isinstance(size, int) else size[0]
        return int(clip.encode_image(torch.zeros(1, 3, size, size, device=next(clip.parameters()).device)).shape[-1])
