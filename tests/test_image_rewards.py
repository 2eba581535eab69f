"""Tests of the image rewards: the LAION aesthetic predictor and the CLIP score.

The real aesthetic head (``sac+logos+ava1-l14-linearMSE.pth``, in the ``shared/assets`` folder
beside the checkout) is loaded strictly through the code users run; its ViT-L/14 cannot be
downloaded here, so the full pipeline runs on the tiny CLIP in ``assets/tiny-clip`` with a head of
the same architecture and a matching input width. No mocks: open_clip, PIL and the tiny CLIP are
real.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import pickle
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import polyrl
from polyrl import ConfigError, Context, Rollout
from polyrl.config import field_docs, from_dict
from polyrl.host import Host
from polyrl.rewards.aesthetic import (
    AestheticConfig,
    AestheticMLP,
    AestheticReward,
    fetch_head,
    load_aesthetic_head,
)
from polyrl.rewards.clip_score import ClipPreprocess, ClipScore, ClipScoreConfig, preprocess_images

ROOT = Path(polyrl.__file__).resolve().parent.parent
REAL_HEAD = Path(polyrl.__file__).resolve().parents[2] / "shared" / "assets" / "sac+logos+ava1-l14-linearMSE.pth"
TINY_CLIP = ROOT / "assets" / "tiny-clip"
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
needs_real_head = pytest.mark.skipif(
    not REAL_HEAD.is_file(),
    reason=f"the LAION aesthetic head is not at {REAL_HEAD} (the shared assets folder beside the checkout)",
)


def world():
    """The tiny world's drawing code (scripts/make_tiny_world.py)."""
    spec = importlib.util.spec_from_file_location("make_tiny_world", ROOT / "scripts" / "make_tiny_world.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def image_rollout(images: torch.Tensor, prompts: list[str]) -> Rollout:
    b = len(prompts)
    return Rollout(contexts=[Context(p, i) for i, p in enumerate(prompts)], log_probs=torch.zeros(b, 1),
                   mask=torch.ones(b, 1, dtype=torch.bool), outputs={"images": images})


class NotATensor:
    """Pickled into a fake head: ``torch.load(weights_only=True)`` must refuse it."""


# ------------------------------------------------------------------------------ aesthetic head
@needs_real_head
def test_real_aesthetic_head_loads_strictly_and_computes_the_linear_mlp():
    path = fetch_head(str(REAL_HEAD))  # a local path is used as is, no download
    assert path == REAL_HEAD
    head = load_aesthetic_head(path, 768)
    assert not head.training and not any(p.requires_grad for p in head.parameters())
    raw = torch.load(str(REAL_HEAD), map_location="cpu", weights_only=True)
    assert sorted(raw) == sorted(f"layers.{i}.{k}" for i in (0, 2, 4, 6, 7) for k in ("weight", "bias"))
    feats = F.normalize(torch.randn(16, 768, generator=torch.Generator().manual_seed(0)), dim=-1)
    x = feats.double()
    for i in (0, 2, 4, 6, 7):  # Linear layers only: dropout is off in eval, and there are no activations
        x = x @ raw[f"layers.{i}.weight"].double().T + raw[f"layers.{i}.bias"].double()
    torch.testing.assert_close(head(feats).double(), x[:, 0], atol=1e-5, rtol=1e-5)
    assert torch.equal(head(feats), head(feats))


@needs_real_head
def test_aesthetic_head_rejects_wrong_keys_shapes_and_pickles(tmp_path):
    raw = torch.load(str(REAL_HEAD), map_location="cpu", weights_only=True)
    with pytest.raises(ValueError, match=r"wrong shapes .*layers\.0\.weight"):
        load_aesthetic_head(REAL_HEAD, input_dim=512)  # a head for another CLIP width
    missing = tmp_path / "missing.pth"
    torch.save({k: v for k, v in raw.items() if k != "layers.7.bias"}, missing)
    with pytest.raises(ValueError, match=r"missing \['layers.7.bias'\]"):
        load_aesthetic_head(missing)
    extra = tmp_path / "extra.pth"
    torch.save({**raw, "layers.8.weight": torch.zeros(1)}, extra)
    with pytest.raises(ValueError, match=r"unexpected \['layers.8.weight'\]"):
        load_aesthetic_head(extra)
    evil = tmp_path / "evil.pth"
    torch.save({"layers.0.weight": NotATensor()}, evil)
    with pytest.raises(pickle.UnpicklingError):
        load_aesthetic_head(evil)
    # a checkpoint that wraps the state dict is accepted
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"state_dict": raw}, wrapped)
    assert isinstance(load_aesthetic_head(wrapped), AestheticMLP)


def test_head_download_is_cached_and_offline_errors_say_where_to_put_it(tmp_path):
    url = "http://127.0.0.1:9/models/sac+logos+ava1-l14-linearMSE.pth"  # nothing listens on port 9
    target = tmp_path / "sac+logos+ava1-l14-linearMSE.pth"
    with pytest.raises(FileNotFoundError, match="put it at " + str(target).replace("+", r"\+")):
        fetch_head(url, tmp_path)
    assert not list(tmp_path.iterdir()), "no partial download is left behind"
    torch.save(AestheticMLP().state_dict(), target)
    assert fetch_head(url, tmp_path) == target  # a cached file is used without the network
    with pytest.raises(FileNotFoundError, match="no such file"):
        fetch_head(str(tmp_path / "nope.pth"))


# ------------------------------------------------------------------------------ preprocessing
@pytest.mark.parametrize("size", [(64, 64), (300, 400), (500, 240), (224, 224)])
def test_preprocessing_matches_open_clip_transform(size):
    """Resize 224 (bicubic, shorter side), centre crop, CLIP mean/std: the tensor path equals
    open_clip's PIL transform up to PIL's 8-bit two-pass rounding."""
    transform = open_clip.image_transform(224, is_train=False, mean=OPENAI_MEAN, std=OPENAI_STD)
    pre = ClipPreprocess.from_transform(transform)
    assert (pre.size, pre.mean, pre.std) == (224, OPENAI_MEAN, OPENAI_STD)
    h, w = size
    g = torch.Generator().manual_seed(0)
    u8 = torch.rand(2, 3, h // 8 + 1, w // 8 + 1, generator=g) * 255
    u8 = F.interpolate(u8, size=(h, w), mode="bilinear").round().clamp(0, 255).byte()
    u8[:, :, h // 3 : h // 2, w // 3 : w // 2] = 250  # a sharp-edged block
    ours = pre(u8.float() / 255)
    ref = torch.stack([transform(Image.fromarray(im.permute(1, 2, 0).numpy())) for im in u8])
    assert ours.shape == ref.shape == (2, 3, 224, 224)
    diff = (ours - ref).abs()
    assert diff.mean() < 0.01, diff.mean()
    assert diff.max() < (0.05 if min(h, w) >= 224 else 0.2), diff.max()
    # centre crop of a non-square image: a marker on the discarded border never shows
    if h != w:
        marked = u8.clone().float() / 255
        marked[..., :2, :2] = 0.0
        assert torch.equal(pre(marked)[..., 50:150, 50:150], ours[..., 50:150, 50:150])
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        preprocess_images(torch.zeros(3, 8, 8), 224, OPENAI_MEAN, OPENAI_STD)


# ------------------------------------------------------------------------------ full pipelines
@pytest.fixture(scope="module")
def tiny_images():
    """Tiny-world images of held-out and training captions, float in [0, 1]."""
    w = world()
    combos = w.HELDOUT[:6] + w.TRAIN[:6]
    images, labels = w.make_images(combos, 1, seed=123)
    order = torch.argsort(labels)
    return images[order].float() / 255, [w.caption(*c) for c in combos]


def test_aesthetic_reward_full_pipeline_on_the_tiny_clip(tmp_path, tiny_images):
    """The user-facing reward (open_clip model from a folder, head from a file) equals a manual
    computation: normalised CLIP features through the linear MLP."""
    images, prompts = tiny_images
    head = AestheticMLP(input_dim=64)  # the tiny CLIP's embedding width
    torch.manual_seed(0)
    for p in head.parameters():
        torch.nn.init.normal_(p, std=0.5)
    head_path = tmp_path / "tiny-head.pth"
    torch.save(head.state_dict(), head_path)
    cfg = from_dict(AestheticConfig, {"head": str(head_path), "model": "assets/tiny-clip", "pretrained": None,
                                      "batch_size": 5}, "rewards.aesthetic")
    reward = AestheticReward(cfg)
    scores = reward(image_rollout(images, prompts))
    assert scores.shape == (len(prompts),) and scores.dtype == torch.float32
    model, _, transform = open_clip.create_model_and_transforms(f"local-dir:{TINY_CLIP}")
    model.eval()
    with torch.no_grad():
        x = torch.stack([transform(Image.fromarray((im * 255).round().byte().permute(1, 2, 0).numpy())) for im in images])
        manual = head.eval()(F.normalize(model.encode_image(x), dim=-1))
    torch.testing.assert_close(scores, manual, atol=2e-3, rtol=1e-3)
    assert scores.std() > 0
    with pytest.raises(ValueError, match="wrong shapes"):  # the 768-d head does not fit a 64-d CLIP
        torch.save(AestheticMLP(768).state_dict(), tmp_path / "big.pth")
        AestheticReward(dataclasses.replace(cfg, head=str(tmp_path / "big.pth")))


def test_clip_score_full_pipeline_on_the_tiny_clip(tiny_images):
    images, prompts = tiny_images
    reward = ClipScore(from_dict(ClipScoreConfig, {"model": "assets/tiny-clip", "batch_size": 4}, "rewards.clip_score"))
    right = reward(image_rollout(images, prompts))
    model, _, transform = open_clip.create_model_and_transforms(f"local-dir:{TINY_CLIP}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{TINY_CLIP}")
    model.eval()
    with torch.no_grad():
        x = torch.stack([transform(Image.fromarray((im * 255).round().byte().permute(1, 2, 0).numpy())) for im in images])
        manual = (F.normalize(model.encode_image(x), dim=-1) * F.normalize(model.encode_text(tokenizer(prompts)), dim=-1)).sum(-1)
    torch.testing.assert_close(right, manual, atol=2e-3, rtol=1e-3)
    assert ((-1 <= right) & (right <= 1)).all()
    # alignment: each image scores higher with its own caption than with the others' (held-out ones included)
    wrong = reward(image_rollout(images, prompts[1:] + prompts[:1]))
    assert (right > wrong).float().mean() >= 0.75, (right, wrong)
    scaled = ClipScore(ClipScoreConfig(model="assets/tiny-clip", scale=2.5, template="{prompt}"))
    torch.testing.assert_close(scaled(image_rollout(images, prompts)), 2.5 * right)


def test_tiny_clip_zero_shot_accuracy_on_held_out_captions():
    """The tiny CLIP names the caption of images it never saw captions for, among all 100."""
    w = world()
    images, labels = w.make_images(w.HELDOUT, 2, seed=321)
    reward = ClipScore(ClipScoreConfig(model="assets/tiny-clip"))
    img = reward.image_features(images.float() / 255)
    txt = reward.text_features(w.ALL_CAPTIONS)
    pred = (img @ txt.T).argmax(1)
    truth = torch.tensor([w.ALL_CAPTIONS.index(w.caption(*w.HELDOUT[i])) for i in labels])
    assert (pred == truth).float().mean() >= 0.5


# ------------------------------------------------------------------------------ registration & config
def test_rewards_are_registered_with_documented_configs():
    host = Host()
    for name, cls in (("aesthetic", AestheticConfig), ("clip_score", ClipScoreConfig)):
        spec = host.registry["reward"][name]
        assert spec.reads == ("images",) and spec.config_cls is cls
        assert set(field_docs(cls)) == {f.name for f in dataclasses.fields(cls)}


def test_config_errors_before_loading(tmp_path):
    with pytest.raises(ConfigError, match="'ViT-L-14x' is not an open_clip model name .did you mean 'ViT-L-14'"):
        from_dict(ClipScoreConfig, {"model": "ViT-L-14x"}, "rewards.clip_score")
    with pytest.raises(ConfigError, match="pretrained tag"):
        from_dict(ClipScoreConfig, {"model": "ViT-L-14", "pretrained": "openaii"}, "rewards.clip_score")
    with pytest.raises(ConfigError, match="open_clip_config.json"):
        from_dict(ClipScoreConfig, {"model": str(tmp_path)}, "rewards.clip_score")
    with pytest.raises(ConfigError, match="{prompt}"):
        from_dict(ClipScoreConfig, {"template": "a photo"}, "rewards.clip_score")
    with pytest.raises(ConfigError, match="no such file"):
        from_dict(AestheticConfig, {"head": str(tmp_path / "head.pth")}, "rewards.aesthetic")
    cfg = from_dict(AestheticConfig, {}, "rewards.aesthetic")  # the real defaults validate without loading
    assert (cfg.model, cfg.pretrained) == ("ViT-L-14", "openai") and cfg.head.startswith("https://")


def test_rewards_run_on_the_policys_device():
    """The factories put the reward's models on the policy's device (the CPU here)."""
    host = Host()
    policy = torch.nn.Linear(1, 1)
    policy.device = torch.device("cpu")
    reward = host.registry["reward"]["clip_score"].factory(ClipScoreConfig(), policy=policy)
    assert reward.device == torch.device("cpu") and next(reward.clip.parameters()).device == torch.device("cpu")
    assert not any(p.requires_grad for p in reward.clip.parameters())


def test_world_images_are_deterministic():
    w = world()
    a, la = w.make_images(w.TRAIN[:3], 2, seed=5)
    b, lb = w.make_images(w.TRAIN[:3], 2, seed=5)
    assert torch.equal(a, b) and torch.equal(la, lb) and a.dtype == torch.uint8 and a.shape == (6, 3, 64, 64)
    assert len(w.ALL_CAPTIONS) == 100 and len(w.HELDOUT) == 20 and not set(w.HELDOUT) & set(w.TRAIN)
    assert np.unique([c[0] for c in w.HELDOUT]).size == 5  # every colour has held-out captions


@pytest.mark.slow
def test_make_tiny_world_quick_run_writes_loadable_models(tmp_path):
    """The whole tiny-world pipeline in smoke mode (a few steps per stage): every stage runs, and
    the three folders load with the libraries' own loaders, as the shipped assets do."""
    from diffusers import LatentConsistencyModelPipeline, StableDiffusionPipeline

    summary = world().main(["--quick", "--out", str(tmp_path / "assets"), "--docs", str(tmp_path / "docs"),
                            "--work", str(tmp_path / "work"), "--threads", "1"])
    assert set(summary["stage_seconds"]) == {"data", "vae", "encode", "sd", "lcm", "clip", "eval"}
    assert "clip_zero_shot/heldout_captions" in summary["metrics"]
    out = tmp_path / "assets"
    StableDiffusionPipeline.from_pretrained(out / "tiny-sd")
    lcm = LatentConsistencyModelPipeline.from_pretrained(out / "tiny-lcm")
    assert lcm.unet.config.time_cond_proj_dim == 256 and type(lcm.scheduler).__name__ == "LCMScheduler"
    open_clip.create_model_and_transforms(f"local-dir:{out / 'tiny-clip'}")
    assert (tmp_path / "docs" / "tiny_world_samples.png").is_file()
    assert json.loads((out / "tiny-sd" / "world.json").read_text())["steps"]["sd"] == 10


def test_aesthetic_reward_keeps_only_the_image_tower_and_takes_a_dtype(tmp_path, tiny_images):
    """The text tower is dropped (the scores do not change: the full-model computation above is
    the reference); a bfloat16 encoder halves its memory and moves the scores only a little."""
    images, prompts = tiny_images
    head = AestheticMLP(input_dim=64)
    torch.manual_seed(0)
    for p in head.parameters():
        torch.nn.init.normal_(p, std=0.5)
    torch.save(head.state_dict(), tmp_path / "head.pth")
    base = {"head": str(tmp_path / "head.pth"), "model": "assets/tiny-clip", "pretrained": None}
    full = open_clip.create_model(f"local-dir:{TINY_CLIP}")
    reward = AestheticReward(from_dict(AestheticConfig, base, "rewards.aesthetic"))
    names = [n for n, _ in reward.clip.named_parameters()]
    assert names and all(n.startswith(("visual.", "logit_")) for n in names)  # no text tower
    assert sum(p.numel() for p in reward.clip.parameters()) < sum(p.numel() for p in full.parameters())
    scores = reward(image_rollout(images, prompts))
    low = AestheticReward(from_dict(AestheticConfig, {**base, "dtype": "bfloat16"}, "rewards.aesthetic"))
    assert {p.dtype for p in low.clip.parameters()} == {torch.bfloat16}
    low_scores = low(image_rollout(images, prompts))
    assert low_scores.dtype == torch.float32
    torch.testing.assert_close(low_scores, scores, atol=0.05 * float(scores.abs().max()), rtol=0)
    with pytest.raises(ConfigError, match="dtype"):
        from_dict(AestheticConfig, {**base, "dtype": "int8"}, "rewards.aesthetic")


def test_clip_score_takes_a_dtype(tiny_images):
    images, prompts = tiny_images
    full = ClipScore(from_dict(ClipScoreConfig, {"model": "assets/tiny-clip"}, "rewards.clip_score"))
    low = ClipScore(from_dict(ClipScoreConfig, {"model": "assets/tiny-clip", "dtype": "bfloat16"}, "rewards.clip_score"))
    assert {p.dtype for p in low.clip.parameters()} == {torch.bfloat16}
    a, b = full(image_rollout(images, prompts)), low(image_rollout(images, prompts))
    assert b.dtype == torch.float32
    torch.testing.assert_close(b, a, atol=0.03, rtol=0)  # cosines in [-1, 1]
    with pytest.raises(ConfigError, match="clip_score.dtype"):
        from_dict(ClipScoreConfig, {"model": "assets/tiny-clip", "dtype": "int8"}, "rewards.clip_score")
