"""``remote``: a reward computed by a ``polyrl serve-reward`` server over HTTP.

The client splits each rollout into requests of ``request_size`` samples, keeps up to
``max_in_flight`` of them in flight, and retries a request that fails for a transient reason
(connection refused or reset, timeout, HTTP 408/429/502/503/504) with exponential backoff. When a
request still fails after ``retries`` further attempts, or fails for a reason that retrying cannot
fix (a 4xx answer, a 500 from the reward, an answer that is not a reward response), the reward
raises :class:`RemoteRewardError`; the training loop then saves a checkpoint of the last completed
iteration and stops, and ``polyrl train --resume RUN_DIR`` continues once the server answers.

The wire format (protocol 1) is JSON. ``POST /score``::

    {"protocol": 1,
     "prompts": ["a red circle", ...],            # B strings, always sent
     "images":  ["<base64 PNG>", ...],            # B 8-bit RGB PNGs, when sent
     "texts":   ["generated text", ...],          # B strings, when sent
     "extra":   [{"answer": "42"}, ...]}          # B mappings of dataset columns (Context.extra)

answered by ``{"rewards": [r_1, ..., r_B]}``, or by an error status with ``{"error": "..."}``.
``GET /health`` (no token) says whether the server is up; ``GET /info`` (token) names the reward,
what it reads and the server's limits.

Images are float ``[B, 3, H, W]`` in ``[0, 1]``; PNG carries 8 bits per channel, so the server
scores ``round(255 * clamp(x, 0, 1)) / 255``. Rewards that quantise this way themselves (the JPEG
rewards) give exactly the in-process values; model-based rewards (aesthetic, clip_score) give the
in-process value of the quantised images.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import re
import socket
import threading
import time
import urllib.parse
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from polyrl.errors import PolyrlError
from polyrl.types import ComponentSpec, ConfigError, Reward, Rollout

__all__ = [
    "PROTOCOL",
    "SENDABLE",
    "RemoteRewardConfig",
    "RemoteReward",
    "RemoteRewardError",
    "quantise_images",
    "encode_png",
    "decode_png",
    "REMOTE_SPEC",
]

PROTOCOL = 1
"""Version of the wire format; client and server must agree."""

SENDABLE = ("images", "texts")
"""Rollout outputs that can be sent to a reward server (prompts and ``Context.extra`` always go)."""

RETRY_STATUS = frozenset({408, 429, 502, 503, 504})
"""HTTP statuses worth retrying: the server (or a proxy before it) is busy, starting or restarting."""


class RemoteRewardError(PolyrlError):
    """A reward server could not be reached, or answered with something that is not a reward
    (shown by ``polyrl train`` as one paragraph, after the loop's emergency checkpoint).

    ``url`` is the address tried, ``attempts`` how many requests were made for the failing batch,
    ``reason`` the last failure."""

    def __init__(self, url: str, attempts: int, reason: str, hint: str, elapsed: float | None = None) -> None:
        self.url, self.attempts, self.reason = url, attempts, reason
        took = f" over {elapsed:.1f} s" if elapsed is not None else ""
        tries = f"{attempts} attempt" + ("s" if attempts != 1 else "")
        super().__init__(f"remote reward at {url} failed after {tries}{took}: {reason}. {hint}")


# ------------------------------------------------------------------------------- wire helpers
def quantise_images(images: torch.Tensor) -> torch.Tensor:
    """``[B, 3, H, W]`` float in ``[0, 1]`` → uint8 ``round(255 * clamp(x, 0, 1))``, on the CPU (what
    PNG carries; the same rounding as the JPEG rewards)."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"remote reward: expected images [B, 3, H, W], got {shape}")
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()


def encode_png(image: torch.Tensor, compress_level: int = 1) -> str:
    """One uint8 image ``[3, H, W]`` → base64 text of an RGB PNG (lossless; level 1 is the fastest)."""
    buf = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(buf, format="PNG", compress_level=compress_level)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_png(data: str, max_pixels: int = 4096 * 4096) -> np.ndarray:
    """Base64 text of an 8-bit RGB PNG → uint8 array ``[H, W, 3]``. Raises ``ValueError`` naming what
    is wrong (not base64, not a PNG, not RGB, more than ``max_pixels`` pixels)."""
    if not isinstance(data, str):
        raise ValueError(f"expected base64 text of a PNG, got {type(data).__name__}")
    try:
        raw = base64.b64decode(data, validate=True)
    except (ValueError, TypeError) as e:
        raise ValueError(f"not valid base64 ({e})") from None
    try:
        img = Image.open(io.BytesIO(raw))
    except Exception as e:  # noqa: BLE001 - PIL raises several kinds for undecodable data
        raise ValueError(f"not an image ({type(e).__name__})") from None
    if img.format != "PNG":
        raise ValueError(f"expected a PNG, got {img.format}")
    w, h = img.size
    if w * h > max_pixels:
        raise ValueError(f"image of {w}x{h} pixels is larger than the server accepts ({max_pixels} pixels)")
    if img.mode != "RGB":
        raise ValueError(f"expected an 8-bit RGB PNG, got mode {img.mode!r}")
    try:
        return np.array(img.convert("RGB"), dtype=np.uint8)
    except Exception as e:  # noqa: BLE001 - truncated or corrupt data
        raise ValueError(f"corrupt PNG ({type(e).__name__}: {e})") from None


def _json_safe(value: Any, where: str) -> Any:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        raise ValueError(f"remote reward: {where} = {value!r} cannot be sent as JSON") from None
    return value


# ------------------------------------------------------------------------------- the config
@dataclass
class RemoteRewardConfig:
    """Settings of the ``remote`` reward (a client of ``polyrl serve-reward``)."""

    url: str
    """Address of the reward server, as ``polyrl serve-reward`` prints it (``http://host:port``)."""
    send: list[Literal["images", "texts"]] | None = None
    """Rollout outputs sent with each sample; ``null``: those the served reward reads (the server
    says which when the run starts). Prompts are always sent."""
    extra_columns: list[str] | None = None
    """Dataset columns (``Context.extra``) sent with each sample; ``null``: all of them; ``[]``: none."""
    request_size: int = 32
    """Samples per HTTP request (a rollout is split into requests of this size)."""
    max_in_flight: int = 4
    """Requests sent concurrently."""
    timeout_s: float = 60.0
    """Seconds to wait for the answer to one request before it counts as failed (and is retried)."""
    connect_timeout_s: float = 10.0
    """Seconds to wait for a connection to the server."""
    retries: int = 6
    """Further attempts for a request that failed for a transient reason (unreachable, timed out,
    busy): after the last one the run stops with a checkpoint of its last completed iteration."""
    backoff_s: float = 0.5
    """Wait before the first retry; doubled for each further one."""
    backoff_max_s: float = 30.0
    """Longest wait between two attempts."""
    token_env: str = "POLYRL_REWARD_TOKEN"
    """Environment variable holding the server's bearer token (unset or empty: no token is sent).
    The token itself is never written in a run's config."""

    def check(self) -> None:
        """Reject impossible settings before any model loads."""
        parsed = urllib.parse.urlparse(self.url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ConfigError(
                f"remote.url: {self.url!r} is not an http(s) address; expected the address `polyrl serve-reward` "
                "prints, e.g. 'http://127.0.0.1:8000'"
            )
        try:
            parsed.port
        except ValueError:
            raise ConfigError(f"remote.url: {self.url!r} has an invalid port") from None
        for name in ("request_size", "max_in_flight"):
            if getattr(self, name) < 1:
                raise ConfigError(f"remote.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("timeout_s", "connect_timeout_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"remote.{name} must be > 0, got {getattr(self, name)}")
        if self.retries < 0:
            raise ConfigError(f"remote.retries must be >= 0, got {self.retries}")
        if self.backoff_s < 0 or self.backoff_max_s < self.backoff_s:
            raise ConfigError(
                f"remote.backoff_s ({self.backoff_s}) must be >= 0 and <= remote.backoff_max_s ({self.backoff_max_s})"
            )
        if self.send is not None and len(set(self.send)) != len(self.send):
            raise ConfigError(f"remote.send: {self.send} names an output twice; accepted: {list(SENDABLE)}")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.token_env):
            raise ConfigError(f"remote.token_env: {self.token_env!r} is not an environment variable name")
        try:
            import httpx  # noqa: F401
        except ImportError:
            raise ConfigError(
                "the remote reward needs the httpx package: pip install 'polyrl[serve]'"
            ) from None

    def backoff(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        return min(self.backoff_max_s, self.backoff_s * 2 ** (attempt - 1))


# ------------------------------------------------------------------------------- the client
class _Permanent(Exception):
    """A failure that retrying cannot fix."""


@dataclass
class _Chunk:
    start: int
    prompts: list[str]
    images: torch.Tensor | None = None  # uint8 [n, 3, H, W]
    texts: list[str] | None = None
    extra: list[dict[str, Any]] | None = None
    payload: bytes = field(default=b"", repr=False)

    def encode(self) -> bytes:
        if not self.payload:
            body: dict[str, Any] = {"protocol": PROTOCOL, "prompts": self.prompts}
            if self.images is not None:
                body["images"] = [encode_png(im) for im in self.images]
            if self.texts is not None:
                body["texts"] = self.texts
            if self.extra is not None:
                body["extra"] = self.extra
            self.payload = json.dumps(body).encode()
        return self.payload


class RemoteReward(Reward):
    """Scores rollouts on a ``polyrl serve-reward`` server: ``[B]`` float32 on the CPU.

    On construction it asks the server (``GET /info``, with the same retries) what its reward reads
    and how large a request may be, so that a wrong address, token or setting stops the run before
    the first iteration.
    """

    reads = "any"

    def __init__(self, cfg: RemoteRewardConfig) -> None:
        import httpx

        self.cfg = cfg
        self.base = cfg.url.rstrip("/")
        token = os.environ.get(cfg.token_env, "")
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self._httpx = httpx
        transport = httpx.HTTPTransport(
            limits=httpx.Limits(max_connections=cfg.max_in_flight, max_keepalive_connections=cfg.max_in_flight),
            socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],  # no 40 ms Nagle/delayed-ACK stalls
        )
        self.client = httpx.Client(
            headers=headers, transport=transport, timeout=httpx.Timeout(cfg.timeout_s, connect=cfg.connect_timeout_s)
        )
        self.pool = ThreadPoolExecutor(cfg.max_in_flight, thread_name_prefix="polyrl-remote-reward")
        self.info = self._request("GET", "/info", None, threading.Event())
        self._check_info()

    # -------------------------------------------------------------- setup
    def _check_info(self) -> None:
        info, url = self.info, self.base + "/info"
        if not isinstance(info, dict) or "reads" not in info or "max_request_samples" not in info:
            raise RemoteRewardError(url, 1, f"the answer is not a polyrl reward server's: {str(info)[:200]!r}",
                                    self._hint_garbage())
        if info.get("protocol") != PROTOCOL:
            raise ConfigError(
                f"remote.url: the server at {self.base} speaks protocol {info.get('protocol')!r}, this client "
                f"{PROTOCOL}; run the same polyrl version on both sides"
            )
        reads = list(info["reads"])
        self.reward_name = str(info.get("reward", "?"))
        self.send = list(self.cfg.send) if self.cfg.send is not None else [r for r in reads if r in SENDABLE]
        missing = [r for r in reads if r not in self.send]
        if missing:
            raise ConfigError(
                f"remote.send: the served reward {self.reward_name!r} reads {reads} but only {self.send} would be "
                f"sent; add {missing} (or leave send unset)"
            )
        limit = int(info["max_request_samples"])
        if self.cfg.request_size > limit:
            raise ConfigError(
                f"remote.request_size: {self.cfg.request_size} is more than the server at {self.base} accepts in "
                f"one request ({limit}); use request_size <= {limit} or start the server with a larger "
                "--max-request-samples"
            )

    def _hint_unreachable(self, starting: bool = False) -> str:
        then = (
            "Nothing was trained yet (a resumed run's checkpoints are untouched): run the same command again once "
            "the server answers." if starting else
            "In a training run the last completed iteration has been checkpointed: continue with "
            "`polyrl train --resume RUN_DIR` once the server answers."
        )
        return (
            f"Check that `polyrl serve-reward` is running and reachable at this address (`curl {self.base}/health` "
            f"should answer), that the address in the reward's `url` is right, and that it answers within "
            f"timeout_s={self.cfg.timeout_s:g} s (a busy server: raise timeout_s or lower request_size). {then}"
        )

    def _hint_rejected(self) -> str:
        return (
            f"The server rejected the request; check the token (environment variable {self.cfg.token_env}), that "
            "the served reward is the one this run expects, and the server's limits (`GET /info`). In a training run "
            "the last completed iteration has been checkpointed: fix the cause and continue with "
            "`polyrl train --resume RUN_DIR`."
        )

    def _hint_garbage(self) -> str:
        return (
            "Check that the address is a `polyrl serve-reward` server and not another service or a proxy's error "
            "page, and that both sides run the same polyrl version. In a training run the last completed iteration "
            "has been checkpointed: continue with `polyrl train --resume RUN_DIR` once it answers correctly."
        )

    # -------------------------------------------------------------- HTTP with retries
    def _request(self, method: str, path: str, chunk: _Chunk | None, stop: threading.Event) -> Any:
        httpx, cfg, url = self._httpx, self.cfg, self.base + path
        started = time.monotonic()
        attempts = 0
        while True:
            attempts += 1
            try:
                if chunk is None:
                    response = self.client.request(method, url)
                else:
                    response = self.client.request(method, url, content=chunk.encode())
            except (httpx.TransportError, OSError) as e:  # refused, reset, DNS, timeouts
                reason = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
                if isinstance(e, httpx.TimeoutException):
                    reason = f"no answer within {cfg.timeout_s:g} s ({type(e).__name__})"
            else:
                if response.status_code == 200:
                    try:
                        return response.json()
                    except ValueError:
                        raise RemoteRewardError(
                            url, attempts, f"the answer is not JSON: {response.text[:200]!r}", self._hint_garbage(),
                            time.monotonic() - started,
                        ) from None
                message = _error_message(response)
                reason = f"HTTP {response.status_code}: {message}"
                if response.status_code not in RETRY_STATUS:
                    hint = self._hint_rejected() if response.status_code < 500 else (
                        "The served reward raised an error; see the server's log. In a training run the last completed "
                        "iteration has been checkpointed: continue with `polyrl train --resume RUN_DIR` once it is fixed."
                    )
                    raise RemoteRewardError(url, attempts, reason, hint, time.monotonic() - started)
            if attempts > cfg.retries or stop.is_set() or stop.wait(cfg.backoff(attempts)):
                # out of attempts, or another request of the batch failed for good while this one waited
                raise RemoteRewardError(url, attempts, reason, self._hint_unreachable(starting=chunk is None),
                                        time.monotonic() - started)

    def _score(self, chunk: _Chunk, stop: threading.Event) -> list[float]:
        answer = self._request("POST", "/score", chunk, stop)
        url = self.base + "/score"
        values = answer.get("rewards") if isinstance(answer, dict) else None
        n = len(chunk.prompts)
        if not isinstance(values, list) or len(values) != n:
            raise RemoteRewardError(
                url, 1, f"expected {{\"rewards\": [{n} numbers]}}, got {json.dumps(answer)[:200]!r}", self._hint_garbage()
            )
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
            raise RemoteRewardError(url, 1, f"the rewards are not all finite numbers: {values[:8]!r}",
                                    self._hint_garbage())
        return [float(v) for v in values]

    # -------------------------------------------------------------- the reward
    def chunks(self, rollout: Rollout) -> list[_Chunk]:
        """The rollout as requests of at most ``request_size`` samples (images quantised to uint8)."""
        b = rollout.batch_size
        outputs = rollout.outputs
        for name in self.send:
            if name not in outputs:
                raise ValueError(
                    f"remote reward: the rollout has no {name!r} output to send (the sampler produces "
                    f"{sorted(outputs)}); set the reward's `send` to what the served reward needs"
                )
        images = quantise_images(outputs["images"]) if "images" in self.send else None
        if images is not None and images.shape[0] != b:
            raise ValueError(f"remote reward: {images.shape[0]} images for {b} samples")
        texts = [str(t) for t in outputs["texts"]] if "texts" in self.send else None
        if texts is not None and len(texts) != b:
            raise ValueError(f"remote reward: {len(texts)} texts for {b} samples")
        extra = None
        if self.cfg.extra_columns is None or self.cfg.extra_columns:
            extra = []
            for c in rollout.contexts:
                cols = c.extra if self.cfg.extra_columns is None else {
                    k: c.extra[k] for k in self.cfg.extra_columns if k in c.extra}
                extra.append({k: _json_safe(v, f"extra column {k!r}") for k, v in cols.items()})
        size = self.cfg.request_size
        return [
            _Chunk(
                start=i,
                prompts=rollout.prompts[i : i + size],
                images=None if images is None else images[i : i + size],
                texts=None if texts is None else texts[i : i + size],
                extra=None if extra is None else extra[i : i + size],
            )
            for i in range(0, b, size)
        ]

    def __call__(self, rollout: Rollout) -> torch.Tensor:
        chunks = self.chunks(rollout)
        stop = threading.Event()
        futures = [self.pool.submit(self._score, c, stop) for c in chunks]
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        failed = [f for f in futures if f.done() and f.exception() is not None]
        if failed:
            stop.set()  # the other requests give up at their next wait
            wait(futures)
            raise failed[0].exception()
        out = torch.empty(rollout.batch_size, dtype=torch.float32)
        for c, f in zip(chunks, futures):
            out[c.start : c.start + len(c.prompts)] = torch.tensor(f.result(), dtype=torch.float32)
        return out

    def close(self) -> None:
        """Close the connections and the request threads."""
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.client.close()


def _error_message(response: Any) -> str:
    try:
        body = response.json()
    except ValueError:
        return repr(response.text[:200])
    if isinstance(body, dict):
        return str(body.get("error") or body.get("detail") or body)[:500]
    return str(body)[:200]



REMOTE_SPEC = ComponentSpec(
    name="remote",
    factory=lambda cfg, policy=None: RemoteReward(cfg),
    config_cls=RemoteRewardConfig,
    modality="any",
    reads=(),  # what it sends is set by `send` (or by the server) and checked when the run starts
    description="a reward computed by a `polyrl serve-reward` server over HTTP (batched, retried)",
)
