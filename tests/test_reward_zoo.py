"""Tests of the preference reward models: PickScore, HPS v2.1 and ImageReward.

The real checkpoints cannot be downloaded here, so each test builds a small model of the same
architecture with random weights, writes it in the real checkpoint format (a transformers
``save_pretrained`` folder; a torch file with ``{"state_dict": ...}`` in open_clip's names; the
ImageReward authors' BLIP key names) and loads it through the configuration users write. The
scores are compared with computations written after the authors' scoring code; no mocks.
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torchvision import transforms as T
from torchvision.transforms import functional as TF

import polyrl
from polyrl import ConfigError, Context, Rollout
from polyrl.config import field_docs, from_dict
from polyrl.host import Host
from polyrl.rewards.hps import HPSConfig, HPSReward, fetch_hub_file, load_hps_model
from polyrl.rewards.image_reward import SCORE_MEAN, SCORE_STD, ImageRewardConfig, ImageRewardReward
from polyrl.rewards.pickscore import PickScoreConfig, PickScoreReward

ROOT = Path(polyrl.__file__).resolve().parent.parent
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
PROMPTS = ["a red circle on the left", "a blue square at the top", "a green star", "a yellow triangle in the center"]


def rollout(images: torch.Tensor, prompts: list[str]) -> Rollout:
    b = len(prompts)
    return Rollout(contexts=[Context(p, i // 2) for i, p in enumerate(prompts)], log_probs=torch.zeros(b, 1),
                   mask=torch.ones(b, 1, dtype=torch.bool), outputs={"images": images})


def images_u8(n: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Smooth random 8-bit images with a sharp block, ``[n, 3, h, w]``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, h // 8 + 1, w // 8 + 1, generator=g) * 255
    x = F.interpolate(x, size=(h, w), mode="bilinear").round().clamp(0, 255).byte()
    x[:, :, h // 3 : h // 2, w // 3 : w // 2] = 250
    return x


def pil(im: torch.Tensor) -> Image.Image:
    return Image.fromarray(im.permute(1, 2, 0).numpy())


def jitter_(state: dict[str, torch.Tensor], seed: int = 0, std: float = 0.05) -> dict[str, torch.Tensor]:
    """Random weights everywhere (LayerNorm and biases too), so that a wrong mapping shows."""
    g = torch.Generator().manual_seed(seed)
    return {k: v + std * torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in state.items()}


# =============================================================================== PickScore
@pytest.fixture(scope="module")
def pickscore_folder(tmp_path_factory):
    """A tiny CLIPModel + CLIPProcessor saved as the Hub repositories hold them."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(ROOT / "assets" / "tiny-sd" / "tokenizer")
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16, logit_scale_init_value=3.0)
    torch.manual_seed(0)
    model = CLIPModel(cfg)
    model.load_state_dict(jitter_(model.state_dict()))
    out = tmp_path_factory.mktemp("pickscore")
    model.save_pretrained(out)
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}), tokenizer=tok)
    processor.save_pretrained(out)
    return out


def test_pickscore_loads_the_transformers_format_and_scores_as_the_authors(pickscore_folder):
    from transformers import CLIPModel, CLIPProcessor

    cfg = from_dict(PickScoreConfig, {"model": str(pickscore_folder), "processor": str(pickscore_folder),
                                      "batch_size": 3}, "rewards.pickscore")
    reward = PickScoreReward(cfg)
    assert not any(p.requires_grad for p in reward.model.parameters()) and not reward.model.training
    u8 = images_u8(4, 48, 40)
    ours = reward(rollout(u8.float() / 255, PROMPTS))
    assert ours.shape == (4,) and ours.dtype == torch.float32 and ours.std() > 0

    # the authors' calc_probs, before the softmax, one prompt at a time
    model = CLIPModel.from_pretrained(pickscore_folder).eval()
    processor = CLIPProcessor.from_pretrained(pickscore_folder)
    with torch.no_grad():
        pixels = processor(images=[pil(im) for im in u8], return_tensors="pt")["pixel_values"]
        ours_pixels = reward.preprocess(u8.float() / 255)
        diff = (pixels - ours_pixels).abs()
        assert diff.mean() < 0.02 and diff.max() < 0.3, (diff.mean(), diff.max())

        def feats(out):
            return out if isinstance(out, torch.Tensor) else out.pooler_output

        def authors(pixel_values):
            img = feats(model.get_image_features(pixel_values=pixel_values))
            img = img / img.norm(dim=-1, keepdim=True)
            scores = []
            for i, p in enumerate(PROMPTS):
                t = processor(text=p, padding=True, truncation=True, max_length=77, return_tensors="pt")
                txt = feats(model.get_text_features(**t))
                txt = txt / txt.norm(dim=-1, keepdim=True)
                scores.append((model.logit_scale.exp() * (txt @ img.T))[0, i])
            return torch.stack(scores)

        # same pixels: the same numbers; the processor's own PIL pixels: close
        torch.testing.assert_close(reward(rollout(u8.float() / 255, PROMPTS)), authors(ours_pixels), atol=1e-4, rtol=1e-4)
        assert (ours - authors(pixels)).abs().max() < 0.05 * ours.abs().max()
    half = PickScoreReward(from_dict(PickScoreConfig, {"model": str(pickscore_folder), "processor": str(pickscore_folder),
                                                       "scale": 0.5}, "rewards.pickscore"))
    torch.testing.assert_close(half(rollout(u8.float() / 255, PROMPTS)), 0.5 * ours)


def test_pickscore_takes_a_dtype(pickscore_folder):
    base = {"model": str(pickscore_folder), "processor": str(pickscore_folder)}
    full = PickScoreReward(from_dict(PickScoreConfig, base, "rewards.pickscore"))
    low = PickScoreReward(from_dict(PickScoreConfig, {**base, "dtype": "bfloat16"}, "rewards.pickscore"))
    assert {p.dtype for p in low.model.parameters()} == {torch.bfloat16}
    u8 = images_u8(4, 48, 40)
    a, b = full(rollout(u8.float() / 255, PROMPTS)), low(rollout(u8.float() / 255, PROMPTS))
    assert b.dtype == torch.float32
    scale = float(full.model.logit_scale.exp())  # the score is a cosine times this
    torch.testing.assert_close(b, a, atol=0.03 * scale, rtol=0)
    with pytest.raises(ConfigError, match="pickscore.dtype"):
        from_dict(PickScoreConfig, {**base, "dtype": "int8"}, "rewards.pickscore")


def test_pickscore_refuses_checkpoints_that_do_not_match(pickscore_folder, tmp_path):
    import shutil

    for name, edit in (("missing", lambda sd: sd.pop("visual_projection.weight")),
                       ("extra", lambda sd: sd.__setitem__("visual_projection.extra", torch.zeros(2))),
                       ("shape", lambda sd: sd.__setitem__("visual_projection.weight", torch.zeros(16, 30)))):
        folder = tmp_path / name
        shutil.copytree(pickscore_folder, folder)
        sd = load_file(folder / "model.safetensors")
        edit(sd)
        save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
        cfg = from_dict(PickScoreConfig, {"model": str(folder), "processor": str(pickscore_folder)}, "rewards.pickscore")
        with pytest.raises(ValueError, match="does not match the CLIPModel architecture"):
            PickScoreReward(cfg)


# =============================================================================== HPS v2.1
HPS_ARCH = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}


@pytest.fixture(scope="module")
def hps_files(tmp_path_factory):
    """A small open_clip architecture (ViT-H-14's layout, smaller) and a checkpoint of it in the
    format of ``HPS_v2.1_compressed.pt``: ``{"state_dict": ...}`` with half-precision tensors."""
    root = tmp_path_factory.mktemp("hps")
    arch = root / "arch"
    arch.mkdir()
    (arch / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": HPS_ARCH, "preprocess_cfg": {"size": 32, "mean": list(OPENAI_MEAN), "std": list(OPENAI_STD)}}))
    torch.manual_seed(0)
    model = open_clip.create_model(f"local-dir:{arch}", load_weights=False)
    state = jitter_(model.state_dict(), seed=1, std=0.02)
    torch.save({"state_dict": {k: v.half() for k, v in state.items()}}, root / "HPS_v2.1_compressed.pt")
    return arch, root / "HPS_v2.1_compressed.pt"


def authors_hps_transform(image: Image.Image, size: int) -> torch.Tensor:
    """The HPS authors' scoring transform: ToTensor, longer side to ``size`` (bicubic), zero
    padding to a square, CLIP normalisation."""
    x = T.ToTensor()(image)
    h, w = x.shape[1:]
    scale = size / float(max(h, w))
    if scale != 1.0:
        nh, nw = round(h * scale), round(w * scale)
        x = TF.resize(x, [nh, nw], T.InterpolationMode.BICUBIC)
        ph, pw = size - nh, size - nw
        x = TF.pad(x, [pw // 2, ph // 2, pw - pw // 2, ph - ph // 2], fill=0)
    return T.Normalize(OPENAI_MEAN, OPENAI_STD)(x)


@pytest.mark.parametrize("h,w", [(48, 40), (32, 32), (30, 64)])
def test_hps_loads_the_checkpoint_format_and_scores_as_the_authors(hps_files, h, w):
    arch, ckpt = hps_files
    reward = HPSReward(from_dict(HPSConfig, {"checkpoint": str(ckpt), "architecture": str(arch), "batch_size": 3},
                                 "rewards.hps"))
    u8 = images_u8(4, h, w, seed=h)
    ours = reward(rollout(u8.float() / 255, PROMPTS))
    assert ours.shape == (4,) and ((-1 <= ours) & (ours <= 1)).all() and ours.std() > 0

    model = open_clip.create_model(f"local-dir:{arch}", load_weights=False)
    model.load_state_dict({k: v.float() for k, v in torch.load(ckpt, weights_only=True)["state_dict"].items()})
    model.eval()
    tokenizer = open_clip.get_tokenizer("ViT-H-14")
    with torch.no_grad():
        x = torch.stack([authors_hps_transform(pil(im), 32) for im in u8])
        torch.testing.assert_close(reward.preprocess(u8.float() / 255), x, atol=1e-5, rtol=0)
        img = F.normalize(model.encode_image(x), dim=-1)
        txt = F.normalize(model.encode_text(tokenizer(PROMPTS)), dim=-1)
        manual = torch.diagonal(img @ txt.T)
    torch.testing.assert_close(ours, manual, atol=1e-5, rtol=1e-4)


def test_hps_takes_a_dtype(hps_files):
    arch, ckpt = hps_files
    base = {"checkpoint": str(ckpt), "architecture": str(arch)}
    full = HPSReward(from_dict(HPSConfig, base, "rewards.hps"))
    low = HPSReward(from_dict(HPSConfig, {**base, "dtype": "bfloat16"}, "rewards.hps"))
    assert {p.dtype for p in low.model.parameters()} == {torch.bfloat16}
    u8 = images_u8(4, 32, 32, seed=5)
    a, b = full(rollout(u8.float() / 255, PROMPTS)), low(rollout(u8.float() / 255, PROMPTS))
    assert b.dtype == torch.float32
    torch.testing.assert_close(b, a, atol=0.03, rtol=0)
    with pytest.raises(ConfigError, match="hps.dtype"):
        from_dict(HPSConfig, {**base, "dtype": "int8"}, "rewards.hps")


def test_hps_refuses_checkpoints_that_do_not_match(hps_files, tmp_path):
    arch, ckpt = hps_files
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    cases = {
        "missing": ({k: v for k, v in state.items() if k != "logit_scale"}, r"missing \['logit_scale'\]"),
        "extra": ({**state, "score_head.weight": torch.zeros(1)}, r"unexpected \['score_head.weight'\]"),
        "shape": ({**state, "text_projection": torch.zeros(32, 8)}, r"wrong shapes .*text_projection"),
    }
    for name, (sd, message) in cases.items():
        path = tmp_path / f"{name}.pt"
        torch.save({"state_dict": sd}, path)
        with pytest.raises(ValueError, match=message):
            load_hps_model(path, str(arch))
    with pytest.raises(ValueError, match="wrong shapes"):  # the small checkpoint is not a ViT-H-14 (checked weightless)
        load_hps_model(ckpt, "ViT-H-14")
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": {"logit_scale": Path("x")}}, evil)
    with pytest.raises(pickle.UnpicklingError):
        load_hps_model(evil, str(arch))


def test_hub_files_fail_offline_with_instructions(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match=r"huggingface-cli download xswu/HPSv2 HPS_v2.1_compressed.pt"):
        fetch_hub_file("hf-hub:xswu/HPSv2/HPS_v2.1_compressed.pt", tmp_path, "hps.checkpoint")
    with pytest.raises(FileNotFoundError, match="no such file"):
        fetch_hub_file(str(tmp_path / "nope.pt"))


# =============================================================================== ImageReward
MED = {"architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
       "hidden_dropout_prob": 0.1, "hidden_size": 32, "initializer_range": 0.02, "intermediate_size": 64,
       "layer_norm_eps": 1e-12, "max_position_embeddings": 40, "model_type": "bert", "num_attention_heads": 2,
       "num_hidden_layers": 2, "pad_token_id": 0, "type_vocab_size": 2, "encoder_width": 768,
       "add_cross_attention": True}
VISION = {"vision_width": 48, "vision_layers": 2, "vision_heads": 3, "patch_size": 8, "image_size": 32}
WORDS = ["a", "red", "blue", "green", "yellow", "circle", "square", "star", "triangle", "on", "the", "left", "at",
         "top", "in", "center"]


def authors_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under the ImageReward authors' key names and shapes (their ``ImageReward``
    module: ``blip.visual_encoder`` a timm-style ViT, ``blip.text_encoder`` BLIP's BERT,
    ``blip.vision_proj`` / ``text_proj``, ``mlp.layers``), written out from the architecture."""
    g = torch.Generator().manual_seed(seed)
    w, d, hid, inter, ff = VISION["vision_width"], VISION["vision_layers"], MED["hidden_size"], MED["intermediate_size"], 4 * VISION["vision_width"]
    n = (VISION["image_size"] // VISION["patch_size"]) ** 2 + 1
    vocab = len(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS) + 2
    shapes = {"blip.visual_encoder.cls_token": (1, 1, w), "blip.visual_encoder.pos_embed": (1, n, w),
              "blip.visual_encoder.patch_embed.proj.weight": (w, 3, VISION["patch_size"], VISION["patch_size"]),
              "blip.visual_encoder.patch_embed.proj.bias": (w,),
              "blip.visual_encoder.norm.weight": (w,), "blip.visual_encoder.norm.bias": (w,)}
    for i in range(d):
        b = f"blip.visual_encoder.blocks.{i}."
        shapes.update({b + "norm1.weight": (w,), b + "norm1.bias": (w,), b + "attn.qkv.weight": (3 * w, w),
                       b + "attn.qkv.bias": (3 * w,), b + "attn.proj.weight": (w, w), b + "attn.proj.bias": (w,),
                       b + "norm2.weight": (w,), b + "norm2.bias": (w,), b + "mlp.fc1.weight": (ff, w),
                       b + "mlp.fc1.bias": (ff,), b + "mlp.fc2.weight": (w, ff), b + "mlp.fc2.bias": (w,)})
    t = "blip.text_encoder."
    shapes.update({t + "embeddings.word_embeddings.weight": (vocab, hid),
                   t + "embeddings.position_embeddings.weight": (MED["max_position_embeddings"], hid),
                   t + "embeddings.LayerNorm.weight": (hid,), t + "embeddings.LayerNorm.bias": (hid,)})
    for i in range(MED["num_hidden_layers"]):
        b = f"{t}encoder.layer.{i}."
        for att, kv_in in (("attention", hid), ("crossattention", w)):
            shapes.update({f"{b}{att}.self.query.weight": (hid, hid), f"{b}{att}.self.query.bias": (hid,),
                           f"{b}{att}.self.key.weight": (hid, kv_in), f"{b}{att}.self.key.bias": (hid,),
                           f"{b}{att}.self.value.weight": (hid, kv_in), f"{b}{att}.self.value.bias": (hid,),
                           f"{b}{att}.output.dense.weight": (hid, hid), f"{b}{att}.output.dense.bias": (hid,),
                           f"{b}{att}.output.LayerNorm.weight": (hid,), f"{b}{att}.output.LayerNorm.bias": (hid,)})
        shapes.update({b + "intermediate.dense.weight": (inter, hid), b + "intermediate.dense.bias": (inter,),
                       b + "output.dense.weight": (hid, inter), b + "output.dense.bias": (hid,),
                       b + "output.LayerNorm.weight": (hid,), b + "output.LayerNorm.bias": (hid,)})
    shapes.update({"blip.vision_proj.weight": (256, w), "blip.vision_proj.bias": (256,),
                   "blip.text_proj.weight": (256, hid), "blip.text_proj.bias": (256,)})
    dims = [hid, 1024, 128, 64, 16, 1]
    for layer, (i, o) in zip((0, 2, 4, 6, 7), zip(dims, dims[1:])):
        shapes.update({f"mlp.layers.{layer}.weight": (o, i), f"mlp.layers.{layer}.bias": (o,)})
    state = {k: (1.0 if k.endswith("LayerNorm.weight") or re.search(r"norm[12]?\.weight$", k) else 0.0)
             + 0.1 * torch.randn(s, generator=g) for k, s in shapes.items()}
    state[t + "embeddings.position_ids"] = torch.arange(MED["max_position_embeddings"]).expand(1, -1)
    return state


@pytest.fixture(scope="module")
def image_reward_files(tmp_path_factory):
    from transformers import BertTokenizer

    root = tmp_path_factory.mktemp("image_reward")
    (root / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS) + "\n")
    BertTokenizer(str(root / "vocab.txt")).save_pretrained(root / "tokenizer")
    med = dict(MED, vocab_size=len(WORDS) + 5 + 2)  # BERT's vocabulary plus BLIP's [DEC] and [ENC]
    (root / "med_config.json").write_text(json.dumps(med))
    state = authors_state_dict()
    torch.save(state, root / "ImageReward.pt")
    return root, state


def image_reward_config(root: Path, **extra) -> ImageRewardConfig:
    return from_dict(ImageRewardConfig, {"checkpoint": str(root / "ImageReward.pt"),
                                         "med_config": str(root / "med_config.json"),
                                         "tokenizer": str(root / "tokenizer"), **VISION, **extra}, "rewards.image_reward")


def test_image_reward_loads_the_authors_format_and_scores_as_the_authors(image_reward_files):
    root, state = image_reward_files
    reward = ImageRewardReward(image_reward_config(root, batch_size=3))
    m = reward.model
    # every tensor of the file landed where the authors' module has it
    pairs = {"blip.visual_encoder.cls_token": m.vision.embeddings.class_embedding,
             "blip.visual_encoder.pos_embed": m.vision.embeddings.position_embedding,
             "blip.visual_encoder.patch_embed.proj.weight": m.vision.embeddings.patch_embedding.weight,
             "blip.visual_encoder.blocks.1.attn.qkv.weight": m.vision.encoder.layers[1].self_attn.qkv.weight,
             "blip.visual_encoder.blocks.1.attn.proj.bias": m.vision.encoder.layers[1].self_attn.projection.bias,
             "blip.visual_encoder.blocks.0.norm2.weight": m.vision.encoder.layers[0].layer_norm2.weight,
             "blip.visual_encoder.blocks.0.mlp.fc2.weight": m.vision.encoder.layers[0].mlp.fc2.weight,
             "blip.visual_encoder.norm.bias": m.vision.post_layernorm.bias,
             "blip.text_encoder.encoder.layer.1.crossattention.self.key.weight":
                 m.text.encoder.layer[1].crossattention.self.key.weight,
             "mlp.layers.7.weight": m.head.layers[7].weight}
    for key, param in pairs.items():
        assert torch.equal(param, state[key]), key
    assert sum(p.numel() for p in m.parameters()) == sum(
        v.numel() for k, v in state.items() if not k.startswith("blip.") or "_proj." not in k and "position_ids" not in k)

    u8 = images_u8(4, 40, 56)
    ours = reward(rollout(u8.float() / 255, PROMPTS))
    assert ours.shape == (4,) and ours.std() > 0
    # the authors' score(): their _transform on PIL images, max_length-35 tokens, [CLS] feature, MLP, normalisation
    transform = T.Compose([T.Resize(32, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(32), T.ToTensor(),
                           T.Normalize(OPENAI_MEAN, OPENAI_STD)])
    with torch.no_grad():
        x = torch.stack([transform(pil(im)) for im in u8])
        diff = (x - reward.preprocess(u8.float() / 255)).abs()
        assert diff.mean() < 0.02 and diff.max() < 0.3, (diff.mean(), diff.max())
        manual = []
        for i, p in enumerate(PROMPTS):
            tok = reward.tokenizer(p, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
            assert tok["input_ids"].shape == (1, 35) and tok["input_ids"][0, 0] == reward.tokenizer.cls_token_id
            emb = m.vision(pixel_values=x[i : i + 1]).last_hidden_state
            h = m.text(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"], encoder_hidden_states=emb,
                       encoder_attention_mask=torch.ones(emb.shape[:-1], dtype=torch.long)).last_hidden_state[:, 0]
            manual.append(((m.head.layers(h) - SCORE_MEAN) / SCORE_STD)[0, 0])
        manual = torch.stack(manual)
    assert (ours - manual).abs().max() < 0.05 * manual.abs().max() + 1e-3
    # on pixels that are the same, the same numbers
    torch.testing.assert_close(m(x, *reward.tokenize(PROMPTS)), manual, atol=1e-5, rtol=1e-4)
    assert len(reward.tokenizer) == len(WORDS) + 7 and reward.tokenizer.bos_token == "[DEC]"


def test_image_reward_takes_a_dtype(image_reward_files):
    root, _ = image_reward_files
    full = ImageRewardReward(image_reward_config(root))
    low = ImageRewardReward(image_reward_config(root, dtype="bfloat16"))
    assert {p.dtype for p in low.model.vision.parameters()} | {p.dtype for p in low.model.text.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in low.model.head.parameters()} == {torch.float32}
    u8 = images_u8(4, 40, 56)
    a, b = full(rollout(u8.float() / 255, PROMPTS)), low(rollout(u8.float() / 255, PROMPTS))
    assert b.dtype == torch.float32 and not torch.equal(a, b)
    torch.testing.assert_close(b, a, atol=0.05 * float(a.abs().max()) + 1e-3, rtol=0)
    with pytest.raises(ConfigError, match="image_reward.dtype"):
        image_reward_config(root, dtype="int8")


def test_image_reward_refuses_checkpoints_that_do_not_match(image_reward_files, tmp_path):
    root, state = image_reward_files
    cases = {
        "missing": ({k: v for k, v in state.items() if k != "mlp.layers.7.bias"}, r"missing \['head.layers.7.bias'\]"),
        "extra": ({**state, "blip.itm_head.weight": torch.zeros(2, 32)}, r"unexpected \['blip.itm_head.weight'\]"),
        "shape": ({**state, "blip.visual_encoder.pos_embed": torch.zeros(1, 10, 48)},
                  r"wrong shapes .*vision.embeddings.position_embedding"),
        "positions": ({**state, "blip.text_encoder.embeddings.position_ids": torch.zeros(1, 40, dtype=torch.long)},
                      "position_ids is not 0..n-1"),
    }
    for name, (sd, message) in cases.items():
        folder = tmp_path / name
        folder.mkdir()
        torch.save(sd, folder / "ImageReward.pt")
        for f in ("med_config.json",):
            (folder / f).write_text((root / f).read_text())
        cfg = image_reward_config(root, checkpoint=str(folder / "ImageReward.pt"))
        with pytest.raises(ValueError, match=message):
            ImageRewardReward(cfg)
    with pytest.raises(ValueError, match="wrong shapes"):  # a ViT-L/16 architecture against the small file
        ImageRewardReward(image_reward_config(root, vision_width=64, vision_heads=4))


# =============================================================================== configs
def test_zoo_rewards_are_registered_with_documented_configs_and_real_defaults():
    host = Host()
    for name, cls in (("pickscore", PickScoreConfig), ("hps", HPSConfig), ("image_reward", ImageRewardConfig)):
        spec = host.registry["reward"][name]
        assert spec.reads == ("images",) and spec.config_cls is cls and spec.modality == "image"
        assert set(field_docs(cls)) == {f for f in cls.__dataclass_fields__}
        from_dict(cls, {}, f"rewards.{name}")  # the published defaults validate without loading anything
    assert (PickScoreConfig().model, PickScoreConfig().processor) == ("yuvalkirstain/PickScore_v1",
                                                                      "laion/CLIP-ViT-H-14-laion2B-s32B-b79K")
    assert (HPSConfig().checkpoint, HPSConfig().architecture) == ("hf-hub:xswu/HPSv2/HPS_v2.1_compressed.pt", "ViT-H-14")
    assert ImageRewardConfig().checkpoint == "hf-hub:THUDM/ImageReward/ImageReward.pt"


def test_zoo_config_errors_before_loading(tmp_path):
    with pytest.raises(ConfigError, match="neither a folder nor a Hub id"):
        from_dict(PickScoreConfig, {"model": "not a model"}, "rewards.pickscore")
    with pytest.raises(ConfigError, match="has none of"):
        from_dict(PickScoreConfig, {"processor": str(tmp_path)}, "rewards.pickscore")
    with pytest.raises(ConfigError, match="no such file"):
        from_dict(HPSConfig, {"checkpoint": str(tmp_path / "HPS.pt")}, "rewards.hps")
    with pytest.raises(ConfigError, match="hf-hub:<org>/<repo>/<file"):
        from_dict(HPSConfig, {"checkpoint": "hf-hub:xswu/HPSv2"}, "rewards.hps")
    with pytest.raises(ConfigError, match="not an open_clip model name .*HPS v2 / v2.1 use 'ViT-H-14'"):
        from_dict(HPSConfig, {"architecture": "ViT-H-41"}, "rewards.hps")
    with pytest.raises(ConfigError, match="divisible by vision_heads"):
        from_dict(ImageRewardConfig, {"vision_heads": 5}, "rewards.image_reward")
    with pytest.raises(ConfigError, match="batch_size must be >= 1"):
        from_dict(ImageRewardConfig, {"batch_size": 0}, "rewards.image_reward")
