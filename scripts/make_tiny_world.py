#!/usr/bin/env python
"""Make the tiny pretrained image world in ``assets/``: captioned shapes, a text-to-image
diffusion model trained on them, its consistency-distilled LCM twin, and a tiny CLIP.

Everything runs on the CPU, seeded: 24 minutes on an idle 2-core machine with torch's default
threads (VAE 5, SD 9, LCM 7, CLIP 2 minutes). The shipped assets were made with ``--threads 1``
(53 minutes, with other jobs sharing the machine; the stage times are in ``world.json``); a second
``--threads 1`` run reproduced them bit for bit. Other thread counts round differently and train
slightly different models of the same quality::

    python scripts/make_tiny_world.py [--out assets] [--docs docs] [--work runs/tiny-world] [--seed 0]

1. **Data.** 64x64 images drawn procedurally: one coloured shape on a light background,
   captioned ``"a red circle on the left"`` (5 colours x 4 shapes x 5 positions = 100 captions).
   20 captions (those with ``(colour + shape + position) % 5 == 0``) are **held out**: no model
   sees them in training; they measure how the models compose words they know.
2. **VAE** (``AutoencoderKL``, SD's 8x downsampling: 64x64 RGB <-> 4x8x8), trained on random
   crops, then on whole images; ``scaling_factor`` set to 1/std of the latents, as SD did.
3. **Diffusion model** (``UNet2DConditionModel``, SD-1.x block types) and its 2-layer CLIP text
   encoder, trained jointly on SD's ``scaled_linear`` schedule with SD 2.x's v-prediction (see
   ``PREDICTION``), caption dropout 10% for classifier-free guidance, EMA weights. Saved as a
   ``StableDiffusionPipeline`` folder: ``assets/tiny-sd``.
4. **LCM twin**: latent consistency distillation (Luo et al. 2023, Algorithm 1, as diffusers'
   ``train_lcm_distill_sd_wds.py``): a student UNet with ``time_cond_proj_dim=256`` (the guidance
   embedding of ``w``) starts from the teacher, a 50-step DDIM solver on the guided teacher gives
   the target, an EMA copy of the student evaluates it, Huber loss. Saved as a
   ``LatentConsistencyModelPipeline`` folder with an ``LCMScheduler``, the layout of
   ``SimianLuo/LCM_Dreamshaper_v7``: ``assets/tiny-lcm``.
5. **Tiny CLIP**: an open_clip ViT/text-transformer pair trained contrastively (symmetric
   InfoNCE over batches of distinct captions) on the same training images. Saved in open_clip's
   ``local-dir`` format (``open_clip_config.json``, ``open_clip_model.safetensors`` and the
   tokenizer files): ``assets/tiny-clip``, loaded by
   ``open_clip.create_model_and_transforms("local-dir:assets/tiny-clip")``.
6. **Evaluation**: the tiny CLIP's zero-shot accuracy (pick the caption among all 100) on fresh
   images of training and of held-out captions; how often SD (DDIM, 20 steps) and LCM (2 and 4
   steps) samples show the asked colour, shape and position, judged by the tiny CLIP per
   attribute and, for colour and position, by pixel statistics; a sample grid for the docs.

7. **Flow model** (``--flow-only`` runs this stage alone, from the VAE and text encoder in
   ``<out>/tiny-sd``): an SD3-layout MMDiT (``SD3Transformer2DModel``) trained with SD3's
   rectified-flow objective on the same images, the tiny SD's text encoder as both CLIP encoders
   (no T5), saved as a ``StableDiffusion3Pipeline`` folder: ``assets/tiny-flow`` (13 minutes with
   ``--threads 1`` on a shared 2-core machine), evaluated with the plain pipeline, the tiny CLIP and
   the ``shape_match`` detector.

The tokenizer is a real byte-level CLIP BPE whose merges are learned here on a fixed word list, so
each listed word is one token. Stages are cached in ``--work`` (delete it to start over); weights
are written as safetensors. With the same ``--threads`` the outputs are identical run to run.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parent.parent

# ----------------------------------------------------------------------------------- the world
IMAGE_SIZE = 64
"""Pixel height and width of the images."""
LATENT_SIZE = 8
"""Latent height and width (the VAE downsamples by 8, as SD's does)."""
MAX_LENGTH = 77
"""Tokenizer ``model_max_length`` and text-encoder positions, as in SD 1.x."""
HIDDEN = 32
"""Text-encoder width = UNet ``cross_attention_dim``."""
GUIDANCE_EMBED_DIM = 256
"""``time_cond_proj_dim`` of the LCM UNet (as LCM_Dreamshaper_v7)."""
LCM_GUIDANCE = 4.0
"""The guidance scale the tiny LCM is evaluated (and, in the tiny configs, sampled) with: of 2, 4,
6, 8 and 12 it gives the samples that match their captions most often at 4 steps."""
PREDICTION = "v_prediction"
"""What the UNets predict. With SD 1.x's ε-prediction the tiny UNet learned colour and shape but
never the position words: the ε loss hardly weighs the high-noise steps where the layout is set
(SNR ≈ 0.005 at t = 999), so the model placed shapes wherever the initial noise suggested. The
v-prediction of SD 2.x weighs them like x0-prediction and the positions are learned."""

COLOURS = {"red": (215, 40, 40), "green": (40, 160, 60), "blue": (45, 85, 220), "yellow": (235, 195, 30),
           "purple": (135, 55, 185)}
SHAPES = ("circle", "square", "triangle", "star")
POSITIONS = {"left": (17, 32), "right": (47, 32), "top": (32, 17), "bottom": (32, 47), "center": (32, 32)}
PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
           "center": "in the center"}


def caption(colour: str, shape: str, position: str) -> str:
    return f"a {colour} {shape} {PHRASES[position]}"


COMBOS = [(c, s, p) for c in COLOURS for s in SHAPES for p in POSITIONS]
HELDOUT = [(c, s, p) for (c, s, p) in COMBOS
           if (list(COLOURS).index(c) + SHAPES.index(s) + list(POSITIONS).index(p)) % 5 == 0]
TRAIN = [x for x in COMBOS if x not in HELDOUT]
ALL_CAPTIONS = [caption(*x) for x in COMBOS]

ANIMALS = (
    "cat dog horse monkey rabbit zebra spider bird sheep deer cow goat lion tiger bear raccoon fox "
    "wolf lizard beetle ant butterfly fish shark whale dolphin squirrel mouse rat snake turtle frog "
    "chicken duck goose bee pig turkey fly llama camel bat gorilla hedgehog kangaroo"
).split()
WORD_COLOURS = "red green blue yellow orange purple pink black white brown gray grey".split()
WORD_SHAPES = "circle square triangle star rectangle ellipse ring cross heart diamond hexagon".split()
OTHER = (
    "a an the of photo picture image drawing painting on in with and at is small large big "
    "tiny huge bright dark background left right top bottom center washing dishes riding bike "
    "playing chess two three"
).split()
WORDS: tuple[str, ...] = tuple(dict.fromkeys(ANIMALS + WORD_COLOURS + WORD_SHAPES + OTHER))
"""Words that the tokenizer keeps whole (one token each)."""
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _shape_points(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if shape == "square":
        r = r * 0.85
        pts = [(-r, -r), (r, -r), (r, r), (-r, r)]
    elif shape == "triangle":
        r = r * 1.15
        pts = [(r * math.cos(a), r * math.sin(a) + 0.2 * r) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    elif shape == "star":
        r = r * 1.1
        pts = [((r if k % 2 == 0 else 0.5 * r) * math.cos(-math.pi / 2 + k * math.pi / 5),
                (r if k % 2 == 0 else 0.5 * r) * math.sin(-math.pi / 2 + k * math.pi / 5)) for k in range(10)]
    else:
        raise ValueError(shape)
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts]


def draw(colour: str, shape: str, position: str, rng: np.random.Generator) -> np.ndarray:
    """One ``[64, 64, 3]`` uint8 image: a shape of radius 10-14 px, jittered by up to 3 px around
    its position, colour jittered by up to 18/255 per channel, on a light, slightly tinted
    background; drawn at 4x and box-downsampled (anti-aliased edges)."""
    from PIL import Image, ImageDraw

    ss = 4
    bg = int(rng.integers(205, 250))
    bgc = tuple(int(np.clip(bg + t, 0, 255)) for t in rng.integers(-8, 9, size=3))
    img = Image.new("RGB", (IMAGE_SIZE * ss, IMAGE_SIZE * ss), bgc)
    d = ImageDraw.Draw(img)
    col = tuple(int(v) for v in np.clip(np.array(COLOURS[colour]) + rng.integers(-18, 19, size=3), 0, 255))
    px, py = POSITIONS[position]
    cx, cy = (px + rng.uniform(-3, 3)) * ss, (py + rng.uniform(-3, 3)) * ss
    r = rng.uniform(10, 14) * ss
    angle = rng.uniform(-0.25, 0.25)
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=col)
    else:
        d.polygon(_shape_points(shape, cx, cy, r, angle), fill=col)
    return np.asarray(img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BOX))


def make_images(combos: list[tuple[str, str, str]], per_combo: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images uint8 [N, 3, 64, 64], labels long [N] indexing combos)``, ``per_combo`` each."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(combos)), per_combo)
    rng.shuffle(labels)
    images = np.stack([draw(*combos[i], rng) for i in labels])
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels).long()


def to_model(images_u8: torch.Tensor) -> torch.Tensor:
    """uint8 ``[B, 3, H, W]`` → float in ``[-1, 1]``."""
    return images_u8.float() / 127.5 - 1


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
    """Learn BPE merges on ``words`` (each counted once) until every word is a single symbol
    (CLIP's convention: the last character carries ``</w>``; ties break lexicographically)."""
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


def write_tokenizer(folder: Path, max_length: int = MAX_LENGTH) -> dict[str, int]:
    """Write a CLIP BPE tokenizer (vocab.json, merges.txt, configs); returns its vocabulary. The
    end-of-text token has the largest id (CLIP's argmax pooling finds it)."""
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
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": max_length, "do_lower_case": True,
        "errors": "replace", "add_prefix_space": False, "clean_up_tokenization_spaces": True, **special,
    }, indent=2) + "\n")
    return vocab


# ----------------------------------------------------------------------------------- models
def make_vae():
    """An SD-style VAE (four levels: 8x downsampling) with 16-64 channels: 64x64 RGB <-> 4x8x8."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(16, 32, 64, 64), layers_per_block=1,
        latent_channels=4, norm_num_groups=8, sample_size=IMAGE_SIZE, scaling_factor=1.0,
    )


def make_unet(time_cond_proj_dim: int | None = None):
    """The denoiser: SD 1.x's block types shrunk to two levels (32, 64 channels), latents 4x8x8."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=LATENT_SIZE, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=HIDDEN, attention_head_dim=8,
        norm_num_groups=16, time_cond_proj_dim=time_cond_proj_dim,
    )


def make_text_encoder(vocab: dict[str, int]):
    """A 2-layer CLIP text transformer of width 32 over ``vocab`` (77 positions, as SD's)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH, hidden_act="quick_gelu", projection_dim=HIDDEN,
        bos_token_id=vocab[BOS], eos_token_id=vocab[EOS], pad_token_id=vocab[EOS],
    ))


def ddpm_schedule():
    """SD's training schedule (``scaled_linear`` betas 0.00085..0.012, 1000 steps)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False, prediction_type=PREDICTION)


def x0_and_eps(out: torch.Tensor, x: torch.Tensor, alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x̂0, ε̂)`` from a UNet output at ``x`` with ``ᾱ`` (``[B, 1, 1, 1]``), for ``PREDICTION``."""
    if PREDICTION == "v_prediction":
        return alpha.sqrt() * x - (1 - alpha).sqrt() * out, alpha.sqrt() * out + (1 - alpha).sqrt() * x
    return (x - (1 - alpha).sqrt() * out) / alpha.sqrt(), out


def training_target(z0: torch.Tensor, eps: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """What the UNet regresses: ``ε``, or ``v = √ᾱ·ε − √(1−ᾱ)·x0``."""
    return alpha.sqrt() * eps - (1 - alpha).sqrt() * z0 if PREDICTION == "v_prediction" else eps


def tiny_clip_config(vocab_size: int) -> dict:
    """open_clip ``local-dir`` config of the tiny CLIP (ViT 64 px, patch 8; 2-layer text tower)."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    return {
        "model_cfg": {
            "embed_dim": 64,
            "vision_cfg": {"image_size": IMAGE_SIZE, "patch_size": 8, "width": 96, "layers": 4, "head_width": 32,
                           "mlp_ratio": 2.0},
            "text_cfg": {"context_length": 16, "vocab_size": vocab_size, "width": 64, "heads": 4, "layers": 2,
                         "mlp_ratio": 2.0, "hf_tokenizer_name": "tiny-clip"},
        },
        "preprocess_cfg": {"size": IMAGE_SIZE, "mean": list(OPENAI_DATASET_MEAN), "std": list(OPENAI_DATASET_STD),
                           "interpolation": "bicubic", "resize_mode": "shortest"},
    }


# ----------------------------------------------------------------------------------- helpers
class Log:
    """Prints and keeps lines for ``training_log.txt``."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.t0 = time.perf_counter()

    def __call__(self, msg: str) -> None:
        line = f"[{time.perf_counter() - self.t0:7.1f}s] {msg}"
        print(line, flush=True)
        self.lines.append(line)


class EMA:
    """Exponential moving average of a module's parameters (with a warm-up of the decay)."""

    def __init__(self, module: torch.nn.Module, decay: float) -> None:
        self.module = copy.deepcopy(module).requires_grad_(False).eval()
        self.decay, self.steps = decay, 0

    @torch.no_grad()
    def update(self, module: torch.nn.Module, warmup: bool = True) -> None:
        self.steps += 1
        d = min(self.decay, (1 + self.steps) / (10 + self.steps)) if warmup else self.decay
        for e, p in zip(self.module.parameters(), module.parameters()):
            e.lerp_(p.detach(), 1 - d)


def cosine_lr(opt: torch.optim.Optimizer, steps: int, warmup: int = 50) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: min(1.0, (k + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, k / steps)))))


def encode_text(tokenizer, text_encoder, texts: list[str]) -> torch.Tensor:
    ids = tokenizer(texts, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt").input_ids
    return text_encoder(ids)[0]


# ----------------------------------------------------------------------------------- stages
def train_vae(data: torch.Tensor, labels: torch.Tensor, steps: int, full_steps: int, log: Log, seed: int):
    """VAE on 32x32 crops (4x cheaper; three in four around the shape, the rest anywhere), then
    on whole images; L1 + L2 + 1e-6 KL."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    vae = make_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    total = steps + full_steps
    sched = cosine_lr(opt, total)
    centres = torch.tensor([POSITIONS[c[2]] for c in TRAIN])  # (x, y) of each training caption's position
    for k in range(total):
        crop = k < steps
        idx = torch.randint(0, len(data), (32 if crop else 16,), generator=g)
        x = to_model(data[idx])
        if crop:
            anywhere = torch.randint(0, IMAGE_SIZE - 32 + 1, (len(idx), 2), generator=g)
            near = (centres[labels[idx]] - 16 + torch.randint(-6, 7, (len(idx), 2), generator=g)).clamp(0, IMAGE_SIZE - 32)
            off = torch.where(torch.rand(len(idx), 1, generator=g) < 0.75, near, anywhere)
            x = torch.stack([xi[:, oy : oy + 32, ox : ox + 32] for xi, (ox, oy) in zip(x, off.tolist())])
        if torch.rand((), generator=g) < 0.5:
            x = x.flip(-1)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=g)).sample
        kl = post.kl().mean() / x[0].numel()
        loss = (rec - x).abs().mean() + (rec - x).pow(2).mean() + 1e-6 * kl
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        if k % 200 == 0 or k == total - 1:
            log(f"vae step {k}/{total} ({'crops' if crop else 'full'}) loss {loss.item():.4f}")
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def encode_latents(vae, data: torch.Tensor, batch: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    means, stds = [], []
    for s in range(0, len(data), batch):
        post = vae.encode(to_model(data[s : s + batch])).latent_dist
        means.append(post.mean)
        stds.append(post.std)
    return torch.cat(means), torch.cat(stds)


def train_sd(latents: torch.Tensor, latent_std: torch.Tensor, labels: torch.Tensor, tokenizer, vocab, steps: int,
             log: Log, seed: int):
    """UNet + text encoder, jointly (``PREDICTION`` target); 10% empty captions; EMA (0.999) of both."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    unet, text_encoder = make_unet(), make_text_encoder(vocab)
    sched = ddpm_schedule()
    ac = sched.alphas_cumprod
    captions = [caption(*c) for c in TRAIN] + [""]
    ids = tokenizer(captions, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt").input_ids
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=5e-4, weight_decay=1e-4)
    lr = cosine_lr(opt, steps, warmup=100)
    ema_unet, ema_text = EMA(unet, 0.999), EMA(text_encoder, 0.999)
    b = 64
    for k in range(steps):
        idx = torch.randint(0, len(latents), (b,), generator=g)
        z0 = latents[idx] + latent_std[idx] * torch.randn(latents[idx].shape, generator=g)
        cap = labels[idx].clone()
        cap[torch.rand(b, generator=g) < 0.1] = len(captions) - 1
        emb = text_encoder(ids[cap])[0]
        t = torch.randint(0, 1000, (b,), generator=g)
        eps = torch.randn(z0.shape, generator=g)
        a = ac[t].view(b, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * eps
        loss = F.mse_loss(unet(zt, t, encoder_hidden_states=emb).sample, training_target(z0, eps, a))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        lr.step()
        ema_unet.update(unet)
        ema_text.update(text_encoder)
        if k % 250 == 0 or k == steps - 1:
            log(f"sd step {k}/{steps} loss {loss.item():.4f}")
    return ema_unet.module, ema_text.module


def distill_lcm(teacher, text_encoder, tokenizer, latents, latent_std, labels, steps: int, log: Log, seed: int,
                w_min: float = 2.0, w_max: float = 9.0):
    """Latent consistency distillation of ``teacher`` with a 50-step DDIM solver (skip 20)."""
    from polyrl.plugins.lcm.lcm import boundary_scalings, guidance_embedding

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    teacher = teacher.eval().requires_grad_(False)
    student = make_unet(time_cond_proj_dim=GUIDANCE_EMBED_DIM)
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    assert not unexpected and set(missing) == {"time_embedding.cond_proj.weight"}, (missing, unexpected)
    with torch.no_grad():
        student.time_embedding.cond_proj.weight.zero_()  # starts as the teacher
    target = EMA(student, 0.95)
    ac = ddpm_schedule().alphas_cumprod
    n_solver, skip = 50, 1000 // 50
    solver_t = torch.arange(1, n_solver + 1) * skip - 1  # 19, 39, ..., 999
    prev_ac = torch.cat([ac[:1], ac[solver_t[:-1]]])  # ᾱ of the solver's next (smaller) timestep
    captions = [caption(*c) for c in TRAIN]
    with torch.no_grad():
        cond_all = encode_text(tokenizer, text_encoder, captions)
        uncond = encode_text(tokenizer, text_encoder, [""])
    opt = torch.optim.AdamW(student.parameters(), lr=2e-4, weight_decay=0.0)
    lr = cosine_lr(opt, steps, warmup=50)
    b, huber_c = 64, 0.001

    for k in range(steps):
        idx = torch.randint(0, len(latents), (b,), generator=g)
        z0 = latents[idx] + latent_std[idx] * torch.randn(latents[idx].shape, generator=g)
        emb = cond_all[labels[idx]]
        index = torch.randint(0, n_solver, (b,), generator=g)
        t_start = solver_t[index]
        t_end = (t_start - skip).clamp(min=0)
        noise = torch.randn(z0.shape, generator=g)
        a = ac[t_start].view(b, 1, 1, 1)
        x = a.sqrt() * z0 + (1 - a).sqrt() * noise
        w = w_min + (w_max - w_min) * torch.rand(b, generator=g)
        w_emb = guidance_embedding(w, GUIDANCE_EMBED_DIM)
        cs_s, co_s = (v.view(b, 1, 1, 1) for v in boundary_scalings(t_start))
        cs_e, co_e = (v.view(b, 1, 1, 1) for v in boundary_scalings(t_end))
        a_end = ac[t_end].view(b, 1, 1, 1)
        student_x0, _ = x0_and_eps(student(x, t_start, encoder_hidden_states=emb, timestep_cond=w_emb).sample, x, a)
        pred = cs_s * x + co_s * student_x0
        with torch.no_grad():
            out = teacher(torch.cat([x, x]), torch.cat([t_start, t_start]),
                          encoder_hidden_states=torch.cat([emb, uncond.expand(b, -1, -1)])).sample
            (c_x0, c_eps), (u_x0, u_eps) = (x0_and_eps(o, x, a) for o in out.chunk(2))
            wv = w.view(b, 1, 1, 1)
            x0, eps = c_x0 + wv * (c_x0 - u_x0), c_eps + wv * (c_eps - u_eps)  # guided teacher, LCM's CFG form
            ap = prev_ac[index].view(b, 1, 1, 1)
            x_prev = ap.sqrt() * x0 + (1 - ap).sqrt() * eps  # one DDIM step of the guided teacher
            tgt_x0, _ = x0_and_eps(target.module(x_prev, t_end, encoder_hidden_states=emb, timestep_cond=w_emb).sample,
                                   x_prev, a_end)
            tgt = cs_e * x_prev + co_e * tgt_x0
        loss = (((pred - tgt) ** 2 + huber_c**2).sqrt() - huber_c).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        lr.step()
        target.update(student, warmup=False)
        if k % 250 == 0 or k == steps - 1:
            log(f"lcm step {k}/{steps} loss {loss.item():.5f}")
    return target.module


def train_clip(data: torch.Tensor, labels: torch.Tensor, tokenizer_dir: Path, vocab_size: int, steps: int, log: Log,
               seed: int):
    """Tiny open_clip model, symmetric InfoNCE over batches of distinct training captions."""
    import open_clip

    from polyrl.rewards.clip_score import preprocess_images

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    cfg = tiny_clip_config(vocab_size)
    model = open_clip.CLIP(**cfg["model_cfg"])
    tok = open_clip.tokenizer.HFTokenizer(str(tokenizer_dir), context_length=cfg["model_cfg"]["text_cfg"]["context_length"])
    text_ids = tok([caption(*c) for c in TRAIN])
    mean, std = cfg["preprocess_cfg"]["mean"], cfg["preprocess_cfg"]["std"]
    by_label = [torch.nonzero(labels == i).flatten() for i in range(len(TRAIN))]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    lr = cosine_lr(opt, steps, warmup=100)
    b = 64
    for k in range(steps):
        caps = torch.randperm(len(TRAIN), generator=g)[:b]
        idx = torch.stack([by_label[c][torch.randint(0, len(by_label[c]), (), generator=g)] for c in caps.tolist()])
        x = data[idx].float() / 255
        x = preprocess_images(x, IMAGE_SIZE, mean, std)
        img, txt, scale = model(x, text_ids[caps])
        logits = scale * img @ txt.T
        target = torch.arange(b)
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        lr.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if k % 250 == 0 or k == steps - 1:
            log(f"clip step {k}/{steps} loss {loss.item():.4f} logit scale {scale.item():.1f}")
    return model.eval().requires_grad_(False), cfg


# ----------------------------------------------------------------------------------- saving
def save_sd(folder: Path, vae, unet, text_encoder, tokenizer_src: Path) -> None:
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                              prediction_type=PREDICTION)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=CLIPTokenizer.from_pretrained(tokenizer_src),
                                   unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   image_encoder=None, requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    _copy_tokenizer(tokenizer_src, folder / "tokenizer")


def save_lcm(folder: Path, vae, unet, text_encoder, tokenizer_src: Path) -> None:
    from diffusers import LatentConsistencyModelPipeline, LCMScheduler
    from transformers import CLIPTokenizer

    scheduler = LCMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                             beta_schedule="scaled_linear", original_inference_steps=50, clip_sample=False,
                             set_alpha_to_one=True, steps_offset=1, prediction_type=PREDICTION, timestep_scaling=10.0)
    pipe = LatentConsistencyModelPipeline(vae=vae, text_encoder=text_encoder,
                                          tokenizer=CLIPTokenizer.from_pretrained(tokenizer_src), unet=unet,
                                          scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                          image_encoder=None, requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    _copy_tokenizer(tokenizer_src, folder / "tokenizer")


def _copy_tokenizer(src: Path, dst: Path) -> None:
    """save_pretrained rewrites tokenizer folders in its own format; keep the plain CLIP BPE files."""
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)


def save_clip(folder: Path, model, cfg: dict, tokenizer_src: Path) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    for f in tokenizer_src.iterdir():
        shutil.copy(f, folder / f.name)
    cfg_path = folder / "tokenizer_config.json"
    tc = json.loads(cfg_path.read_text())
    tc["model_max_length"] = cfg["model_cfg"]["text_cfg"]["context_length"]
    cfg_path.write_text(json.dumps(tc, indent=2) + "\n")


# ----------------------------------------------------------------------------------- evaluation
ATTRIBUTES = {"colour": list(COLOURS), "shape": list(SHAPES), "position": list(POSITIONS)}


@torch.no_grad()
def clip_predict(clip_dir: Path, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """The tiny CLIP's zero-shot predictions for images ``[B, 3, H, W]`` in [0, 1]: the index of
    the best of all 100 captions (``caption``), and per attribute the best value, scored by
    the mean similarity of the captions that have it (``colour``, ``shape``, ``position``)."""
    from polyrl.rewards.clip_score import load_open_clip

    model, tok, pre = load_open_clip(f"local-dir:{clip_dir}")
    img = F.normalize(model.encode_image(pre(images)), dim=-1)
    txt = F.normalize(model.encode_text(tok(ALL_CAPTIONS)), dim=-1)
    sim = img @ txt.T  # [B, 100]
    out = {"caption": sim.argmax(1)}
    for a, values in ATTRIBUTES.items():
        k = list(ATTRIBUTES).index(a)
        scores = torch.stack([sim[:, [i for i, c in enumerate(COMBOS) if c[k] == v]].mean(1) for v in values], 1)
        out[a] = scores.argmax(1)
    return out


def pixel_attributes(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(colour index, position index)`` of each image ``[B, 3, H, W]`` in [0, 1] from its
    pixels: the foreground is where the colour differs from the border's median by more than
    0.25; its mean colour is matched to the nearest of the five colours, its centroid to the
    nearest of the five positions (-1 where no foreground is found)."""
    b = images.shape[0]
    border = torch.cat([images[:, :, :2].flatten(2), images[:, :, -2:].flatten(2), images[:, :, :, :2].flatten(2),
                        images[:, :, :, -2:].flatten(2)], 2)
    bg = border.median(dim=2).values.view(b, 3, 1, 1)
    fg = (images - bg).abs().amax(1) > 0.25  # [B, H, W]
    palette = torch.tensor(list(COLOURS.values()), dtype=torch.float32) / 255
    centres = torch.tensor(list(POSITIONS.values()), dtype=torch.float32) * images.shape[-1] / IMAGE_SIZE
    ys, xs = torch.meshgrid(torch.arange(images.shape[-2]).float(), torch.arange(images.shape[-1]).float(), indexing="ij")
    colour, position = torch.full((b,), -1), torch.full((b,), -1)
    for i in range(b):
        m = fg[i]
        if m.sum() < 8:
            continue
        mean = images[i][:, m].mean(1)
        colour[i] = (palette - mean).norm(dim=1).argmin()
        c = torch.stack([xs[m].mean(), ys[m].mean()])
        position[i] = (centres - c).norm(dim=1).argmin()
    return colour, position


@torch.no_grad()
def sample_images(folder: Path, kind: str, prompts: list[str], steps: int, guidance: float, seed: int) -> torch.Tensor:
    """Samples ``[B, 3, 64, 64]`` in [0, 1] from the saved pipeline, through the polyrl plugins."""
    from polyrl import Context

    ctx = [Context(prompt=p, group=i) for i, p in enumerate(prompts)]
    g = torch.Generator().manual_seed(seed)
    if kind == "sd":
        from polyrl.plugins.diffusion import DDIMSampler, DDIMSamplerConfig, DiffusionPolicy, DiffusionPolicyConfig

        policy = DiffusionPolicy(DiffusionPolicyConfig(pretrained=str(folder)))
        sampler = DDIMSampler(DDIMSamplerConfig(num_steps=steps, eta=1.0, guidance_scale=guidance, batch_size=64))
    else:
        from polyrl.plugins.lcm import LCMPolicy, LCMPolicyConfig, LCMSampler, LCMSamplerConfig

        policy = LCMPolicy(LCMPolicyConfig(pretrained=str(folder)))
        sampler = LCMSampler(LCMSamplerConfig(num_steps=steps, guidance_scale=guidance, batch_size=64))
    return sampler.sample(policy.eval(), ctx, g).outputs["images"]


def attribute_accuracy(images: torch.Tensor, combos: list[tuple[str, str, str]], clip_dir: Path) -> dict[str, float]:
    pred = clip_predict(clip_dir, images)
    truth = {a: torch.tensor([vals.index(c[k]) for c in combos]) for k, (a, vals) in enumerate(ATTRIBUTES.items())}
    out = {f"clip_{a}": (pred[a] == truth[a]).float().mean().item() for a in ATTRIBUTES}
    out["clip_all_three"] = torch.stack([pred[a] == truth[a] for a in ATTRIBUTES]).all(0).float().mean().item()
    colour, position = pixel_attributes(images)
    out["pixel_colour"] = (colour == truth["colour"]).float().mean().item()
    out["pixel_position"] = (position == truth["position"]).float().mean().item()
    return out


def evaluate(out: Path, docs: Path | None, log: Log, seed: int, n_per: int) -> dict:
    from torchvision.utils import save_image

    clip_dir = out / "tiny-clip"
    metrics: dict = {}
    # zero-shot accuracy of the tiny CLIP on fresh images (a seed never used in training)
    for split, combos in (("train_captions", TRAIN), ("heldout_captions", HELDOUT)):
        imgs, lab = make_images(combos, n_per, seed + 1000 + len(combos))
        x = imgs.float() / 255
        pred = clip_predict(clip_dir, x)
        truth = torch.tensor([ALL_CAPTIONS.index(caption(*combos[i])) for i in lab])
        acc = (pred["caption"] == truth).float().mean().item()
        per = attribute_accuracy(x, [combos[i] for i in lab], clip_dir)
        metrics[f"clip_zero_shot/{split}"] = {"top1_of_100": acc, **{k: v for k, v in per.items() if k.startswith("clip_")}}
        log(f"tiny CLIP zero-shot on {split} ({len(lab)} images): top-1 of 100 captions {acc:.3f}; "
            + ", ".join(f"{k} {v:.3f}" for k, v in per.items() if k.startswith("clip_")))
    # samples: do they show the asked colour / shape / position?
    runs = [("sd", "tiny-sd", 20, 5.0), ("lcm", "tiny-lcm", 4, LCM_GUIDANCE), ("lcm", "tiny-lcm", 2, LCM_GUIDANCE)]
    for split, combos in (("train_captions", TRAIN), ("heldout_captions", HELDOUT)):
        reps = max(1, 200 // len(combos))
        asked = [c for c in combos for _ in range(reps)]
        for kind, name, steps, gs in runs:
            imgs = sample_images(out / name, kind, [caption(*c) for c in asked], steps, gs, seed + 7)
            acc = attribute_accuracy(imgs, asked, clip_dir)
            metrics[f"samples/{name}/{steps}_steps/{split}"] = acc
            log(f"{name} {steps} steps, guidance {gs}, {split} ({len(asked)} samples): "
                + ", ".join(f"{k} {v:.3f}" for k, v in acc.items()))
    if docs is not None:  # the grid: one row per model, the same 10 prompts and seeds
        docs.mkdir(parents=True, exist_ok=True)
        picks = [TRAIN[i] for i in (0, 9, 18, 27, 36, 45, 54, 63, 72, 79)]
        prompts = [caption(*c) for c in picks]
        rows = [make_images(picks, 1, seed + 5)[0][torch.argsort(make_images(picks, 1, seed + 5)[1])].float() / 255]
        for kind, name, steps, gs in runs:
            rows.append(sample_images(out / name, kind, prompts, steps, gs, seed + 11))
        save_image(torch.cat(rows), docs / "tiny_world_samples.png", nrow=len(prompts), padding=2, pad_value=1.0)
        (docs / "tiny_world_samples.txt").write_text(
            "rows: training data, tiny-sd (DDIM 20 steps, guidance 5), "
            f"tiny-lcm (4 steps, guidance {LCM_GUIDANCE:g}), tiny-lcm (2 steps, guidance {LCM_GUIDANCE:g})\ncolumns: " + " | ".join(prompts) + "\n")
        log(f"wrote {docs / 'tiny_world_samples.png'}")
    return metrics


# ----------------------------------------------------------------------------------- the flow model
FLOW_SHIFT = 3.0
"""Timestep shift of the tiny flow model's ``FlowMatchEulerDiscreteScheduler`` (SD3's value):
sampling and training sigmas are ``shift·σ / (1 + (shift − 1)·σ)``."""
FLOW_CLIP_TOKENS = 16
"""``model_max_length`` of the tiny flow model's CLIP tokenizers: the longest caption is 8 tokens,
and CLIP's causal attention makes the first 16 states of a 77-token pass identical to a 16-token
pass. Short contexts make the transformer 10x cheaper on a CPU than SD3's 77 + 256 tokens."""
FLOW_T5_TOKENS = 0
"""Length of the (absent) T5 part of the SD3 prompt embeddings: ``StableDiffusion3Pipeline`` fills
``max_sequence_length`` positions with zeros when ``text_encoder_3`` is ``None``. The tiny flow
model is trained without them: sample it with ``max_sequence_length=0`` (the ``flow`` policy does
so by itself for pipelines without T5)."""
FLOW_GUIDANCE = 4.5
"""The guidance scale the tiny flow model is also evaluated with (SD3.5-medium's default)."""


def make_flow_transformer():
    """An SD3-layout MMDiT (``SD3Transformer2DModel``): 4 joint blocks of width 64 (4 heads of 16),
    patch size 2 (SD3's) on the 4x8x8 latents, context width 64 (the two 32-wide CLIP encoders side by
    side), pooled width 64."""
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=LATENT_SIZE, patch_size=2, in_channels=4, out_channels=4, num_layers=4, attention_head_dim=16,
        num_attention_heads=4, joint_attention_dim=2 * HIDDEN, caption_projection_dim=64,
        pooled_projection_dim=2 * HIDDEN, pos_embed_max_size=LATENT_SIZE,
    )


def flow_text_encoder(text_encoder):
    """SD3's CLIP encoders are ``CLIPTextModelWithProjection``: the tiny SD's text encoder with an
    identity projection (the pooled embedding is its final end-of-text state)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(**{k: v for k, v in text_encoder.config.to_dict().items() if k in CLIPTextConfig().to_dict()})
    model = CLIPTextModelWithProjection(cfg)
    state = {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in text_encoder.state_dict().items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) == {"text_projection.weight"}, (missing, unexpected)
    with torch.no_grad():
        model.text_projection.weight.copy_(torch.eye(cfg.projection_dim, cfg.hidden_size))
    return model.eval().requires_grad_(False)


@torch.no_grad()
def flow_prompt_embeds(tokenizer, text_encoder, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(prompt_embeds [N, 16, 64], pooled [N, 64])`` exactly as ``StableDiffusion3Pipeline``
    builds them from two CLIP encoders (here the same weights twice) and no T5: penultimate hidden
    states side by side, then a T5 block of ``FLOW_T5_TOKENS`` zeros."""
    ids = tokenizer(texts, padding="max_length", max_length=FLOW_CLIP_TOKENS, truncation=True,
                    return_tensors="pt").input_ids
    out = text_encoder(ids, output_hidden_states=True)
    hidden, pooled = out.hidden_states[-2], out.text_embeds
    clip = torch.cat([hidden, hidden], -1)
    t5 = torch.zeros(len(texts), FLOW_T5_TOKENS, clip.shape[-1])
    return torch.cat([clip, t5], 1), torch.cat([pooled, pooled], -1)


def train_flow(latents: torch.Tensor, latent_std: torch.Tensor, labels: torch.Tensor, tokenizer, text_encoder,
               steps: int, log: Log, seed: int):
    """Rectified flow (SD3): ``x_σ = (1 − σ)·x0 + σ·ε``, the transformer regresses ``v = ε − x0`` at
    timestep ``1000·σ``; σ logit-normal (m 0, s 1), then shifted by ``FLOW_SHIFT``; 10% empty
    captions; frozen text encoders; EMA (0.999). ``latents`` are already ``(z − shift)·scale``."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = make_flow_transformer()
    captions = [caption(*c) for c in TRAIN] + [""]
    embeds, pooled = flow_prompt_embeds(tokenizer, text_encoder, captions)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=1e-4)
    lr = cosine_lr(opt, steps, warmup=100)
    ema = EMA(model, 0.999)
    b = 64
    for k in range(steps):
        idx = torch.randint(0, len(latents), (b,), generator=g)
        z0 = latents[idx] + latent_std[idx] * torch.randn(latents[idx].shape, generator=g)
        cap = labels[idx].clone()
        cap[torch.rand(b, generator=g) < 0.1] = len(captions) - 1
        sigma = torch.sigmoid(torch.randn(b, generator=g))
        sigma = FLOW_SHIFT * sigma / (1 + (FLOW_SHIFT - 1) * sigma)
        eps = torch.randn(z0.shape, generator=g)
        s = sigma.view(b, 1, 1, 1)
        zt = (1 - s) * z0 + s * eps
        out = model(hidden_states=zt, timestep=sigma * 1000, encoder_hidden_states=embeds[cap],
                    pooled_projections=pooled[cap]).sample
        loss = F.mse_loss(out, eps - z0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        lr.step()
        ema.update(model)
        if k % 250 == 0 or k == steps - 1:
            log(f"flow step {k}/{steps} loss {loss.item():.4f}")
    return ema.module


def save_flow(folder: Path, vae, transformer, text_encoder, tokenizer_src: Path) -> None:
    """A ``StableDiffusion3Pipeline`` folder: the transformer, the VAE (with SD3's ``shift_factor``),
    the two CLIP encoders and tokenizers, no T5 (``text_encoder_3``/``tokenizer_3`` null)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(tokenizer_src)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=FLOW_SHIFT),
        vae=vae, text_encoder=text_encoder, tokenizer=tok, text_encoder_2=copy.deepcopy(text_encoder),
        tokenizer_2=tok, text_encoder_3=None, tokenizer_3=None,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    for part in folder.glob("*/config.json"):  # no path of the machine that made the folder
        cfg = json.loads(part.read_text())
        if cfg.pop("_name_or_path", None) is not None:
            part.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    for name in ("tokenizer", "tokenizer_2"):
        _copy_tokenizer(tokenizer_src, folder / name)
        cfg_path = folder / name / "tokenizer_config.json"
        cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "model_max_length": FLOW_CLIP_TOKENS},
                                       indent=2) + "\n")


@torch.no_grad()
def sample_flow(folder: Path, prompts: list[str], steps: int, guidance: float, seed: int, batch: int = 50) -> torch.Tensor:
    """Samples ``[B, 3, 64, 64]`` in [0, 1] from the saved folder with the plain diffusers
    ``StableDiffusion3Pipeline`` (Euler ODE; no T5: ``text_encoder_3=None, tokenizer_3=None``)."""
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(seed)
    out = [pipe(prompts[s : s + batch], num_inference_steps=steps, guidance_scale=guidance, height=IMAGE_SIZE,
                width=IMAGE_SIZE, generator=g, output_type="pt", max_sequence_length=FLOW_T5_TOKENS).images for s in range(0, len(prompts), batch)]
    return torch.cat(out).float().clamp(0, 1)


def shape_match_accuracy(images: torch.Tensor, combos: list[tuple[str, str, str]]) -> dict[str, float]:
    """Per-attribute and all-three agreement of the pixel detector of ``shape_match``."""
    from polyrl.rewards.shape_match import detect

    found = [detect(x) for x in images]
    hits = torch.tensor([[f[a] == c[k] for k, a in enumerate(ATTRIBUTES)] for f, c in zip(found, combos)], dtype=torch.float32)
    out = {f"shape_match_{a}": hits[:, k].mean().item() for k, a in enumerate(ATTRIBUTES)}
    out["shape_match_all_three"] = hits.all(1).float().mean().item()
    out["shape_match_reward"] = hits.mean().item()
    return out


def evaluate_flow(out: Path, log: Log, seed: int, n_per: int, steps_list=(10,)) -> dict:
    """Held-out and training captions, 200 samples each, without guidance and with ``FLOW_GUIDANCE``:
    tiny-CLIP attribute accuracy (as for the other models) and the ``shape_match`` detector's."""
    metrics: dict = {}
    for split, combos in (("train_captions", TRAIN), ("heldout_captions", HELDOUT)):
        reps = max(1, n_per * 20 // len(combos))
        asked = [c for c in combos for _ in range(reps)]
        for steps in steps_list:
            for gs in (1.0, FLOW_GUIDANCE):
                imgs = sample_flow(out / "tiny-flow", [caption(*c) for c in asked], steps, gs, seed + 7)
                acc = {**attribute_accuracy(imgs, asked, out / "tiny-clip"), **shape_match_accuracy(imgs, asked)}
                metrics[f"samples/tiny-flow/{steps}_steps/guidance_{gs:g}/{split}"] = acc
                log(f"tiny-flow {steps} steps, guidance {gs:g}, {split} ({len(asked)} samples): "
                    + ", ".join(f"{k} {v:.3f}" for k, v in acc.items()))
    return metrics


def make_flow(out: Path, work: Path, tok_dir: Path, vae, text_encoder, data: torch.Tensor, labels: torch.Tensor,
              steps: dict, log: Log, seed: int) -> dict:
    """The flow stage: SD3 latents of the training images, the rectified-flow transformer, the
    ``assets/tiny-flow`` folder, and its evaluation (written to its ``world.json``)."""
    from transformers import CLIPTokenizer

    t0 = time.perf_counter()
    vae = copy.deepcopy(vae)
    mean, std = encode_latents(vae, data)  # unscaled posterior mean and std
    shift = float(mean.mean())
    scale = float(1 / (mean - shift).std())
    vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    latents, latent_std = (mean - shift) * scale, std * scale
    log(f"flow: latents shift_factor {shift:.4f}, scaling_factor {scale:.4f}")
    encoder = flow_text_encoder(text_encoder)
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    if (work / "flow" / "model_index.json").is_file():
        log("flow: cached")
        train_seconds: float | str = "cached"
    else:
        transformer = train_flow(latents, latent_std, labels, tokenizer, encoder, steps["flow"], log, seed)
        save_flow(work / "flow", vae, transformer, encoder, tok_dir)
        train_seconds = round(time.perf_counter() - t0, 1)
    shutil.rmtree(out / "tiny-flow", ignore_errors=True)
    shutil.copytree(work / "flow", out / "tiny-flow")
    (out / "tiny-flow" / "prompts.txt").write_text("".join(caption(*c) + "\n" for c in TRAIN))
    (out / "tiny-flow" / "prompts_heldout.txt").write_text("".join(caption(*c) + "\n" for c in HELDOUT))
    t1 = time.perf_counter()
    metrics = evaluate_flow(out, log, seed, steps["eval_per"])
    size = sum(f.stat().st_size for f in (out / "tiny-flow").rglob("*") if f.is_file())
    log(f"tiny-flow: {size / 1e6:.2f} MB")
    return {"seed": seed, "threads": torch.get_num_threads(), "flow_steps": steps["flow"], "flow_shift": FLOW_SHIFT,
            "stage_seconds": {"flow": train_seconds, "flow_eval": round(time.perf_counter() - t1, 1)},
            "metrics": metrics, "bytes": size}


# ----------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(REPO_ROOT / "assets"), help="assets folder (tiny-sd, tiny-lcm, tiny-clip are replaced)")
    parser.add_argument("--docs", default=str(REPO_ROOT / "docs"), help="where the sample grid goes ('' for none)")
    parser.add_argument("--work", default=str(REPO_ROOT / "runs" / "tiny-world"), help="stage cache")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: tiny data and a few steps per stage")
    parser.add_argument("--flow-only", action="store_true",
                        help="only the flow stage: train assets/tiny-flow from the VAE and text encoder in <out>/tiny-sd")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    q = args.quick
    steps = {"per_combo": 4 if q else 150, "vae": 10 if q else 1800, "vae_full": 4 if q else 250, "sd": 10 if q else 3000,
             "lcm": 10 if q else 1500, "clip": 10 if q else 1200, "eval_per": 1 if q else 10, "flow": 10 if q else 3000}
    out, work = Path(args.out), Path(args.work)
    docs = Path(args.docs) if args.docs else None
    work.mkdir(parents=True, exist_ok=True)
    log = Log()
    log(f"tiny world: seed {args.seed}, threads {torch.get_num_threads()}, steps {steps}")
    stage_times: dict[str, float | str] = {}
    cached: set[str] = set()

    def stage(name: str):
        class _T:
            def __enter__(self):
                self.t = time.perf_counter()

            def __exit__(self, *exc):
                stage_times[name] = "cached" if name in cached else round(time.perf_counter() - self.t, 1)
                log(f"stage {name}: {stage_times[name]}" + ("" if name in cached else " s"))
        return _T()

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    tok_dir = work / "tokenizer"
    vocab = write_tokenizer(tok_dir)
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    for w in WORDS:
        assert len(tokenizer(w, add_special_tokens=False).input_ids) == 1, w

    with stage("data"):
        data, labels = make_images(TRAIN, steps["per_combo"], args.seed)
        log(f"data: {len(data)} images of {len(TRAIN)} training captions ({len(HELDOUT)} held out)")

    if args.flow_only:
        vae = AutoencoderKL.from_pretrained(out / "tiny-sd" / "vae")
        text_encoder = CLIPTextModel.from_pretrained(out / "tiny-sd" / "text_encoder")
        return _flow_stage(out, work, tok_dir, vae, text_encoder, data, labels, steps, log, args.seed)

    with stage("vae"):
        if (work / "vae" / "config.json").is_file():
            vae = AutoencoderKL.from_pretrained(work / "vae")
            log("vae: cached")
            cached.add("vae")
        else:
            vae = train_vae(data, labels, steps["vae"], steps["vae_full"], log, args.seed + 1)
            latents, _ = encode_latents(vae, data[:1024])
            vae.register_to_config(scaling_factor=float(1 / latents.std()))
            vae.save_pretrained(work / "vae", safe_serialization=True)
        with torch.no_grad():
            x = to_model(data[-256:])
            mse = F.mse_loss(vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1), x).item()
        log(f"vae: reconstruction MSE {mse:.5f} (images in [-1, 1]), scaling_factor {vae.config.scaling_factor:.4f}")

    with stage("encode"):
        mean, std = encode_latents(vae, data)
        sf = vae.config.scaling_factor
        latents, latent_std = mean * sf, std * sf

    with stage("sd"):
        if (work / "sd" / "model_index.json").is_file():
            unet = UNet2DConditionModel.from_pretrained(work / "sd" / "unet")
            text_encoder = CLIPTextModel.from_pretrained(work / "sd" / "text_encoder")
            log("sd: cached")
            cached.add("sd")
        else:
            unet, text_encoder = train_sd(latents, latent_std, labels, tokenizer, vocab, steps["sd"], log, args.seed + 2)
            save_sd(work / "sd", vae, unet, text_encoder, tok_dir)

    with stage("lcm"):
        if (work / "lcm" / "model_index.json").is_file():
            log("lcm: cached")
            cached.add("lcm")
        else:
            lcm_unet = distill_lcm(unet, text_encoder, tokenizer, latents, latent_std, labels, steps["lcm"], log,
                                   args.seed + 3)
            save_lcm(work / "lcm", vae, lcm_unet, text_encoder, tok_dir)

    with stage("clip"):
        if (work / "clip" / "open_clip_config.json").is_file():
            log("clip: cached")
            cached.add("clip")
        else:
            clip, cfg = train_clip(data, labels, tok_dir, len(vocab), steps["clip"], log, args.seed + 4)
            save_clip(work / "clip", clip, cfg, tok_dir)

    # export: replace the asset folders
    for src, name in (("sd", "tiny-sd"), ("lcm", "tiny-lcm"), ("clip", "tiny-clip")):
        shutil.rmtree(out / name, ignore_errors=True)
        shutil.copytree(work / src, out / name)
    for name in ("tiny-sd", "tiny-lcm"):
        (out / name / "prompts.txt").write_text("".join(caption(*c) + "\n" for c in TRAIN))
        (out / name / "prompts_heldout.txt").write_text("".join(caption(*c) + "\n" for c in HELDOUT))

    with stage("eval"):
        metrics = evaluate(out, docs, log, args.seed, steps["eval_per"])

    size = {name: sum(f.stat().st_size for f in (out / name).rglob("*") if f.is_file()) for name in ("tiny-sd", "tiny-lcm", "tiny-clip")}
    log(f"sizes (MB): " + ", ".join(f"{k} {v / 1e6:.2f}" for k, v in size.items()))
    summary = {"seed": args.seed, "threads": torch.get_num_threads(), "steps": steps, "stage_seconds": stage_times,
               "captions": {"train": [caption(*c) for c in TRAIN], "heldout": [caption(*c) for c in HELDOUT]},
               "metrics": metrics, "bytes": size}
    for name in ("tiny-sd", "tiny-lcm", "tiny-clip"):
        (out / name / "world.json").write_text(json.dumps(summary, indent=1) + "\n")
        (out / name / "training_log.txt").write_text("\n".join(log.lines) + "\n")
    summary["flow"] = _flow_stage(out, work, tok_dir, vae, text_encoder, data, labels, steps, log, args.seed)
    return summary


def _flow_stage(out: Path, work: Path, tok_dir: Path, vae, text_encoder, data, labels, steps: dict, log: Log,
                seed: int) -> dict:
    """Run :func:`make_flow` (seed ``seed + 5``) and write ``tiny-flow/world.json`` and its log."""
    start = len(log.lines)
    flow = make_flow(out, work, tok_dir, vae, text_encoder, data, labels, steps, log, seed + 5)
    (out / "tiny-flow" / "world.json").write_text(json.dumps(flow, indent=1) + "\n")
    (out / "tiny-flow" / "training_log.txt").write_text("\n".join(log.lines[start:]) + "\n")
    return flow


if __name__ == "__main__":
    main()
    sys.exit(0)
