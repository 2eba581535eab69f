"""``polyrl prefetch``: the remote models and files of a config, listed and downloaded into the
caches the run reads, so that it can then train offline."""

from __future__ import annotations

import http.server
import threading
from pathlib import Path

import pytest
import torch
import yaml

from polyrl.cli import main
from polyrl.host import Host
from polyrl.prefetch import needs

ROOT = Path(__file__).parent.parent


@pytest.mark.parametrize("config,policy", [
    ("configs/rlcm_aesthetic.yaml", "SimianLuo/LCM_Dreamshaper_v7"),
    ("configs/ddpo_aesthetic.yaml", "CompVis/stable-diffusion-v1-4"),
])
def test_a_real_config_lists_its_models_without_network(capsys, config, policy):
    assert main(["prefetch", str(ROOT / config), "--list"]) == 0
    out = capsys.readouterr().out
    assert "this config reads 3 remote items" in out
    assert f"policy.pretrained: Hub pipeline {policy}" in out
    assert "rewards.aesthetic.pretrained: open_clip weights ViT-L-14 (openai): Hub file " \
           "timm/vit_large_patch14_clip_224.openai/open_clip_pytorch_model.bin" in out
    assert "rewards.aesthetic.head: file https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/" \
           "sac+logos+ava1-l14-linearMSE.pth" in out
    # and where to put each by hand
    assert f"`hf download {policy}`" in out
    assert "put it at " in out and "aesthetic/sac+logos+ava1-l14-linearMSE.pth" in out


def test_local_configs_need_nothing(capsys):
    assert main(["prefetch"]) == 0  # the embedded default: tiny models from assets/
    assert "nothing to download" in capsys.readouterr().out
    cfg = Host(plugins=[]).build_config(yaml.safe_load((ROOT / "configs/grpo_tiny_text.yaml").read_text()))
    assert needs(cfg) == []


class _Files(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # quiet
        pass


@pytest.fixture
def file_server(tmp_path):
    root = tmp_path / "served"
    root.mkdir()
    handler = lambda *a, **k: _Files(*a, directory=str(root), **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_downloads_into_the_cache_the_run_reads(tmp_path, capsys, file_server):
    from polyrl.rewards.aesthetic import AestheticConfig, AestheticMLP, AestheticReward

    root, url = file_server
    head = AestheticMLP(input_dim=64)  # the tiny CLIP's embedding width
    torch.save(head.state_dict(), root / "head.pth")
    cache = tmp_path / "cache"
    cfg = yaml.safe_load((ROOT / "configs/rlcm_tiny_clip_score.yaml").read_text())
    cfg["rewards"] = {"aesthetic": {"model": "assets/tiny-clip", "head": f"{url}/head.pth", "cache_dir": str(cache)}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))

    assert main(["prefetch", str(path), "--list"]) == 0
    assert f"[missing] rewards.aesthetic.head: file {url}/head.pth" in capsys.readouterr().out
    assert main(["prefetch", str(path)]) == 0
    out = capsys.readouterr().out
    assert "it can now train offline" in out
    assert (cache / "aesthetic" / "head.pth").is_file()
    assert main(["prefetch", str(path), "--list"]) == 0
    assert "[present] rewards.aesthetic.head" in capsys.readouterr().out

    (root / "head.pth").unlink()  # the server no longer has it: the reward reads the cached copy
    reward = AestheticReward(AestheticConfig(model="assets/tiny-clip", head=f"{url}/head.pth", cache_dir=str(cache)))
    torch.testing.assert_close(reward.head.layers[0].weight, head.layers[0].weight)


def test_what_cannot_be_downloaded_is_said_with_where_to_put_it(tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    cfg = yaml.safe_load((ROOT / "configs/grpo_tiny_text.yaml").read_text())
    cfg["policy"]["pretrained"] = "polyrl-nobody/no-such-model"
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["prefetch", str(path)]) == 1
    out = capsys.readouterr().out
    assert "HF_HUB_OFFLINE is set" in out
    assert "could not download Hub model polyrl-nobody/no-such-model" in out
    assert "policy.pretrained: `hf download polyrl-nobody/no-such-model`" in out
