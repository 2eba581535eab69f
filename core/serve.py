"""``polyrl serve-reward``: any registered reward served over HTTP (FastAPI on uvicorn).

Endpoints (the wire format is described in :mod:`polyrl.rewards.remote`):

* ``POST /score``: scores a batch; ``{"rewards": [...]}``.
* ``GET /health``: ``{"status": "ok", ...}``, without a token (for load balancers and scripts).
* ``GET /info``: the reward's name, what it reads, its config and the server's limits and counters.

Concurrent requests are merged: a single worker thread takes the first waiting request, waits up
to ``batch_window_ms`` for more, and calls the reward once on up to ``max_batch_size`` samples
(requests whose images differ in size are scored in separate calls). The reward is only ever
called from that thread, so rewards need not be thread-safe.

Malformed requests are answered with a 4xx status and ``{"error": "<what is wrong>"}``: 400 for a
body that is not JSON, 401 for a missing or wrong bearer token, 413 for a body or a batch larger
than the limits, 422 for missing fields, lists of the wrong length, undecodable or wrongly sized
images. A reward that raises gives 500 with the error's text.
"""

import asyncio
import concurrent.futures
import hmac
import json
import queue
import socket
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from .config import apply_overrides, from_dict, load_yaml, to_dict
from .types import ConfigError, Context, Reward, Rollout

__all__ = ["ServeSettings", "RewardServer", "Batcher", "build_served_reward", "ServingDevice"]


@dataclass
class ServeSettings:
    """Settings of a reward server (the options of ``polyrl serve-reward``)."""

    host: str = "127.0.0.1"
    """Address to listen on (``0.0.0.0`` for every interface)."""
    port: int = 8000
    """Port to listen on (0: any free port; the address printed says which)."""
    token: str | None = None
    """Bearer token that ``POST /score`` and ``GET /info`` require (``None``: no token)."""
    max_batch_size: int = 64
    """Most samples scored in one reward call (concurrent requests are merged up to this)."""
    max_request_samples: int = 64
    """Most samples one request may hold (larger ones are answered 413)."""
    batch_window_ms: float = 5.0
    """How long the first waiting request waits for others to merge with."""
    image_size: tuple[int, int] | None = None
    """``(H, W)`` that every image must have (``None``: any size, the same within a request)."""
    max_body_mb: float = 256.0
    """Largest request body accepted, in MB (larger ones are answered 413)."""
    max_image_pixels: int = 4096 * 4096
    """Largest image accepted, in pixels."""

    def check(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"--port must be between 0 and 65535, got {self.port}")
        if self.max_batch_size < 1 or self.max_request_samples < 1:
            raise ConfigError(
                f"--max-batch-size ({self.max_batch_size}) and --max-request-samples ({self.max_request_samples}) "
                "must be >= 1"
            )
        if self.batch_window_ms < 0:
            raise ConfigError(f"--batch-window-ms must be >= 0, got {self.batch_window_ms}")
        if self.image_size is not None and (len(self.image_size) != 2 or min(self.image_size) < 1):
            raise ConfigError(f"--image-size must be H W (or one side for square images), got {self.image_size}")
        if self.max_body_mb <= 0:
            raise ConfigError(f"--max-body-mb must be > 0, got {self.max_body_mb}")


class ServingDevice:
    """What a served reward's factory receives as ``policy``: there is no policy, only the device
    the reward should run on (factories read ``policy.device``)."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)


class RequestError(Exception):
    """A request that cannot be scored: answered with ``status`` and ``{"error": message}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


# ------------------------------------------------------------------------------ building the reward
def build_served_reward(
    name: str,
    overrides: Sequence[str] = (),
    config_file: str | None = None,
    device: str | None = None,
    plugins: Sequence[str] = (),
) -> tuple[Reward, list[str], Any]:
    """Build the registered reward ``name`` with its settings (a YAML mapping of the reward's
    fields in ``config_file``, then ``key=value`` overrides). Returns ``(reward, reads, params)``.
    Every setting is checked before the reward's model loads."""
    from .host import Host
    from polyrl.rewards.remote import SENDABLE

    host = Host(plugins=plugins)
    spec = host.spec("reward", name, "serve-reward")
    if name == "remote":
        raise ConfigError("serve-reward: the remote reward is a client; serve the reward it would call instead")
    unsendable = [r for r in spec.reads if r not in SENDABLE]
    if unsendable:
        raise ConfigError(
            f"serve-reward: reward {name!r} reads {list(spec.reads)}, and {unsendable} cannot be sent over HTTP; "
            f"a served reward may read {list(SENDABLE)} (prompts and dataset columns always come along)"
        )
    data: dict[str, Any] = load_yaml(config_file) if config_file else {}
    data = apply_overrides(data, overrides)
    data.pop("weight", None)
    data.pop("name", None)
    params = from_dict(spec.config_cls, data, name)
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        torch.device(dev)
    except RuntimeError:
        raise ConfigError(f"--device: {dev!r} is not a torch device (cpu, cuda, cuda:1, mps...)") from None
    reward = spec.factory(params, policy=ServingDevice(dev))
    return reward, list(spec.reads), params


# ------------------------------------------------------------------------------ batching
@dataclass
class _Job:
    prompts: list[str]
    images: torch.Tensor | None  # uint8 [n, 3, H, W]
    texts: list[str] | None
    extra: list[dict[str, Any]]
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)

    @property
    def size(self) -> int:
        return len(self.prompts)

    @property
    def kind(self) -> tuple:
        return (None if self.images is None else tuple(self.images.shape[1:]), self.texts is not None)


class Batcher:
    """Merges concurrent requests into reward calls of at most ``max_batch_size`` samples, on one
    worker thread. ``submit`` returns a future of the job's ``[n]`` rewards."""

    def __init__(self, reward: Reward, max_batch_size: int, window_s: float) -> None:
        self.reward, self.max_batch_size, self.window_s = reward, max_batch_size, window_s
        self._queue: queue.Queue[_Job] = queue.Queue()
        self._held: deque[_Job] = deque()  # jobs taken from the queue but not merged into the last call
        self._stop = threading.Event()
        self.stats = {"requests": 0, "samples": 0, "reward_calls": 0, "reward_errors": 0, "reward_seconds": 0.0}
        self._thread = threading.Thread(target=self._run, name="polyrl-serve-batcher", daemon=True)
        self._thread.start()

    def submit(self, job: _Job) -> concurrent.futures.Future:
        if self._stop.is_set():
            raise RequestError(503, "the server is shutting down")
        self._queue.put(job)
        return job.future

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _next(self, timeout: float | None) -> _Job | None:
        if self._held:
            return self._held.popleft()
        try:
            return self._queue.get(timeout=timeout) if timeout is None or timeout > 0 else self._queue.get_nowait()
        except queue.Empty:
            return None

    def _run(self) -> None:
        while not self._stop.is_set():
            first = self._next(0.1)
            if first is None:
                continue
            group, n = [first], first.size
            deadline = time.monotonic() + self.window_s
            skipped: list[_Job] = []
            while n < self.max_batch_size:
                job = self._next(deadline - time.monotonic())
                if job is None:
                    break
                if job.kind == first.kind and n + job.size <= self.max_batch_size:
                    group.append(job)
                    n += job.size
                else:
                    skipped.append(job)
                    if n + job.size > self.max_batch_size and job.kind == first.kind:
                        break
            self._held.extendleft(reversed(skipped))
            self._score(group)
        for job in list(self._held) + list(self._queue.queue):
            job.future.set_exception(RequestError(503, "the server is shutting down"))

    def _score(self, group: list[_Job]) -> None:
        first = group[0]
        contexts = [Context(prompt=p, group=i, extra=e)
                    for i, (p, e) in enumerate((p, e) for j in group for p, e in zip(j.prompts, j.extra))]
        b = len(contexts)
        outputs: dict[str, Any] = {}
        if first.images is not None:
            outputs["images"] = torch.cat([j.images for j in group]).float() / 255.0
        if first.texts is not None:
            outputs["texts"] = [t for j in group for t in j.texts]
        rollout = Rollout(contexts=contexts, log_probs=torch.zeros(b, 1), mask=torch.ones(b, 1, dtype=torch.bool),
                          outputs=outputs)
        t0 = time.perf_counter()
        try:
            with torch.no_grad():
                value = torch.as_tensor(self.reward(rollout), dtype=torch.float32).detach().cpu()
            if value.shape != (b,):
                raise ValueError(f"the reward returned shape {tuple(value.shape)}; a served reward must return [{b}]")
            if not torch.isfinite(value).all():
                raise ValueError(f"the reward returned non-finite values: {value.tolist()[:8]}")
        except Exception as e:  # noqa: BLE001 - reported to every request of the call
            self.stats["reward_errors"] += 1
            err = RequestError(500, f"the reward raised {type(e).__name__}: {e}")
            for j in group:
                j.future.set_exception(err)
            return
        self.stats["reward_calls"] += 1
        self.stats["reward_seconds"] += time.perf_counter() - t0
        self.stats["requests"] += len(group)
        self.stats["samples"] += b
        k = 0
        for j in group:
            j.future.set_result(value[k : k + j.size].tolist())
            k += j.size


# ------------------------------------------------------------------------------ parsing requests
def parse_request(body: bytes, reads: Sequence[str], settings: ServeSettings) -> _Job:
    """A request body → a job, or :class:`RequestError` naming what is wrong."""
    from polyrl.rewards.remote import PROTOCOL, decode_png

    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise RequestError(400, f"the body is not JSON ({e})") from None
    if not isinstance(data, dict):
        raise RequestError(422, f"expected a JSON object, got {type(data).__name__}")
    known = {"protocol", "prompts", "images", "texts", "extra"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise RequestError(422, f"unknown fields {unknown}; accepted: {sorted(known)}")
    if data.get("protocol", PROTOCOL) != PROTOCOL:
        raise RequestError(422, f"protocol {data.get('protocol')!r} is not spoken here; this server speaks {PROTOCOL}")
    prompts = data.get("prompts")
    if prompts is None:
        raise RequestError(422, "missing field 'prompts' (a list of strings, one per sample)")
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise RequestError(422, "'prompts' must be a list of strings")
    b = len(prompts)
    if b == 0:
        raise RequestError(422, "'prompts' is empty: a request scores at least one sample")
    if b > settings.max_request_samples:
        raise RequestError(
            413, f"{b} samples in one request; this server accepts at most {settings.max_request_samples} (split the batch)"
        )
    for name in reads:
        if data.get(name) is None:
            raise RequestError(422, f"missing field {name!r}: the served reward reads {list(reads)}")
    for name in ("images", "texts", "extra"):
        if data.get(name) is not None and (not isinstance(data[name], list) or len(data[name]) != b):
            got = len(data[name]) if isinstance(data[name], list) else type(data[name]).__name__
            raise RequestError(422, f"'{name}' must be a list of {b} entries (one per prompt), got {got}")
    texts = data.get("texts")
    if texts is not None and not all(isinstance(t, str) for t in texts):
        raise RequestError(422, "'texts' must be a list of strings")
    extra = data.get("extra") or [{} for _ in range(b)]
    if not all(isinstance(e, dict) for e in extra):
        raise RequestError(422, "'extra' must be a list of objects (dataset columns of each sample)")
    images = None
    if data.get("images") is not None:
        arrays = []
        for i, item in enumerate(data["images"]):
            try:
                arr = decode_png(item, settings.max_image_pixels)
            except ValueError as e:
                raise RequestError(422, f"images[{i}]: {e}") from None
            h, w = arr.shape[:2]
            if settings.image_size is not None and (h, w) != tuple(settings.image_size):
                eh, ew = settings.image_size
                raise RequestError(422, f"images[{i}] is {w}x{h} (WxH); this server accepts {ew}x{eh} images only")
            if arrays and arr.shape != arrays[0].shape:
                h0, w0 = arrays[0].shape[:2]
                raise RequestError(422, f"images[{i}] is {w}x{h} but images[0] is {w0}x{h0}; one size per request")
            arrays.append(arr)
        import numpy as np

        images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return _Job(prompts=prompts, images=images, texts=texts, extra=extra)


# ------------------------------------------------------------------------------ the server
class RewardServer:
    """A reward behind FastAPI + uvicorn. ``start()`` serves in a background thread (tests,
    notebooks); ``serve_forever()`` in the calling thread until Ctrl-C (the command line)."""

    def __init__(self, reward: Reward, reads: Sequence[str], settings: ServeSettings | None = None,
                 name: str = "reward", params: Any = None, sock: socket.socket | None = None) -> None:
        self.reward, self.reads, self.name, self.params = reward, list(reads), name, params
        self.settings = settings or ServeSettings()
        self.settings.check()
        self.batcher = Batcher(reward, self.settings.max_batch_size, self.settings.batch_window_ms / 1000.0)
        self.app = self._make_app()
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self.socket: socket.socket | None = sock
        self._url: str | None = None

    @property
    def url(self) -> str:
        if self._url is None:
            if self.socket is None:
                raise RuntimeError("the server is not bound yet")
            host, port = self.socket.getsockname()[:2]
            self._url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
        return self._url

    def info(self) -> dict[str, Any]:
        s = self.settings
        return {
            "reward": self.name, "reads": self.reads, "protocol": _protocol(),
            "config": to_dict(self.params) if self.params is not None else None,
            "max_batch_size": s.max_batch_size, "max_request_samples": s.max_request_samples,
            "batch_window_ms": s.batch_window_ms, "image_size": list(s.image_size) if s.image_size else None,
            "stats": dict(self.batcher.stats),
        }

    # -------------------------------------------------------------- app
    def _make_app(self):
        from fastapi import FastAPI, Request  # the handlers' annotations are read at run time (no __future__ import here)
        from fastapi.responses import JSONResponse
        from starlette.concurrency import run_in_threadpool

        app = FastAPI(title=f"polyrl reward server: {self.name}", docs_url=None, redoc_url=None, openapi_url=None)
        settings, token = self.settings, self.settings.token
        max_body = int(settings.max_body_mb * 1e6)

        def error(status: int, message: str) -> JSONResponse:
            headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
            return JSONResponse({"error": message}, status_code=status, headers=headers)

        def authorised(request: Request) -> bool:
            if not token:
                return True
            got = request.headers.get("authorization", "")
            scheme, _, value = got.partition(" ")
            return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), token.encode())

        @app.get("/health")
        async def health() -> dict[str, Any]:
            return {"status": "ok", "reward": self.name, "protocol": _protocol()}

        @app.get("/info")
        async def info(request: Request):
            if not authorised(request):
                return error(401, "missing or wrong bearer token (Authorization: Bearer <token>)")
            return self.info()

        @app.post("/score")
        async def score(request: Request):
            if not authorised(request):
                return error(401, "missing or wrong bearer token (Authorization: Bearer <token>)")
            declared = request.headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > max_body:
                return error(413, f"the body has {int(declared)} bytes; this server accepts at most {max_body}")
            chunks, size = [], 0
            async for part in request.stream():
                size += len(part)
                if size > max_body:
                    return error(413, f"the body is larger than this server accepts ({max_body} bytes)")
                chunks.append(part)
            try:
                job = await run_in_threadpool(parse_request, b"".join(chunks), self.reads, settings)
                values = await asyncio.wrap_future(self.batcher.submit(job))
            except RequestError as e:
                return error(e.status, str(e))
            return {"rewards": values}

        return app

    # -------------------------------------------------------------- running
    def bind(self) -> socket.socket:
        """Listen on ``settings.host:settings.port`` (done by ``start`` unless called first)."""
        if self.socket is None:
            self.socket = bind_socket(self.settings.host, self.settings.port)
        return self.socket

    def _uvicorn(self):
        import uvicorn

        config = uvicorn.Config(self.app, log_level="warning", access_log=False, lifespan="off",
                                timeout_keep_alive=30, timeout_graceful_shutdown=10)
        self._server = uvicorn.Server(config)
        return self._server

    def start(self, timeout: float = 30.0) -> str:
        """Serve in a background thread; returns the address once the server accepts requests."""
        sock = self.bind()
        server = self._uvicorn()
        self._thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="polyrl-serve", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the reward server did not start within {timeout} s")
            time.sleep(0.01)
        return self.url

    def stop(self) -> None:
        """Stop accepting requests, finish those in progress, and stop the batcher."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=15)
        self.batcher.close()
        if self.socket is not None:
            self.socket.close()

    def serve_forever(self, announce: bool = True) -> None:
        """Serve in this thread until Ctrl-C / SIGTERM; prints the address first."""
        sock = self.bind()
        url = self.url
        if announce:
            auth = "bearer token required" if self.settings.token else "no token"
            print(f"polyrl: serving reward {self.name!r} (reads {self.reads}) at {url} "
                  f"(POST /score, GET /health, GET /info; {auth}); Ctrl-C stops", flush=True)
        try:
            self._uvicorn().run(sockets=[sock])
        finally:
            self.batcher.close()
            sock.close()


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: a free one), or a ConfigError naming why not."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # inherited by accepted connections (Linux)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(2048)
    return sock


def _protocol() -> int:
    from polyrl.rewards.remote import PROTOCOL

    return PROTOCOL


def parse_image_size(values: Sequence[int] | None) -> tuple[int, int] | None:
    """``--image-size 64`` → ``(64, 64)``; ``--image-size 512 768`` → ``(512, 768)`` (H W)."""
    if not values:
        return None
    if len(values) == 1:
        return (values[0], values[0])
    if len(values) == 2:
        return (values[0], values[1])
    raise ConfigError(f"--image-size takes H W or one side, got {list(values)}")


def main_serve(args: Any) -> int:
    """What ``polyrl serve-reward`` runs (``args`` from :func:`polyrl.cli.build_parser`)."""
    import os

    settings = ServeSettings(
        host=args.host, port=args.port, token=args.token or os.environ.get(args.token_env) or None,
        max_batch_size=args.max_batch_size, max_request_samples=args.max_request_samples or args.max_batch_size,
        batch_window_ms=args.batch_window_ms, image_size=parse_image_size(args.image_size),
    )
    settings.check()
    try:  # fail on a busy port before the reward's model loads
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise ConfigError("serve-reward needs FastAPI and uvicorn: pip install 'polyrl[serve]'") from None
    sock = bind_socket(settings.host, settings.port)
    print(f"polyrl: loading reward {args.name!r}...", file=sys.stderr, flush=True)
    try:
        reward, reads, params = build_served_reward(args.name, args.overrides, args.config, args.device,
                                                    plugins=getattr(args, "plugin", ()))
    except OSError as e:  # weights that cannot be read or downloaded
        sock.close()
        from .errors import PolyrlError

        raise PolyrlError(f"serve-reward: the reward {args.name!r} could not load its weights: {e}") from e
    except BaseException:
        sock.close()
        raise
    RewardServer(reward, reads, settings, name=args.name, params=params, sock=sock).serve_forever()
    return 0
