#!/usr/bin/env python
"""Write ``assets/tiny-sd/``: a tiny, random-init Stable-Diffusion-1.x pipeline folder.

The folder has the exact layout of a real SD 1.x checkpoint on the Hub, so the same loading code
(``StableDiffusionPipeline.from_pretrained``) serves it and real models::

    model_index.json
    scheduler/scheduler_config.json     DDIM, SD's scaled_linear betas 0.00085..0.012, 1000 steps
    text_encoder/{config.json, model.safetensors}   CLIPTextModel, hidden 32, 2 layers
    tokenizer/{vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json}
    unet/{config.json, diffusion_pytorch_model.safetensors}   UNet2DConditionModel, latents 4x8x8
    vae/{config.json, diffusion_pytorch_model.safetensors}    AutoencoderKL, 64x64 RGB <-> 4x8x8

The tokenizer is a real byte-level CLIP BPE: its ``merges.txt`` is learned here, offline, by a few
lines of BPE training on a fixed word list (the DDPO animals, colours, shapes and a few function
words), so that each of those words is a single token and any other text still tokenizes (into
byte-level pieces).

Everything is seeded: running the script twice writes identical weights. Weights are random; the
VAE decoder's output layer is rescaled so that decoded images vary visibly with the latents (a
JPEG-size reward then has signal). A later step replaces this folder with a *trained* tiny model.

Usage::

    python scripts/make_tiny_sd.py [--out assets/tiny-sd] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import shutil
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

REPO_ROOT = Path(__file__).resolve().parent.parent

IMAGE_SIZE = 64
"""Pixel height and width of generated images."""
LATENT_SIZE = 8
"""Latent height and width (the VAE downsamples by 8, as SD's does)."""
MAX_LENGTH = 77
"""Tokenizer ``model_max_length`` and text-encoder positions, as in SD 1.x."""
HIDDEN = 32
"""Text-encoder width = UNet ``cross_attention_dim``."""

ANIMALS = (
    "cat dog horse monkey rabbit zebra spider bird sheep deer cow goat lion tiger bear raccoon fox "
    "wolf lizard beetle ant butterfly fish shark whale dolphin squirrel mouse rat snake turtle frog "
    "chicken duck goose bee pig turkey fly llama camel bat gorilla hedgehog kangaroo"
).split()
COLOURS = "red green blue yellow orange purple pink black white brown gray grey".split()
SHAPES = "circle square triangle star rectangle ellipse ring cross heart diamond hexagon".split()
OTHER = (
    "a an the of photo picture image drawing painting on in with and at is small large big "
    "tiny huge bright dark background left right top bottom center washing dishes riding bike "
    "playing chess two three"
).split()
WORDS: tuple[str, ...] = tuple(dict.fromkeys(ANIMALS + COLOURS + SHAPES + OTHER))
"""Words that the tokenizer keeps whole (one token each)."""

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


# ----------------------------------------------------------------------------------- tokenizer
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from the 256 byte values to printable unicode characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def train_bpe(words: tuple[str, ...]) -> list[tuple[str, str]]:
    """Learn BPE merges on ``words`` (each counted once) until every word is a single symbol.

    Symbols follow CLIP's convention: a word is split into characters and its last character
    carries the ``</w>`` end-of-word suffix. Ties in pair frequency break lexicographically, so the
    result is deterministic.
    """
    corpus = [list(w[:-1]) + [w[-1] + "</w>"] for w in words]
    merges: list[tuple[str, str]] = []
    while any(len(w) > 1 for w in corpus):
        pairs: Counter[tuple[str, str]] = Counter()
        for w in corpus:
            pairs.update(zip(w, w[1:]))
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        joined = best[0] + best[1]
        for k, w in enumerate(corpus):
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(joined)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            corpus[k] = out
    return merges


def write_tokenizer(folder: Path) -> dict[str, int]:
    """Write a CLIP BPE tokenizer (vocab.json, merges.txt, configs) and return its vocabulary."""
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars]
    merges = train_bpe(WORDS)
    for a, b in merges:
        if a + b not in tokens:
            tokens.append(a + b)
    tokens += [BOS, EOS]
    vocab = {t: i for i, t in enumerate(tokens)}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=0) + "\n", encoding="utf-8")
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
    )
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "CLIPTokenizer",
                "model_max_length": MAX_LENGTH,
                "do_lower_case": True,
                "errors": "replace",
                "add_prefix_space": False,
                "clean_up_tokenization_spaces": True,
                **special,
            },
            indent=2,
        )
        + "\n"
    )
    return vocab


# ----------------------------------------------------------------------------------- models
def make_unet() -> UNet2DConditionModel:
    """The denoiser: SD 1.x's architecture shrunk to two levels (32, 64 channels), latents 4x8x8."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=HIDDEN,
        attention_head_dim=8,
        norm_num_groups=16,
    )


def make_vae() -> AutoencoderKL:
    """An SD-style VAE (four levels, so 8x downsampling) with 8-16 channels: 64x64 RGB <-> 4x8x8."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=IMAGE_SIZE,
        scaling_factor=0.18215,
    )


def make_text_encoder(vocab: dict[str, int]) -> CLIPTextModel:
    """A 2-layer CLIP text transformer of width 32 over ``vocab`` (77 positions, as SD's)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH,
        hidden_act="quick_gelu",
        projection_dim=HIDDEN,
        bos_token_id=vocab[BOS],
        eos_token_id=vocab[EOS],
        pad_token_id=vocab[EOS],
    )
    return CLIPTextModel(config)


@torch.no_grad()
def calibrate_vae_decoder(vae: AutoencoderKL, generator: torch.Generator, target_std: float = 0.5) -> None:
    """Rescale the decoder's last conv so that decoding unit-variance latents (as the sampler ends
    with) gives images of pixel std about ``target_std`` in ``[-1, 1]``: random init otherwise
    decodes to nearly flat grey, and image rewards would see no differences."""
    z = torch.randn(8, 4, LATENT_SIZE, LATENT_SIZE, generator=generator) / vae.config.scaling_factor
    x = vae.decode(z).sample
    scale = target_std / x.std().clamp_min(1e-8)
    vae.decoder.conv_out.weight.mul_(scale)
    vae.decoder.conv_out.bias.zero_()


def main(argv: list[str] | None = None) -> Path:
    """Build the pipeline, write it to ``--out`` (via a temporary folder) and return the path."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(REPO_ROOT / "assets" / "tiny-sd"), help="output folder (replaced)")
    parser.add_argument("--seed", type=int, default=0, help="seed for all weights")
    args = parser.parse_args(argv)

    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    out = Path(args.out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)

    vocab = write_tokenizer(tmp / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(tmp / "tokenizer")
    for w in WORDS:  # every listed word is one token
        ids = tokenizer(w, add_special_tokens=False).input_ids
        assert len(ids) == 1, f"{w!r} tokenizes to {tokenizer.convert_ids_to_tokens(ids)}"

    torch.manual_seed(args.seed)
    unet = make_unet()
    vae = make_vae()
    text_encoder = make_text_encoder(vocab)
    calibrate_vae_decoder(vae, torch.Generator().manual_seed(args.seed + 1))
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(tmp, safe_serialization=True)
    # save_pretrained rewrote the tokenizer folder in its own format; put back the CLIP BPE files
    shutil.rmtree(tmp / "tokenizer")
    write_tokenizer(tmp / "tokenizer")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)

    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote {out} ({size / 1e6:.2f} MB, vocab {len(vocab)}, {len(WORDS)} whole words)")
    return out


if __name__ == "__main__":
    main()
