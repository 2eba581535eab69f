"""Rewards served over HTTP: ``polyrl serve-reward`` and the ``remote`` reward.

Every server listens on 127.0.0.1 on a free port, is bounded in time and is stopped by the test.
"""

from __future__ import annotations

import base64
import contextlib
import http.server
import io
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from PIL import Image

import polyrl
from polyrl import hookimpl
from polyrl.config import apply_overrides, from_dict, load_yaml
from polyrl.host import Host
from polyrl.loop import train
from polyrl.rewards.jpeg import JpegCompressibility, JpegConfig
from polyrl.rewards.remote import (
    RemoteReward,
    RemoteRewardConfig,
    RemoteRewardError,
    decode_png,
    encode_png,
    quantise_images,
)
from polyrl.serve import RewardServer, ServeSettings, build_served_reward
from polyrl.types import ConfigError, Context, Reward, Rollout

ROOT = Path(__file__).parent.parent
REAL_HEAD = Path(polyrl.__file__).resolve().parents[2] / "shared" / "assets" / "sac+logos+ava1-l14-linearMSE.pth"


# ------------------------------------------------------------------------------ helpers
@contextlib.contextmanager
def serving(reward, reads, name="reward", **settings):
    """An in-process reward server on a free localhost port; always stopped."""
    server = RewardServer(reward, reads, ServeSettings(host="127.0.0.1", port=0, **settings), name=name)
    try:
        server.start(timeout=20)
        yield server
    finally:
        server.stop()


def remote(url, **kw) -> RemoteReward:
    kw.setdefault("timeout_s", 10.0)
    kw.setdefault("retries", 2)
    kw.setdefault("backoff_s", 0.05)
    return RemoteReward(from_dict(RemoteRewardConfig, {"url": url, **kw}, "rewards.remote"))


def image_rollout(images: torch.Tensor, prompts=None, extra=None) -> Rollout:
    b = images.shape[0]
    prompts = prompts or [f"prompt {i}" for i in range(b)]
    contexts = [Context(p, extra=(extra[i] if extra else {})) for i, p in enumerate(prompts)]
    return Rollout(contexts, torch.zeros(b, 1), torch.ones(b, 1, dtype=torch.bool), outputs={"images": images})


def text_rollout(texts, prompts=None, extra=None) -> Rollout:
    b = len(texts)
    prompts = prompts or [f"p{i}" for i in range(b)]
    contexts = [Context(p, extra=(extra[i] if extra else {})) for i, p in enumerate(prompts)]
    return Rollout(contexts, torch.zeros(b, 1), torch.ones(b, 1, dtype=torch.bool), outputs={"texts": list(texts)})


def tiny_text_config(output_dir: Path, rewards: dict, iterations: int = 2, extra: list[str] = ()):
    data = load_yaml(ROOT / "configs" / "grpo_tiny_text.yaml")
    data["rewards"] = rewards
    data = apply_overrides(data, [
        f"run.iterations={iterations}", "run.prompts_per_iteration=2", "run.samples_per_prompt=4", "run.save_every=1",
        "update.train_batch_size=8", "update.inner_epochs=1", "sampler.max_new_tokens=8", "run.report=false",
        "run.progress=false", f"run.output_dir={output_dir}", *extra,
    ])
    return data


def metrics(run_dir: Path) -> list[dict]:
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


class Recording(Reward):
    """A cheap reward that records each call's batch size (and can be slow)."""

    reads = "texts"

    def __init__(self, delay: float = 0.0) -> None:
        self.calls: list[int] = []
        self.delay = delay

    def __call__(self, rollout: Rollout) -> torch.Tensor:
        self.calls.append(rollout.batch_size)
        time.sleep(self.delay)
        return torch.tensor([float(len(t)) + 0.5 * len(p) for t, p in zip(rollout.outputs["texts"], rollout.prompts)])


def expected(texts, prompts):
    return [float(len(t)) + 0.5 * len(p) for t, p in zip(texts, prompts)]


# ------------------------------------------------------------------------------ wire format
def test_png_carries_the_8bit_quantisation_exactly():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(3, 3, 17, 23, generator=g) * 1.2 - 0.1  # a little out of [0, 1]: clamped
    q = quantise_images(images)
    assert q.dtype == torch.uint8 and q.shape == (3, 3, 17, 23)
    for i in range(3):
        back = torch.from_numpy(decode_png(encode_png(q[i]))).permute(2, 0, 1)
        assert torch.equal(back, q[i])
    assert torch.equal(q, (images.clamp(0, 1) * 255).round().to(torch.uint8))
    with pytest.raises(ValueError, match="not valid base64"):
        decode_png("not base64 !!")
    buf = io.BytesIO()
    Image.new("RGBA", (4, 4)).save(buf, format="PNG")
    with pytest.raises(ValueError, match="8-bit RGB PNG, got mode 'RGBA'"):
        decode_png(base64.b64encode(buf.getvalue()).decode())
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, format="JPEG")
    with pytest.raises(ValueError, match="expected a PNG, got JPEG"):
        decode_png(base64.b64encode(buf.getvalue()).decode())


# ------------------------------------------------------------------------------ equality
def test_two_iterations_with_a_remote_reward_equal_the_in_process_reward(tmp_path):
    """The tiny text world, GRPO on VADER sentiment: in-process vs served (texts are sent exactly)."""
    host = Host()
    local = tiny_text_config(tmp_path / "local", {"sentiment": {"weight": 1.0}})
    train(host.build_config(local), host)

    reward, reads, _ = build_served_reward("sentiment")
    with serving(reward, reads, name="sentiment", batch_window_ms=20) as server:
        cfg = tiny_text_config(tmp_path / "remote", {"sentiment": {"name": "remote", "url": server.url,
                                                                   "request_size": 3, "max_in_flight": 2}})
        host = Host()
        train(host.build_config(cfg), host)
        stats = server.info()["stats"]
    assert metrics(tmp_path / "remote") == metrics(tmp_path / "local")
    assert [m["iteration"] for m in metrics(tmp_path / "remote")] == [1, 2]
    # 2 iterations x 8 samples, in requests of at most 3 samples (3 + 3 + 2 per iteration)
    assert stats["samples"] == 16 and stats["requests"] == 6


def test_image_rewards_over_http_equal_the_in_process_reward_on_the_quantised_images():
    """JPEG size quantises as PNG does: equal to the in-process value on the raw images. clip_score
    (the tiny CLIP) is compared with the in-process reward applied to the same quantised images."""
    g = torch.Generator().manual_seed(1)
    base = torch.rand(7, 3, 1, 1, generator=g).expand(7, 3, 64, 64)
    images = (base + 0.15 * torch.rand(7, 3, 64, 64, generator=g)).clamp(0, 1)
    prompts = ["a red circle on the left", "a blue square at the top", "a green star in the center",
               "a yellow triangle on the right", "a purple circle at the bottom", "a red star on the left",
               "a blue circle at the top"]
    rollout = image_rollout(images, prompts)
    quantised = image_rollout(quantise_images(images).float() / 255, prompts)

    jpeg = JpegCompressibility(JpegConfig())
    with serving(jpeg, ["images"], name="jpeg_compressibility") as server:
        client = remote(server.url, request_size=2, max_in_flight=3)
        try:
            got = client(rollout)
        finally:
            client.close()
    assert torch.equal(got, jpeg(rollout))

    clip, reads, _ = build_served_reward("clip_score", ["batch_size=4"], device="cpu")
    with serving(clip, reads, name="clip_score") as server:
        client = remote(server.url, request_size=3)
        try:
            got = client(rollout)
        finally:
            client.close()
    want = clip(quantised)
    assert torch.allclose(got, want, atol=1e-5, rtol=0), (got, want)
    assert not torch.equal(quantise_images(images).float() / 255, images)  # the images did get quantised


@pytest.mark.slow
@pytest.mark.skipif(not REAL_HEAD.is_file(), reason=f"the LAION aesthetic head is not at {REAL_HEAD}")
def test_the_real_aesthetic_head_served_with_a_random_weight_vit_l14():
    """``polyrl serve-reward aesthetic head=... pretrained=null``: the real head on a ViT-L/14 built by
    open_clip without pretrained weights (768-d features, as the head requires)."""
    torch.manual_seed(0)
    reward, reads, params = build_served_reward("aesthetic", [f"head={REAL_HEAD}", "pretrained=null"], device="cpu")
    assert reads == ["images"] and params.model == "ViT-L-14" and params.pretrained is None
    g = torch.Generator().manual_seed(2)
    images = torch.rand(2, 3, 64, 64, generator=g)
    with serving(reward, reads, name="aesthetic", image_size=(64, 64)) as server:
        client = remote(server.url, request_size=1, timeout_s=120)
        try:
            got = client(image_rollout(images))
        finally:
            client.close()
    want = reward(image_rollout(quantise_images(images).float() / 255))
    assert got.shape == (2,) and torch.isfinite(got).all()
    assert torch.allclose(got, want, atol=1e-4, rtol=0), (got, want)


# ------------------------------------------------------------------------------ server behaviour
def test_server_answers_malformed_payloads_with_clear_4xx_errors():
    jpeg = JpegCompressibility(JpegConfig())
    q = quantise_images(torch.rand(2, 3, 64, 64))
    png64 = [encode_png(x) for x in q]
    png32 = encode_png(quantise_images(torch.rand(1, 3, 32, 32))[0])
    with serving(jpeg, ["images"], token="s3cret", image_size=(64, 64), max_request_samples=2) as server:
        auth = {"Authorization": "Bearer s3cret"}
        with httpx.Client(base_url=server.url, timeout=10) as http:
            def post(body, headers=auth, raw=None):
                r = http.post("/score", content=raw if raw is not None else json.dumps(body), headers=headers)
                return r.status_code, r.json().get("error", r.json())

            assert http.get("/health").json()["status"] == "ok"  # no token needed
            assert http.get("/info").status_code == 401
            assert http.get("/info", headers=auth).json()["max_request_samples"] == 2
            ok = {"prompts": ["a", "b"], "images": png64}
            status, body = post(ok, headers={})
            assert status == 401 and "bearer token" in body
            assert post(ok, headers={"Authorization": "Bearer wrong"})[0] == 401
            assert post(ok)[0] == 200 and len(http.post("/score", json=ok, headers=auth).json()["rewards"]) == 2
            assert post(None, raw=b"{not json")[0] == 400
            status, body = post({"images": png64})
            assert status == 422 and "missing field 'prompts'" in body
            status, body = post({"prompts": ["a", "b"]})
            assert status == 422 and "missing field 'images'" in body
            status, body = post({"prompts": ["a"], "images": [png32]})
            assert status == 422 and "images[0] is 32x32" in body and "64x64" in body
            status, body = post({"prompts": ["a", "b", "c"], "images": png64 + png64[:1]})
            assert status == 413 and "at most 2" in body
            status, body = post({"prompts": ["a", "b"], "images": png64[:1]})
            assert status == 422 and "list of 2 entries" in body
            status, body = post({"prompts": ["a"], "images": ["aGVsbG8="]})
            assert status == 422 and "images[0]: not an image" in body
            status, body = post({"prompts": ["a"], "images": png64[:1], "colour": "red"})
            assert status == 422 and "unknown fields ['colour']" in body
            status, body = post({"prompts": [], "images": []})
            assert status == 422 and "empty" in body


def test_concurrent_requests_are_merged_and_the_client_keeps_requests_in_flight():
    texts = [f"text number {i}" * (i % 3 + 1) for i in range(8)]
    prompts = [f"prompt {i}" for i in range(8)]
    reward = Recording()
    # a long window, but a full call (8 samples) is scored at once
    with serving(reward, ["texts"], batch_window_ms=3000, max_batch_size=8) as server:
        many = remote(server.url, request_size=2, max_in_flight=4)
        try:
            t0 = time.monotonic()
            got = many(text_rollout(texts, prompts))
            assert time.monotonic() - t0 < 2.5
        finally:
            many.close()
    assert got.tolist() == expected(texts, prompts)
    assert reward.calls == [8]  # four requests of two, in flight together, scored in one call
    reward = Recording()
    with serving(reward, ["texts"], batch_window_ms=300, max_batch_size=16) as server:
        one = remote(server.url, request_size=2, max_in_flight=1)
        try:
            assert one(text_rollout(texts, prompts)).tolist() == expected(texts, prompts)
        finally:
            one.close()
    assert reward.calls == [2, 2, 2, 2]  # one request at a time: nothing to merge within the window


def test_extra_columns_are_sent_and_served_rewards_read_them():
    reward, reads, _ = build_served_reward("exact_match", ["answer_column=answer"])
    texts = ["the answer is 42", "I think 7", "no idea"]
    extra = [{"answer": "42"}, {"answer": "8"}, {"answer": "no idea"}]
    rollout = text_rollout(texts, extra=extra)
    with serving(reward, reads, name="exact_match") as server:
        client = remote(server.url, request_size=2)
        try:
            got = client(rollout)
        finally:
            client.close()
    assert torch.equal(got, torch.as_tensor(reward(rollout), dtype=torch.float32))
    with serving(reward, reads) as server:
        client = remote(server.url, extra_columns=[], retries=0)
        try:
            with pytest.raises(RemoteRewardError, match="HTTP 500.*answer") as e:
                client(rollout)  # the column was not sent: the reward raises on the server, not retried
            assert e.value.attempts == 1
        finally:
            client.close()


def test_remote_reward_settings_are_checked():
    with pytest.raises(ConfigError, match="not an http"):
        from_dict(RemoteRewardConfig, {"url": "127.0.0.1:8000"}, "rewards.remote")
    with pytest.raises(ConfigError, match="request_size must be >= 1"):
        from_dict(RemoteRewardConfig, {"url": "http://127.0.0.1:8000", "request_size": 0}, "rewards.remote")
    with pytest.raises(ConfigError, match="url: required"):
        from_dict(RemoteRewardConfig, {}, "rewards.remote")
    reward = Recording()
    with serving(reward, ["texts"], max_request_samples=4) as server:
        with pytest.raises(ConfigError, match="request_size: 8 is more than the server .* accepts in one request \\(4\\)"):
            remote(server.url, request_size=8)
        with pytest.raises(ConfigError, match=r"reads \['texts'\] but only \['images'\] would be sent"):
            remote(server.url, send=["images"])
    with pytest.raises(ConfigError, match="env_rewards.*cannot be sent over HTTP"):
        build_served_reward("env_reward")
    with pytest.raises(ConfigError, match="did you mean 'sentiment'"):
        build_served_reward("sentimnt")
    with pytest.raises(ConfigError, match="unknown key"):
        build_served_reward("sentiment", ["scor=pos"])


def test_a_token_is_sent_from_the_environment(monkeypatch):
    with serving(Recording(), ["texts"], token="tok-123") as server:
        monkeypatch.delenv("POLYRL_REWARD_TOKEN", raising=False)
        with pytest.raises(RemoteRewardError, match="HTTP 401.*POLYRL_REWARD_TOKEN") as e:
            remote(server.url)
        assert e.value.attempts == 1  # a rejected token is not retried
        monkeypatch.setenv("POLYRL_REWARD_TOKEN", "tok-123")
        client = remote(server.url)
        try:
            assert client(text_rollout(["ab"], ["c"])).tolist() == [2.5]
        finally:
            client.close()


# ------------------------------------------------------------------------------ faults
def test_a_slow_server_is_waited_for_up_to_the_timeout_then_retried():
    reward = Recording(delay=0.6)
    with serving(reward, ["texts"], batch_window_ms=0) as server:
        patient = remote(server.url, timeout_s=5)
        try:  # slow but within the timeout: just slower
            assert patient(text_rollout(["abc"], ["d"])).tolist() == [3.5]
        finally:
            patient.close()
        hasty = remote(server.url, timeout_s=0.2, retries=1, backoff_s=0.05)
        try:
            t0 = time.monotonic()
            with pytest.raises(RemoteRewardError) as e:
                hasty(text_rollout(["abc"], ["d"]))
            took = time.monotonic() - t0
        finally:
            hasty.close()
    message = str(e.value)
    assert e.value.attempts == 2 and took < 3
    assert f"{server.url}/score" in message and "failed after 2 attempts" in message
    assert "no answer within 0.2 s" in message and "raise timeout_s" in message and "--resume" in message


class _Garbage(http.server.BaseHTTPRequestHandler):
    """Answers /info like a reward server, and /score with what ``mode`` says."""

    mode = "html"
    posts = 0

    def log_message(self, *args):  # quiet
        pass

    def _send(self, status, body: bytes, ctype="application/json"):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if type(self).mode == "html":
            self._send(200, b"<html>a web page</html>", "text/html")
        else:
            self._send(200, json.dumps({"reward": "x", "reads": ["texts"], "protocol": 1,
                                        "max_request_samples": 64}).encode())

    def do_POST(self):
        type(self).posts += 1
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if type(self).mode == "short":
            self._send(200, b'{"rewards": [1.0]}')
        elif type(self).mode == "nan":
            self._send(200, b'{"rewards": [1.0, NaN]}')
        else:
            self._send(200, b"<html>oops</html>", "text/html")


@pytest.mark.parametrize("mode,match", [
    ("html", "not a polyrl reward server's|not JSON"),
    ("short", r"expected \{\"rewards\": \[2 numbers\]\}"),
    ("nan", "not all finite numbers"),
    ("junk", "the answer is not JSON"),
])
def test_a_server_answering_garbage_stops_at_once_with_a_clear_error(mode, match):
    handler = type("Handler", (_Garbage,), {"mode": mode, "posts": 0})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        with pytest.raises(RemoteRewardError, match=match) as e:
            client = remote(url, retries=3)
            try:
                client(text_rollout(["a", "b"]))
            finally:
                client.close()
        assert "not another service" in str(e.value)
        assert handler.posts <= 1  # garbage is not retried
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def _start_cli_server(port: int = 0, timeout: float = 60.0) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "polyrl.cli", "serve-reward", "sentiment", "--port", str(port), "--host", "127.0.0.1"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "POLYRL_REWARD_TOKEN": ""},
    )
    deadline = time.monotonic() + timeout
    lines = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        found = re.search(r"at (http://127\.0\.0\.1:\d+)", line)
        if found:
            return proc, found.group(1)
    proc.kill()
    proc.wait(timeout=10)
    raise AssertionError(f"serve-reward did not print its address: {lines} {proc.stderr.read()[-2000:]}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=10)
    for stream in (proc.stdout, proc.stderr):
        stream.close()


def test_server_killed_mid_run_stops_with_a_checkpoint_and_resume_continues(tmp_path, capsys):
    """``polyrl serve-reward`` in another process, killed after iteration 1: the run stops during
    iteration 2 with RemoteRewardError after saving iteration 1; once a server is back on the same
    address, resuming finishes the run with the metrics of an uninterrupted in-process run."""
    host = Host()
    train(host.build_config(tiny_text_config(tmp_path / "local", {"sentiment": {}}, iterations=3)), host)

    proc, url = _start_cli_server()
    procs = [proc]
    try:
        assert httpx.get(url + "/health", timeout=5).json() == {"status": "ok", "reward": "sentiment", "protocol": 1}

        class KillAfterFirst:
            @hookimpl
            def polyrl_iteration_end(self, trainer, iteration, metrics, rollout):
                if iteration == 1:
                    _stop(proc)

        run_dir = tmp_path / "remote"
        rewards = {"sentiment": {"name": "remote", "url": url, "retries": 2, "backoff_s": 0.05, "timeout_s": 10}}
        host = Host()
        host.register(KillAfterFirst(), "kill-after-first")
        with pytest.raises(RemoteRewardError) as e:
            train(host.build_config(tiny_text_config(run_dir, rewards, iterations=3)), host)
        message = str(e.value)
        assert f"{url}/score" in message and "failed after 3 attempts" in message and "`curl " in message
        err = capsys.readouterr().err
        assert "stopped during iteration 2" in err and "checkpoint of iteration 1 saved" in err
        assert f"--resume {run_dir}" in err
        assert (run_dir / "checkpoints" / "iter_000001").is_dir()
        assert [m["iteration"] for m in metrics(run_dir)] == [1]

        proc, url2 = _start_cli_server(port=int(url.rsplit(":", 1)[1]))  # the server is back, same address
        procs.append(proc)
        assert url2 == url
        host = Host()
        data = load_yaml(run_dir / "config.yaml")
        train(host.build_config(data), host, resume=True)
    finally:
        for p in procs:
            _stop(p)
    assert metrics(run_dir) == metrics(tmp_path / "local")
